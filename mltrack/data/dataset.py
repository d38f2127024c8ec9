"""A map-style dataset over validated ``(relative path, label)`` samples of one split."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset

from mltrack.errors import user_message
from mltrack.data.images import load_rgb

# DataLoader re-raises a worker's exception as ``type(msg)`` with msg = "Caught X in DataLoader worker
# process N.\nOriginal Traceback ...\n<module>.X: <original message>".


class ImageListDataset(Dataset):
    """Item ``i`` is ``(transform(load_rgb(raw_dir / samples[i][0])), samples[i][1])``.

    ``samples`` must come from :func:`mltrack.data.index.read_index` (paths already confined to raw/).
    A file that cannot be decoded raises DataError naming it: a bad sample is never skipped or replaced
    by another one, because that would silently change what the model trains on.
    """

    def __init__(
        self,
        raw_dir: Path,
        samples: list[tuple[str, int]],
        transform: Callable[[Image.Image], torch.Tensor],
        max_pixels: int,
    ) -> None:
        self.raw_dir = Path(raw_dir)
        self.samples = list(samples)
        self.transform = transform
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        rel, label = self.samples[index]
        image = load_rgb(self.raw_dir.joinpath(*rel.split("/")), self.max_pixels)
        return self.transform(image), label

    @property
    def targets(self) -> list[int]:
        """Labels in sample order (for samplers and class counts; no file is read)."""
        return [label for _, label in self.samples]


def worker_error_message(err: BaseException) -> str:
    """Kept for callers of the data package; the logic lives in ``mltrack.errors.user_message``."""
    return user_message(err)
