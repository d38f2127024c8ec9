"""Resume: fetch a checkpoint from a path or MLflow URI, verify it, and decide what may change.

Everything here runs before a run is re-opened, so a refused resume changes nothing in MLflow.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mltrack import checkpoint
from mltrack.config import RunConfig, flatten, load_config
from mltrack.console import get_logger
from mltrack.errors import CheckpointError

log = get_logger()

# Keys that may differ on resume without --allow-config-change: they do not change what was learned
# so far, only how long or how visibly training continues.
FREE_ON_RESUME = {"training.num_epochs", "data.num_workers", "tracking.progress", "tracking.tensorboard",
                  "tracking.confusion_every_epoch", "tracking.log_model", "training.device", "tracking.runs_dir",
                  "training.early_stopping.patience"}
# Keys that decide which samples "batch k of epoch e" means: fixed for a checkpoint taken inside an epoch.
POSITION_KEYS = {"training.batch_size", "training.gradient_accumulation_steps", "data.sampler", "training.seed"}
# Keys that can never differ: the checkpoint's weights or labels would not mean the same thing.
FIXED = {"model.architecture": "architecture", "model.num_classes": "class count", "data.fold": "fold",
         "data.data_dir": "data directory", "training.trainer_type": "trainer"}


@dataclass
class ResumePoint:
    uri: str  # what the user asked for (after resolving models:/), with " (fallback)" when it fell back
    path: Path  # the verified local copy
    state: dict[str, Any]
    run_id: Optional[str]
    run_dir: Optional[Path] = None
    drift: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    resume_count: int = 1
    best_path: Optional[Path] = None  # the verified best.pt stored beside the checkpoint, if any
    fallback: Optional[str] = None  # why the previous checkpoint was used instead of the one asked for


def _sibling(uri: str, name: str) -> str:
    return uri.rsplit("/", 1)[0] + "/" + name if "/" in uri else name


def _fetch(uri: str, workdir: Path) -> Path:
    """Download ``uri`` and its ``.sha256`` manifest next to each other; return the local checkpoint path."""
    from mltrack.tracking import download_artifact

    local = Path(uri)
    if local.exists():
        return local
    path = download_artifact(uri, workdir)
    if path.is_dir():
        raise CheckpointError(f"{uri} is a folder, not a checkpoint file; resume from e.g. "
                              "runs:/<run_id>/weights/last.pt")
    try:
        download_artifact(uri + checkpoint.MANIFEST_SUFFIX, path.parent)
    except CheckpointError:
        pass  # load() reports the missing manifest with its own message
    return path


def _resolve(uri: str) -> str:
    """``models:/<name>@<alias>`` (or ``/<version>``) -> ``runs:/<run_id>/weights/last.pt`` of the run that
    produced that model: a registered model is resumed through its training run's last checkpoint."""
    if not uri.startswith("models:/") or uri.endswith(".pt"):
        return uri
    from mltrack.tracking import model_run_id

    return f"runs:/{model_run_id(uri)}/weights/last.pt"


def _load_with_fallback(uri: str, workdir: Path, fallback_previous: bool) -> tuple[str, Path, dict[str, Any], Optional[str]]:
    """(uri, local path, state, fallback reason) of the checkpoint to resume from."""
    try:
        path = _fetch(uri, workdir)
        return uri, path, checkpoint.load(path), None
    except CheckpointError as err:
        # Never fall back past a hostile file, nor when the run or the path does not exist at all.
        if not fallback_previous or "unsafe checkpoint" in str(err) or "cannot download" in str(err):
            raise
        failure = str(err)
    previous = _sibling(uri, "prev.pt")
    try:
        path = _fetch(previous, workdir / "previous")
        state = checkpoint.load(path)
    except CheckpointError as err:
        raise CheckpointError(f"{failure}; the previous checkpoint {previous} cannot be used either: {err}") from None
    reason = (f"{uri} failed verification ({failure.split(':')[0]}); resumed from {previous} "
              f"(epoch {state['progress']['epoch']})")
    return f"{previous} (fallback)", path, state, reason


def open_resume(uri: str, fallback_previous: bool = False) -> ResumePoint:
    """Fetch, verify (sha256) and weights-only load the checkpoint at ``uri``; nothing in MLflow changes.

    ``uri``: a local path, ``runs:/…``, ``mlflow-artifacts:/…`` or ``models:/<name>@<alias>`` (the model's
    training run's ``weights/last.pt``). With ``fallback_previous``, a checkpoint that fails verification
    (checksum mismatch, truncated, no manifest) is replaced by ``prev.pt`` beside it (the previous epoch's
    ``last.pt``) when that one verifies; an unsafe (hostile) file is never fallen back from.
    """
    workdir = Path(tempfile.mkdtemp(prefix="mltrack-resume-"))
    uri = _resolve(uri)
    try:
        uri, path, state, reason = _load_with_fallback(uri, workdir, fallback_previous)
    except CheckpointError as err:
        hint = _local_copy_hint(uri, str(err))
        if hint is None:
            raise
        raise CheckpointError(f"{err}\n{hint}") from None
    point = ResumePoint(uri, path, state, state.get("mlflow_run_id"), fallback=reason)
    point.best_path = _fetch_best(uri.removesuffix(" (fallback)"), workdir / "best")
    if point.run_id:
        from mltrack.tracking import run_info

        info = run_info(point.run_id)
        run_dir = info["tags"].get("mltrack.run_dir")
        point.run_dir = Path(run_dir) if run_dir else None
        point.resume_count = int(info["tags"].get("mltrack.resume_count", "0")) + 1
        point.state["_run_status"] = info["status"]
    return point


