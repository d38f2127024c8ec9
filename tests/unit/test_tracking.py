"""mltrack.tracking against a real MLflow sqlite store (no server): run lifecycle, params, ordered async
writes, resume/attach, artifact download and spool replay."""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from mlflow.tracking import MlflowClient

from mltrack import tracking
from mltrack._spool import Delivery, SpoolFile, group
from mltrack.errors import CheckpointError, UserError
from mltrack.tracking import Tracker, download_artifact, replay_spool, run_info, set_run_status


@pytest.fixture(scope="module")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An initialised, empty MLflow sqlite store; copied per test (schema migrations take seconds)."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, template_db: Path) -> MlflowClient:
    """A fresh store at ``<tmp>/mlflow.db`` named by MLFLOW_TRACKING_URI; cwd is ``tmp``."""
    db = tmp_path / "mlflow.db"
    shutil.copy(template_db, db)
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.chdir(tmp_path)
    return MlflowClient(tracking_uri=f"sqlite:///{db}")


def _record(tracker: Tracker, calls: list[tuple[str, Any]], gate: threading.Event | None = None) -> None:
    """Wrap the tracker's outgoing calls (still calling through to the real store) to record their
    order; with ``gate``, the first call waits for it, so the test can pile up operations behind it."""
    first = [True]

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            tracker.send_calls = getattr(tracker, "send_calls", 0) + 1  # type: ignore[attr-defined]
            if gate is not None and first[0]:
                first[0] = False
                assert gate.wait(10)
            if name == "log_batch":  # one entry per kind; a batch of metrics and tags is one transaction
                calls.extend((k, kwargs[k]) for k in ("metrics", "params", "tags") if kwargs.get(k))
            else:
                calls.append((name, args))
            return fn(*args, **kwargs)
        return call

    client, sender = tracker._client, tracker._delivery._send
    for name in ("log_batch", "set_terminated"):
        setattr(client, name, wrap(name, getattr(client, name)))
    sender._upload = wrap("upload", sender._upload)


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_tracking_uri_default_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking.tracking_uri() == "http://127.0.0.1:1"


@pytest.mark.parametrize("status,reason", [("FINISHED", None), ("FAILED", "ValueError: boom"), ("KILLED", "SIGTERM")])
def test_start_and_finish_statuses(store: MlflowClient, status: str, reason: str | None) -> None:
    parent = Tracker.start("exp", "parent", {"mltrack.role": "cv"})
    t = Tracker.start("exp", "child-0", {"mltrack.role": "fold", "mltrack.fold": "0"}, parent_run_id=parent.run_id)
    run = store.get_run(t.run_id)
    assert run.info.status == "RUNNING" and run.info.run_name == "child-0" == t.run_name
    assert store.get_experiment(t.experiment_id).name == "exp"
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id and run.data.tags["mltrack.fold"] == "0"
    t.finish(status, reason)
    t.finish("FINISHED")  # idempotent: the first terminal status stays
    run = store.get_run(t.run_id)
    assert run.info.status == status and run.info.end_time is not None
    assert run.data.tags.get("mltrack.exit_reason") == reason
    with pytest.raises(RuntimeError):
        t.log_metrics({"x": 1.0}, 0)
    with pytest.raises(ValueError):
        parent.finish("DONE")
    parent.finish()


def test_start_sets_fast_fail_http_defaults_unless_user_set(store: MlflowClient,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", raising=False)
    Tracker.start("exp", "r", {}).finish()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"
    assert (os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"], os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"]) == ("10", "1")


