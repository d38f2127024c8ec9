"""``mltrack predict``: classify an image or a folder into a CSV; one call into :mod:`mltrack.predict`."""
from __future__ import annotations

from pathlib import Path

import click


@click.command("predict")
@click.option("--model", required=True,
              help="runs:/<run_id>/model, models:/<name>@<alias>, a local model folder or a local best.pt")
@click.option("--input", "input_path", required=True, type=click.Path(path_type=Path),
              help="An image file or a folder (searched recursively).")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("preds.csv"),
              show_default=True, help="CSV to write: one row per image.")
@click.option("--top-k", type=click.IntRange(min=1), default=1, show_default=True,
              help="Also write the K most probable labels with their probabilities.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--device", type=str, default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")
@click.option("--num-workers", type=click.IntRange(min=0), default=None,
              help="Worker processes decoding images.  [default: 0 below 256 images, else up to 8]")
@click.option("--tta", is_flag=True, help="Average the image and its horizontal mirror.")
@click.option("--skip-bad", is_flag=True,
              help="Write unreadable images as rows with an error instead of stopping at the first one.")
def predict(model: str, input_path: Path, output: Path, top_k: int, batch_size: int, device: str,
            num_workers: int | None, tta: bool, skip_bad: bool) -> None:
    """Predict labels and class probabilities for images with a logged, registered or local model."""
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mltrack.console import progress, success
    from mltrack.data.loaders import resolve_num_workers
    from mltrack.predict import list_inputs, load_predictor, predict_to_csv
    from mltrack.run import resolve_device

    inputs = list_inputs(input_path)
    predictor = load_predictor(model, resolve_device(device))
    workers = num_workers if num_workers is not None else (0 if len(inputs) < 256 else resolve_num_workers(None))
    with progress(len(inputs), "predict") as advance:
        summary = predict_to_csv(predictor, inputs, output, top_k=top_k, batch_size=batch_size,
                                 num_workers=workers, tta=tta, skip_bad=skip_bad, advance=advance)
    bad = len(summary.errors)
    if bad:
        path, why = next(iter(summary.errors.items()))
        click.echo(f"{bad} unreadable image(s) written as rows with an error, e.g. {path}: {why}", err=True)
    success(f"{summary.n_images - bad} predictions written to {summary.output}")