def _local_copy_hint(uri: str, error: str) -> Optional[str]:
    """When ``runs:/<id>/weights/<file>`` is not in the artifact store but the run's folder on this machine
    holds that file: where it is and how to resume from it. Checkpoints are uploaded while the next epoch
    trains, so a process killed with SIGKILL (or a lost connection) can leave a newer checkpoint on disk
    than in the store, or the only one. Resuming from the local file continues the same run (the run id is
    in the checkpoint). None when there is nothing to suggest."""
    if not uri.startswith("runs:/") or "cannot download" not in error:
        return None
    run_id, _, rel = uri[len("runs:/"):].strip("/").partition("/")
    if not rel.startswith("weights/"):
        return None
    from mltrack.tracking import run_info

    try:
        run_dir = run_info(run_id)["tags"].get("mltrack.run_dir")
    except CheckpointError:  # no such run: the error already says so
        return None
    local = Path(run_dir) / rel if run_dir else None
    if local is None or not local.is_file():
        return None
    try:
        epoch = checkpoint.load(local)["progress"]["epoch"]
    except (CheckpointError, KeyError, TypeError) as err:
        return f"The run folder's {local} exists but is not usable either: {err}"
    return (f"The run folder on this machine holds {local} ({epoch} epoch(s) done; missing from the store, e.g. "
            f"its process ended before the upload). Resume the same run from it:\n"
            f"  mltrack train --resume {local}")


def _fetch_best(uri: str, workdir: Path) -> Optional[Path]:
    """The verified ``best.pt`` beside ``uri``, or None when there is none (or it does not verify)."""
    best = _sibling(uri, "best.pt")
    if best == uri:
        return None
    try:
        path = _fetch(best, workdir)
        checkpoint.verify(path)
        return path
    except CheckpointError as err:
        log.warning("no usable best.pt beside %s (%s); best.pt will be the next improvement", uri, err)
        return None


def install_weights(point: ResumePoint, weights_dir: Path) -> list[str]:
    """Make ``weights_dir`` hold the resumed lineage: ``last.pt`` = the checkpoint resumed from, ``best.pt``
    = the one stored beside it (removed when there is none). Returns the file names installed.

    Needed when the checkpoint came from the artifact store: the local folder may hold files of an attempt
    that died before uploading them (e.g. a ``best.pt`` of an epoch that will now be trained again).
    """
    last = weights_dir / "last.pt"
    if last.exists() and point.path.resolve() == last.resolve():
        return []  # resuming the local last.pt itself: the folder already is the lineage
    installed = ["last.pt"]
    checkpoint.copy_verified(point.path, last)
    best = weights_dir / "best.pt"
    if point.best_path is not None:
        if not (best.exists() and point.best_path.resolve() == best.resolve()):
            checkpoint.copy_verified(point.best_path, best)
        installed.insert(0, "best.pt")
    else:
        best.unlink(missing_ok=True)
        checkpoint.manifest_path(best).unlink(missing_ok=True)
    return installed


def resume_config(point: ResumePoint, overrides: list[str] | tuple[str, ...], cli: dict[str, Any],
                  allow_config_change: bool) -> RunConfig:
    """The checkpoint's config with only what the user typed now applied; record the drift."""
    # A deep copy: load_config edits nested sections of its base in place, and the drift below compares
    # against the checkpoint's own config.
    cfg = load_config(None, overrides, cli, base=point.state["config"])  # load_config copies its base
    before, after = flatten(point.state["config"]), flatten(cfg)
    # A key the checkpoint lacks is a setting added to mltrack after it was written: at its default it
    # trains as that run did, so it is not drift (else every upgrade would block resuming older runs).
    defaults = flatten(RunConfig())
    point.drift = {k: (before.get(k), v) for k, v in after.items()
                   if before.get(k) != v and not (k not in before and v == defaults.get(k))}
    for key, what in FIXED.items():
        if key in point.drift:
            old, new = point.drift[key]
            raise CheckpointError(f"cannot resume: the {what} differs ({key}: checkpoint {old!r}, now {new!r}); "
                                  "start a new run instead")
    changed = sorted(k for k in point.drift if k not in FREE_ON_RESUME)
    if changed and not allow_config_change:
        raise CheckpointError(
            "cannot resume with a changed config: " + ", ".join(f"{k} {point.drift[k][0]!r} -> {point.drift[k][1]!r}"
                                                                for k in changed)
            + "; pass --allow-config-change to continue anyway (recorded as mltrack.param_drift)")
    inside = int(point.state["progress"].get("batch", 0))
    moved = sorted(k for k in POSITION_KEYS if k in point.drift)
    if inside and moved:  # "batch k of this epoch" would name other samples
        raise CheckpointError(f"cannot resume: the checkpoint was taken inside epoch {point.state['progress']['epoch']} "
                              f"(after batch {inside}), and {', '.join(moved)} changed, which moves that position; "
                              "resume with the same values")
    done = int(point.state["progress"]["epoch"])
    if point.state.get("_run_status") == "FINISHED" and cfg.training.num_epochs <= done:
        raise CheckpointError(f"run {point.run_id} is FINISHED after {done} epochs; pass --num-epochs larger "
                              f"than {done} to extend it")
    return cfg


def check_compatible(point: ResumePoint, cfg: RunConfig, class_names: list[str], digest: str) -> None:
    """Refuse a resume whose class map or split files differ from what the checkpoint was trained on."""
    if list(point.state["class_map"]) != list(class_names):
        raise CheckpointError(f"cannot resume: the class map differs (checkpoint {point.state['class_map']}, "
                              f"raw/ now {class_names})")
    if point.state.get("split_digest") != digest:
        raise CheckpointError("cannot resume: the split files differ from the ones this checkpoint was trained on "
                              f"(split digest {str(point.state.get('split_digest'))[:12]}… vs {digest[:12]}…); "
                              "restore the original splits or start a new run")
