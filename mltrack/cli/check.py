"""``mltrack check``: validate a dataset (every file decoded, duplicates, leakage, imbalance) before training."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

DEFAULT_MAX_PIXELS = 40_000_000  # = data.max_image_pixels default; kept here so --help needs no import


@click.command("check")
@click.option("--raw-data", required=True, type=click.Path(path_type=Path),
              help="Folder with one sub-folder of images per class (raw/<class>/<images>).")
@click.option("--splits", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Index-file folder to check for leakage (train/val/test overlap by path and content).")
@click.option("--quarantine", is_flag=True,
              help="Write <data_dir>/quarantine.txt listing exactly the bad files; split and train then skip them.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Decompression-bomb limit: largest width*height accepted, read from the header.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def check(raw_data: Path, splits: Path | None, quarantine: bool, max_pixels: int, as_json: bool) -> None:
    """Decode every image and report bad files, duplicates, leakage and imbalance (exit 2 on errors)."""
    from mltrack.data.checks import check_dataset
    from mltrack.data.index import quarantine_path
    from mltrack.errors import DataError

    report = check_dataset(raw_data, splits, max_pixels, quarantine)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        print_report(report)
        if quarantine:
            click.echo(f"quarantine: {len(report.bad)} file(s) listed in {quarantine_path(raw_data)}; split and "
                       "train skip them (delete the file to use them again)")
    if not report.ok:
        hint = "" if quarantine or not report.bad else "; exclude bad files with --quarantine"
        raise DataError(f"dataset check failed: {len(report.errors)} error(s) (listed above){hint}")


def print_report(report: Any) -> None:
    """A rich table of per-class counts, then one line per finding and the result line (stdout)."""
    from rich.console import Console
    from rich.table import Table

    lines = report.lines()
    click.echo(lines[0])
    table = Table(show_edge=False, header_style="bold")
    for title in ("class", "images", "bad", "quarantined", "usable"):
        table.add_column(title, justify="left" if title == "class" else "right")
    for name, counts in report.classes.items():
        bad = f"[red]{counts.bad}[/red]" if counts.bad > counts.quarantined else str(counts.bad)
        table.add_row(name, str(counts.images), bad, str(counts.quarantined), str(counts.usable))
    total = [sum(getattr(c, k) for c in report.classes.values()) for k in ("images", "bad", "quarantined", "usable")]
    table.add_row("[bold]total[/bold]", *(str(t) for t in total))
    Console(highlight=False, soft_wrap=True).print(table)
    for line in lines[2 + len(report.classes):]:  # findings and result; the plain table was replaced above
        click.echo(line)
