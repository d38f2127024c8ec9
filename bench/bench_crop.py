"""The imagenet train geometry of one batch from the GPU cache: the fused kernel (mltrack.data.gpu_crop)
against the unfused path (gather, flip, float, roi_align, normalise), and both against a resnet step.

    python bench/bench_crop.py [--batch 256] [--image-size 224] [--precrop 256] [--cache 6144]

Prints ms per batch of each path (CUDA events, median of repeats), the fused/unfused ratio, the largest
difference between their outputs, and each as a share of a bf16 channels_last resnet18/resnet50 training
step on synthetic data (the model-bound ceiling's step) measured in the same run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]

from mltrack.data import cache, gpu_crop  # noqa: E402


def timed(fn, repeats: int = 50) -> float:
    """Median milliseconds of ``fn`` on the GPU (after warm-up)."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def model_step_ms(name: str, batch: int, size: int) -> float:
    import torchvision

    model = getattr(torchvision.models, name)(num_classes=8).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)
    x = torch.randn(batch, 3, size, size, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 8, (batch,), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, repeats=20)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--precrop", type=int, default=256)
    p.add_argument("--cache", type=int, default=6144, help="images in the synthetic uint8 cache")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_crop.py needs a CUDA GPU")
    torch.backends.cudnn.benchmark = True
    g = torch.Generator().manual_seed(0)
    B, S, P = args.batch, args.image_size, args.precrop
    pixels = torch.randint(0, 256, (args.cache, 3, P, P), dtype=torch.uint8, generator=g).cuda()
    order = torch.randperm(args.cache, generator=g)[:B].cuda()
    params = cache.sample_params("imagenet", torch.tensor([[500, 375]] * B), S, g).cuda()
    mean, std = cache.normalization("imagenet")
    scale = torch.tensor([1 / (255 * s) for s in std], device="cuda").view(1, 3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], device="cuda").view(1, 3, 1, 1)

    def unfused() -> torch.Tensor:
        x = cache._resized_crop(pixels.index_select(0, order), params, S)
        return torch.addcmul(shift, x, scale, out=torch.empty_like(x, memory_format=torch.channels_last))

    def fused(dtype: torch.dtype) -> torch.Tensor:
        return gpu_crop.resized_crop(pixels, order, params, S, scale, shift, dtype=dtype, channels_last=True)

    diff = float((fused(torch.float32) - unfused()).abs().max())
    ms = {"unfused_fp32": timed(unfused), "fused_fp32": timed(lambda: fused(torch.float32)),
          "fused_bf16": timed(lambda: fused(torch.bfloat16))}
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | batch {B}, {P} px cache -> {S} px")
    print(f"largest |fused fp32 - unfused| = {diff:.2e}")
    for name, v in ms.items():
        print(f"  {name:14s} {v:7.3f} ms/batch  {B / v * 1000:10,.0f} img/s  {ms['unfused_fp32'] / v:5.2f}x unfused")
    for model in ("resnet18", "resnet50"):
        step = model_step_ms(model, B, S)
        shares = ", ".join(f"{name} {100 * v / step:.1f} %" for name, v in ms.items())
        print(f"  {model} bf16 step {step:.2f} ms; the crop as a share of it: {shares}")


if __name__ == "__main__":
    main()
