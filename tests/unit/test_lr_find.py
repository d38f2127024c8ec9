"""LR range test: schedule, smoothing, suggestion rule, divergence stop, and one real sweep logged to MLflow."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mltrack.cli import cli
from mltrack.errors import UserError
from mltrack.lr_find import lr_schedule, smooth, suggest, sweep


def test_schedule_is_exponential_from_start_to_end() -> None:
    lrs = lr_schedule(1e-6, 1.0, 7)
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1.0)
    assert np.allclose(np.diff(np.log10(lrs)), 1.0)
    for bad in ((0.0, 1.0, 5), (1.0, 0.1, 5), (1e-3, 1.0, 1)):
        with pytest.raises(UserError):
            lr_schedule(*bad)


def test_smoothing_is_a_bias_corrected_moving_average() -> None:
    assert smooth([2.0] * 5, beta=0.9) == pytest.approx([2.0] * 5)  # no pull towards zero at the start
    losses = [3.0, 1.0, 2.0]
    avg, expected = 0.0, []
    for i, x in enumerate(losses):
        avg = 0.8 * avg + 0.2 * x
        expected.append(avg / (1 - 0.8 ** (i + 1)))
    assert smooth(losses, beta=0.8) == pytest.approx(expected)
    assert smooth(losses, beta=0.0) == losses


def test_suggestion_is_the_steepest_descent_before_the_end() -> None:
    lrs = lr_schedule(1e-6, 1.0, 61)
    x = np.log10(lrs)
    # A loss that falls fastest at lr = 1e-3 and rises again at the end (divergence).
    curve = list(2.0 - np.tanh(2.0 * (x + 3.0)) + np.where(x > -0.5, 20.0 * (x + 0.5) ** 2, 0.0))
    suggested = suggest(lrs, curve)
    assert abs(math.log10(suggested) + 3.0) <= 0.1 + 1e-9
    assert suggest(lrs[:2], curve[:2]) is None
    assert suggest(lrs[:3], curve[:3]) is not None  # skips shrink for short sweeps
    assert suggest(lrs, [float("nan")] * len(lrs)) is None


def _trainer(trainer_type: str, *sets: str) -> Any:
    from mltrack.config import load_config
    from mltrack.trainers import build_trainer

    cfg = load_config(None, [f"training.trainer_type={trainer_type}", "training.device=cpu", *sets])
    return build_trainer(cfg.training, torch.device("cpu"))


def test_sweep_steps_through_the_configured_trainer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A mixed_precision config's range test runs its forward under bf16 autocast and its steps through the
    trainer (so clipping applies), like training does."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    loader = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    trainer = _trainer("mixed_precision", "training.max_grad_norm=0.5")
    dtypes: list[torch.dtype] = []
    model[0].register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    clipped: list[int] = []
    original = trainer.clip_gradients
    monkeypatch.setattr(trainer, "clip_gradients", lambda m: (clipped.append(1), original(m)))
    used, losses, _, _ = sweep(model, torch.optim.SGD(model.parameters(), lr=1.0), loader,
                               torch.nn.CrossEntropyLoss(), lr_schedule(1e-4, 1e-2, 5), trainer)
    assert len(used) == 5 and all(math.isfinite(v) for v in losses)
    assert set(dtypes) == {torch.bfloat16} and len(clipped) == 5


def test_sweep_stops_when_the_loss_diverges() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    loader = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    lrs = lr_schedule(1e-4, 1e4, 60)
    used, losses, smoothed, diverged = sweep(model, optimizer, loader, torch.nn.CrossEntropyLoss(), lrs,
                                             _trainer("standard"), beta=0.9, divergence=4.0)
    assert diverged and len(used) < len(lrs)
    assert used == lrs[:len(used)] and len(losses) == len(smoothed) == len(used)
    last = smoothed[-1]
    assert not math.isfinite(last) or last > 4.0 * min(smoothed[:-1])


def test_lr_find_command_logs_curve_plot_and_suggestion(tiny_dataset, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    from mltrack.tracking import metric_history, run_info

    data = tiny_dataset(n_classes=3, per_class=6, size=8, folds=2)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, [
        "lr-find", "--data-dir", str(data), "--num-iter", "25", "--start-lr", "1e-5", "--end-lr", "10",
        "--set", "data.dataset_name=tiny", "--set", "data.image_size=8", "--set", "data.num_workers=0",
        "--set", "training.batch_size=4", "--set", "training.device=cpu"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run_id = result.output.split("run id:")[1].split()[0]
    info = run_info(run_id)
    assert (info["status"], info["tags"]["mltrack.role"]) == ("FINISHED", "lr_find")
    assert info["params"]["lr_find.num_iter"] == "25"
    lr_steps = metric_history(run_id, "lr_find/lr")
    assert [s for s, _ in lr_steps] == list(range(len(lr_steps))) and 3 <= len(lr_steps) <= 25
    assert [v for _, v in lr_steps] == pytest.approx(lr_schedule(1e-5, 10.0, 25)[:len(lr_steps)])
    client = MlflowClient()
    table = Path(client.download_artifacts(run_id, "lr_find/lr_find.csv", str(tmp_path))).read_text()
    rows = list(csv.DictReader(table.splitlines()))
    assert len(rows) == len(lr_steps)
    lrs = [float(r["lr"]) for r in rows]
    smoothed = [float(r["smoothed_loss"]) for r in rows]
    expected = suggest(lrs, smoothed)
    assert expected is not None  # 25 steps up to lr 10 leave enough points before any divergence
    assert metric_history(run_id, "lr_find/suggested_lr") == [(0, pytest.approx(expected))]
    assert info["tags"]["mltrack.suggested_lr"] == f"{expected:.3e}" and f"{expected:.3e}" in result.output
    assert "plots/lr_find.png" in {a.path for a in client.list_artifacts(run_id, "plots")}
