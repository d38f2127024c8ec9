"""The standard trainer: fp32 on CPU or one GPU (TF32 matmuls allowed on GPU). All behaviour is the base's."""
from __future__ import annotations

from mltrack.trainers.base import Trainer


class StandardTrainer(Trainer):
    name = "standard"
