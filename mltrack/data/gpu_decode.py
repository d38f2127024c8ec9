"""Decode every epoch on the GPU (``data.cache: decode_gpu``, DESIGN §6, §9): for data too large for a
decoded cache in GPU memory or RAM, where PIL decoding in DataLoader workers bounds training.

Per epoch, a :class:`DecodeLoader` draws the same plan as ``cache.CachedLoader`` (order and augmentation
parameters from the checkpointed generator, so resume replays an epoch exactly), then for each batch:

- a reader thread reads the files of the next batches (IN_FLIGHT at once, one pool thread each) into a
  queue of READ_AHEAD batches, so file bytes of only a few batches are ever in host memory;
- the consumer decodes the batch's JPEGs in one batched nvJPEG call (``torchvision.io.decode_jpeg``,
  RGB); the current stream is synchronised first, because nvJPEG can overwrite memory that queued work
  still reads (and the call waits behind queued work anyway);
- images are brought to the geometry the cache stores (``cache.geometry``: the pre-crop square for
  imagenet train, short-side resize + centre crop for imagenet eval, the square otherwise) by a bilinear,
  anti-aliased resize on the device, one call per distinct source size; an imagenet train batch whose
  images all share one size skips it (its crop boxes are fractions of the image, read at full
  resolution); then ``cache.augment`` and normalisation, as the cache does.

Files nvJPEG should not decode are decoded on the CPU, in the reader's threads, with ``images.load_rgb``
(every rule of DESIGN §6) and the cache's own PIL geometry, then uploaded: formats other than JPEG,
modes other than RGB/L (CMYK, YCCK), JPEGs with an EXIF rotation (nvJPEG ignores it), and any JPEG the
GPU decoder refuses (found at first use, remembered for later epochs). ``cpu_decoded`` counts them per
epoch. A header scan when the loader is built gives every file's size (the augmentation plan needs
it) and its route; files whose header is unreadable or over the pixel limit raise their DataError
there. Corrupt JPEG data behind a good header is ``mltrack check``'s job (run before training).

The loader also runs on a CPU device, decoding every file on the CPU: its batches then equal
``CachedLoader``'s exactly. The mode itself is CUDA-only (``cache.resolve_cache_mode``).
"""
from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mltrack.data.cache import (QUEUE_END, PlannedLoader, center_box, drain, geometry,
                                put_unless_stopped, resize_like_transforms)
from mltrack.data.images import load_rgb

log = logging.getLogger(__name__)

READ_AHEAD = 3  # batches of file bytes queued ahead of the one being decoded
# Batches read at once, each by one thread in a plain loop: a thread-pool task per *file* costs more
# Python (and GIL hand-overs with the consumer) than reading a page-cached file does.
IN_FLIGHT = 4
NVJPEG_MODES = ("RGB", "L")  # JPEG colour modes nvJPEG turns into the same RGB as PIL's convert
EXIF_ORIENTATION = 0x0112


# ---------------------------------------------------------------- header scan


@dataclass
class FileIndex:
    """Per file of one split: path, upright (width, height) and whether it is decoded on the CPU."""

    paths: list[str]
    sizes: torch.Tensor  # (N, 2) int64
    on_cpu: list[bool]  # the GPU path may add files it could not decode


def scan_headers(paths: Sequence[Path], max_pixels: int, threads: int, *, cpu_only: bool = False) -> FileIndex:
    """Read every file's header (not its pixels) in ``threads`` threads; ``cpu_only`` routes all to the CPU.

    Raises the DataError of ``load_rgb`` for a file whose header cannot be read or is over the limit.
    """
    with ThreadPoolExecutor(max(1, threads)) as pool:
        heads = list(pool.map(lambda p: _header(Path(p), max_pixels), paths))
    return FileIndex([str(p) for p in paths], torch.tensor([(w, h) for w, h, _ in heads], dtype=torch.int64),
                     [cpu_only or cpu for _, _, cpu in heads])


def _header(path: Path, max_pixels: int) -> tuple[int, int, bool]:
    """(upright width, upright height, decode on the CPU) from the header alone."""
    # No warnings.catch_warnings here: it swaps process-wide state, and this runs in several threads. An
    # image over PIL's own limit warns once, then load_rgb below refuses it.
    try:
        with Image.open(path) as img:
            (w, h), fmt, mode = img.size, img.format, img.mode
            orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - load_rgb below names the file and the reason
        orientation, w, h = None, 0, 0
    if orientation is None or not 0 < w * h <= min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels):
        img = load_rgb(path, max_pixels)  # raises its DataError; if it does not, the full decode is the truth
        return img.size[0], img.size[1], True
    if orientation in (5, 6, 7, 8):  # a quarter turn: load_rgb's exif_transpose swaps the sides
        w, h = h, w
    return w, h, not (fmt == "JPEG" and mode in NVJPEG_MODES and orientation == 1)


# ---------------------------------------------------------------- reading ahead


