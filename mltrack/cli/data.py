"""Dataset commands: ``demo-data`` (write the scikit-learn digits as images) and ``split`` (= ``ml-split``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click


@click.command("demo-data")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def demo_data(directory: Path) -> None:
    """Write the scikit-learn digits (8x8, 10 classes) as PNGs under DIRECTORY/raw/<class>/."""
    from mltrack.console import success
    from mltrack.data.demo import write_digits

    raw = write_digits(directory)
    success(f"demo dataset written to {raw}")
    click.echo(f"next: mltrack split --raw-data {raw} --folds 5")


@click.command("split")
@click.option(
    "--raw-data",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder with one sub-folder of images per class (raw/<class>/<images>).",
)
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True, help="Number of CV folds.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the index files go.  [default: splits/ beside the raw folder]",
)
@click.option(
    "--test-fraction",
    type=click.FloatRange(min=0.0, max=1.0, max_open=True),
    default=0.2,
    show_default=True,
    help="Share of each class held out as the test set shared by all folds.",
)
@click.option("--seed", type=int, default=42, show_default=True, help="Seed of the stratified shuffle.")
@click.option(
    "--allow-small-classes",
    is_flag=True,
    help="Keep classes with fewer images than folds (they appear in every fold's train set).",
)
@click.option("--max-pixels", type=click.IntRange(min=1), default=40_000_000, show_default=True,
              help="Decompression-bomb limit used by the dataset check that runs first.")
def split(
    raw_data: Path, folds: int, out: Path | None, test_fraction: float, seed: int, allow_small_classes: bool,
    max_pixels: int,
) -> None:
    """Write stratified k-fold index files (fold_<k>_train/val.txt) and one shared test.txt.

    The dataset check (``mltrack check``) runs first: bad files stop the split (exit 2) unless they are
    quarantined; afterwards the written files are checked for leakage and near-duplicates across splits.
    """
    from mltrack.console import success
    from mltrack.data.checks import check_dataset, failure_message, warning_lines
    from mltrack.data.splits import make_splits
    from mltrack.errors import DataError

    out_dir = out if out is not None else raw_data.parent / "splits"
    before = check_dataset(raw_data, None, max_pixels)
    if not before.ok:
        raise DataError(failure_message(before))
    shown = warning_lines(before)
    summary = make_splits(raw_data, out_dir, folds, test_fraction, seed, allow_small_classes)
    after = check_dataset(raw_data, out_dir, max_pixels)  # stats only: the manifest is fresh
    if not after.ok:
        raise DataError(failure_message(after))
    click.echo(format_split_summary(summary))
    for line in shown + [w for w in warning_lines(after) if w not in shown]:
        click.echo(f"warning: {line}")
    success(f"{summary.folds} folds written to {out_dir}")


def format_split_summary(summary: Any) -> str:
    """A table of a :class:`mltrack.data.splits.SplitSummary`: per-class counts and val size per fold."""
    width = max([5, *(len(name) for name in summary.per_class)])
    lines = [
        f"{summary.folds} folds: {summary.n_trainval} train+val images, {summary.n_test} test images"
        f" -> {summary.out_dir}",
        f"{'class':<{width}}  {'total':>6}  {'test':>5}  {'trainval':>8}  val per fold",
    ]
    for name, counts in summary.per_class.items():
        per_fold = " ".join(str(n) for n in summary.val_per_fold.get(name, []))
        lines.append(
            f"{name:<{width}}  {counts['total']:>6}  {counts['test']:>5}  {counts['trainval']:>8}  {per_fold}"
        )
    if summary.duplicate_groups:
        lines.append(f"identical files kept in one split: {len(summary.duplicate_groups)} groups")
    if summary.small_classes:
        lines.append(f"classes with fewer images than folds: {', '.join(summary.small_classes)}")
    lines.append(f"digest: {summary.digest}")
    return "\n".join(lines)
