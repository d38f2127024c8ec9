"""load_rgb / verify on real files: mode conversions, EXIF, corrupt files, decompression bombs (T15-T17)."""
from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from mltrack.data.images import IMAGE_EXTENSIONS, is_image_file, load_rgb, verify
from mltrack.data.transforms import build_transform
from mltrack.errors import DataError

LIMIT = 40_000_000
REPO = Path(__file__).resolve().parents[2]


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def write_zero_png(path: Path, width: int, height: int) -> None:
    """An all-black RGB PNG built row by row, so writing it never holds the pixels in memory."""
    comp = zlib.compressobj(9)
    row = b"\0" * (1 + 3 * width)  # filter byte + pixels
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))


def _jpeg_with_orientation(path: Path, orientation: int) -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 10))  # bright block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, format="JPEG", quality=95, exif=exif)


def _mean(img: Image.Image, box: tuple[int, int, int, int]) -> float:
    return float(np.asarray(img.crop(box), dtype=np.float64).mean())


def test_extensions_and_hidden_files():
    assert {".jpg", ".jpeg", ".png"} <= IMAGE_EXTENSIONS
    assert is_image_file("a/B.JPG") and is_image_file("x.Png")
    assert not is_image_file(".DS_Store") and not is_image_file("._x.jpg") and not is_image_file("notes.txt")


def test_mode_conversions(tmp_path):
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(cmyk, quality=95)  # pure red in CMYK
    grey = tmp_path / "l.png"
    Image.new("L", (5, 4), 77).save(grey)
    la = tmp_path / "la.png"
    la_img = Image.new("LA", (4, 2), (200, 255))
    la_img.paste((200, 0), (0, 0, 2, 2))  # left half fully transparent
    la_img.save(la)
    pal = Image.new("P", (4, 2), 1)
    pal.putpalette([10, 20, 30, 250, 100, 50] + [0] * 762)
    pal.paste(0, (0, 0, 2, 2))
    pal.save(tmp_path / "p.png", transparency=0)  # index 0 (left half) transparent
    Image.new("RGBA", (3, 3), (200, 100, 50, 128)).save(tmp_path / "rgba.png")

    red = load_rgb(cmyk, LIMIT)
    assert red.mode == "RGB" and np.allclose(np.asarray(red).reshape(-1, 3).mean(0), (255, 0, 0), atol=6)
    assert np.array_equal(np.asarray(load_rgb(grey, LIMIT)), np.full((4, 5, 3), 77, np.uint8))
    la_rgb = np.asarray(load_rgb(la, LIMIT))
    assert (la_rgb[:, :2] == 0).all() and (la_rgb[:, 2:] == 200).all()  # composited on black
    p_rgb = np.asarray(load_rgb(tmp_path / "p.png", LIMIT))
    assert (p_rgb[:, :2] == 0).all() and (p_rgb[:, 2:] == (250, 100, 50)).all()
    rgba = np.asarray(load_rgb(tmp_path / "rgba.png", LIMIT)).astype(int)
    assert np.abs(rgba - np.array([100, 50, 25])).max() <= 1  # colour x alpha/255


def test_sixteen_bit_ramp_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 512).round().astype(np.uint16).reshape(2, 256)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    with Image.open(tmp_path / "ramp16.png") as raw:
        assert raw.mode.startswith("I;16")  # the file really is 16-bit
    rgb = np.asarray(load_rgb(tmp_path / "ramp16.png", LIMIT))
    grey = rgb[..., 0].ravel()
    assert len(np.unique(grey)) > 200 and grey.min() == 0 and grey.max() == 255
    assert (np.diff(grey.astype(int)) >= 0).all()  # monotone ramp survives
    # 32-bit integer mode I (e.g. from TIFF) is read as 16-bit data
    Image.fromarray(ramp.astype(np.int32)).save(tmp_path / "ramp32.tif")
    assert len(np.unique(np.asarray(load_rgb(tmp_path / "ramp32.tif", LIMIT)))) > 200


@pytest.mark.parametrize("orientation, bright_box", [(6, (10, 0, 20, 10)), (8, (0, 30, 10, 40))])
def test_exif_orientation_applied(tmp_path, orientation, bright_box):
    path = tmp_path / f"o{orientation}.jpg"
    _jpeg_with_orientation(path, orientation)
    with Image.open(path) as raw:
        assert raw.size == (40, 20)
    img = load_rgb(path, LIMIT)
    assert img.size == (20, 40)  # H and W swapped
    # 6: rotate 90° clockwise to view (top-left -> top-right); 8: counter-clockwise (-> bottom-left)
    assert _mean(img, bright_box) > 200 and _mean(img, (0, 0, 20, 40)) < 100


def test_every_variant_becomes_3_channel_unit_floats(tmp_path):
    Image.new("RGB", (1, 1), (9, 9, 9)).save(tmp_path / "tiny.png")
    Image.new("RGB", (4000, 50), (90, 20, 200)).save(tmp_path / "wide.jpg")
    Image.new("CMYK", (10, 12), (10, 20, 30, 40)).save(tmp_path / "c.jpg")
    Image.new("LA", (7, 3), (60, 128)).save(tmp_path / "la.png")
    Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).save(tmp_path / "d16.png")
    to_tensor = build_transform("none", 16, train=False)
    for path in sorted(tmp_path.iterdir()):
        t = to_tensor(load_rgb(path, LIMIT))
        assert t.shape == (3, 16, 16) and str(t.dtype) == "torch.float32", path
        assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0, path


