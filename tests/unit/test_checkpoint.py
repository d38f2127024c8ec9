"""mltrack.checkpoint: plain-data states that load weights-only, sha256 manifests, and the crash-safe write
protocol, crashed for real (subprocesses that die inside ``save``) at every step of it."""
from __future__ import annotations

import copy
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mltrack import checkpoint
from mltrack.errors import CheckpointError

REPO = Path(__file__).resolve().parents[2]


def _state(epoch: int, pad_mb: int = 0) -> dict[str, Any]:
    torch.manual_seed(epoch)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(3))
    model(torch.zeros(1, 3, 8, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.rand(2, 3, 8, 8)).sum().backward()
    opt.step()
    gen = torch.Generator().manual_seed(epoch)
    state = {"schema": checkpoint.SCHEMA, "model": model.state_dict(), "optimizer": opt.state_dict(),
             "progress": {"epoch": epoch, "batch": 0, "history": [{"epoch": float(epoch - 1), "train/loss": 0.5}]},
             "rng": checkpoint.rng_state(gen), "config": {"training": {"num_epochs": 4}}, "class_map": ["a", "b"]}
    if pad_mb:
        state["pad"] = torch.zeros(pad_mb * 2**18)  # pad_mb MiB of float32
    return state


def test_state_round_trips_weights_only_with_no_safe_globals(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    state = _state(3)
    digest = checkpoint.save(state, path)
    assert checkpoint.manifest_digests(path) == [digest] == [checkpoint.sha256_file(path)]
    torch.serialization.clear_safe_globals()
    raw = torch.load(path, weights_only=True)  # plain data: nothing to allow-list
    assert raw["progress"] == state["progress"] and raw["class_map"] == ["a", "b"]
    loaded = checkpoint.load(path)
    assert all(torch.equal(loaded["model"][k], v) for k, v in state["model"].items())
    assert loaded["optimizer"]["state"][0]["step"] == state["optimizer"]["state"][0]["step"]


def test_rng_state_restores_every_generator_exactly() -> None:
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    saved = checkpoint.rng_state(gen)
    draws = (torch.rand(3), random.random(), np.random.rand(2), torch.rand(2, generator=gen))
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    other = torch.Generator().manual_seed(99)
    checkpoint.set_rng_state(saved, other)
    again = (torch.rand(3), random.random(), np.random.rand(2), torch.rand(2, generator=other))
    assert torch.equal(draws[0], again[0]) and draws[1] == again[1]
    assert np.array_equal(draws[2], again[2]) and torch.equal(draws[3], again[3])


def test_corruption_truncation_and_missing_manifest_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    checkpoint.save(_state(2), path)
    good = path.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x40
    for bad in (bytes(flipped), good[: len(good) // 2]):
        path.write_bytes(bad)
        with pytest.raises(CheckpointError, match="checksum mismatch"):
            checkpoint.load(path)
    path.write_bytes(good)
    checkpoint.manifest_path(path).unlink()
    with pytest.raises(CheckpointError, match="no sha256 manifest"):
        checkpoint.load(path)


class Evil:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("with_manifest", [True, False])
def test_hostile_pickle_is_unsafe_even_with_forced_unsafe_loads(with_manifest: bool, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    pwned, path = tmp_path / "PWNED", tmp_path / "last.pt"
    torch.save({"schema": checkpoint.SCHEMA, "model": {}, "x": Evil(pwned)}, path)
    if with_manifest:
        checkpoint.manifest_path(path).write_text(f"{checkpoint.sha256_file(path)}  last.pt\n")
    with pytest.raises(CheckpointError, match=r"unsafe checkpoint .*'posix\.system'"):
        checkpoint.load(path)
    assert not pwned.exists()


def test_copy_verified_refuses_a_source_that_does_not_verify(tmp_path: Path) -> None:
    src, dst = tmp_path / "last.pt", tmp_path / "prev.pt"
    checkpoint.save(_state(1), src)
    digest = checkpoint.copy_verified(src, dst)
    assert dst.read_bytes() == src.read_bytes() and checkpoint.manifest_digests(dst) == [digest]
    checkpoint.save(_state(2), src)  # replacing src (atomically) leaves the copy as it was
    checkpoint.verify(dst)
    assert checkpoint.load(dst)["progress"]["epoch"] == 1
    src.write_bytes(src.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        checkpoint.copy_verified(src, dst)
    assert checkpoint.load(dst)["progress"]["epoch"] == 1


_CRASHING_SAVE = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_checkpoint import _state
from mltrack import checkpoint
from pathlib import Path
for epoch in range(2, {epochs}):
    checkpoint.save(_state(epoch, {pad}), Path({path!r}))
"""


def _crash_in_save(path: Path, fault: str | None, epochs: int = 3, pad: int = 0) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if fault:
        env.update({"MLTRACK_FAULT_AT": fault, "MLTRACK_FAULT_EPOCH": "1", "MLTRACK_FAULT_ACTION": "exit"})
    code = _CRASHING_SAVE.format(tests=str(Path(__file__).parent), epochs=epochs, pad=pad, path=str(path))
    return subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)


@pytest.mark.parametrize("fault, survivor", [("ckpt_write_half", 1), ("ckpt_before_replace", 1),
                                             ("ckpt_after_replace", 2)])
def test_a_crash_at_any_step_of_a_write_leaves_a_verified_checkpoint(fault: str, survivor: int,
                                                                    tmp_path: Path) -> None:
    """T03: the process dies (os._exit) inside save() of epoch 2 over a good epoch-1 last.pt."""
    path = tmp_path / "weights" / "last.pt"
    checkpoint.save(_state(1), path)
    before = path.read_bytes()
    proc = _crash_in_save(path, fault)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 137, err.decode()[-2000:]
    checkpoint.verify(path)  # whichever file is there, its manifest accepts it
    assert checkpoint.load(path)["progress"]["epoch"] == survivor
    if survivor == 1:
        assert path.read_bytes() == before  # the previous good file, byte for byte
    strays = list(path.parent.glob(".*.tmp"))
    assert bool(strays) == (fault != "ckpt_after_replace")
    assert checkpoint.clean_stale_tmp(path.parent) == strays and not list(path.parent.glob(".*.tmp"))
    checkpoint.save(_state(3), path)  # the next write works over what the crash left
    assert checkpoint.load(path)["progress"]["epoch"] == 3 and len(checkpoint.manifest_digests(path)) == 1


def test_kill9_during_50mb_writes_never_leaves_a_truncated_checkpoint(tmp_path: Path) -> None:
    """T03 variant: a real SIGKILL while a 50 MB checkpoint is being written (its temp file exists)."""
    path = tmp_path / "last.pt"
    checkpoint.save(_state(1, pad_mb=50), path)
    full = path.stat().st_size
    for delay in (0.0, 0.05, 0.3):
        proc = _crash_in_save(path, None, epochs=60, pad=50)
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".last.pt.*.tmp")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
            time.sleep(0.005)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
        checkpoint.verify(path)
        state = checkpoint.load(path)
        assert path.stat().st_size >= full - 1024 and state["pad"].numel() == 50 * 2**18
        checkpoint.clean_stale_tmp(tmp_path)


# ---------------------------------------------------------------- what a resume may change (mltrack.resume)


def _point(**progress: Any) -> Any:
    from mltrack.config import load_config, to_dict
    from mltrack.resume import ResumePoint

    cfg = to_dict(load_config(None, ["training.num_epochs=4", "training.batch_size=4", "model.num_classes=3"]))
    state = {"config": cfg, "progress": {"epoch": 2, "batch": 0, **progress}}
    return ResumePoint("runs:/r/weights/last.pt", Path("last.pt"), state, "r")


@pytest.mark.parametrize("sets, allow, message", [
    (["model.architecture=resnet18"], True, "the architecture differs"),
    (["model.num_classes=4"], True, "the class count differs"),
    (["training.trainer_type=dp"], True, "the trainer differs"),
    (["optimizer.lr=0.1"], False, "optimizer.lr 0.003 -> 0.1; pass --allow-config-change"),
])
def test_resume_config_refuses_what_would_change_the_checkpoint_meaning(sets: list[str], allow: bool,
                                                                        message: str) -> None:
    from mltrack.resume import resume_config

    point = _point()
    before = copy.deepcopy(point.state["config"])
    with pytest.raises(CheckpointError, match=re.escape(message)):
        resume_config(point, sets, {}, allow)
    assert point.state["config"] == before  # the checkpoint's own config is never edited


def test_resume_config_records_drift_and_guards_positions_and_finished_runs() -> None:
    from mltrack.resume import resume_config

    point = _point()
    cfg = resume_config(point, ["optimizer.lr=0.1"], {"num_epochs": 6}, allow_config_change=True)
    assert cfg.optimizer.lr == 0.1 and cfg.training.num_epochs == 6
    assert point.drift == {"optimizer.lr": (0.003, 0.1), "training.num_epochs": (4, 6)}
    inside = _point(batch=3)
    with pytest.raises(CheckpointError, match="inside epoch 2 .after batch 3.*training.batch_size changed"):
        resume_config(inside, ["training.batch_size=8"], {}, allow_config_change=True)
    assert resume_config(inside, [], {"num_workers": 2}, False).data.num_workers == 2
    finished = _point()
    finished.state["_run_status"] = "FINISHED"
    with pytest.raises(CheckpointError, match="FINISHED after 2 epochs; pass --num-epochs larger than 2"):
        resume_config(finished, [], {"num_epochs": 2}, False)
    assert resume_config(finished, [], {"num_epochs": 3}, False).training.num_epochs == 3


def test_resume_of_a_checkpoint_older_than_a_config_key() -> None:
    """A key added to mltrack after the checkpoint was written resumes at its default without drift; set to
    something else it is drift like any change."""
    from mltrack.resume import resume_config

    point = _point()
    del point.state["config"]["training"]["tf32"], point.state["config"]["data"]["mixup_alpha"]
    cfg = resume_config(point, [], {}, allow_config_change=False)
    assert point.drift == {} and cfg.training.tf32 is True and cfg.data.mixup_alpha == 0.0
    with pytest.raises(CheckpointError, match=re.escape("data.mixup_alpha None -> 0.2")):
        resume_config(point, ["data.mixup_alpha=0.2"], {}, allow_config_change=False)