def test_experiment_env_wins(store: MlflowClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    t = Tracker.start("from-arg", "r", {})
    assert store.get_experiment(t.experiment_id).name == "from-env"
    t.finish()
    other = store.create_experiment("by-id")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", other)
    t2 = Tracker.start("from-arg", "r2", {})
    assert t2.experiment_id == other
    t2.finish()
    assert store.get_experiment_by_name("from-arg") is None


def test_params_chunked_truncated_and_immutable(store: MlflowClient) -> None:
    t = Tracker.start("exp", "p", {})
    calls: list[tuple[str, Any]] = []
    _record(t, calls)
    params = {f"group.key_{i:03d}": i for i in range(250)}
    params["long"] = "x" * 7000
    t.log_params(params)
    assert t.flush(10)
    assert [len(batch) for kind, batch in calls if kind == "params"] == [100, 100, 51]
    stored = store.get_run(t.run_id).data.params
    assert len(stored) == 251 and stored["group.key_007"] == "7" and stored["long"] == "x" * 6000
    t.log_params({"group.key_007": 7, "long": "x" * 6500})  # same values after stringify+truncate: skipped
    with pytest.raises(ValueError, match="group.key_008.*'8'.*'nine'"):
        t.log_params({"group.key_008": "nine", "new.key": 1})
    assert t.flush(10)
    assert "new.key" not in store.get_run(t.run_id).data.params  # nothing queued from a refused call
    with pytest.raises(ValueError, match="invalid MLflow param name"):
        t.log_params({"../escape": 1})
    t.finish()
    resumed = Tracker.start("exp", "p", {}, resume_run_id=t.run_id)  # immutability is known from the server
    with pytest.raises(ValueError, match="immutable"):
        resumed.log_params({"group.key_001": 2})
    resumed.finish()


def test_metrics_are_queued_coalesced_and_land_with_steps(store: MlflowClient) -> None:
    t = Tracker.start("exp", "m", {})
    calls: list[tuple[str, Any]] = []
    gate = threading.Event()
    _record(t, calls, gate)
    t.set_tags({"first": "op"})  # the worker blocks on this one until the gate opens
    began = time.perf_counter()
    for step in range(5):
        t.log_metrics({"train/loss": 1.0 / (step + 1), "val/acc": step / 10, "lr": 0.1}, step=step)
    assert time.perf_counter() - began < 0.5  # the caller never waits for the store
    assert not t.flush(0.2)  # still queued behind the gate
    gate.set()
    assert t.flush(10)
    metric_batches = [batch for kind, batch in calls if kind == "metrics"]
    assert len(metric_batches) == 1 and len(metric_batches[0]) == 15  # 5 calls coalesced into one log_batch
    assert _steps(store, t.run_id, "train/loss") == [0, 1, 2, 3, 4]
    assert [m.value for m in sorted(store.get_metric_history(t.run_id, "train/loss"), key=lambda m: m.step)] == \
        pytest.approx([1.0, 0.5, 1 / 3, 0.25, 0.2])
    calls.clear()
    t.log_metrics({f"val/f1/c{i}": i for i in range(1500)}, step=0)  # above MLflow's 1000 per batch
    assert t.flush(10)
    assert [len(batch) for kind, batch in calls if kind == "metrics"] == [1000, 500]
    assert _steps(store, t.run_id, "val/f1/c1499") == [0]
    t.finish()


def test_epochs_queued_together_land_in_one_transaction_with_the_last_commit_tag(store: MlflowClient) -> None:
    """Epochs held back behind a deferred checkpoint are released together: their metrics and commit tags go
    in one log_batch (one sqlite transaction), the tag ending at the last epoch, as separate calls would."""
    t = Tracker.start("exp", "released", {})
    calls: list[tuple[str, Any]] = []
    gate = threading.Event()
    _record(t, calls, gate)
    t.set_tags({"mltrack.role": "train"})
    for epoch in range(4):
        t.log_metrics({"train/loss": 1.0 / (epoch + 1), "val/acc": epoch / 4}, step=epoch)
        t.set_tags({"mltrack.committed_step": str(epoch)})
    gate.set()
    assert t.flush(10)
    assert t.send_calls == 2  # type: ignore[attr-defined]  # the first tag, then one log_batch for 4 epochs
    assert [len(batch) for kind, batch in calls if kind == "metrics"] == [8]
    assert [[(tag.key, tag.value) for tag in batch] for kind, batch in calls[1:] if kind == "tags"] == [
        [("mltrack.committed_step", "3")]]
    assert _steps(store, t.run_id, "val/acc") == [0, 1, 2, 3]
    assert store.get_run(t.run_id).data.tags["mltrack.committed_step"] == "3"
    t.finish()


def test_order_artifact_then_metrics_then_commit_tag(store: MlflowClient, tmp_path: Path) -> None:
    t = Tracker.start("exp", "order", {})
    calls: list[tuple[str, Any]] = []
    gate = threading.Event()
    _record(t, calls, gate)
    t.set_tags({"mltrack.role": "train"})
    ckpt = tmp_path / "weights" / "last.pt"
    ckpt.parent.mkdir()
    for epoch in range(3):
        tmp = ckpt.with_suffix(".tmp")
        tmp.write_text(f"weights of epoch {epoch}")
        os.replace(tmp, ckpt)  # atomic replace, as the checkpoint writer does
        t.log_artifact(ckpt, "weights")
        t.log_metrics({"val/acc": epoch / 3}, step=epoch)
        t.set_tags({"mltrack.committed_step": str(epoch)})
        if epoch == 0:
            # The file changes before the queued upload runs: the upload must still be epoch 0's bytes.
            tmp.write_text("weights of epoch 0, rewritten")
            os.replace(tmp, ckpt)
    gate.set()
    assert t.flush(10)
    kinds = [kind for kind, _ in calls][1:]
    assert kinds == ["upload", "metrics", "tags"] * 3
    assert t.send_calls == 1 + 3 * 2  # type: ignore[attr-defined]  # each epoch's metrics and tag: one log_batch
    committed = [batch[0].value for kind, batch in calls[1:] if kind == "tags"]
    assert committed == ["0", "1", "2"]
    local = download_artifact(f"runs:/{t.run_id}/weights/last.pt", tmp_path / "dl")
    assert local.read_text() == "weights of epoch 2"
    t.finish()
    assert not (tmp_path / "runs" / ".tracking").exists()  # staged copies cleaned up, empty spool dir too


def test_snapshot_and_figure_upload(store: MlflowClient, tmp_path: Path) -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = Tracker.start("exp", "art", {})
    gate = threading.Event()
    _record(t, [], gate)
    t.set_tags({"blocked": "1"})
    ckpt = tmp_path / "last.pt"
    ckpt.write_text("epoch 0")
    t.log_artifact(ckpt, "weights")
    tmp = tmp_path / "last.tmp"
    tmp.write_text("epoch 1")
    os.replace(tmp, ckpt)
    tb = tmp_path / "tb"
    (tb / "sub").mkdir(parents=True)
    (tb / "sub" / "events.1").write_text("scalars")
    t.log_artifacts(tb, "tensorboard")
    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1], [1, 0])
    t.log_figure(fig, "plots/epochs/cm_0000.png")
    plt.close(fig)
    gate.set()
    assert t.flush(10)
    t.finish()
    got = download_artifact(f"runs:/{t.run_id}/weights/last.pt", tmp_path / "d1")
    assert got.read_text() == "epoch 0"
    assert download_artifact(f"runs:/{t.run_id}/tensorboard/sub/events.1", tmp_path / "d2").read_text() == "scalars"
    png = download_artifact(f"runs:/{t.run_id}/plots/epochs/cm_0000.png", tmp_path / "d3")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_attach_to_mlflow_run_id(store: MlflowClient, monkeypatch: pytest.MonkeyPatch) -> None:
    exp = store.create_experiment("project")
    outer = store.create_run(exp, run_name="named-by-mlflow-run")  # what `mlflow run --run-name` creates
    monkeypatch.setenv("MLFLOW_RUN_ID", outer.info.run_id)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", exp)
    t = Tracker.start("digits", "would-be-name", {"mltrack.role": "train"})
    assert (t.run_id, t.experiment_id, t.run_name) == (outer.info.run_id, exp, "named-by-mlflow-run")
    t.log_metrics({"train/loss": 0.5}, step=0)
    t.finish()
    runs = store.search_runs([exp])
    assert len(runs) == 1 and runs[0].info.run_name == "named-by-mlflow-run"
    assert runs[0].data.tags["mltrack.role"] == "train" and runs[0].info.status == "FINISHED"
    assert store.get_experiment_by_name("digits") is None


