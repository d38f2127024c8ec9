"""DataLoaders for one fold: class map from raw/, validated index files, seeded shuffling.

Reproducibility: the train loader's shuffle order (or balanced sampling) and the seeds of its workers are
drawn from ``Loaders.generator`` at the start of each epoch, so that generator's state (saved in
checkpoints) fixes everything the next epoch does. Val/test loaders have their own generators, so
evaluating never consumes the global torch RNG or the train generator.
"""
from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from mltrack.config import DataConfig
from mltrack.data.dataset import ImageListDataset
from mltrack.data.index import SPLITS, class_names, read_index
from mltrack.data.transforms import build_transform
from mltrack.errors import DataError

MAX_AUTO_WORKERS = 8


@dataclass
class Loaders:
    """The loaders of the requested splits (None for splits not requested) and what describes them."""

    train: DataLoader | Any | None  # Any: a mltrack.data.cache.CachedLoader when data.cache is in use
    val: DataLoader | Any | None
    test: DataLoader | Any | None
    class_names: list[str]
    sizes: dict[str, int]  # split -> number of samples, for the requested splits
    generator: torch.Generator  # train shuffle/sampler/worker-seed generator; checkpoint its get_state()
    datasets: dict[str, ImageListDataset] = field(default_factory=dict)
    cache: str = "none"  # data path in use: none (DataLoader), ram or gpu (mltrack.data.cache)
    cache_reason: str = ""  # why (the data.cache setting, or what auto decided from)


def resolve_num_workers(num_workers: int | None) -> int:
    """``None`` -> min(8, CPU count); an explicit value (0 = load in the main process) is kept."""
    if num_workers is not None:
        return num_workers
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
) -> Loaders:
    """Build loaders for ``splits`` of fold ``data_cfg.fold`` under ``data_cfg.data_dir``.

    Train shuffles (or samples with replacement, inverse class frequency, when ``data_cfg.sampler`` is
    "balanced") from a generator seeded with ``seed``; val/test keep file order; nothing drops a last
    partial batch. ``pin_memory`` is on for ``device_type == "cuda"``. Workers persist across epochs
    except when ``deterministic``: a persistent worker's RNG would carry over epochs, which a resumed run
    (fresh workers) could not reproduce. Raises DataError for missing/invalid index files, an empty train
    split, or bad paths.

    ``data_cfg.cache`` may replace the loaders by :class:`mltrack.data.cache.CachedLoader` s (decoded
    once, augmented on ``device``, default ``device_type``'s current device); ``trainer_type`` lets
    ``auto`` rule out trainers the cache cannot serve (unknown: no cache), ``channels_last`` sets the
    layout of cached batches. The same generator drives the cached train loader.
    """
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; expected a subset of {SPLITS}")
    data_dir = Path(data_cfg.data_dir)
    raw_dir = data_dir / "raw"
    names = class_names(raw_dir)
    workers = resolve_num_workers(data_cfg.num_workers)
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, DataLoader | None] = {s: None for s in SPLITS}
    datasets: dict[str, ImageListDataset] = {}
    for offset, split in enumerate(SPLITS):
        if split not in splits:
            continue
        samples = read_index(data_dir, split, data_cfg.fold)
        if split == "train" and not samples:
            raise DataError(f"the train index of fold {data_cfg.fold} in {data_dir / 'splits'} is empty; split again")
        transform = build_transform(data_cfg.transforms, data_cfg.image_size, train=split == "train")
        ds = ImageListDataset(raw_dir, samples, transform, data_cfg.max_image_pixels)
        datasets[split] = ds
        # Eval loaders get their own generator (seed + offset) so they never touch the train stream.
        gen = generator if split == "train" else torch.Generator().manual_seed(seed + offset)
        out[split] = _make_loader(ds, split == "train", data_cfg.sampler, batch_size, workers, gen,
                                  pin=device_type == "cuda", persistent=workers > 0 and not deterministic)
    sizes = {s: len(d) for s, d in datasets.items()}
    mode, reason = _cached(data_cfg, out, datasets, sizes, batch_size, generator, workers,
                           device or torch.device(device_type), trainer_type, channels_last)
    return Loaders(
        train=out["train"], val=out["val"], test=out["test"], class_names=names,
        sizes=sizes, generator=generator, datasets=datasets, cache=mode, cache_reason=reason,
    )


def _cached(data_cfg: DataConfig, out: dict, datasets: dict[str, ImageListDataset], sizes: dict[str, int],
            batch_size: int, generator: torch.Generator, workers: int, device: torch.device,
            trainer_type: str | None, channels_last: bool) -> tuple[str, str]:
    """Swap ``out``'s DataLoaders for cached loaders when ``data.cache`` resolves to ram or gpu."""
    from mltrack.data import cache

    nbytes = cache.cache_bytes(sizes, data_cfg.transforms, data_cfg.image_size, data_cfg.precrop_size)
    mode, reason = cache.resolve_cache_mode(data_cfg.cache, device, nbytes, trainer_type=trainer_type)
    if mode == "none":
        return mode, reason
    # Same generators as the DataLoaders: train shares the checkpointed one, eval splits their own.
    gens = {s: generator if s == "train" else out[s].generator for s in datasets}
    weights = _inverse_frequency_weights(datasets["train"].targets) if (
        data_cfg.sampler == "balanced" and "train" in datasets) else None
    out.update(cache.build_cached_loaders(
        Path(data_cfg.data_dir) / "raw", {s: d.samples for s, d in datasets.items()}, mode=mode,
        recipe=data_cfg.transforms, image_size=data_cfg.image_size, precrop_size=data_cfg.precrop_size,
        max_pixels=data_cfg.max_image_pixels, workers=workers, batch_size=batch_size, device=device,
        generators=gens, balanced_weights=weights, channels_last=channels_last, datasets=datasets))
    return mode, reason


def _make_loader(
    ds: ImageListDataset,
    train: bool,
    sampler_name: str,
    batch_size: int,
    workers: int,
    generator: torch.Generator,
    pin: bool,
    persistent: bool,
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
    )


def _inverse_frequency_weights(targets: list[int]) -> torch.Tensor:
    """Per-sample weight 1 / (count of its class): each class is drawn equally often in expectation."""
    counts = Counter(targets)
    return torch.tensor([1.0 / counts[t] for t in targets], dtype=torch.double)
