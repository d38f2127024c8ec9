"""Pipeline benchmark: images/s of full training steps from a folder of JPEGs, mltrack against the
reference pipeline, timm's prefetching loader and the model-bound ceiling, in one run (bench/README.md).

    python bench/bench_pipeline.py [--tiny] [--out DIR] [--seconds S] [--budget-s B] ...

Prints progress, a table with img/s and ratios to (1) the reference, (3) timm and (6) the ceiling, the
issue's targets as PASS/MISS, and writes ``bench.json`` to --out (default: $OUT when set) after every
measurement, so a run cut short still leaves its numbers. Every variant runs in try/except: a failure
is recorded with its error and the run goes on.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]  # the helpers beside this file, then mltrack itself
GROUPS = ("throughput", "hymenoptera", "tracking", "compiled", "nvjpeg")  # what _plan.run_all can run


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke mode: few tiny images, a tiny CNN, one epoch each")
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for bench.json (default: $OUT)")
    p.add_argument("--cache-dir", default=str(BENCH.parent / ".bench"), help="where generated datasets are kept")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--models", default=None, help="comma list (default resnet18,resnet50; tiny: tinycnn)")
    p.add_argument("--compile-models", default="resnet18", help="models also measured compiled ('' = none)")
    p.add_argument("--train-images", type=int, default=None, help="train split size (a multiple of the batch)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="DataLoader / decode workers (default: cores - 1)")
    p.add_argument("--seconds", type=float, default=None, help="minimum timed window per variant, after warm-up")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting variants after this many seconds")
    p.add_argument("--skip", default="", help="comma list of variant names to skip")
    p.add_argument("--groups", default=",".join(GROUPS),
                   help=f"comma list of variant groups to run, in this order (default all: {','.join(GROUPS)}); "
                        "e.g. 'compiled' alone in its own call, since compiling takes minutes")
    p.add_argument("--hymen-compile-mode", default="reduce-overhead",
                   help="hymenoptera group on CUDA: also measure its three mltrack variants compiled in this "
                        "training.compile_mode ('' = none; reduce-overhead = CUDA graphs)")
    p.add_argument("--hymen-variants", default="",
                   help="hymenoptera group, compiled rows: also measure these tracking variants (names of the "
                        "tracking group's rows, e.g. tracked,tracked_tensorboard), to price each part")
    p.add_argument("--tracking-rounds", type=int, default=None,
                   help="tracking group: rounds of interleaved blocks (default 6: each of the 3 variants "
                        "twice at each place in the order; --tiny 1)")
    p.add_argument("--tracking-block", type=int, default=None,
                   help="tracking group: epochs per variant per round (default 3; --tiny 1)")
    p.add_argument("--switch-interval", type=float, default=None,
                   help="sys.setswitchinterval for the whole run, s (default: Python's, 0.005): how long a thread "
                        "waits for the GIL before its holder is asked to let go (the epoch-IO worker vs the "
                        "training thread)")
    p.add_argument("--markdown", metavar="BENCH_JSON", help="only print a saved bench.json as Markdown (README)")
    return p.parse_args(argv)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Sizes of the run: the full GPU run, or the --tiny CPU smoke run."""
    cores = os.cpu_count() or 2
    if args.tiny:
        base = dict(models=["tinycnn"], train=16, val=8, test=8, size=(64, 48), classes=3, batch=8, image=24,
                    workers=1, seconds=0.0, budget=600.0, hymen=(8, 8, 4), max_epochs=1, warmup=0,
                    tracking_rounds=1, tracking_block=1)
    else:
        base = dict(models=["resnet18", "resnet50"], train=6144, val=512, test=256, size=(500, 375), classes=8,
                    batch=256, image=224, workers=max(1, cores - 1), seconds=6.0, budget=420.0,
                    hymen=(244, 153, 32), max_epochs=60, warmup=1, tracking_rounds=6, tracking_block=3)
    over = dict(models=args.models and args.models.split(","), train=args.train_images, batch=args.batch_size,
                image=args.image_size, workers=args.workers, seconds=args.seconds, budget=args.budget_s,
                tracking_rounds=args.tracking_rounds, tracking_block=args.tracking_block,
                switch_interval=args.switch_interval)
    base.update({k: v for k, v in over.items() if v is not None})
    base["compile"] = [m for m in args.compile_models.split(",") if m] if not args.tiny else []
    base["groups"] = [g for g in args.groups.split(",") if g]
    unknown = sorted(set(base["groups"]) - set(GROUPS))
    if unknown:
        raise SystemExit(f"--groups: unknown {', '.join(unknown)}; valid: {', '.join(GROUPS)}")
    base["skip"] = set(filter(None, args.skip.split(",")))
    if min(base["tracking_rounds"], base["tracking_block"]) < 1:
        raise SystemExit("--tracking-rounds and --tracking-block must be at least 1")
    from _plan import TRACKING_VARIANTS

    base["hymen_variants"] = [v for v in args.hymen_variants.split(",") if v]
    unknown = sorted(set(base["hymen_variants"]) - {v for v, spec in TRACKING_VARIANTS.items() if spec})
    if unknown:
        raise SystemExit(f"--hymen-variants: unknown {', '.join(unknown)}; valid: "
                         f"{', '.join(v for v, spec in TRACKING_VARIANTS.items() if spec)}")
    base["hymen_compile_mode"] = args.hymen_compile_mode.strip()
    if base["hymen_compile_mode"]:
        from _mltrack import load_compile_config
        from mltrack.errors import ConfigError

        try:  # mltrack's own check, before minutes of other groups run
            load_compile_config("cpu", base["hymen_compile_mode"])
        except ConfigError as err:
            raise SystemExit(f"--hymen-compile-mode: {err}") from None
    return base


