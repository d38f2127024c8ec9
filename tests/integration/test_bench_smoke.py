"""bench/bench_pipeline.py --tiny runs end to end on CPU: every CPU variant measures, GPU-only ones skip
with a reason, the table and targets print, and bench.json holds what was printed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CPU_VARIANTS = {"ceiling_bf16", "ceiling_fp32", "mltrack_ram", "reference_fp32", "reference_bf16", "mltrack_default"}
GPU_ONLY = {"mltrack_gpu", "nvjpeg_every_epoch"}


@pytest.mark.timeout(120)
def test_tiny_benchmark_runs_on_cpu(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("OUT", None)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        env.pop(var, None)
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
    tracked = rows[("tracking", "tracked")]
    assert tracked.get("img_per_s", 0) > 0 and tracked["queue_drain_s"] >= 0  # mlflow is installed here
    assert not [r for r in report["results"] if "error" in r], [r["error"] for r in report["results"] if "error" in r]
    out = proc.stdout
    assert "(1) reference: ImageFolder+PIL workers, fp32" in out and "x (1)" in out and "% of (6)" in out
    assert "targets (issue 9)" in out and "skipped: needs a CUDA device" in out
    assert not (tmp_path / "mlruns").exists() and not list((tmp_path / ".bench" / "work").iterdir())
    md = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_pipeline.py"), "--markdown",
                         str(tmp_path / "out" / "bench.json")], env=env, capture_output=True, text=True, timeout=60)
    assert md.returncode == 0 and "| (1) reference: ImageFolder+PIL workers, fp32 |" in md.stdout, md.stderr[-2000:]
