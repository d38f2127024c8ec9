"""class_names / read_index / validate_relpath: the class map and index-file path attacks (T18)."""
from __future__ import annotations

import builtins
import io
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from mltrack.data import index as index_mod
from mltrack.data.index import class_names, read_index, validate_relpath
from mltrack.errors import DataError


@pytest.fixture
def data(tiny_dataset, tmp_path) -> Path:
    """3 classes x 6 images with 3-fold splits, plus a secret image and an image folder outside raw/."""
    data_dir = tiny_dataset(per_class=6, size=8, folds=3)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "secret.png")
    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (8, 8), (4, 5, 6)).save(tmp_path / "elsewhere" / "loot.png")
    os.symlink(tmp_path / "secret.png", data_dir / "raw" / "c0" / "evil.png")
    os.symlink(tmp_path / "elsewhere", data_dir / "raw" / "linked")
    return data_dir


def _write_val(data_dir: Path, lines: list[str]) -> None:
    (data_dir / "splits" / "fold_0_val.txt").write_text("".join(f"{line}\n" for line in lines))


ATTACKS = {
    "parent": ("../../etc/passwd", "'..'"),
    "absolute": ("/etc/passwd", "absolute"),
    "inner_parent": ("c0/../../secret.png", "'..'"),
    "backslash": ("c0\\img_000.png", "backslash"),
    "percent": ("c0/%2e%2e/x.png", "percent-encoded"),
    "double_percent": ("c0/%252e%252e%252fsecret.png", "percent-encoded"),
    "fragment": ("c0/img_000.png#x", "'#'"),
    "no_class": ("img_000.png", "expected <class>/<file>"),
    "empty_class": ("/img_000.png", "absolute"),
    "dot": ("./c0/img_000.png", "'.' component"),
    "symlink_file": ("c0/evil.png", "outside raw/"),
    "symlink_class": ("linked/loot.png", "outside raw/"),
    "unknown_class": ("nope/img_000.png", "class 'nope' is not a directory of raw/"),
    "missing": ("c0/missing.png", "file not found"),
    "hidden_class": (".git/config.png", "class '.git'"),
}


def test_class_names_sorted_hidden_ignored(tiny_dataset):
    data_dir = tiny_dataset(n_classes=3, per_class=2, size=8)
    raw = data_dir / "raw"
    (raw / ".cache").mkdir()
    (raw / "B_upper").mkdir()
    Image.new("RGB", (4, 4)).save(raw / "B_upper" / "x.PNG")
    (raw / "notes.txt").write_text("a file at class level is not a class")
    assert class_names(raw) == ["B_upper", "c0", "c1", "c2"]


def test_class_names_errors(tiny_dataset, tmp_path):
    with pytest.raises(DataError) as err:
        class_names(tmp_path / "ds" / "raw")
    assert str(err.value) == (
        f"data directory not found: {tmp_path / 'ds' / 'raw'} (expected <data_dir>/raw/<class>/...; "
        "run `mltrack demo-data` or point data.data_dir at your dataset)"
    )
    raw = tiny_dataset(per_class=2, size=8) / "raw"
    (raw / "empty").mkdir()
    (raw / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"'empty' in .* contain no image files"):
        class_names(raw)


def test_read_index_labels_follow_raw(data):
    names = class_names(data / "raw")
    assert names == ["c0", "c1", "c2", "linked"]  # a linked class dir is listed; its files are refused
    for split in ("train", "val", "test"):
        samples = read_index(data, split, 0)
        expected = (data / "splits" / ("test.txt" if split == "test" else f"fold_0_{split}.txt")).read_text()
        assert [rel for rel, _ in samples] == expected.splitlines()
        assert all(names[label] == rel.split("/")[0] for rel, label in samples)
    assert {label for _, label in read_index(data, "train", 1)} == {0, 1, 2}


