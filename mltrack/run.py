"""The composition root: RunConfig -> data, model, optimizer, trainer, hooks -> fit -> test evaluation.

Everything a user can get wrong is checked before the MLflow run is created (a resumed checkpoint is
even loaded into the built model first), so bad input never leaves a run behind or changes one. Once
the run exists, every exit path sets its status: FINISHED; FAILED with ``mltrack.exit_reason`` (an
exception, SystemExit); KILLED (SIGTERM/SIGINT: after the current optimizer step, with a checkpoint of
exactly that position, uploaded). Only ``kill -9`` leaves it RUNNING: a resume continues it, and
``mltrack reconcile`` marks it KILLED once its ``mltrack.heartbeat`` tag is stale or its process is gone.
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from mltrack import checkpoint
from mltrack.config import RunConfig, to_yaml
from mltrack.console import get_logger, setup_logging
from mltrack.errors import CheckpointError, DataError, UserError
from mltrack.resume import ResumePoint, check_compatible
from mltrack.trainers.loop import FitContext, FitState, Interrupted, NonFiniteLossError, StopTraining, fit

log = get_logger()
EXIT_KILLED = {"SIGTERM": 143, "SIGINT": 130}  # 128 + signal number, what shells report
KILLED_FLUSH_S = 20.0  # a stopped run waits at most this long for its checkpoint upload (exit within 30 s)


@dataclass
class TrainResult:
    run_id: str
    run_dir: Path
    best_epoch: int
    best_metric: Optional[float]
    test_metrics: dict[str, float] = field(default_factory=dict)
    status: str = "FINISHED"


# ---------------------------------------------------------------- preflight (no run exists yet)


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"invalid training.device '{spec}' (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("CUDA not available: --device cuda was asked for but torch sees no GPU; "
                            "use --device cpu (or --device auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"CUDA device {device.index} does not exist ({torch.cuda.device_count()} visible)")
    return device


def seed_everything(seed: int, deterministic: bool, tf32: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
    if torch.cuda.is_available():  # set both ways: an earlier run in this process (search trials) may differ
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def prepare_data(cfg: RunConfig) -> tuple[list[str], str]:
    """Check the dataset and splits; return (class names, split digest). Creates digits when it is the default."""
    from mltrack.data.checks import check_for_run
    from mltrack.data.demo import ensure_digits
    from mltrack.data.index import class_names, read_index
    from mltrack.data.splits import split_digest

    data_dir = Path(cfg.data.data_dir)
    if cfg.data.dataset_name == "digits" and Path(cfg.data.data_dir).name == "digits":
        ensure_digits(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data directory not found: {data_dir} (set data.data_dir or --data-dir to a folder "
                        "holding raw/<class>/… and splits/)")
    names = class_names(data_dir / "raw")
    expected = cfg.model.num_classes
    if expected is not None and expected != len(names):
        raise UserError(
            f"Model output size ({expected}) doesn't match dataset classes ({len(names)}): "
            f"raw/ has {len(names)} class folders ({', '.join(names[:10])}{'…' if len(names) > 10 else ''}). "
            f"Update the config: model.num_classes: {len(names)} (or remove it to detect it)"
        )
    for split in ("train", "val", "test"):
        read_index(data_dir, split, cfg.data.fold)  # validates paths; missing file -> the guide's message
    # Every file decoded (cached by stat in <data_dir>/.mltrack_check.json), splits checked for leakage:
    # a bad file or a leak ends here with exit 2, before any MLflow run exists.
    check_for_run(data_dir, cfg.data.max_image_pixels)
    return names, split_digest(data_dir / "splits", cfg.data.fold)


def run_name(cfg: RunConfig, explicit: dict[str, Any] | None = None) -> str:
    """``<dataset>_<explicit overrides or base>_fold_<k>``, as the guide's run folders are named."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    # Only keys that change what is learned name the run; where or how visibly it runs does not.
    skip = ("data.fold", "data.data_dir", "data.num_workers", "training.device", "tracking.")
    parts = [f"{k.split('.')[-1].replace('num_', '').replace('_size', '')}_{v}" for k, v in (explicit or {}).items()
             if not k.startswith(skip)]
    middle = "_".join(parts) if parts else "base"
    return re.sub(r"[^\w.\-]", "_", f"{cfg.data.dataset_name}_{middle}_fold_{cfg.data.fold}")


