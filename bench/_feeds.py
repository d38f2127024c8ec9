"""Peers of mltrack's data path: the reference DataLoader, timm's prefetching loader, synthetic batches
already on the device (the ceiling) and per-epoch nvJPEG decoding; plus models, the training step, the
epoch timer every variant shares and the interleaved timer of variants compared within 1 %.
"""
from __future__ import annotations

import math
import statistics
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---------------------------------------------------------------- models and the step


class TinyCNN(nn.Module):
    """The --tiny model: two conv blocks and a linear head (CPU smoke runs)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def build_model(name: str, num_classes: int) -> nn.Module:
    """A randomly initialised torchvision classifier by name, or ``tinycnn``."""
    if name == "tinycnn":
        return TinyCNN(num_classes)
    import torchvision

    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    # Small lr: many epochs on synthetic data must not diverge (mltrack's loop stops on NaN losses).
    # Fused (one kernel per step) in every variant, as mltrack builds it: the variants differ only in their data
    # path, and the ceiling stays the fastest step this model can take.
    return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, fused=True)


def make_step(model: nn.Module, device: torch.device, *, amp: bool, channels_last: bool) -> Callable[..., None]:
    """One full training step as a tutorial or timm user writes it: to device, forward, loss, backward, step.

    No per-step host sync. ``amp``: bf16 autocast; ``channels_last``: NHWC inputs (the model must match).
    """
    opt = make_optimizer(model)
    loss_fn = nn.CrossEntropyLoss()
    non_blocking = device.type == "cuda"

    def step(images: torch.Tensor, targets: torch.Tensor) -> None:
        images = images.to(device, non_blocking=non_blocking)
        targets = targets.to(device, non_blocking=non_blocking)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model(images).float(), targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def place(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    model.to(device).train()
    return model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def sync(device: torch.device, every_stream: bool = False) -> None:
    """Wait for the work queued on the current (training) stream, or on every stream of the device.

    An epoch's end waits for the training stream only, as the loop's own ``.item()`` does: work a hook queued
    on a side stream (the checkpoint's device-to-host copies, ``mltrack.snapshot.start_snapshot``) overlaps
    the next epoch in training, so it must not be charged to this one. Timed windows start with every
    stream idle.
    """
    if device.type != "cuda":
        return
    if every_stream:
        torch.cuda.synchronize(device)
    else:
        torch.cuda.current_stream(device).synchronize()


def steps_epoch(loader: Iterable, step: Callable[..., None]) -> int:
    """Run ``step`` over one pass of ``loader``; returns the images seen."""
    n = 0
    for images, targets in loader:
        step(images, targets)
        n += len(targets)
    return n


def time_epochs(run_epoch: Callable[[], int], device: torch.device, *, warmup_epochs: int, min_seconds: float,
                max_epochs: int, min_epochs: int = 1, settled: Optional[Callable[[], bool]] = None,
                max_warmup_epochs: int = 0) -> dict[str, Any]:
    """img/s over whole epochs after ``warmup_epochs`` (start-up, cuDNN autotune, compilation).

    Whole epochs are timed, so an epoch's start (a DataLoader refilling its workers, a cache drawing its
    plan) counts as it does in training; timing stops after the first epoch that ends past
    ``min_seconds`` (at least ``min_epochs``, at most ``max_epochs``). The timed window starts with the
    device idle; every epoch ends when the training stream is done (``sync``). Also returns the per-epoch
    times and the warm-up time.

    ``settled`` (e.g. ``CompileWatch.settled``): after the first ``warmup_epochs``, warm-up goes on until
    it returns True, at most ``max_warmup_epochs`` in all; the row then also holds the warm-up epochs' times.
    """
    t0 = time.perf_counter()
    warm: list[float] = []
    while len(warm) < warmup_epochs or (settled is not None and len(warm) < max_warmup_epochs and not settled()):
        e0 = time.perf_counter()
        run_epoch()
        sync(device)
        warm.append(time.perf_counter() - e0)
    sync(device, every_stream=True)
    warm_s = time.perf_counter() - t0
    images, times = 0, []
    start = time.perf_counter()
    while True:
        e0 = time.perf_counter()
        images += run_epoch()
        sync(device)
        times.append(time.perf_counter() - e0)
        elapsed = time.perf_counter() - start
        if len(times) >= max_epochs or (elapsed >= min_seconds and len(times) >= min_epochs):
            break
    out = {"img_per_s": images / elapsed, "images": images, "seconds": round(elapsed, 3), "epochs": len(times),
           "epoch_s": [round(t, 4) for t in times], "warmup_s": round(warm_s, 3)}
    if settled is not None:
        out.update(warmup_epochs=len(warm), warmup_epoch_s=[round(t, 4) for t in warm])
    return out


def _dynamo_counter(group: str, key: str) -> Optional[int]:
    """One of torch.compile's process-wide counters; None where this torch has none."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return None
    return int(counters[group][key])


