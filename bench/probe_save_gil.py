"""Does a checkpoint write (or a figure) on the epoch-IO thread slow the training thread through the GIL?

The training thread is stood in for by a loop of small torch ops (CUDA launches when a GPU is there, as the
training loop's are; CPU ops otherwise), which take the GIL back after each op. A second thread writes a state
shaped like the one ``mltrack.snapshot`` hands the writer (per section one flat host buffer, the tensors views
into it) over and over, in one of several ways. Printed per way: the loop's rate as a fraction of its rate
alone, the time it spent in stalls longer than 4 ms (per second), its longest stall, and one write's median
duration.

    python bench/probe_save_gil.py                 # 2 x 45 MB (resnet18 weights + momentum), 2 s per way
    python bench/probe_save_gil.py --mb 2 --seconds 0.2 --dir /tmp/x   # quick (the smoke test)

Why: the way the bytes reach the file decides it. On this project's 2-core CPU machine (torch 2.14,
``results_probe_save_gil_cpu2.txt``) ``torch.save`` given a *path* (torch's C++ writer opens the file) cut
the loop to 0.5-0.6x with single stalls of ~70 ms, and to a ``BytesIO`` to ~0.5x; given an *open file*, as
``mltrack.checkpoint.save`` does, the loop kept 0.94-0.97x and no stall over ~6 ms, close to a plain Python
file write of the same bytes. The ``mltrack checkpoint.save`` row is the real write path (temp file, fsync,
sha256, manifest, rename); whether any of it matters beside a GPU-bound training step is what this measures
on a GPU machine, with the tracking group of ``bench_pipeline.py``. The "no crc32" row is ``torch.save`` with
``torch.serialization.set_crc32_options(False)``: on the 2-core machine a 90 MB write took 110 instead of
171 ms, with the same effect on the loop; mltrack keeps the CRCs (zip readers that check them, such as
Python's ``zipfile``, would refuse a shared checkpoint without them; the sha256 manifest is mltrack's check).
The last two rows hash the written file (no write; "one write" is one hash): ``hashlib.file_digest`` reads
256 KB at a time and slowed the loop to ~0.70x there; ``checkpoint.sha256_file`` reads 8 MB at a time.
The "figure" rows draw the per-epoch confusion figure back to back (``mltrack.figures.render_png``; "one
write" is one render): the share of the loop they take is what ``EpochFigures.DUTY`` divides. The "TB" rows
write an epoch's 30 TensorBoard scalars back to back, one ``add_scalar`` each or as one summary (as
``TensorBoardHook`` does).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from mltrack import checkpoint  # noqa: E402
from mltrack.figures import render_png  # noqa: E402


def flat_state(mb: float, tensors: int) -> tuple[dict[str, dict[str, torch.Tensor]], list[torch.Tensor]]:
    """Two sections ("model", "optimizer"), each one flat float32 buffer of ``mb`` MB cut into ``tensors`` views."""
    n = max(tensors, int(mb * (1 << 20) / 4))
    flats = [torch.randn(n), torch.randn(n)]
    step = n // tensors
    state = {name: {f"t{i}": flat[i * step:(i + 1) * step] for i in range(tensors)}
             for name, flat in zip(("model", "optimizer"), flats)}
    return state, flats


def writers(state: dict[str, dict[str, torch.Tensor]], flats: list[torch.Tensor], path: Path
            ) -> dict[str, Callable[[], None] | None]:
    def raw_write() -> None:
        with open(path, "wb") as f:
            for flat in flats:
                f.write(memoryview(flat.numpy()))  # releases the GIL for the copy into the kernel

    def save_open_file() -> None:
        with open(path, "wb") as f:
            torch.save(state, f)

    def save_open_file_no_crc() -> None:
        crc = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        try:
            save_open_file()
        finally:
            torch.serialization.set_crc32_options(crc)

    hashed = path.with_name("hashed.pt")

    def file_digest() -> None:
        if not hashed.exists():
            checkpoint.save(state, hashed)
        with open(hashed, "rb") as f:
            hashlib.file_digest(f, "sha256")

    def sha256_file() -> None:
        if not hashed.exists():
            checkpoint.save(state, hashed)
        checkpoint.sha256_file(hashed)

    return {
        "nothing": None,
        "mltrack checkpoint.save": lambda: checkpoint.save(state, path.with_name("ckpt.pt")),
        "torch.save to open file": save_open_file,
        "  the same, no crc32": save_open_file_no_crc,
        "torch.save to a path": lambda: torch.save(state, str(path)),  # torch's C++ writer opens the file
        "torch.save to BytesIO": lambda: torch.save(state, io.BytesIO()),
        "plain file write": raw_write,
        "hashlib.file_digest": file_digest,  # hashing the written file: Python's helper, 256 KB reads
        "mltrack sha256_file": sha256_file,  # 8 MB reads, as checkpoint.save hashes
        # the per-epoch confusion figure (mltrack.figures.render_png), drawn back to back; "one write" = one render
        "figure, 2 classes": lambda: render_png(*_matrix(2), "val, epoch 3"),
        "figure, 10 classes": lambda: render_png(*_matrix(10), "val, epoch 3"),
        # an epoch's 30 TensorBoard scalars: one add_scalar each, or one summary (TensorBoardHook), + flush
        "TB, 30 add_scalar": lambda: _tensorboard(path.parent, one_summary=False),
        "TB, one summary": lambda: _tensorboard(path.parent, one_summary=True),
    }


_writers: dict[bool, Any] = {}
_TB_KEYS = [f"val/f1/class_{i}" for i in range(10)] + [f"val/recall/class_{i}" for i in range(10)] + [
    "train/loss", "train/acc", "val/loss", "val/acc", "lr", "epoch_time_s", "train/img_per_s", "val/f1_macro",
    "val/balanced_acc", "nonfinite_steps"]


def _tensorboard(folder: Path, one_summary: bool) -> None:
    from tensorboard.compat.proto.summary_pb2 import Summary
    from torch.utils.tensorboard import SummaryWriter

    if one_summary not in _writers:
        _writers[one_summary] = SummaryWriter(str(folder / f"tb_{one_summary}"))
    writer = _writers[one_summary]
    if one_summary:
        summary = Summary(value=[Summary.Value(tag=k, simple_value=0.5) for k in _TB_KEYS])
        writer._get_file_writer().add_summary(summary, 1)
    else:
        for key in _TB_KEYS:
            writer.add_scalar(key, 0.5, 1)
    writer.flush()


def _matrix(k: int) -> tuple[list[list[int]], list[str]]:
    return [[(i * 7 + j * 3) % 50 for j in range(k)] for i in range(k)], [f"class_{i}" for i in range(k)]


def loop(seconds: float, device: torch.device) -> tuple[float, float, float]:
    """Rate of small ops (per s), time in stalls > 4 ms (s per s) and the longest stall (s)."""
    x = torch.zeros(16, device=device)
    n, stalled, longest = 0, 0.0, 0.0
    start = last = time.perf_counter()
    while last - start < seconds:
        x.add_(1.0)
        now = time.perf_counter()
        gap = now - last
        if gap > 0.004:
            stalled += gap
        longest = max(longest, gap)
        n, last = n + 1, now
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = last - start
    return n / elapsed, stalled / elapsed, longest


def measure(job: Callable[[], None] | None, seconds: float, device: torch.device) -> dict[str, float]:
    stop, durations = threading.Event(), []

    def background() -> None:
        assert job is not None
        while not stop.is_set():
            t0 = time.perf_counter()
            job()
            durations.append(time.perf_counter() - t0)

    thread = threading.Thread(target=background, daemon=True) if job else None
    if thread:
        thread.start()
        time.sleep(0.05)  # the first write under way
    rate, stalled, longest = loop(seconds, device)
    stop.set()
    if thread:
        thread.join()
    return {"rate": rate, "stalled": stalled, "longest": longest,
            "write_s": statistics.median(durations) if durations else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=45.0, help="MB per section (resnet18: ~45 MB of weights)")
    ap.add_argument("--tensors", type=int, default=62, help="views per section")
    ap.add_argument("--seconds", type=float, default=2.0, help="timed loop per way of writing")
    ap.add_argument("--dir", type=Path, default=None, help="where the file is written (default: a temp dir)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state, flats = flat_state(args.mb, args.tensors)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        ways = writers(state, flats, Path(tmp) / "state.pt")
        print(f"torch {torch.__version__}, loop on {device}, state 2 x {args.mb:g} MB, {args.seconds:g} s per way")
        base = None
        for name, job in ways.items():
            r = measure(job, args.seconds, device)
            base = base or r["rate"]
            print(f"  {name:23s} loop {r['rate'] / base:5.2f}x alone ({r['rate']:,.0f}/s)  stalls >4 ms "
                  f"{1000 * r['stalled']:6.1f} ms/s  longest {1000 * r['longest']:6.1f} ms  one write "
                  f"{1000 * r['write_s']:7.1f} ms")
        for writer in _writers.values():  # before the folder goes
            writer.close()


if __name__ == "__main__":
    main()
