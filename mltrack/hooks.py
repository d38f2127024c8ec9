"""Side effects of an epoch: checkpoints, MLflow, TensorBoard, console. The loop knows none of them.

Order matters and is fixed in ``run.py``: checkpoint (write + queue upload) -> MLflow metrics ->
commit tag -> confusion-matrix figures -> TensorBoard -> console. The checkpoint, MLflow, figure and
TensorBoard work of an epoch runs as jobs on one :class:`EpochIO` worker thread, in that order, while the
next epoch trains; what each job needs is captured on the training thread at the end of the epoch (the
checkpoint as a CPU snapshot, whose host copies may still be in flight on a side stream: the job waits for
them).
The worker and the tracker's own sender are both FIFO, so the server never holds metrics for a step
whose checkpoint upload was not queued before them (RELIABILITY rule 4), and a resume re-logs only
steps that were not committed.
"""
from __future__ import annotations

import json
import math
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from mltrack import checkpoint
from mltrack.config import config_hash, to_dict
from mltrack.console import get_logger, success
from mltrack.epoch_io import EpochIO, faults_on
from mltrack.snapshot import Snapshot, start_snapshot
from mltrack.errors import CheckpointError
from mltrack.figures import EpochFigures
from mltrack.trainers.loop import FitContext, fault

__all__ = ["CheckpointHook", "ConsoleHook", "EpochIO", "FiguresHook", "Heartbeat", "Hook", "TensorBoardHook",
           "TrackingHook"]

log = get_logger()


class Hook:
    def on_fit_start(self, ctx: FitContext) -> None:
        return None

    def on_epoch_end(self, ctx: FitContext) -> None:
        return None

    def on_fit_end(self, ctx: FitContext) -> None:
        return None


def checkpoint_state(ctx: FitContext, meta: dict[str, Any]) -> dict[str, Any]:
    """The full resumable state as plain data (DESIGN §5)."""
    generator = getattr(ctx.loaders.get("train"), "generator", None)
    return {
        "schema": checkpoint.SCHEMA,
        "model": ctx.trainer.unwrap(ctx.model).state_dict(),
        "optimizer": ctx.optimizer.state_dict(),
        "scheduler": ctx.schedule.state_dict(),
        "trainer": ctx.trainer.state_dict(),
        "progress": ctx.state.state_dict(),
        "rng": checkpoint.rng_state(generator),
        "config": to_dict(ctx.cfg),
        "config_hash": config_hash(ctx.cfg),
        "class_map": list(ctx.class_names),
        **meta,
    }


class _EpochCheckpoint:
    """One checkpoint job's payload. While the job waits behind the running one (``started`` False), a newer
    improving epoch may take its place (``CheckpointHook`` docstring); the worker reads it when it starts."""

    __slots__ = ("snap", "improved", "epoch", "started")

    def __init__(self, snap: Snapshot, improved: bool, epoch: int) -> None:
        self.snap, self.improved, self.epoch, self.started = snap, improved, epoch, False