def _corrupt_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good, quality=90)
    data = good.read_bytes()
    (tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "page.jpg").write_text("<!DOCTYPE html><html><body>Not found</body></html>")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="PNG")
    png = bytearray(buf.getvalue())
    at = png.find(b"IDAT")
    length = struct.unpack(">I", png[at - 4 : at])[0]
    png[at + 4 + length] ^= 0xFF  # break the IDAT CRC only; the pixel data itself still inflates
    (tmp_path / "crc.png").write_bytes(bytes(png))
    return {name: tmp_path / f"{name}{suffix}" for name, suffix in
            [("good", ".jpg"), ("half", ".jpg"), ("zero", ".jpg"), ("page", ".jpg"), ("crc", ".png")]}


def test_verify_reasons(tmp_path):
    files = _corrupt_files(tmp_path)
    assert verify(files["good"], LIMIT) is None
    assert "truncated" in verify(files["half"], LIMIT)
    assert "empty file" in verify(files["zero"], LIMIT)
    assert "not an image" in verify(files["page"], LIMIT)
    assert "checksum" in verify(files["crc"], LIMIT) and verify(files["crc"], LIMIT).startswith("corrupt")
    assert verify(tmp_path / "absent.png", LIMIT) is not None
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("name, reason", [("half", "truncated"), ("zero", "empty"), ("page", "not an image")])
def test_load_rgb_raises_with_path_and_reason(tmp_path, name, reason):
    path = _corrupt_files(tmp_path)[name]
    with pytest.raises(DataError) as err:
        load_rgb(path, LIMIT)
    assert str(path) in str(err.value) and reason in str(err.value)


def test_size_limit_checked_from_header_before_decoding(tmp_path, monkeypatch):
    write_zero_png(tmp_path / "big.png", 300, 200)
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or real_load(self))
    with pytest.raises(DataError, match=r"big\.png: image size 300x200 = 60,000 px is outside 1\.\.59,999 px"):
        load_rgb(tmp_path / "big.png", max_pixels=59_999)
    assert loads == []  # refused before any pixel was decoded
    assert load_rgb(tmp_path / "big.png", max_pixels=60_000).size == (300, 200)
    assert loads and set(loads) == {(300, 200)}  # the spy does see decodes
    assert "outside" in verify(tmp_path / "big.png", 1000)


def test_pil_bomb_warning_is_a_refusal_even_if_warnings_are_ignored(tmp_path, monkeypatch):
    write_zero_png(tmp_path / "w.png", 12, 12)  # 144 px: PIL only warns
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL warns above 100 px, raises above 200
    filters_before = list(warnings.filters)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="12x12"):
            load_rgb(tmp_path / "w.png", max_pixels=10**9)
    assert warnings.filters == filters_before
    write_zero_png(tmp_path / "x.png", 30, 30)  # 900 px > 2 x 100: PIL's own error
    with pytest.raises(DataError, match="too large"):
        load_rgb(tmp_path / "x.png", max_pixels=10**9)


_RSS_PROBE = """
import resource, sys
from pathlib import Path
from mltrack.data.images import load_rgb, verify
from mltrack.errors import DataError
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
messages = []
for name in sys.argv[1:]:
    try:
        load_rgb(Path(name), 40_000_000)
        messages.append("LOADED")
    except DataError as err:
        messages.append(str(err))
    messages.append(verify(Path(name), 40_000_000) or "VERIFIED")
growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(growth_mb)
print("\\n".join(messages))
"""


def test_bombs_rejected_from_header_with_bounded_memory(tmp_path):
    bomb = tmp_path / "bomb.png"
    write_zero_png(bomb, 12000, 12000)  # 432 MB of RGB pixels in ~0.5 MB of file
    assert bomb.stat().st_size < 2_000_000
    mid = tmp_path / "mid.png"
    write_zero_png(mid, 7000, 7000)  # 49 Mpx: under PIL's own limit, over ours
    small = io.BytesIO()
    Image.new("RGB", (16, 16)).save(small, format="JPEG")
    jpeg = bytearray(small.getvalue())
    sof = jpeg.find(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", 65000, 65000)  # SOF0 height, width
    (tmp_path / "sof.jpg").write_bytes(bytes(jpeg))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(bomb), str(mid), str(tmp_path / "sof.jpg")],
        capture_output=True, text=True, env=env, timeout=60, check=True,
    ).stdout.splitlines()
    growth_mb, messages = float(out[0]), out[1:]
    assert growth_mb < 200, growth_mb
    assert "LOADED" not in messages and "VERIFIED" not in messages
    assert "bomb.png" in messages[0] and "12000x12000" in messages[0]
    assert "mid.png" in messages[2] and "7000x7000 = 49,000,000 px is outside 1..40,000,000 px" in messages[2]
    assert "sof.jpg" in messages[4] and "too large" in messages[4]
