"""Versioned plain-data checkpoints: atomic writes, sha256 manifests, weights-only loads.

A checkpoint is a dict of tensors, lists, dicts and primitives only, so that
``torch.load(weights_only=True)`` with an empty safe-globals list can read it: anything that would
need unpickling of arbitrary globals is by construction not ours and is refused as unsafe.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mltrack.errors import CheckpointError

SCHEMA = 1
MANIFEST_SUFFIX = ".sha256"
TMP_SUFFIX = ".tmp"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Any) -> None:
    """Write via a temp file in the same directory, fsync, then os.replace over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        _fault("ckpt_before_replace")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _fault(point: str) -> None:
    """Crash here when MLTRACK_FAULT_AT names this point (fault-injection tests only)."""
    if os.environ.get("MLTRACK_FAULT_AT") == point:
        os._exit(137)


def save(state: dict[str, Any], path: Path) -> str:
    """Atomically write ``state`` to ``path`` and then its manifest ``path.sha256``; return the digest.

    The previous file at ``path`` stays intact until the new one is complete on disk; the manifest is
    written after the checkpoint, so a manifest always describes a complete file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda fh: torch.save(state, fh))
    digest = sha256_file(path)
    manifest = path.with_name(path.name + MANIFEST_SUFFIX)
    _atomic_write(manifest, lambda fh: fh.write(f"{digest}  {path.name}\n".encode()))
    return digest


def clean_stale_tmp(directory: Path) -> list[Path]:
    """Remove temp files left by a crash during a write; return what was removed."""
    removed = []
    if directory.is_dir():
        for stray in directory.glob(f".*{TMP_SUFFIX}"):
            stray.unlink(missing_ok=True)
            removed.append(stray)
    return removed


def verify(path: Path) -> None:
    """Check ``path`` against its manifest; raise CheckpointError('checksum mismatch …') if it differs."""
    manifest = path.with_name(path.name + MANIFEST_SUFFIX)
    if not manifest.is_file():
        raise CheckpointError(
            f"no sha256 manifest next to {path} ({manifest.name}); the checkpoint may be incomplete. "
            "Pass --no-verify only if you trust this file."
        )
    expected = manifest.read_text().split()[0]
    actual = sha256_file(path)
    if actual != expected:
        raise CheckpointError(
            f"checksum mismatch for {path}: sha256 {actual[:12]}… but the manifest says {expected[:12]}…; "
            "the file is corrupted or truncated (use --fallback-previous to resume from the previous verified one)"
        )


def load(path: Path, check_manifest: bool = True) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` only; unsafe pickles become a CheckpointError.

    ``weights_only=True`` is passed explicitly, which torch honours even when
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set in the environment.
    """
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if check_manifest:
        verify(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        offending = _offending_global(str(err))
        raise CheckpointError(
            f"unsafe checkpoint {path}: it needs the global '{offending}' to load, which a weights-only load "
            "refuses; mltrack checkpoints are plain data. Do not load this file."
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None
    if not isinstance(state, dict) or state.get("schema") != SCHEMA:
        raise CheckpointError(f"{path} is not an mltrack checkpoint (schema {SCHEMA} expected)")
    return state


def _offending_global(message: str) -> str:
    # torch's message reads "... Unsupported global: GLOBAL posix.system was not an allowed global ..."
    marker = "GLOBAL "
    if marker in message:
        return message.split(marker, 1)[1].split()[0]
    return message.splitlines()[0][:200]


# ---------------------------------------------------------------- RNG state as plain data


def rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every RNG that influences training, as tensors/lists (no numpy objects: weights-only safe)."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(mt), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if generator is not None:
        state["loader"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "loader" in state:
        generator.set_state(state["loader"])
