"""Ordered, non-blocking delivery of tracking operations, with a JSONL spool for outages.

Pure Python on purpose (no mlflow): ``mltrack.tracking`` gives :class:`Delivery` a ``send`` callable and
an error classifier. Operations are JSON-safe dicts, delivered strictly in the order they were put:

    {"op": "metrics", "step": int, "ts": int (ms since the epoch), "metrics": {key: float}}
    {"op": "params", "params": {key: str}}          {"op": "tags", "tags": {key: str}}
    {"op": "artifact", "path": str, "artifact_path": str | None, "cleanup": bool}
    {"op": "artifacts", "path": str, "artifact_path": str | None, "cleanup": bool}
    {"op": "terminate", "status": str, "end_time": int (ms)}

Spool file (JSONL, append-only so a crash can cost at most a partial last line): line 1 is a header
``{"spool": 1, "run_id": ..., "tracking_uri": ...}``; then operations, each with a ``seq`` number, and
ack lines ``{"ack": seq}`` meaning every operation up to that ``seq`` was delivered.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

Op = dict[str, Any]
SendFn = Callable[[list[Op], bool], None]  # (batch, replay) -> None; raises on failure

log = logging.getLogger("mltrack.tracking")

WORKER_THREAD = "mltrack-tracking"
PROBE_MIN_S = 1.0  # first retry while offline; doubles up to PROBE_MAX_S so a dead server costs little
PROBE_MAX_S = 5.0
_KEY_RE = re.compile(r"^[/\w.\- :]+$")  # MLflow's rule for metric/param/tag names (POSIX)


def group(ops: Sequence[Op], max_metrics: int = 1000, max_tags: int = 100) -> list[list[Op]]:
    """Split ``ops`` into send batches. A batch that starts with a metrics op takes the metrics and tags ops
    that follow it, as long as they fit one ``log_batch`` (MLflow's limits: ``max_metrics`` entities, metrics
    and tags together, of which at most ``max_tags`` tags; a tag key set twice counts once, as the sender keeps
    the last value). So an epoch's metrics and its commit tag land together or not at all, and epochs queued
    together (held back behind a deferred checkpoint, or replayed from a spool) are one transaction, not one
    per epoch: a ``log_batch``'s cost is mostly per call (bench/probe_log_batch.py: 10 epochs 5.7x faster). Every other op is a batch of its
    own, so order is kept exactly: nothing moves past an artifact, params or terminate op."""
    batches: list[list[Op]] = []
    current: list[Op] = []
    count, tag_keys = 0, set()  # metric values and distinct tag keys in ``current``
    for op in ops:
        if current and op["op"] in ("metrics", "tags"):
            new_keys = tag_keys | set(op["tags"]) if op["op"] == "tags" else tag_keys
            n = len(op["metrics"]) if op["op"] == "metrics" else 0
            if count + n + len(new_keys) <= max_metrics and len(new_keys) <= max_tags:
                current.append(op)
                count, tag_keys = count + n, new_keys
                continue
        if current:
            batches.append(current)
            current, count, tag_keys = [], 0, set()
        if op["op"] == "metrics":
            current, count = [op], len(op["metrics"])
        else:
            batches.append([op])
    if current:
        batches.append(current)
    return batches


class SpoolFile:
    """The on-disk copy of undelivered operations of one run. Not thread-safe: callers hold a lock."""

    def __init__(self, path: Path, header: dict[str, Any], next_seq: int = 1) -> None:
        self.path = Path(path)
        self.header = header
        self._next_seq = next_seq

    def append(self, ops: Iterable[Op]) -> None:
        """Give each op a ``seq`` (in place) and append it; fsync so the ops survive a crash."""
        lines = []
        for op in ops:
            op["seq"] = self._next_seq
            self._next_seq += 1
            lines.append(json.dumps(op))
        if lines:
            self._write(lines)

    def ack(self, seq: int) -> None:
        """Record that every op up to ``seq`` was delivered (a no-op if the file is already gone)."""
        if self.path.exists():
            self._write([json.dumps({"ack": seq})])

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def _write(self, lines: list[str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        with open(self.path, "a", encoding="utf-8") as fh:
            if new:
                fh.write(json.dumps({"spool": 1, **self.header}) + "\n")
            fh.write("\n".join(lines) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    @classmethod
    def load(cls, path: Path) -> tuple["SpoolFile", list[Op]]:
        """Read a spool file: returns it (ready to append acks) and its undelivered ops in order.

        A torn last line (the writer was killed mid-write) is ignored and terminated so that later
        appends start on a fresh line. Raises ValueError if the file has no valid header."""
        raw = Path(path).read_text(encoding="utf-8")
        rows = raw.split("\n")
        if raw and not raw.endswith("\n"):
            with open(path, "a", encoding="utf-8") as fh:
                fh.write("\n")
        parsed: list[dict[str, Any]] = []
        for row in rows:
            try:
                parsed.append(json.loads(row))
            except ValueError:
                continue  # blank or torn line
        if not parsed or parsed[0].get("spool") != 1 or "run_id" not in parsed[0]:
            raise ValueError(f"{path} is not an mltrack spool file (no header line)")
        header = {k: v for k, v in parsed[0].items() if k != "spool"}
        acked = max((r["ack"] for r in parsed if "ack" in r), default=0)
        ops = [r for r in parsed[1:] if "op" in r]
        last_seq = max((r["seq"] for r in ops), default=0)
        return cls(Path(path), header, last_seq + 1), [r for r in ops if r["seq"] > acked]


class Delivery:
    """One worker thread draining one FIFO queue; spools to disk while the destination is unreachable.

    ``put`` never blocks on the network. A send failure that ``is_permanent`` accepts drops that batch
    with a warning (retrying could never succeed); any other failure switches to offline mode: the
    batch and everything after it go to the spool file, and the worker retries the head of the spool
    every 1..5 s until it is delivered, then replays the rest in order (``send(batch, replay=True)``).
    """

    def __init__(self, send: SendFn, is_permanent: Callable[[BaseException], bool], spool: SpoolFile,
                 where: str) -> None:
        self._send, self._is_permanent, self._spool, self._where = send, is_permanent, spool, where
        self._cv = threading.Condition()
        self._queue: deque[Op] = deque()
        self._backlog: list[Op] = []  # spooled, not yet delivered, in order
        self._inflight: list[Op] | None = None
        self._offline = False
        self._stopped = False
        self._probe_at = 0.0
        self._probe_wait = PROBE_MIN_S
        self._last_error: BaseException | None = None
        self.delivered = 0  # ops delivered or dropped, for reports
        self._thread = threading.Thread(target=self._run, name=WORKER_THREAD, daemon=True)
        self._thread.start()

    @property
    def offline(self) -> bool:
        return self._offline

    @property
    def spool_path(self) -> Path:
        return self._spool.path

    def put(self, ops: Sequence[Op]) -> None:
        with self._cv:
            if self._stopped:
                raise RuntimeError("tracker already finished: nothing more can be logged to this run")
            self._queue.extend(ops)
            self._cv.notify_all()

    def pending(self) -> int:
        """Operations not yet delivered (queued, in flight or spooled)."""
        with self._cv:
            inflight = self._inflight if self._inflight and "seq" not in self._inflight[0] else []
            return len(self._queue) + len(self._backlog) + len(inflight)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything put so far is delivered; True if so, False if ``timeout`` (s) ran out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            self._probe_at = 0.0  # someone is waiting: retry an offline server now rather than later
            self._cv.notify_all()
            while not self._idle():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left)
            return True

    def close(self, timeout: float) -> bool:
        """Flush for at most ``timeout`` s, then stop the worker. Whatever is still undelivered is in
        the spool file when this returns (False); True when everything was delivered."""
        done = self.flush(timeout)
        with self._cv:
            if not done:
                tail = list(self._queue)
                if self._inflight is not None and "seq" not in self._inflight[0]:
                    tail = self._inflight + tail  # may still succeed; replay de-duplicates it then
                self._queue.clear()
                self._spool_locked(tail)
            self._stopped = True
            self._cv.notify_all()
        return done

    # ---------------------------------------------------------------- worker

    def _idle(self) -> bool:
        return not self._queue and not self._backlog and self._inflight is None

    def _run(self) -> None:
        while True:
            with self._cv:
                batch = self._next_batch_locked()
                if batch is None:
                    return
            outcome = self._attempt(batch)  # outside the lock: put() must never wait for the network
            with self._cv:
                self._settle_locked(batch, outcome)
                self._cv.notify_all()

    def _next_batch_locked(self) -> list[Op] | None:
        """The next batch to send (marked in flight), waiting as needed; None once stopped."""
        while not self._stopped:
            if self._backlog:
                if self._queue:  # offline: new ops go to disk at once so a crash cannot lose them
                    self._spool_locked(list(self._queue))
                    self._queue.clear()
                wait = self._probe_at - time.monotonic()
                if wait <= 0:
                    self._inflight = group(self._backlog)[0]
                    return self._inflight
                self._cv.wait(wait)
            elif self._queue:
                batch = group(list(self._queue))[0]
                for _ in batch:
                    self._queue.popleft()
                self._inflight = batch
                return batch
            else:
                self._cv.notify_all()  # idle: wake flushers
                self._cv.wait()
        return None

    def _attempt(self, batch: list[Op]) -> str:
        """Send once: "ok", "dropped" (can never succeed) or "retry" (unreachable, or unknown error)."""
        try:
            self._send(batch, "seq" in batch[0])
            return "ok"
        except Exception as exc:  # the worker must survive anything; classify, never crash
            if self._is_permanent(exc):
                log.warning("tracking: dropping %s for good (it can never succeed): %s", _describe(batch),
                            first_line(exc))
                return "dropped"
            self._last_error = exc
            return "retry"

    def _settle_locked(self, batch: list[Op], outcome: str) -> None:
        self._inflight = None
        spooled = "seq" in batch[0]  # replayed from the backlog, or spooled by close() meanwhile
        if outcome == "retry":
            if not spooled:
                was_online = not self._backlog
                self._spool_locked(batch + list(self._queue))
                self._queue.clear()
                if was_online:
                    self._go_offline()
            self._offline = True
            self._probe_at = time.monotonic() + self._probe_wait
            self._probe_wait = min(self._probe_wait * 2, PROBE_MAX_S)
            return
        self.delivered += len(batch)
        if not spooled:
            return
        del self._backlog[: len(batch)]
        self._try_disk(self._spool.ack, batch[-1]["seq"])
        if self._offline and (outcome == "ok" or not self._backlog):  # the server answered
            self._offline = False
            self._probe_wait = PROBE_MIN_S
            log.info("tracking back online (%s): %d spooled operations left to replay", self._where,
                     len(self._backlog))
        if not self._backlog:
            self._try_disk(self._spool.remove)

    def _go_offline(self) -> None:
        log.warning("tracking offline (%s): spooling to %s; will replay when it is back (%s)",
                    self._where, self._spool.path, first_line(self._last_error))

    def _spool_locked(self, ops: list[Op]) -> None:
        if ops:
            self._backlog.extend(ops)  # in memory first: a disk error must not lose them
            self._try_disk(self._spool.append, ops)

    def _try_disk(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except OSError as exc:
            log.error("tracking: cannot write spool file %s (%s); pending operations kept in memory only",
                      self._spool.path, exc)


def _describe(batch: list[Op]) -> str:
    kind = batch[0]["op"]
    if kind == "metrics":
        metrics = [op for op in batch if op["op"] == "metrics"]  # and maybe tags ops (``group``)
        steps = sorted({op["step"] for op in metrics})
        return f"{sum(len(op['metrics']) for op in metrics)} metric values (steps {steps})"
    if kind in ("artifact", "artifacts"):
        return f"{kind} upload of {batch[0]['path']}"
    return f"{kind} operation"


def first_line(err: BaseException | None) -> str:
    """The first line of an error message (MLflow's can hold whole tracebacks), at most 300 chars."""
    text = str(err) if err is not None else "unknown error"
    return text.strip().splitlines()[0][:300] if text.strip() else type(err).__name__


def check_key(key: str, what: str, max_len: int = 250) -> None:
    """Raise ValueError unless ``key`` is a valid MLflow metric/param/tag name (MLflow's POSIX rule)."""
    # Checked when queued, so a bad name fails in the caller instead of being dropped by the worker.
    if not isinstance(key, str) or not _KEY_RE.match(key) or len(key) > max_len \
            or os.path.normpath(key) != key or key == "." or key.startswith(("/", "..")):
        raise ValueError(f"invalid MLflow {what} name {key!r}: use letters, digits, _ - . / : and spaces, "
                         f"at most {max_len} characters, no '..', leading or double slashes")


def chunks(items: dict[str, Any], size: int) -> Iterator[dict[str, Any]]:
    """Split a dict into dicts of at most ``size`` items, keeping order."""
    keys = list(items)
    for i in range(0, len(keys), size):
        yield {k: items[k] for k in keys[i:i + size]}


def link_or_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> str:
    """Hard-link ``src`` to ``dst`` (copy if links are not possible); returns ``dst``."""
    try:
        os.link(src, dst)  # O(1), and immune to the writer's next atomic os.replace
    except OSError:
        shutil.copy2(src, dst)
    return str(dst)


class _QuietWorkerRetries(logging.Filter):
    """Drops urllib3's per-attempt "Retrying ..." warnings raised on the tracking worker thread: during
    an outage they would repeat every few seconds, and the tracker already said once that it is offline."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.threadName == WORKER_THREAD and record.getMessage().startswith("Retrying"))


def quiet_worker_retries() -> None:
    """Install :class:`_QuietWorkerRetries` on urllib3's pool logger once (affects only our thread)."""
    pool_log = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(f, _QuietWorkerRetries) for f in pool_log.filters):
        pool_log.addFilter(_QuietWorkerRetries())
