"""The non-finite-loss guard's counters, kept on the device so that guarding a step costs no host sync.

Per optimizer step the loop hands in ``bad`` (0-d int64 tensor, 1 when the step's loss was NaN/inf and the
step was skipped). The counters (current streak, longest streak, total) stay on the loss's device; the
host learns the longest streak through a pinned-memory copy queued behind the step and read once it has
landed (``HostPeek``), so on a GPU a failing run stops a step or two after its limit was reached instead of
every step waiting for the GPU to drain. The weights are safe meanwhile: each bad step was skipped.
"""
from __future__ import annotations

from typing import Optional

import torch



class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss."""


class HostPeek:
    """The value of a small device tensor, read without stalling the host.

    On CUDA ``poll(t)`` queues a copy of ``t`` into pinned memory and returns the value of an earlier
    copy once it has completed (None while none has); on CPU it returns ``int(t)`` at once.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.pending = False
        if self.cuda:
            self.buffer = torch.zeros((), dtype=torch.int64, pin_memory=True)
            self.event = torch.cuda.Event()

    def poll(self, value: torch.Tensor) -> Optional[int]:
        if not self.cuda:
            return int(value)
        seen = None
        if self.pending and self.event.query():
            seen, self.pending = int(self.buffer), False
        if not self.pending:
            self.buffer.copy_(value, non_blocking=True)
            self.event.record()
            self.pending = True
        return seen


class NonFiniteCounters:
    """Streak / longest streak / total of skipped non-finite steps in one epoch (or its remainder)."""

    def __init__(self, device: torch.device, streak: int, limit: int) -> None:
        self.streak = torch.tensor(streak, dtype=torch.int64, device=device)
        self.longest = self.streak.clone()
        self.total = torch.zeros((), dtype=torch.int64, device=device)
        self.limit = limit
        self.peek = HostPeek(device)

    def update(self, bad: torch.Tensor, epoch: int, batch: int) -> None:
        """Count one optimizer step (``bad`` 1: skipped); raise once a streak of ``limit`` is known."""
        self.streak = (self.streak + bad) * bad  # +1 on a bad step, back to 0 on a good one
        self.longest = torch.maximum(self.longest, self.streak)
        self.total += bad
        longest = self.peek.poll(self.longest)
        if longest is not None and longest >= self.limit:  # the message is built only when it is needed
            self.check(longest, f"epoch {epoch}, batch {batch}")

    def check(self, longest: Optional[int], where: str) -> None:
        if longest is not None and longest >= self.limit:
            raise NonFiniteLossError(
                f"{longest} consecutive optimizer steps had a non-finite loss ({where}); "
                "lower the learning rate or check the data"
            )

    def check_now(self, where: str) -> None:
        """The exact check (one host read), at the end of an epoch."""
        self.check(int(self.longest), where)