class _Reader:
    """Background thread: loads the files of batch k+1.. while the consumer decodes batch k.

    Each queued batch is a list of ``(file index, decoded, tensor)``: ``decoded`` False carries the file's
    bytes (1-D uint8) for nvJPEG, True its CPU-decoded pixels (3, H, W) uint8 in the split's geometry.
    Up to min(``threads``, IN_FLIGHT) batches are loaded at once, one per pool thread, and queued in
    order; the queue holds ``ahead`` batches at most, so at most ``ahead`` + IN_FLIGHT batches are in
    host memory. ``close`` stops the thread also when the consumer left early.
    """

    def __init__(self, files: FileIndex, batches: list[list[int]], geom: tuple, max_pixels: int, threads: int,
                 ahead: int = READ_AHEAD) -> None:
        self.files, self.batches, self.geom, self.max_pixels = files, batches, geom, max_pixels
        self.queue: queue.Queue = queue.Queue(maxsize=ahead)
        self.stop = threading.Event()
        self.parallel = max(1, min(threads, IN_FLIGHT))
        self.pool = ThreadPoolExecutor(self.parallel, thread_name_prefix="mltrack-decode-read")
        self.thread = threading.Thread(target=self._run, name="mltrack-decode-reader", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        pending: deque[Future] = deque()
        try:
            for k in range(len(self.batches) + self.parallel):
                if self.stop.is_set():
                    return
                if k < len(self.batches):
                    pending.append(self.pool.submit(self.load_batch, self.batches[k]))
                if k >= self.parallel - 1 and pending:  # the oldest batch, in order
                    if not put_unless_stopped(self.queue, pending.popleft().result(), self.stop):
                        return
            put_unless_stopped(self.queue, QUEUE_END, self.stop)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put_unless_stopped(self.queue, err, self.stop)

    def load_batch(self, batch: list[int]) -> list[tuple[int, bool, torch.Tensor]]:
        return [self.load(i) for i in batch]

    def load(self, i: int) -> tuple[int, bool, torch.Tensor]:
        path = self.files.paths[i]
        if self.files.on_cpu[i]:
            return i, True, decode_on_cpu(path, self.geom, self.max_pixels)
        return i, False, torch.from_numpy(np.fromfile(path, dtype=np.uint8))

    def __iter__(self) -> Iterator[list[tuple[int, bool, torch.Tensor]]]:
        return drain(self.queue)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.pool.shutdown(wait=True, cancel_futures=True)


def decode_on_cpu(path: str, geom: tuple, max_pixels: int) -> torch.Tensor:
    """(3, side, side) uint8 pixels of ``path`` in geometry ``geom``: exactly what the cache stores."""
    hwc = np.asarray(resize_like_transforms(load_rgb(Path(path), max_pixels), geom))
    return torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))  # a writable copy, channels first


# ---------------------------------------------------------------- geometry on the device


def fit_geometry(images: list[torch.Tensor], done: list[bool], geom: tuple, *, keep_same_size: bool) -> torch.Tensor:
    """One (B, 3, side, side) uint8 batch from images of any size (``done``: already in ``geom``).

    ``keep_same_size``: a batch whose images all share one size is stacked as it is (imagenet train,
    whose crop boxes are fractions of the image).
    """
    if keep_same_size and len({tuple(t.shape) for t in images}) == 1:
        return torch.stack(images)
    groups: dict[tuple[int, int], list[int]] = {}
    for k, (t, d) in enumerate(zip(images, done)):
        if not d:
            groups.setdefault((t.shape[-2], t.shape[-1]), []).append(k)
    if len(groups) == 1 and not any(done):  # one source size: no scatter
        return resize_batch(torch.stack(images), geom)
    side = geom[-1]
    out = torch.empty((len(images), 3, side, side), dtype=torch.uint8, device=images[0].device)
    for k, (t, d) in enumerate(zip(images, done)):
        if d:
            out[k] = t
    for ks in groups.values():
        out[ks] = resize_batch(torch.stack([images[k] for k in ks]), geom)
    return out