def test_resume_reopens_run_and_metric_steps(store: MlflowClient, monkeypatch: pytest.MonkeyPatch) -> None:
    t = Tracker.start("exp", "res", {"mltrack.role": "train"})
    for step in (0, 1):
        t.log_metrics({"train/loss": 1.0 - step / 10}, step=step)
    t.finish("KILLED", "SIGTERM")
    monkeypatch.setenv("MLFLOW_RUN_ID", "ignored-when-resuming")
    r = Tracker.start("other-exp", "other-name", {"mltrack.resumed_from": "runs:/x"}, resume_run_id=t.run_id)
    assert (r.run_id, r.run_name, r.experiment_id) == (t.run_id, "res", t.experiment_id)
    assert store.get_run(t.run_id).info.status == "RUNNING"
    assert r.metric_steps("train/loss") == {0, 1}
    r.log_metrics({"train/loss": 0.7}, step=2)
    assert r.metric_steps("train/loss") == {0, 1, 2}  # queued steps count as logged
    assert r.metric_steps("never/logged") == set()
    r.finish()
    run = store.get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mltrack.resumed_from"] == "runs:/x"
    assert _steps(store, t.run_id, "train/loss") == [0, 1, 2]
    began = time.perf_counter()
    with pytest.raises(CheckpointError, match="not found"):
        Tracker.start("exp", "x", {}, resume_run_id="0123456789abcdef0123456789abcdef")
    assert time.perf_counter() - began < 5


