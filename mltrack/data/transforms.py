"""TRANSFORMS registry: named recipes turning a decoded RGB PIL image into a float32 CHW tensor.

Keys equal ``config.TransformName``. Each builder takes ``(image_size, train, uint8=False)``: the train
variant adds the recipe's augmentation, the eval variant is deterministic. Random augmentations draw
from torch's global RNG, which DataLoader workers seed from the loader's generator (see loaders.py), so
a seeded run augments identically.

Every recipe is PIL geometry (resize, crop, flip, affine: all on the PIL image), then ``ToImage`` (a
uint8 CHW tensor), then the float tail: ``ToDtype(float32, scale=True)`` and ``Normalize`` with
``NORMALIZATION[name]``. ``uint8=True`` stops before the tail, which :class:`FloatTail` then applies to
whole batches on the device that trains: the same operations in the same order, so the values equal
the CPU float path (bit for bit on CPU). The random draws are the same either way: the tail draws none.
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch
from PIL import Image
from torchvision.transforms import v2

from mltrack.errors import ConfigError

Transform = Callable[[Image.Image], torch.Tensor]

TRANSFORMS: dict[str, str] = {
    "none": "mltrack.data.transforms:none_transform",
    "basic": "mltrack.data.transforms:basic_transform",
    "digits": "mltrack.data.transforms:digits_transform",
    "imagenet": "mltrack.data.transforms:imagenet_transform",
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

MeanStd = tuple[tuple[float, ...], tuple[float, ...]]
# (mean, std) each recipe normalises its [0, 1] pixels with; None: no normalisation.
NORMALIZATION: dict[str, Optional[MeanStd]] = {
    "none": None,
    "basic": (HALF, HALF),
    "digits": (HALF, HALF),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
}


def build_transform(name: str, image_size: int, train: bool, *, uint8: bool = False) -> Transform:
    """The ``name`` recipe for square ``image_size`` px outputs; ConfigError listing valid names if unknown.

    ``uint8=True``: the same geometry, ending in a uint8 CHW tensor (0..255) instead of the normalised
    float32 one; ``FloatTail(name)`` turns a batch of those into what the float recipe gives.
    """
    if name not in TRANSFORMS:
        raise ConfigError(f"unknown transforms '{name}'. Valid: {', '.join(sorted(TRANSFORMS))}")
    module_name, attr = TRANSFORMS[name].split(":")
    builder = getattr(importlib.import_module(module_name), attr)
    return builder(image_size, train, uint8=uint8)


def _to_tensor(name: str, uint8: bool) -> list[v2.Transform]:
    """The last steps of recipe ``name``: PIL -> uint8 tensor, then (unless ``uint8``) the float tail."""
    steps: list[v2.Transform] = [v2.ToImage()]
    if uint8:
        return steps
    steps.append(v2.ToDtype(torch.float32, scale=True))
    normalize = NORMALIZATION[name]
    if normalize is not None:
        steps.append(v2.Normalize(mean=list(normalize[0]), std=list(normalize[1])))
    return steps


class FloatTail:
    """The float tail of recipe ``name`` for a whole uint8 batch ``(B, 3, H, W)`` on any device.

    Same arithmetic, in the same order, as ``v2.ToDtype(float32, scale=True)`` + ``v2.Normalize`` on one
    image (``x.to(float32).mul_(1/255)``, then ``sub_(mean).div_(std)``), so each sample equals the float
    recipe's output. Mean/std live on the batch's device, made once per device: torchvision's normalize
    builds them from Python lists per call, a blocking host-to-device copy on CUDA.
    ``channels_last`` converts the uint8 input (a quarter of the float bytes); the element-wise float
    ops keep that layout.
    """

    def __init__(self, name: str, channels_last: bool = False) -> None:
        if name not in NORMALIZATION:
            raise ConfigError(f"unknown transforms '{name}'. Valid: {', '.join(sorted(NORMALIZATION))}")
        self.normalize = NORMALIZATION[name]
        self.channels_last = channels_last
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.dtype != torch.uint8 or batch.dim() != 4:
            raise TypeError(f"FloatTail expects a (B, C, H, W) uint8 batch, got {batch.dtype} {tuple(batch.shape)}")
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        x = v2.functional.to_dtype(batch, torch.float32, scale=True)  # the op ToDtype runs
        if self.normalize is None:
            return x
        mean, std = self._device_stats(x.device)
        return x.sub_(mean).div_(std)

    def _device_stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._stats:
            assert self.normalize is not None
            mean, std = (torch.tensor(v, dtype=torch.float32).view(-1, 1, 1).to(device) for v in self.normalize)
            self._stats[device] = (mean, std)
        return self._stats[device]


def _square(image_size: int) -> v2.Transform:
    # Both sides set: every image becomes image_size x image_size whatever its aspect ratio.
    return v2.Resize((image_size, image_size), antialias=True)


def none_transform(image_size: int, train: bool, uint8: bool = False) -> Transform:
    """Resize to a square and scale to [0, 1]; no augmentation, no normalisation (``train`` ignored)."""
    return v2.Compose([_square(image_size), *_to_tensor("none", uint8)])


def basic_transform(image_size: int, train: bool, uint8: bool = False) -> Transform:
    """Square resize; train adds a horizontal flip; normalised to [-1, 1] (mean = std = 0.5)."""
    aug = [v2.RandomHorizontalFlip()] if train else []
    return v2.Compose([_square(image_size), *aug, *_to_tensor("basic", uint8)])


def digits_transform(image_size: int, train: bool, uint8: bool = False) -> Transform:
    """Square resize; train adds a small affine jitter (±10°, ±10 % shift, 0.9–1.1 scale).

    No flips: a mirrored 2 or 5 is not the same digit. Normalised with mean = std = 0.5.
    """
    aug = [v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))] if train else []
    return v2.Compose([_square(image_size), *aug, *_to_tensor("digits", uint8)])


def imagenet_transform(image_size: int, train: bool, uint8: bool = False) -> Transform:
    """The torchvision ImageNet recipe, for pretrained weights: ImageNet mean/std.

    Train: RandomResizedCrop(image_size) + horizontal flip. Eval: resize the short side to
    ``int(image_size * 8 / 7)`` (256 for 224) and centre-crop ``image_size``.
    """
    if train:
        geometry = [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        geometry = [v2.Resize(int(image_size * 8 / 7), antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose([*geometry, *_to_tensor("imagenet", uint8)])