class CompileWatch:
    """An epoch function that also counts the graphs torch.compile built by the end of each epoch
    (dynamo's ``unique_graphs``: first compiles and recompiles alike), so a warm-up can run until
    compiling has stopped and a row can show that its timed epochs compiled nothing.

    With ``mode="reduce-overhead"`` a graph's CUDA graph is captured on its call *after* the first one (a
    warm-up run), i.e. in the epoch after the one that compiled it; so two epochs in a row without a new
    graph mean that every graph an epoch calls (train and eval mode, full and partial last batches) has
    been compiled and captured, and the epochs from then on replay them.
    """

    QUIET_EPOCHS = 2

    def __init__(self, run_epoch: Callable[[], int]) -> None:
        self.run_epoch = run_epoch
        self.marks = [_dynamo_counter("stats", "unique_graphs")]  # [0]: before the first epoch
        self.skips0 = _dynamo_counter("inductor", "cudagraph_skips")

    def __call__(self) -> int:
        images = self.run_epoch()
        self.marks.append(_dynamo_counter("stats", "unique_graphs"))
        return images

    def settled(self) -> bool:
        q = self.QUIET_EPOCHS
        return len(self.marks) > q and self.marks[-1] == self.marks[-1 - q]

    def report(self, warmup_epochs: int) -> dict[str, Any]:
        """Graphs compiled in the warm-up and after it (0 when the warm-up was long enough), and the CUDA
        graph skips torch logged meanwhile (a skipped graph runs without CUDA graphs)."""
        if self.marks[0] is None:
            return {"compile_counters": "unavailable in this torch"}
        skips = _dynamo_counter("inductor", "cudagraph_skips")
        return {"graphs_compiled_warmup": self.marks[warmup_epochs] - self.marks[0],
                "graphs_compiled_timed": self.marks[-1] - self.marks[warmup_epochs],
                "cudagraph_skips": (skips or 0) - (self.skips0 or 0)}


def _no_drain() -> dict[str, float]:
    return {}


@dataclass
class Arm:
    """One variant of an interleaved measurement: its epoch (returns the images it saw) and the wait for
    the background work its epochs left running (returns named seconds), run outside the timed window."""

    name: str
    run_epoch: Callable[[], int]
    drain: Callable[[], dict[str, float]] = _no_drain


def _block(arm: Arm, epochs: int, device: torch.device) -> dict[str, Any]:
    sync(device, every_stream=True)  # untimed: nothing left from the block before runs into this one
    times, images = [], 0
    for _ in range(epochs):
        e0 = time.perf_counter()
        images = arm.run_epoch()
        sync(device)
        times.append(round(time.perf_counter() - e0, 4))
    return {"epoch_s": times, "images_per_epoch": images, **arm.drain()}