def test_download_artifact_local_runs_and_missing(store: MlflowClient, tmp_path: Path) -> None:
    local = tmp_path / "ckpt.pt"
    local.write_bytes(b"\x00\x01")
    assert download_artifact(str(local), tmp_path / "unused") == local
    with pytest.raises(CheckpointError, match="cannot download"):
        download_artifact(str(tmp_path / "nope.pt"), tmp_path / "unused")
    t = Tracker.start("exp", "dl", {})
    t.log_artifact(local, "weights")
    t.finish()
    got = download_artifact(f"runs:/{t.run_id}/weights/ckpt.pt", tmp_path / "dst")
    assert got.read_bytes() == b"\x00\x01" and got.is_relative_to(tmp_path / "dst")
    for uri in (f"runs:/{t.run_id}/weights/missing.pt", "runs:/0123456789abcdef0123456789abcdef/weights/last.pt"):
        began = time.perf_counter()
        with pytest.raises(CheckpointError, match=f"cannot download {uri}"):
            download_artifact(uri, tmp_path / "dst2")
        assert time.perf_counter() - began < 5


def test_run_info_and_set_run_status(store: MlflowClient) -> None:
    t = Tracker.start("exp", "info", {"mltrack.role": "trial"})
    t.log_params({"optimizer.lr": 0.01})
    t.flush(10)
    info = run_info(t.run_id)
    assert info["status"] == "RUNNING" and info["params"] == {"optimizer.lr": "0.01"}
    assert info["tags"]["mltrack.role"] == "trial" and info["experiment_id"] == t.experiment_id
    assert info["artifact_uri"] and info["start_time"] > 0
    set_run_status(t.run_id, "FAILED", "stale heartbeat")
    info = run_info(t.run_id)
    assert info["status"] == "FAILED" and info["tags"]["mltrack.exit_reason"] == "stale heartbeat"
    with pytest.raises(CheckpointError):
        run_info("0123456789abcdef0123456789abcdef")
    with pytest.raises(CheckpointError):
        set_run_status("0123456789abcdef0123456789abcdef", "KILLED")


