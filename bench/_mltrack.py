"""mltrack's own path, end to end: ``build_loaders`` (cache none | ram | gpu), the mixed-precision trainer
and the one loop (``train_epoch`` / ``run_epoch``), with the real checkpoint and MLflow hooks for the
tracking variants, and the tutorial-style loop the hymenoptera comparison runs against.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from _feeds import make_optimizer


def build(data_dir: Path, *, cache: str, image_size: int, batch_size: int, workers: int, device: torch.device,
          splits: tuple[str, ...] = ("train",), seed: int = 0) -> tuple[Any, float]:
    """mltrack's loaders for the bench dataset (imagenet recipe) and the seconds building them took
    (for a cache: decoding every image once)."""
    from mltrack.config import DataConfig
    from mltrack.data.loaders import build_loaders

    cfg = DataConfig(data_dir=str(data_dir), dataset_name="bench", image_size=image_size, transforms="imagenet",
                     num_workers=workers, cache=cache)
    t0 = time.perf_counter()
    loaders = build_loaders(cfg, batch_size, seed, False, device.type, splits=splits, device=device,
                            trainer_type="mixed_precision", channels_last=True, train_dtype=torch.bfloat16)
    return loaders, time.perf_counter() - t0


def context(model: nn.Module, loaders: Any, device: torch.device, batch_size: int, *,
            compiled: Optional[nn.Module] = None) -> Any:
    """A FitContext as ``run.py`` builds one: mixed_precision trainer (bf16, channels_last), SGD, no schedule.

    ``compiled`` (a torch.compile of ``model``) is the module the loop calls, as ``trainer.compile`` gives.
    """
    from mltrack.config import SchedulerConfig, load_config
    from mltrack.optim import build_scheduler
    from mltrack.trainers import build_trainer
    from mltrack.trainers.loop import FitContext

    cfg = load_config(None, [
        "training.trainer_type=mixed_precision", "training.amp_dtype=bfloat16", "training.channels_last=true",
        f"training.batch_size={batch_size}", f"training.device={device}", "tracking.progress='off'",
        "tracking.tensorboard=false", "tracking.confusion_every_epoch=false", "scheduler.name=none"])
    trainer = build_trainer(cfg.training, device)
    opt = make_optimizer(model)
    loader_map = {"train": loaders.train, "val": loaders.val, "test": loaders.test}
    model, opt, loader_map = trainer.prepare(model, opt, loader_map)
    schedule = build_scheduler(SchedulerConfig(name="none"), opt, 1, max(1, len(loader_map["train"])), 1e-3)
    return FitContext(cfg, compiled if compiled is not None else model, opt, schedule, trainer, loader_map,
                      nn.CrossEntropyLoss(), list(loaders.class_names))


def train_epochs(ctx: Any, images_per_epoch: int) -> Callable[[], int]:
    """One call = ``loop.train_epoch`` over the train loader (what ``mltrack train`` runs per epoch)."""
    from mltrack.trainers.loop import train_epoch

    def run() -> int:
        train_epoch(ctx)
        return images_per_epoch

    return run


def thread_cpu_s() -> dict[str, float]:
    """CPU seconds used so far by each live Python thread other than the caller's (the training thread), by
    name, from the thread's own CPU clock. The background threads' CPU per epoch bounds the GIL time they can
    take from the training thread (less: sqlite, hashing and file writes release it), which the epoch-time
    ratios of a noisy machine cannot resolve to 1 %."""
    out: dict[str, float] = {}
    me = threading.get_ident()
    for thread in threading.enumerate():
        if thread.ident is None or thread.ident == me:
            continue
        try:
            seconds = time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
        except (OSError, AttributeError):  # it ended meanwhile, or no per-thread clocks on this platform
            continue
        out[thread.name] = out.get(thread.name, 0.0) + seconds
    return out


def full_epochs(ctx: Any, images_per_epoch: int, hooks: list[Any], tracking: Any = None) -> Callable[[], int]:
    """One call = ``loop.run_epoch`` (train + validation) and the hooks' ``on_epoch_end``, as ``loop.fit``.
    ``tracking`` (a :class:`Tracking`) gets the seconds the hooks took on the training thread, per epoch (the
    GPU waits then), and the process CPU time at the first epoch after each drain."""
    from mltrack.trainers.loop import run_epoch

    def run() -> int:
        if tracking is not None and tracking.cpu_mark is None:
            tracking.cpu_mark = time.process_time()
            tracking.threads_mark = thread_cpu_s()
        ctx.last = run_epoch(ctx)
        start = time.perf_counter()
        for hook in hooks:
            hook.on_epoch_end(ctx)
        if tracking is not None:
            tracking.hook_s.append(time.perf_counter() - start)
        return images_per_epoch

    return run


def write_improving_at_once(hook: Any) -> None:
    """Make ``hook`` (a CheckpointHook) write an improving epoch inside the duty window at once, as it did
    before the duty rule held such epochs: for benchmarks and probes that price the hold."""
    def write_at_once(ctx: Any) -> None:
        hook.deferred = False
        hook._submit(ctx, True)

    hook._hold = write_at_once


class Tracking:
    """The hooks ``run.py`` installs (checkpoint write + upload, per-epoch metrics) on a real MLflow run in a
    local sqlite store; ``None`` tracker = checkpoints written locally only."""

    def __init__(self, workdir: Path, name: str, mlflow: bool, figures: str | None = None,
                 tensorboard: bool | None = None, figure_duty: float | None = None,
                 sender_process: bool | None = None, hold_improving: bool = True) -> None:
        """``figures``: None, or ``"inline"``: the default config's per-epoch confusion figure (MLflow +
        TensorBoard, with TensorBoard scalars) rendered on the epoch-IO worker, as ``run.py`` wires it.
        ``figure_duty``: the figures' duty rule (``EpochFigures``; 0: every epoch's figure), None: run.py's.
        ``sender_process``: MLflow writes from a child process (``Tracker.start``); None: as ``run.py``, on a
        GPU only (when CUDA is available) unless env ``MLTRACK_SENDER_PROCESS`` says otherwise.
        ``hold_improving`` False: an improving epoch inside the checkpoint duty window is written at once
        (``CheckpointHook`` before it held them), to price the hold."""
        self.workdir = Path(workdir) / name
        self.figures = figures
        self.figure_duty = figure_duty
        self.hold_improving = hold_improving  # False: improving epochs written at once (the rule before holding)
        # TensorBoard scalars (+ the figure's image sink): the default config has them with the figures
        self.tensorboard = figures is not None if tensorboard is None else tensorboard
        self.cpu_mark: float | None = None  # process CPU seconds (all threads) when this block's first epoch began
        self.threads_mark: dict[str, float] = {}  # thread_cpu_s() then
        self.hook_s: list[float] = []  # filled by full_epochs(..., tracking=self); reported by drain()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tracker = None
        if mlflow:
            from mltrack.tracking import Tracker

            # One store for all runs of the benchmark (created once); a new sqlite store puts its artifacts
            # in ./mlruns, so it is created from the work dir, which the benchmark deletes at the end.
            os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(workdir) / 'mlflow.db'}"
            previous = os.getcwd()
            os.chdir(workdir)
            try:
                if sender_process is None:  # as run.py decides it (env MLTRACK_SENDER_PROCESS, else on a GPU)
                    from mltrack.run import sender_process_for

                    sender_process = sender_process_for(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
                self.tracker = Tracker.start("bench", name, {"mltrack.role": "bench"}, spool_dir=self.workdir / "spool",
                                             sender_process=sender_process)
            finally:
                os.chdir(previous)

    def hooks(self, ctx: Any) -> list[Any]:
        """The hooks with one EpochIO worker, as ``run.py`` wires them: the checkpoint write, its upload and
        the metrics run behind the training thread; a worker slower than the epochs blocks the next
        checkpoint copy, so it shows in the timed epochs."""
        from mltrack.figures import EpochFigures, mlflow_sink, tensorboard_sink
        from mltrack.hooks import CheckpointHook, EpochIO, FiguresHook, TensorBoardHook, TrackingHook

        self.io = EpochIO()
        run_id = self.tracker.run_id if self.tracker is not None else "none"
        meta = {"split_digest": "bench", "dataset_fingerprint": "bench", "mlflow_run_id": run_id}
        self.checkpoints = CheckpointHook(self.workdir / "weights", self.tracker, meta, io=self.io)
        if not self.hold_improving:
            write_improving_at_once(self.checkpoints)
        hooks: list[Any] = [self.checkpoints]
        if self.tracker is not None:  # holds a deferred epoch's metrics until a later checkpoint, as run.py wires it
            hooks.append(TrackingHook(self.tracker, io=self.io, checkpoints=self.checkpoints))
        self.figures_hook = None
        tb = TensorBoardHook(self.workdir / "tensorboard", self.io) if self.tensorboard else None
        if self.figures is not None and self.tracker is not None:  # the default config: figures + TensorBoard
            sinks = [mlflow_sink(self.tracker)]
            if tb is not None:
                sinks.append(tensorboard_sink(lambda: tb.writer))
            # the duty rule as run.py picks it (by device), unless the variant sets one
            duty = self.figure_duty if self.figure_duty is not None else EpochFigures.duty_for(
                "cuda" if torch.cuda.is_available() else "cpu")
            figures = EpochFigures(sinks, duty)
            self.figures_hook = FiguresHook(figures, self.io)
            hooks.append(self.figures_hook)
        if tb is not None:
            hooks.append(tb)
        for hook in hooks:
            hook.on_fit_start(ctx)
        return hooks

    def drain(self) -> dict[str, float]:
        """Wait for the epoch worker and the tracker's queue (work the timed epochs left running); the
        seconds each wait took. The run stays open: an interleaved measurement drains between blocks."""
        cpu_s = None
        if self.cpu_mark is not None:  # the block's epochs only: not this drain, not other variants' blocks
            cpu_s, self.cpu_mark = time.process_time() - self.cpu_mark, None
        t0 = time.perf_counter()
        self.io.drain()
        out = {"io_drain_s": round(time.perf_counter() - t0, 3), "checkpoints_queued": self.checkpoints.queued,
               "checkpoints_superseded": self.checkpoints.superseded, "checkpoints_held": self.checkpoints.held}
        if self.figures_hook is not None:
            figures = self.figures_hook.figures
            out["figures"] = f"{figures.offered - figures.skipped} of {figures.offered}"
        out["hooks_ms"] = [round(1e3 * t, 2) for t in self.hook_s]
        if cpu_s is not None:
            out["process_cpu_s"] = round(cpu_s, 3)
        self.hook_s.clear()  # in place: full_epochs holds this very list
        if self.tracker is not None:
            t0 = time.perf_counter()
            self.tracker.flush()
            out["queue_drain_s"] = round(time.perf_counter() - t0, 3)
        out.update(self._threads_cpu())  # after both drains: the uploads' work belongs to the block's epochs too
        return out

    def _threads_cpu(self) -> dict[str, Any]:
        """The background threads' CPU seconds since the block began, the drained work included (all of it is
        the block's epochs' doing): the total and, by thread, those over 1 ms."""
        if not self.threads_mark:
            return {}
        now = thread_cpu_s()
        by_thread = {name: now[name] - self.threads_mark.get(name, 0.0) for name in now}
        self.threads_mark = {}
        return {"threads_cpu_s": round(sum(by_thread.values()), 4),
                "threads_cpu_by_name": {k: round(v, 4) for k, v in sorted(by_thread.items()) if v > 1e-3}}

    def finish(self) -> dict[str, float]:
        """``drain``, then stop the epoch worker and close the MLflow run."""
        out = self.drain()
        if self.figures_hook is not None:
            self.figures_hook.close()
        self.io.close()
        if self.tracker is not None:
            self.tracker.finish("FINISHED")
        return out


def compile_like_run(model: nn.Module, device: torch.device, mode: str) -> nn.Module:
    """``model`` compiled as ``run.py`` compiles it for ``training.compile: true`` and
    ``training.compile_mode: <mode>`` (``Trainer.compile``). Lazy: the first call compiles."""
    from mltrack.trainers import build_trainer

    cfg = load_compile_config(device, mode)
    return build_trainer(cfg.training, device).compile(model)


def load_compile_config(device: torch.device | str, mode: str) -> Any:
    """The RunConfig of a mixed-precision run with ``training.compile_mode=mode``; raises mltrack's
    ConfigError (naming the valid modes) for an unknown mode."""
    from mltrack.config import load_config

    return load_config(None, ["training.trainer_type=mixed_precision", f"training.device={device}",
                              "training.compile=true", f"training.compile_mode={mode}"])


def tutorial_epochs(model: nn.Module, train_loader: Any, val_loader: Any, device: torch.device,
                    weights: Path) -> Callable[[], int]:
    """The transfer-learning tutorial's loop: fp32, per-batch ``loss.item()`` and correct counts, a StepLR,
    best weights saved with ``torch.save`` when validation accuracy improves. One call = train + val."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.1)
    loss_fn = nn.CrossEntropyLoss()
    best = {"acc": -1.0}

    def run() -> int:
        seen = 0
        for phase, loader in (("train", train_loader), ("val", val_loader)):
            model.train(phase == "train")
            running_loss, corrects, n = 0.0, 0, 0
            for inputs, labels in loader:
                inputs, labels = inputs.to(device), labels.to(device)
                opt.zero_grad()
                with torch.set_grad_enabled(phase == "train"):
                    outputs = model(inputs)
                    loss = loss_fn(outputs, labels)
                    if phase == "train":
                        loss.backward()
                        opt.step()
                running_loss += loss.item() * inputs.size(0)
                corrects += int(torch.sum(outputs.argmax(1) == labels))
                n += inputs.size(0)
            if phase == "train":
                scheduler.step()
            elif corrects / max(n, 1) > best["acc"]:
                best["acc"] = corrects / max(n, 1)
                torch.save(model.state_dict(), weights)
            seen += n
        return seen

    return run
