"""DataLoaders for one fold: class map from raw/, validated index files, seeded shuffling.

Reproducibility: the train loader's shuffle order (or balanced sampling) and the seeds of its workers are
drawn from ``Loaders.generator`` at the start of each epoch, so that generator's state (saved in
checkpoints) fixes everything the next epoch does. Val/test loaders have their own generators, so
evaluating never consumes the global torch RNG or the train generator.

On a CUDA device (without ``data.cache``, one process, not dp) the loaders are :class:`DeviceLoader` s:
workers run the recipe's PIL geometry and stop at uint8 CHW tensors, and the batch is turned into
normalised float32 on the GPU (:class:`mltrack.data.transforms.FloatTail`). A float32 image is 4x the
bytes of its uint8 pixels, and every byte is written by the worker, passed through shared memory,
copied by the single pin-memory thread and sent over PCIe, so shipping uint8 cuts that work by 4x and
moves the float conversion off the CPU cores that decode. Each batch is also split into worker tasks
of at least ``SUB_BATCH_MIN`` images (see :func:`sub_batches`), so that one batch is decoded by several
workers at once: with whole batches per worker, an epoch of 24 batches on 15 workers takes two full
rounds of the slowest worker (the second with 6 workers idle), and the first batch of every epoch
waits for one worker to decode all of it. The sample order is the same (it comes from the sampler, not
the batching); which worker, hence which random stream, augments a sample differs. CPU runs keep plain
DataLoaders of float32 batches, exactly as before.
"""
from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from mltrack.config import DataConfig
from mltrack.data.dataset import ImageListDataset
from mltrack.data.index import SPLITS, class_names, read_index
from mltrack.data.transforms import FloatTail, build_transform
from mltrack.errors import DataError

MAX_AUTO_WORKERS = 8
# Feeding a GPU (DeviceLoader), the CPU's only job is decoding: all usable cores but one (the main process
# and its pin-memory thread), up to this many. One worker decodes ~235 img/s of 500x375 JPEGs to 224 px
# on the H100 host, so 8 workers (~1,900 img/s) cannot feed resnet50 in bf16 (~4,000 img/s); 15 can
# nearly. 32 bounds the processes (x3 loaders, all persistent) on many-core hosts.
MAX_AUTO_WORKERS_GPU = 32
# Images per worker task of a DeviceLoader, at least. A task costs the main process ~0.5 ms plus ~0.02 ms
# per uint8 224 px image (measured on 2 slow cores), 8 tasks of 32 ~3.5 ms more per 256-image batch than
# one task: small next to the ~0.1 s a worker spends decoding 32 images.
SUB_BATCH_MIN = 32
SUB_BATCH_SPLITS = (8, 4, 2)  # tasks per batch tried, most first; the batch size must divide evenly
PREFETCH_BATCHES = 2  # whole batches in flight per worker, as DataLoader's default prefetch_factor


@dataclass
class Loaders:
    """The loaders of the requested splits (None for splits not requested) and what describes them."""

    train: DataLoader | Any | None  # Any: a DeviceLoader (CUDA), a cache.CachedLoader or a gpu_decode.DecodeLoader
    val: DataLoader | Any | None
    test: DataLoader | Any | None
    class_names: list[str]
    sizes: dict[str, int]  # split -> number of samples, for the requested splits
    generator: torch.Generator  # train shuffle/sampler/worker-seed generator; checkpoint its get_state()
    datasets: dict[str, ImageListDataset] = field(default_factory=dict)
    cache: str = "none"  # data path in use: none (DataLoader), ram or gpu (mltrack.data.cache), decode_gpu
    cache_reason: str = ""  # why (the data.cache setting, or what auto decided from)


