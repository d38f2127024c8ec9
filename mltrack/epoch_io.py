"""``EpochIO``: one worker thread that runs the side effects of each epoch (checkpoint write and upload,
metrics, TensorBoard) in submission order while the next epoch trains. Used by ``mltrack.hooks``."""
from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Callable

from mltrack.console import get_logger

log = get_logger()


def faults_on() -> bool:
    # Under fault injection the queue is flushed at each crash point so "after upload" means uploaded.
    return "MLTRACK_FAULT_AT" in os.environ


def _sync_epoch_io() -> bool:
    return os.environ.get("MLTRACK_SYNC_EPOCH_IO", "").strip().lower() not in ("", "0", "false", "no")


class EpochIO:
    """One worker thread that runs the side effects of each epoch in submission order (FIFO).

    ``submit(fn, *args)`` queues a job and returns at once; it first re-raises the error of a job that
    failed since (a write error surfaces at the next epoch end, or at ``drain``). A failed job cancels
    every job after it: they may depend on it (the metrics and commit tag of a step must never reach
    the server when that step's checkpoint upload was not queued, RELIABILITY rule 4).

    ``bounded=True`` marks a job that holds a full copy of the training state (a checkpoint): at most
    one such job waits besides the one running, so a slow disk cannot pile up CPU copies of the state;
    :meth:`wait_for_slot` blocks until another may be queued, and is meant to be called *before* the
    copy is made (one producer: the training thread).

    ``inline=True`` runs every job synchronously in ``submit`` (errors raise there, as before). It is
    the default under fault injection (``MLTRACK_FAULT_AT``: crash points must fire at their exact
    place in the epoch) and when env ``MLTRACK_SYNC_EPOCH_IO=1`` is set (debugging: a side effect's
    error and time show up where the epoch ends).
    """

    MAX_WAITING_BOUNDED = 1

    def __init__(self, inline: bool | None = None) -> None:
        self.inline = (faults_on() or _sync_epoch_io()) if inline is None else inline
        self._executor: ThreadPoolExecutor | None = None
        if not self.inline:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mltrack-epoch-io")
        self._pending: list[Future[None]] = []
        self._slots = threading.BoundedSemaphore(1 + self.MAX_WAITING_BOUNDED)
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._reported = False  # the error was raised to the caller already
        self._closed = False

    def submit(self, fn: Callable[..., Any], *args: Any, bounded: bool = False) -> None:
        """Queue ``fn(*args)`` after every job submitted before it (inline: run it now)."""
        self._raise_error()
        if self._closed:
            raise RuntimeError("EpochIO is closed")
        if self._executor is None:
            fn(*args)
            return
        if bounded:
            self._slots.acquire()
        try:
            self._raise_error()  # the job we waited behind may have failed meanwhile
            future = self._executor.submit(self._run, fn, args, bounded)
        except BaseException:
            if bounded:
                self._slots.release()
            raise
        self._pending = [f for f in self._pending if not f.done()] + [future]

    def slot_free(self) -> bool:
        """Whether a ``bounded`` job could be queued now without waiting (always, inline)."""
        if self._executor is None:
            return True
        if not self._slots.acquire(blocking=False):
            return False
        self._slots.release()
        return True

    def wait_for_slot(self) -> None:
        """Block until a ``bounded`` job may be queued without waiting (then make the copy, then submit)."""
        if self._executor is not None:
            self._slots.acquire()
            self._slots.release()

    def drain(self) -> None:
        """Wait for every queued job; re-raise the first error of a job (once)."""
        pending, self._pending = self._pending, []
        wait(pending)
        self._raise_error()

    def close(self, quiet: bool = False) -> None:
        """Wait for the queued jobs (they write checkpoints of finished epochs) and stop the worker.

        An error of a job that was not raised yet raises here, unless ``quiet``: then it is logged, so
        that an error already propagating (the reason the run is ending) is not masked by a second one.
        """
        if self._closed:
            return
        try:
            self.drain()
        except BaseException as err:  # noqa: BLE001 - a job's error, reported as asked
            if not quiet:
                raise
            log.error("a background epoch job also failed (not raised, an earlier error ends the run): %s", err)
        finally:
            self._closed = True
            if self._executor is not None:
                self._executor.shutdown(wait=True)

    @property
    def failed(self) -> bool:
        """Whether a job failed (its error is raised by the next submit/drain, or was raised already)."""
        return self._error is not None

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...], bounded: bool) -> None:
        try:
            if self._error is None:  # after a failure the rest is dropped (see the class docstring)
                fn(*args)
        except BaseException as err:  # noqa: BLE001 - handed to the training thread, never lost
            with self._lock:
                if self._error is None:
                    self._error = err
        finally:
            if bounded:
                self._slots.release()

    def _raise_error(self) -> None:
        with self._lock:
            err = self._error if not self._reported else None
            if err is not None:
                self._reported = True
        if err is not None:
            raise err
