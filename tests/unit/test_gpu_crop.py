"""The fused crop kernel (mltrack.data.gpu_crop) against the unfused path (gather, flip, roi_align,
normalise) it replaces: on CPU through Triton's interpreter (a subprocess, since the interpreter is chosen
when the kernel is defined), and on a GPU directly, loaders included."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Compares the two paths for a few shapes; prints the largest differences as JSON.
COMPARE = r"""
import json, sys, torch
from mltrack.data import cache, gpu_crop

def case(device, n, h, w, size, dtype, channels_last, rows, flips, seed):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g).to(device)
    k = len(rows) if rows is not None else n
    sizes = torch.randint(40, 600, (k, 2), generator=g)
    params = cache.sample_params("imagenet", sizes, size, g)
    if flips is not None:
        params[:, 4] = flips
    mean, std = cache.normalization("imagenet")
    scale = torch.tensor([1 / (255 * s) for s in std], device=device)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=device)
    idx = torch.tensor(rows, dtype=torch.int64, device=device) if rows is not None else None
    params = params.to(device)
    out = gpu_crop.resized_crop(src, idx, params, size, scale, shift, dtype=dtype, channels_last=channels_last)
    picked = src.index_select(0, idx) if idx is not None else src
    ref = torch.addcmul(shift.view(1, 3, 1, 1), cache._resized_crop(picked, params, size), scale.view(1, 3, 1, 1))
    assert out.shape == ref.shape and out.dtype == dtype, (out.shape, out.dtype)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return float((out.float() - ref).abs().max()) if out.numel() else 0.0

device = sys.argv[1]
results = {
    "f32": case(device, 5, 37, 41, 16, torch.float32, False, [4, 0, 2, 2, 1, 3], None, 0),
    "f32_cl_flipped": case(device, 3, 29, 23, 12, torch.float32, True, None, 1.0, 1),
    "f32_unflipped": case(device, 3, 50, 50, 16, torch.float32, False, [2, 1], 0.0, 2),
    "upsample": case(device, 2, 9, 11, 20, torch.float32, True, None, None, 3),
    "bf16_cl": case(device, 4, 64, 64, 24, torch.bfloat16, True, [3, 3, 0], None, 4),
    "empty": case(device, 2, 8, 8, 4, torch.float32, False, [], None, 5),
}
print(json.dumps(results))
"""


def _check(results: dict[str, float], f32_limit: float) -> None:
    for name, diff in results.items():
        # bf16: one rounding of values up to ~2.7 (8 significant bits).
        limit = 0.02 if "bf16" in name else f32_limit
        assert diff <= limit, f"{name}: fused and unfused crops differ by {diff}"


def _triton_at_least(version: str) -> bool:
    import triton

    def parts(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in v.split("+")[0].split(".")[:2])

    return parts(triton.__version__) >= parts(version)


@pytest.mark.skipif(not _triton_at_least("3.8"), reason="Triton's interpreter before 3.8 was seen to fail on the "
                    "kernel ('only 0-dimensional arrays can be converted to Python scalars'); the GPU test covers it")
def test_kernel_matches_unfused_path_under_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", COMPARE, "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # numpy evaluates the kernel's float32 arithmetic in roi_align's order, without fused multiply-adds
    _check(json.loads(done.stdout.strip().splitlines()[-1]), 1e-5)


@cuda
def test_kernel_matches_unfused_path_on_gpu() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", COMPARE, "cuda"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # Compiled kernels contract a*b+c into fused multiply-adds differently: a sample coordinate near 255
    # moves by ~1e-4 px, which on random-noise pixels (neighbours 255 apart) moves the output ~4e-4.
    _check(json.loads(done.stdout.strip().splitlines()[-1]), 1e-3)


def test_available_only_where_it_can_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from mltrack.data import gpu_crop

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not gpu_crop.available(torch.device("cpu"))
    assert gpu_crop.available(torch.device("cuda")) == (gpu_crop.triton is not None)
    monkeypatch.setenv("MLTRACK_FUSED_CROP", "0")
    assert not gpu_crop.available(torch.device("cuda"))


@cuda
@pytest.mark.parametrize("mode", ["gpu", "ram"])
def test_cached_train_batches_equal_the_unfused_ones(mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same loader, the same generator state: fused (float32 and bf16) vs MLTRACK_FUSED_CROP=0."""
    from test_cache import _cfg, _dataset  # noqa: PLC0415 - the cache tests' data and config
    from mltrack.data.loaders import build_loaders

    data = _dataset(tmp_path)

    def epoch(fused: bool, dtype: torch.dtype | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        monkeypatch.setenv("MLTRACK_FUSED_CROP", "1" if fused else "0")
        loaders = build_loaders(_cfg(data, transforms="imagenet", cache=mode), 4, 7, False, "cuda",
                                splits=("train",), trainer_type="mixed_precision", channels_last=True,
                                train_dtype=dtype)
        return [(x, y) for x, y in loaders.train]

    plain, fused, half = epoch(False, None), epoch(True, None), epoch(True, torch.bfloat16)
    assert len(plain) == len(fused) == len(half) > 0
    for (xp, yp), (xf, yf), (xh, yh) in zip(plain, fused, half):
        assert torch.equal(yp, yf) and torch.equal(yp, yh)
        assert xf.dtype == torch.float32 and xh.dtype == torch.bfloat16
        assert xf.is_contiguous(memory_format=torch.channels_last)
        assert (xf - xp).abs().max() <= 1e-3  # fused multiply-adds, as in the kernel test
        assert (xh.float() - xp).abs().max() <= 0.02