def unique_dir(root: Path, name: str) -> Path:
    """A new run folder: an existing one is never overwritten (``name_2``, ``name_3``…)."""
    candidate, n = root / name, 1
    while candidate.exists():
        n += 1
        candidate = root / f"{name}_{n}"
    candidate.mkdir(parents=True)
    return candidate


# ---------------------------------------------------------------- the run


@dataclass
class Session:
    """What exists once the MLflow run is open; owned by ``train``."""

    cfg: RunConfig
    run_dir: Path
    tracker: Any
    device: torch.device
    class_names: list[str]
    split_digest: str
    resume: Optional[ResumePoint]
    new_run: bool = True  # False: the resumed run itself was re-opened (params already logged)


@dataclass
class Built:
    """Everything ``fit`` needs, built (and restored from a checkpoint) before any run is opened, so a
    checkpoint that does not fit the model fails without touching MLflow."""

    ctx: FitContext
    loaders: Any
    trainer: Any


def train(cfg: RunConfig, resume: Optional[ResumePoint] = None, *, explicit: dict[str, Any] | None = None,
          parent_run_id: str | None = None, role: str = "train", extra_tags: dict[str, str] | None = None,
          epoch_callback: Any = None, on_start: Optional[Callable[[str], None]] = None) -> TrainResult:
    """Train one (config, fold) as one MLflow run; see the module docstring for the exit-path contract.

    ``epoch_callback(ctx)`` is called after each epoch's hooks (Optuna reporting/pruning uses it).
    ``on_start(run_id)`` is called once the MLflow run is open, before training starts (an Optuna
    trial records the id at once, so a crash in the first epoch still leaves it findable).
    With ``resume``, the checkpoint's run is re-opened and continued, unless ``MLFLOW_RUN_ID`` names
    another run (``mlflow run -P resume=…`` without ``--run-id``): that run then receives the whole
    history, params and weights, and tag ``mltrack.resumed_from``.
    SIGTERM/SIGINT: the current optimizer step completes, a checkpoint is written and uploaded, the run
    is marked KILLED and SystemExit(143/130) is raised.
    """
    device = resolve_device(cfg.training.device)
    from mltrack.data.cache import resolve_cache_mode

    resolve_cache_mode(cfg.data.cache, device, 0, trainer_type=cfg.training.trainer_type)  # e.g. gpu without CUDA
    names, digest = prepare_data(cfg)
    cfg = _with_num_classes(cfg, len(names))
    from mltrack.models import preflight_weights

    preflight_weights(cfg.model)
    if resume is not None:
        check_compatible(resume, cfg, names, digest)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and cfg.training.trainer_type != "accelerate":
        raise UserError(f"training.trainer_type {cfg.training.trainer_type} trains in one process, but this was "
                        f"started as {os.environ['WORLD_SIZE']} processes (torchrun / accelerate launch); use "
                        "training.trainer_type: accelerate for several processes")
    previous = _install_signal_handlers()
    try:
        same_run = resume is not None and resume.run_id is not None and \
            os.environ.get("MLFLOW_RUN_ID", resume.run_id) == resume.run_id
        # Under torchrun/accelerate launch only the main process (RANK 0) creates the run folder and the MLflow
        # run; the others learn the folder from it once the trainer has joined the process group.
        main = int(os.environ.get("RANK", "0")) == 0
        run_dir = _run_dir(cfg, resume, explicit, same_run) if main else None
        if run_dir is not None:
            setup_logging(run_dir / "logs" / "train.log")
        else:
            get_logger().setLevel(logging.WARNING)  # one console: the main process's
        built = _build(cfg, device, names)
        run_dir = Path(built.trainer.broadcast_object(None if run_dir is None else str(run_dir)))
        if resume is not None:
            _restore(built.ctx, resume, built.loaders.generator)
        _exit_if_stop_requested()
        rng = checkpoint.rng_state()  # opening the run must not move any RNG the training draws from
        if built.trainer.is_main_process:
            session = _open_session(cfg, run_dir, device, names, digest, resume, same_run, parent_run_id, role,
                                    extra_tags)
            built.trainer.broadcast_object(session.tracker.run_id)
        else:
            tracker = _NoTracker(built.trainer.broadcast_object(None))
            session = Session(cfg, run_dir, tracker, device, names, digest, resume, new_run=not same_run)
        checkpoint.set_rng_state(rng)
        return _run_session(session, built, epoch_callback, on_start)
    finally:
        _restore_signal_handlers(previous)


