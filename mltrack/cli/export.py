"""``mltrack export``: a run's best model as ONNX, checked against torch; one call into :mod:`mltrack.export`."""
from __future__ import annotations

from pathlib import Path

import click


@click.command("export")
@click.option("--run", "run_id", required=True, help="MLflow run id of a training (or fold/trial) run.")
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True)
@click.option("--data-dir", type=str, default=None,
              help="Folder holding raw/ of the run's data, for the parity check on test images "
                   "(resolved as for mltrack evaluate).")
@click.option("--tolerance", type=click.FloatRange(min=0.0, min_open=True), default=None,
              help="Largest max-abs logit difference ONNX vs torch that passes.  [default: 1e-4 (fp32)]")
@click.option("--opset", type=click.IntRange(min=7), default=None, help="ONNX opset.  [default: the exporter's]")
@click.option("--max-images", type=click.IntRange(min=1), default=64, show_default=True,
              help="Test images used for the parity check.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also keep the .onnx file here.")
def export(run_id: str, fmt: str, data_dir: str | None, tolerance: float | None, opset: int | None,
           max_images: int, output: Path | None) -> None:
    """Export the run's best checkpoint (dynamic batch, input 'image', output 'logits'), check it against
    torch on the run's test images, and log it as export/model.onnx only if the check passes."""
    from mltrack.console import success
    from mltrack.export import DEFAULT_TOLERANCE, export_onnx

    result = export_onnx(run_id, data_dir=data_dir, tolerance=tolerance or DEFAULT_TOLERANCE, opset=opset,
                         max_images=max_images, output=output)
    if not result.passed:
        from mltrack.cli.main import print_error

        print_error(f"ONNX export of run {run_id} rejected: max abs logit diff {result.max_abs_diff:.3e} exceeds "
                    f"the tolerance {result.tolerance:.0e}; no .onnx artifact was logged (the parity report was)")
        raise SystemExit(1)
    success(f"ONNX export of run {run_id} logged as {result.artifact} (max abs logit diff "
            f"{result.max_abs_diff:.2e} <= {result.tolerance:.0e} on {result.n_images} test images)")