class CheckpointHook(Hook):
    """Writes ``weights/last.pt`` every epoch and ``best.pt`` on improvement, then queues their upload.

    Before ``last.pt`` is replaced, the previous one becomes ``prev.pt`` (a verified hard-link copy), so
    that a ``last.pt`` damaged in the artifact store still leaves a verified checkpoint one epoch older
    (``--fallback-previous``). Uploads are queued best, prev, last: the store never holds a ``last.pt``
    whose best epoch's ``best.pt`` is not there yet. Each file's manifest goes first and lists the new
    digest *and* the one the store holds, so a process killed between the two uploads leaves a pair that
    still verifies (the same protocol as ``checkpoint.save``, across the network).

    At the end of an epoch only a CPU snapshot of the state is started on the training thread (device
    clones, then host copies on a side stream: ``snapshot.start_snapshot``, synchronous under inline IO);
    waiting for it, rotation, write, ``best.pt`` link and upload queueing run as one job on ``io`` while
    the next epoch trains.
    ``rotated``, ``last_digest`` and ``stored`` belong to that job (one worker, FIFO): the training
    thread reads them only after ``io.drain()``.

    Epochs shorter than a checkpoint write (small data from a GPU cache: 0.1 s epochs, 0.4 s writes) must
    not wait for the disk: when the worker already has a checkpoint queued behind the one it writes, an
    epoch that did not improve is *deferred* (not written; the next written checkpoint supersedes it).
    The last epoch (``on_fit_end``) and the state at a stop (``on_interrupt``) are always written.
    When both IO slots are taken and the second one is a checkpoint job that has not started, an improving
    epoch *supersedes* it: that job writes the newer state instead (its ``best.pt`` then holds the better
    weights), so a run of improving epochs shorter than a write never waits for the disk; before, each such
    epoch waited for a slot (tens to hundreds of milliseconds on the training thread). The superseded
    epoch's metrics, queued behind that job, still go out after a checkpoint at or after their step
    (RELIABILITY rule 4). ``deferred`` tells the tracking hook to hold the epoch's metrics back until a
    checkpoint at or after it is queued (same rule).

    The duty rule: while less than ``DUTY`` x the last write's duration has passed since the last checkpoint
    was queued, a non-improving epoch is deferred, and an improving one is *held*: its state is copied to
    the host (the snapshot, as for a write) and kept, replacing an older held one, until the rule lets a
    checkpoint be queued; then the held state is written (``best.pt`` and ``last.pt`` of its epoch) unless
    that epoch improves too (its own, newer, state is written). The final state and a stop write a held
    state first. So the writer runs at most ~1/DUTY of the time, whether epochs improve or not, and its
    Python work (pickling, the tracker's inserts) competes with the training thread for the GIL only that
    much. Measured on an H100 host (resnet18, 0.54 s epochs, ~0.3 s writes): with the writer busy 1/4 of
    the time, checkpoints cost +2.0 % epoch time and checkpoints plus MLflow +2.7 %; the issue's budget for
    tracking is 1 %, hence 1/10. On hymenoptera-size CUDA-graph epochs (0.04 s) the improving epochs of
    the start, written back to back, kept the writer busy most of a timed window and made the median
    epoch 0.054 s instead of 0.038 s (``bench/results_pipeline_tracking_hymen_h100``, before this rule).
    What a crash can lose stays small: at most ~DUTY x one write (~3 s there), for ``best.pt`` as for
    ``last.pt``. With epochs longer than that (the usual case), writes shorter than ``DUTY_MIN_WRITE_S``
    (small models) and under synchronous IO (fault injection, ``MLTRACK_SYNC_EPOCH_IO``) every epoch is
    written. ``queued`` counts the checkpoints queued, ``superseded`` the queued ones a newer epoch replaced
    and ``held`` the improving epochs held (for benchmarks and tests).
    """

    DUTY = 10.0
    DUTY_MIN_WRITE_S = 0.1

    def __init__(self, weights_dir: Path, tracker: Any, meta: dict[str, Any], io: EpochIO | None = None) -> None:
        self.weights_dir = weights_dir
        self.tracker = tracker
        self.meta = meta  # split_digest, dataset fingerprint, mlflow_run_id
        self.io = io if io is not None else EpochIO(inline=True)
        self.rotated = False  # whether the last write kept the previous last.pt as prev.pt
        self.last_digest: str | None = None  # sha256 of the last.pt this process wrote (None: verify it)
        self.stored: dict[str, str] = {}  # file name -> digest the artifact store holds (or is about to)
        self.deferred = False  # the latest finished epoch's checkpoint was not written (see the class docstring)
        self.queued = 0
        self.superseded = 0
        self.held = 0
        self._held: _EpochCheckpoint | None = None  # an improving epoch's state the duty rule put off
        self._waiting: _EpochCheckpoint | None = None  # the last job queued, until the worker starts it
        self._lock = threading.Lock()  # guards _waiting and its ``started`` between the two threads
        self.write_s = 0.0  # duration of the last checkpoint job (worker thread)
        self.queued_at = -math.inf  # when the last checkpoint was queued (training thread)

    def on_fit_start(self, ctx: FitContext) -> None:
        removed = checkpoint.clean_stale_tmp(self.weights_dir)
        if removed:
            log.warning("removed %d temp file(s) left by an interrupted checkpoint write: %s", len(removed),
                        ", ".join(p.name for p in removed))
        for name in ("best.pt", "prev.pt", "last.pt"):  # after a resume: the lineage the store holds
            digests = checkpoint.manifest_digests(self.weights_dir / name)
            if digests:
                self.stored[name] = digests[0]

    def on_epoch_end(self, ctx: FitContext) -> None:
        if not ctx.trainer.is_main_process:
            return
        improved = ctx.last is not None and ctx.last.improved
        recent = (not self.io.inline and self.write_s >= self.DUTY_MIN_WRITE_S
                  and time.monotonic() - self.queued_at < self.DUTY * self.write_s)
        full = not self.io.slot_free()
        if improved and full and self._supersede(ctx):
            self._held, self.deferred = None, False  # the queued job now holds a newer, better state
            return
        if improved and recent and not full:  # not full: with the running write, two states at most
            self._hold(ctx)
            return
        self.deferred = not improved and (recent or full)
        if self.deferred:
            return
        held, self._held = self._held, None
        if improved or held is None:  # an improving epoch's own state is newer and better than a held one
            self._submit(ctx, improved)
            return
        self._queue(held)  # the best state goes out; this epoch's waits for the next write (metrics too)
        self.deferred = True

    def on_fit_end(self, ctx: FitContext) -> None:
        if not ctx.trainer.is_main_process:
            return
        held, self._held = self._held, None
        if held is not None:
            self._queue(held)
            self.deferred = self.deferred and held.epoch != ctx.state.epoch - 1  # unless it is the final state
        if self.deferred:  # the final state is always written
            self._submit(ctx, improved=False)
            self.deferred = False

    def _hold(self, ctx: FitContext) -> None:
        """Keep this improving epoch's state until the duty rule lets it be written (class docstring)."""
        self._held = None  # an older held state's host copy goes first
        self._held = _EpochCheckpoint(self._snapshot(ctx), True, ctx.state.epoch - 1)
        self.held += 1
        self.deferred = True

    def _submit(self, ctx: FitContext, improved: bool) -> None:
        self.io.wait_for_slot()  # before the copy: at most two states in flight (see EpochIO)
        self._queue(_EpochCheckpoint(self._snapshot(ctx), improved, ctx.state.epoch - 1))

    def _queue(self, job: _EpochCheckpoint) -> None:
        """Queue ``job`` on ``io`` once a slot is free (``_submit`` waited already, before its copy)."""
        self.io.wait_for_slot()
        self.queued_at = time.monotonic()
        with self._lock:
            self._waiting = job
        self.queued += 1
        self.io.submit(self._epoch_job, job, bounded=True)

    def _supersede(self, ctx: FitContext) -> bool:
        """Put this (improving) epoch's state into the queued job that has not started; False if there is none."""
        with self._lock:  # the worker cannot start the job meanwhile
            job = self._waiting
            if job is None or job.started:
                return False
            job.snap = None  # type: ignore[assignment]  # its host copy goes first: still two states at most
            job.snap = self._snapshot(ctx)
            job.improved, job.epoch = True, ctx.state.epoch - 1
        self.queued_at = time.monotonic()
        self.superseded += 1
        return True

    def _snapshot(self, ctx: FitContext) -> Snapshot:
        # Inline IO (fault injection, MLTRACK_SYNC_EPOCH_IO) keeps the copy synchronous: the state is complete
        # where the epoch ends, as crash points and debugging expect.
        return start_snapshot(checkpoint_state(ctx, self.meta), background=not self.io.inline)

    def _epoch_job(self, job: _EpochCheckpoint) -> None:
        with self._lock:  # from here on the job is this worker's: no newer epoch replaces it
            job.started = True
            if self._waiting is job:
                self._waiting = None
        snap, improved, epoch = job.snap, job.improved, job.epoch
        if snap is None:  # the superseding copy failed on the training thread, which raised it: the run ends
            return
        start = time.monotonic()
        state = snap.wait()  # outside _checkpoint_errors: a CUDA error surfacing here is not the disk's
        with _checkpoint_errors(f"epoch {epoch}", self.weights_dir):
            self._write(state, improved)
        fault("after_ckpt_write", epoch)
        with _checkpoint_errors(f"epoch {epoch}", self.weights_dir):
            self._upload(improved)
        self.write_s = time.monotonic() - start  # read by the training thread: a float, written whole
        if faults_on():
            self.tracker.flush()
        fault("after_ckpt_upload", epoch)

    def on_interrupt(self, ctx: FitContext) -> None:
        """A stop inside an epoch: write (and queue) a step-granular ``last.pt``, synchronously, after the
        queued epoch jobs. Between epochs the epoch's own checkpoint is already the latest state, so
        nothing is written - unless that epoch's checkpoint was deferred."""
        self.io.drain()  # the previous epoch's write must not race this one (rotation reads last.pt)
        held, self._held = self._held, None
        if ctx.trainer.is_main_process and held is not None:  # the best state first (class docstring)
            with _checkpoint_errors(f"epoch {held.epoch}", self.weights_dir):
                self._write(held.snap.wait(), improved=True)
                self._upload(improved=True)
            self.deferred = self.deferred and held.epoch != ctx.state.epoch - 1
        if ctx.trainer.is_main_process and (ctx.state.batch > 0 or self.deferred):
            self.deferred = False
            where = f"epoch {ctx.state.epoch}, batch {ctx.state.batch}"
            with _checkpoint_errors(where, self.weights_dir):
                self._write(checkpoint_state(ctx, self.meta), improved=False)
                self._upload(improved=False)
            log.info("checkpoint saved at %s (global step %d)", where, ctx.state.global_step)

    def _write(self, state: dict[str, Any], improved: bool) -> None:
        last = self.weights_dir / "last.pt"
        self.rotated = False
        if last.is_file():
            try:
                checkpoint.copy_verified(last, self.weights_dir / "prev.pt", self.last_digest)
                self.rotated = True
            except CheckpointError as err:  # keep the older prev.pt rather than a copy that does not verify
                log.warning("not keeping %s as prev.pt: %s", last, err)
        # One serialisation, one fsync and one hash per epoch: prev.pt and best.pt are hard links to it.
        self.last_digest = checkpoint.save(state, last)
        if improved:
            checkpoint.copy_verified(last, self.weights_dir / "best.pt", self.last_digest)

    def _upload(self, improved: bool) -> None:
        if self.tracker is None:
            return
        names = (["best.pt"] if improved else []) + (["prev.pt"] if self.rotated else []) + ["last.pt"]
        for name in names:
            digest = checkpoint.manifest_digests(self.weights_dir / name)[0]
            accepted = [digest] + [d for d in [self.stored.get(name)] if d is not None and d != digest]
            self.tracker.log_artifact(self._upload_manifest(name, accepted), "weights")
            self.tracker.log_artifact(self.weights_dir / name, "weights")
            self.stored[name] = digest

    def _upload_manifest(self, name: str, digests: list[str]) -> Path:
        """``.upload/<name>.sha256`` listing ``digests``; a new file each time (os.replace), because the
        tracker hard-links what it is asked to upload and an in-place rewrite would change a queued upload."""
        path = self.weights_dir / ".upload" / (name + checkpoint.MANIFEST_SUFFIX)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(path.name + checkpoint.TMP_SUFFIX)
        tmp.write_text("".join(f"{d}  {name}\n" for d in digests))
        os.replace(tmp, path)
        return path