def _run_session(s: Session, built: Built, epoch_callback: Any, on_start: Any) -> TrainResult:
    """Train inside the open run and give it its final status on every exit path."""
    from mltrack.hooks import Heartbeat
    from mltrack.trainers import loop

    heartbeat = Heartbeat(s.tracker, float(os.environ.get("MLTRACK_HEARTBEAT_S", "30")))
    status, reason = "FAILED", "exception"
    try:
        if on_start is not None:
            on_start(s.tracker.run_id)
        result = _train_in_session(s, built, epoch_callback)
        status, reason = "FINISHED", None
        return result
    except Interrupted as stop:
        status, reason = "KILLED", stop.signal_name
        log.warning("%s received: stopped at epoch %d, batch %d with a checkpoint; resume with "
                    "mltrack train --resume runs:/%s/weights/last.pt", stop.signal_name, built.ctx.state.epoch,
                    built.ctx.state.batch, s.tracker.run_id)
        raise SystemExit(EXIT_KILLED.get(stop.signal_name, 143)) from None
    except StopTraining as stop:
        status, reason = stop.status, stop.reason
        raise
    except NonFiniteLossError:
        reason = "nonfinite_loss"
        raise
    except BaseException as err:  # noqa: BLE001 - the status must be set for SystemExit too
        status, reason = _failure_status(err, loop.STOP_REQUESTED)
        raise
    finally:
        heartbeat.stop()
        # A stopped run has ~30 s before a scheduler's SIGKILL: bounded upload wait, the rest stays spooled.
        limit = KILLED_FLUSH_S if status == "KILLED" else float(os.environ.get("MLTRACK_FINISH_TIMEOUT_S", "60"))
        s.tracker.finish(status, reason, timeout=limit)


def _failure_status(err: BaseException, stop_requested: Optional[str]) -> tuple[str, str]:
    """(status, exit_reason) for an exception that ended a run."""
    if isinstance(err, KeyboardInterrupt):  # a second Ctrl-C (the first one asks for a clean stop)
        return "KILLED", f"{stop_requested or 'SIGINT'} (forced)"
    if stop_requested:  # e.g. DataLoader workers killed by the same Ctrl-C: the user asked to stop
        return "KILLED", f"{stop_requested} ({type(err).__name__}: {str(err)[:150]})"
    if isinstance(err, UserError):
        return "FAILED", f"user_error: {str(err)[:200]}"
    if isinstance(err, SystemExit):
        return "FAILED", f"SystemExit({err.code!r})"
    return "FAILED", f"{type(err).__name__}: {str(err)[:200]}"


def _exit_if_stop_requested() -> None:
    from mltrack.trainers import loop

    if loop.STOP_REQUESTED:  # asked to stop before any run exists: leave nothing behind
        log.warning("%s received before training started; no run was created", loop.STOP_REQUESTED)
        raise SystemExit(EXIT_KILLED.get(loop.STOP_REQUESTED, 143))


