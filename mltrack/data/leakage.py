"""Leakage and near-duplicate checks of :func:`mltrack.data.checks.check_dataset`.

Given the index files of a splits folder, every test/pool and train/val pair of sets is compared by path
and by content (sha256), and the folds' val sets must partition the train pool. Near-duplicates are
found by a 64-bit difference hash (dHash) plus the mean colour, computed once per file while the check
decodes it (:func:`perceptual_hash`) and kept in the check's manifest; a pair across classes or across
splits is a warning (a byte hash cannot see an edited or re-encoded copy).

Everything here appends findings to a :class:`~mltrack.data.check_report.CheckReport`; nothing writes files.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageStat

from mltrack.data.check_report import CheckReport, Finding, add_capped, listing
from mltrack.data.index import relpath_problem

NEAR_DUP_BITS = 5  # dHash bits (of 64) that may differ for a near-duplicate (a JPEG re-encode: ~0-3)
NEAR_DUP_COLOUR = 24  # and the mean colours may differ by at most this (0..255) per channel
NEAR_DUP_MAX_FILES = 20_000  # the all-pairs comparison is skipped above this (reported as info)
NEAR_DUP_MIN_SIDE = 16  # smaller images are not hashed: a 9x8 hash of 8x8 pixels only says "same shape"
_FOLD_FILE = re.compile(r"^fold_(\d+)_(train|val|test)\.txt$")


# ---------------------------------------------------------------- splits


def _read_split(path: Path, raw_real: str, names: list[str], known: set[str], report: CheckReport) -> list[str]:
    """The valid lines of one index file; invalid ones become one error finding with line numbers."""
    rels, problems = [], []
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:  # read exactly as read_index does
        lines = [raw_line.rstrip("\r\n") for raw_line in fh]
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        # A listed file was validated by the scan (its problem, if any, is in report.bad); only other
        # lines need the validator, which then names the exact problem (absolute path, '..', missing …).
        why = None if line in known else relpath_problem(raw_real, names, line)
        if why is None and line not in known:
            why = "not a listed image of raw/ (hidden or symlinked directory)"
        if why is None and line in report.quarantined:
            why = "quarantined"
        elif why is None and line in report.bad:
            why = "bad file (reason listed above)"
        if why:
            problems.append(f"line {number}: {line!r}: {why}")
        else:
            rels.append(line)
    if problems:
        report.findings.append(Finding("error", "split_lines",
                                       f"{path.name}: {len(problems)} invalid line(s): {listing(problems)}"))
    return rels


def _load_splits(
    report: CheckReport, names: list[str], known: set[str]
) -> tuple[list[str], list[list[str]], list[list[str]]] | None:
    """(test, train per fold, val per fold) from ``report.splits_dir``; None (and an error) if files are missing."""
    splits_dir = report.splits_dir
    assert splits_dir is not None
    found: dict[tuple[str, str], Path] = {}
    if splits_dir.is_dir():
        found = {m.groups(): p for p in splits_dir.iterdir() if (m := _FOLD_FILE.match(p.name))}
    folds = sorted({int(k) for k, part in found if part in ("train", "val")})
    missing = [f"fold_{k}_{p}.txt" for k in range(max(folds, default=-1) + 1) for p in ("train", "val")
               if (str(k), p) not in found]
    if not (splits_dir / "test.txt").is_file():
        missing.insert(0, "test.txt")
    if missing or not folds:
        report.findings.append(Finding("error", "split_missing", f"split files missing in {splits_dir}: "
                                       f"{', '.join(missing) or 'no fold_<k>_train/val.txt'}"))
        return None
    raw_real = os.path.realpath(report.raw_dir)
    read = lambda p: _read_split(p, raw_real, names, known, report)  # noqa: E731
    test = read(splits_dir / "test.txt")
    trains = [read(found[(str(k), "train")]) for k in folds]
    vals = [read(found[(str(k), "val")]) for k in folds]
    for (k, part), path in sorted(found.items()):  # older tools wrote one test file per fold
        if part == "test" and sorted(read(path)) != sorted(test):
            report.findings.append(Finding("error", "split_test", f"{path.name} differs from test.txt: "
                                           "the test set must be identical for every fold"))
    return test, trains, vals


def _overlap(report: CheckReport, a: list[str], b: list[str], what: str, infos: dict[str, dict[str, Any]]) -> None:
    """Error findings for paths and for contents (sha256) present in both ``a`` and ``b``."""
    same = sorted(set(a) & set(b))
    if same:
        report.findings.append(Finding("error", "leak_path",
                                       f"leak: {what} share {len(same)} path(s): {listing(same)}"))
    by_hash: dict[str, list[str]] = {}
    for rel in set(b) - set(same):
        by_hash.setdefault(infos[rel]["sha256"], []).append(rel)
    pairs = [f"{x} = {y}" for x in sorted(set(a) - set(same)) for y in sorted(by_hash.get(infos[x]["sha256"], []))]
    if pairs:
        report.findings.append(Finding("error", "leak_content", f"leak: {what} share {len(pairs)} identical "
                                       f"image(s) by content: {listing(pairs)}"))


def check_splits(report: CheckReport, names: list[str], known: set[str], usable: dict[str, list[str]],
                 infos: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Leakage and coverage of the index files in ``report.splits_dir`` (set); return relpath -> role
    ("test" or "train pool, val of fold <k>") for :func:`near_duplicates`."""
    loaded = _load_splits(report, names, known)
    if loaded is None:
        return {}
    test, trains, vals = loaded
    pool = sorted(set().union(*trains, *vals))
    _overlap(report, test, pool, "test and the train pool", infos)
    for k, (train, val) in enumerate(zip(trains, vals)):
        _overlap(report, train, val, f"fold {k} train and val", infos)
        if set(train) | set(val) != set(pool):
            report.findings.append(Finding("error", "split_pool", f"fold {k}: train+val is not the train pool "
                                           f"of the other folds ({len(set(pool) - set(train) - set(val))} missing)"))
    seen: dict[str, int] = {}
    for k, val in enumerate(vals):
        for rel in val:
            if rel in seen:
                report.findings.append(
                    Finding("error", "split_val", f"{rel} is in the val set of folds {seen[rel]} and {k}"))
            seen.setdefault(rel, k)
    no_val = sorted(set(pool) - set(seen))
    if no_val:
        # Not a leak: a hand-made train/val/test split (one fold) never covers its pool. It only breaks the
        # k-fold invariant of `mltrack split`, so it is reported, not refused.
        report.findings.append(Finding("warning", "split_val", f"the folds' val sets do not cover the train pool: "
                                       f"{len(no_val)} image(s) in no val set: {listing(no_val)}"))
    _split_counts(report, names, test, trains, vals)
    listed = set(test) | set(pool)
    unlisted = sorted(r for rels in usable.values() for r in rels if r not in listed)
    if unlisted:
        report.findings.append(Finding("warning", "split_unlisted", f"{len(unlisted)} usable image(s) are in no split "
                                       f"file (added after splitting?): {listing(unlisted)}; split again to use them"))
    return {**{r: f"train pool, val of fold {k}" for r, k in seen.items()}, **{r: "test" for r in test}}


