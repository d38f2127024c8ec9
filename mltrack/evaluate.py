"""``mltrack evaluate``: re-evaluate a run's best checkpoint from its MLflow artifacts alone.

What comes from the run: ``config.yaml``, ``class_map.json``, ``splits/*.txt`` (checked against the run's
``mltrack.split_digest`` tag) and ``weights/best.pt`` (sha256 manifest verified, weights-only load). What
cannot be an artifact is the images: the run's ``data.data_dir`` must be readable. It is found, in order,
as ``--data-dir``; ``data.data_dir`` when absolute; relative to the directory the run was started in (read
from its ``mltrack.run_dir`` tag and ``tracking.runs_dir``); relative to the current directory.

Results go to the same run under ``eval/<split>/…`` (``eval/<split>/tta/…`` with test-time augmentation),
metrics at step n for the n-th evaluation of that prefix; status, params and training metrics are not
touched. The scoring helpers here (:func:`score`, :func:`write_reports`) are shared with the CV ensemble.
"""
from __future__ import annotations

import csv
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from mltrack import checkpoint
from mltrack.config import RunConfig, validate
from mltrack.console import get_logger
from mltrack.errors import CheckpointError, DataError, UserError
from mltrack.serving import Prediction, Predictor, prob_column

log = get_logger()
_RUN_FILES = ("config.yaml", "class_map.json", "weights/best.pt", "weights/best.pt.sha256")


@dataclass
class RunBundle:
    """What a run's artifacts say about its best model (downloaded into ``workdir``)."""

    run_id: str
    info: dict[str, Any]
    cfg: RunConfig
    class_names: list[str]
    state: dict[str, Any]  # best.pt: verified, weights-only loaded
    splits_dir: Path  # the index files the run trained on


@dataclass
class EvalResult:
    run_id: str
    split: str
    prefix: str  # metric prefix: eval/<split> or eval/<split>/tta
    step: int
    metrics: dict[str, float]
    data_dir: Path


# ---------------------------------------------------------------- rebuilding a run


def _download(run_id: str, name: str, workdir: Path) -> Path:
    from mltrack.tracking import download_artifact

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file is noise
    try:
        return download_artifact(f"runs:/{run_id}/{name}", workdir)
    except CheckpointError as err:
        raise CheckpointError(f"run {run_id} has no usable artifact '{name}' ({err}); only a training run that "
                              "completed at least one epoch can be rebuilt") from None


def fetch_run(run_id: str, workdir: Path) -> RunBundle:
    """Download and check what rebuilding ``run_id``'s best model needs. CheckpointError/UserError if the
    run is missing, is not a training run, or its artifacts are incomplete or inconsistent."""
    from mltrack.data.splits import split_digest
    from mltrack.tracking import run_info

    info = run_info(run_id)
    role = info["tags"].get("mltrack.role", "")
    if role in ("cv", "study"):
        raise UserError(f"run {run_id} is a {role} run (a parent of training runs); evaluate one of its child runs "
                        "(search mlflow.parentRunId) or predict with its model: runs:/<id>/model")
    local = {name: _download(run_id, name, workdir / name.rsplit("/", 1)[0] if "/" in name else workdir)
             for name in _RUN_FILES}
    splits_dir = _download(run_id, "splits", workdir)
    cfg = validate(yaml.safe_load(local["config.yaml"].read_text()))
    mapping = json.loads(local["class_map.json"].read_text())
    class_names = [mapping[str(i)] for i in range(len(mapping))]
    state = checkpoint.load(local["weights/best.pt"])
    if list(state["class_map"]) != class_names:
        raise CheckpointError(f"run {run_id}: best.pt class map {state['class_map']} differs from class_map.json")
    recorded = info["tags"].get("mltrack.split_digest")
    actual = split_digest(splits_dir, cfg.data.fold)
    if recorded and recorded != actual:
        raise CheckpointError(f"run {run_id}: the logged split files do not match the run's split digest "
                              f"({actual[:12]}… vs tag {recorded[:12]}…); the artifacts were altered")
    return RunBundle(run_id, info, cfg, class_names, state, splits_dir)


def resolve_data_dir(cfg: RunConfig, info: dict[str, Any], override: str | Path | None = None) -> Path:
    """Where the run's images are (order in the module docstring); DataError listing the places tried."""
    if override is not None:
        candidates = [Path(override)]
    else:
        configured = Path(cfg.data.data_dir)
        candidates = [configured] if configured.is_absolute() else []
        run_dir = info["tags"].get("mltrack.run_dir")
        runs_dir = Path(cfg.tracking.runs_dir)
        if not configured.is_absolute() and run_dir and not runs_dir.is_absolute():
            depth = len(runs_dir.parts)  # run_dir = <start dir>/<runs_dir>/<run name>
            parents = Path(run_dir).parents
            if depth < len(parents):
                candidates.append(parents[depth] / configured)
        if not configured.is_absolute():
            candidates.append(Path.cwd() / configured)
    for candidate in candidates:
        if (candidate / "raw").is_dir():
            return candidate.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise DataError(f"the images of run {info['run_id']} were not found (data.data_dir '{cfg.data.data_dir}'; "
                    f"tried {tried}); pass --data-dir <folder holding raw/<class>/...>")


