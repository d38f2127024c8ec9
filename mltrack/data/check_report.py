"""The result of a dataset check (:mod:`mltrack.data.checks`) and its text, JSON and console forms.

:class:`CheckReport` holds the counts and the findings; the check modules append findings to it through
:func:`add_capped` and :func:`listing`, which keep a report readable on a dataset with thousands of hits.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_LISTED = 20  # findings of one kind listed in a report before "… and N more"


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


# ---------------------------------------------------------------- building findings


def listing(items: list[str], limit: int = 10) -> str:
    """``a, b, c, …``: at most ``limit`` items of a long list."""
    return ", ".join(items[:limit]) + (", …" if len(items) > limit else "")


def add_capped(report: CheckReport, level: str, code: str, messages: list[str]) -> None:
    """Append one finding per message, the first :data:`MAX_LISTED` only, then one "… and N more" finding."""
    for msg in messages[:MAX_LISTED]:
        report.findings.append(Finding(level, code, msg))
    if len(messages) > MAX_LISTED:
        report.findings.append(Finding(level, code, f"… and {len(messages) - MAX_LISTED} more ({code})"))


# ---------------------------------------------------------------- output


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


def write_report(report: CheckReport, directory: Path) -> tuple[Path, Path]:
    """Write ``check_report.txt`` and ``check_report.json`` into ``directory`` (created); return both paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    txt, js = directory / "check_report.txt", directory / "check_report.json"
    txt.write_text("\n".join(report.lines()) + "\n", encoding="utf-8")
    js.write_text(json.dumps(report.to_json(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return txt, js
