"""The one training loop: fit / train_epoch / evaluate. Trainers vary only through their hooks-free
variation points (see ``base.Trainer``); side effects of an epoch live in ``mltrack.hooks``.

Per-batch statistics are accumulated on the device and read once per epoch, so logging costs no
per-batch GPU->CPU synchronisation. The non-finite-loss guard needs none either when the optimizer can
skip a step on the device (fused torch optimizers, ``Trainer.skips_on_device``); otherwise it reads the
loss back once per optimizer step to decide whether to step.
"""
from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Optional, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

from mltrack.config import RunConfig
from mltrack.metrics import accumulate_confusion, check_labels, sanitize_metric_key, summarize
from mltrack.trainers.base import Trainer
from mltrack.trainers.guard import NonFiniteCounters, NonFiniteLossError

__all__ = ["NonFiniteLossError", "fit", "train_epoch", "evaluate"]


# Set by the SIGTERM/SIGINT handler installed in run.py; read at batch boundaries. A module global
# because a signal handler cannot reach the FitContext of the running loop.
STOP_REQUESTED: Optional[str] = None


class StopTraining(Exception):
    """Raised by an epoch callback to end a run early with a given MLflow status (e.g. a pruned trial).

    ``run.train`` sets the run to ``status`` with tag ``mltrack.exit_reason=reason`` and re-raises.
    """

    def __init__(self, reason: str, status: str = "KILLED") -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class Interrupted(Exception):
    """A stop was requested (SIGTERM/SIGINT); raised after the last complete optimizer step.

    ``FitState.batch > 0`` then says it was raised inside an epoch: ``FitState.partial`` holds what a
    mid-epoch checkpoint needs to continue that epoch exactly (see ``train_epoch``).
    """

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


class InjectedFault(RuntimeError):
    """The exception raised by ``MLTRACK_FAULT_ACTION=raise`` (fault-injection tests)."""


_FIRED: set[str] = set()  # each fault point fires at most once per process
_FAULT_SIGNALS = {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT, "sigkill": signal.SIGKILL,
                  "stop": signal.SIGSTOP}


def fault_matches(point: str, epoch: int | None = None, batch: int | None = None) -> bool:
    """Whether the fault-injection env vars select this point (and epoch/batch, when they are set)."""
    env = os.environ
    if env.get("MLTRACK_FAULT_AT") != point or point in _FIRED:
        return False
    for name, value in (("MLTRACK_FAULT_EPOCH", epoch), ("MLTRACK_FAULT_BATCH", batch)):
        wanted = env.get(name, "")
        if wanted != "" and value != int(wanted):
            return False
    return True


def fault(point: str, epoch: int | None = None, batch: int | None = None) -> None:
    """Fault injection for the reliability tests; a no-op unless ``MLTRACK_FAULT_AT`` names ``point``.

    Env: ``MLTRACK_FAULT_AT`` = point (after_train, after_eval, after_ckpt_write, after_ckpt_upload,
    after_metrics_log, after_commit, in_epoch = after the optimizer step of a batch; in checkpoint.py:
    ckpt_write_half, ckpt_before_replace, ckpt_after_replace); ``MLTRACK_FAULT_EPOCH`` = 0-based epoch
    (= metric step) and ``MLTRACK_FAULT_BATCH`` = 0-based batch (in_epoch only), each optional;
    ``MLTRACK_FAULT_ACTION`` = exit (default: ``os._exit(137)``, no cleanup, like kill -9), raise
    (InjectedFault), sysexit (``SystemExit(1)``), or sigterm / sigint / sigkill / stop (that real signal
    sent to this process; stop = SIGSTOP, so a test can deliver a real SIGKILL at this exact point).
    """
    if not fault_matches(point, epoch, batch):
        return
    _FIRED.add(point)
    action = os.environ.get("MLTRACK_FAULT_ACTION", "exit")
    if action == "exit":
        os._exit(137)
    if action == "raise":
        raise InjectedFault(f"injected fault at {point} (epoch {epoch}, batch {batch})")
    if action == "sysexit":
        raise SystemExit(1)
    if action not in _FAULT_SIGNALS:
        raise ValueError(f"MLTRACK_FAULT_ACTION={action!r}; use exit, raise, sysexit, {', '.join(_FAULT_SIGNALS)}")
    os.kill(os.getpid(), _FAULT_SIGNALS[action])


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
    batch: int = 0  # train batches of ``epoch`` already done (a mid-epoch checkpoint); 0 at an epoch boundary
    partial: dict[str, Any] = field(default_factory=dict)  # running sums of that epoch (``_EpochSums``)

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
    mixer: Callable[..., Any] | None = None  # mltrack.data.mix.Mixer for train batches (mixup/cutmix); None: off

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


