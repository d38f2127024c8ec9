"""Mixup and cutmix of a whole train batch on its device: ``(images, targets) -> (images, soft targets)``.

Each image is paired with its neighbour in the batch (``roll(1)``, as torchvision does; batches are
shuffled, so neighbours are random pairs). What happens to a batch (mixed or not, mixup or cutmix,
lambda, the cutmix box) is drawn on the host: one integer from a torch.Generator seeds a Python RNG
for the rest. The default generator is torch's global CPU one, which the run seed sets and checkpoints
save and restore (also inside an epoch), so a resumed run mixes as the uninterrupted one did. Nothing
is read back from the device; the work is a few batch-wide kernels, in the batch's dtype and memory
format.

Why not ``torchvision.transforms.v2.MixUp`` / ``CutMix`` (0.26-0.29): they do take a batch with int
labels, return float32 soft labels and need no device sync, and tests/unit/test_mix.py shows this module
gives their pixels and labels for the same lambda and box. But on CUDA their MixUp returns a contiguous
batch from a channels_last one (``roll`` on CUDA does not keep the format) and allocates two batches
(the roll and the ``mul`` operand of its add); they draw only from torch's global RNG, through torch.distributions,
with no generator to pass; they have no per-batch mix probability (``RandomApply`` would hand back int
labels for unmixed batches, so the target type would change from batch to batch); and they do not expose
the drawn lambda or box, so their distribution cannot be checked directly. Here mixup allocates one
batch, cutmix copies only the box, and the sampling is separate from the pixel work.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from mltrack.config import DataConfig

MixKind = Literal["none", "mixup", "cutmix"]


@dataclass(frozen=True)
class MixParams:
    """What one batch gets. ``lam`` is the weight of each image's own target (1.0: unmixed); for cutmix it
    is 1 - box area / image area, the share of pixels actually kept, not the Beta draw ``drawn``."""

    kind: MixKind
    lam: float
    drawn: float
    box: Optional[tuple[int, int, int, int]] = None  # cutmix (x1, y1, x2, y2), pixels, end exclusive


NO_MIX = MixParams("none", 1.0, 1.0)


class Mixer:
    """Mixup / cutmix of train batches; see the module docstring. Call it on a batch already on the device."""

    def __init__(self, num_classes: int, *, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 mix_prob: float = 1.0, switch_prob: float = 0.5) -> None:
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ValueError("a Mixer needs mixup_alpha > 0 or cutmix_alpha > 0")
        if mixup_alpha < 0 or cutmix_alpha < 0 or not (0 <= mix_prob <= 1) or not (0 <= switch_prob <= 1):
            raise ValueError("alphas must be >= 0 and probabilities in [0, 1]")
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.mix_prob, self.switch_prob = mix_prob, switch_prob

    def sample(self, height: int, width: int, generator: Optional[torch.Generator] = None) -> MixParams:
        """Draw one batch's parameters on the host; advances ``generator`` (None: torch's global CPU one) once."""
        rng = random.Random(int(torch.randint(0, 2**62, (), generator=generator)))
        if rng.random() >= self.mix_prob:
            return NO_MIX
        cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or rng.random() < self.switch_prob)
        if not cutmix:
            lam = rng.betavariate(self.mixup_alpha, self.mixup_alpha)
            return MixParams("mixup", lam, lam)
        drawn = rng.betavariate(self.cutmix_alpha, self.cutmix_alpha)
        # A box of area (1 - drawn) around a uniform centre, clipped to the image (the CutMix paper's and
        # torchvision's recipe); the target weight is then corrected to the area actually pasted.
        cx, cy = rng.randrange(width), rng.randrange(height)
        r = 0.5 * math.sqrt(1.0 - drawn)
        half_w, half_h = int(r * width), int(r * height)
        x1, x2 = max(cx - half_w, 0), min(cx + half_w, width)
        y1, y2 = max(cy - half_h, 0), min(cy + half_h, height)
        lam = 1.0 - (x2 - x1) * (y2 - y1) / (width * height)
        return MixParams("cutmix", lam, drawn, (x1, y1, x2, y2))

    def apply(self, images: torch.Tensor, targets: torch.Tensor, params: MixParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix ``images`` (N, C, H, W) floating point and return them with float32 (N, num_classes) targets
        whose rows sum to 1. Unmixed (``kind`` none): the same ``images`` object and one-hot targets."""
        if not images.is_floating_point():
            raise TypeError(f"mixing needs floating-point images, got {images.dtype}")
        soft = torch.zeros(len(targets), self.num_classes, dtype=torch.float32, device=targets.device)
        soft.scatter_(1, targets.view(-1, 1), 1.0)  # one_hot without a host read of the largest label
        if params.kind == "none":
            return images, soft
        soft = soft.roll(1, 0).lerp_(soft, params.lam)  # lam * own + (1 - lam) * neighbour's
        # Image i is paired with image i - 1 (i.e. roll(1)), written as two slices rather than a roll: on
        # CUDA roll returns a contiguous tensor, which would drop channels_last and cost an extra batch copy.
        if params.kind == "mixup":
            mixed = torch.empty_like(images)  # preserve_format
            torch.lerp(images[:-1], images[1:], params.lam, out=mixed[1:])
            torch.lerp(images[-1:], images[:1], params.lam, out=mixed[:1])
            return mixed, soft
        assert params.box is not None
        x1, y1, x2, y2 = params.box
        mixed = images.clone()  # preserve_format
        mixed[1:, ..., y1:y2, x1:x2] = images[:-1, ..., y1:y2, x1:x2]
        mixed[:1, ..., y1:y2, x1:x2] = images[-1:, ..., y1:y2, x1:x2]
        return mixed, soft

    def __call__(self, images: torch.Tensor, targets: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw this batch's parameters and mix: ``(images, int targets) -> (images, soft targets)``."""
        return self.apply(images, targets, self.sample(images.shape[-2], images.shape[-1], generator))


def build_mixer(cfg: DataConfig, num_classes: int) -> Optional[Mixer]:
    """The train batch mixer the config asks for; None when both ``mixup_alpha`` and ``cutmix_alpha`` are 0."""
    if cfg.mixup_alpha <= 0 and cfg.cutmix_alpha <= 0:
        return None
    return Mixer(num_classes, mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha,
                 mix_prob=cfg.mix_prob, switch_prob=cfg.mix_switch_prob)
