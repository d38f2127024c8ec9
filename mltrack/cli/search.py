"""``mltrack search`` (= ``ml-search``): an Optuna study whose trials are ``mltrack train`` runs.

Resolves the config like ``train`` (same options and ``--set``), reads the search space, then makes one
call into :func:`mltrack.search.run_search`. Hidden ``--worker <spec>``: the entry point of the worker
processes that ``--workers N`` starts (one call into :func:`mltrack.search.run_worker_from_spec`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import click

from mltrack.cli.train import config_options, load_cli_config
from mltrack.search_space import PRUNERS, SAMPLERS

SPACE_DIR = Path("configs/search")  # default space: configs/search/<dataset_name>.yaml when --space is absent


@config_options
@click.command("search")
@click.option("--space", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Search space YAML: dotted config key -> {type: float|int|categorical, low, high, log, step, "
                   "choices}.  [default: configs/search/<data.dataset_name>.yaml]")
@click.option("--n-trials", type=click.IntRange(min=1), default=20, show_default=True,
              help="Finished (complete or pruned) trials the study aims for, over all workers and runs.")
@click.option("--timeout", type=click.FloatRange(min=0), default=None,
              help="Seconds after which no new trial starts (running trials finish).")
@click.option("--study-name", type=str, default=None,
              help="Optuna study to create or join.  [default: <dataset>-<space file name>]")
@click.option("--storage", type=str, default=None, envvar="MLTRACK_SEARCH_STORAGE",
              help="Optuna storage: sqlite:///optuna.db (one worker), journal:./optuna.journal (processes of "
                   "one host) or postgresql://user:password@host/db (several hosts).  [default: sqlite:///optuna.db]")
@click.option("--sampler", type=click.Choice(SAMPLERS), default="tpe", show_default=True)
@click.option("--pruner", type=click.Choice(PRUNERS), default="median", show_default=True)
@click.option("--metric", type=str, default="val/acc", show_default=True,
              help="Epoch metric reported for pruning; a fold's value is its best epoch.")
@click.option("--direction", type=click.Choice(["maximize", "minimize"]), default="maximize", show_default=True)
@click.option("--folds", type=str, default=None,
              help="Comma-separated folds each trial trains (objective: their mean).  [default: data.fold]")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes on this host (needs a journal or PostgreSQL storage when > 1).")
@click.option("--retrain-best", is_flag=True, help="After the search, train the best config on the --folds.")
@click.option("--heartbeat-interval", type=click.IntRange(min=1), default=10, show_default=True,
              help="Seconds between trial heartbeats; a trial silent for 2x this + 5 s is failed and retried.")
@click.option("--pruner-startup-trials", type=click.IntRange(min=0), default=2, show_default=True,
              help="Trials to finish before the median/percentile pruner prunes.")
@click.option("--pruner-warmup-epochs", type=click.IntRange(min=0), default=0, show_default=True,
              help="Epochs of each trial the median/percentile pruner never prunes.")
@click.option("--pruner-percentile", type=click.FloatRange(0, 100), default=25.0, show_default=True,
              help="Percentile pruner: prune trials below this percentile of earlier trials.")
@click.option("--worker", "worker_spec", type=str, default=None, hidden=True)
@click.option("--worker-index", type=int, default=0, hidden=True)
def search(config: Optional[Path], sets: tuple[str, ...], overrides: Optional[str], space: Optional[Path],
           folds: Optional[str], storage: Optional[str], study_name: Optional[str], worker_spec: Optional[str],
           worker_index: int, **options: Any) -> None:
    """Hyper-parameter search: each trial is a train run with the trial's values, a child run of the study run.

    Re-running the same command joins the same study and continues it up to --n-trials. Inspect it in
    `mlflow ui` (the study run holds best_config.yaml and plots/) or with `optuna-dashboard <storage>`.
    """
    if worker_spec is not None:
        from mltrack.search import run_worker_from_spec

        run_worker_from_spec(worker_spec, worker_index)
        return
    from mltrack.config import CLI_FLAG_KEYS
    from mltrack.search_space import (DEFAULT_STORAGE, SearchOptions, default_study_name, load_space,
                                      parse_folds, print_summary)

    flags = {k: v for k, v in options.items() if k in CLI_FLAG_KEYS}
    cfg, _ = load_cli_config(config, sets, overrides, flags)
    space_path = space if space is not None else SPACE_DIR / f"{cfg.data.dataset_name}.yaml"
    opts = SearchOptions(
        space=load_space(space_path, cfg), space_path=str(space_path),
        study_name=study_name or default_study_name(cfg, space_path), storage=storage or DEFAULT_STORAGE,
        n_trials=options["n_trials"], timeout=options["timeout"], sampler=options["sampler"],
        pruner=options["pruner"], metric=options["metric"], direction=options["direction"],
        folds=parse_folds(folds, cfg.data.fold), workers=options["workers"], retrain_best=options["retrain_best"],
        seed=cfg.training.seed, heartbeat_s=options["heartbeat_interval"],
        pruner_startup_trials=options["pruner_startup_trials"], pruner_warmup_epochs=options["pruner_warmup_epochs"],
        pruner_percentile=options["pruner_percentile"])
    from mltrack.search import run_search

    print_summary(run_search(cfg, opts))
