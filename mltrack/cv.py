"""``mltrack cv``: every fold of one config as one tracked run.

The parent run (``mltrack.role=cv``) holds one child run per fold (``mltrack.role=fold``, trained by the
ordinary :func:`mltrack.run.train`). After the folds it logs, at step 0:

- ``cv/<metric>_mean|_std|_min|_max`` for every ``val/*`` and ``test/*`` metric of the successful folds.
  A fold's val metrics are those of its best epoch (the epoch that chose ``best.pt``, read from that
  checkpoint's history, i.e. the values the child logged at that step); its test metrics are the child's
  ``test/*`` (evaluated with ``best.pt``). ``_std`` is the population standard deviation (ddof=0).
- ``cv/folds.csv`` and ``cv/folds.md``: one row per fold (run id, status, best epoch, metrics).
- the soft-vote ensemble of the folds' ``best.pt`` on the shared test set: ``ensemble/test/*`` metrics,
  ``ensemble/`` report and confusion matrix, and ``model/``: one pyfunc holding every fold's weights.

A fold that fails is marked (``FAILED`` row, tag ``mltrack.failed_folds``) and the others go on; the parent
ends FINISHED if any fold succeeded, FAILED if none did, KILLED on SIGTERM/SIGINT.
"""
from __future__ import annotations

import csv
import io
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mltrack import checkpoint
from mltrack.config import RunConfig, replace
from mltrack.console import get_logger, success
from mltrack.errors import DataError, UserError

log = get_logger()
TABLE_KEYS = ("val/acc", "val/f1_macro", "val/loss", "test/acc", "test/f1_macro", "test/loss")


@dataclass
class FoldOutcome:
    fold: int
    status: str  # FINISHED | FAILED | KILLED
    run_id: Optional[str] = None
    run_dir: Optional[Path] = None
    best_epoch: int = -1
    metrics: dict[str, float] = field(default_factory=dict)  # val/* at the best epoch + test/*
    error: str = ""


@dataclass
class CVResult:
    run_id: str
    run_dir: Path
    folds: list[FoldOutcome]
    aggregates: dict[str, float]
    ensemble: dict[str, float]

    @property
    def failed(self) -> list[int]:
        return [f.fold for f in self.folds if f.status != "FINISHED"]


def available_folds(data_dir: Path) -> list[int]:
    """Fold numbers k with a ``splits/fold_<k>_train.txt`` under ``data_dir``, sorted."""
    files = (Path(data_dir) / "splits").glob("fold_*_train.txt")
    found = [re.fullmatch(r"fold_(\d+)_train\.txt", p.name) for p in files]
    return sorted(int(m.group(1)) for m in found if m)


def choose_folds(cfg: RunConfig, requested: list[int] | None) -> list[int]:
    """``requested`` (checked to exist) or every fold in splits/. Preflights each fold's data, so bad input
    fails before any MLflow run exists."""
    from mltrack.run import prepare_data

    # Creates the digits demo data when it is the default and checks raw/; data.fold itself plays no role here.
    prepare_data(replace(cfg, **{"data.fold": 0}))
    available = available_folds(Path(cfg.data.data_dir))
    if not available:
        raise DataError(f"no fold index files in {Path(cfg.data.data_dir) / 'splits'}; run mltrack split first")
    folds = sorted(set(requested)) if requested else available
    missing = [k for k in folds if k not in available]
    if missing:
        raise UserError(f"fold(s) {missing} do not exist in {Path(cfg.data.data_dir) / 'splits'} "
                        f"(available: {', '.join(map(str, available))})")
    for k in folds:
        prepare_data(replace(cfg, **{"data.fold": k}))
    return folds


# ---------------------------------------------------------------- aggregation and tables


def aggregate(outcomes: list[FoldOutcome]) -> dict[str, float]:
    """``cv/<key>_mean|_std|_min|_max`` over the FINISHED folds, for every val/* and test/* key they all have."""
    done = [o for o in outcomes if o.status == "FINISHED" and o.metrics]
    if not done:
        return {}
    keys = sorted(set.intersection(*(set(o.metrics) for o in done)))
    out: dict[str, float] = {"cv/n_folds": float(len(done))}
    for key in keys:
        values = [o.metrics[key] for o in done]
        out[f"cv/{key}_mean"] = statistics.fmean(values)
        out[f"cv/{key}_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
        out[f"cv/{key}_min"] = min(values)
        out[f"cv/{key}_max"] = max(values)
    return out


def fold_table_csv(outcomes: list[FoldOutcome]) -> str:
    """Every fold's metrics, one row per fold (failed folds keep their error)."""
    keys = sorted({k for o in outcomes for k in o.metrics})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["fold", "status", "run_id", "best_epoch", *keys, "error"])
    for o in outcomes:
        writer.writerow([o.fold, o.status, o.run_id or "", o.best_epoch,
                         *(repr(o.metrics[k]) if k in o.metrics else "" for k in keys), o.error])
    return buffer.getvalue()


