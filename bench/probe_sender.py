"""Does delivering metrics to MLflow slow a launch-bound training thread, from a thread vs from a child process?

The training thread is stood in for by ``probe_save_gil.loop`` (small torch ops: CUDA launches when a GPU is
there, CPU ops otherwise; each takes the GIL back). Beside it, a feeder thread plays the epoch ends of short
epochs: every ``--epoch-ms`` it queues one epoch's metrics and commit tag on a real ``Tracker`` (a sqlite
store in a temporary directory), as ``TrackingHook`` does, and the tracker delivers them either from its
worker thread (``Tracker.start(sender_process=False)``, SQLAlchemy's Python under this process's GIL) or
through a child process (``sender_process=True``: the worker thread only waits on a pipe). Printed per way:
the loop's rate as a fraction of its rate alone, its time in stalls over 4 ms (per second), its longest
stall, the epochs delivered, and the CPU the delivery used (the worker thread's own clock, or the child's).

    python bench/probe_sender.py                       # 40 ms epochs (hymenoptera-size with CUDA graphs), 4 s per way
    python bench/probe_sender.py --seconds 0.5 --epoch-ms 20    # quick (the smoke test)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import torch

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]
from probe_save_gil import loop  # noqa: E402  (bench-local)

METRICS = ("train/loss", "train/acc", "train/top5", "val/loss", "val/acc", "val/top5", "val/f1_macro",
           "val/precision_macro", "val/recall_macro", "lr", "epoch_time_s", "train/images_per_s")


def _cpu_s(tracker: Any) -> float:
    """CPU seconds the delivery used so far: the child's (sender process) or the worker thread's."""
    pid = tracker._process.pid if tracker._process is not None else None
    if pid is not None:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    thread = tracker._delivery._thread
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident)) if thread.is_alive() else 0.0


def measure(sender_process: Optional[bool], seconds: float, epoch_ms: float, device: torch.device) -> dict[str, Any]:
    if sender_process is None:
        rate, stalled, longest = loop(seconds, device)
        return {"rate": rate, "stalled": stalled, "longest": longest, "epochs": 0, "cpu_s": 0.0}
    from mltrack.tracking import Tracker

    tracker = Tracker.start("probe", "sender", {}, sender_process=sender_process)
    tracker.log_metrics({k: 0.0 for k in METRICS}, step=0)
    assert tracker.flush(120)  # the child is up, the store warm: neither belongs to the timed window
    cpu0, stop, epochs = _cpu_s(tracker), threading.Event(), [0]

    def feeder() -> None:
        while not stop.wait(epoch_ms / 1000):
            epochs[0] += 1
            tracker.log_metrics({k: float(epochs[0]) for k in METRICS}, step=epochs[0])
            tracker.set_tags({"mltrack.committed_step": str(epochs[0])})

    thread = threading.Thread(target=feeder, daemon=True)
    thread.start()
    rate, stalled, longest = loop(seconds, device)
    stop.set()
    thread.join()
    assert tracker.flush(120)
    cpu = _cpu_s(tracker) - cpu0
    tracker.finish()
    return {"rate": rate, "stalled": stalled, "longest": longest, "epochs": epochs[0], "cpu_s": cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="timed loop per way")
    ap.add_argument("--epoch-ms", type=float, default=40.0, help="an epoch's metrics are queued this often")
    ap.add_argument("--rounds", type=int, default=2, help="the three ways, this many times in turn")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        print(f"torch {torch.__version__}, loop on {device}, {os.cpu_count()} cores, an epoch's {len(METRICS)} "
              f"metrics + commit tag every {args.epoch_ms:g} ms, {args.seconds:g} s per way, {args.rounds} rounds")
        ways = {"no tracker": None, "sender thread": False, "sender process": True}
        for r in range(args.rounds):
            base = None
            for name, way in ways.items():
                m = measure(way, args.seconds, args.epoch_ms, device)
                base = base or m["rate"]
                per_epoch = f"{1000 * m['cpu_s'] / m['epochs']:5.1f} ms CPU per epoch" if m["epochs"] else ""
                print(f"  round {r}  {name:15s} loop {m['rate'] / base:5.2f}x alone ({m['rate']:,.0f}/s)  stalls >4 ms "
                      f"{1000 * m['stalled']:6.1f} ms/s  longest {1000 * m['longest']:6.1f} ms  "
                      f"{m['epochs']:4d} epochs  {per_epoch}")


if __name__ == "__main__":
    main()
