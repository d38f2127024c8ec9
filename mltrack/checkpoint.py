"""Versioned plain-data checkpoints: atomic writes, sha256 manifests, weights-only loads.

A checkpoint is a dict of tensors, lists, dicts and primitives only, so that
``torch.load(weights_only=True)`` with an empty safe-globals list can read it: anything that would
need unpickling of arbitrary globals is by construction not ours and is refused as unsafe.

Write protocol (``save`` and ``copy_verified``), safe against a crash at any instruction:

1. the new bytes go to a temp file ``.<name>.<pid>.tmp`` in the same directory, fsync'd;
2. the manifest ``<name>.sha256`` is atomically rewritten to list the new digest *and* the current
   one, so whichever file sits at ``<name>`` verifies;
3. ``os.replace(tmp, <name>)`` + fsync of the directory;
4. the manifest is atomically rewritten to list only the new digest.

A previous good file is therefore never overwritten before the new one is complete, no file named
``<name>`` is ever truncated, and a file and its manifest always agree. Temp files left by a crash
are ignored and removed by :func:`clean_stale_tmp` on the next start.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch

from mltrack.errors import CheckpointError

SCHEMA = 1
MANIFEST_SUFFIX = ".sha256"
TMP_SUFFIX = ".tmp"


_HASH_CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    # Big chunks, not hashlib.file_digest: that reads 256 KB at a time, each read and update taking the GIL
    # back, so hashing a checkpoint on the epoch-IO thread slowed a thread launching small ops to 0.70-0.83x;
    # with 8 MB chunks 0.94-1.02x, and the hash itself was faster (69 against 81-84 ms for 90 MB; 2-core CPU machine,
    # bench/results_probe_save_gil_cpu2.txt). Both the read and the update release the GIL for their span.
    digest, buf = hashlib.sha256(), bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def manifest_path(path: Path) -> Path:
    return path.with_name(path.name + MANIFEST_SUFFIX)


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


def _fsync_dir(directory: Path) -> None:
    # A rename is durable only once the directory entry is on disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_tmp(path: Path, write: Callable[[BinaryIO], Any], fault_epoch: int | None = None) -> Path:
    """Write ``path``'s temp file completely and fsync it; return the temp path."""
    tmp = _tmp_path(path)
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        if fault_epoch is not None and _fault_armed("ckpt_write_half", fault_epoch):  # a crash mid-write
            fh.truncate(fh.tell() // 2)
            os.fsync(fh.fileno())
            _fault("ckpt_write_half", fault_epoch)
        os.fsync(fh.fileno())
    return tmp


def _write_manifest(path: Path, digests: list[str]) -> None:
    manifest = manifest_path(path)
    body = "".join(f"{d}  {path.name}\n" for d in dict.fromkeys(digests))
    tmp = _write_tmp(manifest, lambda fh: fh.write(body.encode()))
    os.replace(tmp, manifest)
    _fsync_dir(path.parent)


def manifest_digests(path: Path) -> list[str]:
    """The sha256 digests the manifest of ``path`` accepts (empty when there is no manifest)."""
    manifest = manifest_path(path)
    if not manifest.is_file():
        return []
    return [line.split()[0] for line in manifest.read_text().splitlines() if line.strip()]


def _install(tmp: Path, path: Path, digest: str, fault_epoch: int | None = None) -> None:
    """Steps 2-4 of the module's write protocol: ``tmp`` (complete, fsync'd) becomes ``path``."""
    current = manifest_digests(path) if path.exists() else []
    _write_manifest(path, [digest, *current[:1]])
    _fault("ckpt_before_replace", fault_epoch)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    _fault("ckpt_after_replace", fault_epoch)
    _write_manifest(path, [digest])


def _fault_armed(point: str, epoch: int | None) -> bool:
    if os.environ.get("MLTRACK_FAULT_AT") != point:
        return False
    from mltrack.trainers.loop import fault_matches  # only under fault injection

    return fault_matches(point, epoch)


def _fault(point: str, epoch: int | None) -> None:
    """Fault injection (tests only; saves of training states only): see :func:`mltrack.trainers.loop.fault`."""
    if epoch is not None and os.environ.get("MLTRACK_FAULT_AT") == point:
        from mltrack.trainers.loop import fault

        fault(point, epoch)


def _fault_epoch(state: dict[str, Any]) -> int | None:
    # The epoch a save belongs to: the one just completed, or the one a mid-epoch save interrupts.
    progress = state.get("progress")
    if not isinstance(progress, dict) or "epoch" not in progress:
        return None
    return int(progress["epoch"]) - (0 if progress.get("batch") else 1)


def save(state: dict[str, Any], path: Path) -> str:
    """Write ``state`` to ``path`` with the module's crash-safe protocol; return its sha256 digest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    epoch = _fault_epoch(state)
    tmp = _write_tmp(path, lambda fh: torch.save(state, fh), epoch)
    try:
        _install(tmp, path, sha256_file(tmp), epoch)
    finally:
        tmp.unlink(missing_ok=True)
    return manifest_digests(path)[0]


def copy_verified(src: Path, dst: Path, digest: str | None = None) -> str:
    """Make ``dst`` (+ manifest) a verified copy of ``src`` with the same protocol; return the digest.

    A hard link when the filesystem allows (O(1), and immune to a later atomic replace of ``src``).
    Raises CheckpointError if ``src`` does not verify against its manifest. ``digest``: the sha256 the
    caller itself computed when it wrote ``src`` in this process; a hard link then shares those very
    bytes, so neither side is hashed again (each checkpoint is hashed once, when it is written).
    """
    if digest is None:
        verify(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(dst)
    tmp.unlink(missing_ok=True)
    linked = True
    try:
        os.link(src, tmp)
    except OSError:
        linked = False
        shutil.copyfile(src, tmp)
    try:
        if digest is None or not linked:
            digest = sha256_file(tmp)  # what was linked/copied, not what the manifest claimed a moment ago
        _install(tmp, dst, digest)
    finally:
        tmp.unlink(missing_ok=True)
    return digest


def clean_stale_tmp(directory: Path) -> list[Path]:
    """Remove temp files left by a crash during a write; return what was removed.

    Call only while no other process writes checkpoints into ``directory`` (one run, one writer).
    """
    removed = []
    if directory.is_dir():
        for stray in directory.glob(f".*{TMP_SUFFIX}"):
            stray.unlink(missing_ok=True)
            removed.append(stray)
    return removed


def verify(path: Path) -> None:
    """Check ``path`` against its manifest; CheckpointError('checksum mismatch …') if it differs,
    CheckpointError('no sha256 manifest …') if there is none."""
    expected = manifest_digests(path)
    if not expected:
        raise CheckpointError(
            f"no sha256 manifest next to {path} ({path.name}{MANIFEST_SUFFIX}): the checkpoint cannot be verified "
            "(incomplete upload, or not written by mltrack); resume from a checkpoint logged with its manifest"
        )
    actual = sha256_file(path)
    if actual not in expected:
        raise CheckpointError(
            f"checksum mismatch for {path}: sha256 {actual[:12]}… but the manifest says {expected[0][:12]}…; "
            "the file is corrupted or truncated (use --fallback-previous to resume from the previous verified one)"
        )


def load(path: Path, check_manifest: bool = True) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` only; unsafe pickles become a CheckpointError.

    ``weights_only=True`` is passed explicitly, which torch honours even when
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set in the environment. Order: a manifest that exists is checked
    first (checksum mismatch); a file without one is still read weights-only, so that a hostile pickle is
    reported as unsafe, and then refused as unverified.
    """
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    has_manifest = bool(manifest_digests(path))
    if check_manifest and has_manifest:
        verify(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        offending = _offending_global(str(err))
        raise CheckpointError(
            f"unsafe checkpoint {path}: it needs the global '{offending}' to load, which a weights-only load "
            "refuses; mltrack checkpoints are plain data. Do not load this file."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(err).splitlines()[0][:300]}") from None
    if check_manifest and not has_manifest:
        verify(path)  # raises: no manifest
    if not isinstance(state, dict) or state.get("schema") != SCHEMA:
        raise CheckpointError(f"{path} is not an mltrack checkpoint (schema {SCHEMA} expected)")
    return state


def _offending_global(message: str) -> str:
    # torch's message reads "... unsupported GLOBAL posix.system whose module posix is blocked ..."
    marker = "GLOBAL "
    if marker in message:
        return message.split(marker, 1)[1].split()[0]
    return message.strip().splitlines()[0][:200]


# ---------------------------------------------------------------- RNG state as plain data


def rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every RNG that influences training, as tensors/lists (no numpy objects: weights-only safe)."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(mt), gauss],
        "numpy": [str(np_state[0]), torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if generator is not None:
        state["loader"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Restore what :func:`rng_state` captured (the loader generator only when both sides have one)."""
    torch.set_rng_state(state["torch"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "loader" in state:
        generator.set_state(state["loader"])
