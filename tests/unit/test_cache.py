"""The decode-once cache and its batched augmentation (mltrack.data.cache), on CPU, against torchvision.

How the augmentation is checked against the reference (``transforms``) recipe:
- eval batches: compared tensor by tensor with the eval transform; they are the same PIL calls, so the
  tolerance is float rounding (1e-5), far below one grey level (1/255/std ~ 0.017).
- train geometry: a non-square coordinate image (red = x, green = y) is augmented 1500 times by each
  pipeline; the red/green slope of an output gives its crop's width/height in original pixels (and its
  sign the flip). Widths, heights, areas and aspects must agree by a two-sample Kolmogorov-Smirnov
  statistic below 0.071 (the alpha = 0.001 critical value; two reference runs differ by 0.02-0.035),
  while a crop scale of 0.3-1 instead of 0.08-1, or an aspect range of 0.6-1.6, is seen (KS ~0.3, ~0.25).
- pixels: per-channel mean and std of many augmented samples of smooth natural-like images agree within
  0.05 (normalised units), and digits' zero-fill share within 1.5 points.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from mltrack.config import DataConfig, load_config
from mltrack.data.cache import (DECODE_CHUNK, CachedLoader, CachedSplit, decode_split, geometry, resolve_cache_mode,
                                sample_params)
from mltrack.data.loaders import build_loaders
from mltrack.data.splits import make_splits
from mltrack.data.transforms import build_transform
from mltrack.errors import ConfigError, DataError

RECIPES = ("none", "basic", "digits", "imagenet")


def _smooth_image(seed: int, width: int, height: int) -> Image.Image:
    """A natural-looking RGB image: an upsampled low-frequency random field plus a little noise."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(20, 236, (4, 5, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    arr = np.asarray(field).astype(np.int16) + rng.integers(-6, 7, (height, width, 3))
    return Image.fromarray(np.clip(arr, 20, 235).astype(np.uint8))


def _dataset(root: Path, per_class: int = 6, folds: int = 2) -> Path:
    """Two classes of non-square JPEG and PNG images of different sizes, split into folds."""
    for c in range(2):
        (root / "raw" / f"c{c}").mkdir(parents=True)
        for j in range(per_class):
            img = _smooth_image(100 * c + j, 30 + 7 * (j % 6), 22 + 5 * (j % 3))
            img.save(root / "raw" / f"c{c}" / (f"i{j}.jpg" if j % 2 else f"i{j}.png"))
    make_splits(root / "raw", root / "splits", folds=folds, test_fraction=0.2)
    return root


def _cfg(data_dir: Path, **kw: Any) -> DataConfig:
    base = {"data_dir": str(data_dir), "image_size": 16, "transforms": "imagenet", "num_workers": 0, "cache": "ram"}
    return DataConfig(**{**base, **kw})


