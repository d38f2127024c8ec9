"""Issue 5, run status on every exit path (RELIABILITY T11): exception, SystemExit, SIGTERM, SIGINT,
SIGKILL and a normal end, each a real CLI process (signals sent by the test), then ``mltrack reconcile``
and a resume for the run that ``kill -9`` left RUNNING."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from test_resume import Session, Store, baseline, env_for, resume, start_train

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

LONG = 30  # epochs of the runs that a signal stops: they are never near their end when it arrives
KILL_LIMIT_S = 30  # SIGTERM/SIGINT -> checkpoint, upload, KILLED and exit within this


def _fault(action: str) -> dict[str, str]:
    # Inside epoch 2 (index 1), after the optimizer step of its batch 1.
    return {"MLTRACK_FAULT_AT": "in_epoch", "MLTRACK_FAULT_EPOCH": "1", "MLTRACK_FAULT_BATCH": "1",
            "MLTRACK_FAULT_ACTION": action}


def _reconcile(store: Store, *args: str) -> Any:
    """``mltrack reconcile`` through the real click command, in this process, against ``store``."""
    from mltrack.cli.main import cli

    with pytest.MonkeyPatch.context() as patch:
        for key, value in env_for(store.uri).items():
            if key.startswith("MLFLOW"):
                patch.setenv(key, value)
        return CliRunner().invoke(cli, ["reconcile", *args])


def _wait_for_stored_checkpoint(started: tuple[Any, Store], timeout: float = 120) -> None:
    """Block until the run's first epoch is committed in the store: its metrics, which go out only after the
    upload of a checkpoint at or after their epoch (RELIABILITY rule 4), so ``weights/last.pt`` is complete
    there. Checkpoints are uploaded in the background while the next epoch trains: the console's ``Epoch 1/``
    line does not mean an upload has landed, and a SIGKILL that comes first leaves nothing to resume from
    (on a loaded 2-core CI machine it did)."""
    cli, store = started
    deadline = time.monotonic() + timeout
    while True:
        runs = store.runs()
        if runs and store.history(runs[0].info.run_id, "train/loss") and "last.pt" in {
                Path(f.path).name for f in store.client.list_artifacts(runs[0].info.run_id, "weights")}:
            return
        assert cli.proc.poll() is None, f"exited rc={cli.proc.returncode} before last.pt was stored"
        assert time.monotonic() < deadline, f"no weights/last.pt stored in {timeout} s:\n{cli.output()[-3000:]}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def exits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Starts every exit path at once (they share the 2 cores), then signals the long ones in epoch 2 and
    records how long each took from the signal to the end of the process. Before its signal, the SIGTERM
    run is alive and RUNNING: ``reconcile`` must leave it alone."""
    root = Session.setup(tmp_path_factory)
    runs = {
        "exception": start_train(root, "exit_exception", **_fault("raise")),
        "systemexit": start_train(root, "exit_systemexit", **_fault("sysexit")),
        "sigterm": start_train(root, "exit_sigterm", epochs=LONG),
        "sigint": start_train(root, "exit_sigint", epochs=LONG),
        "sigkill": start_train(root, "exit_sigkill", epochs=LONG),
    }
    sent: dict[str, float] = {}
    for name, sig in (("sigterm", signal.SIGTERM), ("sigint", signal.SIGINT), ("sigkill", signal.SIGKILL)):
        cli, _ = runs[name]
        cli.wait_for("Epoch 1/")  # epoch 2 has started: a checkpoint exists on disk (its upload may lag)
        if name == "sigkill":
            _wait_for_stored_checkpoint(runs[name])
        if name == "sigterm":
            live = _reconcile(runs[name][1], "--stale-after", "600")
        sent[name] = time.monotonic()
        os.kill(cli.proc.pid, sig)
    seconds: dict[str, float] = {}
    deadline = time.monotonic() + 120
    while len(seconds) < len(sent) and time.monotonic() < deadline:
        for name in sent:
            if name not in seconds and runs[name][0].proc.poll() is not None:
                seconds[name] = time.monotonic() - sent[name]
        time.sleep(0.02)
    print(f"\nsignal -> exit seconds: {seconds}")
    return {"root": root, "runs": runs, "seconds": seconds, "reconcile_live": live}


def _finished_run(exits: dict[str, Any], name: str) -> tuple[Any, Any, Store]:
    cli, store = exits["runs"][name]
    return cli.wait(), store.only_run(), store


@pytest.mark.parametrize("name, rc, reason", [
    ("exception", 1, "InjectedFault: injected fault at in_epoch (epoch 1, batch 1)"),
    ("systemexit", 1, "SystemExit(1)"),
])
def test_exception_and_system_exit_mark_the_run_failed(name: str, rc: int, reason: str, exits: dict[str, Any]) -> None:
    done, run, store = _finished_run(exits, name)
    assert done.rc == rc, done.out[-3000:]
    assert run.info.status == "FAILED"  # not FINISHED, as a plain MLflow atexit would record
    assert run.data.tags["mltrack.exit_reason"] == reason
    assert [s for s, _ in store.history(run.info.run_id, "train/loss")] == [0]


