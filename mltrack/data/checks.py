"""Dataset check (``mltrack check``, and the first step of ``split`` and ``train``).

Every image file under ``raw/<class>/`` is fully decoded (the same decoder training uses), so a bad file
is found before any training starts, with its path and reason. The check also reports byte-identical
files (within a class: kept in one split; across classes: a label conflict, an error), near-duplicates by
a 64-bit difference hash (warning), class imbalance, and, given a splits folder, leakage between
train/val/test by path and by content. Hidden and non-image files are ignored and counted.

Side effects, both beside ``raw/`` in the data folder:

- ``.mltrack_check.json``: a manifest ``relpath -> (size, mtime_ns, ctime_ns, inode) -> sha256, verdict,
  hash``. A re-check of unchanged files only stats them; any change re-verifies that file. ctime and inode
  are part of the key because a copied or extracted dataset gets fresh ones, so a manifest shipped inside
  someone else's dataset can never vouch for its files.
- ``quarantine.txt`` (with ``quarantine=True``): exactly the bad files, one ``relpath<TAB>reason`` a line.
  Splitting and index reading then leave those files out (:mod:`mltrack.data.index`); nothing is ever
  substituted for a bad sample.

This module scans, decodes and caches; the split-leakage and near-duplicate checks are in
:mod:`mltrack.data.leakage`, the report types and their output (text, JSON, console lines) in
:mod:`mltrack.data.check_report`.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from PIL import Image

from mltrack.console import get_logger
from mltrack.data import images
from mltrack.data.check_report import (
    CheckReport,
    ClassCounts,
    Finding,
    add_capped,
    failure_message,
    listing,
    warning_lines,
    write_report,
)
from mltrack.data.index import is_inside, quarantine_path, read_quarantine, relpath_problem, scan_class
from mltrack.data.leakage import check_splits, near_duplicates, perceptual_hash
from mltrack.data.splits import write_atomic
from mltrack.errors import DataError

# The report types and their output functions live in check_report; callers import them from here too.
__all__ = ["DEFAULT_MAX_PIXELS", "IMBALANCE_WARN", "MANIFEST_FILE", "CheckReport", "ClassCounts", "Finding",
           "check_dataset", "check_for_run", "failure_message", "warning_lines", "write_quarantine", "write_report"]

DEFAULT_MAX_PIXELS = 40_000_000  # = DataConfig.max_image_pixels default
MANIFEST_FILE = ".mltrack_check.json"
MANIFEST_VERSION = 1
IMBALANCE_WARN = 10.0  # largest / smallest class above this is a warning

log = get_logger()


# ---------------------------------------------------------------- entry points


def check_dataset(
    raw_dir: Path,
    splits_dir: Path | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    quarantine: bool = False,
    *,
    use_cache: bool = True,
    imbalance_warn: float = IMBALANCE_WARN,
) -> CheckReport:
    """Check every file under ``raw_dir`` (and the index files in ``splits_dir``, if given).

    ``max_pixels`` is the decompression-bomb limit (width*height, read from headers). With ``quarantine``
    the quarantine file is rewritten to list exactly the bad files (or emptied), so they no longer fail
    the check and split/train skip them. Raises DataError only when ``raw_dir`` has no class folder at
    all; every other problem is a finding in the report. Reads and rewrites the manifest (module doc).
    """
    raw_dir = Path(raw_dir)
    names, escaped, ignored = _class_dirs(raw_dir)
    raw_real = os.path.realpath(raw_dir)
    files: dict[str, list[str]] = {}
    for name in names:
        files[name], skipped = ([], []) if name in escaped else scan_class(raw_dir, name)
        ignored.extend(skipped)
    every = [rel for rels in files.values() for rel in rels]
    dir_cache: dict[str, str] = {}
    bad = {rel: why for rel in every if (why := relpath_problem(raw_real, names, rel, dir_cache))}
    infos, decoded, cached = _inspect_all(raw_dir, [r for r in every if r not in bad], max_pixels, use_cache)
    bad.update({rel: info["verdict"] for rel, info in infos.items() if info["verdict"]})
    if quarantine:
        write_quarantine(raw_dir, bad)
    present = set(every)
    quarantined = {rel: why for rel, why in read_quarantine(raw_dir).items() if rel in present}
    report = CheckReport(raw_dir, max_pixels, {}, bad, quarantined, sorted(ignored), [], [], [], decoded, cached,
                         None, Path(splits_dir) if splits_dir is not None else None)
    usable = _file_findings(report, files, escaped)
    _duplicates(report, usable, infos)
    _imbalance(report, imbalance_warn)
    roles = check_splits(report, names, present, usable, infos) if splits_dir is not None else {}
    near_duplicates(report, usable, infos, roles)
    return report


def check_for_run(data_dir: Path, max_pixels: int, *, log_warnings: bool = True) -> CheckReport:
    """The check a training run does before it opens its MLflow run: ``data_dir/raw`` plus ``data_dir/splits``.

    Raises DataError listing the errors (bad files, label conflicts, leaks) with the fix; logs the warnings
    (:func:`warning_lines`) on the ``mltrack`` logger unless ``log_warnings`` is False (callers that check
    the same data again, e.g. each fold of a cv). Fast for an unchanged dataset (manifest).
    """
    data_dir = Path(data_dir)
    splits = data_dir / "splits"
    report = check_dataset(data_dir / "raw", splits if splits.is_dir() else None, max_pixels)
    if not report.ok:
        raise DataError(failure_message(report))
    for line in warning_lines(report) if log_warnings else []:
        log.warning("data check: %s", line)
    return report


def write_quarantine(raw_dir: Path, bad: dict[str, str]) -> Path:
    """Write ``<data_dir>/quarantine.txt`` listing exactly ``bad`` (relpath -> reason); return its path."""
    lines = ["# mltrack quarantine: split and train skip these files (path<TAB>reason).",
             "# Written by `mltrack check --quarantine`; delete this file to use them again."]
    lines += [f"{rel}\t{' '.join(why.split())}" for rel, why in sorted(bad.items())]
    path = quarantine_path(raw_dir)
    write_atomic(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return path


# ---------------------------------------------------------------- files


def _class_dirs(raw_dir: Path) -> tuple[list[str], set[str], list[str]]:
    """(class names, those linked outside raw/, ignored top-level entries). DataError if none exist."""
    if not raw_dir.is_dir():
        raise DataError(f"data directory not found: {raw_dir} (expected <data_dir>/raw/<class>/<images>)")
    names, ignored = [], []
    for entry in os.scandir(raw_dir):
        (names if entry.is_dir() and not entry.name.startswith(".") else ignored).append(entry.name)
    if not names:
        raise DataError(f"no class directories in {raw_dir} (expected {raw_dir}/<class>/<images>)")
    raw_real = os.path.realpath(raw_dir)
    return sorted(names), {n for n in names if not is_inside(raw_real, raw_dir / n)}, ignored


def _inspect_all(
    raw_dir: Path, rels: list[str], max_pixels: int, use_cache: bool
) -> tuple[dict[str, dict[str, Any]], int, int]:
    """relpath -> manifest entry for each file, decoding only files whose stat key changed."""
    manifest_path = raw_dir.parent / MANIFEST_FILE
    old = _load_manifest(manifest_path, max_pixels) if use_cache else {}
    infos: dict[str, dict[str, Any]] = {}
    decoded = cached = 0
    for rel in rels:
        path = raw_dir.joinpath(*rel.split("/"))
        try:
            st = os.stat(path)
        except OSError as err:
            infos[rel] = {"key": None, "verdict": f"unreadable: {err.strerror or err}"}
            continue
        key = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        entry = old.get(rel)
        if _usable_entry(entry, key):
            cached += 1
        else:
            entry = {"key": key, **_inspect(path, max_pixels)}
            decoded += 1
        infos[rel] = entry
    if use_cache and (decoded or set(old) != set(infos)):
        data = {"version": MANIFEST_VERSION, "max_pixels": max_pixels, "files": infos}
        try:
            write_atomic(manifest_path, json.dumps(data, sort_keys=True).encode())
        except OSError as err:  # a read-only dataset still gets checked, just not cached
            log.debug("cannot write %s: %s", manifest_path, err)
    return infos, decoded, cached


def _usable_entry(entry: Any, key: list[int]) -> bool:
    """A manifest entry for this exact file state, with every field a later step reads."""
    if not isinstance(entry, dict) or entry.get("key") != key or "verdict" not in entry:
        return False
    if entry["verdict"] is not None:
        return isinstance(entry["verdict"], str)
    return isinstance(entry.get("sha256"), str) and "dhash" in entry and isinstance(entry.get("rgb"), list)


def _load_manifest(path: Path, max_pixels: int) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    ok = isinstance(data, dict) and data.get("version") == MANIFEST_VERSION and data.get("max_pixels") == max_pixels
    files = data.get("files") if ok else None
    return files if isinstance(files, dict) else {}


def _inspect(path: Path, max_pixels: int) -> dict[str, Any]:
    """Decode once (via images.verify) and fingerprint: verdict, sha256, dHash and mean colour."""
    seen: dict[str, Any] = {}

    def fingerprint(img: Image.Image) -> None:
        seen["dhash"], seen["rgb"] = perceptual_hash(img)

    verdict = images.verify(path, max_pixels, on_decoded=fingerprint)
    if verdict is not None:
        return {"verdict": verdict}
    return {"verdict": None, "sha256": _sha256(path), **seen}


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:  # streamed in chunks by hashlib itself
        return hashlib.file_digest(fh, "sha256").hexdigest()




# ---------------------------------------------------------------- findings


def _file_findings(report: CheckReport, files: dict[str, list[str]], escaped: set[str]) -> dict[str, list[str]]:
    """Per-class counts and bad/quarantined/empty findings; return class -> usable files."""
    bad, quarantined = report.bad, report.quarantined
    add_capped(report, "error", "class_outside_raw",
               [f"class directory '{n}' resolves outside {report.raw_dir} (symlink); move its images into raw/"
                for n in sorted(escaped)])
    # Every bad or quarantined file is listed, however many: that list is what the check is for.
    report.findings += [Finding("error", "bad_file", f"bad file {r}: {w}") for r, w in sorted(bad.items())
                        if r not in quarantined]
    report.findings += [Finding("info", "quarantined", f"quarantined {r}: {w}") for r, w in sorted(quarantined.items())]
    usable = report.usable
    for name, rels in files.items():
        usable[name] = [r for r in rels if r not in bad and r not in quarantined]
        report.classes[name] = ClassCounts(len(rels), sum(r in bad for r in rels),
                                           sum(r in quarantined for r in rels), len(usable[name]))
        if name in escaped:
            continue
        if not rels:
            report.findings.append(Finding("error", "empty_class", f"class directory '{name}' contains no image "
                                           "files; add images or remove the directory"))
        elif not usable[name]:
            report.findings.append(Finding("error", "empty_class", f"class '{name}' has no usable image "
                                           f"(all {len(rels)} are bad or quarantined)"))
    if report.ignored:
        report.findings.append(Finding("info", "ignored", f"ignored {len(report.ignored)} hidden or non-image "
                                       f"entries: {listing(report.ignored)}"))
    return usable


def _duplicates(report: CheckReport, usable: dict[str, list[str]], infos: dict[str, dict[str, Any]]) -> None:
    """Byte-identical usable files: across classes an error (label conflict), within a class an info."""
    by_hash: dict[str, list[str]] = {}
    for rels in usable.values():
        for rel in rels:
            by_hash.setdefault(infos[rel]["sha256"], []).append(rel)
    groups = sorted(sorted(g) for g in by_hash.values() if len(g) > 1)
    crosses = [len({r.split("/", 1)[0] for r in g}) > 1 for g in groups]
    cross = [g for g, c in zip(groups, crosses) if c]
    report.duplicate_groups = [g for g, c in zip(groups, crosses) if not c]
    add_capped(report, "error", "cross_class_duplicate",
               [f"identical bytes in different classes (label conflict): {' = '.join(g)}" for g in cross])
    add_capped(report, "info", "duplicate",
               [f"identical files in one class (split keeps them together): {' = '.join(g)}"
                for g in report.duplicate_groups])


def _imbalance(report: CheckReport, limit: float) -> None:
    counts = {n: c.usable for n, c in report.classes.items() if c.usable > 0}
    if len(counts) < 2:
        return
    big, small = max(counts, key=counts.get), min(counts, key=counts.get)  # type: ignore[arg-type]
    ratio = counts[big] / counts[small]
    report.imbalance_ratio = ratio
    if ratio > limit:
        report.findings.append(Finding(
            "warning", "imbalance",
            f"class imbalance: largest/smallest = {counts[big]}/{counts[small]} = {ratio:.1f} > {limit:g} "
            f"('{big}' vs '{small}'); consider training.class_weights: auto or data.sampler: balanced"))

