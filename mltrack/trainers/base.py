"""The variation points a trainer may change; the loop in ``loop.py`` calls only these.

A trainer never owns a training loop. It adapts precision (autocast), the backward pass, the optimizer
step (accumulation, clipping, loss scaling, noise), distributed gathering and its own resumable state.
"""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader

from mltrack.config import TrainingConfig


class Trainer:
    """Plain fp32 (TF32 on GPU) training on one device. Subclasses override the variation points."""

    name = "standard"

    def __init__(self, cfg: TrainingConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self.accumulation = cfg.gradient_accumulation_steps

    # -- set-up ------------------------------------------------------------------------------
    def prepare(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, loaders: dict[str, DataLoader | None]
    ) -> tuple[nn.Module, torch.optim.Optimizer, dict[str, DataLoader | None]]:
        """Move/wrap model, optimizer and loaders; return the objects the loop must use."""
        model = model.to(self.device)
        if self.cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model, optimizer, loaders

    def compile(self, model: nn.Module) -> nn.Module:
        return torch.compile(model, mode=self.cfg.compile_mode) if self.cfg.compile else model

    @property
    def is_main_process(self) -> bool:
        """Only the main process logs, prints and writes checkpoints."""
        return True

    @property
    def world_size(self) -> int:
        return 1

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The plain module whose state_dict is checkpointed (strip compile/DDP/Opacus wrappers)."""
        return getattr(model, "_orig_mod", model)

    # -- per batch ---------------------------------------------------------------------------
    def to_device(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        non_blocking = self.device.type == "cuda"
        images = images.to(self.device, non_blocking=non_blocking)
        if self.cfg.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets.to(self.device, non_blocking=non_blocking)

    def autocast(self) -> ContextManager[Any]:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def accumulate(self, model: nn.Module, sync: bool) -> Iterator[None]:
        """Context for one micro-batch; ``sync`` is False while gradients are only being accumulated."""
        yield

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a loss already divided by the accumulation factor."""
        loss.backward()

    def clip_gradients(self, model: nn.Module) -> None:
        if self.cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.max_grad_norm)

    def inner_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The torch optimizer that runs the update (under any wrapper the trainer added)."""
        return optimizer

    def skips_on_device(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether ``optimizer_step(found_inf=...)`` can skip a step on the device.

        torch's fused Adam/AdamW/SGD read a ``found_inf`` tensor inside the update kernel (the protocol
        GradScaler uses) and leave weights, moments and step counts untouched when it is 1. The loop
        then need not read the loss back to the host before every step, which would stall the GPU queue.
        """
        return bool(getattr(self.inner_optimizer(optimizer), "_step_supports_amp_scaling", False))

    def optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                       found_inf: torch.Tensor | None = None) -> bool:
        """Clip and step; return False when the step was known to be skipped (e.g. inf gradients under a
        scaler). ``found_inf`` (only when ``skips_on_device``): a 0-d tensor, 1 = skip this step."""
        self.clip_gradients(model)
        if found_inf is None:
            optimizer.step()
            return True
        inner = self.inner_optimizer(optimizer)
        inner.found_inf = found_inf.to(torch.float32)  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del inner.found_inf  # type: ignore[attr-defined]
        return True

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    def gather(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Collect per-process eval tensors into the full set (identity on one process)."""
        return tensors

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a per-process accumulator over processes (identity on one process)."""
        return tensor

    def is_empty_batch(self, targets: torch.Tensor) -> bool:
        """Poisson sampling (dp) can yield empty batches; they are skipped, not counted as non-finite."""
        return targets.numel() == 0

    # -- per epoch / resume ------------------------------------------------------------------
    def extra_metrics(self) -> dict[str, float]:
        """Metrics the trainer adds per epoch (e.g. ``dp/epsilon``)."""
        return {}

    def extra_params(self) -> dict[str, Any]:
        """Params the trainer adds once (e.g. the DP noise multiplier it solved for)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Resumable trainer state as plain data (loadable with ``weights_only=True``)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def broadcast_object(self, obj: Any) -> Any:
        """The main process's ``obj`` on every process (picklable; identity on one process)."""
        return obj

    def wait_for_everyone(self) -> None:
        return None

    def end(self) -> None:
        """Release process-group resources at the end of fit."""
        return None
