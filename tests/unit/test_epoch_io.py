"""Issue 9, epoch side effects off the training thread: ``EpochIO`` (FIFO, errors, bound, inline modes),
``snapshot.snapshot`` (a copy later training cannot change), and a real training run whose checkpoint,
metrics and commit tag of each epoch leave the training thread in the order RELIABILITY rule 4 needs."""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from mltrack import checkpoint
from mltrack.config import load_config
from mltrack.errors import CheckpointError
from mltrack.hooks import CheckpointHook, EpochIO, TrackingHook
from mltrack.snapshot import snapshot
from mltrack.trainers.loop import EpochOutput, FitContext

IO_THREAD = "mltrack-epoch-io"


@pytest.fixture
def io() -> Any:
    epoch_io = EpochIO(inline=False)
    yield epoch_io
    epoch_io.close(quiet=True)


def _wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


# ---------------------------------------------------------------- EpochIO


def test_jobs_run_in_submission_order_on_one_worker_thread(io: EpochIO) -> None:
    done: list[tuple[int, str]] = []

    def job(i: int) -> None:
        time.sleep(0.01 * (i % 3))  # uneven durations: order must still be FIFO
        done.append((i, threading.current_thread().name))

    for i in range(8):
        io.submit(job, i)
    io.drain()
    assert [i for i, _ in done] == list(range(8))
    names = {name for _, name in done}
    assert len(names) == 1 and names.pop().startswith(IO_THREAD)


def test_submit_returns_before_a_slow_job_ends(io: EpochIO) -> None:
    gate = threading.Event()
    start = time.monotonic()
    io.submit(gate.wait, 10)
    assert time.monotonic() - start < 1.0
    gate.set()
    io.drain()


def test_failed_job_raises_at_next_submit_and_cancels_later_jobs(io: EpochIO) -> None:
    ran: list[str] = []
    gate = threading.Event()

    def fail() -> None:
        raise OSError(28, "No space left on device")

    io.submit(gate.wait, 10)
    io.submit(fail)
    io.submit(ran.append, "metrics of the failed checkpoint's step")  # must never run (rule 4)
    gate.set()
    _wait_until(lambda: io.failed)
    with pytest.raises(OSError, match="No space left"):
        io.submit(ran.append, "next epoch")
    io.drain()  # the error was raised once; the queue is empty now
    assert ran == []


def test_failed_job_raises_at_drain(io: EpochIO) -> None:
    io.submit(lambda: None)
    io.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        io.drain()


def test_close_raises_a_pending_error_unless_quiet(caplog: pytest.LogCaptureFixture) -> None:
    loud = EpochIO(inline=False)
    loud.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        loud.close()

    quiet = EpochIO(inline=False)
    ran: list[int] = []
    quiet.submit(ran.append, 1)  # queued before the failure: a finished epoch's job still runs
    quiet.submit(lambda: 1 / 0)
    with caplog.at_level(logging.ERROR, logger="mltrack"):
        quiet.close(quiet=True)
    assert ran == [1]
    assert "background epoch job also failed" in caplog.text and "division by zero" in caplog.text
    with pytest.raises(RuntimeError, match="closed"):
        quiet.submit(ran.append, 2)


def test_at_most_one_bounded_job_waits_besides_the_running_one(io: EpochIO) -> None:
    gate = threading.Event()
    io.submit(gate.wait, 10, bounded=True)  # running
    io.submit(lambda: None, bounded=True)  # waiting
    io.submit(lambda: None)  # unbounded jobs never block
    third_queued = threading.Event()
    slot_free = threading.Event()

    def producer() -> None:
        io.wait_for_slot()
        slot_free.set()
        io.submit(lambda: None, bounded=True)
        third_queued.set()

    thread = threading.Thread(target=producer)
    thread.start()
    time.sleep(0.3)
    assert not slot_free.is_set() and not third_queued.is_set()
    gate.set()
    thread.join(5)
    assert third_queued.is_set()
    io.drain()


def test_inline_modes_run_jobs_on_the_calling_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MLTRACK_FAULT_AT", "MLTRACK_SYNC_EPOCH_IO"):
        monkeypatch.delenv(var, raising=False)
    assert not EpochIO().inline
    monkeypatch.setenv("MLTRACK_SYNC_EPOCH_IO", "1")
    assert EpochIO().inline
    monkeypatch.delenv("MLTRACK_SYNC_EPOCH_IO")
    monkeypatch.setenv("MLTRACK_FAULT_AT", "after_commit")  # crash points must fire where they are
    inline = EpochIO()
    assert inline.inline
    names: list[str] = []
    inline.submit(lambda: names.append(threading.current_thread().name))
    assert names == [threading.current_thread().name]
    with pytest.raises(ZeroDivisionError):  # raised by submit itself
        inline.submit(lambda: 1 / 0)
    inline.close()


