"""Stratified, group-aware k-fold splits with one shared test set (the ``ml-split`` tool's core).

Output under ``out_dir`` (normally ``<data_dir>/splits``): ``test.txt`` shared by all folds, and for each
fold ``k`` ``fold_<k>_train.txt`` / ``fold_<k>_val.txt``, whose val sets partition the train pool. Lines are
POSIX paths relative to ``raw/``, sorted, one per line. ``split_info.json`` records parameters, counts and
digests. Byte-identical files are one *group* and always land in the same split; the same bytes under
two classes is an error. The result depends only on the files' paths and bytes and on
(seed, folds, test_fraction): no global RNG, no library whose algorithm may change.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from mltrack.data.index import class_names, is_inside, iter_class_images, relpath_problem
from mltrack.errors import ConfigError, DataError

_FOLD_FILE = re.compile(r"^fold_(\d+)_(train|val)\.txt$")


@dataclass(frozen=True)
class SplitSummary:
    """What :func:`make_splits` wrote. Counts are images (files), not content groups."""

    folds: int
    n_test: int
    n_trainval: int
    per_class: dict[str, dict[str, int]]  # class -> {"total", "test", "trainval"}
    val_per_fold: dict[str, list[int]]  # class -> images of that class in fold k's val set
    digest: str  # sha256 over every index file written (see _digest_files)
    out_dir: Path
    duplicate_groups: list[list[str]] = field(default_factory=list)  # same-class identical files, kept together
    small_classes: list[str] = field(default_factory=list)  # fewer distinct images than folds (allowed)


def make_splits(
    raw_dir: Path,
    out_dir: Path,
    folds: int = 5,
    test_fraction: float = 0.2,
    seed: int = 42,
    allow_small_classes: bool = False,
) -> SplitSummary:
    """Split the images under ``raw_dir`` into ``folds`` stratified folds plus a test set; write the index files.

    Per class, ``round(test_fraction * n)`` images go to test (fewer if needed so that at least two distinct
    images stay in the train pool); the pool's groups are dealt to folds so that each class's val count
    differs by at most one image between folds (exactly so when there are no duplicates). Files are
    written atomically; stale ``fold_<k>_*`` files with ``k >= folds`` are removed. A class with fewer
    (distinct) images than ``folds`` is refused unless ``allow_small_classes`` (it then still appears in
    the train set of every fold). Raises DataError / ConfigError with the fix in the message.
    """
    if folds < 2:
        raise ConfigError(f"--folds must be at least 2, got {folds}")
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"test fraction must be in [0, 1), got {test_fraction}")
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    names = class_names(raw_dir)
    files = _list_files(raw_dir, names)
    hashes = {rel: _sha256_file(raw_dir / rel) for rel_list in files.values() for rel in rel_list}
    groups = _content_groups(files, hashes)
    small = _check_class_sizes(files, groups, folds, allow_small_classes)

    test: list[str] = []
    val: list[list[str]] = [[] for _ in range(folds)]
    fold_totals = [0] * folds
    for name in names:
        class_test, pool_groups = _take_test(groups[name], test_fraction, seed, name)
        test.extend(class_test)
        for k, members in _deal_to_folds(pool_groups, fold_totals):
            val[k].extend(members)
    pool = sorted(rel for fold_val in val for rel in fold_val)
    _write_index_files(out_dir, sorted(test), [sorted(v) for v in val], pool)
    _self_check(out_dir, folds, hashes)
    summary = _summarise(out_dir, names, files, set(test), val, groups, small)
    params = {"folds": folds, "test_fraction": test_fraction, "seed": seed, "allow_small_classes": allow_small_classes}
    _write_info(out_dir, summary, params, names)
    return summary


def split_digest(splits_dir: Path, fold: int) -> str:
    """sha256 identifying fold ``fold``'s data: over fold_k_train.txt, fold_k_val.txt and test.txt.

    Each file contributes its name, its byte length and its bytes (so moving a line between files changes
    the digest). DataError if a file is missing.
    """
    splits_dir = Path(splits_dir)
    names = [f"fold_{fold}_train.txt", f"fold_{fold}_val.txt", "test.txt"]
    return _digest_files(splits_dir, names)


def _digest_files(splits_dir: Path, names: list[str]) -> str:
    h = hashlib.sha256()
    for name in names:
        path = splits_dir / name
        if not path.is_file():
            raise DataError(
                f"Index file not found: {path}\n"
                f"Generate splits first: ml-split --raw_data {splits_dir.parent / 'raw'} --folds 5"
            )
        data = path.read_bytes()
        h.update(name.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
    return h.hexdigest()


def _list_files(raw_dir: Path, names: list[str]) -> dict[str, list[str]]:
    """Class -> sorted image paths relative to raw/, each passed through the shared path validator."""
    raw_real = os.path.realpath(raw_dir)
    escaped = [name for name in names if not is_inside(raw_real, raw_dir / name)]
    if escaped:
        raise DataError(
            f"class director{'y' if len(escaped) == 1 else 'ies'} {', '.join(escaped)} in {raw_dir} resolve outside "
            f"{raw_dir} (symlink); move the images into raw/ or make raw/ itself the link"
        )
    files = {name: list(iter_class_images(raw_dir, name)) for name in names}
    bad = [
        f"  {rel}: {problem}"
        for rels in files.values()
        for rel in rels
        if (problem := relpath_problem(raw_real, names, rel))
    ]
    if bad:
        raise DataError(
            f"{len(bad)} file(s) under {raw_dir} cannot be listed in an index:\n" + "\n".join(bad) + "\n"
            "Rename them (no '#', '%XX', '\\') or replace symlinks that point outside raw/ with real files."
        )
    return files


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:  # streamed in chunks by hashlib itself
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _content_groups(files: dict[str, list[str]], hashes: dict[str, str]) -> dict[str, list[list[str]]]:
    """Class -> groups of byte-identical files (each group sorted). DataError on cross-class duplicates."""
    by_hash: dict[str, list[tuple[str, str]]] = {}
    for name, rels in files.items():
        for rel in rels:
            by_hash.setdefault(hashes[rel], []).append((name, rel))
    conflicts = [m for m in by_hash.values() if len({name for name, _ in m}) > 1]
    if conflicts:
        lines = [f"  {', '.join(rel for _, rel in sorted(m, key=lambda t: t[1]))}" for m in conflicts]
        raise DataError(
            f"{len(conflicts)} image(s) appear with identical bytes in different classes (label conflict):\n"
            + "\n".join(sorted(lines))
            + "\nKeep each image in exactly one class directory, then split again."
        )
    groups: dict[str, list[list[str]]] = {name: [] for name in files}
    for members in by_hash.values():
        groups[members[0][0]].append(sorted(rel for _, rel in members))
    return {name: sorted(g) for name, g in groups.items()}


def _check_class_sizes(
    files: dict[str, list[str]], groups: dict[str, list[list[str]]], folds: int, allow_small: bool
) -> list[str]:
    """Refuse classes that cannot be spread over ``folds``; return the small ones when allowed."""
    small, refused = [], []
    for name, rels in files.items():
        distinct = len(groups[name])
        if distinct >= folds:
            continue
        dup_note = f" ({distinct} distinct)" if distinct != len(rels) else ""
        if allow_small and distinct >= 2:
            small.append(name)
        elif allow_small:
            refused.append(
                f"class '{name}' has {len(rels)} image(s){dup_note}: at least 2 distinct images are needed "
                "so that it is in the train set of every fold; add images"
            )
        else:
            refused.append(
                f"class '{name}' has {len(rels)} images{dup_note} < {folds} folds; add images, lower --folds, "
                "or pass --allow-small-classes"
            )
    if refused:
        raise DataError("\n".join(refused))
    return small


def _take_test(
    class_groups: list[list[str]], test_fraction: float, seed: int, name: str
) -> tuple[list[str], list[list[str]]]:
    """Shuffle one class's groups (seeded per class) and take the test share; return (test files, pool groups)."""
    # A string seed is hashed with sha512 by random.Random: stable across Python versions and platforms.
    rng = random.Random(f"mltrack-split:{seed}:{name}")
    shuffled = list(class_groups)
    rng.shuffle(shuffled)
    total = sum(len(g) for g in shuffled)
    target = round(test_fraction * total)
    max_groups = max(0, len(shuffled) - 2)  # keep >= 2 distinct images in the pool: train of every fold
    test: list[str] = []
    taken = 0
    while taken < max_groups and len(test) < target:
        test.extend(shuffled[taken])
        taken += 1
    return test, shuffled[taken:]