def fold_table_markdown(outcomes: list[FoldOutcome], aggregates: dict[str, float],
                        ensemble: dict[str, float]) -> str:
    """A readable table of the main metrics per fold, mean ± std (population) and the ensemble."""
    head = ["fold", "status", "best epoch", *TABLE_KEYS, "run id"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for o in outcomes:
        who = " ".join(filter(None, [o.run_id, o.error[:80]]))
        cells = [str(o.fold), o.status, str(o.best_epoch) if o.status == "FINISHED" else "",
                 *(_fmt(o.metrics.get(k)) for k in TABLE_KEYS), who]
        lines.append("| " + " | ".join(cells) + " |")
    if aggregates:
        cells = [f"{_fmt(aggregates.get(f'cv/{k}_mean'))} ± {_fmt(aggregates.get(f'cv/{k}_std'))}"
                 for k in TABLE_KEYS]
        lines.append("| mean ± std | | | " + " | ".join(cells) + " | |")
    if ensemble:
        cells = ["" if k.startswith("val/") else _fmt(ensemble.get(f"ensemble/{k}")) for k in TABLE_KEYS]
        lines.append("| ensemble (soft vote) | | | " + " | ".join(cells) + " | |")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


# ---------------------------------------------------------------- one fold


def train_fold(cfg: RunConfig, fold: int, parent_id: str, explicit: dict[str, Any]) -> FoldOutcome:
    """Train ``fold`` as a child of ``parent_id``. An Exception is a failed fold (its run, if it was created,
    is already FAILED); SIGTERM/SIGINT (SystemExit) and KeyboardInterrupt propagate."""
    from mltrack.run import train

    fold_cfg = replace(cfg, **{"data.fold": fold})
    if cfg.tracking.run_name:  # the user's name names the parent; children get it with their fold
        fold_cfg = replace(fold_cfg, **{"tracking.run_name": f"{cfg.tracking.run_name}_fold_{fold}"})
    log.info("cv: fold %d", fold)
    try:
        result = train(fold_cfg, explicit=explicit, parent_run_id=parent_id, role="fold",
                       extra_tags={"mltrack.cv_run_id": parent_id})
    except Exception as err:  # noqa: BLE001 - one fold's failure must not stop the others
        log.error("cv: fold %d failed: %s: %s", fold, type(err).__name__, err)
        return FoldOutcome(fold, "FAILED", _failed_run(parent_id, fold), error=f"{type(err).__name__}: {err}"[:1000])
    outcome = FoldOutcome(fold, result.status, result.run_id, result.run_dir, result.best_epoch)
    best = result.run_dir / "weights" / "best.pt"
    if best.is_file():
        progress = checkpoint.load(best)["progress"]
        row = next((r for r in progress["history"] if int(r["epoch"]) == progress["best_epoch"]), {})
        outcome.metrics.update({k: float(v) for k, v in row.items() if k.startswith("val/")})
    outcome.metrics.update({k: float(v) for k, v in result.test_metrics.items()})
    return outcome


def _failed_run(parent_id: str, fold: int) -> Optional[str]:
    """The id of the child run a failed fold left (None if it failed before its run was opened)."""
    from mltrack.tracking import child_runs

    try:
        runs = [r for r in child_runs(parent_id) if r["tags"].get("mltrack.fold") == str(fold)]
    except Exception:  # noqa: BLE001 - the store may be unreachable; the table then shows the error only
        return None
    return runs[-1]["run_id"] if runs else None


# ---------------------------------------------------------------- the ensemble


Members = list[dict[str, Any]]


def evaluate_ensemble(cfg: RunConfig, outcomes: list[FoldOutcome], out_dir: Path
                      ) -> tuple[dict[str, float], Members, Members]:
    """Soft vote (mean softmax) of the FINISHED folds' ``best.pt`` on the shared test set.

    Writes the report and confusion matrix into ``out_dir``; returns (``ensemble/test/*`` metrics, the
    members' slim states, their descriptions) - empty when no fold has a best checkpoint.
    """
    from mltrack.data.index import read_index
    from mltrack.data.loaders import resolve_num_workers
    from mltrack.evaluate import score, write_reports
    from mltrack.run import resolve_device
    from mltrack.serving import Predictor, slim_state

    ok = [o for o in outcomes if o.status == "FINISHED" and o.run_dir is not None
          and (o.run_dir / "weights" / "best.pt").is_file()]
    if not ok:
        return {}, [], []
    states = [slim_state(checkpoint.load(o.run_dir / "weights" / "best.pt")) for o in ok]
    members = [{"name": f"fold_{o.fold}", "run_id": o.run_id, "fold": o.fold} for o in ok]
    predictor = Predictor.from_states(states, resolve_device(cfg.training.device))
    data_dir = Path(cfg.data.data_dir)
    samples = read_index(data_dir, "test", ok[0].fold)  # test.txt is shared by all folds
    if not samples:
        return {}, states, members
    prediction = predictor.run([str(data_dir / "raw" / rel) for rel, _ in samples],
                               batch_size=cfg.training.batch_size,
                               num_workers=resolve_num_workers(cfg.data.num_workers))
    metrics, cm = score(prediction, [label for _, label in samples], predictor.class_names, "ensemble/test")
    write_reports(out_dir, cm, predictor.class_names, f"test (soft-vote ensemble of {len(ok)} folds)")
    return metrics, states, members


# ---------------------------------------------------------------- the parent run


def run_cv(cfg: RunConfig, folds: list[int] | None = None, explicit: dict[str, Any] | None = None) -> CVResult:
    """Train ``folds`` (default: all in splits/) of ``cfg`` under one parent run; see the module docstring.

    ``explicit``: the dotted keys the user set (they name the runs, as for ``train``).
    """
    from mltrack.run import run_name, unique_dir
    from mltrack.tracking import Tracker

    chosen = choose_folds(cfg, folds)
    explicit = {k: v for k, v in (explicit or {}).items() if k != "data.fold"}
    name = cfg.tracking.run_name or re.sub(r"_fold_\d+$", "_cv", run_name(cfg, explicit))
    run_dir = unique_dir(Path(cfg.tracking.runs_dir), name)
    _log_to(run_dir)
    tags = {"mltrack.role": "cv", "mltrack.dataset": cfg.data.dataset_name,
            "mltrack.trainer_type": cfg.training.trainer_type, "mltrack.folds": ",".join(map(str, chosen)),
            "mltrack.run_dir": str(run_dir.resolve())}
    parent = Tracker.start(cfg.tracking.experiment_name or cfg.data.dataset_name, run_dir.name, tags,
                           spool_dir=run_dir / "spool")
    status, reason = "FAILED", "exception"
    try:
        _log_inputs(parent, cfg, chosen, run_dir)
        outcomes = [train_fold(cfg, k, parent.run_id, explicit) for k in chosen]
        result = _summarise(parent, cfg, outcomes, run_dir)
        if result.failed:
            parent.set_tags({"mltrack.failed_folds": ",".join(map(str, result.failed))})
        ok = len(result.failed) < len(outcomes)
        status, reason = ("FINISHED", None) if ok else ("FAILED", "all folds failed")
        return result
    except (SystemExit, KeyboardInterrupt) as stop:
        status, reason = "KILLED", f"interrupted ({type(stop).__name__})"
        raise
    except BaseException as err:
        reason = f"{type(err).__name__}: {str(err)[:200]}"
        raise
    finally:
        parent.finish(status, reason)


def _log_inputs(parent: Any, cfg: RunConfig, folds: list[int], run_dir: Path) -> None:
    from mltrack.config import flatten, to_yaml

    params = {k: v for k, v in flatten(cfg).items() if k != "data.fold"}
    parent.log_params({**params, "cv.folds": ",".join(map(str, folds))})
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    parent.log_artifact(run_dir / "config.yaml")


def _log_to(run_dir: Path) -> None:
    """Console + ``<run_dir>/logs/cv.log`` (each fold's training points the log file at its own folder)."""
    from mltrack.console import setup_logging

    setup_logging(run_dir / "logs" / "cv.log", os.environ.get("MLTRACK_LOG_LEVEL", "INFO"))


def _summarise(parent: Any, cfg: RunConfig, outcomes: list[FoldOutcome], run_dir: Path) -> CVResult:
    from mltrack.predict import MODEL_ARTIFACT, example_image, package_model

    _log_to(run_dir)
    aggregates = aggregate(outcomes)
    ensemble, states, members = evaluate_ensemble(cfg, outcomes, run_dir / "ensemble")
    if aggregates or ensemble:
        parent.log_metrics({**aggregates, **ensemble}, step=0)
    tables = run_dir / "cv"
    tables.mkdir(exist_ok=True)
    (tables / "folds.csv").write_text(fold_table_csv(outcomes))
    (tables / "folds.md").write_text(fold_table_markdown(outcomes, aggregates, ensemble))
    parent.log_artifacts(tables, "cv")
    if (run_dir / "ensemble").is_dir():
        parent.log_artifacts(run_dir / "ensemble", "ensemble")
    if states and cfg.tracking.log_model:
        model = package_model(run_dir / MODEL_ARTIFACT, states, members, example_image(cfg))
        parent.log_artifacts(model, MODEL_ARTIFACT)
    for line in (tables / "folds.md").read_text().splitlines():
        log.info(line)
    result = CVResult(parent.run_id, run_dir, outcomes, aggregates, ensemble)
    if not result.failed:
        success(f"cv: {len(outcomes)} folds finished")
    parent.log_artifact(run_dir / "logs" / "cv.log", "logs")
    return result
