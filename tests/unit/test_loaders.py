"""Transforms, ImageListDataset and build_loaders on a real on-disk dataset."""
from __future__ import annotations

import os
import typing
from collections import Counter

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from mltrack.config import DataConfig, TransformName
from mltrack.data.dataset import ImageListDataset, worker_error_message
from mltrack.data.index import read_index
from mltrack.data import loaders as loaders_mod
from mltrack.data.loaders import DeviceLoader, build_loaders, device_loader, resolve_num_workers, sub_batches
from mltrack.data.transforms import TRANSFORMS, FloatTail, build_transform
from mltrack.errors import ConfigError, DataError


def _cfg(data_dir, **kw) -> DataConfig:
    base = {"data_dir": str(data_dir), "image_size": 12, "transforms": "digits", "num_workers": 0}
    return DataConfig(**{**base, **kw})


def _epoch(loader) -> tuple[list[int], torch.Tensor]:
    labels, images = [], []
    for x, y in loader:
        labels += y.tolist()
        images.append(x)
    return labels, torch.cat(images)


# ------------------------------------------------------------------ transforms


def test_registry_keys_match_config_literal():
    assert set(TRANSFORMS) == set(typing.get_args(TransformName))
    for target in TRANSFORMS.values():
        assert target.startswith("mltrack.data.transforms:")


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
@pytest.mark.parametrize("train", [True, False])
def test_every_transform_gives_float32_chw(name, train):
    img = Image.new("RGB", (30, 20), (255, 128, 0))
    out = build_transform(name, 16, train=train)(img)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_transform_value_ranges():
    img = Image.new("RGB", (10, 10), (255, 0, 51))
    none = build_transform("none", 8, train=False)(img)
    assert torch.allclose(none[:, 0, 0], torch.tensor([1.0, 0.0, 0.2]), atol=1e-6)
    basic = build_transform("basic", 8, train=False)(img)
    assert torch.allclose(basic[:, 0, 0], torch.tensor([1.0, -1.0, -0.6]), atol=1e-6)
    imagenet = build_transform("imagenet", 8, train=False)(img)
    assert torch.allclose(imagenet[0, 0, 0], torch.tensor((1.0 - 0.485) / 0.229), atol=1e-5)


def test_digits_train_augments_without_flipping():
    img = Image.new("L", (32, 32), 0)
    img.paste(255, (2, 4, 12, 28))  # a bar near the left edge
    img = img.convert("RGB")
    train, evaluate = build_transform("digits", 32, train=True), build_transform("digits", 32, train=False)
    base = evaluate(img)
    torch.manual_seed(0)
    outs = [train(img) for _ in range(40)]
    assert any(not torch.equal(o, base) for o in outs)  # it does augment
    # a flip would move the bar to the right half; ±10 % shift, ±10° and 0.9-1.1 scale cannot
    assert all(o[0, :, 16:].mean() < o[0, :, :16].mean() for o in outs)
    assert not any(isinstance(t, (v2.RandomHorizontalFlip, v2.RandomVerticalFlip)) for t in train.transforms)


def test_imagenet_eval_is_resize_then_center_crop():
    img = Image.new("RGB", (70, 35), (10, 20, 30))
    out = build_transform("imagenet", 14, train=False)(img)
    assert out.shape == (3, 14, 14)


def test_unknown_transform_lists_valid_names():
    with pytest.raises(ConfigError, match="basic, digits, imagenet, none"):
        build_transform("fancy", 8, train=True)


# ------------------------------------------------------------------ dataset


def test_dataset_returns_tensor_and_label_and_never_substitutes(tiny_dataset):
    data = tiny_dataset(per_class=4, size=8, folds=2)
    samples = read_index(data, "train", 0)
    ds = ImageListDataset(data / "raw", samples, build_transform("none", 8, False), 10_000)
    x, y = ds[1]
    assert x.shape == (3, 8, 8) and y == samples[1][1] and ds.targets == [s[1] for s in samples]
    victim = data / "raw" / samples[2][0]
    victim.write_bytes(victim.read_bytes()[:40])  # truncated on disk after the index was read
    with pytest.raises(DataError) as err:
        ds[2]
    assert str(victim) in str(err.value)


# ------------------------------------------------------------------ loaders


