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
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageStat

from mltrack.console import get_logger
from mltrack.data import images
from mltrack.data.index import is_inside, quarantine_path, read_quarantine, relpath_problem, scan_class
from mltrack.errors import DataError

DEFAULT_MAX_PIXELS = 40_000_000  # = DataConfig.max_image_pixels default
MANIFEST_FILE = ".mltrack_check.json"
MANIFEST_VERSION = 1
IMBALANCE_WARN = 10.0  # largest / smallest class above this is a warning
NEAR_DUP_BITS = 5  # dHash bits (of 64) that may differ for a near-duplicate (a JPEG re-encode: ~0-3)
NEAR_DUP_COLOUR = 24  # and the mean colours may differ by at most this (0..255) per channel
NEAR_DUP_MAX_FILES = 20_000  # the all-pairs comparison is skipped above this (reported as info)
NEAR_DUP_MIN_SIDE = 16  # smaller images are not hashed: a 9x8 hash of 8x8 pixels only says "same shape"
MAX_LISTED = 20  # findings of one kind listed in a report before "… and N more"
_FOLD_FILE = re.compile(r"^fold_(\d+)_(train|val|test)\.txt$")
_HASH_CHUNK = 1 << 20

log = get_logger()


@dataclass(frozen=True)
class Finding:
    """One line of a report. ``level``: error (fails the check), warning or info; ``code`` is stable."""

    level: str
    code: str
    message: str

    def line(self) -> str:
        return f"{self.level.upper():<7} {self.message}"


@dataclass
class ClassCounts:
    images: int = 0  # image files found (hidden and non-image files are not counted)
    bad: int = 0  # failed the decode or path check
    quarantined: int = 0  # listed in quarantine.txt (bad or not)
    usable: int = 0  # what split/train see: images - (bad | quarantined)


@dataclass
class CheckReport:
    """The result of :func:`check_dataset`; ``ok`` is False when any finding is an error."""

    raw_dir: Path
    max_pixels: int
    classes: dict[str, ClassCounts]
    bad: dict[str, str]  # relpath -> reason, quarantined or not
    quarantined: dict[str, str]  # relpath -> reason, entries of quarantine.txt naming existing files
    ignored: list[str]
    duplicate_groups: list[list[str]]  # byte-identical usable files of one class
    near_duplicates: list[dict[str, Any]]  # {"a", "b", "distance", "kind"}
    findings: list[Finding]
    decoded: int  # files decoded by this check
    cached: int  # files answered from the manifest
    imbalance_ratio: float | None
    splits_dir: Path | None = None
    split_counts: dict[str, dict[str, int]] = field(default_factory=dict)  # "test", "fold_0_train" -> class -> n
    usable: dict[str, list[str]] = field(default_factory=dict)  # class -> files split/train see (sorted)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    @property
    def n_images(self) -> int:
        return sum(c.images for c in self.classes.values())

    def params(self) -> dict[str, Any]:
        """Counts as MLflow params ``data.check.*``."""
        ratio = "n/a" if self.imbalance_ratio is None else round(self.imbalance_ratio, 3)
        return {
            "data.check.images": self.n_images,
            "data.check.usable": sum(c.usable for c in self.classes.values()),
            "data.check.bad": len(self.bad),
            "data.check.quarantined": len(self.quarantined),
            "data.check.ignored": len(self.ignored),
            "data.check.duplicate_groups": len(self.duplicate_groups),
            "data.check.near_duplicates": len(self.near_duplicates),
            "data.check.imbalance_ratio": ratio,
            "data.check.warnings": len(self.warnings),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "raw_dir": str(self.raw_dir), "splits_dir": str(self.splits_dir) if self.splits_dir else None,
            "ok": self.ok, "max_pixels": self.max_pixels,
            "classes": {n: vars(c) for n, c in self.classes.items()},
            "bad": [{"path": p, "reason": r} for p, r in sorted(self.bad.items())],
            "quarantined": [{"path": p, "reason": r} for p, r in sorted(self.quarantined.items())],
            "ignored": self.ignored, "duplicate_groups": self.duplicate_groups,
            "near_duplicates": self.near_duplicates[:1000], "n_near_duplicates": len(self.near_duplicates),
            "imbalance_ratio": self.imbalance_ratio, "split_counts": self.split_counts,
            "findings": [vars(f) for f in self.findings],
            "decoded": self.decoded, "cached": self.cached, "params": self.params(),
        }

    def header(self) -> str:
        return (f"checked {self.n_images} images in {len(self.classes)} classes under {self.raw_dir} "
                f"({self.decoded} decoded, {self.cached} unchanged since the last check); "
                f"{len(self.ignored)} hidden or non-image entries ignored")

    def lines(self) -> list[str]:
        """The plain-text report: header, per-class table, findings (capped per kind), result."""
        width = max([5, *(len(n) for n in self.classes)])
        out = [self.header(), f"{'class':<{width}}  {'images':>6}  {'bad':>5}  {'quarantined':>11}  {'usable':>6}"]
        for name, c in self.classes.items():
            out.append(f"{name:<{width}}  {c.images:>6}  {c.bad:>5}  {c.quarantined:>11}  {c.usable:>6}")
        out.extend(f.line() for f in self.findings)
        n_err, n_warn = len(self.errors), len(self.warnings)
        out.append(f"result: {'OK' if self.ok else 'FAILED'} ({n_err} error(s), {n_warn} warning(s))")
        return out


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
    roles = _check_splits(report, names, present, usable, infos) if splits_dir is not None else {}
    _near_duplicates(report, usable, infos, roles)
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


