"""Peers of mltrack's data path: the reference DataLoader, timm's prefetching loader, synthetic batches
already on the device (the ceiling) and per-epoch nvJPEG decoding; plus models, the training step and
the epoch timer every variant shares.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---------------------------------------------------------------- models and the step


class TinyCNN(nn.Module):
    """The --tiny model: two conv blocks and a linear head (CPU smoke runs)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def build_model(name: str, num_classes: int) -> nn.Module:
    """A randomly initialised torchvision classifier by name, or ``tinycnn``."""
    if name == "tinycnn":
        return TinyCNN(num_classes)
    import torchvision

    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    # Small lr: many epochs on synthetic data must not diverge (mltrack's loop stops on NaN losses).
    # Fused (one kernel per step) in every variant, as mltrack builds it: the variants differ only in their data
    # path, and the ceiling stays the fastest step this model can take.
    return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, fused=True)


def make_step(model: nn.Module, device: torch.device, *, amp: bool, channels_last: bool) -> Callable[..., None]:
    """One full training step as a tutorial or timm user writes it: to device, forward, loss, backward, step.

    No per-step host sync. ``amp``: bf16 autocast; ``channels_last``: NHWC inputs (the model must match).
    """
    opt = make_optimizer(model)
    loss_fn = nn.CrossEntropyLoss()
    non_blocking = device.type == "cuda"

    def step(images: torch.Tensor, targets: torch.Tensor) -> None:
        images = images.to(device, non_blocking=non_blocking)
        targets = targets.to(device, non_blocking=non_blocking)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model(images).float(), targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def place(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    model.to(device).train()
    return model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steps_epoch(loader: Iterable, step: Callable[..., None]) -> int:
    """Run ``step`` over one pass of ``loader``; returns the images seen."""
    n = 0
    for images, targets in loader:
        step(images, targets)
        n += len(targets)
    return n


def time_epochs(run_epoch: Callable[[], int], device: torch.device, *, warmup_epochs: int, min_seconds: float,
                max_epochs: int, min_epochs: int = 1) -> dict[str, Any]:
    """img/s over whole epochs after ``warmup_epochs`` (start-up, cuDNN autotune, compilation).

    Whole epochs are timed, so an epoch's start (a DataLoader refilling its workers, a cache drawing its
    plan) counts as it does in training; timing stops after the first epoch that ends past
    ``min_seconds`` (at least ``min_epochs``, at most ``max_epochs``). The device is synchronised at both
    ends. Also returns the per-epoch times and the warm-up time.
    """
    t0 = time.perf_counter()
    for _ in range(warmup_epochs):
        run_epoch()
    sync(device)
    warm = time.perf_counter() - t0
    images, times = 0, []
    start = time.perf_counter()
    while True:
        e0 = time.perf_counter()
        images += run_epoch()
        sync(device)
        times.append(time.perf_counter() - e0)
        elapsed = time.perf_counter() - start
        if len(times) >= max_epochs or (elapsed >= min_seconds and len(times) >= min_epochs):
            break
    return {"img_per_s": images / elapsed, "images": images, "seconds": round(elapsed, 3), "epochs": len(times),
            "epoch_s": [round(t, 4) for t in times], "warmup_s": round(warm, 3)}


# ---------------------------------------------------------------- loaders


def reference_loader(root: Path, files: list[str], image_size: int, batch_size: int, workers: int,
                     device: torch.device, train: bool = True) -> torch.utils.data.DataLoader:
    """What the guide's users run: torchvision ImageFolder (PIL decode) + RandomResizedCrop/flip/normalize
    (eval: Resize + CenterCrop) in DataLoader workers; pinned, persistent workers."""
    from torchvision import datasets, transforms as T

    wanted = {str(Path(root) / "raw" / rel) for rel in files}
    if train:
        tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    else:
        tf = T.Compose([T.Resize(int(image_size * 8 / 7)), T.CenterCrop(image_size), T.ToTensor(), T.Normalize(MEAN, STD)])
    ds = datasets.ImageFolder(str(Path(root) / "raw"), transform=tf, is_valid_file=lambda p: p in wanted)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=train, num_workers=workers,
                                       pin_memory=device.type == "cuda", persistent_workers=workers > 0)


