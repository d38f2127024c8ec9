"""Side effects of an epoch: checkpoints, MLflow, TensorBoard, console. The loop knows none of them.

Order matters and is fixed in ``run.py``: checkpoint (write + queue upload) -> MLflow metrics ->
commit tag -> TensorBoard -> console. The tracker sends its queue in FIFO order, so the server
never holds metrics for a step whose checkpoint is not uploaded (RELIABILITY rule 4), and a resume
re-logs only steps that were not committed.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

from mltrack import checkpoint
from mltrack.config import config_hash, to_dict
from mltrack.console import get_logger, success
from mltrack.errors import CheckpointError
from mltrack.trainers.loop import FitContext, fault

log = get_logger()


def _faults_on() -> bool:
    # Under fault injection the queue is flushed at each crash point so "after upload" means uploaded.
    return "MLTRACK_FAULT_AT" in os.environ


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


class CheckpointHook(Hook):
    """Writes ``weights/last.pt`` every epoch and ``best.pt`` on improvement, then queues their upload.

    Before ``last.pt`` is replaced, the previous one becomes ``prev.pt`` (a verified hard-link copy), so
    that a ``last.pt`` damaged in the artifact store still leaves a verified checkpoint one epoch older
    (``--fallback-previous``). Uploads are queued best, prev, last: the store never holds a ``last.pt``
    whose best epoch's ``best.pt`` is not there yet. Each file's manifest goes first and lists the new
    digest *and* the one the store holds, so a process killed between the two uploads leaves a pair that
    still verifies (the same protocol as ``checkpoint.save``, across the network).
    """

    def __init__(self, weights_dir: Path, tracker: Any, meta: dict[str, Any]) -> None:
        self.weights_dir = weights_dir
        self.tracker = tracker
        self.meta = meta  # split_digest, dataset fingerprint, mlflow_run_id
        self.rotated = False  # whether the last write kept the previous last.pt as prev.pt
        self.last_digest: str | None = None  # sha256 of the last.pt this process wrote (None: verify it)
        self.stored: dict[str, str] = {}  # file name -> digest the artifact store holds (or is about to)

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
        self._write(ctx, improved)
        fault("after_ckpt_write", ctx.state.epoch - 1)
        self._upload(improved)
        if _faults_on():
            self.tracker.flush()
        fault("after_ckpt_upload", ctx.state.epoch - 1)

    def on_interrupt(self, ctx: FitContext) -> None:
        """A stop inside an epoch: write (and queue) a step-granular ``last.pt``. Between epochs the
        epoch's own checkpoint is already the latest state, so nothing is written."""
        if ctx.trainer.is_main_process and ctx.state.batch > 0:
            self._write(ctx, improved=False)
            self._upload(improved=False)
            log.info("checkpoint saved at epoch %d, batch %d (global step %d)", ctx.state.epoch, ctx.state.batch,
                     ctx.state.global_step)

    def _write(self, ctx: FitContext, improved: bool) -> None:
        state = checkpoint_state(ctx, self.meta)
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


class TrackingHook(Hook):
    """Per-epoch metrics (step = epoch), stepped confusion-matrix images and the commit tag.

    A metric step already in the run (logged by an attempt that crashed after logging it, or by the run
    a ``--fallback-previous`` resume went back from) is never logged again: one value per (key, step).
    """

    def __init__(self, tracker: Any, confusion_every_epoch: bool) -> None:
        self.tracker = tracker
        self.confusion_every_epoch = confusion_every_epoch
        self.logged: set[int] = set()

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
        step = ctx.state.epoch - 1
        if step in self.logged:
            log.info("metrics of epoch %d are already in the run (an earlier attempt logged them); "
                     "not logging them twice", step)
        else:
            self.tracker.log_metrics(ctx.last.metrics, step=step)
            self.logged.add(step)
        if _faults_on():
            self.tracker.flush()
        fault("after_metrics_log", step)
        if self.confusion_every_epoch:
            from mltrack.metrics import confusion_matrix_figure

            fig = confusion_matrix_figure(ctx.last.val_cm, ctx.class_names, f"val, epoch {step}")
            self.tracker.log_figure(fig, f"plots/epochs/confusion_matrix_val_{step:04d}.png")
        self.tracker.set_tags({"mltrack.committed_step": str(step)})
        if _faults_on():
            self.tracker.flush()
        fault("after_commit", step)


class TensorBoardHook(Hook):
    """Scalars and confusion matrices under ``<run_dir>/tensorboard`` for ``tensorboard --logdir runs/``."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.writer: Any = None

    def on_fit_start(self, ctx: FitContext) -> None:
        if ctx.trainer.is_main_process:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.log_dir), purge_step=ctx.state.epoch)

    def on_epoch_end(self, ctx: FitContext) -> None:
        if self.writer is None or ctx.last is None:
            return
        step = ctx.state.epoch - 1
        for key, value in ctx.last.metrics.items():
            self.writer.add_scalar(key, value, step)
        from mltrack.metrics import confusion_matrix_figure

        self.writer.add_figure("confusion_matrix/val", confusion_matrix_figure(
            ctx.last.val_cm, ctx.class_names, f"val, epoch {step}"), step)
        self.writer.flush()

    def on_fit_end(self, ctx: FitContext) -> None:
        if self.writer is not None:
            self.writer.close()


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
