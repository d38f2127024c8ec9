"""bench/bench_pipeline.py --tiny runs end to end on CPU: every CPU variant measures, GPU-only ones skip
with a reason, the table and targets print, and bench.json holds what was printed. Also: the interleaved
timer of the tracking group (turns, drains, failures, ratios) on plain epoch functions, and (GPU) the
hymenoptera group's CUDA-graph variants with the interleaved tracking measurement at reduced size; and
bench/probe_save_gil.py, bench/probe_epoch_end.py, bench/probe_log_batch.py, bench/probe_sender.py and
bench/probe_improving_epochs.py and bench/probe_progress.py in their quick modes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from _feeds import Arm, interleaved_rows, time_interleaved  # noqa: E402  (bench-local module)

CPU_VARIANTS = {"ceiling_bf16", "ceiling_fp32", "mltrack_ram", "reference_fp32", "reference_bf16", "mltrack_default"}
GPU_ONLY = {"mltrack_gpu", "nvjpeg_every_epoch"}


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **extra}
    for var in ("OUT", "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        env.pop(var, None)
    return env


@pytest.mark.timeout(120)
def test_tiny_benchmark_runs_on_cpu(tmp_path: Path) -> None:
    env = _env(CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_pipeline.py"), "--tiny", "--out", str(tmp_path / "out"),
         "--cache-dir", str(tmp_path / ".bench")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    rows = {(r["group"], r["name"]): r for r in report["results"]}
    for name in CPU_VARIANTS:
        row = rows[("throughput", name)]
        assert row.get("img_per_s", 0) > 0 and row["images"] > 0 and row["epochs"] >= 1, row
    for name in GPU_ONLY:
        assert rows[("throughput", name)]["skipped"] == "needs a CUDA device"
    timm = rows[("throughput", "timm_bf16")]
    assert "img_per_s" in timm or "timm not importable" in timm.get("skipped", "")
    assert rows[("throughput", "mltrack_ram")]["cache"] == "ram"
    assert rows[("throughput", "mltrack_default")]["cache"] == "none"
    assert rows[("hymenoptera", "tutorial_fp32")]["img_per_s"] > 0
    assert rows[("hymenoptera", "mltrack_ram_checkpoint")]["img_per_s"] > 0
    for suffix in ("", "_checkpoint", "_tracked"):  # the CUDA-graph variants: named, skipped with the reason
        assert rows[("hymenoptera", f"mltrack_ram_ro{suffix}")]["skipped"].startswith("--tiny")
    tracked = rows[("tracking", "tracked")]
    assert tracked.get("img_per_s", 0) > 0 and tracked["queue_drain_s"] >= 0  # mlflow is installed here
    variants = ["untracked", "checkpoint_only", "tracked", "tracked_tensorboard", "tracked_default",
                "tracked_default_every_epoch", "tracked_default_figure_duty10", "tracked_thread_sender",
                "tracked_default_thread_sender", "checkpoint_only_no_hold", "tracked_default_no_hold"]
    for name in variants:  # one interleaved round of one epoch each (--tiny)
        row = rows[("tracking", name)]
        assert [b["round"] for b in row["blocks"]] == [0] and row["epochs"] == 1 and row["images"] > 0, row
        assert row["interleaved"]["drop_first_epoch_of_block"] is False and len(row["round_ratios"]) == 1
    assert rows[("tracking", "untracked")]["median_round_ratio"] == 1.0
    assert report["extra"]["tracking_protocol"]["orders"] == [variants]
    for name in variants[1:]:  # the epoch-IO worker's CPU (checkpoint writes at least), from its own clock
        by_name = rows[("tracking", name)]["threads_cpu_ms_per_epoch_by_name"]
        assert by_name.get("mltrack-epoch-io_0", 0) > 0 and rows[("tracking", name)]["threads_cpu_ms_per_epoch"] > 0
    assert "mltrack-tracking" in rows[("tracking", "tracked")]["threads_cpu_ms_per_epoch_by_name"]
    assert "threads_cpu_ms_per_epoch" not in rows[("tracking", "untracked")]
    for name in [v for v in variants if v.startswith("tracked_default")]:  # the figure, with and without duty rule
        assert rows[("tracking", name)]["figures"] == "1 of 1"
    assert not [r for r in report["results"] if "error" in r], [r["error"] for r in report["results"] if "error" in r]
    out = proc.stdout
    assert "(1) reference: ImageFolder+PIL workers, fp32" in out and "x (1)" in out and "% of (6)" in out
    assert "targets (issue 9)" in out and "skipped: needs a CUDA device" in out
    assert "interleaved in one process: 1 rounds x 1 epochs" in out and "median of per-round ratios" in out
    assert "hymenoptera epoch with tracking: mltrack_ram_tracked (eager)" in out
    assert not (tmp_path / "mlruns").exists() and not list((tmp_path / ".bench" / "work").iterdir())
    md = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_pipeline.py"), "--markdown",
                         str(tmp_path / "out" / "bench.json")], env=env, capture_output=True, text=True, timeout=60)
    assert md.returncode == 0 and "| (1) reference: ImageFolder+PIL workers, fp32 |" in md.stdout, md.stderr[-2000:]


@pytest.mark.timeout(60)
def test_save_gil_probe_runs_and_prints_every_way(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "probe_save_gil.py"), "--mb", "1", "--tensors", "8", "--seconds",
         "0.1", "--dir", str(tmp_path)],
        env=_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if "x alone" in line]
    assert [line.split("loop")[0].strip() for line in lines] == [
        "nothing", "mltrack checkpoint.save", "torch.save to open file", "the same, no crc32", "torch.save to a path",
        "torch.save to BytesIO", "plain file write", "hashlib.file_digest", "mltrack sha256_file",
        "figure, 2 classes", "figure, 10 classes", "TB, 30 add_scalar", "TB, one summary"]
    assert "1.00x alone" in lines[0]
    assert all("one write" in line and "ms" in line for line in lines)
    assert list(tmp_path.iterdir()) == []  # the temp dir and its file are gone


@pytest.mark.timeout(120)
def test_epoch_end_probe_times_every_piece_and_the_next_epochs_start() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "probe_epoch_end.py"), "--calls", "6"],
                          env=_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    pieces = [line.split("  ")[1].strip() for line in proc.stdout.splitlines() if "ms median" in line
              and "next epoch" not in line]
    assert pieces[0] == "model.state_dict()" and pieces[-1] == "the hook's work: state + start_snapshot", pieces
    assert "torch.cuda.mem_get_info()" not in pieces  # CPU: that piece is left out
    starts = [line for line in proc.stdout.splitlines() if "next epoch's first 5 steps" in line]
    assert len(starts) == 2 and starts[0].endswith("nothing written") and starts[1].endswith("writing it"), starts
    assert "cProfile of the hook's work" in proc.stdout


def test_markdown_reads_result_files_from_before_the_interleaved_measurement() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_pipeline.py"), "--markdown",
                           str(ROOT / "bench" / "results_pipeline_prev_round_h100.json")], env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tracking on vs off: +12.1 % epoch time" in proc.stdout  # the two windows' mean epochs, as then
    assert "hymenoptera epoch with tracking: mltrack_gpu_tracked (eager)" in proc.stdout


def test_markdown_reads_an_interleaved_result_file() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_pipeline.py"), "--markdown",
                           str(ROOT / "bench" / "results_pipeline_small_tracking_h100.json")], env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "median of per-round ratios over 6 rounds" in proc.stdout
    assert "mltrack_gpu_ro_tracked (compile_mode reduce-overhead) 0.052 s" in proc.stdout


def test_interleaved_turns_drains_and_a_failing_arm() -> None:
    events: list[str] = []

    def arm(name: str, fail_in_round: int = -1) -> Arm:
        def epoch() -> int:
            if fail_in_round >= 0 and events.count(f"drain {name}") == fail_in_round + 1:  # +1: the warm-up's
                raise OSError("disk full")
            events.append(name)
            return 10

        def drain() -> dict[str, float]:
            events.append(f"drain {name}")
            return {"io_drain_s": 0.5}

        return Arm(name, epoch, drain)

    measured = time_interleaved([arm("a"), arm("b"), arm("c", fail_in_round=1)], torch.device("cpu"),
                                rounds=3, block_epochs=2, warmup_epochs=1)
    warmup = ["a", "drain a", "b", "drain b", "c", "drain c"]
    round0 = ["a", "a", "drain a", "b", "b", "drain b", "c", "c", "drain c"]
    round1 = ["b", "b", "drain b", "a", "a", "drain a"]  # rotated; c raised at its first epoch: it leaves
    round2 = ["a", "a", "drain a", "b", "b", "drain b"]  # c's turn (first) is gone, a and b keep theirs
    assert events == warmup + round0 + round1 + round2
    assert measured["orders"] == [["a", "b", "c"], ["b", "c", "a"], ["a", "b"]]
    arms = measured["arms"]
    assert [(b["round"], b["position"]) for b in arms["a"]["blocks"]] == [(0, 0), (1, 2), (2, 0)]
    assert arms["c"]["error"] == "OSError: disk full" and len(arms["c"]["blocks"]) == 1
    assert all(len(b["epoch_s"]) == 2 and b["io_drain_s"] == 0.5 for b in arms["a"]["blocks"])


def test_interleaved_rows_medians_and_paired_ratios() -> None:
    def block(r: int, times: list[float], **drains: float) -> dict:
        return {"round": r, "position": 0, "epoch_s": times, **drains}

    measured = {"orders": [], "arms": {
        "off": {"warmup_s": 1.0, "images_per_epoch": 100,
                "blocks": [block(0, [1.0, 1.0, 1.0]), block(1, [2.0, 2.0, 2.0])]},
        # slower GPU in round 1 (drift) hits both: paired, each round reads +10 %
        "on": {"warmup_s": 1.0, "images_per_epoch": 100,
               "blocks": [block(0, [1.5, 1.1, 1.1], io_drain_s=0.2), block(1, [2.2, 2.2, 9.0], io_drain_s=0.3)]},
        "broken": {"blocks": [], "error": "RuntimeError: x", "traceback": "tb"}}}
    rows = interleaved_rows(measured, "off")
    on = rows["on"]
    assert on["epochs"] == 6 and on["images"] == 600 and on["epoch_s"] == [1.5, 1.1, 1.1, 2.2, 2.2, 9.0]
    assert on["img_per_s"] == pytest.approx(600 / 17.1) and on["io_drain_s"] == 0.3
    assert on["median_epoch_s"] == pytest.approx(1.85) and on["median_epoch_s_after_first"] == pytest.approx(1.65)
    assert on["round_ratios"] == [1.1, 1.1] and on["median_round_ratio"] == pytest.approx(1.1)
    assert on["ratio_of_medians"] == pytest.approx(1.85 / 1.5, abs=1e-4)  # rounded; unpaired: drift between rounds blurs it
    assert rows["off"]["median_round_ratio"] == 1.0 and "io_drain_s" not in rows["off"]
    assert rows["broken"] == {"error": "RuntimeError: x", "traceback": "tb"}


@pytest.mark.gpu
@pytest.mark.timeout(900)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_hymenoptera_cuda_graphs_and_interleaved_tracking_on_gpu(tmp_path: Path) -> None:
    """Reduced size (train split 512, 2 rounds x 2 epochs); the compile takes a few minutes."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_pipeline.py"), "--groups", "hymenoptera,tracking", "--models",
         "resnet18", "--train-images", "512", "--seconds", "1", "--tracking-rounds", "2", "--tracking-block", "2",
         "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / ".bench")],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    rows = {(r["group"], r["name"]): r for r in report["results"]}
    assert not [r for r in report["results"] if "error" in r], [r["error"] for r in report["results"] if "error" in r]
    mlflow = "mlflow not importable" not in rows[("hymenoptera", "mltrack_gpu_ro_tracked")].get("skipped", "")
    for suffix in ("", "_checkpoint") + (("_tracked",) if mlflow else ()):
        row = rows[("hymenoptera", f"mltrack_gpu_ro{suffix}")]
        assert row["compile_mode"] == "reduce-overhead" and row["img_per_s"] > 0, row
        assert row["compiled_here"] is (suffix == "") and row["warmup_epochs"] >= (4 if suffix == "" else 2), row
        assert row["graphs_compiled_timed"] == 0, row  # compiling and capture stayed in the warm-up
        assert row["cudagraph_skips"] == 0, row  # torch ran the graphs as CUDA graphs
    assert rows[("hymenoptera", "mltrack_gpu_ro")]["graphs_compiled_warmup"] > 0
    for name in ("untracked", "checkpoint_only") + (("tracked",) if mlflow else ()):
        row = rows[("tracking", name)]
        assert [b["round"] for b in row["blocks"]] == [0, 1] and row["epochs"] == 4, row
        assert len(row["round_ratios"]) == 2 and row["median_round_ratio"] > 0, row
    assert "hymenoptera epoch with tracking: mltrack_gpu_ro" in proc.stdout or not mlflow


