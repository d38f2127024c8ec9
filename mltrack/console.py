"""Console logging in the guide's format, an optional plain-text log file, and progress bars.

Every line reads ``2025-10-05 01:25:02 | INFO     | message``. On a terminal the timestamp is cyan and
the level coloured (SUCCESS green) through rich; anywhere else (pipes, CI, ``mlflow run`` logs) the
same line is written as plain text, so logs stay greppable. ``rich`` is imported only when it is used,
which keeps ``mltrack --help`` fast.
"""
from __future__ import annotations

import logging
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

LOGGER_NAME = "mltrack"
SUCCESS = 25  # between INFO (20) and WARNING (30), like loguru's SUCCESS
logging.addLevelName(SUCCESS, "SUCCESS")

LINE_FORMAT = "%(asctime)s | %(levelname)-8s | %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
_LEVEL_STYLES = {
    "DEBUG": "dim",
    "INFO": "bold",
    "SUCCESS": "bold green",
    "WARNING": "bold yellow",
    "ERROR": "bold red",
    "CRITICAL": "bold white on red",
}

_console_singleton: Any = None


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


def _console() -> Any:
    """One rich Console for log lines and progress bars, so live bars and logs do not garble.

    It is created without a fixed file: rich then writes to whatever ``sys.stderr`` is at print
    time (test runners and ``Progress`` swap it).
    """
    global _console_singleton
    if _console_singleton is None:
        from rich.console import Console

        _console_singleton = Console(stderr=True)
    return _console_singleton


class _StderrHandler(logging.StreamHandler):
    """Plain-text handler bound to the *current* ``sys.stderr``, not the one seen at setup time."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        # logging.StreamHandler.__init__ assigns the stream; the property always answers sys.stderr.
        pass


class _RichLineHandler(logging.Handler):
    """Writes the guide's line layout with rich styles (no columns, no wrapping of long messages)."""

    def __init__(self) -> None:
        super().__init__()
        self._time = logging.Formatter(LINE_FORMAT, DATE_FORMAT)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from rich.highlighter import ReprHighlighter
            from rich.text import Text

            line = Text()
            line.append(self._time.formatTime(record, DATE_FORMAT), style="cyan")
            line.append(" | ")
            line.append(f"{record.levelname:<8}", style=_LEVEL_STYLES.get(record.levelname, ""))
            line.append(" | ")
            line.append_text(ReprHighlighter()(Text(record.getMessage())))
            if record.exc_info:
                line.append("\n" + self._time.formatException(record.exc_info))
            _console().print(line, soft_wrap=True, highlight=False)
        except Exception:  # logging must never raise into the caller
            self.handleError(record)


class _FileHandler(logging.FileHandler):
    """Plain-text log file (the run's ``logs/train.log``); a distinct class so setup can find it."""


_OUR_HANDLERS = (_StderrHandler, _RichLineHandler, _FileHandler)


def _as_level(level: int | str) -> int:
    if isinstance(level, int):
        return level
    value = logging.getLevelName(level.upper())
    if not isinstance(value, int):
        raise ValueError(f"unknown log level '{level}' (use DEBUG, INFO, SUCCESS, WARNING or ERROR)")
    return value


def setup_logging(log_file: Path | None = None, level: int | str = "INFO") -> None:
    """Configure the ``mltrack`` logger: console on stderr, plus ``log_file`` in plain text if given.

    Idempotent: handlers added by an earlier call are removed (a previous log file is closed) before
    the new ones are attached, so calling it from the CLI and again from a run never duplicates
    lines. The file receives DEBUG and up; the console ``level`` and up. Records still propagate to
    the root logger so pytest's caplog sees them; nothing here configures the root logger.
    """
    logger = get_logger()
    for handler in list(logger.handlers):
        if isinstance(handler, _OUR_HANDLERS):
            logger.removeHandler(handler)
            handler.close()
    console_level = _as_level(level)
    console: logging.Handler = _RichLineHandler() if _stderr_is_tty() else _StderrHandler()
    console.setLevel(console_level)
    console.setFormatter(logging.Formatter(LINE_FORMAT, DATE_FORMAT))
    logger.addHandler(console)
    logger_level = console_level
    if log_file is not None:
        path = Path(log_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        file_handler = _FileHandler(path, mode="a", encoding="utf-8")
        file_handler.setLevel(logging.DEBUG)
        file_handler.setFormatter(logging.Formatter(LINE_FORMAT, DATE_FORMAT))
        logger.addHandler(file_handler)
        logger_level = logging.DEBUG
    logger.setLevel(logger_level)


def get_logger() -> logging.Logger:
    """The ``mltrack`` logger; modules may also use ``logging.getLogger(__name__)`` (a child of it)."""
    return logging.getLogger(LOGGER_NAME)


def success(msg: str) -> None:
    """Log ``msg`` at the SUCCESS level (25), shown in green on a terminal."""
    get_logger().log(SUCCESS, msg)


def _noop_advance(n: int = 1, **fields: Any) -> None:
    """Progress disabled: accept the same arguments and do nothing."""


def _fields_column() -> Any:
    from rich.progress import ProgressColumn
    from rich.text import Text

    class FieldsColumn(ProgressColumn):
        """Renders the task's extra fields (``loss=0.1234 acc=0.9000``) after the bar."""

        def render(self, task: Any) -> Any:
            parts = [f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in task.fields.items()]
            return Text(" ".join(parts), style="yellow")

    return FieldsColumn()


BAR_DELAY_S = 1.0  # a pass shorter than this never starts a bar
BAR_REFRESH_PER_S = 4  # rich's default is 10; each refresh renders on a thread beside the training thread


class _LazyBar:
    """The ``advance`` of :func:`progress`: counts, and starts the rich bar only once the pass has run
    ``BAR_DELAY_S``. A live bar costs the training thread its start and stop (~3.5 ms for a pass of 8
    steps, bench/probe_progress.py) and its refreshes (rendered on rich's thread, under the GIL): on short
    passes (a small dataset from a GPU cache, 0.04 s epochs) that was several percent of the epoch, for a
    bar nobody could read."""

    def __init__(self, total: int, description: str, stack: ExitStack) -> None:
        self.total, self.description, self.stack = total, description, stack
        self.start = time.monotonic()
        self.done = 0
        self.fields: dict[str, Any] = {}
        self.bar: Any = None
        self.task: Any = None

    def __call__(self, n: int = 1, **fields: Any) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=n, **fields)
            return
        self.done += n
        self.fields.update(fields)
        if time.monotonic() - self.start >= BAR_DELAY_S:
            self._show()

    def _show(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            _fields_column(),
        )
        self.bar = self.stack.enter_context(Progress(*columns, console=_console(), transient=True,
                                                     refresh_per_second=BAR_REFRESH_PER_S))
        self.task = self.bar.add_task(self.description, total=self.total, completed=self.done, **self.fields)


@contextmanager
def progress(total: int, description: str, enabled: bool | None = None) -> Iterator[Callable[..., None]]:
    """A progress bar over ``total`` steps; yields ``advance(n=1, **fields)``.

    ``fields`` (e.g. ``loss=0.42``) are shown after the bar. ``enabled=None`` shows the bar only when
    stderr is a terminal; when disabled the yielded callable is a no-op, so callers never branch.
    The bar appears once the pass has run ``BAR_DELAY_S`` (:class:`_LazyBar`) and is transient: it
    disappears when the block ends, leaving only log lines.
    """
    if enabled is None:
        enabled = _stderr_is_tty()
    if not enabled:
        yield _noop_advance
        return
    with ExitStack() as stack:
        yield _LazyBar(total, description, stack)
