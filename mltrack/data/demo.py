"""The demo dataset: scikit-learn's bundled 8x8 handwritten digits written as a ``raw/<class>/`` folder.

scikit-learn ships the data inside the package, so this works offline on a fresh clone.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from mltrack.data.splits import make_splits

N_DIGITS = 1797  # images in sklearn.datasets.load_digits


def _digit_path(raw_dir: Path, index: int, label: int) -> Path:
    return raw_dir / str(label) / f"{index:04d}.png"


def write_digits(data_dir: Path) -> Path:
    """Write the 1797 digits as 8x8 greyscale PNGs ``data_dir/raw/<0-9>/<index:04d>.png``; return raw/.

    Pixel values 0..16 are scaled to 0..255. Idempotent: files already present are kept, so a complete
    folder is left untouched and an interrupted write is completed. Each PNG is written to a temp name and
    renamed, so a crash never leaves a half-written image.
    """
    from sklearn.datasets import load_digits  # heavy import, only when the demo is requested

    raw_dir = Path(data_dir) / "raw"
    digits = load_digits()
    labels = [int(t) for t in digits.target]
    if all(_digit_path(raw_dir, i, y).is_file() for i, y in enumerate(labels)):
        return raw_dir
    pixels = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    for label in sorted(set(labels)):
        (raw_dir / str(label)).mkdir(parents=True, exist_ok=True)
    for index, (label, image) in enumerate(zip(labels, pixels)):
        target = _digit_path(raw_dir, index, label)
        if target.is_file():
            continue
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        Image.fromarray(image).save(tmp, format="PNG")
        os.replace(tmp, target)
    return raw_dir


def ensure_digits(data_dir: Path, folds: int = 5) -> None:
    """Create the digits raw/ folder and its ``folds``-fold splits under ``data_dir`` if either is missing.

    Existing splits are kept (they define the folds of earlier runs); splits are (re)made only when
    ``test.txt`` or a ``fold_<k>_{train,val}.txt`` for ``k < folds`` is missing.
    """
    data_dir = Path(data_dir)
    raw_dir = write_digits(data_dir)
    splits_dir = data_dir / "splits"
    needed = [splits_dir / "test.txt"] + [
        splits_dir / f"fold_{k}_{part}.txt" for k in range(folds) for part in ("train", "val")
    ]
    if not all(p.is_file() for p in needed):
        make_splits(raw_dir, splits_dir, folds=folds)
