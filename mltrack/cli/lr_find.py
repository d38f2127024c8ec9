"""``mltrack lr-find``: LR range test for a config; one call into :func:`mltrack.lr_find.run_lr_find`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from mltrack.cli.train import config_options, load_cli_config


@config_options
@click.command("lr-find")
@click.option("--fold", type=int, default=None, help="Fold whose train split is used (data.fold).")
@click.option("--start-lr", type=click.FloatRange(min=0.0, min_open=True), default=1e-7, show_default=True)
@click.option("--end-lr", type=click.FloatRange(min=0.0, min_open=True), default=10.0, show_default=True)
@click.option("--num-iter", type=click.IntRange(min=2), default=100, show_default=True,
              help="Optimizer steps of the sweep (the train loader is cycled).")
@click.option("--beta", type=click.FloatRange(min=0.0, max=1.0, max_open=True), default=0.98, show_default=True,
              help="Smoothing of the loss (exponential moving average).")
@click.option("--divergence", type=click.FloatRange(min=1.0, min_open=True), default=4.0, show_default=True,
              help="Stop once the smoothed loss exceeds this multiple of its minimum.")
def lr_find(config: Path | None, sets: tuple[str, ...], overrides: str | None, fold: int | None, start_lr: float,
            end_lr: float, num_iter: int, beta: float, divergence: float, **flags: Any) -> None:
    """LR range test: exponential LR sweep on a fresh model, smoothed loss, suggested LR at the steepest
    descent before divergence; plot, curve and suggestion logged to a new MLflow run."""
    cfg, _ = load_cli_config(config, sets, overrides, {**flags, "fold": fold})
    from mltrack.lr_find import run_lr_find

    result = run_lr_find(cfg, start_lr=start_lr, end_lr=end_lr, num_iter=num_iter, beta=beta, divergence=divergence)
    click.echo(f"steps: {len(result.lrs)}{' (stopped: loss diverged)' if result.diverged else ''}")
    if result.suggestion is None:
        click.echo("suggested lr: none (too few steps before divergence; lower --start-lr or raise --num-iter)")
    else:
        click.echo(f"suggested lr: {result.suggestion:.3e}   (train with --lr {result.suggestion:.2e})")
    click.echo(f"run id: {result.run_id}")
