"""The tracking sender in a child process, so that MLflow's client work does not take the training GIL.

``mltrack.tracking._Sender`` turns a batch of queued operations into MlflowClient calls. Run on the tracker's
worker thread, its Python work (SQLAlchemy for a sqlite store, HTTP for a server, the artifact copies'
bookkeeping; ~8 ms of CPU per epoch's ``log_batch`` on a 2-core machine, bench/probe_log_batch.py) competes
for the GIL with the thread that launches the GPU work: on launch-bound epochs (small data from a GPU cache,
tens of milliseconds each) that is a visible share of the epoch. :class:`ProcessSender` is a drop-in ``send``
for ``mltrack._spool.Delivery`` that writes each batch as one JSON line to a child process
(``python -m mltrack._sender_process``) running ``_Sender`` and reads its one-line answer; the worker thread
then only blocks on the pipe (GIL released).

A plain subprocess, not ``multiprocessing``: spawning would re-import the user's main script in the child
(a script without a ``__main__`` guard would run again), and the operations are JSON already (they are what
the spool file holds). The child runs in its own session, so a Ctrl-C in the terminal reaches only the
trainer, which checkpoints and then sends the run's final status through this child; it exits when its
stdin closes: at :meth:`ProcessSender.close`, or when the trainer dies.

Failures keep ``Delivery``'s contract: an error raised by the child's ``_Sender`` comes back as
:class:`RemoteSendError` with the child's verdict on whether a retry could ever succeed; a child that died
is a retryable ``ConnectionError``, so ``Delivery`` spools and retries, and the next call starts a new child.
A child that cannot start at all (an environment where ``python -m mltrack._sender_process`` fails) must not
leave the run without its metrics: the sender says so once and sends from this process from then on.
"""
from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any, Callable

Op = dict[str, Any]
log = logging.getLogger("mltrack.tracking")

START_TIMEOUT_S = 120.0  # importing mlflow: seconds, more on a busy host
_READY = "ready"


class RemoteSendError(Exception):
    """A send that failed in the child: ``permanent`` is the child's ``_is_permanent`` verdict."""

    def __init__(self, message: str, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


class ProcessSender:
    """``send(batch, replay)`` for ``Delivery``, executed by ``_Sender(MlflowClient(uri), run_id)`` in a child.

    One caller at a time (``Delivery``'s worker thread, then :meth:`close`). The child starts on the first
    call, so a tracker that is opened and finished without writes never starts one. ``fallback``: the same
    ``send`` in this process, used from the first child that fails to start on."""

    def __init__(self, uri: str, run_id: str, fallback: Callable[[list[Op], bool], None]) -> None:
        self.uri, self.run_id = uri, run_id
        self._fallback = fallback
        self.in_process = False  # a child could not be started: every batch goes through ``fallback``
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None

    @property
    def pid(self) -> int | None:
        """The child's pid while it runs (tests, diagnostics)."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def __call__(self, batch: list[Op], replay: bool) -> None:
        with self._lock:
            proc = None if self.in_process else self._running()
            if proc is None:
                self._fallback(batch, replay)
                return
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(json.dumps({"batch": batch, "replay": replay}) + "\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
            except OSError as exc:
                line, error = "", f"{type(exc).__name__}: {exc}"
            else:
                error = "its output ended"
            if not line:  # the child died (killed, out of memory): a new one next time
                self._stop()
                raise ConnectionError(f"tracking sender process ended ({error})")
        reply = json.loads(line)
        if reply is not None:
            raise RemoteSendError(reply["error"], reply["permanent"])

    def close(self, timeout: float = 10.0) -> None:
        """Let the child exit. A call still waiting for it (an unreachable server: ``Delivery.close`` has
        spooled that batch already) is not waited for: the child is killed and that call fails."""
        if self._lock.acquire(timeout=timeout):
            try:
                self._stop(timeout)
            finally:
                self._lock.release()
            return
        proc = self._proc
        if proc is not None:
            proc.kill()  # the waiting call reads the end of the output, and stops what is left

    def _running(self) -> subprocess.Popen[str] | None:
        """The child, started if need be; None (and ``in_process`` from now on) if it cannot start."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self._stop()
        # The package's own folder first on the child's path: it imports the same mltrack as this process.
        package_root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        proc = subprocess.Popen([sys.executable, "-m", "mltrack._sender_process", self.uri, self.run_id],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT_S)
        line = proc.stdout.readline() if ready else ""
        if line.strip() != json.dumps(_READY):
            proc.kill()
            proc.wait()
            self.in_process = True
            log.warning("tracking: the sender process did not start (%s); sending to MLflow from this process",
                        f"no answer within {START_TIMEOUT_S:g} s" if not ready else "see its error above")
            return None
        self._proc = proc
        log.info("tracking: MLflow writes go through sender process %d", proc.pid)
        return proc

    def _stop(self, timeout: float = 1.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for pipe in (proc.stdin, proc.stdout):
            try:
                if pipe is not None:
                    pipe.close()  # end of input: the child exits
            except OSError:
                pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve(requests: IO[str], replies: IO[str], uri: str, run_id: str) -> None:
    """The child's loop: answer each request line with ``null``, or ``{"error", "permanent"}`` for a failure."""
    from mltrack._spool import first_line, quiet_worker_retries
    from mltrack.tracking import _is_permanent, sender_for

    quiet_worker_retries()
    send = sender_for(uri, run_id)
    replies.write(json.dumps(_READY) + "\n")
    replies.flush()
    for line in requests:
        request = json.loads(line)
        reply = None
        try:
            send(request["batch"], request["replay"])
        except Exception as exc:  # noqa: BLE001 - classified here, where the exception's type is known
            reply = {"error": f"{type(exc).__name__}: {first_line(exc)}", "permanent": bool(_is_permanent(exc))}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def main(argv: list[str]) -> None:
    from mltrack._spool import WORKER_THREAD

    uri, run_id = argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the trainer decides when this ends (its stdin closes)
    # Named as the in-process worker, so that quiet_worker_retries also silences urllib3's "Retrying ..." here.
    threading.current_thread().name = WORKER_THREAD
    # The protocol owns the original stdout; anything else printed here (a library's print) goes to stderr.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    serve(sys.stdin, replies, uri, run_id)


if __name__ == "__main__":
    main(sys.argv[1:])
