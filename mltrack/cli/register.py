"""``mltrack register``: a run's logged model becomes a registry version with an alias."""
from __future__ import annotations

import click


@click.command("register")
@click.option("--run", "run_id", required=True, help="Run whose model/ to register (a training, fold or cv run).")
@click.option("--name", required=True, help="Registered model name (created if missing).")
@click.option("--alias", required=True, help="Alias to point at the new version, e.g. champion.")
@click.option("--artifact-path", default="model", show_default=True, help="Where the run holds the model.")
def register(run_id: str, name: str, alias: str, artifact_path: str) -> None:
    """Register runs:/<run>/model as a new version of NAME and set ALIAS on it (aliases, not stages).
    A cv run's model is the soft-vote ensemble of its folds and registers as one model."""
    from mltrack.console import success
    from mltrack.tracking import register_model, run_info

    role = run_info(run_id)["tags"].get("mltrack.role", "")
    info = register_model(run_id, name, alias, artifact_path, tags={"mltrack.role": role} if role else None)
    success(f"registered {info['name']} version {info['version']} (alias {info['alias']})")
    click.echo(f"load it with: mltrack predict --model {info['uri']} --input <image or folder>")