def timm_loader(root: Path, files: list[str], image_size: int, batch_size: int, workers: int,
                device: torch.device) -> Any:
    """timm's ``create_loader(..., use_prefetcher=True)``: uint8 collate, normalisation on the GPU in a
    side stream; RandomResizedCrop + flip (bilinear, no colour jitter) like the reference."""
    import inspect

    from timm.data import create_loader
    from torchvision import datasets

    wanted = {str(Path(root) / "raw" / rel) for rel in files}
    ds = datasets.ImageFolder(str(Path(root) / "raw"), is_valid_file=lambda p: p in wanted)
    options = dict(is_training=True, use_prefetcher=True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5,
                   color_jitter=None, interpolation="bilinear", mean=MEAN, std=STD, num_workers=workers,
                   pin_memory=device.type == "cuda", device=device, persistent_workers=workers > 0)
    accepted = inspect.signature(create_loader).parameters  # older timm versions lack some options
    return create_loader(ds, input_size=(3, image_size, image_size), batch_size=batch_size,
                         **{k: v for k, v in options.items() if k in accepted})


class SyntheticBatches:
    """The ceiling's feed: ``steps`` batches of fixed random data already on the device."""

    def __init__(self, steps: int, batch_size: int, image_size: int, classes: int, device: torch.device,
                 channels_last: bool) -> None:
        g = torch.Generator().manual_seed(0)
        images = torch.randn(batch_size, 3, image_size, image_size, generator=g).to(device)
        self.images = images.contiguous(memory_format=torch.channels_last) if channels_last else images
        self.targets = torch.randint(0, classes, (batch_size,), generator=g).to(device)
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Any:
        for _ in range(self.steps):
            yield self.images, self.targets


class NvjpegEveryEpoch:
    """Data larger than RAM, decoded every epoch on the GPU: file bytes in host memory, batched
    ``decode_jpeg(device="cuda")``, then mltrack's batched RandomResizedCrop/flip/normalise.

    The current stream is synchronised before each decode: nvJPEG can overwrite memory that queued work
    still reads, and the call waits behind queued work anyway; this bound is what the variant measures.
    """

    def __init__(self, root: Path, files: list[str], labels: list[int], image_size: int, batch_size: int,
                 device: torch.device, channels_last: bool, seed: int = 0) -> None:
        from PIL import Image
        from torchvision.io import read_file

        paths = [Path(root) / "raw" / rel for rel in files]
        self.data = [read_file(str(p)) for p in paths]
        sizes = []
        for p in paths:
            with Image.open(p) as im:  # header only
                sizes.append(im.size)
        self.sizes = torch.tensor(sizes, dtype=torch.int64)
        self.labels = torch.tensor(labels, device=device)
        self.image_size, self.batch_size, self.device = image_size, batch_size, device
        self.channels_last = channels_last
        self.precrop = math.ceil(image_size * 8 / 7)
        self.generator = torch.Generator().manual_seed(seed)
        self.scale = torch.tensor([1 / (255 * s) for s in STD], device=device).view(1, 3, 1, 1)
        self.shift = torch.tensor([-m / s for m, s in zip(MEAN, STD)], device=device).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return -(-len(self.data) // self.batch_size)

    def __iter__(self) -> Any:
        from torchvision.io import ImageReadMode, decode_jpeg

        from mltrack.data.cache import augment, sample_params

        order = torch.randperm(len(self.data), generator=self.generator)
        params = sample_params("imagenet", self.sizes[order], self.image_size, self.generator).to(self.device)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            torch.cuda.current_stream(self.device).synchronize()
            decoded = decode_jpeg([self.data[i] for i in idx.tolist()], mode=ImageReadMode.RGB, device=self.device)
            if len({tuple(t.shape) for t in decoded}) == 1:
                src = torch.stack(decoded)  # all one size: crop boxes read the full-resolution images
            else:
                src = torch.stack([torch.nn.functional.interpolate(t[None].float(), (self.precrop, self.precrop),
                                                                   mode="bilinear", antialias=True)[0]
                                   for t in decoded])
            x = augment("imagenet", src, params[start:start + self.batch_size], self.image_size)
            x = torch.addcmul(self.shift, x, self.scale)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx.to(self.device)]


def shutdown(loader: Optional[Any]) -> None:
    """Stop a DataLoader's persistent workers now rather than at garbage collection."""
    inner = getattr(loader, "loader", loader)  # timm's PrefetchLoader wraps the DataLoader
    it = getattr(inner, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
