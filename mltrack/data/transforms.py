"""TRANSFORMS registry: named recipes turning a decoded RGB PIL image into a float32 CHW tensor.

Keys equal ``config.TransformName``. Each builder takes ``(image_size, train)``: the train variant adds the
recipe's augmentation, the eval variant is deterministic. Random augmentations draw from torch's global
RNG, which DataLoader workers seed from the loader's generator (see loaders.py), so a seeded run
augments identically.
"""
from __future__ import annotations

import importlib
from typing import Callable

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


def build_transform(name: str, image_size: int, train: bool) -> Transform:
    """The ``name`` recipe for square ``image_size`` px outputs; ConfigError listing valid names if unknown."""
    if name not in TRANSFORMS:
        raise ConfigError(f"unknown transforms '{name}'. Valid: {', '.join(sorted(TRANSFORMS))}")
    module_name, attr = TRANSFORMS[name].split(":")
    builder = getattr(importlib.import_module(module_name), attr)
    return builder(image_size, train)


def _to_float(normalize: tuple[tuple[float, ...], tuple[float, ...]] | None) -> list[v2.Transform]:
    steps: list[v2.Transform] = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if normalize is not None:
        steps.append(v2.Normalize(mean=list(normalize[0]), std=list(normalize[1])))
    return steps


def _square(image_size: int) -> v2.Transform:
    # Both sides set: every image becomes image_size x image_size whatever its aspect ratio.
    return v2.Resize((image_size, image_size), antialias=True)


def none_transform(image_size: int, train: bool) -> Transform:
    """Resize to a square and scale to [0, 1]; no augmentation, no normalisation (``train`` ignored)."""
    return v2.Compose([_square(image_size), *_to_float(None)])


def basic_transform(image_size: int, train: bool) -> Transform:
    """Square resize; train adds a horizontal flip; normalised to [-1, 1] (mean = std = 0.5)."""
    aug = [v2.RandomHorizontalFlip()] if train else []
    return v2.Compose([_square(image_size), *aug, *_to_float((HALF, HALF))])


def digits_transform(image_size: int, train: bool) -> Transform:
    """Square resize; train adds a small affine jitter (±10°, ±10 % shift, 0.9–1.1 scale).

    No flips: a mirrored 2 or 5 is not the same digit. Normalised with mean = std = 0.5.
    """
    aug = [v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))] if train else []
    return v2.Compose([_square(image_size), *aug, *_to_float((HALF, HALF))])


def imagenet_transform(image_size: int, train: bool) -> Transform:
    """The torchvision ImageNet recipe, for pretrained weights: ImageNet mean/std.

    Train: RandomResizedCrop(image_size) + horizontal flip. Eval: resize the short side to
    ``int(image_size * 8 / 7)`` (256 for 224) and centre-crop ``image_size``.
    """
    if train:
        geometry = [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        geometry = [v2.Resize(int(image_size * 8 / 7), antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose([*geometry, *_to_float((IMAGENET_MEAN, IMAGENET_STD))])