def test_sizes_order_and_no_drop_last(tiny_dataset):
    data = tiny_dataset(per_class=7, size=8, folds=3)
    loaders = build_loaders(_cfg(data, fold=1), batch_size=5, seed=0, deterministic=True, device_type="cpu")
    assert loaders.class_names == ["c0", "c1", "c2"]
    for split in ("train", "val", "test"):
        assert loaders.sizes[split] == len(read_index(data, split, 1))
    labels, images = _epoch(loaders.train)
    assert len(labels) == loaders.sizes["train"] == 12 and images.shape[1:] == (3, 12, 12)
    val_labels, _ = _epoch(loaders.val)
    assert val_labels == [label for _, label in read_index(data, "val", 1)]  # val keeps file order
    assert loaders.train.pin_memory is False and loaders.train.persistent_workers is False


def test_only_requested_splits_are_built(tiny_dataset):
    data = tiny_dataset(per_class=4, size=8, folds=2)
    loaders = build_loaders(_cfg(data), 4, 0, False, "cpu", splits=("test",))
    assert loaders.train is None and loaders.val is None and loaders.test is not None
    assert set(loaders.sizes) == {"test"}


def _first_epoch(data, workers: int, seed: int):
    loaders = build_loaders(_cfg(data, num_workers=workers), 4, seed, deterministic=True, device_type="cpu")
    torch.manual_seed(123)  # run.py seeds the global RNG; with 0 workers augmentation draws from it
    return _epoch(loaders.train)


@pytest.mark.parametrize("workers", [0, 2])
def test_same_seed_same_batches(tiny_dataset, workers):
    data = tiny_dataset(per_class=6, size=12, folds=2)
    labels_a, x_a = _first_epoch(data, workers, seed=5)
    labels_b, x_b = _first_epoch(data, workers, seed=5)
    assert labels_a == labels_b and torch.equal(x_a, x_b)
    labels_c, x_c = _first_epoch(data, workers, seed=6)
    assert labels_c != labels_a or not torch.equal(x_a, x_c)


def test_generator_state_replays_the_next_epoch(tiny_dataset):
    """What exact resume relies on: the saved generator state fixes order and augmentation of an epoch."""
    data = tiny_dataset(per_class=6, size=12, folds=2)
    cfg = _cfg(data, num_workers=2)
    first = build_loaders(cfg, 4, 9, deterministic=True, device_type="cpu")
    _epoch(first.train)
    state = first.generator.get_state()
    expected_labels, expected_x = _epoch(first.train)
    resumed = build_loaders(cfg, 4, 9, deterministic=True, device_type="cpu")
    resumed.generator.set_state(state)
    labels, x = _epoch(resumed.train)
    assert labels == expected_labels and torch.equal(x, expected_x)


def test_balanced_sampler_evens_out_classes(tiny_dataset):
    data = tiny_dataset(n_classes=2, per_class=6, size=8)
    for i in range(6, 30):  # c0: 30 images, c1: 6
        Image.new("RGB", (8, 8), (i, 0, 0)).save(data / "raw" / "c0" / f"extra_{i}.png")
    from mltrack.data.splits import make_splits

    make_splits(data / "raw", data / "splits", folds=2, test_fraction=0.0)
    cfg = _cfg(data, transforms="none", sampler="balanced")
    loaders = build_loaders(cfg, 8, 0, True, "cpu", splits=("train",))
    drawn = Counter()
    for _ in range(4):
        drawn.update(_epoch(loaders.train)[0])
    plain = Counter(label for _, label in read_index(data, "train", 0))
    assert plain[0] >= 4 * plain[1]  # the data really is imbalanced
    assert sum(drawn.values()) == 4 * loaders.sizes["train"]
    assert 0.35 < drawn[1] / sum(drawn.values()) < 0.65


def test_worker_and_pinning_policy(tiny_dataset):
    data = tiny_dataset(per_class=4, size=8, folds=2)
    assert resolve_num_workers(None) == min(8, os.cpu_count() or 1) and resolve_num_workers(0) == 0
    fast = build_loaders(_cfg(data, num_workers=2), 4, 0, deterministic=False, device_type="cuda")
    assert fast.train.pin_memory and fast.train.persistent_workers and fast.val.num_workers == 2
    exact = build_loaders(_cfg(data, num_workers=2), 4, 0, deterministic=True, device_type="cpu")
    assert not exact.train.persistent_workers  # fresh workers each epoch: seeds come from the saved generator


