"""Snapshots of a training state for a write on another thread: CPU copies that later training cannot change.

:func:`snapshot` copies synchronously: the calling thread waits until every CUDA tensor is on the host.
:func:`start_snapshot` (issue 9, tracking off the critical path) returns as soon as the copies are queued:

1. the CUDA tensors of each top-level section of the state (``model``, ``optimizer``, ...) and dtype are
   concatenated into one flat device buffer on the caller's *current* stream - the training stream (one or
   two ``cat`` launches instead of a clone per tensor: at an epoch end the GPU waits for the training
   thread, and ~200 clones, pinned allocations and copies of a resnet18 + momentum state took milliseconds
   of it). Stream order puts the copy after every queued optimizer step and before any kernel queued later,
   so an in-place update of the next step cannot reach it;
2. a side stream (one per device, created once) waits for it and copies each flat buffer into one pinned
   host buffer, while the training stream runs on; the device buffers are released at once,
   ``record_stream`` keeping their memory from training kernels until the side stream has read it;
3. :meth:`Snapshot.wait`, on the thread that serialises the state, blocks until the side stream is done
   and lays the host buffers out as the tensors: views with the original shapes and strides (a
   channels_last weight stays channels_last; a tensor whose memory is not one dense block was made
   contiguous). Sections get separate buffers, so a ``model`` taken out of a loaded checkpoint and saved
   again (a packaged model) does not carry the optimizer's bytes.

The device buffers cost memory the size of the CUDA tensors for a few milliseconds; when the device cannot
spare it (see :func:`_room_for_clones`) that device's tensors are copied synchronously, as :func:`snapshot` does.
"""
from __future__ import annotations

import copy
import threading
from typing import Any, Callable

import torch

__all__ = ["HEADROOM_BYTES", "Snapshot", "snapshot", "start_snapshot"]

HEADROOM_BYTES = 256 << 20  # device memory left free beyond the clones' share (see _room_for_clones)

# Exact types of values that are kept as they are (immutable). A list or tuple of only these is copied whole:
# the RNG state's Mersenne Twister list has 625 ints, and walking them one call each took ~0.3 ms of an epoch end.
_ATOMS = frozenset({type(None), bool, int, float, complex, str, bytes})


def _plain(items: list[Any] | tuple[Any, ...]) -> bool:
    """Whether every item is an immutable scalar (exact types: subclasses may carry state)."""
    return all(type(v) in _ATOMS for v in items)


_side_streams: dict[torch.device, torch.cuda.Stream] = {}
_side_streams_lock = threading.Lock()


class Snapshot:
    """A CPU copy of a state whose CUDA tensors may still be arriving; :meth:`wait` hands it out once complete."""

    def __init__(self, state: Any, done: list[torch.cuda.Event], hosts: list[torch.Tensor | None],
                 lazy: list[Callable[[list[torch.Tensor | None]], None]]) -> None:
        self._state = state  # private: its CUDA tensors are slots until wait() fills them with host copies
        self._done = done  # one event per device copied in the background, recorded after its last copy
        self._hosts = hosts  # host copy per slot (background copies: laid out by ``lazy`` in wait())
        self._lazy = lazy
        self._filled = False

    @property
    def background(self) -> bool:
        """Whether some copies run behind the caller (False: everything was complete when it was made)."""
        return bool(self._done)

    def wait(self) -> Any:
        """Block until every copy has landed, then return the state (for the serialising thread)."""
        for event in self._done:
            event.synchronize()
        if not self._filled:  # on the waiting thread: building the host views is not the training thread's work
            for fill in self._lazy:
                fill(self._hosts)
            self._state = _fill(self._state, self._hosts)
            self._filled = True
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
    pending: list[torch.Tensor] = []
    groups: dict[tuple[str, torch.device, torch.dtype], list[int]] = {}
    if isinstance(obj, dict):  # one flat buffer per top-level section: a saved "model" never carries optimizer bytes
        state = copy.copy(obj)
        memo: dict[int, Any] = {}
        for key, value in obj.items():
            state[key] = _snapshot(value, memo, pending, groups, str(key))
    else:
        state = _snapshot(obj, {}, pending, groups, "")
    hosts: list[torch.Tensor | None] = [None] * len(pending)
    done: list[torch.cuda.Event] = []
    lazy: list[Callable[[list[torch.Tensor | None]], None]] = []
    waited: list[torch.device] = []
    for device, keys in _by_device(groups).items():
        if background and _room_for_clones(device, [pending[i] for k in keys for i in groups[k]], headroom_bytes):
            event, fills = _copy_behind(device, [(k[2], [(i, pending[i]) for i in groups[k]]) for k in keys])
            done.append(event)
            lazy.extend(fills)
            continue
        for key in keys:
            for i in groups[key]:
                hosts[i] = torch.empty(pending[i].shape, dtype=pending[i].dtype, pin_memory=True)
                hosts[i].copy_(pending[i], non_blocking=True)
        waited.append(device)
    for device in waited:  # after every device's copies were queued, so that devices copy in parallel
        torch.cuda.current_stream(device).synchronize()
    return Snapshot(state, done, hosts, lazy)


