"""``mltrack cv``: all folds of one config under one parent MLflow run; one call into :func:`mltrack.cv.run_cv`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from mltrack.cli.train import config_options, load_cli_config


def parse_folds(text: str | None) -> list[int] | None:
    """``"0,2"`` -> [0, 2]; None or "" -> None (every fold in splits/)."""
    if not text:
        return None
    try:
        folds = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated fold numbers such as 0,2; got '{text}'") from None
    if any(k < 0 for k in folds):
        raise click.BadParameter(f"fold numbers are >= 0; got '{text}'")
    return folds or None


@config_options
@click.command("cv")
@click.option("--folds", type=str, default=None, metavar="K,K,...",
              help="Folds to train, e.g. 0,2.  [default: every fold in <data_dir>/splits/]")
def cv(config: Path | None, sets: tuple[str, ...], overrides: str | None, folds: str | None, **flags: Any) -> None:
    """Cross-validate: one child run per fold under a parent run with mean/std/min/max of val and test
    metrics, a per-fold table and the soft-vote ensemble of the folds on the shared test set.

    Exit code 1 if any fold failed (the other folds still ran and the parent holds their results).
    """
    chosen = parse_folds(folds)
    cfg, explicit = load_cli_config(config, sets, overrides, flags)
    from mltrack.cv import run_cv
    from mltrack.tracking import tracking_uri

    result = run_cv(cfg, chosen, explicit)
    mean, std = result.aggregates.get("cv/test/acc_mean"), result.aggregates.get("cv/test/acc_std")
    lines = ["", f"cv run id:         {result.run_id}",
             f"test accuracy:     {mean:.4f} ± {std:.4f} over {int(result.aggregates['cv/n_folds'])} folds"
             if mean is not None and std is not None else "test accuracy:     n/a",
             f"ensemble test acc: {result.ensemble['ensemble/test/acc']:.4f}"
             if "ensemble/test/acc" in result.ensemble else "ensemble test acc: n/a",
             f"fold table:        {result.run_dir / 'cv' / 'folds.md'}",
             f"compare runs:      mlflow ui --backend-store-uri {tracking_uri()}"]
    click.echo("\n".join(lines))
    if result.failed:
        from mltrack.cli.main import print_error

        print_error(f"fold(s) {', '.join(map(str, result.failed))} failed; see the FAILED rows of the fold table")
        raise SystemExit(1)
