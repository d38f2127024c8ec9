"""What the console's progress bar costs a training thread on short passes.

``mltrack train`` on a terminal shows a rich progress bar per train pass. Measured here, with a console that
is a terminal writing to memory: (1) the time one pass spends in the bar on the calling thread, for a pass of
``--steps`` steps lasting ``--pass-ms`` (the steps are sleeps), rich's bar started per pass as before against
``mltrack.console.progress`` now (which starts a bar only once a pass has run ``BAR_DELAY_S``), and the same
calls into a no-op (what any call costs there, right after a sleep); (2) how much a
live bar's refreshes (on rich's thread) slow a thread launching small ops (``probe_save_gil.loop``), at rich's
default 10 refreshes per second against mltrack's 4.

    python bench/probe_progress.py [--passes 30] [--steps 8] [--pass-ms 40]
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]
from probe_save_gil import loop  # noqa: E402  (bench-local)

from mltrack import console  # noqa: E402


def _columns() -> tuple[Any, ...]:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    return (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn())


@contextmanager
def rich_per_pass(total: int, description: str) -> Iterator[Callable[..., None]]:
    """The bar as it was: rich's Progress started for every pass, refreshed 10 times a second."""
    from rich.progress import Progress

    with Progress(*_columns(), console=console._console(), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1, **fields: bar.update(task, advance=n, **fields)


def pass_cost(make: Callable[[int, str], Any], passes: int, steps: int, pass_s: float) -> float:
    """Median seconds per pass the calling thread spent in the bar's calls (start, each advance, stop; wall
    time, so waiting for the GIL counts; the sleeps between steps do not)."""
    costs = []
    for p in range(passes):
        spent = 0.0
        t0 = time.perf_counter()
        with make(steps, f"epoch {p} train") as advance:
            spent += time.perf_counter() - t0
            for _ in range(steps):
                time.sleep(pass_s / steps)
                t0 = time.perf_counter()
                advance(1, loss=0.5)
                spent += time.perf_counter() - t0
            t0 = time.perf_counter()
        costs.append(spent + time.perf_counter() - t0)
    return statistics.median(costs)


def refresh_cost(hz: float, seconds: float) -> float:
    from rich.progress import Progress

    base = loop(seconds, torch.device("cpu"))[0]
    with Progress(*_columns(), console=console._console(), transient=True, refresh_per_second=hz) as bar:
        bar.add_task("epoch 1 train", total=10**9)
        rate = loop(seconds, torch.device("cpu"))[0]
    return rate / base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--passes", type=int, default=30)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--pass-ms", type=float, default=40.0)
    ap.add_argument("--seconds", type=float, default=2.0, help="loop window per refresh rate")
    args = ap.parse_args()
    from rich.console import Console

    console._console_singleton = Console(file=io.StringIO(), force_terminal=True, width=120)  # a terminal, in memory
    print(f"torch {torch.__version__}; passes of {args.steps} steps over {args.pass_ms:g} ms; "
          f"mltrack BAR_DELAY_S {console.BAR_DELAY_S:g}, BAR_REFRESH_PER_S {console.BAR_REFRESH_PER_S}")
    # "no bar" times the same calls into a no-op: what a call costs here at all (after a sleep, a cold one)
    for name, make in (("no bar (no-op calls)", lambda t, d: console.progress(t, d, enabled=False)),
                       ("rich bar per pass (before)", rich_per_pass),
                       ("mltrack console.progress", lambda t, d: console.progress(t, d, enabled=True))):
        cost = pass_cost(make, args.passes, args.steps, args.pass_ms / 1000)
        print(f"  {name:27s} {1000 * cost:6.3f} ms of the calling thread per pass")
    for hz in (10, console.BAR_REFRESH_PER_S):
        print(f"  a live bar refreshed {hz:g}/s: a launching loop keeps {refresh_cost(hz, args.seconds):.3f}x")


if __name__ == "__main__":
    main()
