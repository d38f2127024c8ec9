"""The one training loop: fit / train_epoch / evaluate. Trainers vary only through their hooks-free
variation points (see ``base.Trainer``); side effects of an epoch live in ``mltrack.hooks``.

Per-batch statistics are accumulated on the device and read once per epoch, so logging costs no
per-batch GPU->CPU synchronisation. The only per-step sync is the non-finite-loss guard, which must
decide before the optimizer step whether to skip it.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

from mltrack.config import RunConfig
from mltrack.metrics import confusion_matrix, sanitize_metric_key, summarize
from mltrack.trainers.base import Trainer


# Set by the SIGTERM/SIGINT handler installed in run.py; read at batch boundaries. A module global
# because a signal handler cannot reach the FitContext of the running loop.
STOP_REQUESTED: Optional[str] = None


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss."""


class Interrupted(Exception):
    """A stop was requested (SIGTERM/SIGINT); raised at a batch boundary, after the last full step."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


def fault(point: str) -> None:
    """Crash here when MLTRACK_FAULT_AT names this point and the epoch matches (fault-injection tests)."""
    if os.environ.get("MLTRACK_FAULT_AT") == point:
        os._exit(137)


@dataclass
class FitState:
    """Progress that a checkpoint must restore (plain data)."""

    epoch: int = 0  # the next epoch to run (== epochs completed)
    global_step: int = 0  # optimizer steps taken
    best_metric: Optional[float] = None
    best_epoch: int = -1
    bad_epochs: int = 0  # epochs without improvement (early stopping)
    nonfinite_steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # metrics per completed epoch

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FitState":
        return cls(**data)


@dataclass
class EpochOutput:
    metrics: dict[str, float]
    train_cm: torch.Tensor
    val_cm: torch.Tensor
    improved: bool


@dataclass
class FitContext:
    """Everything the loop and the hooks share. Built once in ``run.py``."""

    cfg: RunConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Any  # mltrack.optim.LRSchedule
    trainer: Trainer
    loaders: dict[str, Optional[DataLoader]]
    loss_fn: nn.Module
    class_names: list[str]
    state: FitState = field(default_factory=FitState)
    last: Optional[EpochOutput] = None
    should_stop: bool = False  # set by a hook (early stopping)
    progress: Callable[..., Any] | None = None  # console.progress factory, None: no bars

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class Hook(Protocol):
    def on_fit_start(self, ctx: FitContext) -> None: ...
    def on_epoch_end(self, ctx: FitContext) -> None: ...
    def on_fit_end(self, ctx: FitContext) -> None: ...


def _bar(ctx: FitContext, total: int, label: str) -> Any:
    import contextlib

    if ctx.progress is None or not ctx.trainer.is_main_process:
        return contextlib.nullcontext(lambda *a, **k: None)
    return ctx.progress(total, label)


def train_epoch(ctx: FitContext) -> tuple[dict[str, float], torch.Tensor]:
    """One pass over the train loader; returns (metrics, train confusion matrix)."""
    trainer, model, opt, loader = ctx.trainer, ctx.model, ctx.optimizer, ctx.loaders["train"]
    assert loader is not None
    model.train()
    device = trainer.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    seen = torch.zeros((), device=device, dtype=torch.int64)
    cm = torch.zeros(ctx.num_classes, ctx.num_classes, dtype=torch.int64, device=device)
    accum = trainer.accumulation
    n_batches = len(loader)
    group_loss = torch.zeros((), device=device)
    consecutive_bad = 0
    start = time.perf_counter()
    trainer.zero_grad(opt)
    with _bar(ctx, n_batches, f"epoch {ctx.state.epoch} train") as advance:
        for i, (images, targets) in enumerate(loader):
            if STOP_REQUESTED:
                raise Interrupted(STOP_REQUESTED)
            sync = (i + 1) % accum == 0 or i + 1 == n_batches
            if not trainer.is_empty_batch(targets):
                images, targets = trainer.to_device(images, targets)
                with trainer.accumulate(model, sync):
                    with trainer.autocast():
                        logits = model(images)
                        loss = ctx.loss_fn(logits.float(), targets)
                    trainer.backward(loss / accum)
                group_loss = group_loss + loss.detach()
                batch_loss = loss.detach().double() * targets.numel()
                loss_sum += torch.nan_to_num(batch_loss, nan=0.0, posinf=0.0, neginf=0.0)
                seen += targets.numel()
                cm += confusion_matrix(logits.detach().argmax(1), targets, ctx.num_classes)
            if sync:
                # The guard needs the value now: a step with a NaN/inf loss must not touch the weights.
                if bool(torch.isfinite(group_loss)):
                    consecutive_bad = 0
                    if trainer.optimizer_step(model, opt):
                        ctx.state.global_step += 1
                        ctx.schedule.step_batch()
                else:
                    consecutive_bad += 1
                    ctx.state.nonfinite_steps += 1
                    if consecutive_bad >= ctx.cfg.training.max_nonfinite_steps:
                        raise NonFiniteLossError(
                            f"{consecutive_bad} consecutive optimizer steps had a non-finite loss "
                            f"(epoch {ctx.state.epoch}, batch {i}); lower the learning rate or check the data"
                        )
                trainer.zero_grad(opt)
                group_loss = torch.zeros((), device=device)
            advance(1)
    elapsed = time.perf_counter() - start
    loss_sum, seen, cm = trainer.reduce_sum(loss_sum), trainer.reduce_sum(seen), trainer.reduce_sum(cm)
    n = max(int(seen.item()), 1)
    metrics = {
        "train/loss": float(loss_sum.item()) / n,
        "train/acc": float(cm.diag().sum().item()) / n,
        "train/img_per_s": n / max(elapsed, 1e-9),
    }
    return metrics, cm.cpu()


@torch.no_grad()
def evaluate(ctx: FitContext, loader: DataLoader, model: nn.Module | None = None) -> tuple[float, torch.Tensor]:
    """Mean loss and confusion matrix over ``loader``; each sample counted once across processes."""
    trainer = ctx.trainer
    model = model if model is not None else ctx.model
    model.eval()
    device = trainer.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    seen = torch.zeros((), device=device, dtype=torch.int64)
    cm = torch.zeros(ctx.num_classes, ctx.num_classes, dtype=torch.int64, device=device)
    for images, targets in loader:
        images, targets = trainer.to_device(images, targets)
        with trainer.autocast():
            logits = model(images).float()
        logits, targets = trainer.gather(logits, targets)
        loss_sum += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").double()
        seen += targets.numel()
        cm += confusion_matrix(logits.argmax(1), targets, ctx.num_classes)
    return float(loss_sum.item()) / max(int(seen.item()), 1), cm.cpu()


def split_metrics(prefix: str, loss: float, cm: torch.Tensor, class_names: list[str]) -> dict[str, float]:
    """``<prefix>/loss|acc|balanced_acc|f1_macro`` plus per-class F1 and recall under sanitised names."""
    summary = summarize(cm)
    out = {
        f"{prefix}/loss": loss,
        f"{prefix}/acc": summary["acc"],
        f"{prefix}/balanced_acc": summary["balanced_acc"],
        f"{prefix}/f1_macro": summary["f1_macro"],
    }
    for name, f1, recall in zip(class_names, summary["f1"], summary["recall"]):
        key = sanitize_metric_key(name)
        out[f"{prefix}/f1/{key}"] = f1
        out[f"{prefix}/recall/{key}"] = recall
    return out


def _improved(ctx: FitContext, value: float) -> bool:
    best = ctx.state.best_metric
    if best is None or math.isnan(best):
        return not math.isnan(value)
    delta = ctx.cfg.training.early_stopping.min_delta
    if ctx.cfg.training.monitor_mode == "max":
        return value > best + delta
    return value < best - delta


def run_epoch(ctx: FitContext) -> EpochOutput:
    """Train + validate one epoch and update the fit state (best metric, early stopping, schedule)."""
    start = time.perf_counter()
    lr = ctx.schedule.current_lr()
    train_metrics, train_cm = train_epoch(ctx)
    fault("after_train")
    val_loader = ctx.loaders["val"]
    assert val_loader is not None
    val_loss, val_cm = evaluate(ctx, val_loader)
    fault("after_eval")
    metrics = {**train_metrics, **split_metrics("val", val_loss, val_cm, ctx.class_names)}
    metrics.update(ctx.trainer.extra_metrics())
    metrics["lr"] = lr
    metrics["nonfinite_steps"] = float(ctx.state.nonfinite_steps)
    monitor = ctx.cfg.training.monitor
    if monitor not in metrics:
        from mltrack.errors import ConfigError

        raise ConfigError(f"training.monitor '{monitor}' is not a logged metric; use e.g. val/acc or val/loss")
    improved = _improved(ctx, metrics[monitor])
    state = ctx.state
    if improved:
        state.best_metric, state.best_epoch, state.bad_epochs = metrics[monitor], state.epoch, 0
    else:
        state.bad_epochs += 1
    ctx.schedule.step_epoch(metrics[monitor])
    metrics["epoch_time_s"] = time.perf_counter() - start
    state.history.append({"epoch": float(state.epoch), **metrics})
    state.epoch += 1
    return EpochOutput(metrics, train_cm, val_cm, improved)


def fit(ctx: FitContext, hooks: list[Any]) -> FitState:
    """Run epochs from ``ctx.state.epoch`` to ``training.num_epochs``; hooks fire in list order."""
    for hook in hooks:
        hook.on_fit_start(ctx)
    patience = ctx.cfg.training.early_stopping.patience
    while ctx.state.epoch < ctx.cfg.training.num_epochs and not ctx.should_stop:
        ctx.last = run_epoch(ctx)
        for hook in hooks:
            hook.on_epoch_end(ctx)
        if patience is not None and ctx.state.bad_epochs >= patience:
            ctx.should_stop = True
    for hook in hooks:
        hook.on_fit_end(ctx)
    return ctx.state
