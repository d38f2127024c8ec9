"""``mltrack sync`` (replay a tracking spool left by an outage) and ``mltrack reconcile`` (mark runs whose
process died as KILLED). No torch/mlflow import at module level: ``mltrack --help`` stays fast."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

import click

DEFAULT_STALE_AFTER_S = 300.0  # 10 heartbeats (MLTRACK_HEARTBEAT_S defaults to 30 s)


@click.command("sync")
@click.argument("spool_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--tracking-uri", type=str, default=None,
              help="Replay to this store.  [default: MLFLOW_TRACKING_URI, else the URI recorded in the spool]")
def sync(spool_file: Path, tracking_uri: Optional[str]) -> None:
    """Replay SPOOL_FILE, the operations a run could not send while the tracking server was unreachable.

    Metric steps already on the server are skipped, so running it twice logs nothing twice; the file is
    deleted once everything is delivered (the path is printed by the "tracking offline" warning).
    """
    from mltrack.errors import UserError
    from mltrack.tracking import replay_spool

    if not spool_file.is_file():
        raise UserError(f"spool file not found: {spool_file} (the path is printed by the 'tracking offline' "
                        "warning; spools live under runs/<run>/spool/)")
    sent = replay_spool(spool_file, tracking_uri)
    click.echo(f"replayed {sent} operations from {spool_file}")


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, owned by someone else
        return False
    return False


def stale_reason(info: dict[str, Any], now: float, stale_after_s: float, host: str) -> Optional[str]:
    """Why a RUNNING run's process is known to be gone, or None if it may still be alive.

    Evidence, strongest first: its recorded process (tags ``mltrack.host``/``mltrack.pid``) no longer exists
    on this host; or its ``mltrack.heartbeat`` (else its start time) is older than ``stale_after_s``.
    A live process may have the same pid again (reuse): then only the heartbeat decides.
    """
    tags = info["tags"]
    pid = tags.get("mltrack.pid", "")
    if tags.get("mltrack.host") == host and pid.isdigit() and _process_gone(int(pid)):
        return f"its process {pid} on {host} is gone"
    beat = float(tags.get("mltrack.heartbeat") or (info["start_time"] or 0) / 1000.0)
    age = now - beat
    if age > stale_after_s:
        return f"no heartbeat for {age:.0f} s (more than {stale_after_s:g} s)"
    return None


def _unsynced_spool(info: dict[str, Any]) -> Optional[Path]:
    run_dir = info["tags"].get("mltrack.run_dir")
    if not run_dir:
        return None
    spool = Path(run_dir) / "spool" / f"{info['run_id']}.spool.jsonl"
    return spool if spool.is_file() else None


@click.command("reconcile")
@click.option("--experiment", "experiments", multiple=True, help="Experiment name (repeatable).  [default: all]")
@click.option("--stale-after", type=float, default=DEFAULT_STALE_AFTER_S, show_default=True,
              help="Seconds without a heartbeat after which a RUNNING run counts as dead.")
@click.option("--dry-run", is_flag=True, help="Only list what would be marked KILLED.")
def reconcile(experiments: tuple[str, ...], stale_after: float, dry_run: bool) -> None:
    """Mark mltrack runs stuck in RUNNING whose process died (kill -9, lost machine) as KILLED.

    A run's process sets tag mltrack.heartbeat every MLTRACK_HEARTBEAT_S seconds (30) while it trains.
    A run whose spool file (tracking outage) is not yet replayed is skipped: run `mltrack sync` first.
    Such a run can still be continued: mltrack train --resume runs:/<run_id>/weights/last.pt
    """
    from mltrack.tracking import running_runs, set_run_status

    now, host = time.time(), socket.gethostname()
    marked = 0
    for info in running_runs(list(experiments) or None):
        why = stale_reason(info, now, stale_after, host)
        if why is None:
            continue
        spool = _unsynced_spool(info)
        if spool is not None:
            click.echo(f"{info['run_id']}: skipped, its outage spool is not replayed yet: mltrack sync {spool}")
            continue
        click.echo(f"{info['run_id']} ({info['run_name']}): {'would mark' if dry_run else 'marked'} KILLED, {why}")
        if not dry_run:
            set_run_status(info["run_id"], "KILLED", reason=f"reconciled: {why}")
        marked += 1
    click.echo(f"{marked} run(s) {'would be marked' if dry_run else 'marked'} KILLED")