def _epoch(loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(loader)
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def _repeat_loader(img: Image.Image, recipe: str, size: int, n: int, seed: int, tmp: Path) -> CachedLoader:
    """A cached train loader serving ``img`` ``n`` times (decoded once through the real decode path)."""
    path = tmp / f"src_{recipe}.png"
    img.save(path)
    pixels, sizes = decode_split([path], geometry(recipe, size, train=True), 10**8, workers=0)
    split = CachedSplit(pixels.expand(n, -1, -1, -1), sizes.expand(n, -1), torch.zeros(n, dtype=torch.int64))
    return CachedLoader(split, recipe, size, 500, torch.device("cpu"), train=True,
                        generator=torch.Generator().manual_seed(seed))


def _reference(img: Image.Image, recipe: str, size: int, n: int, seed: int, **override: Any) -> torch.Tensor:
    torch.manual_seed(seed)
    transform = build_transform(recipe, size, train=True)
    if override:  # a deliberately different RandomResizedCrop, to show the comparison can fail
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        transform = v2.Compose([v2.RandomResizedCrop(size, antialias=True, **override), v2.RandomHorizontalFlip(),
                                v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    return torch.stack([transform(img) for _ in range(n)])


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = torch.cat([a, b]).sort().values
    cdf_a = torch.searchsorted(a.sort().values, grid, right=True) / len(a)
    cdf_b = torch.searchsorted(b.sort().values, grid, right=True) / len(b)
    return float((cdf_a - cdf_b).abs().max())


def _crops(batch: torch.Tensor, width: int, height: int) -> dict[str, torch.Tensor]:
    """Crop size in original pixels read back from augmented coordinate images (red = x, green = y).

    The red/green slope over the inner half of the output, times its side, is the crop's extent in grey
    levels; scaled to original pixels and rounded, it recovers torchvision's integer crop width/height
    whatever the interpolation does at the crop's border. A negative red slope is a flip.
    """
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    x = (batch * std + mean) * 255
    side = x.shape[-1]
    inner = slice(side // 4, side - side // 4)
    k = torch.arange(side, dtype=torch.float32)[inner]
    k = k - k.mean()

    def extent(profile: torch.Tensor) -> torch.Tensor:
        profile = profile[:, inner]
        return ((profile - profile.mean(1, keepdim=True)) * k).sum(1) / (k * k).sum() * side

    dx, dy = extent(x[:, 0].mean(1)), extent(x[:, 1].mean(2))
    w, h = torch.round(dx.abs() * (width - 1) / 255), torch.round(dy.abs() * (height - 1) / 255)
    return {"width": w, "height": h, "area": w * h, "aspect": w / h.clamp(min=1), "flipped": (dx < 0).double()}


# ---------------------------------------------------------------- eval: the same tensors


@pytest.mark.parametrize("recipe", RECIPES)
def test_eval_batches_equal_the_eval_transform(recipe: str, tmp_path: Path) -> None:
    data = _dataset(tmp_path / "ds")
    plain = build_loaders(_cfg(data, transforms=recipe, cache="none"), 4, 0, False, "cpu")
    cached = build_loaders(_cfg(data, transforms=recipe), 4, 0, False, "cpu")
    assert cached.cache == "ram" and isinstance(cached.val, CachedLoader) and plain.cache == "none"
    for split in ("val", "test"):
        want, want_y = _epoch(getattr(plain, split))
        got, got_y = _epoch(getattr(cached, split))
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert torch.equal(got_y, want_y)
        assert (got - want).abs().max() <= 1e-5  # same PIL resize/crop; one grey level would be >= 0.0039


# ---------------------------------------------------------------- train: the same distribution


def test_crop_geometry_matches_torchvision_random_resized_crop(tmp_path: Path) -> None:
    width, height = 64, 40  # not square: the crop aspect must follow the original, not the stored square
    xx, yy = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    coords = Image.fromarray(np.stack([xx, yy, np.full_like(xx, 128)], -1).round().astype(np.uint8))
    n, critical = 1500, 0.071  # two-sample KS critical value at alpha = 0.001 for 1500 + 1500
    ours = _crops(_epoch(_repeat_loader(coords, "imagenet", 32, n, seed=1, tmp=tmp_path))[0], width, height)
    ref = _crops(_reference(coords, "imagenet", 32, n, seed=2), width, height)
    for key in ("width", "height", "area", "aspect"):
        assert _ks(ours[key], ref[key]) < critical, key
    assert abs(float(ours["flipped"].mean()) - 0.5) < 0.05 and abs(float(ref["flipped"].mean()) - 0.5) < 0.05
    # The comparison does see a different scale range or aspect range (KS ~0.3 and ~0.25).
    wrong_scale = _crops(_reference(coords, "imagenet", 32, n, seed=3, scale=(0.3, 1.0)), width, height)
    assert _ks(ours["area"], wrong_scale["area"]) > 3 * critical
    wrong_ratio = _crops(_reference(coords, "imagenet", 32, n, seed=4, ratio=(0.6, 1.6)), width, height)
    assert _ks(ours["aspect"], wrong_ratio["aspect"]) > 2 * critical


@pytest.mark.parametrize("recipe", ["imagenet", "digits", "basic"])
def test_pixel_statistics_match_the_reference(recipe: str, tmp_path: Path) -> None:
    n, size = 600, 24
    for seed, (w, h) in enumerate([(60, 40), (33, 50)]):
        img = _smooth_image(seed, w, h)
        ours = _epoch(_repeat_loader(img, recipe, size, n, seed=seed, tmp=tmp_path))[0]
        ref = _reference(img, recipe, size, n, seed=seed + 10)
        per_channel = lambda t: (t.mean((0, 2, 3)), t.std((0, 2, 3)))  # noqa: E731
        (om, os_), (rm, rs) = per_channel(ours), per_channel(ref)
        assert (om - rm).abs().max() < 0.05 and (os_ - rs).abs().max() < 0.05, (recipe, om, rm, os_, rs)
        if recipe == "digits":  # the zero fill of pixels rotated/shifted in from outside (normalised -1)
            fill_ours, fill_ref = float((ours == -1).all(1).double().mean()), float((ref == -1).all(1).double().mean())
            assert fill_ref > 0.01 and abs(fill_ours - fill_ref) < 0.015


def test_flip_only_recipes_keep_pixels_exact(tmp_path: Path) -> None:
    img = _smooth_image(7, 20, 20)
    got = _epoch(_repeat_loader(img, "basic", 20, 64, seed=0, tmp=tmp_path))[0]
    plain = build_transform("basic", 20, train=False)(img)
    # Equal up to float rounding (normalisation is folded into one multiply-add).
    flipped = torch.tensor([torch.allclose(x, plain.flip(2), atol=1e-6) for x in got])
    same = torch.tensor([torch.allclose(x, plain, atol=1e-6) for x in got])
    assert bool((flipped | same).all()) and 16 < int(flipped.sum()) < 48


# ---------------------------------------------------------------- randomness: reproducible and resumable


@pytest.mark.parametrize("sampler", ["shuffle", "balanced"])
def test_generator_state_replays_epochs(sampler: str, tmp_path: Path) -> None:
    data = _dataset(tmp_path / "ds")
    cfg = _cfg(data, sampler=sampler)
    first = build_loaders(cfg, 3, 5, False, "cpu", splits=("train",))
    epoch0 = _epoch(first.train)
    state = first.generator.get_state()
    epoch1 = _epoch(first.train)
    assert not torch.equal(epoch0[0], epoch1[0])  # a new order and new crops each epoch
    again = build_loaders(cfg, 3, 5, False, "cpu", splits=("train",))
    assert all(torch.equal(a, b) for a, b in zip(_epoch(again.train), epoch0))  # same seed, same epoch
    resumed = build_loaders(cfg, 3, 5, False, "cpu", splits=("train",))
    resumed.generator.set_state(state)
    assert all(torch.equal(a, b) for a, b in zip(_epoch(resumed.train), epoch1))
    assert resumed.train.generator is resumed.generator  # what the checkpoint hook saves
    assert len(resumed.train) == -(-resumed.sizes["train"] // 3)


def test_params_are_drawn_only_from_the_generator() -> None:
    sizes = torch.tensor([[500, 375], [40, 400], [300, 20]])
    torch.manual_seed(0)
    a = sample_params("imagenet", sizes, 224, torch.Generator().manual_seed(3))
    torch.manual_seed(1)  # the global RNG must not matter
    b = sample_params("imagenet", sizes, 224, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    left, top, w, h = a[:, 0], a[:, 1], a[:, 2], a[:, 3]
    assert bool(((left >= 0) & (top >= 0) & (left + w <= 1 + 1e-9) & (top + h <= 1 + 1e-9) & (w > 0)).all())


# ---------------------------------------------------------------- safety and choice of mode


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_files_are_rejected_while_building_the_cache(workers: int, tmp_path: Path) -> None:
    data = _dataset(tmp_path / "ds", per_class=45, folds=2)
    train = (data / "splits" / "fold_0_train.txt").read_text().split()
    assert len(train) > DECODE_CHUNK  # several pool tasks; the bad files sit in the first and the last
    if workers:  # the pool returns what in-process decoding does, in order
        paths = [data / "raw" / rel for rel in train]
        pooled, in_process = (decode_split(paths, ("square", 9), 10**6, w) for w in (workers, 0))
        assert all(torch.equal(a, b) for a, b in zip(pooled, in_process))
    big = data / "raw" / train[-1]
    Image.new("RGB", (400, 300)).save(big, format="PNG" if big.suffix == ".png" else "JPEG")
    with pytest.raises(DataError, match=re.escape(big.name) + r": image size 400x300 .*decompression-bomb limit"):
        build_loaders(_cfg(data, num_workers=workers, max_image_pixels=50_000), 4, 0, False, "cpu", splits=("train",))
    (data / "raw" / train[0]).write_bytes(b"")
    with pytest.raises(DataError, match=r"cannot read image .*: empty file \(0 bytes\)"):
        build_loaders(_cfg(data, num_workers=workers), 4, 0, False, "cpu", splits=("train",))


def test_mode_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert resolve_cache_mode("auto", cpu, 10, trainer_type="standard")[0] == "none"
    assert resolve_cache_mode("ram", cpu, 10)[0] == "ram" and resolve_cache_mode("none", cpu, 10)[0] == "none"
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        resolve_cache_mode("gpu", cpu, 10)
    with pytest.raises(ConfigError, match="trainer_type dp"):
        resolve_cache_mode("ram", cpu, 10, trainer_type="dp")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="WORLD_SIZE=2"):
        resolve_cache_mode("ram", cpu, 10)
    with pytest.raises(ConfigError, match="data.cache ram/gpu cannot be used with trainer_type dp"):
        load_config(None, ["data.cache=gpu", "training.trainer_type=dp"])


# ---------------------------------------------------------------- end to end: exact resume through run.train


def _train_cfg(data_dir: Path, epochs: int) -> Any:
    return load_config(None, [
        f"data.data_dir={data_dir}", "data.dataset_name=cached", "data.image_size=12", "data.num_workers=0",
        "data.transforms=imagenet", "data.cache=ram", "training.device=cpu", f"training.num_epochs={epochs}",
        "training.batch_size=4", "tracking.progress='off'", "tracking.tensorboard=false",
        "tracking.confusion_every_epoch=false", "scheduler.name=none"])


def test_training_with_the_cache_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mltrack import checkpoint
    from mltrack.resume import open_resume
    from mltrack.run import train

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(var, raising=False)
    data = _dataset(tmp_path / "ds", per_class=8)
    straight = train(_train_cfg(data, 2))
    first = train(_train_cfg(data, 1))
    point = open_resume(str(first.run_dir / "weights" / "last.pt"))
    resumed = train(_train_cfg(data, 2), point)
    want = checkpoint.load(straight.run_dir / "weights" / "last.pt")
    got = checkpoint.load(resumed.run_dir / "weights" / "last.pt")
    assert got["progress"]["epoch"] == 2 and resumed.run_id == first.run_id
    assert [r["train/loss"] for r in got["progress"]["history"]] == [r["train/loss"] for r in want["progress"]["history"]]
    assert all(torch.equal(got["model"][k], want["model"][k]) for k in want["model"])
    assert torch.equal(got["rng"]["loader"], want["rng"]["loader"])


@pytest.mark.parametrize("parts", [1, 3, 8])
def test_gather_rows_equals_index_select(parts: int) -> None:
    """The RAM stager's threaded gather: any split of the rows gives pixels[idx], repeats included."""
    from concurrent.futures import ThreadPoolExecutor

    from mltrack.data.cache import gather_rows

    g = torch.Generator().manual_seed(parts)
    pixels = torch.randint(0, 256, (20, 3, 5, 7), dtype=torch.uint8, generator=g)
    idx = torch.tensor([19, 0, 3, 3, 7, 12, 0, 5, 18, 2, 11])
    out = torch.zeros((len(idx), 3, 5, 7), dtype=torch.uint8)
    with ThreadPoolExecutor(parts) as pool:
        gather_rows(pool, parts, pixels, idx, out)
    assert torch.equal(out, pixels.index_select(0, idx))