def test_replay_spool_sends_pending_once(store: MlflowClient, tmp_path: Path) -> None:
    t = Tracker.start("exp", "spooled", {})
    t.log_metrics({"val/acc": 0.1}, step=0)
    assert t.flush(10)
    (tmp_path / "staged").mkdir()
    staged = tmp_path / "staged" / "last.pt"
    staged.write_text("epoch 1")
    spool_path = tmp_path / "spool" / f"{t.run_id}.spool.jsonl"
    spool = SpoolFile(spool_path, {"run_id": t.run_id, "tracking_uri": "http://127.0.0.1:1"})
    ops = [{"op": "metrics", "step": 0, "ts": 1, "metrics": {"val/acc": 0.1}},
           # The head of the backlog may have reached the server before the connection broke:
           {"op": "metrics", "step": 0, "ts": 2, "metrics": {"val/acc": 0.1}},
           {"op": "artifact", "path": str(staged), "artifact_path": "weights", "cleanup": True},
           {"op": "metrics", "step": 1, "ts": 3, "metrics": {"val/acc": 0.2}},
           {"op": "tags", "tags": {"mltrack.committed_step": "1"}},
           {"op": "terminate", "status": "FINISHED", "end_time": 4}]
    spool.append(ops[:1])
    spool.ack(1)  # acked: must not even be considered
    spool.append(ops[1:])
    with open(spool_path, "a") as fh:
        fh.write('{"op": "metrics", "st')  # torn line of a killed writer
    header = json.loads(spool_path.read_text().splitlines()[0])
    assert header == {"spool": 1, "run_id": t.run_id, "tracking_uri": "http://127.0.0.1:1"}
    # MLFLOW_TRACKING_URI (the sqlite store) wins over the URI recorded in the file.
    assert replay_spool(spool_path) == 5
    assert not spool_path.exists() and not staged.exists()
    run = store.get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mltrack.committed_step"] == "1"
    assert _steps(store, t.run_id, "val/acc") == [0, 1]
    assert download_artifact(f"runs:/{t.run_id}/weights/last.pt", tmp_path / "dl").read_text() == "epoch 1"
    with pytest.raises(UserError, match="cannot replay"):
        replay_spool(spool_path)
    t.finish()


def test_group_coalesces_metrics_with_their_tags_within_mlflow_limits_and_never_past_other_ops() -> None:
    m = lambda n, s: {"op": "metrics", "step": s, "ts": 0, "metrics": {f"k{i}": 0.0 for i in range(n)}}  # noqa: E731
    tag = {"op": "tags", "tags": {"a": "b"}}
    art = {"op": "artifact", "path": "x", "artifact_path": None}
    batches = group([tag, m(2, 0), m(3, 1), tag, tag, m(600, 2), m(600, 3), m(1, 4), art, tag, m(1, 5)],
                    max_metrics=1000)
    assert [[op["op"] for op in b] for b in batches] == [
        ["tags"], ["metrics", "metrics", "tags", "tags", "metrics"], ["metrics"] * 2, ["artifact"], ["tags"],
        ["metrics"]]
    # a tag key set twice counts once: 2 + 3 + 1 + 600 entities in the second batch
    assert [sum(len(op.get("metrics", {})) for op in b) for b in batches] == [0, 605, 601, 0, 0, 1]
    many = {"op": "tags", "tags": {f"t{i}": "v" for i in range(100)}}  # over MLflow's 1000 entities with 999 metrics
    assert [[op["op"] for op in b] for b in group([m(999, 0), many], max_metrics=1000)] == [["metrics"], ["tags"]]
    over = {"op": "tags", "tags": {f"u{i}": "v" for i in range(60)}}  # 100 tags fit a batch, 160 do not
    assert [[op["op"] for op in b] for b in group([m(1, 0), many, over, m(1, 1)])] == [
        ["metrics", "tags"], ["tags"], ["metrics"]]
    # epochs released together (behind a deferred checkpoint): one batch, one transaction
    epochs = [op for s in range(5) for op in (m(4, s), {"op": "tags", "tags": {"mltrack.committed_step": str(s)}})]
    assert len(group(epochs)) == 1