def _with_num_classes(cfg: RunConfig, n: int) -> RunConfig:
    from mltrack.config import replace

    return cfg if cfg.model.num_classes == n else replace(cfg, **{"model.num_classes": n})


def _run_dir(cfg: RunConfig, resume: Optional[ResumePoint], explicit: dict[str, Any] | None,
             same_run: bool) -> Path:
    if same_run and resume is not None and resume.run_dir is not None and resume.run_dir.is_dir():
        return resume.run_dir  # continue the same local folder
    return unique_dir(Path(cfg.tracking.runs_dir), run_name(cfg, explicit))


def _open_session(cfg: RunConfig, run_dir: Path, device: torch.device, names: list[str], digest: str,
                  resume: Optional[ResumePoint], same_run: bool, parent_run_id: str | None, role: str,
                  extra_tags: dict[str, str] | None) -> Session:
    from mltrack.tracking import Tracker

    tags = {
        "mltrack.role": role, "mltrack.fold": str(cfg.data.fold), "mltrack.trainer_type": cfg.training.trainer_type,
        "mltrack.dataset": cfg.data.dataset_name, "mltrack.split_digest": digest,
        "mltrack.run_dir": str(run_dir.resolve()), "mltrack.host": socket.gethostname(),
        "mltrack.pid": str(os.getpid()), "mltrack.heartbeat": str(int(time.time())), **(extra_tags or {}),
    }
    if resume is not None:
        tags["mltrack.resumed_from"] = resume.uri
        if resume.fallback:
            tags["mltrack.resume_fallback"] = resume.fallback
    tracker = Tracker.start(
        cfg.tracking.experiment_name or cfg.data.dataset_name, run_dir.name, tags,
        resume_run_id=resume.run_id if same_run and resume is not None else None, parent_run_id=parent_run_id,
        spool_dir=run_dir / "spool", sender_process=sender_process_for(device),
    )
    return Session(cfg, run_dir, tracker, device, names, digest, resume, new_run=not same_run)


def sender_process_for(device: torch.device) -> bool:
    """Deliver to MLflow from a child process (mltrack._sender_process): on a GPU, where the training thread
    is launch-bound and must keep the GIL; env ``MLTRACK_SENDER_PROCESS=1``/``0`` forces it on or off."""
    forced = os.environ.get("MLTRACK_SENDER_PROCESS", "").strip().lower()
    if forced:
        return forced not in ("0", "false", "no")
    return device.type == "cuda"


