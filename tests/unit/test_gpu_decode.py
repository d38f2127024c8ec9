"""Per-epoch decoding (mltrack.data.gpu_decode, data.cache: decode_gpu).

On CPU (CI): the mode's resolution and validation, the header scan's routing, the reader thread (order,
bounded queue, shutdown, errors), the device-side geometry against the cache's PIL geometry, and the
loader itself, which on a CPU device decodes every file on the CPU and must then serve exactly the
cache's batches, epoch after epoch. On CUDA: decode_gpu batches against gpu-cache batches of the same
files and generator state (tolerances at the tests).
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from mltrack.config import DataConfig, load_config
from mltrack.data import cache
from mltrack.data.cache import build_cached_loaders, geometry, resize_like_transforms, resolve_cache_mode
from mltrack.data.gpu_decode import (DecodeLoader, FileIndex, _Reader, build_decode_loaders, decode_on_cpu,
                                     fit_geometry, resize_batch, scan_headers)
from mltrack.data.images import load_rgb
from mltrack.data.index import read_index
from mltrack.data.loaders import build_loaders
from mltrack.data.splits import make_splits
from mltrack.errors import ConfigError, DataError

RECIPES = ("none", "basic", "digits", "imagenet")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _image(seed: int, width: int, height: int) -> Image.Image:
    """Smooth colour field plus a little noise: natural enough that JPEG decoders agree closely."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(20, 236, (4, 5, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    arr = np.asarray(field).astype(np.int16) + rng.integers(-6, 7, (height, width, 3))
    return Image.fromarray(np.clip(arr, 20, 235).astype(np.uint8))


def _save(img: Image.Image, path: Path, kind: str) -> None:
    """kind: jpg (RGB), png, gray (L JPEG), cmyk (CMYK JPEG), rotated (EXIF orientation 6), progressive."""
    if kind == "png":
        img.save(path.with_suffix(".png"))
    elif kind == "gray":
        img.convert("L").save(path, quality=95)
    elif kind == "cmyk":
        img.convert("CMYK").save(path, quality=95)
    elif kind == "rotated":
        exif = Image.Exif()
        exif[0x0112] = 6
        img.save(path, quality=95, exif=exif)
    else:
        img.save(path, quality=95, progressive=kind == "progressive")


KINDS = ("jpg", "png", "jpg", "gray", "cmyk", "rotated", "progressive", "jpg")


def _dataset(root: Path, per_class: int = 8, same_size: bool = False) -> Path:
    """Two classes of images of every KIND (mixed sizes unless ``same_size``), split into 2 folds."""
    for c in range(2):
        (root / "raw" / f"c{c}").mkdir(parents=True)
        for j in range(per_class):
            w, h = (48, 40) if same_size else (40 + 9 * (j % 4), 30 + 7 * (j % 3))
            _save(_image(100 * c + j, w, h), root / "raw" / f"c{c}" / f"i{j}.jpg", KINDS[j % len(KINDS)])
    make_splits(root / "raw", root / "splits", folds=2, test_fraction=0.2)
    return root


def _samples(root: Path) -> dict[str, list[tuple[str, int]]]:
    return {s: read_index(root, s, 0) for s in ("train", "val")}


def _both(root: Path, recipe: str, device: torch.device, seed: int = 3, size: int = 24,
          batch: int = 5) -> tuple[dict[str, Any], dict[str, Any]]:
    """(decode loaders, cache loaders) of the same files, generators seeded alike."""
    common: dict[str, Any] = dict(recipe=recipe, image_size=size, precrop_size=None, max_pixels=10**8,
                                  batch_size=batch, device=device)

    def gens() -> dict[str, torch.Generator]:
        return {s: torch.Generator().manual_seed(seed + k) for k, s in enumerate(("train", "val"))}
    decode = build_decode_loaders(root / "raw", _samples(root), threads=2, generators=gens(), **common)
    cached = build_cached_loaders(root / "raw", _samples(root), mode="gpu" if device.type == "cuda" else "ram",
                                  workers=0, generators=gens(), **common)
    return decode, cached


