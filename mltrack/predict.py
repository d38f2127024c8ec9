"""The model as a product: package trained weights as an MLflow pyfunc (``model/``), load a model from a
run, the registry or a file, and batch-predict a folder of images into a CSV.

Packaging happens at the end of every training run (:func:`log_model_for_run`, called by
``report.finalize``) and of every CV run (the ensemble of its folds); both go through
:func:`package_model`, so a fold's ``model/`` and a CV run's ``model/`` load the same way.
"""
from __future__ import annotations

import csv
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable

import torch

from mltrack import checkpoint
from mltrack.config import RunConfig
from mltrack.console import get_logger
from mltrack.errors import CheckpointError, DataError
from mltrack.serving import (IMAGE_COLUMN, LABEL_COLUMN, MODEL_DIR_NAME, Predictor, data_uri, prob_column,
                             write_model_dir)

log = get_logger()
# What mltrack.serving imports at run time; pinned to the versions that trained the model.
_SERVING_PACKAGES = ("mlflow", "torch", "torchvision", "pillow", "numpy", "pandas", "pydantic", "pyyaml")
MODEL_ARTIFACT = "model"


# ---------------------------------------------------------------- packaging


def serving_requirements(cfg: RunConfig) -> list[str]:
    """pip requirements of a packaged model: the installed versions of what serving imports (+ opacus
    for dp-trained models, whose layers are rebuilt with its validator)."""
    names = list(_SERVING_PACKAGES) + (["opacus"] if cfg.training.trainer_type == "dp" else [])
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


def package_model(dst: Path, states: list[dict[str, Any]], members: list[dict[str, Any]],
                  example: Path | None) -> Path:
    """Write an MLflow pyfunc model directory at ``dst`` (replaced if present) holding ``states``' weights.

    ``members[i]`` (``name``, ``run_id``, ``fold``) describes ``states[i]``; several members make a
    soft-vote ensemble. The image at ``example`` becomes the input example as a small PNG data URI (valid on any
    host, unlike a path). The ``mltrack`` package is copied into the model so it loads without mltrack
    installed. Returns ``dst``.
    """
    import pandas as pd

    from mltrack.config import validate
    from mltrack.tracking import save_pyfunc_model

    cfg = validate(states[0]["config"])
    names = list(states[0]["class_map"])
    if dst.exists():
        shutil.rmtree(dst)
    with tempfile.TemporaryDirectory(prefix="mltrack-model-") as tmp:
        data_dir = write_model_dir(Path(tmp) / MODEL_DIR_NAME, states, members)
        frame = None
        if example is not None:
            uri = data_uri(example, cfg.data.image_size, cfg.data.max_image_pixels)
            frame = pd.DataFrame({IMAGE_COLUMN: [uri]})
        outputs = [(LABEL_COLUMN, "string")] + [(prob_column(n), "double") for n in names]
        save_pyfunc_model(dst, data_dir, frame, IMAGE_COLUMN, outputs, Path(__file__).resolve().parent,
                          serving_requirements(cfg))
    _drop_bytecode(dst)
    return dst


def _drop_bytecode(model_dir: Path) -> None:
    # The copied package may carry __pycache__ from this interpreter: useless elsewhere, and not source.
    for cache in list(model_dir.rglob("__pycache__")):
        shutil.rmtree(cache, ignore_errors=True)


def log_model_for_run(run_dir: Path, tracker: Any, cfg: RunConfig, class_names: list[str]) -> None:
    """Package ``<run_dir>/weights/best.pt`` as ``<run_dir>/model/`` and queue it as the run's ``model/``
    artifact. Called once at the end of training (main process). A failure here must not fail a run whose
    training succeeded: it is logged as a warning and recorded as tag ``mltrack.model_error``. Nothing is
    packaged with ``tracking.log_model: false``."""
    if not cfg.tracking.log_model:
        return
    best = run_dir / "weights" / "best.pt"
    if not best.is_file():
        log.warning("no best.pt in %s: no model/ logged (no epoch improved %s)", run_dir, cfg.training.monitor)
        return
    try:
        state = checkpoint.load(best)
        if list(state["class_map"]) != list(class_names):
            raise CheckpointError(f"best.pt class map {state['class_map']} differs from the run's {class_names}")
        dst = package_model(run_dir / MODEL_ARTIFACT, [state],
                            [{"name": "best", "run_id": tracker.run_id, "fold": cfg.data.fold}],
                            example_image(cfg))
        tracker.log_artifacts(dst, MODEL_ARTIFACT)
    except Exception as err:  # noqa: BLE001 - see docstring: training results are kept either way
        log.warning("could not log the pyfunc model of %s: %s", run_dir, err)
        tracker.set_tags({"mltrack.model_error": f"{type(err).__name__}: {err}"[:500]})


