"""Issue 9, checkpoint snapshots off the critical path: ``snapshot.start_snapshot`` queues the copy of a
training state and returns; ``Snapshot.wait()`` (on the writer thread) hands out a copy equal to the state
at call time, whatever the training stream did to the tensors since."""
from __future__ import annotations

import copy
import threading
from collections import OrderedDict, namedtuple
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

from mltrack import checkpoint
from mltrack.hooks import CheckpointHook, EpochIO
from mltrack.snapshot import snapshot, start_snapshot
from tests.unit.test_epoch_io import _ctx

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

Pair = namedtuple("Pair", ["first", "second"])


class History(list):  # a list subclass with an attribute, as some states carry
    pass


def _mixed_state(device: str) -> dict[str, Any]:
    """A state with everything the tree walk distinguishes: a state_dict with ``_metadata``, tied tensors,
    a namedtuple, a list subclass, dtypes other than float32, a non-contiguous tensor, plain values."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4).to(device)
    weights = model.state_dict()
    history = History([{"epoch": 0.0, "train/loss": 1.5}])
    history.note = "kept"  # type: ignore[attr-defined]
    return {
        "schema": checkpoint.SCHEMA,
        "model": weights,
        "tied": [weights["weight"], (weights["weight"], 3)],
        "pair": Pair(torch.randn(3, device=device).to(torch.bfloat16),
                     torch.tensor([2**40, -7], dtype=torch.int64, device=device)),
        "transposed": torch.arange(12.0, device=device).reshape(3, 4).t(),
        "history": history,
        "meta": None,
        "python_rng": [3, [7, 2**40, -1], None],  # a list of plain values is copied whole (random's state)
        "frozen": (1, "a", 2.5, b"b", True),
    }


def _assert_same(got: Any, expected: Any) -> None:
    """Same types, same attributes, same tensors (dtype, shape, values) all the way down."""
    assert type(got) is type(expected)
    if isinstance(expected, torch.Tensor):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert got.device.type == "cpu" and torch.equal(got, expected.cpu())
        return
    assert getattr(got, "__dict__", {}) == getattr(expected, "__dict__", {})  # _metadata, list attributes
    if isinstance(expected, dict):
        assert list(got) == list(expected)
        for key in expected:
            _assert_same(got[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            _assert_same(g, e)
    else:
        assert got == expected


def _assert_tied(snap: dict[str, Any]) -> None:
    shared = snap["model"]["weight"]
    assert snap["tied"][0] is shared and snap["tied"][1][0] is shared


# ---------------------------------------------------------------- CPU


def test_start_snapshot_of_a_cpu_state_equals_snapshot_and_is_complete_at_once() -> None:
    state = _mixed_state("cpu")
    expected = snapshot(state)
    pending = start_snapshot(state)
    assert not pending.background  # nothing to copy from a device: no copy in flight
    snap = pending.wait()

    _assert_same(snap, expected)
    _assert_same(snap, state)
    _assert_tied(snap)
    assert snap["history"].note == "kept" and snap["model"]._metadata == state["model"]._metadata
    assert snap["model"]["weight"] is not state["model"]["weight"]
    state["model"]["weight"].add_(1)  # later training reaches neither copy
    state["history"].append({"epoch": 1.0})
    state["python_rng"][1][0] = 8
    assert torch.equal(snap["model"]["weight"], expected["model"]["weight"])
    assert len(snap["history"]) == 1
    assert snap["python_rng"] == [3, [7, 2**40, -1], None] == expected["python_rng"]
    assert pending.wait() is snap  # waiting twice is harmless


# ---------------------------------------------------------------- CUDA


def _queue_busy_work() -> None:
    """Some hundred milliseconds of matmuls on the current stream, so that what is queued next waits."""
    a = torch.randn(8192, 8192, device="cuda")
    out = torch.empty_like(a)
    for _ in range(20):
        torch.mm(a, a, out=out)


def _cuda_train_state() -> dict[str, Any]:
    """~100 MB of CUDA tensors shaped like weights and momentum buffers, plus a bf16 and an int64 one."""
    torch.manual_seed(1)
    weights = OrderedDict((f"layer{i}.weight", torch.randn(1024, 4096, device="cuda")) for i in range(3))
    weights._metadata = OrderedDict({"": {"version": 1}})  # type: ignore[attr-defined]
    return {"model": weights,
            "optimizer": {"state": {i: {"momentum_buffer": torch.randn(1024, 4096, device="cuda")}
                                    for i in range(3)}},
            "half": torch.randn(4096, device="cuda").to(torch.bfloat16),
            "steps": torch.arange(4096, dtype=torch.int64, device="cuda") * 2**33}


def _cuda_tensors(state: dict[str, Any]) -> list[torch.Tensor]:
    return [*state["model"].values(), *(s["momentum_buffer"] for s in state["optimizer"]["state"].values()),
            state["half"], state["steps"]]


def _map_tensors(state: dict[str, Any], fn: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
    """``state`` (as built by ``_cuda_train_state``) with ``fn`` applied to each tensor."""
    model = copy.copy(state["model"])  # keeps _metadata
    for key, value in model.items():
        model[key] = fn(value)
    return {"model": model,
            "optimizer": {"state": {i: {"momentum_buffer": fn(s["momentum_buffer"])}
                                    for i, s in state["optimizer"]["state"].items()}},
            "half": fn(state["half"]), "steps": fn(state["steps"])}


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    return t.to("cpu", copy=True)


def _assert_pinned(snap: Any) -> None:
    for t in _cuda_tensors(snap):
        assert t.device.type == "cpu" and t.is_pinned()


@cuda
def test_background_snapshot_holds_the_state_at_call_time_despite_later_in_place_updates() -> None:
    state = _cuda_train_state()
    before = _map_tensors(state, _host_copy)
    start_snapshot(state, headroom_bytes=0).wait()  # warm: side stream, pinned and device caches

    _queue_busy_work()
    for t in _cuda_tensors(state):  # an optimizer step queued, not run yet: the snapshot must include it
        t.mul_(2)
    pending = start_snapshot(state, headroom_bytes=0)
    returned_while_busy = not torch.cuda.current_stream().query()  # the call did not wait for the GPU
    for t in _cuda_tensors(state):  # the next step, in place, right after the call
        t.add_(1)
    snap = pending.wait()

    assert pending.background and returned_while_busy
    _assert_same(snap, _map_tensors(before, lambda t: t * 2))
    _assert_pinned(snap)
    assert snap["model"]._metadata == state["model"]._metadata
    torch.cuda.synchronize()
    _assert_same(_map_tensors(state, _host_copy), _map_tensors(before, lambda t: t * 2 + 1))


@cuda
def test_without_room_for_the_clones_the_copy_is_synchronous() -> None:
    state = _cuda_train_state()
    before = _map_tensors(state, _host_copy)
    _queue_busy_work()
    pending = start_snapshot(state, headroom_bytes=1 << 62)  # more than any device has free
    assert torch.cuda.current_stream().query()  # the training stream was waited for, as snapshot() does
    assert not pending.background
    for t in _cuda_tensors(state):
        t.add_(1)
    snap = pending.wait()
    _assert_same(snap, before)
    _assert_pinned(snap)


@cuda
def test_background_snapshot_keeps_ties_types_and_dtypes() -> None:
    state = _mixed_state("cuda")
    pending = start_snapshot(state, headroom_bytes=0)
    assert pending.background
    snap = pending.wait()
    _assert_same(snap, state)  # bf16, int64 beyond 32 bits, the transposed tensor's values and shape
    _assert_same(snap, snapshot(state))
    _assert_tied(snap)
    assert snap["pair"].first.is_pinned() and snap["transposed"].is_pinned()


@cuda
def test_background_snapshot_keeps_layouts_and_gives_each_section_its_own_buffer(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 4, 1))
    model = model.cuda().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 9, 9, device="cuda").to(memory_format=torch.channels_last)).sum().backward()
    optimizer.step()
    state = {"schema": checkpoint.SCHEMA, "model": model.state_dict(), "optimizer": optimizer.state_dict()}
    snap = start_snapshot(state, headroom_bytes=0).wait()

    _assert_same(snap, snapshot(state))  # values, dtypes (int64 num_batches_tracked), ties, _metadata
    weight = snap["model"]["0.weight"]
    assert weight.is_contiguous(memory_format=torch.channels_last) and weight.stride() == model[0].weight.stride()
    model_storage = {t.untyped_storage().data_ptr() for t in snap["model"].values() if t.dtype == torch.float32}
    optim_storage = {s["momentum_buffer"].untyped_storage().data_ptr() for s in snap["optimizer"]["state"].values()}
    assert len(model_storage) == 1 and len(optim_storage) == 1 and model_storage != optim_storage
    # A packaged model re-saves only the "model" section of a loaded checkpoint: no optimizer bytes ride along.
    checkpoint.save(snap, tmp_path / "full.pt")
    loaded = checkpoint.load(tmp_path / "full.pt")
    torch.save(loaded["model"], tmp_path / "model_only.pt")
    model_bytes = sum(t.numel() * t.element_size() for t in state["model"].values())
    assert (tmp_path / "model_only.pt").stat().st_size < model_bytes + 16_384
    restored = copy.deepcopy(model)
    restored.load_state_dict(loaded["model"])
    assert all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), model.state_dict().values()))


@pytest.fixture
def background_io() -> Iterator[EpochIO]:
    io = EpochIO(inline=False)
    yield io
    io.close(quiet=True)


@cuda
def test_checkpoint_hook_writes_the_epoch_end_state_of_a_cuda_model(background_io: EpochIO,
                                                                     tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 4)).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def train_step() -> None:
        optimizer.zero_grad()
        model(torch.randn(32, 256, device="cuda")).sum().backward()
        optimizer.step()

    train_step()
    ctx = _ctx(model, optimizer)
    hook = CheckpointHook(tmp_path / "weights", None, {}, background_io)
    gate = threading.Event()
    background_io.submit(gate.wait, 10)  # the writer is busy: the epoch's job waits while training goes on
    weights = {k: _host_copy(v) for k, v in model.state_dict().items()}
    momenta = {i: _host_copy(s["momentum_buffer"]) for i, s in optimizer.state_dict()["state"].items()}
    hook.on_epoch_end(ctx)
    for _ in range(3):
        train_step()
    gate.set()
    background_io.drain()

    saved = checkpoint.load(tmp_path / "weights" / "last.pt")
    assert list(saved["model"]) == list(weights)
    assert all(torch.equal(saved["model"][k], v) for k, v in weights.items())
    assert all(torch.equal(saved["optimizer"]["state"][i]["momentum_buffer"], m) for i, m in momenta.items())
    assert not torch.equal(model.state_dict()["0.weight"].cpu(), weights["0.weight"])  # training did move