def test_bad_file_in_worker_raises_data_error(tiny_dataset):
    data = tiny_dataset(per_class=4, size=8, folds=2)
    rel = read_index(data, "train", 0)[0][0]
    (data / "raw" / rel).write_bytes(b"")
    loaders = build_loaders(_cfg(data, num_workers=2), 2, 0, True, "cpu", splits=("train",))
    with pytest.raises(DataError, match=rel.replace(".", r"\.")) as err:
        _epoch(loaders.train)
    clean = worker_error_message(err.value)
    assert clean == f"cannot read image {data / 'raw' / rel}: empty file (0 bytes)"
    assert worker_error_message(DataError("plain")) == "plain"


def test_empty_train_index_is_an_error(tiny_dataset):
    data = tiny_dataset(per_class=4, size=8, folds=2)
    (data / "splits" / "fold_0_train.txt").write_text("")
    with pytest.raises(DataError, match="train index of fold 0 .* is empty"):
        build_loaders(_cfg(data), 4, 0, True, "cpu")


# ------------------------------------------------------------------ uint8 batches finished on the device


def _uint8_dataset(data, split: str, recipe: str, size: int) -> ImageListDataset:
    samples = read_index(data, split, 0)
    return ImageListDataset(data / "raw", samples, build_transform(recipe, size, split == "train", uint8=True), 10**8)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
@pytest.mark.parametrize("train", [True, False])
def test_uint8_recipe_then_float_tail_equals_float_recipe(name, train):
    """Same geometry and random draws, then the float tail on a batch: the float recipe's values."""
    img = Image.effect_mandelbrot((37, 23), (-2.0, -1.2, 0.8, 1.2), 60).convert("RGB")  # varied pixels
    torch.manual_seed(7)
    expected = torch.stack([build_transform(name, 16, train=train)(img) for _ in range(3)])
    torch.manual_seed(7)
    raw = torch.stack([build_transform(name, 16, train=train, uint8=True)(img) for _ in range(3)])
    assert raw.dtype == torch.uint8 and raw.shape == (3, 3, 16, 16)
    for channels_last in (False, True):
        out = FloatTail(name, channels_last)(raw.clone())
        assert out.dtype == torch.float32 and (out - expected).abs().max().item() <= 1e-6
        assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    with pytest.raises(TypeError, match="uint8 batch"):
        FloatTail(name)(expected)


@pytest.mark.parametrize("workers", [0, 2])
def test_device_loader_on_cpu_equals_the_float_loader(tiny_dataset, monkeypatch, workers):
    """What the CUDA path serves, run on the CPU: per sample equal (1e-6) to today's float batches."""
    data = tiny_dataset(per_class=5, size=14, folds=2)
    monkeypatch.setattr(loaders_mod, "SUB_BATCH_MIN", 2)  # batches of 4 in 2 worker tasks of 2
    cfg = _cfg(data, transforms="imagenet", num_workers=workers)
    plain = build_loaders(cfg, 4, 3, deterministic=True, device_type="cpu")
    cpu = torch.device("cpu")
    for split in ("val", "train"):
        ds = _uint8_dataset(data, split, "imagenet", 12)
        fast = device_loader(ds, "imagenet", split == "train", "shuffle", 4, workers,
                             torch.Generator().manual_seed(3 if split == "train" else 4), cpu,
                             persistent=False, channels_last=True)
        assert fast.parts == (2 if workers else 1) and fast.loader.batch_size == 4 // fast.parts
        reference = plain.train if split == "train" else plain.val
        assert len(fast) == len(reference) and fast.batch_size == 4 and fast.generator is not None
        torch.manual_seed(11)  # 0 workers: augmentation draws from the global RNG, in sample order
        ref_batches = list(reference)
        torch.manual_seed(11)
        batches = list(fast)
        assert [len(y) for _, y in batches] == [len(y) for _, y in ref_batches]  # last batch partial as before
        labels, images = torch.cat([y for _, y in batches]), torch.cat([x for x, _ in batches])
        assert labels.tolist() == torch.cat([y for _, y in ref_batches]).tolist()  # same order
        assert all(x.is_contiguous(memory_format=torch.channels_last) for x, _ in batches)
        ref_images = torch.cat([x for x, _ in ref_batches])
        if split == "val" or workers == 0:  # with workers, a train sample's random stream is its worker's
            assert (images - ref_images).abs().max().item() <= 1e-6