class Results:
    """Measurements, the time budget, progress lines and the JSON file."""

    def __init__(self, out: Optional[str], budget: float, env: dict[str, Any], skip: set[str]) -> None:
        self.t0 = time.perf_counter()
        self.out = Path(out) if out else None
        self.budget, self.env, self.skip = budget, env, skip
        self.rows: list[dict[str, Any]] = []
        self.extra: dict[str, Any] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def log(self, text: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {text}", flush=True)

    def measure(self, group: str, name: str, model: str, fn: Callable[[], dict[str, Any]], *,
                unavailable: Optional[str] = None, need_s: float = 0.0) -> Optional[dict[str, Any]]:
        """Run one variant unless unavailable, skipped or out of budget; record the outcome either way."""
        row: dict[str, Any] = {"group": group, "name": name, "model": model}
        left = self.budget - self.elapsed()
        reason = unavailable or ("--skip" if name in self.skip else None) or (
            f"time budget: {left:.0f}s left, needs ~{need_s:.0f}s" if left < need_s else None)
        if reason:
            row["skipped"] = reason
            self.log(f"SKIP {group}/{name} {model}: {reason}")
        else:
            self.log(f"run  {group}/{name} {model} ...")
            try:
                row.update(fn())
                self.log(f"     {name} {model}: {_fmt(row)}")
            except Exception as err:  # noqa: BLE001 - one broken variant must not end a blind run
                row["error"] = f"{type(err).__name__}: {err}"[:500]
                row["traceback"] = traceback.format_exc()[-2000:]
                self.log(f"FAIL {group}/{name} {model}: {row['error']}")
        self.rows.append(row)
        self.save()
        return row if "img_per_s" in row else None

    def get(self, name: str, model: str) -> Optional[float]:
        for row in self.rows:
            if row["name"] == name and row["model"] == model and "img_per_s" in row:
                return float(row["img_per_s"])
        return None

    def save(self) -> None:
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / "bench.json.tmp"
        tmp.write_text(json.dumps({"env": self.env, "extra": self.extra, "results": self.rows,
                                   "elapsed_s": round(self.elapsed(), 1)}, indent=1, default=str))
        os.replace(tmp, self.out / "bench.json")


def _fmt(row: dict[str, Any]) -> str:
    parts = [f"{row['img_per_s']:,.0f} img/s"] if "img_per_s" in row else []
    if "epoch_s" in row:
        parts.append(f"epoch {sum(row['epoch_s']) / len(row['epoch_s']):.3f}s x{len(row['epoch_s'])}")
    if row.get("median_round_ratio") is not None:
        parts.append(f"median {row['median_epoch_s']:.3f}s, x{row['median_round_ratio']:.3f} untracked (per round)")
    parts += [f"{k}={row[k]}" for k in ("warmup_s", "warmup_epochs", "graphs_compiled_timed", "build_s", "io_drain_s",
                                         "queue_drain_s") if k in row]
    return ", ".join(parts)


def environment(device: Any) -> dict[str, Any]:
    import torch
    import torchvision

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "torchvision": torchvision.__version__, "cpu_count": os.cpu_count(),
                           "device": str(device), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    for module in ("timm", "mlflow", "PIL"):
        try:
            env[module] = __import__(module).__version__
        except Exception as err:  # noqa: BLE001 - absent or broken: recorded, the variants using it skip
            env[module] = f"unavailable ({type(err).__name__}: {err})"[:200]
    return env


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.markdown:
        from _report import markdown

        print(markdown(Path(args.markdown)))
        return 0
    cfg = settings(args)
    if cfg.get("switch_interval"):
        sys.setswitchinterval(cfg["switch_interval"])
    cfg["switch_interval"] = sys.getswitchinterval()
    import torch

    from _plan import run_all

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    results = Results(args.out, cfg["budget"], environment(device), cfg["skip"])
    results.extra["settings"] = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    results.log(f"device {device} ({results.env.get('gpu', platform.processor() or 'cpu')}), torch "
                f"{results.env['torch']}, timm {results.env['timm']}, mlflow {results.env['mlflow']}")
    run_all(results, cfg, device, Path(args.cache_dir), tiny=args.tiny)
    from _report import print_report

    print_report(results)
    results.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
