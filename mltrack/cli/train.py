"""``mltrack train`` (= ``ml-train``): resolve the config, then one call into :func:`mltrack.run.train`."""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import click

DEFAULT_CONFIG = Path("configs/digits.yaml")  # used when --config is absent and this file exists in cwd


def resolve_config_path(config: Path | None) -> Path | None:
    """The YAML to load: ``--config`` if given, else ``configs/digits.yaml`` if present, else None (defaults)."""
    if config is not None:
        return config
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def collect_overrides(overrides: str | None, sets: tuple[str, ...]) -> list[str]:
    """``--overrides "a=1 b=2"`` items first, then ``--set`` items, so a ``--set`` wins over both.

    The ``--overrides`` string is split like a shell would (quotes keep spaces in a value).
    """
    items: list[str] = []
    if overrides:
        try:
            items.extend(shlex.split(overrides))
        except ValueError as err:
            from mltrack.errors import ConfigError

            raise ConfigError(f"--overrides '{overrides}' cannot be split into key=value items: {err}") from None
    items.extend(sets)
    return items


@click.command("train")
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Run config YAML.  [default: configs/digits.yaml if present, else built-in defaults]")
@click.option("--fold", type=int, default=None, help="Cross-validation fold to train (data.fold).")
@click.option("--num-epochs", type=int, default=None, help="training.num_epochs")
@click.option("--batch-size", type=int, default=None, help="training.batch_size")
@click.option("--lr", type=float, default=None, help="optimizer.lr")
@click.option("--device", type=str, default=None, help="training.device: auto, cpu, cuda or cuda:N")
@click.option("--num-workers", type=int, default=None, help="data.num_workers (DataLoader worker processes)")
@click.option("--data-dir", type=str, default=None, help="data.data_dir (holds raw/ and splits/)")
@click.option("--trainer-type", type=str, default=None,
              help="training.trainer_type: standard, mixed_precision, accelerate or dp")
@click.option("--architecture", type=str, default=None, help="model.architecture (a MODELS registry name)")
@click.option("--run-name", type=str, default=None, help="tracking.run_name")
@click.option("--resume", type=str, default=None,
              help="Checkpoint to resume into its own run: a local path, runs:/<run_id>/weights/last.pt, "
                   "mlflow-artifacts:/… or models:/<name>@<alias> (that model's training run).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override any config key (dotted, value read as YAML); repeatable.")
@click.option("--overrides", type=str, default=None, metavar='"K=V K2=V2"',
              help="Several KEY=VALUE overrides in one string (what MLproject passes).")
@click.option("--allow-config-change", is_flag=True,
              help="On resume, accept config changes beyond --num-epochs (recorded as mltrack.param_drift).")
@click.option("--fallback-previous", is_flag=True,
              help="On resume, if the checkpoint fails verification (checksum, truncation), resume from prev.pt "
                   "beside it (the previous epoch's last.pt); tagged mltrack.resume_fallback.")
@click.option("--print-config", is_flag=True, help="Print the resolved config as YAML and exit without training.")
def train(config: Path | None, resume: str | None, sets: tuple[str, ...], overrides: str | None,
          print_config: bool, allow_config_change: bool, fallback_previous: bool, **flags: Any) -> None:
    """Train one fold. Precedence: flag > --set/--overrides > --config YAML > defaults."""
    from mltrack.config import CLI_FLAG_KEYS, load_config, to_yaml
    from mltrack.console import get_logger

    path = resolve_config_path(config)
    cli_values = {name: value for name, value in flags.items() if name in CLI_FLAG_KEYS}
    items = collect_overrides(overrides, sets)
    point = None
    if resume and not print_config:
        # On resume the checkpoint's own config is the base: only what was typed now may change it.
        from mltrack.resume import open_resume, resume_config

        point = open_resume(resume, fallback_previous)
        cfg = resume_config(point, items, cli_values, allow_config_change)
    else:
        cfg = load_config(path, items, cli_values)
    if print_config:
        # Inputs that are not config keys go first as YAML comments, so the output stays valid YAML.
        click.echo(f"# config: {path if path is not None else '(built-in defaults)'}")
        if resume:
            click.echo(f"# resume: {resume}")
        click.echo(to_yaml(cfg), nl=False)
        return
    get_logger().info("config: %s", f"resumed from {resume}" if point else (path or "built-in defaults"))
    from mltrack.config import CLI_FLAG_KEYS as keys, parse_override
    from mltrack.run import print_final, train as run_train
    from mltrack.trainers.loop import NonFiniteLossError

    # What the user set explicitly names the run folder (the guide's hymenoptera_batch_32_fold_0).
    explicit = dict(parse_override(item) for item in items)
    explicit.update({keys[k]: v for k, v in cli_values.items() if v is not None})
    try:
        result = run_train(cfg, resume=point, explicit=explicit)
    except NonFiniteLossError as err:
        from mltrack.cli.main import print_error

        print_error(f"training stopped: {err}")
        raise SystemExit(1) from None
    print_final(result)


# Options of ``train`` that build a RunConfig; ``cv`` and ``lr-find`` take the same ones (not --fold/--resume).
CONFIG_OPTION_NAMES = ("config", "num_epochs", "batch_size", "lr", "device", "num_workers", "data_dir",
                       "trainer_type", "architecture", "run_name", "sets", "overrides")


def config_options(command: click.Command) -> click.Command:
    """Give ``command`` train's config options (the same Option objects, so names, help and parsing match).
    Apply it above ``@click.command``; the options come first in ``--help``."""
    command.params[:0] = [p for p in train.params if p.name in CONFIG_OPTION_NAMES]
    return command


def load_cli_config(config: Path | None, sets: tuple[str, ...], overrides: str | None,
                    flags: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(RunConfig, explicit dotted keys the user set) from the values of :func:`config_options` options,
    with train's precedence: flag > --set/--overrides > --config YAML > defaults."""
    from mltrack.config import CLI_FLAG_KEYS, load_config, parse_override

    cli_values = {name: value for name, value in flags.items() if name in CLI_FLAG_KEYS}
    items = collect_overrides(overrides, sets)
    cfg = load_config(resolve_config_path(config), items, cli_values)
    explicit = dict(parse_override(item) for item in items)
    explicit.update({CLI_FLAG_KEYS[k]: v for k, v in cli_values.items() if v is not None})
    return cfg, explicit