@contextmanager
def _checkpoint_errors(where: str, weights_dir: Path) -> Iterator[None]:
    """Any failure to write or queue a checkpoint (disk full, permissions, a vanished folder) as one
    CheckpointError naming the epoch and the folder: the CLI prints it without a traceback."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - OSError, or torch.save's RuntimeError around one
        raise CheckpointError(f"cannot write the checkpoint of {where} in {weights_dir} (check its free space "
                              f"and permissions): "
                              f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}") from err


class TrackingHook(Hook):
    """Per-epoch metrics (step = epoch), stepped confusion-matrix images and the commit tag.

    A metric step already in the run (logged by an attempt that crashed after logging it, or by the run
    a ``--fallback-previous`` resume went back from) is never logged again: one value per (key, step).
    An epoch's logging is a job on ``io``, queued after that epoch's checkpoint job.
    """

    def __init__(self, tracker: Any, io: EpochIO | None = None, checkpoints: CheckpointHook | None = None) -> None:
        self.tracker = tracker
        self.io = io if io is not None else EpochIO(inline=True)
        self.checkpoints = checkpoints  # whose ``deferred`` holds an epoch's metrics back
        self.logged: set[int] = set()
        self.held: list[tuple[int, dict[str, float]]] = []  # epochs without a checkpoint yet

    def on_fit_start(self, ctx: FitContext) -> None:
        if not ctx.trainer.is_main_process:
            return
        # Resume: epochs finished before the crash whose metrics never reached the server are sent now,
        # exactly once (the checkpoint carries their values).
        self.logged = set(self.tracker.metric_steps("train/loss"))
        for row in ctx.state.history:
            step = int(row["epoch"])
            if step not in self.logged:
                self.tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=step)
                self.logged.add(step)

    def on_epoch_end(self, ctx: FitContext) -> None:
        if not ctx.trainer.is_main_process or ctx.last is None:
            return
        self.held.append((ctx.state.epoch - 1, dict(ctx.last.metrics)))
        if self.checkpoints is None or not self.checkpoints.deferred:
            self._release(ctx)

    def on_fit_end(self, ctx: FitContext) -> None:
        if ctx.trainer.is_main_process and self.held:  # the checkpoint hook wrote the deferred state
            self._release(ctx)

    def on_interrupt(self, ctx: FitContext) -> None:
        """After the checkpoint hook's ``on_interrupt`` wrote the state: send what was held back."""
        if ctx.trainer.is_main_process and self.held:
            self._release(ctx)

    def _release(self, ctx: FitContext) -> None:
        held, self.held = self.held, []
        for step, metrics in held:
            self.io.submit(self._epoch_job, step, metrics)

    def _epoch_job(self, step: int, metrics: dict[str, float]) -> None:
        if step in self.logged:
            log.info("metrics of epoch %d are already in the run (an earlier attempt logged them); "
                     "not logging them twice", step)
        else:
            self.tracker.log_metrics(metrics, step=step)
            self.logged.add(step)
        if faults_on():
            self.tracker.flush()
        fault("after_metrics_log", step)
        self.tracker.set_tags({"mltrack.committed_step": str(step)})
        if faults_on():
            self.tracker.flush()
        fault("after_commit", step)


