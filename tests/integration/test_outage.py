"""Issue 5, tracking outage (RELIABILITY T10) end to end: a real ``mlflow server`` subprocess is killed
while ``mltrack train`` (a real CLI process) is in epoch 2. Training never waits on it; everything is
replayed once a server is back, or left in a spool that ``mltrack sync`` replays."""
from __future__ import annotations

import re
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import Iterator

import pytest
from mlflow.tracking import MlflowClient

from test_resume import COMPARED, Cli, Session, env_for, train_args
from test_tracking_server import Server, _free_port

pytestmark = [pytest.mark.slow, pytest.mark.server, pytest.mark.timeout(600)]

HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
STEP_LIMIT_S = 20  # no epoch may be held up longer than this by the tracking server


@pytest.fixture
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for srv in started:
        srv.kill()


def _server(root: Path, started: list[Server], port: int | None = None) -> Server:
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "srv.db").exists():
        shutil.copy(Session.root / "template.db", root / "srv.db")  # type: ignore[operator]
    srv = Server(root, port or _free_port()).start()
    started.append(srv)
    return srv


def _train(root: Path, name: str, uri: str, epochs: int, **env: str) -> Cli:
    work = root / name
    # model/ on (TRAIN_SETS turns it off): the end-of-run packaging must reach the store through an outage too.
    args = train_args(root, work, "standard", 0, epochs, "--set", "tracking.log_model=true")
    return Cli(args, work, env_for(uri, **HTTP_ENV, **env), name)


def _epoch_gaps(log: str) -> list[float]:
    """Seconds between 'Starting Training' and each 'Epoch k/N' line and between consecutive ones."""
    stamps = [datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S") for m in
              re.finditer(r"^(\S+ \S+) \| INFO +\| (?:Starting Training|Epoch \d+/)", log, re.M)]
    return [(b - a).total_seconds() for a, b in zip(stamps, stamps[1:])]


def _assert_complete(uri: str, run_id: str, epochs: int, local_last: Path, tmp: Path) -> None:
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in COMPARED:
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(epochs)), key
    stored = Path(client.download_artifacts(run_id, "weights/last.pt", str(tmp)))
    assert stored.read_bytes() == local_last.read_bytes()  # the final checkpoint, not an older one
    names = {Path(f.path).name for f in client.list_artifacts(run_id, "weights")}
    assert {"last.pt", "last.pt.sha256", "best.pt", "best.pt.sha256", "prev.pt"} <= names
    assert {Path(f.path).name for f in client.list_artifacts(run_id, "reports")} >= {"classification_report_test.txt"}
    assert "model/MLmodel" in {f.path for f in client.list_artifacts(run_id, "model")}


def test_server_killed_in_epoch_2_and_restarted_10s_later(tmp_path_factory: pytest.TempPathFactory,
                                                          servers: list[Server]) -> None:
    root = Session.setup(tmp_path_factory)
    srv = _server(root / "outage_srv", servers)
    epochs = 40  # short epochs, many of them: training goes on while the server is down and when it is back
    cli = _train(root, "outage", srv.uri, epochs, MLTRACK_FINISH_TIMEOUT_S="90")
    cli.wait_for("Epoch 0/")
    srv.kill()
    killed_at = time.monotonic()
    cli.wait_for("tracking offline", timeout=60)  # said once, training goes on
    time.sleep(max(0.0, 10 - (time.monotonic() - killed_at)))
    _server(root / "outage_srv", servers, srv.port)  # same port, same store
    done = cli.ok(240)
    gaps = _epoch_gaps(done.out)
    print(f"\nepoch gaps during the outage (s): max {max(gaps):.1f}, all {gaps}")
    assert len(gaps) == epochs and max(gaps) < STEP_LIMIT_S
    assert done.out.count("tracking offline") == 1 and "tracking back online" in done.out
    # Not asserted: that an "Epoch" line follows the offline notice. On a loaded machine the remaining
    # epochs can all finish before the tracker's worker notices the dead server (it only learns at its
    # next send), which made that check flaky; the epoch gaps above bound any blocking instead.
    run_id = re.search(r"run id: +(\w+)", done.out).group(1)  # type: ignore[union-attr]
    weights = root / "outage" / "runs"
    local_last = next(weights.glob("*/weights/last.pt"))
    _assert_complete(srv.uri, run_id, epochs, local_last, root / "outage" / "dl")
    assert not list((local_last.parent.parent / "spool").glob("*.jsonl"))  # all replayed


def test_server_never_back_exits_0_with_a_spool_that_sync_replays(tmp_path_factory: pytest.TempPathFactory,
                                                                  servers: list[Server]) -> None:
    root = Session.setup(tmp_path_factory)
    srv = _server(root / "gone_srv", servers)
    epochs = 3
    cli = _train(root, "gone", srv.uri, epochs, MLTRACK_FINISH_TIMEOUT_S="5")
    # Unreachable at start (nothing listens on that port): refused at once, before any run exists.
    unreachable = _train(root, "unreachable", f"http://127.0.0.1:{_free_port()}", epochs)
    cli.wait_for("Epoch 0/")
    srv.kill()
    done = cli.ok(240)  # training finished although the server never came back
    assert max(_epoch_gaps(done.out)) < STEP_LIMIT_S
    warning = re.search(r"tracking offline \(.*?\): \d+ operations of run (\w+) \(status FINISHED included\) are "
                        r"left in (\S+);", done.out)
    assert warning, done.out[-3000:]
    run_id, spool = warning.group(1), Path(warning.group(2))
    assert spool.is_file() and f"mltrack sync {spool}" in done.out
    refused = unreachable.wait(120)
    assert refused.rc == 2 and "cannot reach the MLflow tracking store" in refused.out, refused.out[-2000:]

    new = _server(root / "gone_srv", servers)  # another server process and port, same store
    sync = Cli(["sync", str(spool)], root / "gone", env_for(new.uri), "sync").ok(120)
    assert re.search(r"replayed \d+ operations", sync.out) and not spool.exists()
    local_last = spool.parent.parent / "weights" / "last.pt"
    _assert_complete(new.uri, run_id, epochs, local_last, root / "gone" / "dl")
    again = Cli(["sync", str(spool)], root / "gone", env_for(new.uri), "sync_again").wait(120)
    assert again.rc == 2 and "spool file not found" in again.out
