"""Benchmark datasets, made by the script (nothing is downloaded): folders of natural-looking JPEGs.

An image is a smooth random colour field (a few random colours upsampled bicubically, tinted per class),
random ellipses, rectangles and polygons, some of them blurred, and sensor-like noise, saved as a
quality-90 JPEG: about 40-60 KB at 500 x 375, i.e. realistic decode cost and compression, unlike flat or
pure-noise images. Imports only numpy and PIL, so pool workers start fast.

Layout (what mltrack reads): ``<root>/raw/<class>/<file>.jpg`` and ``<root>/splits/{fold_0_train,
fold_0_val,test}.txt`` (paths relative to raw/), plus ``meta.json`` written last: a folder without it is
incomplete and made again.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

_TINTS = [(1.15, 0.95, 0.85), (0.85, 1.1, 0.9), (0.9, 0.9, 1.2), (1.1, 1.1, 0.8), (1.0, 0.85, 1.1),
          (0.8, 1.05, 1.1), (1.05, 1.0, 1.0), (0.95, 0.95, 0.95)]


def natural_image(seed: int, class_index: int, width: int, height: int) -> Image.Image:
    """A deterministic natural-looking RGB image of ``width`` x ``height`` px."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (int(rng.integers(3, 7)), int(rng.integers(3, 7)), 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    field *= np.array(_TINTS[class_index % len(_TINTS)], dtype=np.float32)
    img = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 12))):
        x0, y0 = int(rng.integers(-width // 4, width)), int(rng.integers(-height // 4, height))
        x1, y1 = x0 + int(rng.integers(10, width // 2)), y0 + int(rng.integers(10, height // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            pts = [(int(rng.integers(x0, x1)), int(rng.integers(y0, y1))) for _ in range(int(rng.integers(3, 7)))]
            draw.polygon(pts, fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
    # Texture: a finer random field at low amplitude, then per-pixel sensor noise.
    fine = rng.integers(-24, 25, (max(height // 12, 2), max(width // 12, 2), 3)).astype(np.float32)
    fine = np.stack([np.asarray(Image.fromarray(fine[..., k]).resize((width, height), Image.BILINEAR))
                     for k in range(3)], -1)
    noisy = np.asarray(img, dtype=np.float32) + fine + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _write(job: tuple[str, int, int, int, int]) -> int:
    path, seed, class_index, width, height = job
    natural_image(seed, class_index, width, height).save(path, format="JPEG", quality=90)
    return os.path.getsize(path)


def _pool_context() -> multiprocessing.context.BaseContext:
    # Not fork: the benchmark process has torch (and its threads) loaded by now. Not forkserver either:
    # mltrack's decode pool starts that server later with this module preloaded; spawn workers import
    # only numpy and PIL (and the benchmark script, whose top level is light).
    return multiprocessing.get_context("spawn")


def make_dataset(root: Path, *, classes: int, train: int, val: int, test: int, size: tuple[int, int],
                 vary_size: bool = False, workers: int = 0, seed: int = 0, names: Optional[list[str]] = None) -> dict:
    """Create (once) a JPEG folder dataset with exactly ``train``/``val``/``test`` images; returns its meta.

    Images are dealt round-robin to classes, so every split is balanced. ``vary_size`` draws each image's
    width/height from 60-100 % of ``size`` (hymenoptera-like); otherwise all are ``size``.
    """
    root = Path(root)
    meta_file = root / "meta.json"
    if meta_file.is_file():
        return json.loads(meta_file.read_text())
    shutil.rmtree(root, ignore_errors=True)
    names = names or [f"class_{k}" for k in range(classes)]
    rng = np.random.default_rng(seed)
    jobs, splits = [], {"train": [], "val": [], "test": []}
    counts = {"train": train, "val": val, "test": test}
    for split, n in counts.items():
        for i in range(n):
            c = i % len(names)
            w, h = size
            if vary_size:
                w, h = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
            rel = f"{names[c]}/{split}_{i:05d}.jpg"
            jobs.append((str(root / "raw" / rel), int(rng.integers(2**31)), c, w, h))
            splits[split].append(rel)
    for name in names:
        (root / "raw" / name).mkdir(parents=True, exist_ok=True)
    if workers > 0:
        with ProcessPoolExecutor(workers, mp_context=_pool_context()) as pool:
            sizes = list(pool.map(_write, jobs, chunksize=16))
    else:
        sizes = [_write(job) for job in jobs]
    (root / "splits").mkdir(exist_ok=True)
    for split, name in (("train", "fold_0_train.txt"), ("val", "fold_0_val.txt"), ("test", "test.txt")):
        (root / "splits" / name).write_text("".join(f"{rel}\n" for rel in splits[split]))
    meta = {"root": str(root), "classes": len(names), "counts": counts, "size": list(size), "vary_size": vary_size,
            "files": len(jobs), "mean_kb": round(sum(sizes) / max(len(sizes), 1) / 1024, 1)}
    meta_file.write_text(json.dumps(meta))
    return meta


def split_files(root: Path, split: str) -> list[str]:
    """Relative paths (under raw/) of one split, in index order."""
    name = {"train": "fold_0_train.txt", "val": "fold_0_val.txt", "test": "test.txt"}[split]
    return (Path(root) / "splits" / name).read_text().split()
