"""Class map and index files: the one place where a relative image path is checked before use.

An index line is a POSIX path relative to ``raw/`` (``cat/img_001.png``). :func:`validate_relpath` is the
single validator used by splitting, training, evaluation, inference and search. It works on the path
string and on ``os.path.realpath`` (which reads links, never file contents), so nothing outside
``realpath(raw/)`` is ever opened.
"""
from __future__ import annotations

import os
import re
from collections.abc import Collection, Iterator
from pathlib import Path, PurePosixPath

from mltrack.data.images import is_image_file
from mltrack.errors import DataError

SPLITS = ("train", "val", "test")
QUARANTINE_FILE = "quarantine.txt"  # <data_dir>/quarantine.txt, written by `mltrack check --quarantine`
MAX_LISTED_LINES = 50  # an error lists every bad line number, but explains at most this many
_PERCENT_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


def class_names(raw_dir: Path) -> list[str]:
    """Sorted class directory names under ``raw_dir`` (hidden ones ignored); label i = names[i].

    Raises DataError if ``raw_dir`` is missing, holds no class directory, or a class has no image file.
    """
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise DataError(
            f"data directory not found: {raw_dir} (expected <data_dir>/raw/<class>/...; run "
            "`mltrack demo-data` or point data.data_dir at your dataset)"
        )
    names = sorted(e.name for e in os.scandir(raw_dir) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise DataError(f"no class directories in {raw_dir} (expected {raw_dir}/<class>/<images>)")
    raw_real = os.path.realpath(raw_dir)
    skip = read_quarantine(raw_dir)
    # A class dir linked outside raw/ is listed (so its index lines fail with line numbers) but never walked.
    empty = [n for n in names if is_inside(raw_real, raw_dir / n) and not _has_image(raw_dir, n, skip)]
    if empty:
        shown = ", ".join(f"'{n}'" for n in empty)
        note = f"; files listed in {quarantine_path(raw_dir)} do not count" if skip else ""
        raise DataError(
            f"class director{'y' if len(empty) == 1 else 'ies'} {shown} in {raw_dir} contain no image files "
            f"(supported suffixes: .jpg .jpeg .png .bmp .gif .tif .tiff .webp{note}); add images or remove the "
            "directory"
        )
    return names


def quarantine_path(raw_dir: Path) -> Path:
    """``<data_dir>/quarantine.txt`` for ``raw_dir = <data_dir>/raw`` (beside raw/, like splits/)."""
    return Path(raw_dir).parent / QUARANTINE_FILE


def read_quarantine(raw_dir: Path) -> dict[str, str]:
    """Quarantined files: path relative to ``raw_dir`` -> reason; empty when there is no quarantine file.

    Format (written by :func:`mltrack.data.checks.write_quarantine`): one ``<relpath>\t<reason>`` per line,
    ``#`` comment and blank lines ignored. The paths are only compared with listed files, never opened.
    """
    path = quarantine_path(raw_dir)
    if not path.is_file():
        return {}
    out: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip() and not line.startswith("#"):
            rel, _, reason = line.partition("\t")
            out[rel] = reason
    return out


def is_inside(raw_real: str, path: str | os.PathLike[str]) -> bool:
    """True if ``path`` resolves (symlinks followed, nothing opened) strictly inside ``raw_real``."""
    real = os.path.realpath(path)
    return real != raw_real and os.path.commonpath([real, raw_real]) == raw_real


def _resolve(path: str, dir_cache: dict[str, str] | None) -> str:
    """``os.path.realpath(path)``; with a cache, the parent directory is resolved once for all its files.

    Equal to realpath because the last component is resolved separately when it is a link, and '..'
    components were refused before.
    """
    if dir_cache is None or os.path.islink(path):
        return os.path.realpath(path)
    head, tail = os.path.split(path)
    if head not in dir_cache:
        dir_cache[head] = os.path.realpath(head)
    return os.path.join(dir_cache[head], tail)


def _has_image(raw_dir: Path, class_name: str, skip: Collection[str]) -> bool:
    """True as soon as one image file not in ``skip`` is found under the class (stops early on large classes)."""
    top = Path(raw_dir) / class_name
    for root, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel_root = PurePosixPath(class_name, *Path(root).relative_to(top).parts)
        if any(is_image_file(f) and str(rel_root / f) not in skip for f in files):
            return True
    return False


def scan_class(raw_dir: Path, class_name: str) -> tuple[list[str], list[str]]:
    """(image files, ignored entries) under one class, as sorted POSIX paths relative to ``raw_dir``.

    Walks sub-directories, skipping hidden files and directories (listed as ignored, ``dir/`` for a
    directory, not descended); does not follow directory symlinks below the class directory (listed as
    ignored too). A linked class directory itself is walked; :func:`relpath_problem` confines its files.
    """
    top = Path(raw_dir) / class_name
    found: list[str] = []
    ignored: list[str] = []
    for root, dirs, files in os.walk(top):
        rel_root = PurePosixPath(class_name, *Path(root).relative_to(top).parts)
        skipped = [d for d in dirs if d.startswith(".") or os.path.islink(os.path.join(root, d))]
        ignored.extend(f"{rel_root / d}/" for d in skipped)
        dirs[:] = sorted(d for d in dirs if d not in skipped)
        for f in files:
            (found if is_image_file(f) else ignored).append(str(rel_root / f))
    return sorted(found), sorted(ignored)


def iter_class_images(raw_dir: Path, class_name: str, include_quarantined: bool = False) -> Iterator[str]:
    """Yield POSIX paths relative to ``raw_dir`` of the image files under one class, sorted.

    Same walk as :func:`scan_class`. Files listed in the quarantine file (:func:`read_quarantine`) are
    left out unless ``include_quarantined``, so splitting never sees them.
    """
    skip = {} if include_quarantined else read_quarantine(raw_dir)
    found, _ignored = scan_class(raw_dir, class_name)
    yield from (rel for rel in found if rel not in skip)


def relpath_problem(
    raw_real: str, classes: Collection[str], rel: str, dir_cache: dict[str, str] | None = None
) -> str | None:
    """Why ``rel`` is not a safe image path under ``raw_real`` (a realpath), or None if it is.

    Pure string checks come first; only then ``os.path.realpath``/``isfile`` (link reads and stat,
    no open) confirm the target stays inside ``raw_real`` and exists. ``dir_cache`` (directory ->
    its realpath, filled here) lets a caller validating many files resolve each directory once.
    """
    if not rel:
        return "empty path"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in rel):
        return "control character in path"
    if "\\" in rel:
        return "backslash in path (use '/' separators)"
    if _PERCENT_ESCAPE.search(rel):
        return "percent-encoded sequence in path"
    if "#" in rel:
        return "'#' in path"
    if rel.startswith("/") or _WINDOWS_DRIVE.match(rel):
        return "absolute path (must be relative to raw/)"
    parts = rel.split("/")
    if ".." in parts:
        return "'..' component in path"
    if any(p in ("", ".") for p in parts):
        return "empty or '.' component in path"
    if len(parts) < 2:
        return "expected <class>/<file>"
    if parts[0] not in classes:
        return f"class '{parts[0]}' is not a directory of raw/"
    if not is_image_file(parts[-1]):
        return "not an image file name (hidden or unsupported suffix)"
    real = os.path.join(raw_real, *parts)
    if not is_inside(raw_real, _resolve(real, dir_cache)):
        return "resolves outside raw/ (symlink)"
    if not os.path.isfile(real):
        return "file not found"
    return None


