"""Argument normalisation done once, before click parses: underscores in option names, empty values.

Why: the guide (``--num_epochs``) and ``mlflow run -P num_epochs=5`` (which forwards ``--num_epochs 5``
verbatim) spell options with underscores, while ``--help`` documents dashes. MLproject passes ``""``
for a parameter left at its default, meaning "take it from the config", so such options are dropped.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import click


def option_arity(command: click.Command | None) -> dict[str, bool]:
    """Map each long option of ``command`` (``--num-epochs``) to whether it takes a value."""
    arity: dict[str, bool] = {}
    if command is None:
        return arity
    for param in command.params:
        if isinstance(param, click.Option):
            takes_value = not (param.is_flag or param.count)
            for name in (*param.opts, *param.secondary_opts):
                if name.startswith("--"):
                    arity[name] = takes_value
    return arity


def dash_name(token: str) -> str:
    """``--foo_bar`` -> ``--foo-bar`` and ``--foo_bar=v_w`` -> ``--foo-bar=v_w`` (name part only)."""
    if not token.startswith("--") or token == "--":
        return token
    name, sep, value = token.partition("=")
    return name.replace("_", "-") + sep + value


def normalize_args(args: Sequence[str], arity: Mapping[str, bool]) -> list[str]:
    """Rewrite option names to dashes and drop options whose value is the empty string.

    ``arity`` (from :func:`option_arity`) says which known options take a value: the token after
    such an option is its value and is kept verbatim (``--run-name my_run``). An option not in
    ``arity`` followed by ``""`` is dropped too (it can only be an MLproject default); a known flag
    is never dropped. Everything after ``--`` is left alone.
    """
    out: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            out.extend(args[i:])
            break
        if not token.startswith("--"):
            out.append(token)
            i += 1
            continue
        name = dash_name(token)
        option, has_inline, inline_value = name.partition("=")
        if has_inline:
            if inline_value != "":
                out.append(name)
            i += 1
            continue
        takes_value = arity.get(option)
        has_next = i + 1 < len(args)
        if takes_value is not False and has_next and args[i + 1] == "":
            i += 2  # "--lr ''": fall back to the config
            continue
        out.append(option)
        if takes_value and has_next:
            out.append(args[i + 1])  # the option's value, verbatim even if it starts with "--"
            i += 2
            continue
        i += 1
    return out