class _EpochSums:
    """The running sums of one train pass, on the device; saved into ``FitState.partial`` by a mid-epoch stop.

    ``partial`` (plain data, weights-only loadable): ``loader_state`` (the train generator's state at the
    start of the epoch, before the iterator drew its shuffle order and worker seeds), ``lr`` (logged for
    the epoch), ``loss_sum``/``seen``/``cm``/``consecutive_bad``/``elapsed`` (sums over the done batches).
    """

    def __init__(self, ctx: FitContext, generator: Optional[torch.Generator]) -> None:
        device, n = ctx.trainer.device, ctx.num_classes
        part = ctx.state.partial if ctx.state.batch else {}
        self.loss_sum = torch.tensor(float(part.get("loss_sum", 0.0)), device=device, dtype=torch.float64)
        self.seen = torch.tensor(int(part.get("seen", 0)), device=device, dtype=torch.int64)
        cm = part.get("cm")
        self.cm = (torch.as_tensor(cm, dtype=torch.int64).to(device) if cm is not None
                   else torch.zeros(n, n, dtype=torch.int64, device=device))
        self.bad = NonFiniteCounters(device, int(part.get("consecutive_bad", 0)),
                                     ctx.cfg.training.max_nonfinite_steps)
        self.invalid_labels = torch.zeros((), dtype=torch.int64, device=device)
        self.elapsed_before = float(part.get("elapsed", 0.0))
        self.lr = float(part["lr"]) if "lr" in part else ctx.schedule.current_lr()
        if "loader_state" in part and generator is not None:
            generator.set_state(part["loader_state"])  # re-draw this epoch's order and worker seeds
        self.loader_state = generator.get_state() if generator is not None else None
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start

    def to_partial(self) -> dict[str, Any]:
        return {"loader_state": self.loader_state, "lr": self.lr, "loss_sum": float(self.loss_sum.item()),
                "seen": int(self.seen.item()), "cm": self.cm.cpu().tolist(),
                "consecutive_bad": int(self.bad.streak), "elapsed": self.elapsed()}

    def close(self, ctx: FitContext) -> None:
        """Fold this pass's counts into the fit state (once, when the pass ends or stops)."""
        ctx.state.nonfinite_steps += int(self.bad.total)
        check_labels(self.invalid_labels, ctx.num_classes)


def _stop_inside_epoch(ctx: FitContext, sums: _EpochSums, done: int) -> Interrupted:
    """Record the position after ``done`` complete batches and return the exception to raise."""
    assert STOP_REQUESTED is not None
    sums.close(ctx)
    ctx.state.batch, ctx.state.partial = done, sums.to_partial()
    return Interrupted(STOP_REQUESTED)


def _batches(loader: DataLoader, skip: int) -> Iterator[tuple[int, Any]]:
    """``(index, batch)`` of the train loader from batch ``skip`` on.

    Resuming inside an epoch, the first ``skip`` batches are fetched (so each DataLoader worker's RNG
    advances as it did) but not trained on; the global RNGs are then put back to the checkpoint's state,
    which is what they were right after batch ``skip - 1``.
    """
    iterator = iter(loader)
    if skip:
        from mltrack.checkpoint import rng_state, set_rng_state

        at_stop = rng_state()
        for _ in range(skip):
            next(iterator)
        set_rng_state(at_stop)
    yield from enumerate(iterator, start=skip)


