"""After fit: evaluate the best checkpoint on train/val/test, write reports, plots and summary, log them.

The test set is touched only here, once, with the weights that the validation metric selected.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from mltrack import checkpoint
from mltrack.console import get_logger
from mltrack.hooks import write_json
from mltrack.metrics import classification_report, confusion_matrix_figure
from mltrack.trainers.loop import FitContext, evaluate, split_metrics

log = get_logger()


def _eval_loader(ctx: FitContext, split: str, template: DataLoader) -> DataLoader:
    """A deterministic (eval-transform, unshuffled) loader over ``split``; train included for its report."""
    from mltrack.data.dataset import ImageListDataset
    from mltrack.data.index import read_index
    from mltrack.data.loaders import seed_worker
    from mltrack.data.transforms import build_transform

    data = ctx.cfg.data
    samples = read_index(Path(data.data_dir), split, data.fold)
    dataset = ImageListDataset(Path(data.data_dir) / "raw", samples,
                               build_transform(data.transforms, data.image_size, train=False), data.max_image_pixels)
    # Its own seeded generator: evaluation must not draw from the global RNG a resumed run restores.
    return DataLoader(dataset, batch_size=template.batch_size, shuffle=False, num_workers=template.num_workers,
                      pin_memory=template.pin_memory, worker_init_fn=seed_worker,
                      generator=torch.Generator().manual_seed(ctx.cfg.training.seed + 3))


def finalize(ctx: FitContext, run_dir: Path, tracker: Any, loaders: Any, resumed: bool = False) -> dict[str, float]:
    """Best weights -> reports for train/val/test, confusion plots, summary; returns ``test/*`` metrics.

    ``resumed``: the run may already hold ``test/*`` at this step (a FINISHED run extended, or a crash after
    they were logged); they are then not logged twice."""
    best = run_dir / "weights" / "best.pt"
    model = ctx.trainer.unwrap(ctx.model)
    if best.is_file():
        best_state = checkpoint.load(best)
        model.load_state_dict(best_state["model"])
        if best_state["progress"]["best_epoch"] != ctx.state.best_epoch:  # lineage check (see CheckpointHook)
            log.warning("best.pt holds epoch %s but the run's best epoch is %d; reports use best.pt",
                        best_state["progress"]["best_epoch"], ctx.state.best_epoch)
    splits = {"train": _eval_loader(ctx, "train", loaders.val), "val": ctx.loaders["val"],
              "test": ctx.loaders["test"]}
    results: dict[str, dict[str, float]] = {}
    for split, loader in splits.items():
        if loader is None:
            continue
        loss, cm = evaluate(ctx, loader, model)
        results[split] = split_metrics(split, loss, cm, ctx.class_names)
        if ctx.trainer.is_main_process:
            _write_report(run_dir, tracker, split, cm, ctx.class_names)
    test_metrics = results.get("test", {})
    if not ctx.trainer.is_main_process:
        return test_metrics
    step = max(ctx.state.best_epoch, 0)
    if not (resumed and step in tracker.metric_steps("test/loss")):  # one value per (key, step)
        tracker.log_metrics(test_metrics, step=step)
    summary = _summary(ctx, results)
    (run_dir / "summary.txt").write_text(summary)
    tracker.log_artifact(run_dir / "summary.txt")
    tracker.set_tags({"mltrack.best_epoch": str(ctx.state.best_epoch)})
    for line in summary.splitlines()[-4:]:
        log.info(line)
    if (run_dir / "tensorboard").is_dir():
        tracker.log_artifacts(run_dir / "tensorboard", "tensorboard")
    from mltrack.predict import log_model_for_run  # model/: the best weights as an MLflow pyfunc (DESIGN §4)

    log_model_for_run(run_dir, tracker, ctx.cfg, ctx.class_names)
    log_file = run_dir / "logs" / "train.log"
    if log_file.is_file():
        tracker.log_artifact(log_file, "logs")
    return test_metrics


def _write_report(run_dir: Path, tracker: Any, split: str, cm: torch.Tensor, class_names: list[str]) -> None:
    text, data = classification_report(cm, class_names)
    reports = run_dir / "reports"
    reports.mkdir(exist_ok=True)
    (reports / f"classification_report_{split}.txt").write_text(text)
    write_json(reports / f"classification_report_{split}.json", data)
    write_json(reports / f"confusion_matrix_{split}.json", {"classes": class_names, "matrix": cm.tolist()})
    tracker.log_artifacts(reports, "reports")
    if split in ("val", "test"):
        plots = run_dir / "plots"
        plots.mkdir(exist_ok=True)
        fig = confusion_matrix_figure(cm, class_names, f"{split} (best checkpoint)")
        fig.savefig(plots / f"confusion_matrix_{split}.png", dpi=100, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(fig)
        tracker.log_artifact(plots / f"confusion_matrix_{split}.png", "plots")


def _summary(ctx: FitContext, results: dict[str, dict[str, float]]) -> str:
    cfg, st = ctx.cfg, ctx.state
    lines = [
        f"mltrack training summary ({time.strftime('%Y-%m-%d %H:%M:%S')})",
        f"dataset: {cfg.data.dataset_name}  fold: {cfg.data.fold}  model: {cfg.model.architecture}  "
        f"trainer: {cfg.training.trainer_type}",
        f"epochs run: {st.epoch}/{cfg.training.num_epochs}  optimizer steps: {st.global_step}  "
        f"non-finite steps skipped: {st.nonfinite_steps}",
        f"best epoch: {st.best_epoch}  best {cfg.training.monitor}: {st.best_metric}",
    ]
    for split, m in results.items():
        lines.append(f"{split}: loss {m[f'{split}/loss']:.4f}  acc {m[f'{split}/acc']:.4f}  "
                     f"balanced acc {m[f'{split}/balanced_acc']:.4f}  F1 macro {m[f'{split}/f1_macro']:.4f}")
    return "\n".join(lines) + "\n"
