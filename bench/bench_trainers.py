"""Each trainer through the real CLI on a synthetic JPEG folder: images/s, peak GPU memory, accuracy.

Runs ``python -m mltrack train`` once per (model, trainer) as a subprocess with its own MLflow store,
then reads what the run logged (``train/img_per_s`` of the epochs after the first, ``gpu/peak_mem_gb``,
``test/acc``). Usage (GPU machine):

    python bench/bench_trainers.py --models resnet18,resnet50 --out results.json

``--tiny`` runs a CPU smoke version (small_cnn, 16 px, a few dozen images).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import make_dataset  # noqa: E402  (bench-local module)

# label -> settings. "standard_ieee" is the standard trainer with TF32 off: IEEE fp32 products, the fp32
# baseline of issue 4's figures; "standard" keeps mltrack's default (fp32 with TF32 tensor cores).
TRAINER_SETTINGS: dict[str, list[str]] = {
    "standard": ["training.trainer_type=standard"],
    "standard_ieee": ["training.trainer_type=standard", "training.tf32=false"],
    "mixed_precision": ["training.trainer_type=mixed_precision", "training.amp_dtype=bfloat16",
                        "training.channels_last=true"],
    "accelerate": ["training.trainer_type=accelerate", "training.amp_dtype=bfloat16", "training.channels_last=true"],
    # Opacus: per-sample gradients via expanded weights ("ew"): hooks mode fails on torchvision ResNets.
    "dp": ["training.trainer_type=dp", "training.dp.noise_multiplier=1.0", "training.dp.max_grad_norm=1.0",
           "training.dp.target_delta=1e-5", "training.dp.grad_sample_mode=ew"],
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--trainers", default="standard,standard_ieee,mixed_precision,accelerate,dp")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--dp-epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=min(15, (os.cpu_count() or 2) - 1))
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--val", type=int, default=800)
    p.add_argument("--test", type=int, default=800)
    p.add_argument("--data", type=Path, default=Path(".bench/trainers"))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: small_cnn, 16 px, tiny dataset")
    return p.parse_args()


def run_one(args: argparse.Namespace, model: str, trainer: str, store: Path) -> dict[str, Any]:
    epochs = args.dp_epochs if trainer == "dp" else args.epochs
    sets = [
        "data.dataset_name=bench", f"data.data_dir={args.data}", f"model.architecture={model}",
        f"data.image_size={16 if args.tiny else 224}", f"data.transforms={'basic' if args.tiny else 'imagenet'}",
        f"training.num_epochs={epochs}", f"training.batch_size={args.batch_size}",
        f"data.num_workers={args.workers}", "optimizer.name=adamw", "optimizer.lr=0.001", "scheduler.warmup_epochs=0",
        "tracking.progress=off", "tracking.confusion_every_epoch=false", "tracking.tensorboard=false",
        f"tracking.run_name={model}_{trainer}", f"training.device={'cpu' if args.tiny else 'cuda'}",
        *TRAINER_SETTINGS[trainer],
    ]
    cmd = [sys.executable, "-m", "mltrack", "train", "--config", "configs/base.yaml"]
    for item in sets:
        cmd += ["--set", item]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    row: dict[str, Any] = {"model": model, "trainer": trainer, "epochs": epochs, "wall_s": round(wall, 1),
                           "exit": proc.returncode}
    if proc.returncode != 0:
        row["error"] = (proc.stderr or proc.stdout)[-2000:]
        return row
    row.update(read_run(store, f"{model}_{trainer}"))
    cache = re.search(r"data cache: (\S+) \((.*?)\)\s*$", proc.stdout + proc.stderr, re.MULTILINE)
    row["data_cache"] = f"{cache.group(1)} ({cache.group(2)})" if cache else None
    return row


def read_run(store: Path, run_name: str) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"attributes.run_name = '{run_name}'")
    run = runs[0]
    speed = [m.value for m in client.get_metric_history(run.info.run_id, "train/img_per_s")]
    peak = [m.value for m in client.get_metric_history(run.info.run_id, "gpu/peak_mem_gb")]
    steady = speed[1:] or speed  # epoch 0 pays for cuDNN autotuning and worker start-up
    return {"run_id": run.info.run_id, "status": run.info.status,
            "img_per_s": round(sum(steady) / len(steady), 1), "img_per_s_epochs": [round(s, 1) for s in speed],
            "peak_mem_gb": round(max(peak), 2) if peak else None,
            "val_acc": round(run.data.metrics.get("val/acc", float("nan")), 4),
            "test_acc": round(run.data.metrics.get("test/acc", float("nan")), 4),
            "dp_epsilon": run.data.metrics.get("dp/epsilon")}


def main() -> None:
    args = parse_args()
    if args.tiny:
        args.models, args.batch_size, args.workers = "small_cnn", 16, 0
        args.train, args.val, args.test, args.epochs, args.dp_epochs = 48, 16, 16, 2, 1
        args.data = Path(tempfile.mkdtemp(prefix="bench-trainers-"))
    meta = make_dataset(args.data, classes=4 if args.tiny else 8, train=args.train, val=args.val, test=args.test,
                        size=(40, 30) if args.tiny else (500, 375), workers=0 if args.tiny else args.workers)
    print(f"dataset: {meta}", flush=True)
    store = Path(tempfile.mkdtemp(prefix="bench-mlflow-")) / "mlflow.db"
    rows = []
    for model in args.models.split(","):
        for trainer in args.trainers.split(","):
            row = run_one(args, model, trainer, store)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'model':10} {'trainer':16} {'img/s':>8} {'x std':>6} {'x ieee':>6} {'peak GB':>8} {'val acc':>8} "
          f"{'test acc':>8}  data cache")
    for row in rows:
        ratios = []
        for base_name in ("standard", "standard_ieee"):
            base = next((r.get("img_per_s") for r in rows if r["model"] == row["model"] and r["trainer"] == base_name),
                        None)
            ratios.append(f"{row['img_per_s'] / base:.2f}" if base and row.get("img_per_s") else "-")
        print(f"{row['model']:10} {row['trainer']:16} {row.get('img_per_s', 'FAIL')!s:>8} {ratios[0]:>6} {ratios[1]:>6} "
              f"{row.get('peak_mem_gb')!s:>8} {row.get('val_acc')!s:>8} {row.get('test_acc')!s:>8}  {row.get('data_cache')}")
    if args.out:
        args.out.write_text(json.dumps({"dataset": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