def _next_batch(batches: Iterator[tuple[int, Any]], ctx: FitContext, sums: "_EpochSums", done: int,
                can_stop_inside: bool) -> Optional[tuple[int, Any]]:
    """The next ``(index, batch)``, or None at the end of the epoch."""
    try:
        return next(batches)
    except StopIteration:
        return None
    except Exception:
        # Ctrl-C in a terminal also reaches the DataLoader workers, which then die: the stop wins.
        if STOP_REQUESTED and can_stop_inside and done % ctx.trainer.accumulation == 0:
            raise _stop_inside_epoch(ctx, sums, done) from None
        raise


def _forward_backward(ctx: FitContext, sums: "_EpochSums", images: torch.Tensor, targets: torch.Tensor,
                      sync: bool) -> torch.Tensor:
    """Forward and backward of one micro-batch; adds to the epoch sums; returns its (detached) mean loss."""
    trainer, model = ctx.trainer, ctx.model
    images, targets = trainer.to_device(images, targets)
    # Mixed inputs train on soft targets; the train confusion matrix keeps each image's own (hard) label.
    inputs, loss_targets = ctx.mixer(images, targets) if ctx.mixer is not None else (images, targets)
    with trainer.accumulate(model, sync):
        with trainer.autocast():
            logits = model(inputs)
            loss = ctx.loss_fn(logits.float(), loss_targets)
        trainer.backward(loss / trainer.accumulation)
    batch_loss = loss.detach().double() * targets.numel()
    sums.loss_sum += torch.nan_to_num(batch_loss, nan=0.0, posinf=0.0, neginf=0.0)
    sums.seen += targets.numel()
    sums.invalid_labels += accumulate_confusion(sums.cm, logits.detach().argmax(1), targets)
    return loss.detach()


def _optimizer_step(ctx: FitContext, sums: "_EpochSums", group_loss: torch.Tensor, batch: int) -> None:
    """Step on the accumulated gradients unless the group's loss is non-finite (then count it, and fail
    after ``training.max_nonfinite_steps`` in a row); gradients are zeroed either way.

    Every process must take the same decision, or the DDP replicas diverge: hence the sum over processes.
    On the device path a skipped step still advances the lr schedule and ``global_step`` (as a step that
    GradScaler skips does); on the host path it advances neither.
    """
    trainer = ctx.trainer
    bad = trainer.reduce_sum((~torch.isfinite(group_loss)).to(torch.int64)).clamp(max=1)
    if trainer.skips_on_device(ctx.optimizer):
        trainer.optimizer_step(ctx.model, ctx.optimizer, found_inf=bad)
        stepped = True
    else:  # the value is needed now: a step with a NaN/inf loss must not touch the weights
        stepped = int(bad) == 0 and trainer.optimizer_step(ctx.model, ctx.optimizer)
    if stepped:
        ctx.state.global_step += 1
        ctx.schedule.step_batch()
    sums.bad.update(bad, ctx.state.epoch, batch)
    trainer.zero_grad(ctx.optimizer)


