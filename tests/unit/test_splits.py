"""make_splits / split_digest / the digits demo writer, on real files."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mltrack.data.demo import ensure_digits, write_digits
from mltrack.data.splits import make_splits, split_digest
from mltrack.errors import ConfigError, DataError


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _sha(raw: Path, rel: str) -> str:
    return hashlib.sha256((raw / rel).read_bytes()).hexdigest()


def _read_all(splits: Path, folds: int) -> tuple[list[str], list[list[str]], list[list[str]]]:
    test = _lines(splits / "test.txt")
    trains = [_lines(splits / f"fold_{k}_train.txt") for k in range(folds)]
    vals = [_lines(splits / f"fold_{k}_val.txt") for k in range(folds)]
    return test, trains, vals


def test_split_invariants(tiny_dataset):
    data = tiny_dataset(n_classes=3, per_class=21, size=8)
    raw, splits = data / "raw", data / "splits"
    summary = make_splits(raw, splits, folds=4, test_fraction=0.2, seed=7)
    test, trains, vals = _read_all(splits, 4)
    every = sorted(str(p.relative_to(raw).as_posix()) for p in raw.rglob("*.png"))

    pool = set(trains[0]) | set(vals[0])
    assert sorted(pool | set(test)) == every and not pool & set(test)
    assert sorted(v for val in vals for v in val) == sorted(pool)  # val sets partition the pool
    test_hashes = {_sha(raw, r) for r in test}
    for k in range(4):
        assert not set(trains[k]) & set(vals[k]) and set(trains[k]) | set(vals[k]) == pool
        train_h, val_h = {_sha(raw, r) for r in trains[k]}, {_sha(raw, r) for r in vals[k]}
        assert not train_h & val_h and not (train_h | val_h) & test_hashes  # disjoint by content too
        for lines in (trains[k], vals[k]):
            assert lines == sorted(lines) and all("/" in r and not r.startswith("/") for r in lines)
    # stratified: each class has round(0.2 * 21) = 4 test images; val counts per class differ by <= 1
    assert Counter(r.split("/")[0] for r in test) == {"c0": 4, "c1": 4, "c2": 4}
    for cls in ("c0", "c1", "c2"):
        per_fold = [sum(r.startswith(cls + "/") for r in val) for val in vals]
        assert max(per_fold) - min(per_fold) <= 1 and sum(per_fold) == 17
        assert summary.val_per_fold[cls] == per_fold
    assert (summary.folds, summary.n_test, summary.n_trainval) == (4, 12, 51)
    assert summary.per_class["c1"] == {"total": 21, "test": 4, "trainval": 17}
    info = json.loads((splits / "split_info.json").read_text())
    assert info["params"] == {"folds": 4, "test_fraction": 0.2, "seed": 7, "allow_small_classes": False}
    assert info["digest"] == summary.digest
    assert info["fold_digests"] == [split_digest(splits, k) for k in range(4)]
    assert not list(splits.glob("*.tmp")) and not list(splits.glob(".*"))


def test_deterministic_and_seed_sensitive(tiny_dataset):
    data = tiny_dataset(per_class=15, size=8)
    raw = data / "raw"
    names = ["test.txt"] + [f"fold_{k}_{s}.txt" for k in range(3) for s in ("train", "val")]
    a, b, c = (make_splits(raw, data / out, folds=3, seed=s) for out, s in (("a", 1), ("b", 1), ("c", 2)))
    for name in names:
        assert (data / "a" / name).read_bytes() == (data / "b" / name).read_bytes()
    assert a.digest == b.digest != c.digest
    assert any((data / "a" / n).read_bytes() != (data / "c" / n).read_bytes() for n in names)


def test_test_set_shared_and_independent_of_fold_count(tiny_dataset):
    data = tiny_dataset(per_class=15, size=8)
    s3 = make_splits(data / "raw", data / "s3", folds=3)
    s5 = make_splits(data / "raw", data / "s5", folds=5)
    assert (data / "s3" / "test.txt").read_bytes() == (data / "s5" / "test.txt").read_bytes()
    assert s3.n_test == s5.n_test == 9
    # the per-fold digests differ (train/val differ) although all folds share one test.txt
    assert len({split_digest(data / "s5", k) for k in range(5)}) == 5


def test_fewer_folds_removes_stale_fold_files(tiny_dataset):
    data = tiny_dataset(per_class=10, size=8)
    make_splits(data / "raw", data / "splits", folds=5)
    make_splits(data / "raw", data / "splits", folds=3)
    left = sorted(p.name for p in (data / "splits").glob("fold_*"))
    assert left == [f"fold_{k}_{s}.txt" for k in range(3) for s in ("train", "val")]


@pytest.mark.parametrize("seed", range(6))
def test_identical_bytes_stay_in_one_split(tiny_dataset, seed):
    data = tiny_dataset(per_class=12, size=8)
    raw = data / "raw"
    copies = [f"c1/copy_{i}.png" for i in range(3)]
    for rel in copies:
        shutil.copyfile(raw / "c1" / "img_004.png", raw / rel)
    group = {"c1/img_004.png", *copies}
    summary = make_splits(raw, data / "splits", folds=3, seed=seed)
    assert sorted(group) in summary.duplicate_groups
    test, trains, vals = _read_all(data / "splits", 3)
    for k in range(3):  # never split across train/val/test of any fold
        placed = [bool(group & set(x)) for x in (trains[k], vals[k], test)]
        assert sum(placed) == 1 and all(group <= set(x) for x, p in zip((trains[k], vals[k], test), placed) if p)


def test_identical_bytes_in_two_classes_is_an_error(tiny_dataset):
    data = tiny_dataset(per_class=8, size=8)
    raw = data / "raw"
    shutil.copyfile(raw / "c0" / "img_002.png", raw / "c2" / "stray.png")
    with pytest.raises(DataError) as err:
        make_splits(raw, data / "splits", folds=3)
    assert "c0/img_002.png" in str(err.value) and "c2/stray.png" in str(err.value)
    assert "different classes" in str(err.value)
    assert not (data / "splits").exists()  # nothing written on refusal


def test_small_class_refused_with_fix(tiny_dataset):
    data = tiny_dataset(per_class=10, size=8)
    raw = data / "raw"
    for p in sorted((raw / "c2").iterdir())[3:]:
        p.unlink()
    with pytest.raises(DataError) as err:
        make_splits(raw, data / "splits", folds=5)
    assert str(err.value) == (
        "class 'c2' has 3 images < 5 folds; add images, lower --folds, or pass --allow-small-classes"
    )


def test_small_class_allowed_is_in_train_of_every_fold(tiny_dataset):
    data = tiny_dataset(per_class=10, size=8)
    raw = data / "raw"
    for p in sorted((raw / "c2").iterdir())[3:]:
        p.unlink()
    summary = make_splits(raw, data / "splits", folds=5, allow_small_classes=True)
    assert summary.small_classes == ["c2"]
    _, trains, _ = _read_all(data / "splits", 5)
    assert all(any(r.startswith("c2/") for r in train) for train in trains)
    assert json.loads((data / "splits" / "split_info.json").read_text())["small_classes"] == ["c2"]


def test_duplicates_count_as_one_image_for_the_fold_check(tiny_dataset):
    data = tiny_dataset(per_class=6, size=8)
    raw = data / "raw"
    for p in sorted((raw / "c0").iterdir())[1:]:
        shutil.copyfile(raw / "c0" / "img_000.png", p)  # 6 files, 1 distinct content
    with pytest.raises(DataError, match=r"class 'c0' has 6 images \(1 distinct\) < 3 folds"):
        make_splits(raw, data / "splits", folds=3)


def test_empty_class_and_missing_raw(tiny_dataset, tmp_path):
    data = tiny_dataset(per_class=6, size=8)
    (data / "raw" / "empty").mkdir()
    (data / "raw" / "empty" / ".DS_Store").write_bytes(b"\0\1")
    with pytest.raises(DataError, match="'empty'.*no image files"):
        make_splits(data / "raw", data / "splits", folds=3)
    with pytest.raises(DataError, match="data directory not found"):
        make_splits(tmp_path / "nowhere" / "raw", tmp_path / "s", folds=3)


def test_hidden_files_ignored_upper_case_suffix_kept(tiny_dataset):
    data = tiny_dataset(per_class=6, size=8)
    raw = data / "raw"
    (raw / "c0" / ".DS_Store").write_bytes(b"junk")
    (raw / ".hidden_class").mkdir()
    (raw / ".hidden_class" / "x.png").write_bytes((raw / "c1" / "img_000.png").read_bytes())
    Image.new("RGB", (8, 8), (9, 9, 9)).save(raw / "c0" / "UPPER.JPG", format="JPEG")
    make_splits(raw, data / "splits", folds=3)
    test, trains, vals = _read_all(data / "splits", 3)
    listed = set(test) | set(trains[0]) | set(vals[0])
    assert "c0/UPPER.JPG" in listed and len(listed) == 19
    assert not any(".DS_Store" in r or "hidden" in r for r in listed)


def test_symlink_out_of_raw_is_refused(tiny_dataset, tmp_path):
    data = tiny_dataset(per_class=6, size=8)
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    os.symlink(outside, data / "raw" / "c0" / "evil.png")
    with pytest.raises(DataError, match=r"c0/evil.png: resolves outside raw/"):
        make_splits(data / "raw", data / "splits", folds=3)


def test_bad_parameters(tiny_dataset):
    data = tiny_dataset(per_class=6, size=8)
    with pytest.raises(ConfigError, match="at least 2"):
        make_splits(data / "raw", data / "splits", folds=1)
    with pytest.raises(ConfigError, match="test fraction"):
        make_splits(data / "raw", data / "splits", folds=3, test_fraction=1.0)


def test_split_digest_tracks_content(tiny_dataset):
    data = tiny_dataset(per_class=9, size=8, folds=3)
    splits = data / "splits"
    before = split_digest(splits, 0)
    train = _lines(splits / "fold_0_train.txt")
    val = _lines(splits / "fold_0_val.txt")
    # move one line from train to val: same union of bytes, different digest
    (splits / "fold_0_train.txt").write_text("".join(f"{r}\n" for r in train[1:]))
    (splits / "fold_0_val.txt").write_text("".join(f"{r}\n" for r in sorted(val + train[:1])))
    assert split_digest(splits, 0) != before
    assert split_digest(splits, 1) == json.loads((splits / "split_info.json").read_text())["fold_digests"][1]
    (splits / "test.txt").unlink()
    with pytest.raises(DataError, match=r"^Index file not found: .*test\.txt"):
        split_digest(splits, 1)


def test_write_digits_and_ensure_digits(tmp_path):
    raw = write_digits(tmp_path / "digits")
    files = sorted(raw.rglob("*.png"))
    assert len(files) == 1797 and sorted(p.name for p in raw.iterdir()) == [str(d) for d in range(10)]
    first = raw / "0" / "0000.png"
    from sklearn.datasets import load_digits

    source = load_digits()
    for index in (0, 1000, 1796):
        path = raw / str(source.target[index]) / f"{index:04d}.png"
        with Image.open(path) as img:
            assert img.size == (8, 8) and img.mode == "L"
            assert np.array_equal(np.asarray(img), np.rint(source.images[index] * 255 / 16).astype(np.uint8))
    stamp = first.stat().st_mtime_ns
    write_digits(tmp_path / "digits")  # complete: nothing rewritten
    assert first.stat().st_mtime_ns == stamp
    (raw / "3" / "0003.png").unlink()  # an interrupted write is completed
    write_digits(tmp_path / "digits")
    assert (raw / "3" / "0003.png").is_file()

    ensure_digits(tmp_path / "digits", folds=5)
    splits = tmp_path / "digits" / "splits"
    assert len(list(splits.glob("fold_*_val.txt"))) == 5
    val_total = sum(len(_lines(p)) for p in splits.glob("fold_*_val.txt"))
    assert val_total + len(_lines(splits / "test.txt")) == 1797
    digest = split_digest(splits, 0)
    ensure_digits(tmp_path / "digits", folds=5)  # existing splits are kept
    assert split_digest(splits, 0) == digest