def test_device_loader_generator_state_replays_an_epoch(tiny_dataset, monkeypatch):
    """Exact resume on the CUDA path: the saved generator state fixes order and augmentation."""
    data = tiny_dataset(per_class=5, size=14, folds=2)
    monkeypatch.setattr(loaders_mod, "SUB_BATCH_MIN", 2)

    def make() -> DeviceLoader:
        return device_loader(_uint8_dataset(data, "train", "digits", 12), "digits", True, "shuffle", 4, 2,
                             torch.Generator().manual_seed(9), torch.device("cpu"), persistent=False)

    first = make()
    list(first)
    state = first.generator.get_state()
    expected = list(first)
    resumed = make()
    resumed.generator.set_state(state)
    again = list(resumed)
    assert len(again) == len(expected) == len(first)
    for (x, y), (ex, ey) in zip(again, expected):
        assert torch.equal(y, ey) and torch.equal(x, ex)


def test_gpu_feeding_loaders_default_to_all_cores_but_one():
    usable = len(os.sched_getaffinity(0))
    assert resolve_num_workers(None, feeds_gpu=True) == max(1, min(32, usable - 1))
    assert resolve_num_workers(3, feeds_gpu=True) == 3 and resolve_num_workers(0, feeds_gpu=True) == 0
    assert resolve_num_workers(None) == min(8, os.cpu_count() or 1)  # CPU runs: unchanged


def test_sub_batches_split_evenly_and_only_with_workers():
    assert sub_batches(256, 15) == 8 and sub_batches(128, 4) == 4 and sub_batches(64, 4) == 2
    assert sub_batches(32, 8) == 1 and sub_batches(96, 8) == 2 and sub_batches(97, 8) == 1
    assert sub_batches(256, 0) == 1


def test_cuda_device_gets_device_loaders_unless_dp_or_several_processes(tiny_dataset, monkeypatch):
    """Which path build_loaders picks for a CUDA device (nothing is iterated: CI has no GPU)."""
    data = tiny_dataset(per_class=4, size=8, folds=2)
    cfg = _cfg(data, num_workers=2, cache="none")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    fast = build_loaders(cfg, 64, 0, False, "cuda", trainer_type="mixed_precision", channels_last=True)
    assert isinstance(fast.train, DeviceLoader) and isinstance(fast.test, DeviceLoader)
    assert fast.train.pin_memory and fast.train.persistent_workers and fast.train.channels_last
    assert fast.train.parts == 2 and fast.train.loader.prefetch_factor == 4 and len(fast.train) == 1
    assert fast.datasets["train"][0][0].dtype == torch.uint8 and "2 workers send uint8" in fast.cache_reason
    assert fast.train.generator is fast.generator  # the checkpointed generator drives the train loader
    for trainer, world in (("dp", "1"), ("standard", "2")):
        monkeypatch.setenv("WORLD_SIZE", world)
        plain = build_loaders(cfg, 64, 0, False, "cuda", trainer_type=trainer)
        assert isinstance(plain.train, DataLoader) and plain.train.pin_memory
        assert plain.datasets["train"][0][0].dtype == torch.float32
    monkeypatch.delenv("WORLD_SIZE")
    cpu = build_loaders(cfg, 64, 0, False, "cpu", trainer_type="mixed_precision")
    assert isinstance(cpu.train, DataLoader) and cpu.datasets["train"][0][0].dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_equal_the_cpu_float_path(tiny_dataset):
    data = tiny_dataset(per_class=5, size=14, folds=2)
    cfg = _cfg(data, transforms="imagenet", num_workers=2, cache="none")
    gpu = build_loaders(cfg, 4, 0, True, "cuda", trainer_type="standard", channels_last=True)
    cpu = build_loaders(cfg, 4, 0, True, "cpu")
    assert isinstance(gpu.val, DeviceLoader)
    got = [(x, y) for x, y in gpu.val]
    assert all(x.device.type == "cuda" and x.is_contiguous(memory_format=torch.channels_last) for x, _ in got)
    x_gpu, y_gpu = torch.cat([x.cpu() for x, _ in got]), torch.cat([y.cpu() for _, y in got])
    labels, x_cpu = _epoch(cpu.val)
    assert y_gpu.tolist() == labels and (x_gpu - x_cpu).abs().max().item() <= 1e-6