def resolve_num_workers(num_workers: int | None, *, feeds_gpu: bool = False) -> int:
    """``None`` -> min(8, CPU count), or with ``feeds_gpu`` (DeviceLoaders) min(32, usable cores - 1);
    an explicit value (0 = load in the main process) is kept."""
    if num_workers is not None:
        return num_workers
    if feeds_gpu:
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, min(MAX_AUTO_WORKERS_GPU, usable - 1))
    return min(MAX_AUTO_WORKERS, os.cpu_count() or 1)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed python/numpy/torch from the worker's torch seed; one thread.

    ``torch.initial_seed()`` in a worker is base_seed + worker_id, where base_seed is drawn from the
    loader's generator, so the augmentations of a seeded run repeat exactly. One intra-op thread per
    worker stops N workers x M threads from oversubscribing the cores.
    """
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)


def build_loaders(
    data_cfg: DataConfig,
    batch_size: int,
    seed: int,
    deterministic: bool,
    device_type: str,
    splits: tuple[str, ...] = SPLITS,
    *,
    device: torch.device | None = None,
    trainer_type: str | None = None,
    channels_last: bool = False,
    train_dtype: torch.dtype | None = None,
) -> Loaders:
    """Build loaders for ``splits`` of fold ``data_cfg.fold`` under ``data_cfg.data_dir``.

    Train shuffles (or samples with replacement, inverse class frequency, when ``data_cfg.sampler`` is
    "balanced") from a generator seeded with ``seed``; val/test keep file order; nothing drops a last
    partial batch. ``pin_memory`` is on for ``device_type == "cuda"``. Workers persist across epochs
    except when ``deterministic``: a persistent worker's RNG would carry over epochs, which a resumed run
    (fresh workers) could not reproduce. Raises DataError for missing/invalid index files, an empty train
    split, or bad paths.

    ``data_cfg.cache`` may replace the loaders by :class:`mltrack.data.cache.CachedLoader` s (decoded
    once, augmented on ``device``, default ``device_type``'s current device) or, for ``decode_gpu``, by
    :class:`mltrack.data.gpu_decode.DecodeLoader` s (decoded every epoch with nvJPEG, augmented the same
    way); ``trainer_type`` lets ``auto`` rule out trainers they cannot serve (unknown: no cache),
    ``channels_last`` sets the layout of their batches and ``train_dtype`` the dtype of their train batches
    on a GPU (the autocast dtype under mixed precision; default float32). The same generator drives their
    train loader.
    Without a cache, on a CUDA device, the loaders are :class:`DeviceLoader` s when
    :func:`finishes_on_device` says so (module docstring); their batches arrive on ``device``,
    channels_last when asked.
    """
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; expected a subset of {SPLITS}")
    raw_dir = Path(data_cfg.data_dir) / "raw"
    names = class_names(raw_dir)
    generator = torch.Generator().manual_seed(seed)
    # Eval loaders get their own generator (seed + offset) so they never touch the train stream.
    gens = {s: generator if s == "train" else torch.Generator().manual_seed(seed + offset)
            for offset, s in enumerate(SPLITS) if s in splits}
    samples = _read_samples(data_cfg, splits)
    sizes = {s: len(items) for s, items in samples.items()}
    device = device or torch.device(device_type)
    mode, reason = _cache_mode(data_cfg, sizes, device, trainer_type)
    on_device = mode == "none" and finishes_on_device(device, trainer_type)
    workers = resolve_num_workers(data_cfg.num_workers, feeds_gpu=on_device)
    if on_device:
        reason += f"; {workers} workers send uint8, normalised on {device.type}"
    datasets = {split: ImageListDataset(raw_dir, items, build_transform(
        data_cfg.transforms, data_cfg.image_size, train=split == "train", uint8=on_device), data_cfg.max_image_pixels)
        for split, items in samples.items()}
    out: dict[str, Any] = {s: None for s in SPLITS}
    persistent = workers > 0 and not deterministic
    if mode != "none":  # the cache decodes the files itself; the datasets stay for their targets and sizes
        dtype = train_dtype if train_dtype is not None and device.type == "cuda" else torch.float32
        out.update(_cached_loaders(data_cfg, mode, datasets, batch_size, gens, workers, device, channels_last, dtype))
    elif on_device:
        out.update({split: device_loader(ds, data_cfg.transforms, split == "train", data_cfg.sampler, batch_size,
                                         workers, gens[split], device, persistent=persistent,
                                         channels_last=channels_last) for split, ds in datasets.items()})
    else:
        out.update({split: _make_loader(ds, split == "train", data_cfg.sampler, batch_size, workers, gens[split],
                                        pin=device_type == "cuda", persistent=persistent)
                    for split, ds in datasets.items()})
    return Loaders(
        train=out["train"], val=out["val"], test=out["test"], class_names=names,
        sizes=sizes, generator=generator, datasets=datasets, cache=mode, cache_reason=reason,
    )


def _read_samples(data_cfg: DataConfig, splits: tuple[str, ...]) -> dict[str, list[tuple[str, int]]]:
    """The validated index of each requested split, in SPLITS order; DataError for an empty train split."""
    data_dir = Path(data_cfg.data_dir)
    samples: dict[str, list[tuple[str, int]]] = {}
    for split in (s for s in SPLITS if s in splits):
        samples[split] = read_index(data_dir, split, data_cfg.fold)
        if split == "train" and not samples[split]:
            raise DataError(f"the train index of fold {data_cfg.fold} in {data_dir / 'splits'} is empty; split again")
    return samples


def finishes_on_device(device: torch.device, trainer_type: str | None) -> bool:
    """Whether the DataLoader path uses :class:`DeviceLoader` s: a CUDA device and one process, not dp.

    dp (Opacus) and multi-process accelerate rebuild the train DataLoader themselves (Poisson sampling,
    per-process shards), so they get plain DataLoaders; a single-process accelerate leaves the loader
    as it is (as for the cache). CPU keeps float32 batches from the workers: there the model step and
    the augmentation share the same cores, and its golden values and resume tests depend on that path.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return device.type == "cuda" and trainer_type != "dp" and world == 1


def sub_batches(batch_size: int, workers: int) -> int:
    """Worker tasks one batch of a :class:`DeviceLoader` is split into: the most of SUB_BATCH_SPLITS that
    divides ``batch_size`` into parts of at least SUB_BATCH_MIN images; 1 (whole batches) otherwise or
    with no workers. Equal parts make each batch exactly the concatenation of its parts."""
    if workers == 0:
        return 1
    for parts in SUB_BATCH_SPLITS:
        if batch_size % parts == 0 and batch_size // parts >= SUB_BATCH_MIN:
            return parts
    return 1


def device_loader(ds: ImageListDataset, recipe: str, train: bool, sampler_name: str, batch_size: int, workers: int,
                  generator: torch.Generator, device: torch.device, *, persistent: bool,
                  channels_last: bool = False) -> "DeviceLoader":
    """A :class:`DeviceLoader` over ``ds`` (whose transform must end in uint8, ``build_transform(uint8=True)``)."""
    parts = sub_batches(batch_size, workers)
    # Same number of images in flight per worker as a DataLoader of whole batches with its default of 2.
    loader = _make_loader(ds, train, sampler_name, batch_size // parts, workers, generator,
                          pin=device.type == "cuda", persistent=persistent,
                          prefetch=PREFETCH_BATCHES * parts if workers > 0 else None)
    return DeviceLoader(loader, FloatTail(recipe, channels_last), device, batch_size, parts)


class DeviceLoader:
    """A DataLoader stand-in that finishes uint8 batches on ``device``: yields ``(images, targets)`` there.

    ``loader`` yields uint8 ``(B/parts, 3, H, W)`` batches (pinned for CUDA); every ``parts`` consecutive
    ones are copied to ``device`` (``non_blocking``: the host goes on while the copy runs), concatenated
    into one batch of ``batch_size`` (the last may be partial) and turned into float32 by ``tail``
    (normalised; channels_last when asked), equal to the CPU float path for the same samples. ``len`` is
    batches per epoch. ``generator``, ``batch_size``, ``num_workers``, ``pin_memory``,
    ``persistent_workers`` and ``dataset`` mirror the DataLoader attributes other code reads, as
    :class:`mltrack.data.cache.CachedLoader` does; ``loader`` is the DataLoader itself.
    """

    def __init__(self, loader: DataLoader, tail: FloatTail, device: torch.device, batch_size: int,
                 parts: int = 1) -> None:
        if loader.batch_size is None or loader.batch_size * parts != batch_size:
            raise ValueError(f"{parts} parts of {loader.batch_size} images do not make batches of {batch_size}")
        self.loader, self.tail, self.device = loader, tail, device
        self.batch_size, self.parts = batch_size, parts
        self.generator: Optional[torch.Generator] = loader.generator
        self.num_workers, self.pin_memory = loader.num_workers, loader.pin_memory
        self.persistent_workers, self.dataset = loader.persistent_workers, loader.dataset
        self.channels_last = tail.channels_last

    def __len__(self) -> int:
        return -(-len(self.loader) // self.parts)  # ceil(ceil(N / b) / parts) == ceil(N / (b * parts))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images: list[torch.Tensor] = []
        targets: list[torch.Tensor] = []
        for x, y in self.loader:
            images.append(x.to(self.device, non_blocking=True))
            targets.append(y.to(self.device, non_blocking=True))
            if len(images) == self.parts:
                yield self._finish(images, targets)
                images, targets = [], []
        if images:
            yield self._finish(images, targets)

    def _finish(self, images: list[torch.Tensor], targets: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x = images[0] if len(images) == 1 else torch.cat(images)
        y = targets[0] if len(targets) == 1 else torch.cat(targets)
        return self.tail(x), y


def _cache_mode(data_cfg: DataConfig, sizes: dict[str, int], device: torch.device,
                trainer_type: str | None) -> tuple[str, str]:
    """``data.cache`` resolved for these split sizes (mltrack.data.cache.resolve_cache_mode)."""
    from mltrack.data import cache

    nbytes = cache.cache_bytes(sizes, data_cfg.transforms, data_cfg.image_size, data_cfg.precrop_size)
    return cache.resolve_cache_mode(data_cfg.cache, device, nbytes, trainer_type=trainer_type)


def _cached_loaders(data_cfg: DataConfig, mode: str, datasets: dict[str, ImageListDataset], batch_size: int,
                    gens: dict[str, torch.Generator], workers: int, device: torch.device,
                    channels_last: bool, train_dtype: torch.dtype) -> dict[str, Any]:
    """Cached (ram, gpu) or decoding (decode_gpu) loaders for ``datasets``' splits, driven by the same
    generators as DataLoaders; decode_gpu reads files in ``workers`` threads."""
    from mltrack.data import cache

    weights = _inverse_frequency_weights(datasets["train"].targets) if (
        data_cfg.sampler == "balanced" and "train" in datasets) else None
    raw, items = Path(data_cfg.data_dir) / "raw", {s: d.samples for s, d in datasets.items()}
    common: dict[str, Any] = dict(
        recipe=data_cfg.transforms, image_size=data_cfg.image_size, precrop_size=data_cfg.precrop_size,
        max_pixels=data_cfg.max_image_pixels, batch_size=batch_size, device=device, generators=gens,
        balanced_weights=weights, channels_last=channels_last, datasets=datasets, train_dtype=train_dtype)
    if mode == "decode_gpu":
        from mltrack.data import gpu_decode

        return gpu_decode.build_decode_loaders(raw, items, threads=workers, **common)
    return cache.build_cached_loaders(raw, items, mode=mode, workers=workers, **common)


def _make_loader(
    ds: ImageListDataset,
    train: bool,
    sampler_name: str,
    batch_size: int,
    workers: int,
    generator: torch.Generator,
    pin: bool,
    persistent: bool,
    prefetch: int | None = None,
) -> DataLoader:
    sampler = None
    if train and sampler_name == "balanced":
        sampler = WeightedRandomSampler(
            _inverse_frequency_weights(ds.targets), num_samples=len(ds), replacement=True, generator=generator
        )
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin,
        drop_last=False,
        persistent_workers=persistent,
        worker_init_fn=seed_worker if workers > 0 else None,
        generator=generator,
        prefetch_factor=prefetch,
    )


def _inverse_frequency_weights(targets: list[int]) -> torch.Tensor:
    """Per-sample weight 1 / (count of its class): each class is drawn equally often in expectation."""
    counts = Counter(targets)
    return torch.tensor([1.0 / counts[t] for t in targets], dtype=torch.double)