def _split_counts(report: CheckReport, names: list[str], test: list[str], trains: list[list[str]],
                  vals: list[list[str]]) -> None:
    def count(rels: list[str]) -> dict[str, int]:
        found = Counter(r.split("/", 1)[0] for r in rels)
        return {n: found[n] for n in names}

    report.split_counts["test"] = count(test)
    for k, (train, val) in enumerate(zip(trains, vals)):
        report.split_counts[f"fold_{k}_train"], report.split_counts[f"fold_{k}_val"] = count(train), count(val)
        for n in names:
            if report.classes[n].usable and not report.split_counts[f"fold_{k}_train"][n]:
                report.findings.append(Finding("warning", "split_class", f"fold {k} train has no image of class '{n}'"))
            if report.classes[n].usable and not report.split_counts[f"fold_{k}_val"][n]:
                report.findings.append(Finding("warning", "split_class", f"fold {k} val has no image of class '{n}'"))


# ---------------------------------------------------------------- near-duplicates


def perceptual_hash(img: Image.Image) -> tuple[str | None, list[int]]:
    """64-bit difference hash (9x8 grey, left < right neighbour) as hex (None below NEAR_DUP_MIN_SIDE px),
    and the mean RGB colour."""
    if min(img.size) < NEAR_DUP_MIN_SIDE:
        return None, []
    grey = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.BOX), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).ravel()
    mean = [int(round(v)) for v in ImageStat.Stat(img).mean[:3]]
    return np.packbits(bits).tobytes().hex(), mean