def warning_lines(report: CheckReport, per_code: int = 3) -> list[str]:
    """The report's warnings, at most ``per_code`` of each kind plus a count of the rest (for consoles)."""
    out: list[str] = []
    by_code: dict[str, list[Finding]] = {}
    for finding in report.warnings:
        by_code.setdefault(finding.code, []).append(finding)
    for code, found in by_code.items():
        out.extend(f.message for f in found[:per_code] if not f.message.startswith("… and"))
        rest = sum(1 for f in report.near_duplicates if f["kind"] != "same") if code == "near_duplicate" else len(found)
        if rest > per_code:
            out.append(f"… and {rest - per_code} more {code.replace('_', '-')} warning(s) (full list: mltrack check)")
    return out


def failure_message(report: CheckReport) -> str:
    """A user error text: every error line (capped at 50) and how to fix or quarantine."""
    errors = report.errors
    shown = [f"  {f.message}" for f in errors[:50]]
    if len(errors) > 50:
        shown.append(f"  … and {len(errors) - 50} more")
    hint = ""
    if any(f.code == "bad_file" for f in errors):
        hint = (f"\nFix or remove the bad files, or exclude them: mltrack check --raw-data {report.raw_dir} "
                "--quarantine (then split again).")
    if any(f.code.startswith("leak") or f.code.startswith("split") for f in errors):
        hint += f"\nRegenerate the index files: mltrack split --raw-data {report.raw_dir}"
    return f"dataset check failed for {report.raw_dir}: {len(errors)} error(s):\n" + "\n".join(shown) + hint


