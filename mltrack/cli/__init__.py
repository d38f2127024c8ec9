"""Command-line interface: the ``mltrack`` click group and the guide's aliases (ml-split, ml-train, ml-search)."""
from mltrack.cli.main import cli, main, search_main, split_main, train_main

__all__ = ["cli", "main", "search_main", "split_main", "train_main"]