class TensorBoardHook(Hook):
    """Scalars under ``<run_dir>/tensorboard`` for ``tensorboard --logdir runs/`` (the confusion-matrix
    images come through :class:`FiguresHook`). Each epoch's writing and the final close are jobs on ``io``."""

    def __init__(self, log_dir: Path, io: EpochIO | None = None) -> None:
        self.log_dir = log_dir
        self.io = io if io is not None else EpochIO(inline=True)
        self.writer: Any = None

    def on_fit_start(self, ctx: FitContext) -> None:
        if ctx.trainer.is_main_process:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.log_dir), purge_step=ctx.state.epoch)

    def on_epoch_end(self, ctx: FitContext) -> None:
        if self.writer is None or ctx.last is None:
            return
        self.io.submit(self._epoch_job, ctx.state.epoch - 1, dict(ctx.last.metrics))

    def _epoch_job(self, step: int, metrics: dict[str, float]) -> None:
        # One summary holding every scalar of the epoch, not one add_scalar (summary, event, queue item) per key:
        # 0.3 against 1.5 ms per epoch for 30 scalars, nearly all of it under the GIL (bench/probe_save_gil.py,
        # 2-core CPU machine). TensorBoard reads them the same.
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=key, simple_value=float(value)) for key, value in metrics.items()]
        self.writer._get_file_writer().add_summary(Summary(value=values), step)
        self.writer.flush()

    def on_fit_end(self, ctx: FitContext) -> None:
        if self.writer is not None:
            self.io.submit(self.writer.close)  # after this hook's queued epochs


