"""Where the time of a small epoch goes: a hymenoptera-size epoch (244 train + 153 val images, batch 32,
resnet18, bf16 + channels_last, GPU cache) through mltrack's ``run_epoch``, timed per phase and profiled.

    python bench/profile_epoch.py [--epochs 30] [--device cuda] [--compile] [--tracked | --checkpoint]
                                  [--switch-interval S]

Prints the wall time per phase (train pass, validation pass, the rest of ``run_epoch``), the time the host
spends waiting for the GPU (``torch.cuda.synchronize`` right after each phase: what is left queued), and
the top functions of a cProfile of the measured epochs (the training thread only). ``--tracked`` adds the
checkpoint and MLflow hooks (epoch IO on its worker thread, as ``mltrack train``), ``--checkpoint`` the checkpoint
hook alone; ``--switch-interval``
sets ``sys.setswitchinterval`` (how long a thread waits for the GIL before asking its holder to let go).
``--tiny`` runs a CPU smoke version.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]

from _data import make_dataset  # noqa: E402  (bench-local modules)
from _feeds import build_model, place  # noqa: E402
from _mltrack import Tracking, build, context  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--device", default="cuda")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (as training.compile)")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode (as training.compile_mode)")
    p.add_argument("--tracked", action="store_true", help="checkpoint + MLflow hooks after every epoch")
    p.add_argument("--checkpoint", action="store_true", help="checkpoint hook only (no MLflow)")
    p.add_argument("--switch-interval", type=float, default=None, help="sys.setswitchinterval for the run (s)")
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args()
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    device = torch.device("cpu" if args.tiny else args.device)
    n_train, n_val, batch = (16, 8, 4) if args.tiny else (244, 153, 32)
    root = Path(tempfile.mkdtemp(prefix="profile-epoch-"))
    make_dataset(root, classes=2, names=["ants", "bees"], train=n_train, val=n_val, test=4,
                 size=(64, 48) if args.tiny else (500, 375), vary_size=True, workers=0 if args.tiny else 8)
    loaders, _ = build(root, cache="ram" if device.type == "cpu" else "gpu", image_size=64 if args.tiny else 224,
                       batch_size=batch, workers=0, device=device, splits=("train", "val"))
    model = place(build_model("tinycnn" if args.tiny else "resnet18", 2), device, channels_last=True)
    fit = context(model, loaders, device, batch, compiled=torch.compile(model, mode=args.compile_mode) if args.compile else None)

    from mltrack.trainers import loop

    tracking = (Tracking(root / "work", "profile", mlflow=args.tracked) if args.tracked or args.checkpoint
                else None)
    hooks = tracking.hooks(fit) if tracking else []

    def epoch() -> None:
        fit.last = loop.run_epoch(fit)
        for hook in hooks:
            hook.on_epoch_end(fit)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    phases: dict[str, float] = {"train": 0.0, "train_sync": 0.0, "val": 0.0, "val_sync": 0.0, "rest": 0.0}
    originals = (loop.train_epoch, loop.evaluate)

    def timed(name: str, fn: object) -> object:
        def wrapper(*a: object, **k: object) -> object:
            t0 = time.perf_counter()
            out = fn(*a, **k)  # type: ignore[operator]
            t1 = time.perf_counter()
            sync()
            phases[name] += t1 - t0
            phases[name + "_sync"] += time.perf_counter() - t1
            return out
        return wrapper

    for _ in range(5 if not args.tiny else 1):  # warm-up: cuDNN autotuning, compile, allocator
        epoch()
    sync()
    plain, times = time.perf_counter(), []
    for _ in range(args.epochs):  # without the profiler: the epoch time a user sees
        t0 = time.perf_counter()
        epoch()
        sync()
        times.append(1000 * (time.perf_counter() - t0))
    print(f"epoch {1000 * (time.perf_counter() - plain) / args.epochs:.1f} ms without the profiler "
          f"(median {sorted(times)[len(times) // 2]:.1f}, min {min(times):.1f}, max {max(times):.1f} ms)")
    loop.train_epoch, loop.evaluate = timed("train", loop.train_epoch), timed("val", loop.evaluate)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for _ in range(args.epochs):
        t0 = time.perf_counter()
        epoch()
        sync()
        phases["rest"] += time.perf_counter() - t0
    profiler.disable()
    if tracking:
        print(f"after the epochs: {tracking.finish()}")
    total = time.perf_counter() - start
    loop.train_epoch, loop.evaluate = originals
    phases["rest"] -= sum(v for k, v in phases.items() if k != "rest")
    print(f"device {device} | torch {torch.__version__} | compile {args.compile} ({args.compile_mode}) | {args.epochs} epochs "
          f"of {n_train} + {n_val} images, batch {batch} | tracked {args.tracked} | checkpoint "
          f"{args.tracked or args.checkpoint} | switch interval "
          f"{sys.getswitchinterval()} s")
    print(f"epoch {1000 * total / args.epochs:.1f} ms (with cProfile on; it adds Python overhead)")
    for name, seconds in phases.items():
        print(f"  {name:12s} {1000 * seconds / args.epochs:7.1f} ms per epoch")
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
    print(out.getvalue())


if __name__ == "__main__":
    main()
