"""Shared fixtures: a small, learnable synthetic image dataset written as real PNG files."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

# Base colours per class (cycled for more classes); with the stripe direction they make classes easy to tell apart.
_CLASS_COLOURS = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 200, 40), (200, 50, 220), (40, 210, 210)]


def synthetic_image(class_index: int, image_index: int, size: int) -> np.ndarray:
    """A size x size RGB uint8 image: class colour + class stripe direction, per-image phase and noise.

    Deterministic in its arguments; different ``image_index`` values give different bytes.
    """
    rng = np.random.default_rng([class_index, image_index, size])
    yy, xx = np.mgrid[0:size, 0:size]
    phase = int(rng.integers(0, 4))
    coord = (yy, xx, yy + xx, yy - xx)[class_index % 4]  # horizontal, vertical, two diagonals
    stripes = ((coord + phase) // 2) % 2  # 2-px stripes
    colour = np.array(_CLASS_COLOURS[class_index % len(_CLASS_COLOURS)], dtype=np.float64)
    img = colour[None, None, :] * (0.45 + 0.55 * stripes[..., None])
    img += rng.normal(0.0, 12.0, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``tiny_dataset(n_classes=3, per_class=12, size=16, name="ds", folds=None, test_fraction=0.2,
    seed=42) -> data_dir``.

    Writes ``<tmp>/<name>/raw/c<i>/img_<j:03d>.png`` (RGB PNGs, distinct bytes per image, class-dependent
    colour and stripe pattern a tiny CNN learns in a few epochs) and returns ``<tmp>/<name>``. With
    ``folds`` set it also writes ``<tmp>/<name>/splits/`` via ``make_splits``.
    """

    def make(
        n_classes: int = 3,
        per_class: int = 12,
        size: int = 16,
        name: str = "ds",
        folds: int | None = None,
        test_fraction: float = 0.2,
        seed: int = 42,
    ) -> Path:
        data_dir = tmp_path / name
        raw = data_dir / "raw"
        for c in range(n_classes):
            class_dir = raw / f"c{c}"
            class_dir.mkdir(parents=True, exist_ok=True)
            for j in range(per_class):
                Image.fromarray(synthetic_image(c, j, size)).save(class_dir / f"img_{j:03d}.png")
        if folds is not None:
            from mltrack.data.splits import make_splits

            make_splits(raw, data_dir / "splits", folds=folds, test_fraction=test_fraction, seed=seed)
        return data_dir

    return make


@pytest.fixture
def run_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cwd = tmp, MLflow in a sqlite store there, nothing inherited from the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLTRACK_FAULT_AT",
                "MLTRACK_SYNC_EPOCH_IO"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path