def train_epoch(ctx: FitContext) -> tuple[dict[str, float], torch.Tensor]:
    """One pass over the train loader (or the rest of it after a mid-epoch resume); returns (metrics,
    train confusion matrix). A stop request is honoured after a complete optimizer step (Interrupted)."""
    trainer, loader = ctx.trainer, ctx.loaders["train"]
    assert loader is not None
    ctx.model.train()
    generator = getattr(loader, "generator", None)
    # Stopping inside an epoch needs the loader's generator to replay the epoch and one process to stop alone.
    can_stop_inside = generator is not None and trainer.world_size == 1
    sums = _EpochSums(ctx, generator)
    skip, ctx.state.batch, ctx.state.partial = ctx.state.batch, 0, {}
    n_batches = len(loader)
    group_loss = torch.zeros((), device=trainer.device)
    trainer.zero_grad(ctx.optimizer)
    with _bar(ctx, n_batches, f"epoch {ctx.state.epoch} train") as advance:
        advance(skip)
        batches, done = _batches(loader, skip), skip
        while (item := _next_batch(batches, ctx, sums, done, can_stop_inside)) is not None:
            i, (images, targets) = item
            sync = (i + 1) % trainer.accumulation == 0 or i + 1 == n_batches
            if not trainer.is_empty_batch(targets):
                group_loss = group_loss + _forward_backward(ctx, sums, images, targets, sync)
            done = i + 1
            if sync:
                _optimizer_step(ctx, sums, group_loss, i)
                group_loss = torch.zeros((), device=trainer.device)
                fault("in_epoch", ctx.state.epoch, i)
                if STOP_REQUESTED and can_stop_inside and done < n_batches:
                    raise _stop_inside_epoch(ctx, sums, done)
            advance(1)
    elapsed = sums.elapsed()
    sums.bad.check_now(f"epoch {ctx.state.epoch}")
    sums.close(ctx)
    loss_sum, seen, cm = trainer.reduce_sum(sums.loss_sum), trainer.reduce_sum(sums.seen), trainer.reduce_sum(sums.cm)
    n = max(int(seen.item()), 1)
    metrics = {
        "train/loss": float(loss_sum.item()) / n,
        "train/acc": float(cm.diag().sum().item()) / n,
        "train/img_per_s": n / max(elapsed, 1e-9),
        "lr": sums.lr,
    }
    if trainer.device.type == "cuda":  # peak since the previous epoch, for the memory column of the README
        metrics["gpu/peak_mem_gb"] = torch.cuda.max_memory_allocated(trainer.device) / 2**30
        torch.cuda.reset_peak_memory_stats(trainer.device)
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
    invalid = torch.zeros((), dtype=torch.int64, device=device)
    for images, targets in loader:
        images, targets = trainer.to_device(images, targets)
        with trainer.autocast():
            logits = model(images).float()
        logits, targets = trainer.gather(logits, targets)
        loss_sum += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").double()
        seen += targets.numel()
        invalid += accumulate_confusion(cm, logits.argmax(1), targets)
    check_labels(invalid, ctx.num_classes)
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
    train_metrics, train_cm = train_epoch(ctx)
    fault("after_train", ctx.state.epoch)
    val_loader = ctx.loaders["val"]
    assert val_loader is not None
    val_loss, val_cm = evaluate(ctx, val_loader)
    fault("after_eval", ctx.state.epoch)
    metrics = {**train_metrics, **split_metrics("val", val_loss, val_cm, ctx.class_names)}
    metrics.update(ctx.trainer.extra_metrics())
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


def _finished(ctx: FitContext) -> bool:
    # From the state, not from a flag set in the previous iteration, so a resumed run that had already
    # met its early-stopping condition does not train one more epoch.
    patience = ctx.cfg.training.early_stopping.patience
    if patience is not None and ctx.state.bad_epochs >= patience:
        ctx.should_stop = True
    return ctx.should_stop or ctx.state.epoch >= ctx.cfg.training.num_epochs


def _stop_at_boundary() -> None:
    if STOP_REQUESTED:
        raise Interrupted(STOP_REQUESTED)


def fit(ctx: FitContext, hooks: list[Any]) -> FitState:
    """Run epochs from ``ctx.state.epoch`` to ``training.num_epochs``; hooks fire in list order.

    A stop request raises Interrupted inside an epoch (after a complete optimizer step, ``state.batch``
    set) or between epochs (after the hooks, so the epoch's checkpoint is already written).
    """
    for hook in hooks:
        hook.on_fit_start(ctx)
    while not _finished(ctx):
        _stop_at_boundary()
        ctx.last = run_epoch(ctx)
        for hook in hooks:
            hook.on_epoch_end(ctx)
    _stop_at_boundary()
    for hook in hooks:
        hook.on_fit_end(ctx)
    return ctx.state