class FiguresHook(Hook):
    """Each epoch's validation confusion matrix as one figure for MLflow (``tracking.confusion_every_epoch``)
    and TensorBoard (``tracking.tensorboard``), drawn by :class:`mltrack.figures.EpochFigures` on the ``io``
    worker. The matrix is handed over at the epoch end; jobs on ``io`` render and deliver the figures.
    Placed before the TensorBoard hook, so that the last figures are delivered before its writer closes;
    :meth:`close` (always, in ``run.py``) logs how many figures the duty rule skipped."""

    def __init__(self, figures: EpochFigures, io: EpochIO | None = None) -> None:
        self.figures = figures
        self.io = io if io is not None else EpochIO(inline=True)

    def on_epoch_end(self, ctx: FitContext) -> None:
        if not ctx.trainer.is_main_process or ctx.last is None:
            return
        self.figures.offer(ctx.state.epoch - 1, ctx.last.val_cm.tolist(), list(ctx.class_names))
        self.io.submit(self.figures.deliver)

    def on_fit_end(self, ctx: FitContext) -> None:
        if ctx.trainer.is_main_process:
            self.figures.finish()  # the last epoch's figure, if the duty rule skipped it
            self.io.submit(self.figures.deliver)

    on_interrupt = on_fit_end  # a stopped run still gets the figures of its finished epochs

    def close(self) -> None:
        self.figures.close()