def _deal_to_folds(pool_groups: list[list[str]], fold_totals: list[int]) -> list[tuple[int, list[str]]]:
    """Assign one class's pool groups to folds: largest groups first, each to the fold with the fewest
    images of this class (ties: fewest images overall, then lowest index). Updates ``fold_totals``."""
    per_class = [0] * len(fold_totals)
    out = []
    for members in sorted(pool_groups, key=len, reverse=True):  # stable: keeps the shuffled order
        k = min(range(len(fold_totals)), key=lambda f: (per_class[f], fold_totals[f], f))
        per_class[k] += len(members)
        fold_totals[k] += len(members)
        out.append((k, members))
    return out


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a same-directory temp file, fsync, rename: readers see the old or the new file, never half."""
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


def _lines(rels: list[str]) -> bytes:
    return "".join(f"{rel}\n" for rel in rels).encode("utf-8")


def _write_index_files(out_dir: Path, test: list[str], val: list[list[str]], pool: list[str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for k, fold_val in enumerate(val):
        held_out = set(fold_val)
        write_atomic(out_dir / f"fold_{k}_train.txt", _lines([r for r in pool if r not in held_out]))
        write_atomic(out_dir / f"fold_{k}_val.txt", _lines(fold_val))
    write_atomic(out_dir / "test.txt", _lines(test))
    for stale in out_dir.iterdir():  # folds of an earlier split with more folds would be silently reused
        match = _FOLD_FILE.match(stale.name)
        if match and int(match.group(1)) >= len(val):
            stale.unlink()


def _read_lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line]


def _self_check(out_dir: Path, folds: int, hashes: dict[str, str]) -> None:
    """Re-read what was written and assert the split invariants (a failure is a bug in this module)."""
    test = _read_lines(out_dir / "test.txt")
    test_hashes = {hashes[r] for r in test}
    vals = [_read_lines(out_dir / f"fold_{k}_val.txt") for k in range(folds)]
    pool = sorted(r for v in vals for r in v)
    problems = []
    if len(set(pool)) != len(pool):
        problems.append("a file is in the val set of two folds")
    for k in range(folds):
        train = _read_lines(out_dir / f"fold_{k}_train.txt")
        val_set, train_set = set(vals[k]), set(train)
        if val_set & train_set or sorted(train_set | val_set) != sorted(set(pool)):
            problems.append(f"fold {k}: train and val do not partition the train pool")
        if (train_set | val_set) & set(test):
            problems.append(f"fold {k}: shares paths with test")
        train_h, val_h = {hashes[r] for r in train}, {hashes[r] for r in vals[k]}
        if train_h & val_h or (train_h | val_h) & test_hashes:
            problems.append(f"fold {k}: identical content in two splits")
    if problems:
        raise RuntimeError("split self-check failed: " + "; ".join(problems))


def _summarise(
    out_dir: Path,
    names: list[str],
    files: dict[str, list[str]],
    test: set[str],
    val: list[list[str]],
    groups: dict[str, list[list[str]]],
    small: list[str],
) -> SplitSummary:
    per_class, val_per_fold = {}, {}
    for name in names:
        n_test = sum(1 for rel in files[name] if rel in test)
        per_class[name] = {"total": len(files[name]), "test": n_test, "trainval": len(files[name]) - n_test}
        prefix = name + "/"
        val_per_fold[name] = [sum(1 for rel in fold_val if rel.startswith(prefix)) for fold_val in val]
    digest_names = ["test.txt"] + [f"fold_{k}_{s}.txt" for k in range(len(val)) for s in ("train", "val")]
    return SplitSummary(
        folds=len(val),
        n_test=len(test),
        n_trainval=sum(len(v) for v in val),
        per_class=per_class,
        val_per_fold=val_per_fold,
        digest=_digest_files(out_dir, digest_names),
        out_dir=out_dir,
        duplicate_groups=sorted(g for gs in groups.values() for g in gs if len(g) > 1),
        small_classes=small,
    )


def _write_info(out_dir: Path, summary: SplitSummary, params: dict[str, object], names: list[str]) -> None:
    info = {
        "params": params,
        "classes": names,
        "n_test": summary.n_test,
        "n_trainval": summary.n_trainval,
        "per_class": summary.per_class,
        "val_per_fold": summary.val_per_fold,
        "duplicate_groups": summary.duplicate_groups,
        "small_classes": summary.small_classes,
        "fold_digests": [split_digest(out_dir, k) for k in range(summary.folds)],
        "digest": summary.digest,
    }
    write_atomic(out_dir / "split_info.json", (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())
