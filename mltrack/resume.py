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
from mltrack.errors import CheckpointError

# Keys that may differ on resume without --allow-config-change: they do not change what was learned
# so far, only how long or how visibly training continues.
FREE_ON_RESUME = {"training.num_epochs", "data.num_workers", "tracking.progress", "tracking.tensorboard",
                  "tracking.confusion_every_epoch", "training.device", "tracking.runs_dir",
                  "training.early_stopping.patience"}
# Keys that can never differ: the checkpoint's weights or labels would not mean the same thing.
FIXED = {"model.architecture": "architecture", "model.num_classes": "class count", "data.fold": "fold",
         "data.data_dir": "data directory", "training.trainer_type": "trainer"}


@dataclass
class ResumePoint:
    uri: str
    path: Path
    state: dict[str, Any]
    run_id: Optional[str]
    run_dir: Optional[Path] = None
    drift: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    resume_count: int = 1


def _fetch(uri: str, workdir: Path) -> Path:
    """Download ``uri`` and its ``.sha256`` manifest next to each other; return the local checkpoint path."""
    from mltrack.tracking import download_artifact

    local = Path(uri)
    if local.exists():
        return local
    path = download_artifact(uri, workdir)
    try:
        download_artifact(uri + checkpoint.MANIFEST_SUFFIX, path.parent)
    except CheckpointError:
        pass  # verify() reports the missing manifest with its own message
    return path


def open_resume(uri: str, fallback_previous: bool = False) -> ResumePoint:
    """Fetch, verify (sha256) and weights-only load the checkpoint at ``uri``.

    With ``fallback_previous`` a checksum failure of ``last.pt`` falls back to the same folder's
    ``best.pt`` when that one verifies (the newest other verified checkpoint we keep).
    """
    workdir = Path(tempfile.mkdtemp(prefix="mltrack-resume-"))
    path = _fetch(uri, workdir)
    try:
        state = checkpoint.load(path)
    except CheckpointError as err:
        if not (fallback_previous and "checksum mismatch" in str(err)):
            raise
        previous = _fetch(uri.rsplit("/", 1)[0] + "/best.pt", workdir / "previous")
        state = checkpoint.load(previous)
        uri, path = uri.rsplit("/", 1)[0] + "/best.pt (fallback)", previous
    point = ResumePoint(uri, path, state, state.get("mlflow_run_id"))
    if point.run_id:
        from mltrack.tracking import run_info

        info = run_info(point.run_id)
        run_dir = info["tags"].get("mltrack.run_dir")
        point.run_dir = Path(run_dir) if run_dir else None
        point.resume_count = int(info["tags"].get("mltrack.resume_count", "0")) + 1
        point.state["_run_status"] = info["status"]
    return point


def resume_config(point: ResumePoint, overrides: list[str] | tuple[str, ...], cli: dict[str, Any],
                  allow_config_change: bool) -> RunConfig:
    """The checkpoint's config with only what the user typed now applied; record the drift."""
    cfg = load_config(None, overrides, cli, base=point.state["config"])
    before, after = flatten(point.state["config"]), flatten(cfg)
    point.drift = {k: (before.get(k), v) for k, v in after.items() if before.get(k) != v}
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