# ---------------------------------------------------------------- snapshot


def _trained_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.rand(5, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model(torch.rand(5, 4)).sum().backward()
    optimizer.step()


def test_snapshot_is_independent_of_later_in_place_training() -> None:
    model, optimizer = _trained_model()
    history = [{"epoch": 0.0, "train/loss": 1.0}]
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "progress": {"history": history},
             "pair": (torch.ones(2), 3), "meta": None}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in optimizer.state_dict()["state"][0].items()}
    snap = snapshot(state)

    _step(model, optimizer)  # in-place updates of weights and optimizer moments
    history.append({"epoch": 1.0, "train/loss": 0.5})
    state["pair"][0].add_(1)
    assert not torch.equal(model.state_dict()["0.weight"], before["0.weight"])  # training did move

    assert all(torch.equal(snap["model"][k], v) for k, v in before.items())
    assert all(torch.equal(torch.as_tensor(snap["optimizer"]["state"][0][k]), torch.as_tensor(v))
               for k, v in moments.items())
    assert snap["progress"]["history"] == [{"epoch": 0.0, "train/loss": 1.0}]
    assert torch.equal(snap["pair"][0], torch.ones(2)) and snap["pair"][1] == 3 and snap["meta"] is None
    # a state_dict stays an OrderedDict with its version metadata, so load_state_dict reads it as before
    assert isinstance(snap["model"], OrderedDict)
    assert snap["model"]._metadata == state["model"]._metadata  # type: ignore[attr-defined]
    model.load_state_dict(snap["model"])
    assert torch.equal(model.state_dict()["0.weight"], before["0.weight"])


def test_snapshot_keeps_tied_tensors_shared() -> None:
    shared = torch.rand(3)
    snap = snapshot({"a": shared, "b": [shared]})
    assert snap["a"] is snap["b"][0] and snap["a"] is not shared


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_snapshot_of_cuda_tensors_is_pinned_cpu_and_complete() -> None:
    model = torch.nn.Linear(256, 256).cuda()
    before = {k: v.cpu() for k, v in model.state_dict().items()}
    snap = snapshot(model.state_dict())
    with torch.no_grad():
        model.weight.mul_(0)
    for key, value in snap.items():
        assert value.device.type == "cpu" and value.is_pinned()
        assert torch.equal(value, before[key])


# ---------------------------------------------------------------- CheckpointHook on the worker


Events = list[tuple[str, Any, str]]


def _record_tracker_calls(monkeypatch: pytest.MonkeyPatch) -> Events:
    """Record what ``Tracker`` is asked to queue, in order and from which thread; the real calls still run.
    ``last.pt`` uploads are named by the epoch of the file being queued (read from it)."""
    from mltrack.tracking import Tracker

    events: Events = []

    def artifact(path: Path, artifact_path: str | None = None) -> Any:
        path = Path(path)
        if path.name == "last.pt":
            return ("last.pt", torch.load(path, weights_only=True)["progress"]["epoch"] - 1)
        return (path.name, None)

    describe = {"log_artifact": artifact, "log_metrics": lambda metrics, step: step,
                "set_tags": lambda tags: tags.get("mltrack.committed_step")}
    for name, how in describe.items():
        def wrapper(self: Tracker, *args: Any, _name: str = name, _how: Any = how,
                    _original: Any = getattr(Tracker, name), **kwargs: Any) -> Any:
            if _name != "set_tags" or "mltrack.committed_step" in args[0]:  # not the heartbeat
                events.append((_name, _how(*args, **kwargs), threading.current_thread().name))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Tracker, name, wrapper)
    return events


@pytest.fixture
def store(run_store: Path) -> Path:
    return run_store