def example_image(cfg: RunConfig) -> Path | None:
    """The first test image of the run's data (already validated by training), for the input example."""
    from mltrack.data.index import read_index

    data_dir = Path(cfg.data.data_dir)
    try:
        samples = read_index(data_dir, "test", cfg.data.fold)
    except DataError:
        return None
    return data_dir / "raw" / samples[0][0] if samples else None


# ---------------------------------------------------------------- loading


def load_predictor(model: str, device: torch.device | str = "cpu", workdir: Path | None = None) -> Predictor:
    """A Predictor from ``model``: ``runs:/<id>/model``, ``models:/<name>@<alias>`` (or ``/<version>``), any
    MLflow artifact URI of a model, a local model directory, or a local mltrack checkpoint (``best.pt``,
    verified against its ``.sha256`` manifest). Raises CheckpointError if nothing usable is there."""
    local = Path(model)
    if not local.exists():
        from mltrack.tracking import download_artifact

        if "://" not in model and not model.startswith(("runs:", "models:", "mlflow-artifacts:")):
            raise CheckpointError(f"model not found: {model} (give a local file/folder, runs:/<run_id>/model or "
                                  "models:/<name>@<alias>)")
        workdir = workdir or Path(tempfile.mkdtemp(prefix="mltrack-predict-"))
        local = download_artifact(model, workdir)
        if local.is_file():  # a checkpoint URI: its manifest lies next to it in the artifact store
            try:
                download_artifact(model + checkpoint.MANIFEST_SUFFIX, local.parent)
            except CheckpointError:
                pass  # checkpoint.load names the missing manifest
    if local.is_file():
        return Predictor.from_checkpoint(local, device)
    return Predictor.from_model_dir(local, device)


# ---------------------------------------------------------------- batch prediction


@dataclass
class PredictSummary:
    output: Path
    n_images: int
    errors: dict[str, str] = field(default_factory=dict)  # input path -> why it could not be read


def list_inputs(path: Path) -> list[Path]:
    """``path`` itself if it is a file, else every image file below it (recursive, hidden skipped), sorted."""
    from mltrack.data.images import is_image_file

    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"input not found: {path} (give an image file or a folder of images)")
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(Path(root) / f for f in files if is_image_file(f))
    if not found:
        raise DataError(f"no image files under {path} (suffixes .jpg .jpeg .png .bmp .gif .tif .tiff .webp)")
    return sorted(found)


def predict_to_csv(predictor: Predictor, inputs: list[Path], output: Path, *, top_k: int = 1, batch_size: int = 64,
                   num_workers: int = 0, tta: bool = False, skip_bad: bool = False,
                   advance: Callable[..., None] | None = None) -> PredictSummary:
    """Classify ``inputs`` and write ``output`` (CSV, written atomically): one row per image with ``path``,
    ``label``, ``top<k>_label``/``top<k>_prob`` for k <= ``top_k`` and ``prob_<class>`` for every class
    (each row sums to 1). With ``skip_bad`` unreadable images get an ``error`` and empty predictions."""
    if not 1 <= top_k <= predictor.num_classes:
        raise DataError(f"--top-k must be between 1 and the number of classes ({predictor.num_classes}), got {top_k}")
    prediction = predictor.run([str(p) for p in inputs], batch_size=batch_size, num_workers=num_workers, tta=tta,
                               skip_bad=skip_bad, advance=advance)
    probs = prediction.probs
    values, indices = probs.nan_to_num(-1.0).topk(top_k, dim=1)
    header = ["path", LABEL_COLUMN] + [f"top{k}_{w}" for k in range(1, top_k + 1) for w in ("label", "prob")]
    header += [prob_column(n) for n in predictor.class_names] + (["error"] if skip_bad else [])
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for i, path in enumerate(inputs):
            writer.writerow(_row(str(path), prediction.errors[i], predictor.class_names, probs[i], values[i],
                                 indices[i], skip_bad))
    os.replace(tmp, output)
    errors = {str(p): e for p, e in zip(inputs, prediction.errors) if e}
    return PredictSummary(output, len(inputs), errors)


def _row(path: str, error: str, names: list[str], probs: torch.Tensor, top_values: torch.Tensor,
         top_indices: torch.Tensor, with_error: bool) -> list[Any]:
    if error:
        blanks = [""] * (1 + 2 * len(top_values) + len(names))
        return [path, *blanks, error]
    top = [x for v, i in zip(top_values.tolist(), top_indices.tolist()) for x in (names[i], repr(v))]
    row = [path, names[int(top_indices[0])], *top, *(repr(float(p)) for p in probs.tolist())]
    return row + ([""] if with_error else [])
