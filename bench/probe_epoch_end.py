"""What the checkpoint hook costs the training thread at an epoch end, piece by piece.

At an epoch end the GPU has nothing queued (validation ended with a sync), so every millisecond the
training thread spends in ``CheckpointHook.on_epoch_end`` is a millisecond the GPU idles. The bench's
tracking group measured ~6 ms per written checkpoint on an H200 (resnet18 + SGD momentum, 0.49 s
epochs): the whole +1.2 % of ``checkpoint_only``. This times, on a resnet18 + SGD-momentum state (as
that group trains), each piece of that work after a ``synchronize`` (the GPU idle, as there), with the
two previous snapshots still held (as the epoch-IO worker holds them), and prints a cProfile of
``start_snapshot``. Then the next epoch's start: how long the training thread takes to launch a few small
training steps right after the hook, alone and with the epoch-IO worker writing that checkpoint
(``EpochIO``: wait for the copy, ``checkpoint.save``), which competes with it for the GIL.

    python bench/probe_epoch_end.py [--calls 40] [--model resnet18]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from mltrack import checkpoint, snapshot  # noqa: E402
from mltrack.config import config_hash, load_config, to_dict  # noqa: E402
from mltrack.epoch_io import EpochIO  # noqa: E402


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_cuda else []
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    return []


def make_state(model_name: str, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = getattr(torchvision.models, model_name)(num_classes=8).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    images = torch.randn(8, 3, 64, 64, device=device).to(memory_format=torch.channels_last)
    model(images).float().sum().backward()
    optimizer.step()  # momentum buffers exist
    return model, optimizer


def timed(fn: Callable[[], Any], device: torch.device, calls: int) -> tuple[float, float]:
    """Median and max milliseconds of ``fn`` on the host, each call after a synchronize (the GPU idle)."""
    held: list[Any] = []
    times = []
    for _ in range(calls):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        times.append(1e3 * (time.perf_counter() - start))
        held = (held + [out])[-2:]  # the worker holds up to two states; older ones go back to the allocators
        if isinstance(out, snapshot.Snapshot) and len(held) == 2:
            held[0].wait()
    return statistics.median(times[2:]), max(times[2:])


def next_epoch_start(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: Callable[[], Any],
                     device: torch.device, calls: int) -> None:
    """Milliseconds to launch 5 small training steps right after the hook: alone, then with the worker
    writing the checkpoint just snapshotted (as ``CheckpointHook``), per call after a synchronize."""
    images = torch.randn(8, 3, 64, 64, device=device).to(memory_format=torch.channels_last)

    def steps() -> float:
        start = time.perf_counter()
        for _ in range(5):
            model(images).float().sum().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return 1e3 * (time.perf_counter() - start)

    io_worker = EpochIO(inline=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "last.pt"
        for write in (False, True):
            hook_ms, launch_ms = [], []
            for _ in range(max(calls // 4, 6)):
                io_worker.drain()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                snap = snapshot.start_snapshot(state())
                if write:
                    io_worker.submit(lambda s=snap: checkpoint.save(s.wait(), path), bounded=True)
                hook_ms.append(1e3 * (time.perf_counter() - t0))
                launch_ms.append(steps())
            io_worker.drain()
            print(f"  next epoch's first 5 steps launched in {statistics.median(launch_ms):7.3f} ms median "
                  f"({max(launch_ms):.3f} max) after the hook ({statistics.median(hook_ms):.3f} ms), "
                  f"{'with the worker writing it' if write else 'nothing written'}")
    io_worker.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--model", default="resnet18")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, optimizer = make_state(args.model, device)
    cfg = load_config(None, [])
    generator = torch.Generator()

    def state() -> dict[str, Any]:
        return {"schema": checkpoint.SCHEMA, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "rng": checkpoint.rng_state(generator), "config": to_dict(cfg), "config_hash": config_hash(cfg)}

    full = state()
    cuda_tensors = [t for section in (full["model"], full["optimizer"]["state"]) for t in _tensors(section)]
    pieces: dict[str, Callable[[], Any]] = {
        "model.state_dict()": model.state_dict,
        "optimizer.state_dict()": optimizer.state_dict,
        "rng_state()": lambda: checkpoint.rng_state(generator),
        "config to_dict + hash": lambda: (to_dict(cfg), config_hash(cfg)),
        "torch.cuda.mem_get_info()": (lambda: torch.cuda.mem_get_info(device)) if device.type == "cuda" else None,
        "snapshot._room_for_clones (model + optimizer)": (
            (lambda: snapshot._room_for_clones(device, cuda_tensors, snapshot.HEADROOM_BYTES))
            if device.type == "cuda" else None),
        "start_snapshot(model + optimizer only)": lambda: snapshot.start_snapshot(
            {"model": full["model"], "optimizer": full["optimizer"]}),
        "start_snapshot(rng + config only)": lambda: snapshot.start_snapshot(
            {"rng": full["rng"], "config": full["config"]}),
        "start_snapshot(built state)": lambda: snapshot.start_snapshot(full),
        "the hook's work: state + start_snapshot": lambda: snapshot.start_snapshot(state()),
    }
    n = sum(1 for t in full["model"].values()) + sum(len(s) for s in full["optimizer"]["state"].values())
    print(f"torch {torch.__version__}, {device}, {args.model} + SGD momentum ({n} tensors), {args.calls} calls each")
    for name, fn in pieces.items():
        if fn is None:
            continue
        median, worst = timed(fn, device, args.calls)
        print(f"  {name:42s} {median:7.3f} ms median  {worst:7.3f} ms max")
    next_epoch_start(model, optimizer, state, device, args.calls)
    profiler = cProfile.Profile()
    profiler.enable()
    timed(lambda: snapshot.start_snapshot(state()), device, args.calls)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(14)
    print("cProfile of the hook's work, by own time:")
    print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:4000])


if __name__ == "__main__":
    main()
