"""How long the tracking thread takes to deliver epochs that reach its queue together.

Short epochs (a small dataset from a GPU cache) defer their checkpoints (``CheckpointHook``'s duty rule), and
the tracking hook holds their metrics back until a checkpoint is queued; then several epochs' metrics and
commit tags reach the tracker's queue at once. ``_spool.group`` puts them in one ``log_batch`` (one store
transaction); before, each epoch's metrics and tag were one call. This times both on a real MLflow store
(sqlite, in a temporary directory, unless MLFLOW_TRACKING_URI names another), with the tracking thread's CPU
time, and prints the ratio. The per-epoch rule is reproduced here by a grouping function that closes a batch
at every tags op, so both run the same ``Tracker`` and ``_Sender``.

    python bench/probe_log_batch.py [--epochs 10] [--rounds 5] [--metrics 12]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere


def per_epoch(ops: Sequence[dict[str, Any]], max_metrics: int = 1000, max_tags: int = 100) -> list[list[dict[str, Any]]]:
    """The earlier rule, for comparison: a batch ends at each tags op (an epoch's metrics and its tag)."""
    batches: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    for op in ops:
        current.append(op)
        if op["op"] != "metrics":
            batches.append(current)
            current = []
    return batches + ([current] if current else [])


def measure(rule: Callable[..., Any], name: str, epochs: int, rounds: int, metrics: int) -> tuple[float, float]:
    """Median wall and tracking-thread CPU milliseconds to deliver ``epochs`` epochs queued together."""
    from mltrack import _spool
    from mltrack.tracking import Tracker

    saved = _spool.group
    _spool.group = rule  # Delivery looks it up per batch
    try:
        t = Tracker.start("probe_log_batch", name, {})
        clock = time.pthread_getcpuclockid(t._delivery._thread.ident)  # this tracker's own delivery thread
        t.log_metrics({"warm": 0.0}, step=0)
        t.flush(60)
        walls, cpus = [], []
        for r in range(rounds):
            cpu0 = time.clock_gettime(clock)
            for e in range(epochs):
                step = 1 + r * epochs + e
                t.log_metrics({f"val/m{i}": 0.01 * i for i in range(metrics)}, step=step)
                t.set_tags({"mltrack.committed_step": str(step)})
            start = time.perf_counter()
            if not t.flush(120):
                raise RuntimeError("the store did not take the metrics within 120 s")
            walls.append(1e3 * (time.perf_counter() - start))
            cpus.append(1e3 * (time.clock_gettime(clock) - cpu0))
        t.finish()
        return statistics.median(walls), statistics.median(cpus)
    finally:
        _spool.group = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=10, help="epochs queued together")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--metrics", type=int, default=12, help="metric values per epoch")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp.name}/mlflow.db")
    os.chdir(tmp.name)  # the tracker's spool directory goes under the working directory
    from mltrack import _spool

    print(f"{os.environ['MLFLOW_TRACKING_URI'].split(':')[0]} store, {args.epochs} epochs of {args.metrics} "
          f"metrics and a commit tag queued together, median of {args.rounds} rounds")
    results = {}
    for name, rule in (("one log_batch per epoch", per_epoch), ("mltrack (_spool.group)", _spool.group)):
        results[name] = measure(rule, name.split()[0], args.epochs, args.rounds, args.metrics)
        wall, cpu = results[name]
        print(f"  {name:26s} {wall:8.1f} ms to deliver  {cpu:8.1f} ms tracking-thread CPU")
    (old_wall, old_cpu), (new_wall, new_cpu) = results.values()
    print(f"  ratio (per epoch / mltrack): {old_wall / new_wall:.2f}x wall, {old_cpu / new_cpu:.2f}x CPU")
    os.chdir(Path.home())
    tmp.cleanup()


if __name__ == "__main__":
    main()
