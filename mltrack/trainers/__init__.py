"""TRAINERS registry: config string -> lazily imported class, so opacus/accelerate load only when chosen."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

import torch

from mltrack.config import TrainingConfig

if TYPE_CHECKING:
    from mltrack.trainers.base import Trainer

TRAINERS: dict[str, str] = {
    "standard": "mltrack.trainers.standard:StandardTrainer",
    "mixed_precision": "mltrack.trainers.mixed_precision:MixedPrecisionTrainer",
    "accelerate": "mltrack.trainers.accelerate:AccelerateTrainer",
    "dp": "mltrack.trainers.dp:DPTrainer",
}


def trainer_class(name: str) -> "type[Trainer]":
    from mltrack.errors import ConfigError

    if name not in TRAINERS:
        raise ConfigError(f"unknown trainer_type '{name}'. Valid: {', '.join(sorted(TRAINERS))}")
    module, attr = TRAINERS[name].split(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as err:
        extra = {"dp": "dp", "accelerate": "dist"}.get(name, "dev")
        raise ConfigError(
            f"trainer_type '{name}' needs the package '{err.name}', which is not installed; "
            f"install it with: pip install -e '.[{extra}]'"
        ) from None


def autocast_dtype(cfg: TrainingConfig) -> "torch.dtype | None":
    """The dtype the trainer's autocast runs the model in (None: fp32). The GPU data paths write train
    batches in it: autocast would cast them for the first layer anyway, and half the bytes are written."""
    if cfg.trainer_type == "mixed_precision":
        return torch.float16 if cfg.amp_dtype == "float16" else torch.bfloat16
    if cfg.trainer_type == "accelerate" and cfg.amp_dtype is not None:
        return torch.float16 if cfg.amp_dtype == "float16" else torch.bfloat16
    return None


def build_trainer(cfg: TrainingConfig, device: torch.device) -> "Trainer":
    return trainer_class(cfg.trainer_type)(cfg, device)