def time_interleaved(arms: list[Arm], device: torch.device, *, rounds: int, block_epochs: int,
                     warmup_epochs: int) -> dict[str, Any]:
    """Epoch times of several variants measured in turns, so that drift during the run (GPU clocks and
    temperature, other processes, the page cache), a few % between back-to-back windows, falls on every
    variant alike instead of on whichever ran last.

    Each arm first runs ``warmup_epochs`` epochs and its drain. Then each of ``rounds`` rounds runs a block
    of ``block_epochs`` timed epochs of every arm, the order rotated by one arm per round; a block starts
    with the device idle and every epoch ends when the training stream is done (``sync``); after each block
    the arm's drain runs untimed, so no arm's background work (checkpoint copies and writes, uploads) runs
    into another arm's epochs.

    Returns ``orders`` (names per round) and ``arms``: per arm ``warmup_s``, ``images_per_epoch`` and
    ``blocks`` (round, position in the round, epoch_s, the drain's numbers); an arm that raises gets
    ``error`` and ``traceback`` and leaves the rotation, and the others go on.
    """
    out: dict[str, dict[str, Any]] = {arm.name: {"blocks": []} for arm in arms}
    if not arms:
        return {"orders": [], "arms": out}
    live = list(arms)

    def attempt(arm: Arm, fn: Callable[[], dict[str, Any]]) -> Optional[dict[str, Any]]:
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - one failing variant must not lose the others' numbers
            out[arm.name].update(error=f"{type(err).__name__}: {err}"[:500], traceback=traceback.format_exc()[-2000:])
            live.remove(arm)
            return None

    for arm in arms:
        t0 = time.perf_counter()
        warm = attempt(arm, lambda a=arm: _block(a, warmup_epochs, device)) if warmup_epochs else {}
        if warm is not None:
            out[arm.name]["warmup_s"] = round(time.perf_counter() - t0, 3)
    orders = []
    for r in range(rounds):
        shift = r % len(arms)  # rotate over all arms, so a failed one does not change the others' turns
        order = [arm for arm in arms[shift:] + arms[:shift] if arm in live]
        orders.append([arm.name for arm in order])
        for position, arm in enumerate(order):
            block = attempt(arm, lambda a=arm: _block(a, block_epochs, device))
            if block is not None:
                out[arm.name]["images_per_epoch"] = block.pop("images_per_epoch")
                out[arm.name]["blocks"].append({"round": r, "position": position, **block})
    return {"orders": orders, "arms": out}


def _median_per_block(blocks: list[dict[str, Any]]) -> dict[int, float]:
    return {block["round"]: statistics.median(block["epoch_s"]) for block in blocks}


