"""``mltrack lr-find``: the learning-rate range test, logged as its own MLflow run (``mltrack.role=lr_find``).

A fresh model (built as training would build it, pretrained weights included) takes ``num_iter``
optimizer steps on the train split of ``data.fold`` while the learning rate grows exponentially from
``start_lr`` to ``end_lr``. The loss is smoothed with a bias-corrected exponential moving average
(``beta``); the sweep stops early once the smoothed loss exceeds ``divergence`` x its minimum (or is
not finite). The suggested LR is where the smoothed loss falls fastest against log10(lr) - the steepest
descent - among the points before divergence, ignoring the first ``skip_start`` steps (the average
is still warming up) and the last ``skip_end`` (the run-up to the blow-up). It is a starting point
for ``optimizer.lr``, not a guarantee.

Plain fp32 steps on the configured device with the configured optimizer, no scheduler and no trainer
variation points (AMP, accumulation, DP noise): the test measures the loss landscape, not a trainer.
Logged: metrics ``lr_find/lr``, ``lr_find/loss``, ``lr_find/smoothed_loss`` (step = iteration) and
``lr_find/suggested_lr``; tag ``mltrack.suggested_lr``; artifacts ``lr_find/lr_find.csv`` and
``plots/lr_find.png``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from mltrack.config import RunConfig
from mltrack.console import get_logger
from mltrack.errors import UserError
from mltrack.trainers.base import Trainer

log = get_logger()


@dataclass
class LRFindResult:
    lrs: list[float]  # learning rate of each step taken
    losses: list[float]  # raw training loss of each step
    smoothed: list[float]  # bias-corrected EMA of ``losses``
    suggestion: Optional[float]  # None when too few points before divergence
    diverged: bool  # stopped early by the divergence rule
    run_id: str = ""


def lr_schedule(start_lr: float, end_lr: float, num_iter: int) -> list[float]:
    """``num_iter`` learning rates from ``start_lr`` to ``end_lr`` (both included), evenly spaced in log."""
    if not 0 < start_lr < end_lr:
        raise UserError(f"lr-find needs 0 < start_lr < end_lr, got {start_lr} and {end_lr}")
    if num_iter < 2:
        raise UserError(f"lr-find needs at least 2 iterations, got {num_iter}")
    ratio = end_lr / start_lr
    return [start_lr * ratio ** (i / (num_iter - 1)) for i in range(num_iter)]


def smooth(losses: list[float], beta: float = 0.98) -> list[float]:
    """Bias-corrected exponential moving average: ``avg_i / (1 - beta^(i+1))``, so early values are not
    pulled towards zero. A non-finite loss makes every later value non-finite."""
    if not 0 <= beta < 1:
        raise UserError(f"smoothing beta must be in [0, 1), got {beta}")
    out, avg = [], 0.0
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def suggest(lrs: list[float], smoothed: list[float], skip_start: int = 10, skip_end: int = 5) -> Optional[float]:
    """The lr of the steepest descent of ``smoothed`` vs log10(lr) within ``[skip_start, len - skip_end)``.

    Skips shrink for short sweeps so that at least 3 points remain; None if there are fewer than 3.
    """
    n = len(smoothed)
    if n < 3:
        return None
    start = min(skip_start, n - 3)
    window = slice(start, n - min(skip_end, n - 3 - start))
    y = np.asarray(smoothed[window], dtype=np.float64)
    x = np.log10(np.asarray(lrs[window], dtype=np.float64))
    if len(y) < 3 or not np.all(np.isfinite(y)):
        return None
    slope = np.gradient(y, x)
    return float(lrs[window][int(np.argmin(slope))])


def _cycle(loader: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise UserError("the train split is empty: nothing to run the LR range test on")


def sweep(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: Any, loss_fn: torch.nn.Module,
          lrs: list[float], trainer: Trainer, beta: float = 0.98, divergence: float = 4.0
          ) -> tuple[list[float], list[float], list[float], bool]:
    """One optimizer step per lr in ``lrs`` (the loader is cycled); returns (lrs used, raw losses,
    smoothed losses, diverged). Mutates ``model`` and ``optimizer``: use throw-away ones.

    Each step goes through ``trainer``'s variation points (device placement, autocast, loss scaling,
    clipping, the dp noise), so the test sees the loss curve the configured trainer will train on; one
    micro-batch per step (no accumulation): the lr, not the batch, is what varies.
    """
    model, optimizer, prepared = trainer.prepare(model, optimizer, {"train": loader, "val": None, "test": None})
    model.train()
    used, losses, diverged = [], [], False
    best, avg = math.inf, 0.0
    batches = _cycle(prepared["train"])
    for i, lr in enumerate(lrs):
        images, targets = next(batches)
        for group in trainer.inner_optimizer(optimizer).param_groups:
            group["lr"] = lr
        trainer.zero_grad(optimizer)
        images, targets = trainer.to_device(images, targets)
        with trainer.accumulate(model, True):
            with trainer.autocast():
                loss = loss_fn(model(images).float(), targets)
            trainer.backward(loss)
        trainer.optimizer_step(model, optimizer)
        used.append(lr)
        losses.append(float(loss.detach()))
        avg = beta * avg + (1 - beta) * losses[-1]  # the running form of smooth()
        current = avg / (1 - beta ** (i + 1))
        best = min(best, current)
        if not math.isfinite(current) or (i > 0 and current > divergence * best):
            diverged = True
            break
    return used, losses, smooth(losses, beta), diverged


def figure(result: LRFindResult) -> Any:
    """Loss (raw and smoothed) against lr on a log axis, the suggestion marked (matplotlib Figure, Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(result.lrs, result.losses, alpha=0.3, label="loss")
    ax.plot(result.lrs, result.smoothed, label="smoothed loss")
    if result.suggestion is not None:
        ax.axvline(result.suggestion, color="red", linestyle="--", label=f"suggested lr {result.suggestion:.2e}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss", title="LR range test")
    finite = [v for v in result.smoothed if math.isfinite(v)]
    if finite:  # keep the divergence spike from flattening the interesting part
        ax.set_ylim(min(finite) * 0.9, min(max(finite), 4 * min(finite)) * 1.1 + 1e-12)
    ax.legend()
    fig.tight_layout()
    return fig


def run_lr_find(cfg: RunConfig, *, start_lr: float = 1e-7, end_lr: float = 10.0, num_iter: int = 100,
                beta: float = 0.98, divergence: float = 4.0) -> LRFindResult:
    """Run the range test for ``cfg`` (its fold, model, optimizer, batch size) as one MLflow run."""
    from mltrack.config import flatten
    from mltrack.data.loaders import build_loaders
    from mltrack.models import build_model
    from mltrack.optim import build_optimizer
    from mltrack.run import prepare_data, resolve_device, seed_everything, unique_dir
    from mltrack.tracking import Tracker
    from mltrack.trainers import build_trainer

    lrs = lr_schedule(start_lr, end_lr, num_iter)
    device = resolve_device(cfg.training.device)
    names, digest = prepare_data(cfg)
    seed_everything(cfg.training.seed, cfg.training.deterministic, cfg.training.tf32)
    model = build_model(cfg.model, len(names), image_size=cfg.data.image_size)
    loaders = build_loaders(cfg.data, cfg.training.batch_size, cfg.training.seed, cfg.training.deterministic,
                            device.type, splits=("train",))
    run_dir = unique_dir(Path(cfg.tracking.runs_dir), f"{cfg.data.dataset_name}_lr_find_fold_{cfg.data.fold}")
    tags = {"mltrack.role": "lr_find", "mltrack.fold": str(cfg.data.fold), "mltrack.dataset": cfg.data.dataset_name,
            "mltrack.split_digest": digest, "mltrack.run_dir": str(run_dir.resolve())}
    tracker = Tracker.start(cfg.tracking.experiment_name or cfg.data.dataset_name, run_dir.name, tags,
                            spool_dir=run_dir / "spool")
    status, reason = "FAILED", "exception"
    try:
        tracker.log_params({**flatten(cfg), "lr_find.start_lr": start_lr, "lr_find.end_lr": end_lr,
                            "lr_find.num_iter": num_iter, "lr_find.beta": beta, "lr_find.divergence": divergence})
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.training.label_smoothing)
        optimizer = build_optimizer(cfg.optimizer, model, fused=cfg.training.trainer_type != "dp")
        trainer = build_trainer(cfg.training, device)
        try:
            used, losses, smoothed, diverged = sweep(model, optimizer, loaders.train, loss_fn, lrs, trainer, beta,
                                                     divergence)
        finally:
            trainer.end()
        result = LRFindResult(used, losses, smoothed, suggest(used, smoothed), diverged, tracker.run_id)
        _log_result(tracker, result, run_dir)
        status, reason = "FINISHED", None
        return result
    except (SystemExit, KeyboardInterrupt):
        status, reason = "KILLED", "interrupted"
        raise
    finally:
        tracker.finish(status, reason)


def _log_result(tracker: Any, result: LRFindResult, run_dir: Path) -> None:
    for i, (lr, loss, smoothed) in enumerate(zip(result.lrs, result.losses, result.smoothed)):
        values = {"lr_find/lr": lr, "lr_find/loss": loss, "lr_find/smoothed_loss": smoothed}
        tracker.log_metrics({k: v for k, v in values.items() if math.isfinite(v)}, step=i)
    if result.suggestion is not None:
        tracker.log_metrics({"lr_find/suggested_lr": result.suggestion}, step=0)
    tracker.set_tags({"mltrack.suggested_lr": f"{result.suggestion:.3e}" if result.suggestion else "none",
                      "mltrack.lr_find_diverged": str(result.diverged).lower()})
    out = run_dir / "lr_find"
    out.mkdir(exist_ok=True)
    rows = ["step,lr,loss,smoothed_loss"] + [f"{i},{lr!r},{loss!r},{s!r}" for i, (lr, loss, s) in
                                             enumerate(zip(result.lrs, result.losses, result.smoothed))]
    (out / "lr_find.csv").write_text("\n".join(rows) + "\n")
    tracker.log_artifact(out / "lr_find.csv", "lr_find")
    tracker.log_figure(figure(result), "plots/lr_find.png")
