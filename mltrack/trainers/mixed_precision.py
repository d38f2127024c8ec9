"""Mixed precision: autocast in ``amp_dtype``; float16 adds a GradScaler, bfloat16 needs none.

On CPU only bfloat16 autocast is supported, so CI exercises this trainer with bfloat16; float16
(with its scaler) is the GPU path. The scaler's state is part of the checkpoint so that a resumed
run continues with the same loss scale and growth tracker.
"""
from __future__ import annotations

from typing import Any, ContextManager

import torch
from torch import nn

from mltrack.config import TrainingConfig
from mltrack.errors import ConfigError
from mltrack.trainers.base import Trainer


class MixedPrecisionTrainer(Trainer):
    name = "mixed_precision"

    def __init__(self, cfg: TrainingConfig, device: torch.device) -> None:
        super().__init__(cfg, device)
        # bfloat16 is the default: same exponent range as fp32, so no loss scaling and it runs on CPU too.
        self.dtype = torch.float16 if cfg.amp_dtype == "float16" else torch.bfloat16
        if device.type == "cpu" and self.dtype == torch.float16:
            raise ConfigError("training.amp_dtype float16 needs a CUDA GPU; on CPU use amp_dtype: bfloat16")
        # A scaler only matters for float16, whose narrow exponent range underflows small gradients.
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)

    def autocast(self) -> ContextManager[Any]:
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def skips_on_device(self, optimizer: torch.optim.Optimizer) -> bool:
        # float16: the scaler owns found_inf (and reads its scale back each step anyway).
        return not self.scaler.is_enabled() and super().skips_on_device(optimizer)

    def optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                       found_inf: torch.Tensor | None = None) -> bool:
        if not self.scaler.is_enabled():
            return super().optimizer_step(model, optimizer, found_inf)
        self.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        self.clip_gradients(model)
        scale_before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        # The scaler skips the step (and lowers the scale) when it found inf/NaN gradients.
        return self.scaler.get_scale() >= scale_before

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "scaler" in state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
