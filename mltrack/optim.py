"""Optimizer and learning-rate schedule registries.

Schedules are computed in closed form from counters (optimizer steps and epochs taken), not by chaining
torch schedulers, so their state is a handful of numbers: it loads with ``torch.load(weights_only=True)``
and a resumed run sees exactly the lr sequence of an uninterrupted one. torch is imported lazily.
"""
from __future__ import annotations

import importlib
import math
from typing import TYPE_CHECKING, Any, Iterable, Literal

from mltrack.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    import torch

    from mltrack.config import OptimizerConfig, SchedulerConfig

OPTIMIZERS: dict[str, str] = {
    "sgd": "torch.optim:SGD",
    "adam": "torch.optim:Adam",
    "adamw": "torch.optim:AdamW",
}

SCHEDULERS: dict[str, str] = {
    "none": "mltrack.optim:ConstantSchedule",
    "step": "mltrack.optim:StepSchedule",
    "cosine": "mltrack.optim:CosineSchedule",
    "onecycle": "mltrack.optim:OneCycleSchedule",
    "plateau": "mltrack.optim:PlateauSchedule",
}


def _resolve(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def build_optimizer(cfg: OptimizerConfig, params: Iterable[torch.nn.Parameter] | torch.nn.Module, *,
                    fused: bool = False) -> torch.optim.Optimizer:
    """Build ``cfg.name`` over the trainable parameters of ``params`` (a module or parameters).

    Two param groups (empty ones omitted): tensors with ndim >= 2 (conv/linear weights, embeddings) get
    ``cfg.weight_decay``; 1-D tensors (biases, BatchNorm/LayerNorm/GroupNorm scales and shifts) get none.
    Why: decay on a norm layer's scale shrinks it toward zero, fighting the normalisation it exists to
    do, and biases add almost no capacity to overfit, so decaying them only costs accuracy.
    Frozen parameters (``requires_grad=False``) are left out.

    ``fused``: torch's single-kernel update (CPU and CUDA). Besides being faster it takes a ``found_inf``
    tensor, so a non-finite step is skipped on the device without a host sync (``Trainer.skips_on_device``).
    """
    import torch

    if isinstance(params, torch.nn.Module):
        params = params.parameters()
    trainable = [p for p in params if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if not groups:
        raise ValueError("build_optimizer: no trainable parameters")
    if cfg.name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer.name '{cfg.name}'. Valid: {', '.join(OPTIMIZERS)}")
    cls = _resolve(OPTIMIZERS[cfg.name])
    if cfg.name == "sgd":
        if cfg.nesterov and cfg.momentum <= 0:
            raise ConfigError("optimizer.nesterov needs optimizer.momentum > 0 (e.g. --set optimizer.momentum=0.9)")
        return cls(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=fused or None)
    return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused or None)


def build_scheduler(
    cfg: SchedulerConfig,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    steps_per_epoch: int,
    max_lr: float,
    *,
    mode: Literal["min", "max"] = "min",
) -> LRSchedule:
    """Build schedule ``cfg.name`` and set the optimizer's lr to its value for the first step.

    ``steps_per_epoch`` counts optimizer steps (batches / gradient_accumulation_steps), ``max_lr`` is
    the peak (cosine after warm-up, onecycle) or starting (none, step, plateau) lr. Param groups keep
    their lr ratios relative to the first group. ``mode`` is the direction of the metric given to
    ``step_epoch`` (plateau only: "min" for a loss, "max" for accuracy).
    """
    if cfg.name not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler.name '{cfg.name}'. Valid: {', '.join(SCHEDULERS)}")
    if epochs < 1 or steps_per_epoch < 1:
        raise ValueError(f"build_scheduler: epochs ({epochs}) and steps_per_epoch ({steps_per_epoch}) must be >= 1")
    cls = _resolve(SCHEDULERS[cfg.name])
    return cls(cfg, optimizer, epochs, steps_per_epoch, max_lr, mode)


class LRSchedule:
    """Base schedule: a multiplier ``factor()`` of each group's base lr, from counters only.

    The training loop calls ``step_batch()`` after every optimizer step and ``step_epoch(metric)`` after
    every epoch's evaluation; each schedule reacts only to its ``interval``. ``state_dict()`` holds plain
    Python numbers; the shape (epochs, steps, config) comes from the constructor, so a resumed run with
    more epochs keeps its progress and follows the new length.
    """

    interval: Literal["step", "epoch"] = "epoch"
    kind = "base"

    def __init__(self, cfg: SchedulerConfig, optimizer: torch.optim.Optimizer, epochs: int,
                 steps_per_epoch: int, max_lr: float, mode: Literal["min", "max"] = "min") -> None:
        self.cfg = cfg
        self.optimizer = optimizer
        self.total_steps = epochs * steps_per_epoch
        self.steps_per_epoch = steps_per_epoch
        self.max_lr = max_lr
        self.mode = mode
        ref = optimizer.param_groups[0]["lr"]
        self.base_lrs = [max_lr * g["lr"] / ref for g in optimizer.param_groups]
        self.steps = 0  # optimizer steps taken
        self.epochs = 0  # epochs finished
        self._apply()

    def factor(self) -> float:
        """lr multiplier (of ``max_lr``) for the next optimizer step."""
        return 1.0

    def step_batch(self) -> None:
        self.steps += 1
        if self.interval == "step":
            self._apply()

    def step_epoch(self, metric: float | None = None) -> None:
        self.epochs += 1
        if self.interval == "epoch":
            self._apply()

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "steps": self.steps, "epochs": self.epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise CheckpointError(
                f"the checkpoint's lr schedule is '{state.get('kind')}' but scheduler.name is '{self.kind}'; "
                f"resume with the original scheduler.name"
            )
        self.steps, self.epochs = int(state["steps"]), int(state["epochs"])
        self._apply()

    def _apply(self) -> None:
        f = self.factor()
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * f


class ConstantSchedule(LRSchedule):
    """``none``: the lr stays at ``max_lr``."""

    kind = "none"


class StepSchedule(LRSchedule):
    """``step``: multiply by ``gamma`` every ``step_size`` epochs."""

    kind = "step"

    def factor(self) -> float:
        return self.cfg.gamma ** (self.epochs // self.cfg.step_size)


class CosineSchedule(LRSchedule):
    """``cosine``, per optimizer step: linear warm-up over the W steps of ``warmup_epochs`` (step i < W
    runs at (i+1)/(W+1) of max_lr), then half a cosine from max_lr (step W) down to ``min_lr``, reached
    exactly at the last step and held beyond it."""

    kind = "cosine"
    interval = "step"

    def factor(self) -> float:
        warmup = min(self.cfg.warmup_epochs * self.steps_per_epoch, self.total_steps - 1)
        if self.steps < warmup:
            return (self.steps + 1) / (warmup + 1)
        progress = min(1.0, (self.steps - warmup) / max(1, self.total_steps - 1 - warmup))
        floor = self.cfg.min_lr / self.max_lr
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class OneCycleSchedule(LRSchedule):
    """``onecycle`` (Smith's 1cycle), per optimizer step: cosine rise from max_lr/25 to max_lr over the
    first 30 % of steps, then cosine decay to max_lr/25/1e4 at the last step. lr only (momentum is not
    cycled: it keeps the state small and matters little at this scale)."""

    kind = "onecycle"
    interval = "step"
    start_div, final_div, pct_up = 25.0, 1e4, 0.3

    def factor(self) -> float:
        last = self.total_steps - 1
        peak = int(round(self.pct_up * last))
        start, end = 1.0 / self.start_div, 1.0 / (self.start_div * self.final_div)
        if self.steps <= peak:
            return _cos_between(start, 1.0, self.steps / peak if peak else 1.0)
        return _cos_between(1.0, end, min(1.0, (self.steps - peak) / max(1, last - peak)))


class PlateauSchedule(LRSchedule):
    """``plateau``, per epoch: multiply by ``factor`` once the metric has not improved (relative
    threshold 1e-4, direction ``mode``) for more than ``patience`` consecutive epochs, then start counting
    again. A NaN metric counts as no improvement."""

    kind = "plateau"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.best: float | None = None
        self.bad_epochs = 0
        self.reductions = 0
        super().__init__(*args, **kwargs)

    def factor(self) -> float:
        return self.cfg.factor ** self.reductions

    def step_epoch(self, metric: float | None = None) -> None:
        if metric is None:
            raise ValueError("the plateau schedule needs the monitored metric in step_epoch(metric)")
        if self._improved(float(metric)):
            self.best, self.bad_epochs = float(metric), 0
        else:
            self.bad_epochs += 1
        if self.bad_epochs > self.cfg.patience:
            self.reductions, self.bad_epochs = self.reductions + 1, 0
        super().step_epoch(metric)

    def _improved(self, metric: float) -> bool:
        if math.isnan(metric):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return metric < self.best - abs(self.best) * 1e-4
        return metric > self.best + abs(self.best) * 1e-4

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "best": self.best, "bad_epochs": self.bad_epochs, "reductions": self.reductions}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = None if state["best"] is None else float(state["best"])
        self.bad_epochs, self.reductions = int(state["bad_epochs"]), int(state["reductions"])
        super().load_state_dict(state)


def _cos_between(start: float, end: float, pct: float) -> float:
    """Cosine interpolation: ``start`` at pct 0, ``end`` at pct 1."""
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * pct))