def resize_batch(x: torch.Tensor, geom: tuple) -> torch.Tensor:
    """(b, 3, h, w) uint8 images of one size -> ``geom`` (bilinear, anti-aliased like PIL's resize)."""
    h, w = x.shape[-2:]
    if geom[0] == "square":
        (nw, nh), box = (geom[1], geom[1]), None
    else:
        _, short, crop = geom
        nw, nh, left, top = center_box(w, h, short, crop)
        box = (left, top, crop)
    if (nh, nw) != (h, w):
        y = F.interpolate(x.float(), size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        x = y.round_().clamp_(0, 255).to(torch.uint8)
    if box is not None:
        left, top, crop = box
        x = x[..., top:top + crop, left:left + crop]
    return x


# ---------------------------------------------------------------- the loader


class DecodeLoader(PlannedLoader):
    """A DataLoader stand-in that decodes ``files`` every epoch: yields ``(images, targets)`` on ``device``.

    Order, augmentation parameters and attributes as :class:`mltrack.data.cache.PlannedLoader`; pixels
    as the module docstring says. ``threads`` read (and CPU-decode) files; ``cpu_decoded`` is the number
    of images of the last epoch decoded on the CPU.
    """

    def __init__(self, files: FileIndex, labels: torch.Tensor, recipe: str, image_size: int, batch_size: int,
                 device: torch.device, *, train: bool, generator: torch.Generator, precrop_size: Optional[int] = None,
                 max_pixels: int, threads: int = 4, weights: Optional[torch.Tensor] = None,
                 channels_last: bool = False, dataset: Any = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(files.sizes, labels, recipe, image_size, batch_size, device, train=train,
                         generator=generator, weights=weights, channels_last=channels_last,
                         num_workers=threads, dataset=dataset, dtype=dtype)
        self.files, self.max_pixels, self.threads = files, max_pixels, threads
        self.geom = geometry(recipe, image_size, train, precrop_size)
        self.keep_same_size = recipe == "imagenet" and train
        self.cpu_decoded = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, order_dev, params_dev = self.device_plan()
        bs = self.batch_size
        batches = [order[i:i + bs].tolist() for i in range(0, len(order), bs)]
        reader = _Reader(self.files, batches, self.geom, self.max_pixels, self.threads)
        self.cpu_decoded = 0
        try:
            for start, items in zip(range(0, len(order), bs), reader):
                images, done = self._decode(items)
                src = fit_geometry(images, done, self.geom, keep_same_size=self.keep_same_size)
                p = params_dev[start:start + bs] if params_dev is not None else None
                yield self._images(src, None, p), self.labels.index_select(0, order_dev[start:start + bs])
        finally:
            reader.close()  # stops the thread, also when the consumer left early
        log.debug("decode_gpu epoch: %d of %d images decoded on the CPU", self.cpu_decoded, len(order))

    def _decode(self, items: list[tuple[int, bool, torch.Tensor]]) -> tuple[list[torch.Tensor], list[bool]]:
        """The batch's images on the device and which of them are already in the split's geometry."""
        images: list[Optional[torch.Tensor]] = [t if d else None for _, d, t in items]
        done = [d for _, d, _ in items]
        self.cpu_decoded += sum(done)
        jpegs = [k for k, d in enumerate(done) if not d]
        if jpegs:
            for k, (image, in_geometry) in zip(jpegs, self._nvjpeg([items[k] for k in jpegs])):
                images[k], done[k] = image, in_geometry
        return [t.to(self.device, non_blocking=True) for t in images], done  # type: ignore[union-attr]

    def _nvjpeg(self, items: list[tuple[int, bool, torch.Tensor]]) -> list[tuple[torch.Tensor, bool]]:
        """Batched GPU decode -> (image, already in geometry); on refusal one by one, and on the CPU (in
        geometry) the files the GPU cannot decode, which go to the reader's CPU path from then on."""
        from torchvision.io import ImageReadMode, decode_jpeg

        torch.cuda.current_stream(self.device).synchronize()
        try:
            decoded = decode_jpeg([t for _, _, t in items], mode=ImageReadMode.RGB, device=self.device)
            return [(t, False) for t in decoded]
        except RuntimeError:
            pass
        out = []
        for i, _, data in items:
            try:
                out.append((decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device), False))
            except RuntimeError as err:
                log.debug("nvJPEG refused %s (%s); decoding it on the CPU from now on", self.files.paths[i], err)
                self.files.on_cpu[i] = True
                self.cpu_decoded += 1
                out.append((decode_on_cpu(self.files.paths[i], self.geom, self.max_pixels), True))
        return out


def build_decode_loaders(raw_dir: Path, samples: dict[str, list[tuple[str, int]]], *, recipe: str, image_size: int,
                         precrop_size: Optional[int], max_pixels: int, threads: int, batch_size: int,
                         device: torch.device, generators: dict[str, torch.Generator],
                         balanced_weights: Optional[torch.Tensor] = None, channels_last: bool = False,
                         datasets: Optional[dict[str, Any]] = None,
                         train_dtype: torch.dtype = torch.float32) -> dict[str, DecodeLoader]:
    """A :class:`DecodeLoader` per split of ``samples`` (headers scanned now; pixels decoded every epoch).

    ``generators[split]`` drives that split's loader (the train one is the checkpointed generator); on a
    CPU ``device`` every file is decoded on the CPU. Raises the DataError of a file with a bad header.
    """
    out: dict[str, DecodeLoader] = {}
    for split, items in samples.items():
        train = split == "train"
        paths = [raw_dir.joinpath(*rel.split("/")) for rel, _ in items]
        files = scan_headers(paths, max_pixels, threads, cpu_only=device.type != "cuda")
        labels = torch.tensor([label for _, label in items], dtype=torch.int64, device=device)
        out[split] = DecodeLoader(
            files, labels, recipe, image_size, batch_size, device, train=train, generator=generators[split],
            precrop_size=precrop_size, max_pixels=max_pixels, threads=max(1, threads),
            weights=balanced_weights if train else None, channels_last=channels_last,
            dataset=(datasets or {}).get(split), dtype=train_dtype if train else torch.float32)
    return out