def test_delivery_spools_while_destination_fails_and_replays_in_order(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The queue alone, with a destination that refuses connections for a while (no MLflow needed)."""
    delivered: list[int] = []
    down = threading.Event()
    down.set()

    def send(batch: list[dict[str, Any]], replay: bool) -> None:
        if down.is_set():
            raise ConnectionRefusedError("connection refused")
        delivered.extend(op["step"] for op in batch)

    spool_path = tmp_path / "r.spool.jsonl"
    d = Delivery(send, lambda exc: False, SpoolFile(spool_path, {"run_id": "r", "tracking_uri": "x"}), "http://x")
    with caplog.at_level(logging.WARNING, logger="mltrack.tracking"):
        for step in range(3):
            d.put([{"op": "metrics", "step": step, "ts": 0, "metrics": {"a": 1.0}}])
        deadline = time.monotonic() + 5
        while not d.offline and time.monotonic() < deadline:
            time.sleep(0.02)
        assert d.offline
        d.put([{"op": "metrics", "step": 3, "ts": 0, "metrics": {"a": 1.0}}])
        assert not d.flush(0.3)
        _, pending = SpoolFile.load(spool_path)
        assert [op["step"] for op in pending] == [0, 1, 2, 3]  # on disk, in order
        down.clear()
        assert d.flush(15)
    assert delivered == [0, 1, 2, 3] and not d.offline and not spool_path.exists()
    offline_warnings = [r for r in caplog.records if "tracking offline" in r.getMessage()]
    assert len(offline_warnings) == 1 and str(spool_path) in offline_warnings[0].getMessage()
    assert d.close(1)


def test_spool_left_by_an_earlier_process_is_replayed_before_resuming(store: MlflowClient, tmp_path: Path) -> None:
    t = Tracker.start("exp", "crashed", {}, spool_dir=tmp_path / "spool")
    t.log_metrics({"val/acc": 0.1}, step=0)
    assert t.flush(10)
    # What a process that gave up while offline leaves behind: its last epoch and its final status.
    spool = SpoolFile(t.spool_file, {"run_id": t.run_id, "tracking_uri": "http://127.0.0.1:1"})
    spool.append([{"op": "metrics", "step": 1, "ts": 5, "metrics": {"val/acc": 0.2}},
                  {"op": "terminate", "status": "KILLED", "end_time": 6}])
    r = Tracker.start("exp", "crashed", {}, resume_run_id=t.run_id, spool_dir=tmp_path / "spool")
    assert not t.spool_file.exists()
    assert store.get_run(t.run_id).info.status == "RUNNING"  # re-opened after the replayed KILLED
    assert r.metric_steps("val/acc") == {0, 1}
    r.finish()


def test_unreachable_server_fails_fast(store: MlflowClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    began = time.perf_counter()
    with pytest.raises(UserError, match=f"cannot reach the MLflow tracking store at http://127.0.0.1:{port}"):
        Tracker.start("exp", "r", {})
    with pytest.raises(CheckpointError, match="cannot download runs:/"):
        download_artifact("runs:/0123456789abcdef0123456789abcdef/weights/last.pt", tmp_path / "dl")
    assert time.perf_counter() - began < 15


def test_delivery_drops_only_what_can_never_succeed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    delivered: list[str] = []

    def send(batch: list[dict[str, Any]], replay: bool) -> None:
        tags = batch[0].get("tags", {})
        if "bad key" in tags:
            raise KeyError("rejected by the server")
        delivered.append(next(iter(tags)))

    d = Delivery(send, lambda exc: isinstance(exc, KeyError), SpoolFile(tmp_path / "s.jsonl", {"run_id": "r"}), "x")
    with caplog.at_level(logging.WARNING, logger="mltrack.tracking"):
        d.put([{"op": "tags", "tags": {k: "v"}} for k in ("a", "bad key", "b")])
        assert d.close(5)
    assert delivered == ["a", "b"] and not d.offline and not (tmp_path / "s.jsonl").exists()
    assert any("dropping tags operation for good" in r.getMessage() for r in caplog.records)
    with pytest.raises(RuntimeError, match="already finished"):
        d.put([{"op": "tags", "tags": {"c": "v"}}])


def _wait_for(predicate: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


def test_process_sender_delivers_in_order_from_a_child_and_ends_it_at_finish(store: MlflowClient,
                                                                             tmp_path: Path) -> None:
    t = Tracker.start("exp", "child", {"mltrack.role": "train"}, sender_process=True)
    t.log_params({"training.lr": 0.1})
    ckpt = tmp_path / "last.pt"
    for epoch in range(3):
        ckpt.write_text(f"weights of epoch {epoch}")
        t.log_artifact(ckpt, "weights")
        t.log_metrics({"val/acc": epoch / 3, "train/loss": float("nan") if epoch == 1 else 1.0}, step=epoch)
        t.set_tags({"mltrack.committed_step": str(epoch)})
    assert t.flush(60)
    child = t._process.pid  # type: ignore[union-attr]
    assert child is not None and child != os.getpid()
    t.finish()
    assert t._process.pid is None  # type: ignore[union-attr]
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)
    run = store.get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"training.lr": "0.1"}
    assert run.data.tags["mltrack.committed_step"] == "2"
    assert _steps(store, t.run_id, "val/acc") == [0, 1, 2]
    assert [m.value != m.value for m in store.get_metric_history(t.run_id, "train/loss")] == [False, True, False]
    assert download_artifact(f"runs:/{t.run_id}/weights/last.pt", tmp_path / "dl").read_text() == "weights of epoch 2"


def test_process_sender_outlives_its_child_and_drops_what_can_never_succeed(
        store: MlflowClient, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import signal

    t = Tracker.start("exp", "killed", {}, spool_dir=tmp_path / "spool", sender_process=True)
    t.log_metrics({"val/acc": 0.0}, step=0)
    assert t.flush(60)
    first = t._process.pid  # type: ignore[union-attr]
    with caplog.at_level(logging.WARNING, logger="mltrack.tracking"):
        os.kill(first, signal.SIGINT)  # a Ctrl-C sent to it: ignored (the trainer ends it)
        t.log_metrics({"val/acc": 0.1}, step=1)
        assert t.flush(30) and t._process.pid == first  # type: ignore[union-attr]
        os.kill(first, signal.SIGKILL)  # out of memory, say: the next send starts a new child
        assert _wait_for(lambda: t._process._proc.poll() is not None, 10)  # type: ignore[union-attr]
        t.log_metrics({"val/acc": 0.2}, step=2)
        # a staged file that vanished: FileNotFoundError in the child, judged permanent there
        t._delivery.put([{"op": "artifact", "path": str(tmp_path / "gone.pt"), "artifact_path": "weights",
                          "cleanup": False}])
        t.log_metrics({"val/acc": 0.3}, step=3)
        assert t.flush(60)
    assert t._process.pid not in (None, first)  # type: ignore[union-attr]
    messages = [r.getMessage() for r in caplog.records]
    assert not any("tracking offline" in m for m in messages)  # found dead before a send: replaced at once
    assert any("dropping artifact upload" in m and "FileNotFoundError" in m for m in messages)
    t.finish()
    assert _steps(store, t.run_id, "val/acc") == [0, 1, 2, 3]  # each step once
    assert store.get_run(t.run_id).info.status == "FINISHED"


def test_process_sender_that_cannot_start_sends_from_this_process(store: MlflowClient, caplog: pytest.LogCaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    t = Tracker.start("exp", "nochild", {}, sender_process=True)
    monkeypatch.setattr(sys, "executable", "/bin/false")  # the child exits at once, saying nothing
    with caplog.at_level(logging.WARNING, logger="mltrack.tracking"):
        for step in range(2):
            t.log_metrics({"val/acc": step / 2}, step=step)
        assert t.flush(30)
    assert t._process.in_process and t._process.pid is None  # type: ignore[union-attr]
    messages = [r.getMessage() for r in caplog.records]
    assert sum("sender process did not start" in m for m in messages) == 1
    assert not any("tracking offline" in m for m in messages)
    t.finish()
    assert _steps(store, t.run_id, "val/acc") == [0, 1] and store.get_run(t.run_id).info.status == "FINISHED"