class ConsoleHook(Hook):
    """The guide's console lines: ``Epoch k/N``, ``train Loss … Acc …``, ``New best model saved!``."""

    def on_epoch_end(self, ctx: FitContext) -> None:
        if not ctx.trainer.is_main_process or ctx.last is None:
            return
        m, step = ctx.last.metrics, ctx.state.epoch - 1
        log.info("Epoch %d/%d", step, ctx.cfg.training.num_epochs - 1)
        log.info("train Loss: %.4f Acc: %.4f  (%.0f img/s)", m["train/loss"], m["train/acc"], m["train/img_per_s"])
        log.info("val Loss: %.4f Acc: %.4f F1: %.4f", m["val/loss"], m["val/acc"], m["val/f1_macro"])
        if "dp/epsilon" in m:
            log.info("dp epsilon: %.3f", m["dp/epsilon"])
        if ctx.last.improved:
            success(f"New best model saved! {ctx.cfg.training.monitor}: {m[ctx.cfg.training.monitor]:.4f}")
        if ctx.cfg.training.early_stopping.patience is not None and \
                ctx.state.bad_epochs >= ctx.cfg.training.early_stopping.patience:
            log.info("Early stopping: no improvement of %s for %d epochs", ctx.cfg.training.monitor,
                     ctx.state.bad_epochs)


class Heartbeat:
    """Sets tag ``mltrack.heartbeat`` (unix seconds) every ``interval_s`` from a daemon thread while a run
    trains, however long an epoch is; ``mltrack reconcile`` reads it to find runs whose process died
    (kill -9, lost machine) and are still RUNNING. Tags are queued, so an outage only delays them."""

    def __init__(self, tracker: Any, interval_s: float) -> None:
        self.tracker = tracker
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="mltrack-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tracker.set_tags({"mltrack.heartbeat": str(int(time.time()))})
            except RuntimeError:  # the tracker finished meanwhile
                return

    def stop(self) -> None:
        """Stop beating (before the run's final status is sent); returns once the thread has ended."""
        self._stop.set()
        self._thread.join()


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
    return path


def cpu_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}
