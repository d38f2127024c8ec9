"""``torchrun --nproc_per_node 2 -m mltrack train`` with the accelerate trainer on CPU (gloo), as real subprocesses.

(``accelerate launch --cpu --num_processes 2`` starts a single process in accelerate 1.15; torchrun starts two.)
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
PER_PROCESS_BATCH = 4
SETS = ["training.trainer_type=accelerate", "data.dataset_name=tiny", "data.image_size=16", "data.transforms=none",
        "tracking.tensorboard=false", "tracking.progress='off'", "optimizer.name=sgd", "optimizer.lr=0.05",
        "scheduler.name=none"]

# These runs pass, but about 1 in 3 attempts on a loaded 2-core machine hangs or aborts at gloo
# process-group teardown ("terminate called without an active exception"), also with the loop before
# any mltrack change. Until that is understood they run only when asked for, so CI stays deterministic:
#     MLTRACK_TEST_TORCHRUN=1 python -m pytest tests/integration/test_torchrun.py
pytestmark = [
    pytest.mark.slow, pytest.mark.timeout(600),
    pytest.mark.skipif(os.environ.get("MLTRACK_TEST_TORCHRUN") != "1",
                       reason="torchrun/gloo teardown is flaky (~1 in 3 hangs); set MLTRACK_TEST_TORCHRUN=1 to run"),
]


def _train(prefix: list[str], data_dir: Path, workdir: Path, batch_size: int) -> subprocess.CompletedProcess[str]:
    workdir.mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "ACCELERATE_MIXED_PRECISION"):
        env.pop(var, None)
    cmd = [*prefix, "-m", "mltrack", "train", "--data-dir", str(data_dir), "--device", "cpu", "--num-epochs", "2",
           "--batch-size", str(batch_size), "--num-workers", "0"]
    for item in SETS:
        cmd += ["--set", item]
    done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def _runs(workdir: Path) -> list[Any]:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def _val_by_hand(data_dir: Path, checkpoint: Path) -> tuple[float, float, int]:
    """Mean val loss, accuracy and sample count of ``checkpoint`` computed in this single process."""
    from mltrack.config import load_config
    from mltrack.data.loaders import build_loaders
    from mltrack.models import build_model

    cfg = load_config(None, [f"data.data_dir={data_dir}", "data.num_workers=0", *SETS])
    loader = build_loaders(cfg.data, 5, 0, False, "cpu", splits=("val",)).val
    model = build_model(cfg.model, 3)
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["model"])
    model.eval()
    loss, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for images, targets in loader:
            logits = model(images)
            loss += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            correct += int((logits.argmax(1) == targets).sum())
            n += targets.numel()
    return loss / n, correct / n, n


def test_torchrun_two_processes_one_run_and_exact_val_metrics(tiny_dataset: Callable[..., Path],
                                                               tmp_path: Path) -> None:
    # 16 train images (2 global batches of 2 x 4), 17 val and 9 test: both eval sets leave the last
    # batch uneven, so Accelerate pads it and gather_for_metrics must drop the padding.
    data_dir = tiny_dataset(n_classes=3, per_class=14, size=16, folds=2)
    assert len((data_dir / "splits" / "fold_0_val.txt").read_text().split()) == 17
    multi = tmp_path / "torchrun"
    done = _train([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
                  data_dir, multi, PER_PROCESS_BATCH)

    runs = _runs(multi)
    assert len(runs) == 1, f"expected one MLflow run, got {[r.info.run_name for r in runs]}"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["accelerate.num_processes"] == "2"
    assert len(list((multi / "runs").iterdir())) == 1, "only the main process creates a run folder"
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{multi / 'mlflow.db'}")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [0, 1]
    assert done.stdout.count("Epoch 1/1") + done.stderr.count("Epoch 1/1") == 1, "one console: rank 0's"

    run_dir = Path(run.data.tags["mltrack.run_dir"])
    matrix = json.loads((run_dir / "reports" / "confusion_matrix_val.json").read_text())["matrix"]
    assert sum(map(sum, matrix)) == 17, "every val sample counted exactly once"
    test_matrix = json.loads((run_dir / "reports" / "confusion_matrix_test.json").read_text())["matrix"]
    assert sum(map(sum, test_matrix)) == 9

    # The distributed val metrics are the metrics of the weights over the whole val set: recompute them in
    # one process from last.pt (float32 sums in a different order: 1e-5 relative).
    loss, acc, n = _val_by_hand(data_dir, run_dir / "weights" / "last.pt")
    assert n == 17
    assert math.isclose(run.data.metrics["val/loss"], loss, rel_tol=1e-5)
    assert run.data.metrics["val/acc"] == pytest.approx(acc, abs=1e-12)


# Drives the real trainer and loop (no CLI): a BatchNorm- and dropout-free model, so 2 processes x batch b
# (x accumulation a) must give exactly what 1 process x batch 2ab gives on the same data order.
LOOP_SCRIPT = """
import json, sys
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from mltrack.config import load_config
from mltrack.optim import build_scheduler
from mltrack.trainers import build_trainer
from mltrack.trainers.loop import FitContext, evaluate, train_epoch

class TinyConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 3)
    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))

batch, accum, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
cfg = load_config(None, ["training.trainer_type=accelerate", "training.device=cpu", "scheduler.name=none",
                         f"training.batch_size={batch}", f"training.gradient_accumulation_steps={accum}"])
gen = torch.Generator().manual_seed(0)
x, y = torch.randn(49, 3, 8, 8, generator=gen), torch.randint(0, 3, (49,), generator=gen)
train = DataLoader(TensorDataset(x[:32], y[:32]), batch_size=batch, shuffle=True,
                   generator=torch.Generator().manual_seed(1))
val = DataLoader(TensorDataset(x[32:], y[32:]), batch_size=batch)  # 17 samples: an uneven last batch
torch.manual_seed(3)
model = TinyConv()
trainer = build_trainer(cfg.training, torch.device("cpu"))
model, opt, loaders = trainer.prepare(model, torch.optim.SGD(model.parameters(), lr=0.5),
                                      {"train": train, "val": val, "test": None})
schedule = build_scheduler(cfg.scheduler, opt, 2, len(loaders["train"]), 0.5)
ctx = FitContext(cfg, model, opt, schedule, trainer, loaders, nn.CrossEntropyLoss(), ["a", "b", "c"])
rows = []
for epoch in range(2):
    metrics, _ = train_epoch(ctx)
    loss, cm = evaluate(ctx, loaders["val"])
    rows.append([metrics["train/loss"], loss, int(cm.sum()), int(cm.trace())])
if trainer.is_main_process:
    params = [p.detach().flatten().tolist() for p in trainer.unwrap(ctx.model).parameters()]
    json.dump({"rows": rows, "params": params, "steps": ctx.state.global_step, "world": trainer.world_size},
              open(out, "w"))
trainer.end()
"""


def _loop_run(prefix: list[str], script: Path, batch: int, accum: int, out: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*prefix, str(script), str(batch), str(accum), str(out)], cwd=script.parent, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-5000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("batch,accum", [(4, 1), (2, 2)])
def test_torchrun_training_equals_single_process(batch: int, accum: int, tmp_path: Path) -> None:
    """2 processes x batch b x accumulation a == 1 process x batch 2ab: same train/val losses, same val counts
    (17 samples, each once), same parameters. Tolerance 1e-6 absolute: only float summation order differs
    (DDP averages two shard means where one process takes one mean)."""
    script = tmp_path / "loop.py"
    script.write_text(LOOP_SCRIPT)
    single = _loop_run([sys.executable], script, 2 * batch * accum, 1, tmp_path / "single.json")
    multi = _loop_run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
                      script, batch, accum, tmp_path / "multi.json")
    assert (single["world"], multi["world"]) == (1, 2)
    assert single["steps"] == multi["steps"] == 8  # 32 samples / global batch 8, 2 epochs
    for one, two in zip(single["rows"], multi["rows"]):
        assert two[2] == one[2] == 17 and two[3] == one[3]
        assert two[0] == pytest.approx(one[0], abs=1e-6) and two[1] == pytest.approx(one[1], abs=1e-6)
    for one, two in zip(single["params"], multi["params"]):
        assert torch.allclose(torch.tensor(two), torch.tensor(one), atol=1e-6, rtol=0)
    assert single["rows"][0][1] != single["rows"][1][1], "training changed the model"