class _NoTracker:
    """The tracker of a non-main process: the run is the main process's, so every call is a no-op."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_artifact(self, local_path: Path, artifact_path: str | None = None) -> None: ...
    def log_artifacts(self, local_dir: Path, artifact_path: str | None = None) -> None: ...
    def log_figure(self, fig: Any, artifact_file: str) -> None: ...
    def log_image_bytes(self, data: bytes, artifact_file: str) -> None: ...
    def finish(self, status: str = "FINISHED", reason: str | None = None, **_: Any) -> None: ...

    def metric_steps(self, key: str) -> set[int]:
        return set()

    def flush(self, timeout: float | None = None) -> bool:
        return True


def _build(cfg: RunConfig, device: torch.device, class_names: list[str]) -> Built:
    from mltrack.data.loaders import build_loaders
    from mltrack.models import build_model
    from mltrack.optim import build_optimizer, build_scheduler
    from mltrack.trainers import autocast_dtype, build_trainer

    seed_everything(cfg.training.seed, cfg.training.deterministic, cfg.training.tf32)
    log.info("Using fold: %d  device: %s  trainer: %s", cfg.data.fold, device, cfg.training.trainer_type)
    loaders = build_loaders(cfg.data, cfg.training.batch_size, cfg.training.seed, cfg.training.deterministic,
                            device.type, device=device, trainer_type=cfg.training.trainer_type,
                            channels_last=cfg.training.channels_last, train_dtype=autocast_dtype(cfg.training))
    log.info("Dataset sizes: %s  data cache: %s (%s)", loaders.sizes, loaders.cache, loaders.cache_reason)
    trainer = build_trainer(cfg.training, device)
    model = build_model(cfg.model, len(class_names), image_size=cfg.data.image_size)
    # The module: decay is skipped for biases and norms. Opacus' DPOptimizer drives a plain (unfused) one.
    optimizer = build_optimizer(cfg.optimizer, model, fused=cfg.training.trainer_type != "dp")
    model, optimizer, loader_map = trainer.prepare(
        model, optimizer, {"train": loaders.train, "val": loaders.val, "test": loaders.test})
    steps = max(1, -(-len(loader_map["train"]) // cfg.training.gradient_accumulation_steps))
    schedule = build_scheduler(cfg.scheduler, optimizer, cfg.training.num_epochs, steps, cfg.optimizer.lr,
                               mode=cfg.training.monitor_mode)
    weights = class_weights(cfg, loaders.datasets["train"].targets, len(class_names)).to(trainer.device)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.training.label_smoothing)
    from mltrack.data.mix import build_mixer

    ctx = FitContext(cfg, trainer.compile(model), optimizer, schedule, trainer, loader_map, loss_fn, class_names,
                     progress=_progress_factory(cfg), mixer=build_mixer(cfg.data, len(class_names)))
    return Built(ctx, loaders, trainer)


def _train_in_session(s: Session, built: Built, epoch_callback: Any) -> TrainResult:
    from mltrack.hooks import CheckpointHook, ConsoleHook, EpochIO, FiguresHook, TensorBoardHook, TrackingHook
    from mltrack.resume import install_weights

    cfg, tracker, ctx, trainer = s.cfg, s.tracker, built.ctx, built.trainer
    if trainer.is_main_process:
        _log_run_inputs(s, trainer, built.loaders.sizes)
    if s.resume is not None and trainer.is_main_process:
        uploaded = install_weights(s.resume, s.run_dir / "weights")
        if s.new_run:  # the new run must hold the weights its history refers to
            for name in uploaded:
                tracker.log_artifact(s.run_dir / "weights" / (name + checkpoint.MANIFEST_SUFFIX), "weights")
                tracker.log_artifact(s.run_dir / "weights" / name, "weights")
    if trainer.is_main_process:
        log.info("Starting Training (epochs %d..%d)", ctx.state.epoch, cfg.training.num_epochs - 1)
    meta = {"split_digest": s.split_digest, "dataset_fingerprint": s.split_digest, "mlflow_run_id": tracker.run_id}
    # One worker for the checkpoint write, metrics, figures and TensorBoard of each epoch, in that order, while
    # the next epoch trains (the hooks' order is the order of the jobs).
    io = EpochIO()
    ckpt_hook = CheckpointHook(s.run_dir / "weights", tracker, meta, io)
    tracking_hook = TrackingHook(tracker, io, checkpoints=ckpt_hook)
    hooks: list[Any] = [ckpt_hook, tracking_hook]
    tb_hook = TensorBoardHook(s.run_dir / "tensorboard", io) if cfg.tracking.tensorboard else None
    figures_hook = _figures_hook(cfg, tracker, tb_hook, io, trainer.device)
    hooks += [h for h in (figures_hook, tb_hook) if h is not None]
    hooks.append(ConsoleHook())
    if epoch_callback is not None:
        hooks.append(_CallbackHook(epoch_callback))
    try:
        try:
            fit(ctx, hooks)
        except Interrupted:
            io.drain()  # the finished epochs' checkpoints and metrics are queued before the stop's own
            ckpt_hook.on_interrupt(ctx)  # inside an epoch: a step-granular last.pt, uploaded before KILLED
            tracking_hook.on_interrupt(ctx)  # then the metrics of epochs whose checkpoint had been deferred
            if figures_hook is not None:
                figures_hook.on_interrupt(ctx)
            raise
        except StopTraining:  # an epoch callback ended the run at an epoch boundary (e.g. a pruned trial)
            ckpt_hook.on_fit_end(ctx)  # the state is consistent there: write a deferred checkpoint
            tracking_hook.on_fit_end(ctx)
            if figures_hook is not None:
                figures_hook.on_fit_end(ctx)
            io.close()
            raise
        io.close()  # a write error of the last epochs fails the run here; best.pt is complete after it
    except BaseException:
        # The queued jobs are checkpoints of finished epochs: let them end; an error of theirs is logged,
        # not raised, so the error that ends the run is the first one.
        io.close(quiet=True)
        raise
    finally:
        if figures_hook is not None:
            figures_hook.close()  # logs the figures the duty rule skipped, also when the run failed
    trainer.wait_for_everyone()  # best.pt is complete before every process loads it for the test evaluation
    from mltrack.report import finalize

    test_metrics = finalize(ctx, s.run_dir, tracker, built.loaders, resumed=s.resume is not None)
    trainer.end()
    return TrainResult(tracker.run_id, s.run_dir, ctx.state.best_epoch, ctx.state.best_metric, test_metrics)


def _figures_hook(cfg: RunConfig, tracker: Any, tb_hook: Any, io: Any, device: torch.device) -> Any:
    """The per-epoch confusion-matrix figures for MLflow and/or TensorBoard (None when neither wants them).

    Drawn with PIL on the epoch-IO worker under the figures' duty rule (``mltrack.figures``: 1/100 of the
    wall time training on a GPU, 1/10 on the CPU)."""
    from mltrack.figures import EpochFigures, mlflow_sink, tensorboard_sink
    from mltrack.hooks import FiguresHook

    sinks = []
    if cfg.tracking.confusion_every_epoch:
        sinks.append(mlflow_sink(tracker))
    if tb_hook is not None:
        sinks.append(tensorboard_sink(lambda: tb_hook.writer))
    if not sinks:
        return None
    return FiguresHook(EpochFigures(sinks, EpochFigures.duty_for(device.type)), io)


def class_weights(cfg: RunConfig, targets: list[int], n_classes: int) -> torch.Tensor:
    """Cross-entropy class weights: ones, inverse train frequency (mean 1), or the configured list."""
    spec = cfg.training.class_weights
    if spec == "none":
        return torch.ones(n_classes)
    if spec == "auto":
        counts = torch.bincount(torch.tensor(targets), minlength=n_classes).double().clamp(min=1)
        inv = counts.sum() / (n_classes * counts)  # a balanced set gives all ones
        return inv.float()
    if len(spec) != n_classes:
        raise UserError(f"training.class_weights has {len(spec)} values but the dataset has {n_classes} classes")
    return torch.tensor(spec, dtype=torch.float32)


class _CallbackHook:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def on_fit_start(self, ctx: FitContext) -> None:
        return None

    def on_epoch_end(self, ctx: FitContext) -> None:
        self.fn(ctx)

    def on_fit_end(self, ctx: FitContext) -> None:
        return None


def _progress_factory(cfg: RunConfig) -> Any:
    from mltrack.console import progress

    mode = cfg.tracking.progress
    if mode == "off":
        return None
    enabled = True if mode == "on" else None  # None: rich decides by TTY
    return lambda total, label: progress(total, label, enabled=enabled)


def _log_run_inputs(s: Session, trainer: Any, sizes: dict[str, int]) -> None:
    """Params, config, class map and split files: once per run (params are immutable on resume)."""
    from mltrack.config import flatten
    from mltrack.hooks import write_json

    cfg, tracker, run_dir = s.cfg, s.tracker, s.run_dir
    if s.new_run:
        params = {**flatten(cfg), **{f"data.size.{k}": v for k, v in sizes.items()}, **trainer.extra_params()}
        tracker.log_params(params)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        tracker.log_artifact(run_dir / "config.yaml")
        tracker.log_artifact(write_json(run_dir / "class_map.json",
                                        {str(i): n for i, n in enumerate(s.class_names)}))
        splits = Path(cfg.data.data_dir) / "splits"
        target = run_dir / "splits"
        target.mkdir(exist_ok=True)
        for name in (f"fold_{cfg.data.fold}_train.txt", f"fold_{cfg.data.fold}_val.txt", "test.txt"):
            shutil.copyfile(splits / name, target / name)
        tracker.log_artifacts(target, "splits")
        from mltrack.data.checks import check_dataset, write_report

        data_dir = Path(cfg.data.data_dir)  # stats only: prepare_data's check just refreshed the manifest
        report = check_dataset(data_dir / "raw", data_dir / "splits", cfg.data.max_image_pixels)
        tracker.log_params(report.params())
        write_report(report, run_dir / "data")
        tracker.log_artifacts(run_dir / "data", "data")
    if s.resume is not None and s.resume.drift and not s.new_run:
        n = s.resume.resume_count
        path = run_dir / "config" / f"resume_{n}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(to_yaml(cfg))
        tracker.log_artifact(path, "config")
        tracker.set_tags({"mltrack.param_drift": ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in s.resume.drift.items())[:4900],
                          "mltrack.resume_count": str(n)})


def _restore(ctx: FitContext, point: ResumePoint, generator: torch.Generator) -> None:
    """Model, optimizer, schedule, trainer (scaler / DP accountant), progress and every RNG, exactly."""
    state = point.state
    try:
        ctx.trainer.unwrap(ctx.model).load_state_dict(state["model"])  # strict, never strict=False
    except RuntimeError as err:
        raise CheckpointError(f"cannot resume from {point.uri}: its weights do not fit model "
                              f"'{ctx.cfg.model.architecture}' ({str(err).splitlines()[0][:300]})") from None
    ctx.optimizer.load_state_dict(state["optimizer"])
    ctx.schedule.load_state_dict(state["scheduler"])
    ctx.trainer.load_state_dict(state["trainer"])
    ctx.state = FitState.from_dict(state["progress"])
    checkpoint.set_rng_state(state["rng"], generator)
    where = f", batch {ctx.state.batch}" if ctx.state.batch else ""
    log.info("Resumed from %s at epoch %d%s (global step %d)", point.uri, ctx.state.epoch, where,
             ctx.state.global_step)


# ---------------------------------------------------------------- signals


def _install_signal_handlers() -> dict[int, Any]:
    """SIGTERM/SIGINT ask the loop to stop after the current optimizer step; a second one forces it."""
    from mltrack.trainers import loop

    previous: dict[int, Any] = {}

    def request_stop(signum: int, _frame: Any) -> None:
        if loop.STOP_REQUESTED:  # asked twice: the user does not want to wait for the step to finish
            raise KeyboardInterrupt
        loop.STOP_REQUESTED = signal.Signals(signum).name

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, request_stop)
        except ValueError:  # not the main thread (e.g. an Optuna worker thread): leave signals alone
            pass
    return previous


def _restore_signal_handlers(previous: dict[int, Any]) -> None:
    from mltrack.trainers import loop

    loop.STOP_REQUESTED = None
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def print_final(result: TrainResult, out: Any = None) -> None:
    """The closing block of a training run: where it is and how to look at it."""
    out = out if out is not None else sys.stdout  # resolved per call: CliRunner swaps sys.stdout
    acc = result.test_metrics.get("test/acc")
    lines = [
        "",
        f"run id:        {result.run_id}",
        f"test accuracy: {acc:.4f}" if acc is not None else "test accuracy: n/a",
        f"run folder:    {result.run_dir}",
        "compare runs:  mlflow ui --backend-store-uri " + _ui_uri(),
        f"tensorboard:   tensorboard --logdir {result.run_dir.parent}",
    ]
    print("\n".join(lines), file=out, flush=True)


def _ui_uri() -> str:
    from mltrack.tracking import tracking_uri

    return tracking_uri()