@pytest.fixture
def tracker(store: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    from mltrack.tracking import Tracker

    events = _record_tracker_calls(monkeypatch)
    run = Tracker.start("epoch_io", "hooks", {}, spool_dir=store / "spool")
    run.events = events
    yield run
    run.finish("FINISHED", timeout=30)


def _ctx(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> FitContext:
    from mltrack.optim import build_scheduler
    from mltrack.trainers import build_trainer

    cfg = load_config(None, ["training.device=cpu", "tracking.progress='off'", "training.num_epochs=3"])
    schedule = build_scheduler(cfg.scheduler, optimizer, 3, 1, cfg.optimizer.lr, mode=cfg.training.monitor_mode)
    ctx = FitContext(cfg, model, optimizer, schedule, build_trainer(cfg.training, torch.device("cpu")),
                     {"train": None, "val": None, "test": None}, torch.nn.CrossEntropyLoss(), ["a", "b"])
    ctx.state.epoch = 1
    ctx.last = EpochOutput({"train/loss": 1.0}, torch.zeros(2, 2), torch.zeros(2, 2), improved=True)
    return ctx


def test_written_checkpoint_holds_the_state_at_epoch_end_not_later_training(io: EpochIO, tmp_path: Path,
                                                                             tracker: Any) -> None:
    model, optimizer = _trained_model()
    ctx = _ctx(model, optimizer)
    hooks = [CheckpointHook(tmp_path / "weights", tracker, {"mlflow_run_id": "r0"}, io),
             TrackingHook(tracker, io=io)]
    gate = threading.Event()
    io.submit(gate.wait, 10)  # a slow disk: the epoch's jobs wait while training goes on
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for hook in hooks:
        hook.on_epoch_end(ctx)
    _step(model, optimizer)  # the next epoch trains in place before anything is written
    ctx.state.history.append({"epoch": 1.0})
    assert not (tmp_path / "weights" / "last.pt").exists()
    gate.set()
    io.drain()

    saved = checkpoint.load(tmp_path / "weights" / "last.pt")
    assert all(torch.equal(saved["model"][k], v) for k, v in before.items())
    assert saved["progress"]["epoch"] == 1 and saved["progress"]["history"] == []
    checkpoint.verify(tmp_path / "weights" / "best.pt")
    # best.pt (+ manifest), then last.pt (+ manifest), then the step's metrics, then its commit tag
    assert [e[:2] for e in tracker.events] == [
        ("log_artifact", ("best.pt.sha256", None)), ("log_artifact", ("best.pt", None)),
        ("log_artifact", ("last.pt.sha256", None)), ("log_artifact", ("last.pt", 0)),
        ("log_metrics", 0), ("set_tags", "0")]
    assert all(e[2].startswith(IO_THREAD) for e in tracker.events)


def test_write_error_in_the_worker_is_one_checkpoint_error(io: EpochIO, tmp_path: Path, tracker: Any) -> None:
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the weights folder's parent should be")
    model, optimizer = _trained_model()
    ctx = _ctx(model, optimizer)
    hooks = [CheckpointHook(blocker / "weights", tracker, {}, io), TrackingHook(tracker, io)]
    # raised by the next submit (the tracking hook's, if the write failed already) or by drain
    with pytest.raises(CheckpointError, match=r"cannot write the checkpoint of epoch 0 in .*weights \(check its "
                                              r"free space and permissions\): NotADirectoryError"):
        for hook in hooks:
            hook.on_epoch_end(ctx)
        io.drain()
    assert tracker.events == []  # neither the upload nor the metrics/commit of that step went out


# ---------------------------------------------------------------- a real run, async


def test_real_training_queues_each_checkpoint_before_its_metrics_and_commit(
        tiny_dataset: Callable[..., Path], store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    from mltrack.run import train

    events = _record_tracker_calls(monkeypatch)
    data_dir = tiny_dataset(n_classes=3, per_class=10, size=16, folds=2)
    cfg = load_config(None, ["training.device=cpu", "tracking.progress='off'", f"data.data_dir={data_dir}",
                             "data.dataset_name=tiny", "data.image_size=16", "data.num_workers=0",
                             "training.num_epochs=3", "training.batch_size=8", "tracking.tensorboard=true",
                             "tracking.confusion_every_epoch=true"])
    result = train(cfg)

    for step in range(3):
        # On a fast machine an epoch of this size is shorter than a checkpoint write, so a non-improving one may
        # be deferred (CheckpointHook): its metrics then wait for a later epoch's upload. Either way an upload
        # of this epoch's state or a later one is queued before its metrics (RELIABILITY rule 4).
        upload = next(i for i, e in enumerate(events)
                      if e[0] == "log_artifact" and e[1][0] == "last.pt" and e[1][1] >= step)
        metrics = next(i for i, e in enumerate(events) if e[:2] == ("log_metrics", step))
        commit = next(i for i, e in enumerate(events) if e[:2] == ("set_tags", str(step)))
        assert upload < metrics < commit, (step, events)
        assert all(events[i][2].startswith(IO_THREAD) for i in (upload, metrics, commit))  # off the training thread

    client = mlflow.MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mltrack.committed_step"] == "2"
    assert sorted(m.step for m in client.get_metric_history(result.run_id, "train/loss")) == [0, 1, 2]
    weights = result.run_dir / "weights"
    for name in ("last.pt", "best.pt"):
        checkpoint.verify(weights / name)
        remote = Path(mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path=f"weights/{name}",
                                                          dst_path=str(store / "dl")))
        assert checkpoint.sha256_file(remote) == checkpoint.sha256_file(weights / name)
    assert checkpoint.load(weights / "last.pt")["progress"]["epoch"] == 3
    epochs = {Path(f.path).name for f in client.list_artifacts(result.run_id, "plots/epochs")}
    # Rendered on the worker too: the first epoch's and the last one's at least (epochs shorter than 100
    # renders are thinned out, mltrack.figures)
    assert {"confusion_matrix_val_0000.png", "confusion_matrix_val_0002.png"} <= epochs
    assert list((result.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    # The same renders reach TensorBoard as images, one per rendered epoch (what the removed child-process
    # test checked for that mode; inline is now the only one)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(result.run_dir / "tensorboard"), size_guidance={"images": 0})
    tb.Reload()
    tb_steps = [e.step for e in tb.Images("confusion_matrix/val")]
    assert {0, 2} <= set(tb_steps) and tb_steps == sorted(set(tb_steps))
    assert {f"confusion_matrix_val_{step:04d}.png" for step in tb_steps} == epochs
    run_loss = {m.step: m.value for m in client.get_metric_history(result.run_id, "train/loss")}
    assert {e.step: e.value for e in tb.Scalars("train/loss")} == pytest.approx(run_loss)  # one summary per epoch
    assert {"val/acc", "lr", "epoch_time_s"} <= set(tb.Tags()["scalars"])


# ---------------------------------------------------------------- epochs shorter than a checkpoint write


def test_epochs_faster_than_the_disk_defer_checkpoints_and_hold_their_metrics(io: EpochIO, tmp_path: Path,
                                                                              tracker: Any) -> None:
    """A busy worker: non-improving epochs are not written and never wait; their metrics go out only
    after a later checkpoint's upload; an improving epoch is always written; the final state is written
    at fit end. Epoch k here = metric step k."""
    model, optimizer = _trained_model()
    ctx = _ctx(model, optimizer)
    ckpt = CheckpointHook(tmp_path / "weights", tracker, {"mlflow_run_id": "r0"}, io)
    hooks = [ckpt, TrackingHook(tracker, io=io, checkpoints=ckpt)]
    gate = threading.Event()
    io.submit(gate.wait, 10, bounded=True)  # a write in progress ...
    io.submit(lambda: None, bounded=True)  # ... and one queued behind it: the slots are full
    improved = [False, False, True, False]
    for step, better in enumerate(improved):
        ctx.state.epoch, ctx.last = step + 1, EpochOutput({"train/loss": float(step)}, torch.zeros(2, 2),
                                                          torch.zeros(2, 2), improved=better)
        if better:
            gate.set()  # an improving epoch waits for a slot (best.pt must hold its weights)
        start = time.monotonic()
        for hook in hooks:
            hook.on_epoch_end(ctx)
        if not better:
            assert time.monotonic() - start < 1.0  # never waits for the disk
        if step < 2:
            assert ckpt.deferred  # (step 3 is deferred or not, by whether step 2's write is still queued)
    io.drain()
    for hook in hooks:
        hook.on_fit_end(ctx)
    io.drain()
    kinds = [e[:2] for e in tracker.events if e[0] != "log_artifact" or e[1][0] == "last.pt"]
    written = [e[1][1] for e in kinds if e[0] == "log_artifact"]
    assert 2 in written and written[-1] == 3 and 0 not in written and 1 not in written
    for step in range(4):  # every step's metrics once, each after the upload of a checkpoint at or after it
        metrics = kinds.index(("log_metrics", step))
        assert any(e[0] == "log_artifact" and e[1][1] >= step for e in kinds[:metrics]), kinds
        assert kinds.count(("log_metrics", step)) == 1
    assert kinds[-1] == ("set_tags", "3")
    assert checkpoint.load(tmp_path / "weights" / "best.pt")["progress"]["epoch"] == 3  # step 2's state
    assert checkpoint.load(tmp_path / "weights" / "last.pt")["progress"]["epoch"] == 4


def test_improving_epochs_faster_than_the_disk_supersede_the_queued_checkpoint(
        io: EpochIO, tmp_path: Path, tracker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run of improving epochs while the first write is stuck: the second is queued, the later ones take
    its place instead of waiting for a slot; the queued job writes the newest (best) state, and every
    step's metrics still go out once, after a checkpoint at or after it. Epoch k here = metric step k."""
    import mltrack.hooks as hooks_module

    gate, real_save = threading.Event(), checkpoint.save

    def stuck_first_save(state: dict[str, Any], path: Path) -> str:
        if state["progress"]["epoch"] == 1:
            assert gate.wait(10)
        return real_save(state, path)

    monkeypatch.setattr(hooks_module.checkpoint, "save", stuck_first_save)
    model, optimizer = _trained_model()
    ctx = _ctx(model, optimizer)
    ckpt = CheckpointHook(tmp_path / "weights", tracker, {"mlflow_run_id": "r0"}, io)
    hooks = [ckpt, TrackingHook(tracker, io=io, checkpoints=ckpt)]
    for step in range(4):
        ctx.state.epoch, ctx.last = step + 1, EpochOutput({"train/loss": float(step)}, torch.zeros(2, 2),
                                                          torch.zeros(2, 2), improved=True)
        with torch.no_grad():
            next(model.parameters()).fill_(float(step))  # each epoch's weights tell which epoch they are
        start = time.monotonic()
        for hook in hooks:
            hook.on_epoch_end(ctx)
        assert time.monotonic() - start < 1.0  # no improving epoch waits for the stuck write
        if step == 0:
            _wait_until(lambda: ckpt._waiting is None)  # the worker took the first job
        assert not ckpt.deferred
    assert ckpt.queued == 2 and ckpt.superseded == 2  # steps 2 and 3 took step 1's place in turn
    gate.set()
    io.drain()
    for hook in hooks:
        hook.on_fit_end(ctx)
    io.drain()
    kinds = [e[:2] for e in tracker.events if e[0] != "log_artifact" or e[1][0] == "last.pt"]
    assert [e[1][1] for e in kinds if e[0] == "log_artifact"] == [0, 3]  # step 0's write, then step 3's
    for step in range(4):
        metrics = kinds.index(("log_metrics", step))
        assert any(e[0] == "log_artifact" and e[1][1] >= step for e in kinds[:metrics]), kinds
        assert kinds.count(("log_metrics", step)) == 1
    assert kinds[-1] == ("set_tags", "3")
    best = checkpoint.load(tmp_path / "weights" / "best.pt")
    assert best["progress"]["epoch"] == 4 and float(next(iter(best["model"].values())).flatten()[0]) == 3.0
    assert checkpoint.load(tmp_path / "weights" / "last.pt")["progress"]["epoch"] == 4


def test_a_slow_writer_runs_at_most_a_tenth_of_the_time(io: EpochIO, tmp_path: Path, tracker: Any) -> None:
    """After a 0.3 s write, epochs within DUTY (10) x 0.3 s of the last queued checkpoint are not written even
    with the worker idle: a non-improving one is deferred, an improving one is held (its state kept, a newer
    held one replacing it). The first epoch past the window writes the held (best) state, or its own when it
    improves; every step's metrics go out once, after a checkpoint at or after it. Epoch k = metric step k."""
    model, optimizer = _trained_model()
    ctx = _ctx(model, optimizer)
    ckpt = CheckpointHook(tmp_path / "weights", tracker, {"mlflow_run_id": "r0"}, io)
    hooks = [ckpt, TrackingHook(tracker, io=io, checkpoints=ckpt)]

    def epoch(step: int, improved: bool, since_queued: float | None = None) -> None:
        ctx.state.epoch = step + 1
        ctx.last = EpochOutput({"train/loss": float(step)}, torch.zeros(2, 2), torch.zeros(2, 2), improved=improved)
        with torch.no_grad():
            next(model.parameters()).fill_(float(step))  # the weights tell which epoch they are
        if since_queued is not None:
            ckpt.write_s, ckpt.queued_at = 0.3, time.monotonic() - since_queued  # as if a 0.3 s write
        for hook in hooks:
            hook.on_epoch_end(ctx)

    def written(name: str) -> int:
        return int(next(iter(checkpoint.load(tmp_path / "weights" / name)["model"].values())).flatten()[0])

    epoch(0, improved=False)
    io.drain()
    assert not ckpt.deferred and written("last.pt") == 0
    epoch(1, improved=False, since_queued=0.0)
    assert ckpt.deferred and io.slot_free()
    epoch(2, improved=True, since_queued=1.0)  # held, not written
    assert ckpt.deferred and ckpt.held == 1 and ckpt.queued == 1
    epoch(3, improved=True, since_queued=2.0)  # replaces the held state
    assert ckpt.deferred and ckpt.held == 2 and ckpt.queued == 1
    epoch(4, improved=False, since_queued=2.5)  # 2.5 s < 10 x 0.3 s
    assert ckpt.deferred and ckpt.queued == 1
    epoch(5, improved=False, since_queued=3.1)  # past the window: the held state is written, not this one
    io.drain()
    assert ckpt.deferred and ckpt.queued == 2 and written("best.pt") == 3 and written("last.pt") == 3
    epoch(6, improved=False, since_queued=3.1)  # its own state
    io.drain()
    assert not ckpt.deferred and ckpt.queued == 3 and written("last.pt") == 6 and written("best.pt") == 3
    epoch(7, improved=True, since_queued=1.0)  # held ...
    epoch(8, improved=True, since_queued=3.1)  # ... and replaced by a newer improving epoch past the window
    io.drain()
    assert not ckpt.deferred and ckpt.queued == 4 and written("best.pt") == 8 and written("last.pt") == 8
    epoch(9, improved=True, since_queued=1.0)  # held when the run ends: written at fit end, then nothing else
    for hook in hooks:
        hook.on_fit_end(ctx)
    io.drain()
    assert ckpt.queued == 5 and written("best.pt") == 9 and written("last.pt") == 9
    kinds = [e[:2] for e in tracker.events if e[0] != "log_artifact" or e[1][0] == "last.pt"]
    assert [e[1][1] for e in kinds if e[0] == "log_artifact"] == [0, 3, 6, 8, 9]
    for step in range(10):
        metrics = kinds.index(("log_metrics", step))
        assert any(e[0] == "log_artifact" and e[1][1] >= step for e in kinds[:metrics]), kinds
        assert kinds.count(("log_metrics", step)) == 1
    assert kinds[-1] == ("set_tags", "9")


def test_a_stop_writes_the_held_best_state_then_the_current_one(io: EpochIO, tmp_path: Path, tracker: Any) -> None:
    """SIGTERM/SIGINT between epochs while an improving epoch is held (duty rule): best.pt gets the held
    state, last.pt the state at the stop; nothing is lost that the run had reported as its best."""
    model, optimizer = _trained_model()
    ctx = _ctx(model, optimizer)
    ckpt = CheckpointHook(tmp_path / "weights", tracker, {"mlflow_run_id": "r0"}, io)
    for step, improved in enumerate([True, True, False]):
        ctx.state.epoch = step + 1
        ctx.last = EpochOutput({"train/loss": float(step)}, torch.zeros(2, 2), torch.zeros(2, 2), improved=improved)
        with torch.no_grad():
            next(model.parameters()).fill_(float(step))
        ckpt.on_epoch_end(ctx)
        io.drain()
        ckpt.write_s, ckpt.queued_at = 0.3, time.monotonic()  # every later epoch is within the duty window
    assert ckpt.held == 1 and ckpt.deferred and ckpt.queued == 1
    ctx.state.batch = 0
    ckpt.on_interrupt(ctx)
    weights = tmp_path / "weights"
    assert int(next(iter(checkpoint.load(weights / "best.pt")["model"].values())).flatten()[0]) == 1
    assert checkpoint.load(weights / "best.pt")["progress"]["epoch"] == 2
    assert checkpoint.load(weights / "last.pt")["progress"]["epoch"] == 3 and not ckpt.deferred
    uploaded = [e[1] for e in tracker.events if e[0] == "log_artifact" and e[1][0] in ("best.pt", "last.pt")]
    assert uploaded[-3:] == [("best.pt", None), ("last.pt", 1), ("last.pt", 2)]  # the held state, then the stop