class _Slot:
    """Where a CUDA tensor's host copy goes in the snapshot's tree (index into the pending list)."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


def _snapshot(obj: Any, memo: dict[int, Any], pending: list[torch.Tensor],
              groups: dict[tuple[str, torch.device, torch.dtype], list[int]], section: str) -> Any:
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            t = obj.detach()
            if t.device.type == "cuda":  # copied later: a slot now (the tree is built on the training thread)
                groups.setdefault((section, t.device, t.dtype), []).append(len(pending))
                memo[id(obj)] = _Slot(len(pending))
                pending.append(t)
            else:
                memo[id(obj)] = t.clone()
        return memo[id(obj)]
    if isinstance(obj, dict):
        out = copy.copy(obj)  # same type, same attributes; every value replaced below
        for key, value in obj.items():
            out[key] = _snapshot(value, memo, pending, groups, section)
        return out
    if isinstance(obj, list):
        if type(obj) is list and _plain(obj):
            return obj.copy()  # a later append or assignment does not reach the copy; its items are immutable
        items = [_snapshot(v, memo, pending, groups, section) for v in obj]
        if type(obj) is list:
            return items
        out_list = copy.copy(obj)
        out_list[:] = items
        return out_list
    if isinstance(obj, tuple):
        if _plain(obj):
            return obj  # immutable all the way down
        items = [_snapshot(v, memo, pending, groups, section) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)  # namedtuple or tuple
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, torch.dtype, torch.device)):
        return obj  # immutable
    return copy.deepcopy(obj)


def _fill(obj: Any, hosts: list[torch.Tensor | None]) -> Any:
    """Put the host copies in their slots (the tree is the snapshot's own: dicts and lists change in place)."""
    if isinstance(obj, _Slot):
        return hosts[obj.index]
    if isinstance(obj, dict):
        for key, value in obj.items():
            obj[key] = _fill(value, hosts)
        return obj
    if isinstance(obj, (list, tuple)) and _plain(obj):
        return obj  # no slot in it
    if isinstance(obj, list):
        obj[:] = [_fill(v, hosts) for v in obj]
        return obj
    if isinstance(obj, tuple):
        items = [_fill(v, hosts) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


def _by_device(groups: dict[tuple[str, torch.device, torch.dtype], list[int]]) -> dict[torch.device, list[Any]]:
    out: dict[torch.device, list[Any]] = {}
    for key in groups:
        out.setdefault(key[1], []).append(key)
    return out


def _room_for_clones(device: torch.device, tensors: list[torch.Tensor], headroom_bytes: int) -> bool:
    """Whether cloning ``tensors`` on ``device`` cannot make training run out of memory.

    Only memory the driver reports free counts: blocks the caching allocator holds unused at an epoch end
    are the next step's activations, and clones placed there make that step allocate anew. Twice the clones'
    bytes, because the allocator rounds and splits blocks, plus a margin for whatever else allocates.
    """
    needed = sum(t.numel() * t.element_size() for t in tensors)
    free, _total = torch.cuda.mem_get_info(device)
    return free >= 2 * needed + headroom_bytes


def _flat_memory(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """A 1-D view of ``t``'s memory and the strides that lay it out again; a copy (contiguous strides) when
    its elements are not one dense block (a transposed or sliced tensor)."""
    if t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)):
        # Dense and non-overlapping: its numel elements fill [storage_offset, storage_offset + numel) in some
        # order, which its own strides describe (channels_last weights keep their layout in the file).
        return t.as_strided((t.numel(),), (1,), t.storage_offset()), tuple(t.stride())
    dense = t.contiguous()
    return dense.view(-1), tuple(dense.stride())


def _copy_behind(device: torch.device, groups: list[tuple[torch.dtype, list[tuple[int, torch.Tensor]]]]
                 ) -> tuple[torch.cuda.Event, list[Callable[[list[torch.Tensor | None]], None]]]:
    """Per (section, dtype) group: one ``torch.cat`` of the tensors' memory into a flat device buffer on the
    current stream (the clone: a launch or two instead of one per tensor), then one copy of it into a pinned
    host buffer on the side stream. Returns the event recorded after the last copy, and per group the function
    that lays the host buffer out as the tensors (views with their shapes and strides), for ``Snapshot.wait``."""
    current = torch.cuda.current_stream(device)
    side = _side_stream(device)
    fills: list[Callable[[list[torch.Tensor | None]], None]] = []
    with torch.cuda.device(device):
        flats = []
        for dtype, members in groups:
            parts, layout, offset = [], [], 0
            for index, t in members:
                flat, strides = _flat_memory(t)
                parts.append(flat)
                layout.append((index, tuple(t.shape), strides, offset))
                offset += flat.numel()
            flat_device = torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device=device)
            host = torch.empty(offset, dtype=dtype, pin_memory=True)
            flats.append((flat_device, host))
            fills.append(_layout_fill(host, layout))
        side.wait_stream(current)  # an event after the concatenations, waited for by the side stream
        with torch.cuda.stream(side):
            for flat_device, host in flats:
                host.copy_(flat_device, non_blocking=True)
                # Freed below while the copy may not have run: the allocator must not hand this memory to
                # a training kernel before the side stream's work queued so far is done.
                flat_device.record_stream(side)
        # Blocking: the writer thread sleeps in wait() instead of spinning on a core the loader may need.
        done = torch.cuda.Event(blocking=True)
        done.record(side)
    del flats  # the device buffers return to the allocator now, reusable once the copies ran
    return done, fills


def _layout_fill(host: torch.Tensor, layout: list[tuple[int, tuple[int, ...], tuple[int, ...], int]]
                 ) -> Callable[[list[torch.Tensor | None]], None]:
    def fill(hosts: list[torch.Tensor | None]) -> None:
        for index, shape, strides, offset in layout:
            hosts[index] = host.as_strided(shape, strides, offset)

    return fill


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    with _side_streams_lock:
        if device not in _side_streams:
            _side_streams[device] = torch.cuda.Stream(device=device)
        return _side_streams[device]