def write_quarantine(raw_dir: Path, bad: dict[str, str]) -> Path:
    """Write ``<data_dir>/quarantine.txt`` listing exactly ``bad`` (relpath -> reason); return its path."""
    lines = ["# mltrack quarantine: split and train skip these files (path<TAB>reason).",
             "# Written by `mltrack check --quarantine`; delete this file to use them again."]
    lines += [f"{rel}\t{' '.join(why.split())}" for rel, why in sorted(bad.items())]
    path = quarantine_path(raw_dir)
    _write_atomic(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return path


def write_report(report: CheckReport, directory: Path) -> tuple[Path, Path]:
    """Write ``check_report.txt`` and ``check_report.json`` into ``directory`` (created); return both paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    txt, js = directory / "check_report.txt", directory / "check_report.json"
    txt.write_text("\n".join(report.lines()) + "\n", encoding="utf-8")
    js.write_text(json.dumps(report.to_json(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return txt, js


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
            _write_atomic(manifest_path, json.dumps(data, sort_keys=True).encode())
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
        seen["dhash"], seen["rgb"] = _perceptual(img)

    verdict = images.verify(path, max_pixels, on_decoded=fingerprint)
    if verdict is not None:
        return {"verdict": verdict}
    return {"verdict": None, "sha256": _sha256(path), **seen}


def _perceptual(img: Image.Image) -> tuple[str | None, list[int]]:
    """64-bit difference hash (9x8 grey, left < right neighbour) as hex (None below NEAR_DUP_MIN_SIDE px),
    and the mean RGB colour."""
    if min(img.size) < NEAR_DUP_MIN_SIDE:
        return None, []
    grey = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.BOX), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).ravel()
    mean = [int(round(v)) for v in ImageStat.Stat(img).mean[:3]]
    return np.packbits(bits).tobytes().hex(), mean


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# ---------------------------------------------------------------- findings


def _listing(items: list[str], limit: int = 10) -> str:
    """``a, b, c, …``: at most ``limit`` items of a long list."""
    return ", ".join(items[:limit]) + (", …" if len(items) > limit else "")


def _add_capped(report: CheckReport, level: str, code: str, messages: list[str]) -> None:
    for msg in messages[:MAX_LISTED]:
        report.findings.append(Finding(level, code, msg))
    if len(messages) > MAX_LISTED:
        report.findings.append(Finding(level, code, f"… and {len(messages) - MAX_LISTED} more ({code})"))


def _file_findings(report: CheckReport, files: dict[str, list[str]], escaped: set[str]) -> dict[str, list[str]]:
    """Per-class counts and bad/quarantined/empty findings; return class -> usable files."""
    bad, quarantined = report.bad, report.quarantined
    _add_capped(report, "error", "class_outside_raw",
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
                                       f"entries: {_listing(report.ignored)}"))
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
    _add_capped(report, "error", "cross_class_duplicate",
                [f"identical bytes in different classes (label conflict): {' = '.join(g)}" for g in cross])
    _add_capped(report, "info", "duplicate",
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
                                       f"{path.name}: {len(problems)} invalid line(s): {_listing(problems)}"))
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
                                       f"leak: {what} share {len(same)} path(s): {_listing(same)}"))
    by_hash: dict[str, list[str]] = {}
    for rel in set(b) - set(same):
        by_hash.setdefault(infos[rel]["sha256"], []).append(rel)
    pairs = [f"{x} = {y}" for x in sorted(set(a) - set(same)) for y in sorted(by_hash.get(infos[x]["sha256"], []))]
    if pairs:
        report.findings.append(Finding("error", "leak_content", f"leak: {what} share {len(pairs)} identical "
                                       f"image(s) by content: {_listing(pairs)}"))


def _check_splits(report: CheckReport, names: list[str], known: set[str], usable: dict[str, list[str]],
                  infos: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Leakage and coverage of the index files; return relpath -> role ("test" or "val <k>") for near-dups."""
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
        report.findings.append(Finding("error", "split_val", f"the folds' val sets do not cover the train pool: "
                                       f"{len(no_val)} image(s) in no val set: {_listing(no_val)}"))
    _split_counts(report, names, test, trains, vals)
    listed = set(test) | set(pool)
    unlisted = sorted(r for rels in usable.values() for r in rels if r not in listed)
    if unlisted:
        report.findings.append(Finding("warning", "split_unlisted", f"{len(unlisted)} usable image(s) are in no split "
                                       f"file (added after splitting?): {_listing(unlisted)}; split again to use them"))
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


def _near_duplicates(report: CheckReport, usable: dict[str, list[str]], infos: dict[str, dict[str, Any]],
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
    _add_capped(report, "warning", "near_duplicate", messages)
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