def interleaved_rows(measured: dict[str, Any], baseline: str) -> dict[str, dict[str, Any]]:
    """Rows (the keys every timed row has: img_per_s, images, seconds, epochs, epoch_s, warmup_s) of an
    interleaved measurement, plus medians and ratios to ``baseline``'s epoch time.

    ``median_epoch_s``: over every timed epoch of the arm; ``median_epoch_s_after_first`` the same without
    each block's first epoch (where blocks have more than one); ``ratio_of_medians`` = median /
    baseline's median; ``round_ratios``: per round, the median of the arm's block / that of the
    baseline's block in the same round (paired, so drift between rounds cancels), and
    ``median_round_ratio`` their median. Drain keys (``io_drain_s`` ...) become their maximum over the
    blocks (the per-block values stay in ``blocks``): a maximum that stays small means no pile-up.
    Arms that failed, or measured nothing, are returned as ``{"error": ...}``.
    """
    arms = measured["arms"]
    base = arms.get(baseline, {})
    base_blocks = _median_per_block(base.get("blocks", []))
    base_median = _median(base)
    rows: dict[str, dict[str, Any]] = {}
    for name, arm in arms.items():
        if "error" in arm or not arm["blocks"]:
            rows[name] = {"error": arm.get("error", "no timed epochs"), "traceback": arm.get("traceback", "")}
            continue
        times = [t for block in arm["blocks"] for t in block["epoch_s"]]
        images, median = arm["images_per_epoch"] * len(times), statistics.median(times)
        row: dict[str, Any] = {
            "img_per_s": images / sum(times), "images": images, "seconds": round(sum(times), 3), "epochs": len(times),
            "epoch_s": times, "warmup_s": arm.get("warmup_s"), "median_epoch_s": round(median, 4),
            "blocks": arm["blocks"]}
        if all(len(block["epoch_s"]) > 1 for block in arm["blocks"]):
            row["median_epoch_s_after_first"] = round(statistics.median(
                [t for block in arm["blocks"] for t in block["epoch_s"][1:]]), 4)
        for key in sorted({k for block in arm["blocks"] for k in block if k.endswith("_drain_s")}):
            row[key] = max(block.get(key, 0.0) for block in arm["blocks"])
        hook_ms = [t for block in arm["blocks"] for t in block.get("hooks_ms", [])]
        if hook_ms:  # the hooks' time on the training thread at each epoch end, while the GPU has nothing queued
            row["hooks_ms_median"], row["hooks_ms_max"] = round(statistics.median(hook_ms), 2), max(hook_ms)
        if any("process_cpu_s" in block for block in arm["blocks"]):  # CPU seconds per timed second, median
            row["process_cpus"] = round(statistics.median(
                block["process_cpu_s"] / max(sum(block["epoch_s"]), 1e-9) for block in arm["blocks"]), 2)
        if any("threads_cpu_s" in block for block in arm["blocks"]):  # background threads' CPU per epoch, median
            row["threads_cpu_ms_per_epoch"] = round(1e3 * statistics.median(
                block["threads_cpu_s"] / max(len(block["epoch_s"]), 1) for block in arm["blocks"]), 2)
            names = {n for block in arm["blocks"] for n in block.get("threads_cpu_by_name", {})}
            epochs = sum(len(block["epoch_s"]) for block in arm["blocks"])
            row["threads_cpu_ms_per_epoch_by_name"] = {n: round(1e3 * sum(
                block.get("threads_cpu_by_name", {}).get(n, 0.0) for block in arm["blocks"]) / max(epochs, 1), 2)
                for n in sorted(names)}
        for key in ("checkpoints_queued", "checkpoints_superseded", "checkpoints_held", "figures"):  # running counts: the last block's is the total
            if any(key in block for block in arm["blocks"]):
                row[key] = arm["blocks"][-1].get(key)
        if base_median:
            row["baseline"] = baseline
            row["ratio_of_medians"] = round(median / base_median, 4)
            mine = _median_per_block(arm["blocks"])
            ratios = [mine[r] / base_blocks[r] for r in sorted(mine) if r in base_blocks]
            row["round_ratios"] = [round(x, 4) for x in ratios]
            row["median_round_ratio"] = round(statistics.median(ratios), 4) if ratios else None
        rows[name] = row
    return rows


def _median(arm: dict[str, Any]) -> Optional[float]:
    times = [t for block in arm.get("blocks", []) for t in block["epoch_s"]]
    return statistics.median(times) if times and "error" not in arm else None


# ---------------------------------------------------------------- loaders


def reference_loader(root: Path, files: list[str], image_size: int, batch_size: int, workers: int,
                     device: torch.device, train: bool = True) -> torch.utils.data.DataLoader:
    """What the guide's users run: torchvision ImageFolder (PIL decode) + RandomResizedCrop/flip/normalize
    (eval: Resize + CenterCrop) in DataLoader workers; pinned, persistent workers."""
    from torchvision import datasets, transforms as T

    wanted = {str(Path(root) / "raw" / rel) for rel in files}
    if train:
        tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    else:
        tf = T.Compose([T.Resize(int(image_size * 8 / 7)), T.CenterCrop(image_size), T.ToTensor(), T.Normalize(MEAN, STD)])
    ds = datasets.ImageFolder(str(Path(root) / "raw"), transform=tf, is_valid_file=lambda p: p in wanted)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=train, num_workers=workers,
                                       pin_memory=device.type == "cuda", persistent_workers=workers > 0)


