"""check_dataset on real files: bad inputs, quarantine, manifest cache, duplicates, leakage, near-duplicates,
imbalance (T15, T17 header limit, T19, T20)."""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from mltrack.data import images
from mltrack.data.checks import check_dataset, check_for_run, write_report
from mltrack.data.index import class_names, iter_class_images, read_index, read_quarantine
from mltrack.data.splits import make_splits
from mltrack.errors import DataError


def _noise_jpeg(seed: int, size: int = 64, quality: int = 90) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(out, "JPEG", quality=quality)
    return out.getvalue()


def _broken_crc_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(out, "PNG")
    data = bytearray(out.getvalue())
    at = data.index(b"IDAT")
    data[at + 6] ^= 0xFF  # a byte of the compressed pixels: the chunk CRC no longer matches
    return bytes(data)


def _sof_bomb_jpeg(side: int = 65000) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "JPEG")
    data = bytearray(out.getvalue())
    at = data.index(b"\xff\xc0")  # SOF0: marker, length(2), precision(1), height(2), width(2)
    data[at + 5:at + 9] = side.to_bytes(2, "big") * 2
    return bytes(data)


def blob(seed: int, size: int = 32) -> Image.Image:
    """A smooth random colour field: distinct images get distinct perceptual hashes (unlike stripes + noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)


def _hostile(tiny_dataset) -> Path:
    """3 classes x 6 good PNGs plus one bad file of each kind, hidden/non-image files and valid variants."""
    data = tiny_dataset(per_class=6, size=8)  # below 16 px: no perceptual hash, so no near-duplicate noise
    raw = data / "raw"
    full = _noise_jpeg(1)
    (raw / "c0" / "half.jpg").write_bytes(full[: len(full) // 2])
    (raw / "c0" / "zero.jpg").write_bytes(b"")
    (raw / "c1" / "page.jpg").write_bytes(b"<!DOCTYPE html><html><body>Not Found</body></html>\n")
    (raw / "c2" / "crc.png").write_bytes(_broken_crc_png())
    (raw / "c2" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1\0")
    (raw / "c2" / "notes.txt").write_text("not an image")
    (raw / "c1" / "UPPER.JPG").write_bytes(_noise_jpeg(2, size=16))
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(raw / "c1" / "cmyk.jpg")
    return data


BAD_LINES = {
    "c0/zero.jpg": "ERROR   bad file c0/zero.jpg: empty file (0 bytes)",
    "c1/page.jpg": "ERROR   bad file c1/page.jpg: not an image (unrecognised format)",
}


def test_every_bad_file_reported_with_path_and_reason(tiny_dataset, tmp_path, monkeypatch):
    data = _hostile(tiny_dataset)
    raw = data / "raw"
    (raw / "c0" / "bomb.jpg").write_bytes(_sof_bomb_jpeg())
    (tmp_path / "secret.png").write_bytes((raw / "c0" / "img_000.png").read_bytes())
    os.symlink(tmp_path / "secret.png", raw / "c0" / "evil.png")
    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "elsewhere" / "loot.png")
    os.symlink(tmp_path / "elsewhere", raw / "linked")  # a class directory leaving raw/
    os.symlink(tmp_path / "elsewhere", raw / "c2" / "sub")  # a sub-directory leaving raw/: not followed
    opened: list[str] = []
    real_verify = images.verify

    def spy(path, *args, **kwargs):
        opened.append(os.path.realpath(path))
        return real_verify(path, *args, **kwargs)

    monkeypatch.setattr(images, "verify", spy)
    report = check_dataset(raw)
    lines = report.lines()
    assert f"ERROR   class directory 'linked' resolves outside {raw} (symlink); move its images into raw/" in lines
    assert not [p for p in opened if not p.startswith(os.path.realpath(raw) + os.sep)]
    for line in BAD_LINES.values():
        assert line in lines
    assert "ERROR   bad file c0/half.jpg: cannot decode: OSError: image file is truncated " in "\n".join(lines)
    assert any(x.startswith("ERROR   bad file c2/crc.png: corrupt: ") and "checksum" in x for x in lines)
    assert any(x.startswith("ERROR   bad file c0/bomb.jpg: too large (decompression bomb)") for x in lines)
    assert "ERROR   bad file c0/evil.png: resolves outside raw/ (symlink)" in lines
    assert "INFO    ignored 3 hidden or non-image entries: c2/.DS_Store, c2/notes.txt, c2/sub/" in lines
    assert lines[-1] == "result: FAILED (7 error(s), 0 warning(s))"
    assert not report.ok and sorted(report.bad) == sorted(
        ["c0/half.jpg", "c0/zero.jpg", "c1/page.jpg", "c2/crc.png", "c0/bomb.jpg", "c0/evil.png"])
    # UPPER.JPG and the CMYK JPEG are images and usable; nothing outside raw/ was handed to the decoder
    assert (report.classes["c1"].images, report.classes["c1"].bad, report.classes["c1"].usable) == (9, 1, 8)
    assert str(tmp_path / "secret.png") not in opened and len(opened) == report.n_images - 1
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_quarantine_excludes_exactly_the_bad_files(tiny_dataset):
    data = _hostile(tiny_dataset)
    raw, splits = data / "raw", data / "splits"
    unchecked = make_splits(raw, splits, folds=2)  # make_splits alone does not decode: bad files are listed
    assert "c0/zero.jpg" in (splits / "test.txt").read_text() + (splits / "fold_0_train.txt").read_text() + (
        splits / "fold_0_val.txt").read_text()

    report = check_dataset(raw, quarantine=True)
    assert report.ok and set(report.quarantined) == {"c0/half.jpg", "c0/zero.jpg", "c1/page.jpg", "c2/crc.png"}
    body = [x for x in (data / "quarantine.txt").read_text().splitlines() if not x.startswith("#")]
    assert body[1] == "c0/zero.jpg\tempty file (0 bytes)" and len(body) == 4
    assert read_quarantine(raw)["c1/page.jpg"] == "not an image (unrecognised format)"
    assert "INFO    quarantined c0/zero.jpg: empty file (0 bytes)" in report.lines()
    with pytest.raises(DataError, match=r"quarantined \(quarantine.txt: empty file"):  # the old index is refused
        for split in ("train", "val", "test"):
            read_index(data, split, 0)

    listed = [r for n in class_names(raw) for r in iter_class_images(raw, n)]
    assert sorted(listed) == sorted(r for rels in report.usable.values() for r in rels)
    assert "c0/zero.jpg" in iter_class_images(raw, "c0", include_quarantined=True)
    clean = make_splits(raw, splits, folds=2)
    assert clean.digest != unchecked.digest  # the dataset fingerprint (split digest) changes
    every = {r for f in splits.glob("*.txt") for r in f.read_text().splitlines()}
    assert every == set(listed) and not every & set(report.quarantined)
    assert check_dataset(raw, splits).ok  # a later check (as split/train run it) passes with the quarantine
    # fixing a file and quarantining again drops it from the list: exactly the bad files, every time
    (raw / "c0" / "zero.jpg").write_bytes(_noise_jpeg(3, size=16))
    assert set(check_dataset(raw, quarantine=True).quarantined) == {"c0/half.jpg", "c1/page.jpg", "c2/crc.png"}


def test_manifest_cache_hit_and_invalidation(tiny_dataset, tmp_path, monkeypatch):
    data = tiny_dataset(per_class=4, size=16)
    raw = data / "raw"
    calls: list[str] = []
    real_verify = images.verify
    monkeypatch.setattr(images, "verify", lambda p, *a, **k: calls.append(Path(p).name) or real_verify(p, *a, **k))

    first = check_dataset(raw)
    assert (len(calls), first.decoded, first.cached) == (12, 12, 0)
    assert (data / ".mltrack_check.json").is_file()
    calls.clear()
    second = check_dataset(raw)
    assert (calls, second.decoded, second.cached) == ([], 0, 12)
    assert second.to_json()["classes"] == first.to_json()["classes"]

    target = raw / "c1" / "img_002.png"
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touch: same bytes, new mtime
    assert check_dataset(raw).decoded == 1 and calls == ["img_002.png"]
    calls.clear()
    target.write_bytes(b"")  # a changed file is verified again and its new verdict counts
    changed = check_dataset(raw)
    assert calls == ["img_002.png"] and changed.bad == {"c1/img_002.png": "empty file (0 bytes)"}
    calls.clear()
    assert check_dataset(raw, max_pixels=1_000_000).decoded == 12  # another limit: every verdict is redone

    # A manifest shipped inside a copied dataset vouches for nothing (inode and ctime differ).
    copy = tmp_path / "copy"
    shutil.copytree(data, copy, copy_function=shutil.copy2)
    calls.clear()
    assert check_dataset(copy / "raw", max_pixels=1_000_000).decoded == 12 and len(calls) == 12


def test_identical_bytes_within_and_across_classes(tiny_dataset):
    data = tiny_dataset(per_class=5, size=16)
    raw = data / "raw"
    shutil.copyfile(raw / "c0" / "img_000.png", raw / "c0" / "again.png")
    shutil.copyfile(raw / "c0" / "img_001.png", raw / "c2" / "stray.png")
    report = check_dataset(raw)
    lines = report.lines()
    assert "INFO    identical files in one class (split keeps them together): c0/again.png = c0/img_000.png" in lines
    assert "ERROR   identical bytes in different classes (label conflict): c0/img_001.png = c2/stray.png" in lines
    assert report.duplicate_groups == [["c0/again.png", "c0/img_000.png"]] and not report.ok


def _hand_splits(splits: Path, test: list[str], trains: list[list[str]], vals: list[list[str]]) -> None:
    splits.mkdir(exist_ok=True)
    (splits / "test.txt").write_text("".join(f"{r}\n" for r in test))
    for k, (train, val) in enumerate(zip(trains, vals)):
        (splits / f"fold_{k}_train.txt").write_text("".join(f"{r}\n" for r in train))
        (splits / f"fold_{k}_val.txt").write_text("".join(f"{r}\n" for r in val))


def _valid_layout() -> tuple[list[str], list[list[str]], list[list[str]]]:
    """3 classes x 5 files: img_000 in test; 001/002 val of fold 0; 003/004 val of fold 1."""
    cls = ("c0", "c1", "c2")
    test = [f"{c}/img_000.png" for c in cls]
    vals = [[f"{c}/img_{i:03d}.png" for c in cls for i in idx] for idx in ((1, 2), (3, 4))]
    return test, [vals[1], vals[0]], vals  # each fold trains on the other fold's val set


@pytest.mark.parametrize("case", ["path", "content", "fold", "cover", "pool", "lines", "legacy_test"])
def test_leakage_checks_on_hand_made_splits(tiny_dataset, case):
    data = tiny_dataset(per_class=5, size=8)
    raw, splits = data / "raw", data / "splits"
    test, trains, vals = _valid_layout()
    _hand_splits(splits, test, trains, vals)
    valid = check_dataset(raw, splits)
    assert valid.ok and not [f for f in valid.findings if f.level == "warning"], valid.lines()
    assert valid.split_counts["fold_1_val"] == {"c0": 2, "c1": 2, "c2": 2}

    expected = {
        "path": "ERROR   leak: test and the train pool share 1 path(s): c0/img_001.png",
        "content": "ERROR   leak: test and the train pool share 1 identical image(s) by content: "
                   "c1/copy.png = c1/img_003.png",
        "fold": "ERROR   leak: fold 0 train and val share 1 path(s): c2/img_002.png",
        # A hand-made single holdout never covers its pool: reported, not a failure on its own.
        "cover": "WARNING the folds' val sets do not cover the train pool: 1 image(s) in no val set: c2/img_004.png",
        "pool": "ERROR   fold 1: train+val is not the train pool of the other folds (1 missing)",
        "lines": "ERROR   test.txt: 2 invalid line(s): line 4: '../../etc/passwd': '..' component in path, "
                 "line 5: 'c0/img_009.png': file not found",
        "legacy_test": "ERROR   fold_0_test.txt differs from test.txt: the test set must be identical for every fold",
    }[case]
    if case == "path":
        test = test + ["c0/img_001.png"]
    elif case == "content":
        shutil.copyfile(raw / "c1" / "img_003.png", raw / "c1" / "copy.png")
        test = test + ["c1/copy.png"]
    elif case == "fold":
        trains = [trains[0] + ["c2/img_002.png"], trains[1]]
    elif case == "cover":
        vals = [vals[0], [r for r in vals[1] if r != "c2/img_004.png"]]
    elif case == "pool":
        trains = [trains[0], [r for r in trains[1] if r != "c1/img_001.png"]]
    elif case == "lines":
        test = test + ["../../etc/passwd", "c0/img_009.png"]
    else:
        (splits / "fold_0_test.txt").write_text("c0/img_000.png\n")
    _hand_splits(splits, test, trains, vals)
    report = check_dataset(raw, splits)
    assert expected in report.lines()
    if case != "cover":
        assert not report.ok


def test_split_coverage_warnings(tiny_dataset):
    data = tiny_dataset(per_class=5, size=8)
    raw, splits = data / "raw", data / "splits"
    test, trains, vals = _valid_layout()
    vals = [[r for r in vals[0] if not r.startswith("c1/")], vals[1]]
    trains = [vals[1], vals[0]]  # c1/img_001 and 002 are now in no split at all
    _hand_splits(splits, test, trains, vals)
    lines = check_dataset(raw, splits).lines()
    assert "WARNING fold 0 val has no image of class 'c1'" in lines
    assert "WARNING fold 1 train has no image of class 'c1'" in lines
    assert ("WARNING 2 usable image(s) are in no split file (added after splitting?): c1/img_001.png, "
            "c1/img_002.png; split again to use them") in lines


def test_near_duplicate_reencode_across_splits_and_classes(tmp_path):
    raw = tmp_path / "ds" / "raw"
    for c in range(2):
        (raw / f"c{c}").mkdir(parents=True)
        for j in range(6):
            blob(100 * c + j).save(raw / f"c{c}" / f"img_{j:03d}.png")
    reencoded = io.BytesIO()
    Image.open(raw / "c0" / "img_002.png").save(reencoded, "JPEG", quality=70)
    (raw / "c0" / "zz_copy.jpg").write_bytes(reencoded.getvalue())
    alone = check_dataset(raw)
    assert alone.ok and len(alone.near_duplicates) == 1 and not alone.warnings  # same class, no splits: info
    assert "INFO    1 near-duplicate pair(s) within one class and split (not a leak)" in alone.lines()

    test = ["c0/zz_copy.jpg", "c1/img_000.png"]
    vals = [["c0/img_000.png", "c0/img_001.png", "c0/img_002.png", "c1/img_001.png", "c1/img_002.png"],
            ["c0/img_003.png", "c0/img_004.png", "c0/img_005.png", "c1/img_003.png", "c1/img_004.png",
             "c1/img_005.png"]]
    _hand_splits(tmp_path / "ds" / "splits", test, [vals[1], vals[0]], vals)
    report = check_dataset(raw, tmp_path / "ds" / "splits")
    near = [x for x in report.lines() if "near-duplicate" in x]
    assert len(near) == 1 and near[0].startswith("WARNING near-duplicate images across splits (distance ")
    assert "c0/img_002.png (train pool, val of fold 0) ~ c0/zz_copy.jpg (test)" in near[0] and report.ok

    shutil.move(raw / "c0" / "zz_copy.jpg", raw / "c1" / "zz_copy.jpg")
    crossed = [x for x in check_dataset(raw).lines() if "near-duplicate" in x]
    assert len(crossed) == 1 and crossed[0].startswith("WARNING near-duplicate images in different classes")
    assert crossed[0].endswith("c0/img_002.png ~ c1/zz_copy.jpg; check the labels")


def _imbalanced(tmp_path: Path, counts: dict[str, int]) -> Path:
    raw = tmp_path / "imb" / "raw"
    for c, (name, n) in enumerate(counts.items()):
        (raw / name).mkdir(parents=True)
        for j in range(n):
            blob(1000 * c + j, size=8).save(raw / name / f"{j:03d}.png")
    return raw


def test_imbalance_small_classes_and_labels(tmp_path, caplog):
    raw = _imbalanced(tmp_path, {"a": 40, "b": 8, "c": 3})
    report = check_dataset(raw)
    assert ("WARNING class imbalance: largest/smallest = 40/3 = 13.3 > 10 ('a' vs 'c'); consider "
            "training.class_weights: auto or data.sampler: balanced") in report.lines()
    assert report.ok and report.params()["data.check.imbalance_ratio"] == 13.333
    splits = raw.parent / "splits"
    with pytest.raises(DataError, match=r"class 'c' has 3 images < 5 folds"):
        make_splits(raw, splits, folds=5)
    summary = make_splits(raw, splits, folds=5, allow_small_classes=True)
    assert summary.small_classes == ["c"]
    for k in range(5):
        for split in ("train", "val", "test"):
            labels = {rel.split("/")[0]: label for rel, label in read_index(raw.parent, split, k)}
            assert labels.get("c", 2) == 2 and labels.get("a", 0) == 0 and labels.get("b", 1) == 1
        assert any(rel.startswith("c/") for rel, _ in read_index(raw.parent, "train", k))
    checked = check_dataset(raw, splits)
    assert checked.ok and all(checked.split_counts[f"fold_{k}_train"]["c"] >= 1 for k in range(5))
    assert "WARNING fold 0 val has no image of class 'c'" in checked.lines()
    with caplog.at_level(logging.WARNING, logger="mltrack"):
        check_for_run(raw.parent, 40_000_000)  # what a training run logs: each kind of warning, capped
    logged = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("data check: class imbalance: largest/smallest = 40/3") for m in logged)
    assert "data check: fold 0 val has no image of class 'c'" in logged  # c's 2 pool images: val of 2 folds
    assert len([m for m in logged if m.endswith("val has no image of class 'c'")]) == 3 and len(logged) == 4


def test_empty_class_directory_is_an_error(tiny_dataset):
    data = tiny_dataset(per_class=3, size=8)
    (data / "raw" / "empty").mkdir()
    (data / "raw" / "empty" / ".DS_Store").write_bytes(b"x")
    report = check_dataset(data / "raw")
    expected = "ERROR   class directory 'empty' contains no image files; add images or remove the directory"
    assert expected in report.lines() and not report.ok
    with pytest.raises(DataError, match="'empty' in .* contain no image files"):
        class_names(data / "raw")


def test_check_for_run_fails_then_passes_after_quarantine(tiny_dataset, tmp_path):
    data = _hostile(tiny_dataset)
    make_splits(data / "raw", data / "splits", folds=2)
    with pytest.raises(DataError) as err:
        check_for_run(data, 40_000_000)
    text = str(err.value)
    assert "bad file c0/zero.jpg: empty file (0 bytes)" in text and "--quarantine" in text
    assert "bad file c1/page.jpg: not an image (unrecognised format)" in text
    assert "'c1/page.jpg': bad file (reason listed above)" in text  # the index files list it too

    check_dataset(data / "raw", quarantine=True)
    with pytest.raises(DataError, match="quarantined"):  # the old splits still list quarantined files
        check_for_run(data, 40_000_000)
    make_splits(data / "raw", data / "splits", folds=2)
    report = check_for_run(data, 40_000_000)
    params = report.params()
    assert params["data.check.quarantined"] == 4 and params["data.check.usable"] == 20 and report.cached == 24
    txt, js = write_report(report, tmp_path / "out" / "data")
    assert txt.read_text().splitlines()[-1] == "result: OK (0 error(s), 0 warning(s))"
    payload = json.loads(js.read_text())
    assert payload["ok"] and [q["path"] for q in payload["quarantined"]] == sorted(report.quarantined)
    assert payload["split_counts"]["test"]["c1"] >= 1 and payload["params"] == params