@pytest.mark.timeout(120)
def test_log_batch_probe_delivers_both_ways_to_a_real_store() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "probe_log_batch.py"), "--epochs", "3", "--rounds",
                           "2"], env=_env(), capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if "ms to deliver" in line]
    assert [row.split("  ")[1].strip() for row in rows] == ["one log_batch per epoch", "mltrack (_spool.group)"]
    assert "x wall" in proc.stdout and "x CPU" in proc.stdout


@pytest.mark.timeout(180)
def test_sender_probe_delivers_every_epoch_from_a_thread_and_from_a_child() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "probe_sender.py"), "--seconds", "0.5", "--epoch-ms",
                           "50", "--rounds", "1"], env=_env(), capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {line.split("  ")[2].strip(): line for line in proc.stdout.splitlines() if "x alone" in line}
    assert list(rows) == ["no tracker", "sender thread", "sender process"]
    for way in ("sender thread", "sender process"):
        assert " 0 epochs" not in rows[way] and "ms CPU per epoch" in rows[way], rows[way]


@pytest.mark.timeout(120)
def test_improving_epochs_probe_runs_both_ways() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "probe_improving_epochs.py"), "--epochs", "4",
                           "--epoch-ms", "5"], env=_env(), capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [line.strip() for line in proc.stdout.splitlines() if "checkpoints written" in line]
    assert [row.split(":")[0] for row in rows] == ["waiting for a slot", "superseding", "duty rule"]
    assert "0 superseded in the queue, 0 held" in rows[0] and "0 held" in rows[1]


@pytest.mark.timeout(120)
def test_progress_probe_prices_both_bars_and_both_refresh_rates() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "probe_progress.py"), "--passes", "3", "--steps", "2",
                           "--pass-ms", "4", "--seconds", "0.2"], env=_env(), capture_output=True, text=True,
                          timeout=110)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "rich bar per pass (before)" in out and "mltrack console.progress" in out
    assert "refreshed 10/s" in out and "refreshed 4/s" in out