def test_missing_index_file_message(tiny_dataset):
    data_dir = tiny_dataset(per_class=3, size=8)
    with pytest.raises(DataError) as err:
        read_index(data_dir, "train", 0)
    message = str(err.value)
    assert message.startswith(f"Index file not found: {data_dir / 'splits' / 'fold_0_train.txt'}")
    assert f"Generate splits first: ml-split --raw_data {data_dir / 'raw'} --folds 5" in message


@pytest.mark.parametrize("kind", sorted(ATTACKS))
def test_each_attack_is_reported_with_its_line(data, kind):
    line, reason = ATTACKS[kind]
    good = (data / "splits" / "fold_0_val.txt").read_text().splitlines()
    _write_val(data, good[:2] + [line] + good[2:])
    with pytest.raises(DataError) as err:
        read_index(data, "val", 0)
    message = str(err.value)
    assert "has 1 invalid line(s) (lines 3)" in message
    assert f"line 3: {line!r}: " in message and reason in message
    with pytest.raises(DataError, match=re.escape(reason)):
        validate_relpath(data / "raw", line)


def test_all_attacks_listed_in_one_error_and_nothing_outside_raw_opened(data, tmp_path, monkeypatch):
    good = (data / "splits" / "fold_0_val.txt").read_text().splitlines()
    lines = [good[0]]
    for line, _ in ATTACKS.values():
        lines += [line, good[1]]
    _write_val(data, lines)
    opened: list[str] = []

    def spy(real):
        def wrapper(target, *args, **kwargs):
            if isinstance(target, (str, bytes, os.PathLike)):
                opened.append(os.path.realpath(os.fsdecode(target)))
            return real(target, *args, **kwargs)

        return wrapper

    for owner, name in ((builtins, "open"), (io, "open"), (os, "open"), (os, "scandir"), (os, "listdir")):
        monkeypatch.setattr(owner, name, spy(getattr(owner, name)))
    monkeypatch.setattr(Image, "open", spy(Image.open))

    with pytest.raises(DataError) as err:
        read_index(data, "val", 0)
    for attack in ["../../etc/passwd", "/etc/passwd", "c0/evil.png", "linked/loot.png"]:
        with pytest.raises(DataError):
            validate_relpath(data / "raw", attack)
    monkeypatch.undo()

    bad_numbers = ", ".join(str(n) for n in range(2, 2 * len(ATTACKS) + 1, 2))
    assert f"has {len(ATTACKS)} invalid line(s) (lines {bad_numbers})" in str(err.value)
    raw_real = os.path.realpath(data / "raw")
    allowed = {os.path.realpath(data / "splits" / "fold_0_val.txt")}
    assert opened, "the spy saw nothing: it is not wired"
    outside = [p for p in opened if p not in allowed and not (p == raw_real or p.startswith(raw_real + os.sep))]
    assert outside == []
    assert not any(p.endswith(("secret.png", "loot.png", "passwd")) or "elsewhere" in p for p in opened)


def test_validate_relpath_returns_resolved_path_inside_raw(data, tmp_path):
    inner = data / "raw" / "c1" / "alias.png"
    os.symlink(data / "raw" / "c1" / "img_000.png", inner)  # a link that stays inside raw/ is fine
    resolved = validate_relpath(data / "raw", "c1/alias.png")
    assert resolved == Path(os.path.realpath(data / "raw" / "c1" / "img_000.png"))
    assert validate_relpath(data / "raw", "c2/img_005.png").is_file()


def test_blank_lines_ignored_crlf_accepted(data):
    _write_val(data, ["c0/img_000.png\r", "", "c2/img_001.png"])
    assert read_index(data, "val", 0) == [("c0/img_000.png", 0), ("c2/img_001.png", 2)]


def test_many_bad_lines_all_numbered_details_capped(data):
    _write_val(data, [f"../x{i}.png" for i in range(index_mod.MAX_LISTED_LINES + 5)])
    with pytest.raises(DataError) as err:
        read_index(data, "val", 0)
    message = str(err.value)
    assert f"(lines 1, 2, 3," in message and f", {index_mod.MAX_LISTED_LINES + 5})" in message
    assert "… and 5 more" in message