def timm_loader(root: Path, files: list[str], image_size: int, batch_size: int, workers: int,
                device: torch.device) -> Any:
    """timm's ``create_loader(..., use_prefetcher=True)``: uint8 collate, normalisation on the GPU in a
    side stream; RandomResizedCrop + flip (bilinear, no colour jitter) like the reference."""
    import inspect

    from timm.data import create_loader
    from torchvision import datasets

    wanted = {str(Path(root) / "raw" / rel) for rel in files}
    ds = datasets.ImageFolder(str(Path(root) / "raw"), is_valid_file=lambda p: p in wanted)
    options = dict(is_training=True, use_prefetcher=True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5,
                   color_jitter=None, interpolation="bilinear", mean=MEAN, std=STD, num_workers=workers,
                   pin_memory=device.type == "cuda", device=device, persistent_workers=workers > 0)
    accepted = inspect.signature(create_loader).parameters  # older timm versions lack some options
    return create_loader(ds, input_size=(3, image_size, image_size), batch_size=batch_size,
                         **{k: v for k, v in options.items() if k in accepted})


class SyntheticBatches:
    """The ceiling's feed: ``steps`` batches of fixed random data already on the device."""

    def __init__(self, steps: int, batch_size: int, image_size: int, classes: int, device: torch.device,
                 channels_last: bool) -> None:
        g = torch.Generator().manual_seed(0)
        images = torch.randn(batch_size, 3, image_size, image_size, generator=g).to(device)
        self.images = images.contiguous(memory_format=torch.channels_last) if channels_last else images
        self.targets = torch.randint(0, classes, (batch_size,), generator=g).to(device)
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Any:
        for _ in range(self.steps):
            yield self.images, self.targets


class NvjpegEveryEpoch:
    """Data larger than RAM, decoded every epoch on the GPU: file bytes in host memory, batched
    ``decode_jpeg(device="cuda")``, then mltrack's batched RandomResizedCrop/flip/normalise.

    The current stream is synchronised before each decode: nvJPEG can overwrite memory that queued work
    still reads, and the call waits behind queued work anyway; this bound is what the variant measures.
    """

    def __init__(self, root: Path, files: list[str], labels: list[int], image_size: int, batch_size: int,
                 device: torch.device, channels_last: bool, seed: int = 0) -> None:
        from PIL import Image
        from torchvision.io import read_file

        paths = [Path(root) / "raw" / rel for rel in files]
        self.data = [read_file(str(p)) for p in paths]
        sizes = []
        for p in paths:
            with Image.open(p) as im:  # header only
                sizes.append(im.size)
        self.sizes = torch.tensor(sizes, dtype=torch.int64)
        self.labels = torch.tensor(labels, device=device)
        self.image_size, self.batch_size, self.device = image_size, batch_size, device
        self.channels_last = channels_last
        self.precrop = math.ceil(image_size * 8 / 7)
        self.generator = torch.Generator().manual_seed(seed)
        self.scale = torch.tensor([1 / (255 * s) for s in STD], device=device).view(1, 3, 1, 1)
        self.shift = torch.tensor([-m / s for m, s in zip(MEAN, STD)], device=device).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return -(-len(self.data) // self.batch_size)

    def __iter__(self) -> Any:
        from torchvision.io import ImageReadMode, decode_jpeg

        from mltrack.data.cache import augment, sample_params

        order = torch.randperm(len(self.data), generator=self.generator)
        params = sample_params("imagenet", self.sizes[order], self.image_size, self.generator).to(self.device)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            torch.cuda.current_stream(self.device).synchronize()
            decoded = decode_jpeg([self.data[i] for i in idx.tolist()], mode=ImageReadMode.RGB, device=self.device)
            if len({tuple(t.shape) for t in decoded}) == 1:
                src = torch.stack(decoded)  # all one size: crop boxes read the full-resolution images
            else:
                src = torch.stack([torch.nn.functional.interpolate(t[None].float(), (self.precrop, self.precrop),
                                                                   mode="bilinear", antialias=True)[0]
                                   for t in decoded])
            x = augment("imagenet", src, params[start:start + self.batch_size], self.image_size)
            x = torch.addcmul(self.shift, x, self.scale)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx.to(self.device)]


def shutdown(loader: Optional[Any]) -> None:
    """Stop a DataLoader's persistent workers now rather than at garbage collection."""
    inner = getattr(loader, "loader", loader)  # timm's PrefetchLoader wraps the DataLoader
    it = getattr(inner, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
