"""The imagenet train geometry of a whole batch in one GPU kernel: RandomResizedCrop-equivalent + flip +
normalisation, read straight from the uint8 cache and written in the training dtype and layout.

Why a kernel of its own: the unfused path (``cache._resized_crop`` then ``PlannedLoader._finish``) gathers
the batch (``index_select``), flips it, converts it to float32, runs ``roi_align`` and normalises, five
passes over the batch that took ~1.5 ms per 256 images of 256 px on an H100 - about 7 % of a resnet18
bf16 step, which is the gap between the cache and the model-bound ceiling. Here each output pixel reads
its few source pixels from the cache by sample index and is written once, as bf16 when the model runs
in bf16 (the dtype autocast would cast it to anyway).

The arithmetic is ``torchvision.ops.roi_align(aligned=True, sampling_ratio=-1)``'s, pixel for pixel:
the crop box is cut into ``image_size`` bins per side, each bin averages a grid of ceil(box / size)
bilinear samples (so a box larger than the output is averaged, not aliased), with roi_align's border
rules. A flipped sample reads column ``W - 1 - x`` of the unflipped source, which gives the pixels the
unfused path gets by mirroring the image and its box. Tests compare both paths (``test_gpu_crop.py``).

Triton ships with torch's CUDA builds; without it (or with ``MLTRACK_FUSED_CROP=0``) the loaders keep
the unfused path. With ``TRITON_INTERPRET=1`` the kernel also runs on CPU tensors, which is how CI checks
its arithmetic without a GPU.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

try:  # torch's CUDA wheels depend on triton; a CPU-only torch may not have it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

BLOCK = 512  # output pixels per program (x 3 channels)


def available(device: torch.device) -> bool:
    """Whether :func:`resized_crop` can run for batches on ``device`` (CUDA, or CPU under the interpreter)."""
    if triton is None or os.environ.get("MLTRACK_FUSED_CROP", "1") == "0":
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resized_crop(src: torch.Tensor, rows: Optional[torch.Tensor], boxes: torch.Tensor, image_size: int,
                 scale: torch.Tensor, shift: torch.Tensor, *, dtype: torch.dtype = torch.float32,
                 channels_last: bool = False) -> torch.Tensor:
    """Normalised crops ``(B, 3, image_size, image_size)`` of ``src[rows]`` (``rows`` None: all of ``src``).

    ``src`` is the (N, 3, H, W) uint8 cache or batch (any strides, unit stride along W not required);
    ``boxes`` (B, 5) float32 rows ``[left, top, width, height, flip]`` with the box in fractions of the
    image, as ``cache.sample_params`` draws them; ``scale``/``shift`` 3 values each: output =
    pixel * scale + shift, per channel.
    """
    n = len(boxes) if rows is None else len(rows)
    out = torch.empty((n, 3, image_size, image_size), dtype=dtype, device=src.device,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if n == 0:
        return out
    boxes = boxes.to(torch.float32).contiguous()
    scale = scale.reshape(3).to(torch.float32).contiguous()
    shift = shift.reshape(3).to(torch.float32).contiguous()
    row_arg = rows.contiguous() if rows is not None else boxes  # unread when HAS_ROWS is False
    grid = (n, triton.cdiv(image_size * image_size, BLOCK))
    _crop_kernel[grid](src, row_arg, boxes, scale, shift, out, src.shape[2], src.shape[3], image_size,
                       *src.stride(), *out.stride(), HAS_ROWS=rows is not None, BLOCK=BLOCK)
    return out


if triton is not None:

    @triton.jit
    def _crop_kernel(src_ptr, rows_ptr, box_ptr, scale_ptr, shift_ptr, out_ptr, H, W, S,
                     s_n, s_c, s_h, s_w, o_n, o_c, o_h, o_w, HAS_ROWS: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < S * S
        oy = (offs // S).to(tl.float32)
        ox = (offs % S).to(tl.float32)
        if HAS_ROWS:
            row = tl.load(rows_ptr + b).to(tl.int64)
        else:
            row = b.to(tl.int64)
        base = src_ptr + row * s_n  # int64: a large cache has more than 2**31 bytes
        hf = H.to(tl.float32)
        wf = W.to(tl.float32)
        sf = S.to(tl.float32)
        left, top = tl.load(box_ptr + b * 5), tl.load(box_ptr + b * 5 + 1)
        bw, bh = tl.load(box_ptr + b * 5 + 2), tl.load(box_ptr + b * 5 + 3)
        flip = tl.load(box_ptr + b * 5 + 4) > 0.5
        # The box in the (possibly mirrored) image, then roi_align's aligned coordinates, in its order.
        x1 = tl.where(flip, 1.0 - left - bw, left) * wf
        y1 = top * hf
        x2 = x1 + bw * wf
        y2 = y1 + bh * hf
        start_x = x1 - 0.5
        start_y = y1 - 0.5
        roi_w = (x2 - 0.5) - start_x
        roi_h = (y2 - 0.5) - start_y
        bin_w = roi_w / sf
        bin_h = roi_h / sf
        grid_w = tl.ceil(roi_w / sf).to(tl.int32)  # sampling_ratio=-1: adaptive sample grid per bin
        grid_h = tl.ceil(roi_h / sf).to(tl.int32)
        count = tl.maximum(grid_w * grid_h, 1).to(tl.float32)
        acc0 = tl.zeros([BLOCK], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK], dtype=tl.float32)
        for iy in range(0, grid_h):
            y = start_y + oy * bin_h + (iy + 0.5) * bin_h / grid_h.to(tl.float32)
            y_out, y_low, y_high, ly = _axis(y, H)
            hy = 1.0 - ly
            for ix in range(0, grid_w):
                x = start_x + ox * bin_w + (ix + 0.5) * bin_w / grid_w.to(tl.float32)
                x_out, x_low, x_high, lx = _axis(x, W)
                out_of_range = y_out | x_out
                hx = 1.0 - lx
                w1 = tl.where(out_of_range, 0.0, hy * hx)
                w2 = tl.where(out_of_range, 0.0, hy * lx)
                w3 = tl.where(out_of_range, 0.0, ly * hx)
                w4 = tl.where(out_of_range, 0.0, ly * lx)
                # Columns of the mirrored image are columns W - 1 - x of the stored one.
                c_low = tl.where(flip, W - 1 - x_low, x_low).to(tl.int64) * s_w
                c_high = tl.where(flip, W - 1 - x_high, x_high).to(tl.int64) * s_w
                r_low = y_low.to(tl.int64) * s_h
                r_high = y_high.to(tl.int64) * s_h
                acc0 += _taps(base, r_low, r_high, c_low, c_high, w1, w2, w3, w4, inside)
                acc1 += _taps(base + s_c, r_low, r_high, c_low, c_high, w1, w2, w3, w4, inside)
                acc2 += _taps(base + 2 * s_c, r_low, r_high, c_low, c_high, w1, w2, w3, w4, inside)
        dst = out_ptr + b.to(tl.int64) * o_n + (offs // S) * o_h + (offs % S) * o_w
        out_ty = out_ptr.dtype.element_ty
        tl.store(dst, (acc0 / count * tl.load(scale_ptr) + tl.load(shift_ptr)).to(out_ty), mask=inside)
        tl.store(dst + o_c, (acc1 / count * tl.load(scale_ptr + 1) + tl.load(shift_ptr + 1)).to(out_ty), mask=inside)
        tl.store(dst + 2 * o_c, (acc2 / count * tl.load(scale_ptr + 2) + tl.load(shift_ptr + 2)).to(out_ty),
                 mask=inside)

    @triton.jit
    def _axis(c, n):
        """roi_align's rules for one sample coordinate ``c`` on an axis of ``n`` pixels: (outside, low pixel,
        high pixel, weight of the high one). Outside [-1, n] it contributes 0; it is clamped at 0, and from
        pixel n - 1 on both neighbours are the last pixel."""
        outside = (c < -1.0) | (c > n.to(tl.float32))
        c = tl.maximum(c, 0.0)
        low = c.to(tl.int32)
        edge = low >= n - 1
        low = tl.where(edge, n - 1, low)
        high = tl.where(edge, n - 1, low + 1)
        c = tl.where(edge, low.to(tl.float32), c)
        return outside, low, high, c - low.to(tl.float32)

    @triton.jit
    def _taps(plane, r_low, r_high, c_low, c_high, w1, w2, w3, w4, mask):
        """roi_align's bilinear sum of one channel plane: w1 v(low, low) + w2 v(low, high) + ..."""
        v1 = tl.load(plane + r_low + c_low, mask=mask, other=0).to(tl.float32)
        v2 = tl.load(plane + r_low + c_high, mask=mask, other=0).to(tl.float32)
        v3 = tl.load(plane + r_high + c_low, mask=mask, other=0).to(tl.float32)
        v4 = tl.load(plane + r_high + c_high, mask=mask, other=0).to(tl.float32)
        return w1 * v1 + w2 * v2 + w3 * v3 + w4 * v4
