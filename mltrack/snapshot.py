"""Snapshots of a training state for a write on another thread: CPU copies that later training cannot change.

:func:`snapshot` copies synchronously: the calling thread waits until every CUDA tensor is on the host.
:func:`start_snapshot` (issue 9, tracking off the critical path) returns as soon as the copies are queued:

1. every CUDA tensor is cloned on the device, on the caller's *current* stream - the training stream. Stream
   order puts the clone after every queued optimizer step and before any kernel queued later, so an in-place
   update of the next step cannot reach it; a device-to-device copy costs a fraction of the PCIe transfer;
2. a side stream (one per device, created once) waits for the clones and copies them into pinned host
   tensors, while the training stream runs on; the clones are released at once, ``record_stream`` keeping
   their memory from training kernels until the side stream has read it;
3. :meth:`Snapshot.wait`, on the thread that serialises the state, blocks until the side stream is done.

The clones cost device memory the size of the CUDA tensors for a few milliseconds; when the device cannot
spare it (see :func:`_room_for_clones`) that device's tensors are copied synchronously, as :func:`snapshot` does.
"""
from __future__ import annotations

import copy
import threading
from typing import Any

import torch

__all__ = ["HEADROOM_BYTES", "Snapshot", "snapshot", "start_snapshot"]

HEADROOM_BYTES = 256 << 20  # device memory left free beyond the clones' share (see _room_for_clones)

_Pending = list[tuple[torch.Tensor, torch.Tensor]]  # (CUDA source, pinned host destination), one per tensor

_side_streams: dict[torch.device, torch.cuda.Stream] = {}
_side_streams_lock = threading.Lock()


class Snapshot:
    """A CPU copy of a state whose CUDA tensors may still be arriving; :meth:`wait` hands it out once complete."""

    def __init__(self, state: Any, done: list[torch.cuda.Event]) -> None:
        self._state = state  # private: the host tensors must not be read before wait()
        self._done = done  # one event per device copied in the background, recorded after its last copy

    @property
    def background(self) -> bool:
        """Whether some copies run behind the caller (False: everything was complete when it was made)."""
        return bool(self._done)

    def wait(self) -> Any:
        """Block until every copy has landed, then return the state (for the serialising thread)."""
        for event in self._done:
            event.synchronize()
        return self._state


def snapshot(obj: Any) -> Any:
    """A copy of ``obj`` (a checkpoint state) that later training cannot change, for a write on another thread.

    Every tensor is copied to the CPU: CUDA tensors into pinned memory with non-blocking copies and one
    synchronize per device at the end (instead of one blocking copy per tensor); CPU tensors are cloned.
    Dicts, lists and tuples are rebuilt (dict/list subclasses keep their type and attributes, such as the
    ``_metadata`` of a ``state_dict``), so an in-place optimizer step or a history append after this call
    does not reach the copy. A tensor that appears twice (tied weights) is copied once and stays shared.
    """
    return start_snapshot(obj, background=False).wait()


def start_snapshot(obj: Any, background: bool = True, headroom_bytes: int = HEADROOM_BYTES) -> Snapshot:
    """:func:`snapshot` without waiting for the CUDA copies: the caller's stream never stalls (module docstring).

    ``background=False`` is :func:`snapshot` exactly (synchronous IO modes keep the old behaviour), and so is a
    state without CUDA tensors. ``headroom_bytes``: device memory that must stay free on top of the clones'
    share, else that device is copied synchronously.
    """
    pending: _Pending = []
    state = _snapshot(obj, {}, pending)  # CPU work only: the device copies are queued below
    done: list[torch.cuda.Event] = []
    waited: list[torch.device] = []
    for device, pairs in _by_device(pending).items():
        if background and _room_for_clones(device, pairs, headroom_bytes):
            done.append(_copy_behind(device, pairs))
        else:
            for source, host in pairs:
                host.copy_(source, non_blocking=True)
            waited.append(device)
    for device in waited:  # after every device's copies were queued, so that devices copy in parallel
        torch.cuda.current_stream(device).synchronize()
    return Snapshot(state, done)


def _snapshot(obj: Any, memo: dict[int, torch.Tensor], pending: _Pending) -> Any:
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = _tensor_copy(obj.detach(), pending)
        return memo[id(obj)]
    if isinstance(obj, dict):
        out = copy.copy(obj)  # same type, same attributes; every value replaced below
        for key, value in obj.items():
            out[key] = _snapshot(value, memo, pending)
        return out
    if isinstance(obj, list):
        items = [_snapshot(v, memo, pending) for v in obj]
        if type(obj) is list:
            return items
        out_list = copy.copy(obj)
        out_list[:] = items
        return out_list
    if isinstance(obj, tuple):
        items = [_snapshot(v, memo, pending) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)  # namedtuple or tuple
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, torch.dtype, torch.device)):
        return obj  # immutable
    return copy.deepcopy(obj)


def _tensor_copy(t: torch.Tensor, pending: _Pending) -> torch.Tensor:
    """The CPU copy of ``t``: done now for a CPU tensor; for a CUDA one, an empty pinned tensor to fill later."""
    if t.device.type != "cuda":
        return t.clone()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    pending.append((t, host))
    return host


def _by_device(pending: _Pending) -> dict[torch.device, _Pending]:
    groups: dict[torch.device, _Pending] = {}
    for source, host in pending:
        groups.setdefault(source.device, []).append((source, host))
    return groups


def _room_for_clones(device: torch.device, pairs: _Pending, headroom_bytes: int) -> bool:
    """Whether cloning ``pairs`` on ``device`` cannot make training run out of memory.

    Only memory the driver reports free counts: blocks the caching allocator holds unused at an epoch end
    are the next step's activations, and clones placed there make that step allocate anew. Twice the clones'
    bytes, because the allocator rounds and splits blocks, plus a margin for whatever else allocates.
    """
    needed = sum(source.numel() * source.element_size() for source, _ in pairs)
    free, _total = torch.cuda.mem_get_info(device)
    return free >= 2 * needed + headroom_bytes


def _copy_behind(device: torch.device, pairs: _Pending) -> torch.cuda.Event:
    """Queue the clones on the current stream and their host copies on the side stream; return the event
    recorded after the last copy."""
    current = torch.cuda.current_stream(device)
    side = _side_stream(device)
    with torch.cuda.device(device):
        clones = [source.clone(memory_format=torch.contiguous_format) for source, _ in pairs]
        side.wait_stream(current)  # an event after the clones, waited for by the side stream
        with torch.cuda.stream(side):
            for clone, (_, host) in zip(clones, pairs):
                host.copy_(clone, non_blocking=True)
                # Freed below while the copy may not have run: the allocator must not hand this memory to
                # a training kernel before the side stream's work queued so far is done.
                clone.record_stream(side)
        # Blocking: the writer thread sleeps in wait() instead of spinning on a core the loader may need.
        done = torch.cuda.Event(blocking=True)
        done.record(side)
    del clones  # the memory returns to the allocator now, reusable once the copies ran
    return done


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    with _side_streams_lock:
        if device not in _side_streams:
            _side_streams[device] = torch.cuda.Stream(device=device)
        return _side_streams[device]