@pytest.mark.parametrize("name, rc", [("sigterm", 143), ("sigint", 130)])
def test_sigterm_and_sigint_checkpoint_then_mark_killed(name: str, rc: int, exits: dict[str, Any]) -> None:
    done, run, store = _finished_run(exits, name)
    assert done.rc == rc, done.out[-3000:]
    assert exits["seconds"][name] < KILL_LIMIT_S
    assert run.info.status == "KILLED" and run.data.tags["mltrack.exit_reason"] == name.upper()
    assert f"{name.upper()} received: stopped at epoch" in done.out
    # The uploaded last.pt is the exact stop position: every logged epoch, plus the batches done since.
    run_id = run.info.run_id
    logged = [s for s, _ in store.history(run_id, "train/loss")]
    path = store.client.download_artifacts(run_id, "weights/last.pt", str(exits["root"] / name / "dl"))
    progress = torch.load(path, weights_only=True)["progress"]
    assert logged == list(range(progress["epoch"])) and progress["epoch"] >= 1
    assert progress["global_step"] == progress["epoch"] * 4 + progress["batch"]


def test_sigkill_leaves_running_until_reconcile_then_resume_continues(exits: dict[str, Any]) -> None:
    done, run, store = _finished_run(exits, "sigkill")
    run_id = run.info.run_id
    assert done.rc == -signal.SIGKILL and run.info.status == "RUNNING"
    assert "mltrack.exit_reason" not in run.data.tags

    result = _reconcile(store, "--experiment", "tiny", "--dry-run")
    assert result.exit_code == 0 and "would mark KILLED" in result.output, result.output
    assert store.run(run_id).info.status == "RUNNING"
    result = _reconcile(store, "--experiment", "tiny")
    assert result.exit_code == 0 and f"{run_id}" in result.output and "1 run(s) marked KILLED" in result.output
    run = store.run(run_id)
    assert run.info.status == "KILLED" and f"process {run.data.tags['mltrack.pid']}" in run.data.tags["mltrack.exit_reason"]

    # A resume continues it: one more epoch than the checkpoint holds (the epoch count is free to change).
    work = exits["root"] / "exit_sigkill"
    uri = f"runs:/{run_id}/weights/last.pt"
    done_epochs = torch.load(store.client.download_artifacts(run_id, "weights/last.pt", str(work / "dl")),
                             weights_only=True)["progress"]["epoch"]
    resumed = resume(store, work, uri, "resume", "--num-epochs", str(done_epochs + 1)).ok()
    assert f"at epoch {done_epochs}" in resumed.out
    run = store.run(run_id)
    assert run.info.status == "FINISHED" and len(store.runs()) == 1
    assert [s for s, _ in store.history(run_id, "train/loss")] == list(range(done_epochs + 1))
    assert run.data.tags["mltrack.param_drift"] == f"training.num_epochs: {LONG} -> {done_epochs + 1}"
    assert run.data.params["training.num_epochs"] == str(LONG)  # params are immutable: drift is a tag
    assert "resume_1.yaml" in {Path(f.path).name for f in store.client.list_artifacts(run_id, "config")}


def test_reconcile_leaves_live_runs_alone(exits: dict[str, Any]) -> None:
    result = exits["reconcile_live"]
    assert result.exit_code == 0 and "0 run(s) marked KILLED" in result.output, result.output


def test_normal_end_is_finished_without_exit_reason(tmp_path_factory: pytest.TempPathFactory) -> None:
    cli, store = baseline(tmp_path_factory, "standard", 2)
    assert cli.ok().rc == 0
    run = store.only_run()
    assert run.info.status == "FINISHED" and "mltrack.exit_reason" not in run.data.tags
    assert int(run.data.tags["mltrack.heartbeat"]) <= time.time()


def test_stale_reason_uses_the_process_then_the_heartbeat() -> None:
    from mltrack.cli.sync import stale_reason

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a pid that existed and is gone (reaped)
    now = time.time()

    def info(pid: int, beat: float, host: str = "here") -> dict[str, Any]:
        return {"tags": {"mltrack.pid": str(pid), "mltrack.host": host, "mltrack.heartbeat": str(int(beat))},
                "start_time": int((now - 9999) * 1000)}

    assert "process" in stale_reason(info(proc.pid, now), now, 300, "here")  # type: ignore[operator]
    assert stale_reason(info(os.getpid(), now - 10), now, 300, "here") is None  # alive, fresh heartbeat
    assert stale_reason(info(proc.pid, now - 10), now, 300, "elsewhere") is None  # another host: pid unknown
    assert "no heartbeat for" in stale_reason(info(os.getpid(), now - 400), now, 300, "here")  # type: ignore[operator]
    assert "no heartbeat" in stale_reason({"tags": {}, "start_time": int((now - 400) * 1000)}, now, 300, "h")  # type: ignore[operator]