def _epoch(loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(loader)
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


# ---------------------------------------------------------------- mode and config


def test_explicit_mode_needs_cuda_one_process_and_no_dp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with pytest.raises(ConfigError, match="data.cache: decode_gpu needs a CUDA device"):
        resolve_cache_mode("decode_gpu", cpu, 10, trainer_type="standard")
    assert resolve_cache_mode("decode_gpu", cuda, 10, trainer_type="standard") == ("decode_gpu", "data.cache: decode_gpu")
    with pytest.raises(ConfigError, match="data.cache decode_gpu cannot be used with trainer_type dp"):
        resolve_cache_mode("decode_gpu", cuda, 10, trainer_type="dp")
    with pytest.raises(ConfigError, match="nor can decode_gpu"):
        load_config(None, ["data.cache=decode_gpu", "training.trainer_type=dp"])
    assert load_config(None, ["data.cache=decode_gpu"]).data.cache == "decode_gpu"
    data = _dataset(tmp_path / "ds")
    with pytest.raises(ConfigError, match="needs a CUDA device"):  # build_loaders refuses it on CPU too
        build_loaders(DataConfig(data_dir=str(data), image_size=16, cache="decode_gpu", num_workers=0),
                      4, 0, False, "cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="WORLD_SIZE=2"):
        resolve_cache_mode("decode_gpu", cuda, 10, trainer_type="standard")


def test_auto_decodes_on_the_gpu_when_nothing_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory readings are fixed (CI has no GPU): 4 GiB free on the device, 8 GiB available RAM."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * 2**30, 16 * 2**30))
    monkeypatch.setattr(cache, "available_ram", lambda: 8 * 2**30)
    cuda, gib = torch.device("cuda"), 2**30
    assert resolve_cache_mode("auto", cuda, gib, trainer_type="standard")[0] == "gpu"  # <= 25 % of 4 GiB
    assert resolve_cache_mode("auto", cuda, 3 * gib, trainer_type="standard")[0] == "ram"  # <= 50 % of 8 GiB
    mode, reason = resolve_cache_mode("auto", cuda, 5 * gib, trainer_type="mixed_precision")
    assert mode == "decode_gpu"
    assert "5.0 GiB" in reason and "4.0 GiB free" in reason and "8.0 GiB available" in reason and "nvJPEG" in reason
    assert resolve_cache_mode("auto", cuda, 3 * gib, trainer_type="dp")[0] == "none"
    assert resolve_cache_mode("auto", torch.device("cpu"), 3 * gib, trainer_type="standard")[0] == "none"


# ---------------------------------------------------------------- header scan and CPU route


def test_header_scan_routes_what_nvjpeg_should_not_decode(tmp_path: Path) -> None:
    raw = _dataset(tmp_path / "ds") / "raw" / "c0"
    paths = [raw / (f"i{j}.png" if KINDS[j] == "png" else f"i{j}.jpg") for j in range(len(KINDS))]
    files = scan_headers(paths, 10**8, threads=3)
    want_cpu = {"jpg": False, "progressive": False, "gray": False, "png": True, "cmyk": True, "rotated": True}
    assert files.on_cpu == [want_cpu[k] for k in KINDS]
    for path, (w, h) in zip(paths, files.sizes.tolist()):
        assert (w, h) == load_rgb(path, 10**8).size  # upright: the rotated one has its sides swapped
    assert scan_headers(paths, 10**8, threads=1, cpu_only=True).on_cpu == [True] * len(paths)
    with pytest.raises(DataError, match=r"i0\.jpg.*decompression-bomb limit"):
        scan_headers(paths, 100, threads=2)
    paths[1].write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"i1\.png: not an image"):
        scan_headers(paths, 10**8, threads=2)


@pytest.mark.parametrize("recipe", RECIPES)
def test_cpu_loader_serves_exactly_the_cache_batches(recipe: str, tmp_path: Path) -> None:
    """On CPU every file takes the CPU route: same pixels as the cache, same generator -> same epochs."""
    data = _dataset(tmp_path / "ds")
    decode, cached = _both(data, recipe, torch.device("cpu"))
    for split in ("train", "val"):
        assert isinstance(decode[split], DecodeLoader) and len(decode[split]) == len(cached[split])
        for _ in range(2):  # the second epoch draws a new plan from the advanced generator, in both
            got, got_y = _epoch(decode[split])
            want, want_y = _epoch(cached[split])
            assert torch.equal(got, want) and torch.equal(got_y, want_y)
            assert decode[split].cpu_decoded == len(decode[split].labels)
    assert torch.equal(decode["train"].generator.get_state(), cached["train"].generator.get_state())


def test_a_bad_file_raises_its_data_error_from_the_reader(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "ds")
    decode, _ = _both(data, "imagenet", torch.device("cpu"))
    rel = decode["train"].files.paths[0]
    data_bytes = Path(rel).read_bytes()
    Path(rel).write_bytes(data_bytes[:len(data_bytes) // 2])  # after the header scan: found by the reader
    with pytest.raises(DataError, match="cannot read image .*" + Path(rel).name):
        _epoch(decode["train"])
    assert not [t for t in threading.enumerate() if t.name == "mltrack-decode-reader"]


# ---------------------------------------------------------------- the reader thread


class _CountingReader(_Reader):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.loaded: list[int] = []
        super().__init__(*args, **kwargs)

    def load(self, i: int) -> Any:
        self.loaded.append(i)
        return super().load(i)


def _files(tmp_path: Path, n: int) -> FileIndex:
    paths = []
    for i in range(n):
        path = tmp_path / f"f{i}.jpg"
        _image(i, 20, 16).save(path)
        paths.append(path)
    return scan_headers(paths, 10**8, threads=1)


def test_reader_keeps_batch_order_and_reads_only_a_few_batches_ahead(tmp_path: Path) -> None:
    files = _files(tmp_path, 24)
    batches = [[7, 3, 20], [0, 1], [23, 5, 9], [2], [11, 12], [4, 6], [8, 10], [13, 14]]
    reader = _CountingReader(files, batches, ("square", 8), 10**8, threads=3, ahead=2)
    try:
        # Nobody consumes: 2 batches queued, 1 waiting to be put, 2 more loaded in parallel. Wait for that
        # (a loaded CI machine may take a while), then give the reader time to (wrongly) read further.
        deadline = time.monotonic() + 20
        while len(reader.loaded) < 11 or reader.queue.qsize() < 2:
            assert time.monotonic() < deadline, (reader.loaded, reader.queue.qsize())
            time.sleep(0.02)
        time.sleep(0.3)
        assert reader.parallel == 3 and reader.queue.qsize() == 2
        assert sorted(reader.loaded) == sorted(i for batch in batches[:5] for i in batch)
        seen = list(reader)
    finally:
        reader.close()
    assert [[i for i, _, _ in items] for items in seen] == batches
    for items in seen:
        for i, decoded, data in items:
            assert not decoded and bytes(data.numpy()) == Path(files.paths[i]).read_bytes()
    assert not reader.thread.is_alive()


def test_leaving_an_epoch_early_stops_the_reader(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "ds", per_class=12)
    decode, _ = _both(data, "basic", torch.device("cpu"), batch=2)
    it = iter(decode["train"])
    next(it)
    assert [t for t in threading.enumerate() if t.name == "mltrack-decode-reader"]
    it.close()  # what a loop that breaks (or raises) does to the generator
    assert not [t for t in threading.enumerate() if t.name == "mltrack-decode-reader"]


def test_cpu_route_pixels_are_the_cache_pixels(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    _image(1, 50, 31).save(path)
    for geom in (("square", 20), ("center", 27, 24)):
        want = np.array(resize_like_transforms(load_rgb(path, 10**8), geom))
        assert torch.equal(decode_on_cpu(str(path), geom, 10**8), torch.from_numpy(want).permute(2, 0, 1))


# ---------------------------------------------------------------- geometry on the device


@pytest.mark.parametrize("recipe,train", [("imagenet", False), ("imagenet", True), ("basic", False), ("digits", True)])
def test_device_geometry_matches_the_cache_geometry(recipe: str, train: bool, tmp_path: Path) -> None:
    """Torch's anti-aliased bilinear resize against PIL's (the cache's) on the same decoded pixels: within
    0.5 grey level on average and 2 at worst (measured ~0.2 and 1: rounding of two fixed/floating-point
    filters), over shrinking and enlarging sizes; a plain, aliased resize (~1.4 and 6) or a box one
    pixel off is outside."""
    geom = geometry(recipe, 24, train)
    for k, (w, h) in enumerate(((61, 45), (45, 61), (20, 17), (24, 24), (100, 33))):
        path = tmp_path / f"{k}.png"
        _image(k, w, h).save(path)
        img = load_rgb(path, 10**8)
        full = torch.from_numpy(np.array(img)).permute(2, 0, 1)
        want = torch.from_numpy(np.array(resize_like_transforms(img, geom))).permute(2, 0, 1).float()
        got = resize_batch(full[None], geom)[0]
        assert got.dtype == torch.uint8 and got.shape == want.shape
        diff = (got.float() - want).abs()
        assert diff.mean() < 0.5 and diff.max() <= 2, (w, h, float(diff.mean()), float(diff.max()))
        if geom[0] == "center":
            shifted = (got[:, 1:].float() - want[:, :-1]).abs().mean()
            assert shifted > 3 * diff.mean()


def test_fit_geometry_groups_sizes_and_keeps_done_images() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, 256, (3, 30, 40), generator=g, dtype=torch.uint8) for _ in range(2))
    c = torch.randint(0, 256, (3, 50, 20), generator=g, dtype=torch.uint8)
    done = torch.randint(0, 256, (3, 16, 16), generator=g, dtype=torch.uint8)
    geom = ("square", 16)
    out = fit_geometry([a, done, c, b], [False, True, False, False], geom, keep_same_size=False)
    assert out.shape == (4, 3, 16, 16) and torch.equal(out[1], done)
    for k, src in ((0, a), (2, c), (3, b)):
        assert torch.equal(out[k], resize_batch(src[None], geom)[0])
    same = fit_geometry([a, b], [False, False], geom, keep_same_size=True)  # imagenet train: full resolution
    assert torch.equal(same, torch.stack([a, b]))
    assert fit_geometry([a, b], [False, False], geom, keep_same_size=False).shape == (2, 3, 16, 16)


# ---------------------------------------------------------------- CUDA: nvJPEG against the gpu cache


@needs_cuda
def test_gpu_eval_batches_match_the_gpu_cache(tmp_path: Path) -> None:
    """Eval, imagenet and basic: JPEG decoders (nvJPEG vs libjpeg-turbo) and resize filters (torch vs
    PIL) differ slightly, so pixels agree within 2 grey levels on average and 40 at worst (sharp noise
    edges), in normalised units /(255 * std); labels exactly. The CPU route's files (png, cmyk, rotated)
    are counted, and equal the cache's pixels exactly."""
    data = _dataset(tmp_path / "ds", per_class=16)
    for recipe in ("imagenet", "basic"):
        decode, cached = _both(data, recipe, torch.device("cuda"), size=32, batch=6)
        got, got_y = _epoch(decode["val"])
        want, want_y = _epoch(cached["val"])
        assert torch.equal(got_y, want_y) and got.shape == want.shape and got.is_cuda
        std = torch.tensor(cache.normalization(recipe)[1], device=got.device).view(1, 3, 1, 1)
        diff = ((got - want) * std * 255).abs()
        assert float(diff.mean()) < 2.0 and float(diff.max()) < 40, (float(diff.mean()), float(diff.max()))
        files = decode["val"].files
        assert decode["val"].cpu_decoded == sum(files.on_cpu) < len(files.paths)
        exact = torch.tensor(files.on_cpu, device=got.device)
        assert torch.allclose(got[exact], want[exact], atol=1e-5)


@needs_cuda
@pytest.mark.parametrize("same_size", [False, True])
def test_gpu_train_batches_follow_the_cache_plan(same_size: bool, tmp_path: Path) -> None:
    """Train, imagenet: the same generator gives the same order and augmentation parameters, so the
    same labels and shapes in every batch; with mixed sizes (pre-crop squares as the cache) the pixels
    agree within the eval tolerance of 2 grey levels on average (crops are upsampled, so the decoders'
    differences are, too)."""
    data = _dataset(tmp_path / "ds", per_class=16, same_size=same_size)
    decode, cached = _both(data, "imagenet", torch.device("cuda"), size=32, batch=6)
    d_plan, c_plan = decode["train"].epoch_plan(), cached["train"].epoch_plan()
    assert torch.equal(d_plan[0], c_plan[0]) and torch.equal(d_plan[1], c_plan[1])
    for (x, y), (xc, yc) in zip(decode["train"], cached["train"]):
        assert x.shape == xc.shape and torch.equal(y, yc) and x.is_contiguous()
        if not same_size:
            std = torch.tensor(cache.normalization("imagenet")[1], device=x.device).view(1, 3, 1, 1)
            assert float(((x - xc) * std * 255).abs().mean()) < 2.0
    assert torch.equal(decode["train"].generator.get_state(), cached["train"].generator.get_state())
