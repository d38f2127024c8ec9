"""The ``mltrack`` click group, its lazily loaded commands and the guide's console-script aliases.

Commands parse arguments, load the config and make one call into the core. Nothing here imports
torch or mlflow at module level, so ``mltrack --help`` answers quickly (a contract test checks).
User-caused errors (:class:`mltrack.errors.UserError`) end as ``error: <message>`` on stderr and
exit code 2; Ctrl-C ends with exit code 130.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Any, NoReturn, Sequence

import click

import mltrack
from mltrack.cli.args import normalize_args, option_arity
from mltrack.errors import UserError, user_message

# Subcommand name -> "module:attr" of its click command, imported only when the command is used or
# listed. To add a command, add one line here.
COMMANDS: dict[str, str] = {
    "demo-data": "mltrack.cli.data:demo_data",
    "split": "mltrack.cli.data:split",
    "check": "mltrack.cli.check:check",
    "train": "mltrack.cli.train:train",
    "cv": "mltrack.cli.cv:cv",
    "evaluate": "mltrack.cli.evaluate:evaluate",
    "predict": "mltrack.cli.predict:predict",
    "register": "mltrack.cli.register:register",
    "export": "mltrack.cli.export:export",
    "lr-find": "mltrack.cli.lr_find:lr_find",
    "search": "mltrack.cli.search:search",
    "sync": "mltrack.cli.sync:sync",
    "reconcile": "mltrack.cli.sync:reconcile",
}

EXIT_USER_ERROR = 2  # same code click uses for usage errors
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


def print_error(message: str) -> None:
    """Write ``error: <message>`` to stderr: red through rich on a terminal, plain text otherwise."""
    stream = sys.stderr
    is_tty = False
    try:
        is_tty = stream.isatty()
    except (AttributeError, ValueError):
        pass
    if is_tty:
        from rich.console import Console
        from rich.text import Text

        Console(stderr=True).print(Text("error: ", style="bold red") + Text(message), soft_wrap=True)
    else:
        click.echo(f"error: {message}", err=True)


class MltrackGroup(click.Group):
    """A click group that loads commands from :data:`COMMANDS` lazily and normalises arguments once."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(COMMANDS) | set(super().list_commands(ctx)))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module_name, _, attr = target.partition(":")
        command = getattr(importlib.import_module(module_name), attr)
        if not isinstance(command, click.Command):
            raise TypeError(f"{target} is not a click command")
        return command

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Normalise ``--foo_bar`` -> ``--foo-bar`` and drop ``--opt ""`` for the whole command line."""
        split = next((i for i, a in enumerate(args) if not a.startswith("-")), len(args))
        head = normalize_args(args[:split], option_arity(self))
        tail: list[str] = []
        if split < len(args):
            sub = self.get_command(ctx, args[split]) if args[split] in self.list_commands(ctx) else None
            tail = [args[split], *normalize_args(args[split + 1 :], option_arity(sub))]
        return super().parse_args(ctx, head + tail)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as err:
            print_error(user_message(err))
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:
            print_error("interrupted")
            ctx.exit(EXIT_INTERRUPTED)


@click.group(cls=MltrackGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(mltrack.__version__, prog_name="mltrack")
def cli() -> None:
    """mltrack: train image classifiers with MLflow as the system of record.

    Options are documented with dashes (--num-epochs); the same names with underscores in place
    of dashes are accepted too, as the old ml-train and `mlflow run -P` spell them. Set
    MLTRACK_LOG_LEVEL=DEBUG for more detail on the console.
    """
    from mltrack.console import setup_logging

    setup_logging(level=os.environ.get("MLTRACK_LOG_LEVEL", "INFO"))


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of the ``mltrack`` console script and ``python -m mltrack``; exits the process."""
    cli.main(args=list(sys.argv[1:] if argv is None else argv), prog_name="mltrack")
    raise SystemExit(0)  # cli.main exits itself in standalone mode; this line is for type checkers


def _alias(command: str, argv: Sequence[str] | None) -> NoReturn:
    # Prepending the subcommand (instead of calling the command object) keeps one parse path:
    # the group's normalisation and error handling apply to the aliases too.
    args = list(sys.argv[1:] if argv is None else argv)
    cli.main(args=[command, *args], prog_name="mltrack")
    raise SystemExit(0)


def split_main(argv: Sequence[str] | None = None) -> NoReturn:
    """``ml-split`` = ``mltrack split``."""
    _alias("split", argv)


def train_main(argv: Sequence[str] | None = None) -> NoReturn:
    """``ml-train`` = ``mltrack train``."""
    _alias("train", argv)


def search_main(argv: Sequence[str] | None = None) -> NoReturn:
    """``ml-search`` = ``mltrack search`` (available once the search command is registered)."""
    _alias("search", argv)