def validate_relpath(raw_dir: Path, rel: str) -> Path:
    """Return the resolved absolute path of index entry ``rel``; DataError if unsafe or missing.

    The class must be one of :func:`class_names` (``raw_dir``). For many lines at once use
    :func:`read_index`, which reports every bad line in one error.
    """
    raw_real = os.path.realpath(raw_dir)
    problem = relpath_problem(raw_real, frozenset(class_names(raw_dir)), rel)
    if problem:
        raise DataError(f"unsafe or invalid image path '{rel}' under {raw_dir}: {problem}")
    return Path(os.path.realpath(os.path.join(raw_real, *rel.split("/"))))


def index_path(data_dir: Path, split: str, fold: int) -> Path:
    """Where the index file of ``split`` (train|val|test) of ``fold`` lives under ``data_dir``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    name = "test.txt" if split == "test" else f"fold_{fold}_{split}.txt"
    return Path(data_dir) / "splits" / name


def read_index(data_dir: Path, split: str, fold: int) -> list[tuple[str, int]]:
    """Read and validate an index file into ``(path relative to raw/, label)`` pairs, in file order.

    Labels index :func:`class_names` of ``data_dir/raw``. Blank lines are ignored. Every invalid line
    (unsafe path, unknown class, missing file) is reported in one DataError with its line number.
    """
    data_dir = Path(data_dir)
    path = index_path(data_dir, split, fold)
    if not path.is_file():
        raise DataError(
            f"Index file not found: {path}\n"
            f"Generate splits first: ml-split --raw_data {data_dir / 'raw'} --folds 5"
        )
    names = class_names(data_dir / "raw")
    label_of = {n: i for i, n in enumerate(names)}
    raw_real = os.path.realpath(data_dir / "raw")
    quarantined = read_quarantine(data_dir / "raw")
    samples: list[tuple[str, int]] = []
    bad: list[tuple[int, str, str]] = []
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        for number, line in enumerate(fh, start=1):
            rel = line.rstrip("\r\n")
            if not rel.strip():
                continue
            problem = relpath_problem(raw_real, label_of.keys(), rel)
            if problem is None and rel in quarantined:
                problem = f"quarantined ({QUARANTINE_FILE}: {quarantined[rel]}); split again to drop it"
            if problem:
                bad.append((number, rel, problem))
            else:
                samples.append((rel, label_of[rel.split("/", 1)[0]]))
    if bad:
        raise DataError(_format_bad_lines(path, bad))
    return samples


def _format_bad_lines(path: Path, bad: list[tuple[int, str, str]]) -> str:
    numbers = ", ".join(str(n) for n, _, _ in bad)
    details = [f"  line {n}: {rel!r}: {why}" for n, rel, why in bad[:MAX_LISTED_LINES]]
    if len(bad) > MAX_LISTED_LINES:
        details.append(f"  … and {len(bad) - MAX_LISTED_LINES} more")
    return (
        f"index file {path} has {len(bad)} invalid line(s) (lines {numbers}):\n" + "\n".join(details) + "\n"
        "Each line must be <class>/<file> relative to raw/, inside raw/ after resolving symlinks; "
        "regenerate the splits with `mltrack split` or fix the listed lines."
    )
