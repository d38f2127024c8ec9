"""T10 at the tracking layer: a real ``mlflow server`` subprocess is killed mid-run; logging keeps
returning at once, the tracker spools to disk, and everything is replayed exactly once when a server is
back (in-process, or by ``replay_spool`` after the process gave up)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import pytest
from mlflow.tracking import MlflowClient

from mltrack.tracking import Tracker, replay_spool

pytestmark = [pytest.mark.server, pytest.mark.timeout(120)]


class Server:
    """``mlflow server`` in its own process group (it forks uvicorn workers; all of them must die)."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.uri = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(self) -> "Server":
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root / 'srv.db'}",
               "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1"]
        with open(self.root / f"server-{self.port}.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        return self

    def wait_healthy(self) -> "Server":
        assert self.proc is not None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / f"server-{self.port}.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"mlflow server on port {self.port} did not become healthy")

    def start(self) -> "Server":
        return self.launch().wait_healthy()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group this test created: server + its workers
            self.proc.wait(10)
        self.proc = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An initialised store: servers then start without running the schema migrations each time."""
    path = tmp_path_factory.mktemp("template") / "srv.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
           template_db: Path) -> Iterator[Callable[..., Server]]:
    """Factory of servers sharing one backend store and artifact root under ``tmp``; all killed at teardown."""
    shutil.copy(template_db, tmp_path / "srv.db")
    started: list[Server] = []
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                        ("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")):
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)

    def make(port: int | None = None, wait: bool = True) -> Server:
        """Launch a server (``wait``: until healthy) and point MLFLOW_TRACKING_URI at it."""
        srv = Server(tmp_path, port or _free_port()).launch()
        started.append(srv)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.uri)
        return srv.wait_healthy() if wait else srv

    yield make
    for srv in started:
        srv.kill()


def _epoch(tracker: Tracker, ckpt: Path, epoch: int) -> float:
    """One epoch's tracking, as the training loop does it; returns the seconds the calls took."""
    tmp = ckpt.with_suffix(".tmp")
    tmp.write_text(f"weights of epoch {epoch}")
    os.replace(tmp, ckpt)
    began = time.perf_counter()
    tracker.log_artifact(ckpt, "weights")
    tracker.log_metrics({"train/loss": 1.0 / (epoch + 1), "val/acc": epoch / 10}, step=epoch)
    tracker.set_tags({"mltrack.committed_step": str(epoch)})
    return time.perf_counter() - began


def _wait_offline(tracker: Tracker, spool: Path) -> None:
    deadline = time.monotonic() + 20
    while not (tracker.offline and spool.exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tracker.offline and spool.exists()


def _assert_complete(uri: str, run_id: str, epochs: int, tmp_path: Path) -> None:
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mltrack.committed_step"] == str(epochs - 1)
    assert run.data.params == {"training.batch_size": "8"}
    for key in ("train/loss", "val/acc"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(epochs)), (key, steps)  # every step, exactly once
    got = client.download_artifacts(run_id, "weights/last.pt", str(tmp_path / "check"))
    assert Path(got).read_text() == f"weights of epoch {epochs - 1}"


@pytest.mark.parametrize("sender_process", [False, True], ids=["thread", "child_process"])
def test_outage_then_restart_replays_everything_once(server: Callable[..., Server], tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture, sender_process: bool,
                                                     capfd: pytest.CaptureFixture[str]) -> None:
    srv = server()
    tracker = Tracker.start("outage", "r", {"mltrack.role": "train"}, spool_dir=tmp_path / "spool",
                            sender_process=sender_process)
    tracker.log_params({"training.batch_size": 8})
    ckpt = tmp_path / "last.pt"
    _epoch(tracker, ckpt, 0)
    assert tracker.flush(30) and not tracker.offline
    srv.kill()
    with caplog.at_level(logging.WARNING, logger="mltrack.tracking"):
        durations = [_epoch(tracker, ckpt, epoch) for epoch in (1, 2)]
        _wait_offline(tracker, tracker.spool_file)
        durations.append(_epoch(tracker, ckpt, 3))  # logged while offline: straight to the spool
        assert max(durations) < 1.0  # the training thread never waits for the network
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and '"step": 3' not in tracker.spool_file.read_text():
            time.sleep(0.05)
        spooled = [json.loads(line) for line in tracker.spool_file.read_text().splitlines()[1:]]
        assert [op["op"] for op in spooled if "op" in op][-3:] == ["artifact", "metrics", "tags"]
        server(srv.port)  # back on the same port; the worker notices within its retry interval
        assert tracker.flush(60)
    assert not tracker.offline and not tracker.spool_file.exists()
    warnings = [r.getMessage() for r in caplog.records if "tracking offline" in r.getMessage()]
    assert len(warnings) == 1 and str(tracker.spool_file) in warnings[0] and "will replay" in warnings[0]
    assert not [r for r in caplog.records if r.name.startswith("urllib3") and r.threadName == "mltrack-tracking"]
    assert "Retrying" not in capfd.readouterr().err  # nor from the sender process (its stderr is ours)
    tracker.finish()
    _assert_complete(srv.uri, tracker.run_id, 4, tmp_path)


def test_never_restarted_leaves_a_spool_that_replays_to_a_new_server(
        server: Callable[..., Server], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    srv = server()
    tracker = Tracker.start("outage", "r", {"mltrack.role": "train"}, spool_dir=tmp_path / "spool")
    tracker.log_params({"training.batch_size": 8})
    ckpt = tmp_path / "last.pt"
    _epoch(tracker, ckpt, 0)
    assert tracker.flush(30)
    srv.kill()
    # A new server process (new port) on the same backend store and artifact root, as after a reboot;
    # launched now so its start overlaps the rest (the tracker keeps the URI it started with).
    new = server(wait=False)
    for epoch in (1, 2):
        assert _epoch(tracker, ckpt, epoch) < 1.0
    with caplog.at_level(logging.WARNING, logger="mltrack.tracking"):
        began = time.perf_counter()
        tracker.finish(timeout=3)
        assert time.perf_counter() - began < 15
    spool = tracker.spool_file
    assert spool.exists()
    assert any(f"mltrack sync {spool}" in r.getMessage() for r in caplog.records)
    assert json.loads(spool.read_text().splitlines()[0])["tracking_uri"] == srv.uri
    new.wait_healthy()
    assert replay_spool(spool) == 7  # (artifact, metrics, commit tag) x 2 epochs + terminal status
    assert not spool.exists()
    _assert_complete(new.uri, tracker.run_id, 3, tmp_path)
