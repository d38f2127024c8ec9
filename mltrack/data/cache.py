"""The fast data path (DESIGN §6, §9): decode every image once into a uint8 cache, augment whole batches
on the device. Chosen by ``data.cache`` (none | ram | gpu | decode_gpu | auto), wired in by
``loaders.build_loaders``; ``decode_gpu`` (data too large for a decoded cache) decodes every epoch with
nvJPEG instead and lives in ``mltrack.data.gpu_decode``, reusing this module's geometry, plan and augmentation.

Decode, once per image, with ``images.load_rgb`` (bomb limit, EXIF, mode rules) in a process pool
started by ``forkserver`` (``spawn`` where that is missing): a pool *forked* from a process whose torch
already runs OpenMP threads can deadlock. What is stored (uint8, CHW, square):

- eval splits, and the train split of recipes without a random crop: exactly the deterministic geometry
  of ``transforms`` with the same PIL calls (square resize; imagenet eval: short side ``int(S*8/7)``,
  centre crop S), so a cached eval batch equals the eval transform's output.
- imagenet train: the whole image squashed to a P x P square (``data.precrop_size``, default
  ``ceil(S*8/7)``, 256 for 224) plus its original width and height. The RandomResizedCrop box is drawn in
  the *original* geometry (area 8-100 % of W*H, aspect 3/4-4/3 in original pixels, torchvision's 10
  tries and centre fallback) and read from the square in normalised coordinates, so the crop
  distribution is torchvision's; only resolution differs: the full image is at most P px across, so a
  crop narrower than S/P of the image is upsampled from fewer source pixels (slightly softer) than
  when cut from the full-size original.

Keep: ``gpu`` holds the cache in device memory; ``ram`` in ordinary host memory, a background thread
gathering the next batches into a few pinned buffers (the rows split over ``GATHER_THREADS`` threads) and
copying them on a side stream, ahead of use
(only those buffers are page-locked, so a large cache pins nothing and is not rounded up by the
pinned-memory allocator).

Augment each batch with a few batched ops, no per-image Python: ``roi_align`` with per-sample boxes
(adaptive sampling averages when shrinking, like an anti-aliased resize) and ``torch.where`` flips for
imagenet; ``affine_grid`` + ``grid_sample`` (nearest, zero fill, as RandomAffine) for digits; flips for
basic; then normalisation, channels_last on request. On a GPU the imagenet train geometry is instead one
fused kernel with the same arithmetic (:mod:`mltrack.data.gpu_crop`) that reads the cache by index and
writes the train batch in the training dtype (bf16/fp16 under mixed precision, which autocast would cast
to anyway; float32 otherwise). Eval batches are float32.

Randomness: at the start of each train epoch the order (shuffle, or balanced sampling with replacement)
and every augmentation parameter of the epoch are drawn on the CPU from the loaders' generator, the one
saved in checkpoints. A restored generator replays the epoch exactly, on any device.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import queue
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mltrack.data import gpu_crop
from mltrack.data.images import load_rgb
from mltrack.data.transforms import HALF, IMAGENET_MEAN, IMAGENET_STD
from mltrack.errors import ConfigError

CACHE_MODES = ("none", "ram", "gpu", "decode_gpu", "auto")
GPU_SHARE = 0.25  # auto: a GPU cache takes at most this share of free device memory (the model needs the rest)
RAM_SHARE = 0.5  # auto: a RAM cache takes at most this share of available host memory
DECODE_CHUNK = 32  # images per pool task: amortises the inter-process round trip
PREFETCH = 2  # ram mode on CUDA: batches gathered and in flight ahead of the one in use
# ram mode: threads gathering one batch's rows into the pinned buffer with numpy's take (a memcpy per row,
# no OpenMP, the GIL released). On the H100 host a single non-main thread's torch.index_select gathered 50 MB
# at ~4 GB/s (the main thread, with its OpenMP pool, ~19 GB/s); giving the stager thread an OpenMP pool of its
# own made compiled training from RAM collapse to 38 % of the ceiling (two spinning pools on 16 cores).
# MLTRACK_GATHER_THREADS=0 gathers with one torch.index_select on the stager thread instead (for A/B runs).
GATHER_THREADS = int(os.environ.get("MLTRACK_GATHER_THREADS", max(1, min(8, (os.cpu_count() or 2) // 2))))
RRC_SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop defaults
RRC_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
AUTO_TRAINERS = ("standard", "mixed_precision", "accelerate")  # dp draws its own Poisson batches
QUEUE_END = object()  # what a producer thread puts after its last item (see :func:`drain`)


# ---------------------------------------------------------------- what to store


def precrop_side(image_size: int, precrop_size: Optional[int]) -> int:
    """Side P of the square an imagenet train crop is cut from: ``precrop_size`` or ceil(S * 8/7)."""
    return int(precrop_size) if precrop_size else math.ceil(image_size * 8 / 7)


def geometry(recipe: str, image_size: int, train: bool, precrop_size: Optional[int] = None) -> tuple:
    """How a split is stored: ``("square", side)`` or ``("center", short_side, crop)`` (imagenet eval)."""
    if recipe == "imagenet":
        if train:
            return ("square", precrop_side(image_size, precrop_size))
        return ("center", int(image_size * 8 / 7), image_size)
    return ("square", image_size)


def cache_bytes(counts: dict[str, int], recipe: str, image_size: int, precrop_size: Optional[int]) -> int:
    """Bytes of uint8 pixels the cache of these split sizes takes (train at its stored side)."""
    total = 0
    for split, n in counts.items():
        side = geometry(recipe, image_size, split == "train", precrop_size)[-1]
        total += n * 3 * side * side
    return total


def resolve_cache_mode(requested: str, device: torch.device, nbytes: int, *,
                       trainer_type: Optional[str] = None) -> tuple[str, str]:
    """The cache mode to use and why. Explicit modes are checked; ``auto`` picks by device and memory.

    Explicit ``gpu`` and ``decode_gpu`` need a CUDA device; ``ram``, ``gpu`` and ``decode_gpu`` serve one
    process and cannot feed dp (ConfigError for each).

    auto: ``none`` on CPU (the DataLoader path: on CPU the model step, not decoding, bounds training and
    batched CPU augmentation would compete with it for the same cores), for dp, for several processes
    and when the trainer is not known; else ``gpu`` if the cache fits in GPU_SHARE of free device memory,
    ``ram`` if it fits in RAM_SHARE of available host memory, else ``decode_gpu`` (decode every epoch
    with nvJPEG: the benchmark measured it at ~2x the PIL DataLoader path for resnet18 on an H100).
    """
    if requested not in CACHE_MODES:
        raise ConfigError(f"unknown data.cache '{requested}'. Valid: {', '.join(CACHE_MODES)}")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if requested == "none":
        return "none", "data.cache: none"
    if requested in ("ram", "gpu", "decode_gpu"):
        if requested != "ram" and device.type != "cuda":
            raise ConfigError(f"data.cache: {requested} needs a CUDA device; use data.cache: ram (or auto) on CPU")
        if trainer_type == "dp":
            raise ConfigError(f"data.cache {requested} cannot be used with trainer_type dp (Opacus draws Poisson "
                              "batches from a DataLoader); use data.cache: none")
        if world > 1:
            raise ConfigError(f"data.cache {requested} serves one process, but WORLD_SIZE={world}; "
                              "use data.cache: none for multi-process training")
        return requested, f"data.cache: {requested}"
    if device.type != "cuda":
        return "none", "auto: CPU device"
    if trainer_type not in AUTO_TRAINERS or world > 1:
        return "none", f"auto: trainer {trainer_type!r} with {world} process(es) uses the DataLoader path"
    free, _total = torch.cuda.mem_get_info(device)
    if nbytes <= GPU_SHARE * free:
        return "gpu", f"auto: {nbytes / 2**20:.0f} MiB fit in GPU memory ({free / 2**30:.1f} GiB free)"
    ram = available_ram()
    if nbytes <= RAM_SHARE * ram:
        return "ram", f"auto: {nbytes / 2**20:.0f} MiB fit in host RAM, not in GPU memory"
    return "decode_gpu", (f"auto: {nbytes / 2**30:.1f} GiB of decoded pixels fit neither GPU memory "
                          f"({free / 2**30:.1f} GiB free) nor RAM ({ram / 2**30:.1f} GiB available); "
                          "decoding every epoch on the GPU (nvJPEG)")


def available_ram() -> int:
    """Bytes of host memory available to new allocations (MemAvailable; free pages where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------- decode once


def center_box(width: int, height: int, short: int, crop: int) -> tuple[int, int, int, int]:
    """``("center", short, crop)`` geometry of a width x height image: (resized width, resized height,
    left, top of the crop), as torchvision's Resize(short) + CenterCrop(crop) compute them."""
    nw, nh = (short, int(short * height / width)) if width <= height else (int(short * width / height), short)
    return nw, nh, int(round((nw - crop) / 2.0)), int(round((nh - crop) / 2.0))


def resize_like_transforms(img: Image.Image, geom: tuple) -> Image.Image:
    """The PIL calls torchvision's v2 Resize/CenterCrop make on a PIL image (see ``transforms``)."""
    if geom[0] == "square":
        return img.resize((geom[1], geom[1]), Image.BILINEAR)
    _, short, crop = geom
    nw, nh, left, top = center_box(img.size[0], img.size[1], short, crop)
    img = img.resize((nw, nh), Image.BILINEAR)
    return img.crop((left, top, left + crop, top + crop))


def _decode_chunk(paths: list[str], max_pixels: int, geom: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Pool task: (k, side, side, 3) uint8 pixels and (k, 2) original (width, height) of ``paths``."""
    side = geom[-1]
    pixels = np.empty((len(paths), side, side, 3), dtype=np.uint8)
    sizes = np.empty((len(paths), 2), dtype=np.int64)
    for i, path in enumerate(paths):
        img = load_rgb(Path(path), max_pixels)  # DataError naming the file for anything bad
        sizes[i] = img.size
        pixels[i] = np.asarray(resize_like_transforms(img, geom))
    return pixels, sizes


def _pool_context() -> Any:
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        # Import this module once in the server, not once per worker (it pulls in torch).
        ctx.set_forkserver_preload([__name__])
        return ctx
    return multiprocessing.get_context("spawn")


def decode_split(paths: Sequence[Path], geom: tuple, max_pixels: int, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``paths`` to ``(N, 3, side, side)`` uint8 and ``(N, 2)`` int64 (width, height) host tensors.

    ``workers`` > 0 decodes in that many pool processes (in order); 0 in this process. The first bad
    file raises its DataError; nothing is skipped.
    """
    side = geom[-1]
    pixels = torch.empty((len(paths), 3, side, side), dtype=torch.uint8)
    sizes = torch.empty((len(paths), 2), dtype=torch.int64)
    chunks = [[str(p) for p in paths[i:i + DECODE_CHUNK]] for i in range(0, len(paths), DECODE_CHUNK)]
    if workers > 0 and len(chunks) > 1:
        pool = ProcessPoolExecutor(min(workers, len(chunks)), mp_context=_pool_context())
        try:
            _fill(pixels, sizes, pool.map(_decode_chunk, chunks, [max_pixels] * len(chunks), [geom] * len(chunks)))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # a bad file: do not decode the rest
    else:
        _fill(pixels, sizes, (_decode_chunk(c, max_pixels, geom) for c in chunks))
    return pixels, sizes


def _fill(pixels: torch.Tensor, sizes: torch.Tensor, results: Any) -> None:
    start = 0
    for chunk_pixels, chunk_sizes in results:
        end = start + len(chunk_pixels)
        pixels[start:end].copy_(torch.from_numpy(chunk_pixels).permute(0, 3, 1, 2))
        sizes[start:end] = torch.from_numpy(chunk_sizes)
        start = end


# ---------------------------------------------------------------- augment whole batches


def sample_params(recipe: str, sizes: torch.Tensor, image_size: int, generator: torch.Generator) -> torch.Tensor:
    """Per-sample train augmentation parameters, float64 on the CPU, drawn from ``generator``.

    ``sizes`` are (width, height) of the originals, in the order the samples will be served. Columns:
    imagenet ``[left, top, width, height]`` of the crop as fractions of the image + ``flip``;
    basic ``[flip]``; digits ``[angle°, tx px, ty px, scale]``; none: no column.
    """
    n = len(sizes)
    if recipe == "imagenet":
        return torch.cat([_rrc_boxes(sizes, generator), _flips(n, generator)], 1)
    if recipe == "basic":
        return _flips(n, generator)
    if recipe == "digits":
        u = torch.rand(n, 4, dtype=torch.float64, generator=generator)
        shift = 0.1 * image_size  # RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))
        return torch.stack([u[:, 0] * 20 - 10, torch.round(u[:, 1] * 2 * shift - shift),
                            torch.round(u[:, 2] * 2 * shift - shift), 0.9 + 0.2 * u[:, 3]], 1)
    return torch.zeros(n, 0, dtype=torch.float64)


def _flips(n: int, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, 1, dtype=torch.float64, generator=generator) < 0.5).double()


def _rrc_boxes(sizes: torch.Tensor, generator: torch.Generator, tries: int = 10) -> torch.Tensor:
    """torchvision's RandomResizedCrop.get_params for every sample at once, as fractions of the image."""
    n = len(sizes)
    width, height = sizes[:, 0].double(), sizes[:, 1].double()
    area = (width * height)[:, None]
    u = torch.rand(n, tries, 2, dtype=torch.float64, generator=generator)
    target = area * (RRC_SCALE[0] + (RRC_SCALE[1] - RRC_SCALE[0]) * u[..., 0])
    aspect = torch.exp(RRC_LOG_RATIO[0] + (RRC_LOG_RATIO[1] - RRC_LOG_RATIO[0]) * u[..., 1])
    w, h = torch.round(torch.sqrt(target * aspect)), torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = ok.int().argmax(1, keepdim=True)  # the first try that fits, as torchvision's loop takes it
    found = ok.any(1)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    # No try fitted: the centre crop of the whole image clamped to the ratio range.
    ratio = width / height
    lo, hi = math.exp(RRC_LOG_RATIO[0]), math.exp(RRC_LOG_RATIO[1])
    fw = torch.where(ratio > hi, torch.round(height * hi), width)
    fh = torch.where(ratio < lo, torch.round(width / lo), height)
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    pos = torch.rand(n, 2, dtype=torch.float64, generator=generator)
    top = torch.where(found, torch.floor(pos[:, 0] * (height - h + 1)), torch.floor((height - h) / 2))
    left = torch.where(found, torch.floor(pos[:, 1] * (width - w + 1)), torch.floor((width - w) / 2))
    return torch.stack([left / width, top / height, w / width, h / height], 1)


def normalization(recipe: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the recipe normalises [0, 1] pixels with (none: identity)."""
    return {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "basic": (HALF, HALF),
            "digits": (HALF, HALF)}.get(recipe, ((0.0,) * 3, (1.0,) * 3))


def augment(recipe: str, src: torch.Tensor, params: Optional[torch.Tensor], image_size: int) -> torch.Tensor:
    """Float 0..255 pixels of one batch after the recipe's geometry (``params`` None: eval, identity).

    ``src`` is (B, 3, H, W) uint8 or float on the device that computes (square for digits; any size for
    imagenet, whose crop boxes are fractions of the image); ``params`` rows as from :func:`sample_params`,
    on the same device.
    """
    if params is None or recipe == "none":
        return src.float()
    if recipe == "imagenet":
        return _resized_crop(src, params, image_size)
    if recipe == "basic":
        return _flip(src, params[:, 0]).float()
    if recipe == "digits":
        x = src.float()
        return _affine(x, params.to(x.dtype))
    raise ConfigError(f"the cache has no batched version of transforms '{recipe}'")


def _resized_crop(src: torch.Tensor, params: torch.Tensor, image_size: int) -> torch.Tensor:
    """RandomResizedCrop + flip: flipped images are mirrored *before* cropping (on uint8, a quarter of the
    bytes of the float output) and their box mirrored with them, which gives the same pixels."""
    from torchvision.ops import roi_align

    flip = params[:, 4]
    x = _flip(src, flip).float()
    height, width = x.shape[-2:]
    p = params.to(x.dtype)
    left = torch.where(flip > 0.5, 1 - p[:, 0] - p[:, 2], p[:, 0]) * width  # Python scalars: no copy, no sync
    top = p[:, 1] * height
    index = torch.arange(len(x), device=x.device, dtype=x.dtype)
    rois = torch.stack([index, left, top, left + p[:, 2] * width, top + p[:, 3] * height], 1)
    return roi_align(x, rois, (image_size, image_size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def _flip(x: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    return torch.where(flags.view(-1, 1, 1, 1) > 0.5, x.flip(3), x)


def _affine(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """RandomAffine about the centre: output (x, y) reads input ``R(-a) (xy - t) / s`` (nearest, zero fill)."""
    rad = torch.deg2rad(p[:, 0])
    cos, sin, scale = torch.cos(rad) / p[:, 3], torch.sin(rad) / p[:, 3], x.shape[-1] / 2.0
    tx, ty = p[:, 1] / scale, p[:, 2] / scale  # pixels -> normalised coordinates (the image spans [-1, 1])
    theta = torch.stack([torch.stack([cos, sin, -(cos * tx + sin * ty)], 1),
                         torch.stack([-sin, cos, sin * tx - cos * ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


# ---------------------------------------------------------------- the loader


@dataclass
class CachedSplit:
    """One split's decoded pixels (device memory or host RAM), original sizes and labels (on the device)."""

    pixels: torch.Tensor  # (N, 3, side, side) uint8
    sizes: torch.Tensor  # (N, 2) int64 original (width, height), CPU
    labels: torch.Tensor  # (N,) int64 on the output device


class PlannedLoader:
    """What the device-side loaders share (:class:`CachedLoader`, ``gpu_decode.DecodeLoader``): the
    DataLoader attributes other code reads, the epoch plan drawn from ``generator`` and normalisation.

    ``sizes`` are the (N, 2) original (width, height) on the CPU, ``labels`` the (N,) targets on ``device``.
    ``images`` they yield are normalised float32 (channels_last when asked), matching ``transforms`` for
    the same recipe; ``len`` is batches per epoch (the last one may be partial). Train loaders draw order
    and augmentation from ``generator`` when an epoch starts; eval loaders serve file order, unaugmented.
    ``batch_size``, ``num_workers``, ``pin_memory`` and ``dataset`` mirror the DataLoader attributes.
    """

    def __init__(self, sizes: torch.Tensor, labels: torch.Tensor, recipe: str, image_size: int, batch_size: int,
                 device: torch.device, *, train: bool, generator: torch.Generator,
                 weights: Optional[torch.Tensor] = None, channels_last: bool = False, num_workers: int = 0,
                 dataset: Any = None, dtype: torch.dtype = torch.float32) -> None:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.sizes, self.labels, self.recipe, self.image_size = sizes, labels, recipe, image_size
        self.batch_size, self.device, self.train = batch_size, device, train
        self.generator, self.weights, self.channels_last, self.dtype = generator, weights, channels_last, dtype
        self.num_workers, self.dataset = num_workers, dataset
        self.pin_memory = device.type == "cuda"
        # Decided once: the imagenet train geometry on a GPU is the fused kernel (mltrack.data.gpu_crop).
        self._fused = train and recipe == "imagenet" and gpu_crop.available(device)
        mean, std = normalization(recipe)
        self._scale = torch.tensor([1 / (255 * s) for s in std], device=device).view(1, 3, 1, 1)
        self._shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=device).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def epoch_plan(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """This epoch's sample order and augmentation parameters (advances ``generator`` for train)."""
        n = len(self.labels)
        if not self.train:
            return torch.arange(n), None
        if self.weights is not None:  # balanced: inverse class frequency, with replacement
            order = torch.multinomial(self.weights, n, replacement=True, generator=self.generator)
        else:
            order = torch.randperm(n, generator=self.generator)
        return order, sample_params(self.recipe, self.sizes[order], self.image_size, self.generator)

    def device_plan(self) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """:meth:`epoch_plan` as the loaders use it: the order on the CPU and on the device, and the
        parameters on the device as float32, the precision every augmentation computes in (converted once
        per epoch rather than per batch)."""
        order, params = self.epoch_plan()
        return order, self._to_device(order), self._to_device(params.float() if params is not None else None)

    def _to_device(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if t is None or self.device.type != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)  # pageable copies would wait for the GPU

    def _images(self, src: torch.Tensor, rows: Optional[torch.Tensor], params: Optional[torch.Tensor]) -> torch.Tensor:
        """One batch's images from ``src[rows]`` (``rows`` None: all of ``src``) and its augmentation ``params``.

        The imagenet train geometry on a GPU is one fused kernel (:mod:`mltrack.data.gpu_crop`), reading the
        cache by index; everything else gathers, augments and normalises in separate passes.
        """
        if params is not None and self._fused:
            return gpu_crop.resized_crop(src, rows, params, self.image_size, self._scale, self._shift,
                                         dtype=self.dtype, channels_last=self.channels_last)
        if rows is not None:
            src = src.index_select(0, rows)
        return self._finish(augment(self.recipe, src, params, self.image_size))

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise in one pass, written straight into the requested memory format and dtype."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return torch.addcmul(self._shift, x, self._scale, out=torch.empty_like(x, memory_format=fmt, dtype=self.dtype))


class CachedLoader(PlannedLoader):
    """A DataLoader stand-in over a :class:`CachedSplit`: yields ``(images, targets)`` on ``device``
    (attributes and randomness as :class:`PlannedLoader`)."""

    def __init__(self, split: CachedSplit, recipe: str, image_size: int, batch_size: int, device: torch.device,
                 *, train: bool, generator: torch.Generator, weights: Optional[torch.Tensor] = None,
                 channels_last: bool = False, num_workers: int = 0, dataset: Any = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(split.sizes, split.labels, recipe, image_size, batch_size, device, train=train,
                         generator=generator, weights=weights, channels_last=channels_last,
                         num_workers=num_workers, dataset=dataset, dtype=dtype)
        self.split = split
        self._streamed = split.pixels.device.type == "cpu" and self.device.type == "cuda"  # ram cache feeding a GPU

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, order_dev, params_dev = self.device_plan()
        bs = self.batch_size
        stager = _Stager(self.split.pixels, order, bs, self.device) if self._streamed else None
        sources = iter(stager) if stager is not None else None
        try:
            for start in range(0, len(order), bs):
                idx = order_dev[start:start + bs]
                src, rows = (self.split.pixels, idx) if sources is None else (next(sources), None)
                p = params_dev[start:start + bs] if params_dev is not None else None
                yield self._images(src, rows, p), self.split.labels.index_select(0, idx)
        finally:
            if stager is not None:
                stager.close()  # stops the thread, also when the consumer left early


def put_unless_stopped(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put ``item`` into the bounded ``q``, waiting for room; False (item dropped) once ``stop`` is set, so a
    producer thread whose consumer left early does not block forever on a full queue."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def drain(q: queue.Queue) -> Iterator[Any]:
    """The items a producer thread puts into ``q``, up to QUEUE_END; an exception it put is raised here."""
    while True:
        item = q.get()
        if item is QUEUE_END:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def gather_rows(pool: ThreadPoolExecutor, parts: int, pixels: torch.Tensor, idx: torch.Tensor,
                out: torch.Tensor) -> None:
    """``out[:] = pixels[idx]`` for CPU tensors, the rows split into ``parts`` jobs on ``pool`` (see GATHER_THREADS)."""
    src, rows, dst = pixels.numpy(), idx.numpy(), out.numpy()  # views: no copy
    step = max(1, -(-len(rows) // max(1, parts)))
    # mode="clip" writes into ``out`` directly ("raise" buffers it); the epoch order's indices are in range.
    jobs = [pool.submit(np.take, src, rows[a:a + step], 0, dst[a:a + step], "clip") for a in range(0, len(rows), step)]
    for job in jobs:
        job.result()


class _Stager:
    """Background thread: gather batch k+1.. into pinned buffers and copy them on a side stream.

    Each yielded device tensor is made visible to the current stream (``wait_event``) and tied to it
    (``record_stream``) so the allocator does not reuse its memory while queued kernels still read it.
    A pinned buffer is rewritten only after its previous copy has finished (its event).
    """

    def __init__(self, pixels: torch.Tensor, order: torch.Tensor, batch_size: int, device: torch.device) -> None:
        self.pixels, self.device = pixels, device
        self.batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        self.queue: queue.Queue = queue.Queue(maxsize=PREFETCH)
        self.stop = threading.Event()
        self._pool = ThreadPoolExecutor(GATHER_THREADS, thread_name_prefix="mltrack-cache-gather") if (
            GATHER_THREADS > 0) else None
        self.thread = threading.Thread(target=self._run, name="mltrack-cache-stager", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            stream = torch.cuda.Stream(self.device)
            shape = (len(self.batches[0]),) + tuple(self.pixels.shape[1:]) if self.batches else (0,)
            slots = [(torch.empty(shape, dtype=torch.uint8, pin_memory=True), [None]) for _ in range(PREFETCH + 1)]
            for k, idx in enumerate(self.batches):
                buf, done = slots[k % len(slots)]
                if done[0] is not None:
                    done[0].synchronize()  # its previous copy has left the buffer
                staged = buf[:len(idx)]
                if self._pool is not None:
                    gather_rows(self._pool, GATHER_THREADS, self.pixels, idx, staged)
                else:
                    torch.index_select(self.pixels, 0, idx, out=staged)
                with torch.cuda.stream(stream):
                    dev = torch.empty(staged.shape, dtype=torch.uint8, device=self.device)
                    dev.copy_(staged, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(stream)
                done[0] = event
                if not put_unless_stopped(self.queue, (dev, event), self.stop):
                    return
            put_unless_stopped(self.queue, QUEUE_END, self.stop)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put_unless_stopped(self.queue, err, self.stop)

    def __iter__(self) -> Iterator[torch.Tensor]:
        current = torch.cuda.current_stream(self.device)
        for dev, event in drain(self.queue):
            current.wait_event(event)
            dev.record_stream(current)
            yield dev

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------- building


def build_cached_loaders(raw_dir: Path, samples: dict[str, list[tuple[str, int]]], *, mode: str, recipe: str,
                         image_size: int, precrop_size: Optional[int], max_pixels: int, workers: int,
                         batch_size: int, device: torch.device, generators: dict[str, torch.Generator],
                         balanced_weights: Optional[torch.Tensor] = None, channels_last: bool = False,
                         datasets: Optional[dict[str, Any]] = None,
                         train_dtype: torch.dtype = torch.float32) -> dict[str, CachedLoader]:
    """Decode each split of ``samples`` once and wrap it in a :class:`CachedLoader`.

    ``mode`` is ``gpu`` (pixels in ``device`` memory) or ``ram`` (host memory, streamed to a CUDA ``device``).
    ``generators[split]`` drives that split's loader (the train one is the checkpointed generator).
    Raises the DataError of the first unreadable image.
    """
    out: dict[str, CachedLoader] = {}
    for split, items in samples.items():
        train = split == "train"
        geom = geometry(recipe, image_size, train, precrop_size)
        paths = [raw_dir.joinpath(*rel.split("/")) for rel, _ in items]
        pixels, sizes = decode_split(paths, geom, max_pixels, workers)
        if mode == "gpu":
            pixels = pixels.to(device)
        labels = torch.tensor([label for _, label in items], dtype=torch.int64, device=device)
        out[split] = CachedLoader(
            CachedSplit(pixels, sizes, labels), recipe, image_size, batch_size, device, train=train,
            generator=generators[split], weights=balanced_weights if train else None,
            channels_last=channels_last, num_workers=workers, dataset=(datasets or {}).get(split),
            dtype=train_dtype if train else torch.float32)
    return out
