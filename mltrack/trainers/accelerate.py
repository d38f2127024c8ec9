"""The ``accelerate`` trainer: Hugging Face Accelerate's prepare/backward/no-sync/gather_for_metrics under the
one loop, on CPU, one GPU or several processes (``torchrun``, ``accelerate launch``).

Semantics kept identical to the standard trainer:

- Gradient accumulation. The loop divides each micro-batch loss by ``gradient_accumulation_steps`` and
  decides which micro-batch ends a group (``sync``). The Accelerator is therefore built with
  ``gradient_accumulation_steps=1`` so that ``accelerator.backward`` does not divide a second time, and
  ``accumulate(model, sync)`` does what ``accelerator.accumulate`` does inside: it records ``sync`` in
  Accelerate's gradient state and skips the DDP all-reduce (``no_sync``) for the micro-batches in between.
- Clipping (``training.max_grad_norm``) is the global norm of the averaged gradient, after unscaling.
- Metrics. Train accumulators are summed over processes (``reduce_sum``); validation/test tensors go
  through ``gather_for_metrics``, which drops the samples Accelerate repeats to even out the last batch,
  so every sample is counted exactly once.
- Side effects. ``is_main_process`` is False on every rank but 0; hooks use it so that only rank 0
  logs, prints and writes checkpoints. The loaders' seeded generator survives ``prepare`` (Accelerate
  keeps the sampler's generator and broadcasts rank 0's state at every epoch), so all ranks shuffle the
  same way before sharding.

Mixed precision follows ``training.amp_dtype`` when it is set explicitly (bf16/fp16), else "no".
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, ContextManager, Iterator

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list
from torch import nn
from torch.utils.data import DataLoader

from mltrack.config import TrainingConfig
from mltrack.errors import ConfigError
from mltrack.trainers.base import Trainer

_PRECISION = {"bfloat16": "bf16", "float16": "fp16"}


def _mixed_precision(cfg: TrainingConfig) -> str:
    # None (the default) means fp32 for this trainer; mixed_precision reads None as bfloat16.
    return "no" if cfg.amp_dtype is None else _PRECISION[cfg.amp_dtype]


class AccelerateTrainer(Trainer):
    name = "accelerate"

    def __init__(self, cfg: TrainingConfig, device: torch.device) -> None:
        super().__init__(cfg, device)
        self.mixed_precision = _mixed_precision(cfg)
        cpu = device.type == "cpu"
        if cpu and self.mixed_precision == "fp16":
            raise ConfigError("training.amp_dtype float16 needs a CUDA GPU; on CPU use amp_dtype: bfloat16 "
                              "(or leave amp_dtype unset for fp32)")
        single = int(os.environ.get("WORLD_SIZE", "1")) == 1
        if not cpu and single and device.index is not None:
            torch.cuda.set_device(device)  # one process: honour --device cuda:N (Accelerate picks the current GPU)
        # A fresh precision setting per trainer (cv folds, search trials and tests build several in one
        # process); the process group (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=self.mixed_precision, gradient_accumulation_steps=1,
                                       step_scheduler_with_optimizer=False)
        self.device = self.accelerator.device  # cuda:<local rank> under a launcher

    # -- set-up ------------------------------------------------------------------------------
    def prepare(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, loaders: dict[str, DataLoader | None]
    ) -> tuple[nn.Module, torch.optim.Optimizer, dict[str, DataLoader | None]]:
        """Wrap model (DDP when distributed), optimizer and every non-None loader (sharded per process)."""
        if self.cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        names = [name for name, loader in loaders.items() if loader is not None]
        model, optimizer, *prepared = self.accelerator.prepare(model, optimizer, *(loaders[n] for n in names))
        out = dict(loaders)
        out.update(zip(names, prepared))
        return model, optimizer, out

    @property
    def is_main_process(self) -> bool:
        return bool(self.accelerator.is_main_process)

    @property
    def world_size(self) -> int:
        return int(self.accelerator.num_processes)

    def unwrap(self, model: nn.Module) -> nn.Module:
        # keep_fp32_wrapper=True: dropping it would patch model.forward in place and end autocast for
        # the rest of training; the state dict is the same either way.
        return self.accelerator.unwrap_model(model, keep_fp32_wrapper=True, keep_torch_compile=False)

    # -- per batch ---------------------------------------------------------------------------
    def autocast(self) -> ContextManager[Any]:
        return self.accelerator.autocast()

    @contextlib.contextmanager
    def accumulate(self, model: nn.Module, sync: bool) -> Iterator[None]:
        # What accelerator.accumulate does, driven by the loop's decision instead of a second counter.
        self.accelerator.gradient_state._set_sync_gradients(sync)
        if sync:
            yield
        else:
            with self.accelerator.no_sync(model):
                yield

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)  # no division: gradient_accumulation_steps is 1 (module docstring)

    def clip_gradients(self, model: nn.Module) -> None:
        if self.cfg.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_(model.parameters(), self.cfg.max_grad_norm)  # unscales first

    def inner_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return getattr(optimizer, "optimizer", optimizer)  # AcceleratedOptimizer wraps the torch one

    def skips_on_device(self, optimizer: torch.optim.Optimizer) -> bool:
        # float16: accelerate's GradScaler owns found_inf.
        return getattr(optimizer, "scaler", None) is None and super().skips_on_device(optimizer)

    def optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                       found_inf: torch.Tensor | None = None) -> bool:
        super().optimizer_step(model, optimizer, found_inf)
        return not bool(getattr(optimizer, "step_was_skipped", False))  # fp16 scaler found inf/NaN

    def gather(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """All processes' eval tensors, each sample once.

        A loader that was not prepared (e.g. an ad-hoc report loader) is not sharded: every process
        already holds every sample, and gathering would count each one ``world_size`` times.
        """
        if not self.accelerator.gradient_state.in_dataloader:
            return tensors
        return tuple(self.accelerator.gather_for_metrics(tuple(tensors)))

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        return self.accelerator.reduce(tensor, reduction="sum")

    # -- per epoch / resume ------------------------------------------------------------------
    def extra_params(self) -> dict[str, Any]:
        return {"accelerate.num_processes": self.world_size, "accelerate.mixed_precision": self.mixed_precision,
                "accelerate.distributed_type": self.accelerator.distributed_type.value}

    def state_dict(self) -> dict[str, Any]:
        """World size and precision for the record, plus the fp16 GradScaler (GPU only) when there is one.

        RNG states are in the checkpoint's ``rng`` already; the accumulation position restarts each epoch.
        """
        state: dict[str, Any] = {"world_size": self.world_size, "mixed_precision": self.mixed_precision}
        if self.accelerator.scaler is not None:
            state["scaler"] = self.accelerator.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "scaler" in state and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process (picklable objects; identity on one process)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def wait_for_everyone(self) -> None:
        self.accelerator.wait_for_everyone()

    def end(self) -> None:
        """Destroy the process group (if any) and forget Accelerate's process state, so a later trainer in
        this process starts clean."""
        # Every process reaches this point before any tears the group down: a gloo peer destroyed while
        # the other still finishes its last collective can hang or abort that one at exit.
        if self.world_size > 1:
            self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        AcceleratorState._reset_state(reset_partial_state=True)