def split_samples(bundle: RunBundle, data_dir: Path, split: str, workdir: Path) -> list[tuple[str, int]]:
    """The run's logged index of ``split``, validated against ``data_dir/raw`` by the one path validator.

    A view directory joins the logged ``splits/`` to the real ``raw/`` (symlinks), so
    :func:`mltrack.data.index.read_index` checks every line exactly as training did.
    """
    from mltrack.data.index import class_names, read_index

    raw = data_dir / "raw"
    found = class_names(raw)
    if found != bundle.class_names:
        raise DataError(f"the class folders of {raw} ({found}) differ from run {bundle.run_id}'s class map "
                        f"({bundle.class_names}); point --data-dir at the data the run was trained on")
    view = workdir / "data_view"
    view.mkdir(exist_ok=True)
    for name, target in (("raw", raw.resolve()), ("splits", bundle.splits_dir.resolve())):
        link = view / name
        if not link.is_symlink():
            link.symlink_to(target, target_is_directory=True)
    return read_index(view, split, bundle.cfg.data.fold)


# ---------------------------------------------------------------- scoring and reports


def score(prediction: Prediction, targets: list[int], class_names: list[str], prefix: str
          ) -> tuple[dict[str, float], torch.Tensor]:
    """``<prefix>/loss|acc|balanced_acc|f1_macro|f1/<c>|recall/<c>`` and the confusion matrix.

    loss = mean negative log of the predicted probability of the true class (cross-entropy for one model).
    """
    from mltrack.metrics import confusion_matrix
    from mltrack.trainers.loop import split_metrics

    target = torch.tensor(targets, dtype=torch.long)
    log_probs = prediction.log_probs
    loss = float(-log_probs[torch.arange(len(targets)), target].mean()) if targets else float("nan")
    cm = confusion_matrix(log_probs.argmax(1), target, len(class_names))
    return split_metrics(prefix, loss, cm, class_names), cm


def write_reports(out_dir: Path, cm: torch.Tensor, class_names: list[str], title: str) -> list[Path]:
    """classification_report.txt/.json, confusion_matrix.json/.png in ``out_dir``; returns the paths."""
    from mltrack.hooks import write_json
    from mltrack.metrics import classification_report, confusion_matrix_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    text, data = classification_report(cm, class_names)
    (out_dir / "classification_report.txt").write_text(text)
    paths = [out_dir / "classification_report.txt",
             write_json(out_dir / "classification_report.json", data),
             write_json(out_dir / "confusion_matrix.json", {"classes": class_names, "matrix": cm.tolist()})]
    fig = confusion_matrix_figure(cm, class_names, title)
    fig.savefig(out_dir / "confusion_matrix.png", dpi=100, bbox_inches="tight")
    return paths + [out_dir / "confusion_matrix.png"]


def write_predictions(path: Path, rels: list[str], targets: list[int], prediction: Prediction,
                      class_names: list[str]) -> Path:
    """Per image: path (relative to raw/), true and predicted class, every class probability."""
    probs = prediction.probs
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "true", "pred"] + [prob_column(n) for n in class_names])
        for rel, target, row in zip(rels, targets, probs.tolist()):
            pred = max(range(len(row)), key=row.__getitem__)
            writer.writerow([rel, class_names[target], class_names[pred], *(repr(p) for p in row)])
    return path


# ---------------------------------------------------------------- the command's one call


def evaluate_run(run_id: str, split: str = "test", *, tta: bool = False, data_dir: str | Path | None = None,
                 device: str = "auto", batch_size: int | None = None, num_workers: int = 0) -> EvalResult:
    """Rebuild ``run_id``'s best model from its artifacts, score ``split`` (test|val|train) and log the
    metrics and reports to that run (see the module docstring). Returns what was logged."""
    from mltrack.run import resolve_device
    from mltrack.tracking import log_to_run, metric_history

    if split not in ("train", "val", "test"):
        raise UserError(f"--split must be train, val or test, got '{split}'")
    with tempfile.TemporaryDirectory(prefix="mltrack-eval-") as tmp:
        workdir = Path(tmp)
        bundle = fetch_run(run_id, workdir)
        images = resolve_data_dir(bundle.cfg, bundle.info, data_dir)
        samples = split_samples(bundle, images, split, workdir)
        if not samples:
            raise DataError(f"the {split} index of run {run_id} is empty: nothing to evaluate")
        predictor = Predictor.from_states([bundle.state], resolve_device(device))
        prediction = predictor.run([str(images / "raw" / rel) for rel, _ in samples],
                                   batch_size=batch_size or bundle.cfg.training.batch_size,
                                   num_workers=num_workers, tta=tta)
        prefix = f"eval/{split}/tta" if tta else f"eval/{split}"
        targets = [label for _, label in samples]
        metrics, cm = score(prediction, targets, bundle.class_names, prefix)
        out = workdir / "reports"
        write_reports(out, cm, bundle.class_names, f"{split} ({'TTA, ' if tta else ''}re-evaluated)")
        write_predictions(out / "predictions.csv", [rel for rel, _ in samples], targets, prediction,
                          bundle.class_names)
        step = len(metric_history(run_id, f"{prefix}/acc"))
        log_to_run(run_id, metrics, step, tags={"mltrack.eval_data_dir": str(images)}, artifacts=[(out, prefix)])
        wrapper = os.environ.get("MLFLOW_RUN_ID")
        if wrapper and wrapper != run_id:  # inside `mlflow run -e evaluate`: that run records what it did
            log_to_run(wrapper, metrics, 0, tags={"mltrack.role": "eval", "mltrack.evaluated_run": run_id})
    log.info("%s: acc %.4f  loss %.4f  F1 macro %.4f  (%d images, logged to run %s at step %d)", prefix,
             metrics[f"{prefix}/acc"], metrics[f"{prefix}/loss"], metrics[f"{prefix}/f1_macro"], len(samples),
             run_id, step)
    return EvalResult(run_id, split, prefix, step, metrics, images)
