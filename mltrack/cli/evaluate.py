"""``mltrack evaluate``: re-evaluate a run from its MLflow artifacts (:func:`mltrack.evaluate.evaluate_run`)."""
from __future__ import annotations

import click


@click.command("evaluate")
@click.option("--run", "run_id", required=True, help="MLflow run id of a training (or fold/trial) run.")
@click.option("--split", type=click.Choice(["test", "val", "train"]), default="test", show_default=True,
              help="Which of the run's logged index files to evaluate.")
@click.option("--tta", is_flag=True, help="Test-time augmentation: average the image and its horizontal mirror.")
@click.option("--data-dir", type=str, default=None,
              help="Folder holding raw/<class>/... of the run's data.  [default: the run's data.data_dir, "
                   "resolved against the directory the run was started in, then the current one]")
@click.option("--device", type=str, default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")
@click.option("--batch-size", type=int, default=None, help="[default: the run's training.batch_size]")
@click.option("--num-workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="DataLoader worker processes decoding images.")
def evaluate(run_id: str, split: str, tta: bool, data_dir: str | None, device: str, batch_size: int | None,
             num_workers: int) -> None:
    """Rebuild a run's best model from its artifacts (config, class map, splits, best.pt) and log
    eval/<split>/* metrics, report and confusion matrix to that run, leaving its history untouched."""
    from mltrack.evaluate import evaluate_run

    result = evaluate_run(run_id, split, tta=tta, data_dir=data_dir, device=device, batch_size=batch_size,
                          num_workers=num_workers)
    m, p = result.metrics, result.prefix
    click.echo(f"{p}: acc {m[f'{p}/acc']:.4f}  balanced acc {m[f'{p}/balanced_acc']:.4f}  "
               f"F1 macro {m[f'{p}/f1_macro']:.4f}  loss {m[f'{p}/loss']:.4f}")
    click.echo(f"logged to run {result.run_id} (step {result.step}); images from {result.data_dir}")