def near_duplicates(report: CheckReport, usable: dict[str, list[str]], infos: dict[str, dict[str, Any]],
                    roles: dict[str, str]) -> None:
    """Pairs of usable files (one per byte-identical group) with dHashes <= NEAR_DUP_BITS apart and similar colour.

    Warning when the pair crosses classes (a label question) or crosses splits (test vs train pool, or two
    folds' val sets: a leak that byte hashes cannot see); pairs inside one class and split are only counted.
    """
    first_of_content: dict[str, str] = {}  # one file per byte-identical group (groups are reported already)
    for name in sorted(usable):
        for r in usable[name]:
            if infos[r].get("dhash"):
                first_of_content.setdefault(infos[r]["sha256"], r)
    rels = sorted(first_of_content.values())
    if len(rels) > NEAR_DUP_MAX_FILES:
        report.findings.append(Finding("info", "near_duplicate", f"near-duplicate search skipped: {len(rels)} images "
                                       f"> {NEAR_DUP_MAX_FILES}"))
        return
    pairs = _close_pairs(rels, infos)
    messages: list[str] = []
    for a, b, dist in pairs:
        kind = _pair_kind(a, b, roles)
        report.near_duplicates.append({"a": a, "b": b, "distance": dist, "kind": kind})
        if kind == "classes":
            messages.append(
                f"near-duplicate images in different classes (distance {dist}/64): {a} ~ {b}; check the labels")
        elif kind == "splits":
            messages.append(f"near-duplicate images across splits (distance {dist}/64): {a} ({roles[a]}) ~ {b} "
                            f"({roles[b]}); if one is an edited or re-encoded copy, it leaks between them")
    add_capped(report, "warning", "near_duplicate", messages)
    same = len(pairs) - len(messages)
    if same:
        report.findings.append(Finding("info", "near_duplicate", f"{same} near-duplicate pair(s) within one class "
                                       "and split (not a leak)"))


def _pair_kind(a: str, b: str, roles: dict[str, str]) -> str:
    if a.split("/", 1)[0] != b.split("/", 1)[0]:
        return "classes"
    ra, rb = roles.get(a), roles.get(b)
    return "splits" if ra is not None and rb is not None and ra != rb else "same"


def _close_pairs(rels: list[str], infos: dict[str, dict[str, Any]]) -> list[tuple[str, str, int]]:
    """All (a, b, bits) with a before b in ``rels``, vectorised over blocks of rows (memory ~16 MB a block)."""
    n = len(rels)
    if n < 2:
        return []
    hashes = np.array([int(infos[r]["dhash"], 16) for r in rels], dtype=np.uint64)
    colours = np.array([infos[r]["rgb"] for r in rels], dtype=np.int16)
    step = max(1, 2_000_000 // n)
    out: list[tuple[str, str, int]] = []
    for start in range(0, n, step):
        # Only columns from ``start`` on: the pairs before were compared by an earlier block.
        dist = np.bitwise_count(hashes[start:start + step, None] ^ hashes[None, start:])
        rows, cols = np.nonzero(dist <= NEAR_DUP_BITS)
        keep = cols > rows
        bits = dist[rows[keep], cols[keep]]
        rows, cols = rows[keep] + start, cols[keep] + start
        near_colour = np.abs(colours[rows] - colours[cols]).max(axis=1) <= NEAR_DUP_COLOUR
        for i, j, d in zip(rows[near_colour].tolist(), cols[near_colour].tolist(), bits[near_colour].tolist()):
            out.append((rels[i], rels[j], int(d)))
    return out
