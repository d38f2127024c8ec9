"""Everything of a search that needs no optuna import (``mltrack.search`` is the only module importing it):
search spaces and settings as plain data, storage URLs, the worker processes and their ask lock, and the
MLflow side of studies and trials. The CLI and the unit tests use it cheaply.

A space file is YAML mapping a dotted config key to a distribution::

    optimizer.lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}
    training.batch_size: {type: categorical, choices: [16, 32, 64]}
    model.architecture: {type: categorical, choices: [small_cnn, resnet18]}
    scheduler.warmup_epochs: {type: int, low: 0, high: 3}

Every key and every boundary value is checked against the run config before a study starts, so a typo
or an impossible value fails at once with the key named, not after hours of trials.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, Optional
from urllib.parse import urlsplit, urlunsplit

import yaml

from mltrack.config import RunConfig, replace, to_dict, to_yaml, validate
from mltrack.console import get_logger
from mltrack.errors import ConfigError, UserError

log = get_logger()

ParamType = Literal["float", "int", "categorical"]
SAMPLERS = ("tpe", "random", "grid", "cmaes")
PRUNERS = ("median", "percentile", "hyperband", "none")
DEFAULT_STORAGE = "sqlite:///optuna.db"
JOURNAL_PREFIX = "journal:"
_FIELDS = {"type", "low", "high", "log", "step", "choices"}
# Keys a trial may not change: folds come from --folds, and where data or runs live is not a hyper-parameter.
_NOT_SEARCHABLE = ("data.fold", "data.data_dir", "data.dataset_name", "tracking.", "model.num_classes")


@dataclass(frozen=True)
class ParamSpec:
    """One searched config key: a float/int range (``log`` scale or a ``step`` grid) or a list of choices."""

    key: str
    type: ParamType
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    choices: tuple[Any, ...] = ()

    def boundary_values(self) -> list[Any]:
        """Values that must all be valid config values: both ends of a range, or every choice."""
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]

    def grid_values(self) -> list[Any]:
        """The values a grid search visits: every choice, or every step of a range (``step`` required for float)."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is None:
            raise ConfigError(f"search space: {self.key} is a float range without 'step'; the grid sampler needs "
                              "a finite set (add step: or use type: categorical)")
        n = int(math.floor((self.high - self.low) / self.step + 1e-9))
        return [round(self.low + i * self.step, 12) for i in range(n + 1)]


@dataclass(frozen=True)
class SearchOptions:
    """Everything a search (coordinator or worker) needs besides the base RunConfig."""

    space: dict[str, ParamSpec]
    space_path: str
    study_name: str
    storage: str = DEFAULT_STORAGE  # an Optuna RDB URL or journal:<file>
    n_trials: int = 20  # target of finished (COMPLETE + PRUNED) trials for the whole study
    timeout: Optional[float] = None  # seconds; no new trial starts after it (per process)
    sampler: str = "tpe"
    pruner: str = "median"
    metric: str = "val/acc"  # reported every epoch; a fold's value is its best epoch
    direction: Literal["maximize", "minimize"] = "maximize"
    folds: tuple[int, ...] = (0,)
    workers: int = 1
    retrain_best: bool = False
    seed: int = 42  # sampler seed; worker k uses seed + k so workers do not propose the same points
    heartbeat_s: int = 10  # trial liveness interval; a trial silent for 2x this (+5 s) is failed and retried
    pruner_startup_trials: int = 2  # trials finished before pruning starts (median, percentile)
    pruner_warmup_epochs: int = 0  # epochs of each trial never pruned (median, percentile)
    pruner_percentile: float = 25.0  # percentile pruner: prune below this percentile of earlier trials
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- spaces


def load_space(path: str | Path, base: RunConfig) -> dict[str, ParamSpec]:
    """Read and check a space YAML file (see the module docstring); ConfigError names the file and key."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"search space file not found: {p} (pass --space with a YAML file such as "
                          "configs/search/digits.yaml)")
    try:
        tree = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"search space {p} is not valid YAML: {err}") from None
    return parse_space(tree, base, str(p))


def parse_space(tree: Any, base: RunConfig, source: str = "search space") -> dict[str, ParamSpec]:
    """Dict of ``dotted key -> distribution`` -> ParamSpecs, each checked against ``base``."""
    if not isinstance(tree, dict) or not tree:
        raise ConfigError(f"{source}: expected a mapping of dotted config keys to distributions, e.g. "
                          "optimizer.lr: {type: float, low: 1.0e-4, high: 0.1, log: true}")
    space = {str(key): _spec(str(key), raw, source) for key, raw in tree.items()}
    for spec in space.values():
        _check_against_config(spec, base, source)
    return space


def _spec(key: str, raw: Any, source: str) -> ParamSpec:
    where = f"{source}: {key}"
    if key.startswith(_NOT_SEARCHABLE):
        raise ConfigError(f"{where} cannot be searched (folds come from --folds; data location, class count and "
                          "tracking settings are not hyper-parameters)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping like {{type: float, low: 0.001, high: 0.1}}, got {raw!r}")
    unknown = set(raw) - _FIELDS
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; "
                          f"valid: {', '.join(sorted(_FIELDS))}")
    kind = raw.get("type")
    if kind == "categorical":
        return _categorical(key, raw, where)
    if kind in ("float", "int"):
        return _numeric(key, kind, raw, where)
    raise ConfigError(f"{where}: type must be float, int or categorical, got {kind!r}")


def _categorical(key: str, raw: dict[str, Any], where: str) -> ParamSpec:
    choices = raw.get("choices")
    if not isinstance(choices, list) or not choices:
        raise ConfigError(f"{where}: categorical needs a non-empty list 'choices'")
    bad = [c for c in choices if not (c is None or isinstance(c, (bool, int, float, str)))]
    if bad:
        raise ConfigError(f"{where}: choices must be scalars (number, string, bool, null), got {bad[0]!r}")
    if len(set(map(repr, choices))) != len(choices):
        raise ConfigError(f"{where}: choices contain duplicates")
    extra = {"low", "high", "log", "step"} & set(raw)
    if extra:
        raise ConfigError(f"{where}: {', '.join(sorted(extra))} do not apply to a categorical parameter")
    return ParamSpec(key, "categorical", choices=tuple(choices))


def _numeric(key: str, kind: str, raw: dict[str, Any], where: str) -> ParamSpec:
    if "choices" in raw:
        raise ConfigError(f"{where}: 'choices' only applies to type: categorical")
    low, high, step, log = raw.get("low"), raw.get("high"), raw.get("step"), bool(raw.get("log", False))
    number = int if kind == "int" else (int, float)
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, number):
            wanted = "an integer" if kind == "int" else "a number"
            raise ConfigError(f"{where}: '{name}' must be {wanted}, got {value!r}")
    if not low < high:
        raise ConfigError(f"{where}: low ({low}) must be smaller than high ({high})")
    if log and low <= 0:
        raise ConfigError(f"{where}: log: true needs low > 0, got {low}")
    if step is not None:
        if log:
            raise ConfigError(f"{where}: step and log: true cannot be combined")
        if isinstance(step, bool) or not isinstance(step, number) or step <= 0:
            raise ConfigError(f"{where}: step must be a positive {'integer' if kind == 'int' else 'number'}")
    cast = int if kind == "int" else float
    return ParamSpec(key, kind, cast(low), cast(high), log,  # type: ignore[arg-type]
                     None if step is None else cast(step))


def _check_against_config(spec: ParamSpec, base: RunConfig, source: str) -> None:
    for value in spec.boundary_values():
        try:
            replace(base, **{spec.key: value})
        except ConfigError as err:
            message = str(err).removeprefix("config error: ")
            raise ConfigError(f"{source}: {spec.key}={value!r} is not a valid config value: {message}") from None


def apply_params(base: RunConfig, params: dict[str, Any]) -> RunConfig:
    """``base`` with a trial's dotted-key values applied (validated like any config)."""
    return replace(base, **params) if params else base


def grid(space: dict[str, ParamSpec]) -> dict[str, list[Any]]:
    """Key -> every value the grid sampler visits."""
    return {key: spec.grid_values() for key, spec in space.items()}


def grid_size(space: dict[str, ParamSpec]) -> int:
    return math.prod(len(values) for values in grid(space).values())


# ---------------------------------------------------------------- CLI values


def parse_folds(text: str | None, default: int) -> tuple[int, ...]:
    """``"0,1"`` -> ``(0, 1)``; None or empty -> ``(default,)`` (the config's data.fold)."""
    if text is None or not str(text).strip():
        return (default,)
    try:
        folds = tuple(int(part) for part in str(text).split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"--folds expects comma-separated fold numbers such as 0,1,2; got '{text}'") from None
    if not folds or any(f < 0 for f in folds) or len(set(folds)) != len(folds):
        raise ConfigError(f"--folds expects distinct non-negative fold numbers such as 0,1,2; got '{text}'")
    return folds


def default_study_name(cfg: RunConfig, space_path: str | Path) -> str:
    """``<dataset>-<space file stem>``: re-running the same command joins (continues) the same study."""
    return re.sub(r"[^\w.\-]", "_", f"{cfg.data.dataset_name}-{Path(space_path).stem}")


# ---------------------------------------------------------------- storage URLs


def storage_kind(url: str) -> Literal["sqlite", "rdb", "journal"]:
    """sqlite (one process), rdb (PostgreSQL/MySQL: many workers, machines) or journal (a file, many processes)."""
    if url.startswith(JOURNAL_PREFIX):
        if not url[len(JOURNAL_PREFIX):].strip():
            raise ConfigError("--storage journal: needs a file, e.g. --storage journal:./optuna.journal")
        return "journal"
    scheme = urlsplit(url).scheme.lower()
    if scheme.startswith("sqlite"):
        return "sqlite"
    if "://" in url and scheme:
        return "rdb"
    raise ConfigError(f"--storage '{redact_storage(url)}' is neither an RDB URL (sqlite:///optuna.db, "
                      "postgresql://user@host/db) nor a journal file (journal:./optuna.journal)")


def journal_path(url: str) -> Path:
    return Path(url[len(JOURNAL_PREFIX):].strip())


def redact_storage(url: str) -> str:
    """The URL without user name and password (``postgresql://u:p@h/db`` -> ``postgresql://h/db``)."""
    if url.startswith(JOURNAL_PREFIX) or "://" not in url:
        return url
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))  # the query may hold a password too


def check_workers(storage: str, workers: int) -> None:
    """Refuse SQLite with several worker processes: they serialise on one file lock and fail with
    'database is locked' under load."""
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if workers > 1 and storage_kind(storage) == "sqlite":
        raise ConfigError(
            f"--workers {workers} cannot share the SQLite storage {redact_storage(storage)}: SQLite allows one "
            "writer at a time and parallel trials fail with 'database is locked'. Use a journal file "
            "(--storage journal:./optuna.journal, one host) or PostgreSQL (--storage "
            "postgresql://user@host/db, several hosts), or run with --workers 1")


def ask_lock_path(storage: str, study_name: str, lock_dir: Path) -> Path:
    """Per (storage, study) lock file that serialises "check the trial budget, then ask" among the worker
    processes of one host, so a study never starts more trials than ``n_trials``."""
    digest = hashlib.sha256(f"{redact_storage(storage)}\0{study_name}".encode()).hexdigest()[:16]
    return lock_dir / f"mltrack-search-{digest}.lock"


# ---------------------------------------------------------------- worker spec (coordinator -> worker processes)

STORAGE_ENV = "MLTRACK_SEARCH_STORAGE"  # the storage URL reaches workers through the environment, never argv or disk


def options_to_json(opts: SearchOptions) -> dict[str, Any]:
    """Plain data for a worker spec file; the storage URL (it may hold a password) is left out."""
    data = {k: v for k, v in asdict(opts).items() if k not in ("space", "storage")}
    data["folds"] = list(opts.folds)
    data["space"] = {key: {**asdict(spec), "choices": list(spec.choices)} for key, spec in opts.space.items()}
    return data


def options_from_json(data: dict[str, Any], storage: str) -> SearchOptions:
    space = {key: ParamSpec(**{**raw, "choices": tuple(raw["choices"])}) for key, raw in data["space"].items()}
    fields = {k: v for k, v in data.items() if k != "space"}
    fields["folds"] = tuple(fields["folds"])
    return SearchOptions(space=space, storage=storage, **fields)


# ---------------------------------------------------------------- results, stop requests, the ask lock

DP_NOTE = "hyper-parameter selection not privacy-accounted"
STUDY_RUN_ATTR = "mltrack.study_run_id"  # study user attr: the MLflow study run every worker and machine joins


@dataclass
class SearchResult:
    study_name: str
    study_run_id: str
    counts: dict[str, int]  # trials per Optuna state name, plus "done" (COMPLETE + PRUNED)
    best_trial: Optional[int] = None
    best_value: Optional[float] = None
    best_run_id: Optional[str] = None
    best_config: Optional[Path] = None  # local best_config.yaml (also a study-run artifact)
    retrain_run_ids: list[str] = field(default_factory=list)


_STOP: dict[str, Optional[str]] = {"signal": None}


def stop_requested() -> Optional[str]:
    """The name of the signal (SIGTERM/SIGINT) that asked the search to stop, or None."""
    return _STOP["signal"]


def install_stop_handler() -> dict[int, Any]:
    """Between trials, SIGTERM/SIGINT stop the search after the current step instead of killing it
    (during a trial ``run.train`` has its own handlers: it checkpoints and marks the run KILLED)."""
    _STOP["signal"] = None

    def request(signum: int, _frame: Any) -> None:
        _STOP["signal"] = signal.Signals(signum).name

    previous: dict[int, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, request)
        except ValueError:  # not the main thread
            pass
    return previous


def restore_stop_handler(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


class AskLock:
    """An exclusive ``flock`` on a file shared by the worker processes of one host. Idempotent release."""

    def __init__(self, path: Path) -> None:
        self.path, self._fd = path, None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_CREAT | os.O_RDONLY, 0o666)  # flock needs no write access
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> "AskLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ---------------------------------------------------------------- worker processes


def run_worker_processes(cfg: RunConfig, opts: SearchOptions, study_run_id: str, study_dir: Path) -> list[int]:
    """Start ``opts.workers`` processes of ``mltrack search --worker`` on one spec file and wait for all.

    A stop request is forwarded to them as SIGTERM (each checkpoints its trial and re-queues it).
    Returns their exit codes (negative: killed by that signal)."""
    spec = study_dir / f"worker_spec_{os.getpid()}.json"
    spec.write_text(json.dumps({"config": to_dict(cfg), "options": options_to_json(opts),
                                "study_run_id": study_run_id}, indent=1))
    env = {**os.environ, STORAGE_ENV: opts.storage}
    env.pop("MLFLOW_RUN_ID", None)  # the `mlflow run` run is the study run; trials are new child runs
    procs = [subprocess.Popen([sys.executable, "-m", "mltrack", "search", "--worker", str(spec),
                               "--worker-index", str(k)], env=env) for k in range(opts.workers)]
    log.info("study %s: %d worker processes started (pids %s)", opts.study_name, len(procs),
             ", ".join(str(p.pid) for p in procs))
    forwarded = False
    try:
        while any(p.poll() is None for p in procs):
            if stop_requested() and not forwarded:
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
                forwarded = True
            time.sleep(0.5)
    finally:
        spec.unlink(missing_ok=True)
    return [int(p.returncode) for p in procs]


def read_worker_spec(path: str | Path) -> tuple[RunConfig, SearchOptions, str]:
    """(base config, options, study run id) from a spec file; the storage comes from the environment."""
    storage = os.environ.get(STORAGE_ENV)
    if not storage:
        raise ConfigError(f"--worker needs the storage URL in the environment variable {STORAGE_ENV}")
    data = json.loads(Path(path).read_text())
    return validate(data["config"]), options_from_json(data["options"], storage), str(data["study_run_id"])


# ---------------------------------------------------------------- MLflow side of a study


def open_study_run(cfg: RunConfig, opts: SearchOptions, existing_run_id: Optional[str]) -> tuple[Any, Path]:
    """Create the study's MLflow parent run (``mltrack.role=study``) or re-open the one this study already
    has (another machine, or a restarted search); returns (Tracker, local study folder)."""
    from mltrack.errors import CheckpointError
    from mltrack.tracking import Tracker

    study_dir = Path(cfg.tracking.runs_dir) / f"study_{opts.study_name}"
    study_dir.mkdir(parents=True, exist_ok=True)
    tags = {"mltrack.role": "study", "optuna.study": opts.study_name, "optuna.storage": redact_storage(opts.storage),
            "optuna.sampler": opts.sampler, "optuna.pruner": opts.pruner, "optuna.metric": opts.metric,
            "optuna.direction": opts.direction, "mltrack.dataset": cfg.data.dataset_name,
            "mltrack.trainer_type": cfg.training.trainer_type, "mltrack.run_dir": str(study_dir.resolve())}
    trainer_spec = opts.space.get("training.trainer_type")
    if cfg.training.trainer_type == "dp" or (trainer_spec is not None and "dp" in trainer_spec.choices):
        tags["mltrack.dp_note"] = DP_NOTE
    experiment = cfg.tracking.experiment_name or cfg.data.dataset_name
    try:
        tracker = Tracker.start(experiment, f"study_{opts.study_name}", tags, resume_run_id=existing_run_id,
                                spool_dir=study_dir / "spool")
    except CheckpointError:  # the study's run was deleted in MLflow: start a new one
        existing_run_id = None
        tracker = Tracker.start(experiment, f"study_{opts.study_name}", tags, spool_dir=study_dir / "spool")
    if existing_run_id is None:
        tracker.log_params({"search.space": opts.space_path, "search.n_trials": opts.n_trials,
                            "search.folds": ",".join(map(str, opts.folds)), "search.seed": opts.seed,
                            **{f"search.space.{k}": _describe(s) for k, s in opts.space.items()}})
        (study_dir / "base_config.yaml").write_text(to_yaml(cfg))
        tracker.log_artifact(study_dir / "base_config.yaml")
        (study_dir / "search_space.yaml").write_text(yaml.safe_dump(
            {k: {f: v for f, v in asdict(s).items() if v not in (None, (), False) and f != "key"}
             for k, s in opts.space.items()}, sort_keys=False))
        tracker.log_artifact(study_dir / "search_space.yaml")
    return tracker, study_dir


def _describe(spec: ParamSpec) -> str:
    if spec.type == "categorical":
        return f"categorical{list(spec.choices)}"
    extra = ", log" if spec.log else (f", step {spec.step}" if spec.step is not None else "")
    return f"{spec.type}[{spec.low}, {spec.high}{extra}]"


def write_best_config(cfg: RunConfig, study_dir: Path, study_name: str, trial: int, value: float) -> Path:
    """``best_config.yaml``: a complete run config that ``mltrack train --config`` accepts as it is."""
    path = study_dir / "best_config.yaml"
    header = (f"# Best trial {trial} of study {study_name} (value {value}).\n"
              f"# Train it: mltrack train --config {path.name} --fold <k>\n")
    path.write_text(header + to_yaml(cfg))
    return path


def retrain_best(cfg: RunConfig, opts: SearchOptions, study_run_id: str, best_trial: int) -> list[str]:
    """Train the best config on every fold of ``opts.folds`` as children of the study run; run ids."""
    from mltrack.run import train

    ids = []
    for fold in opts.folds:
        fold_cfg = replace(cfg, **{"data.fold": fold, "tracking.run_name": f"{opts.study_name}_best_fold_{fold}"})
        tags = {"optuna.study": opts.study_name, "mltrack.best_trial": str(best_trial), "mltrack.retrain": "best"}
        ids.append(train(fold_cfg, parent_run_id=study_run_id, role="train", extra_tags=tags).run_id)
    return ids


def print_summary(result: SearchResult, out: Any = None) -> None:
    """The closing block of ``mltrack search``: counts, the best trial and how to use it."""
    from mltrack.tracking import tracking_uri

    c = result.counts
    lines = ["", f"study:          {result.study_name}  (MLflow run {result.study_run_id})",
             f"trials:         {c['done']} finished: {c['COMPLETE']} complete, {c['PRUNED']} pruned; "
             f"{c['FAIL']} failed"]
    if result.best_trial is not None:
        lines += [f"best trial:     {result.best_trial}  value {result.best_value:.6g}  run {result.best_run_id}",
                  f"best config:    {result.best_config}",
                  f"train it:       mltrack train --config {result.best_config}"]
    if result.retrain_run_ids:
        lines.append(f"retrained runs: {', '.join(result.retrain_run_ids)}")
    lines.append(f"compare runs:   mlflow ui --backend-store-uri {tracking_uri()}")
    print("\n".join(lines), file=out or sys.stdout, flush=True)

# ---------------------------------------------------------------- trials on the MLflow side

RUN_ATTR = "mlflow_run_id"  # trial user attr: the trial's MLflow run (its training run, or its trial run with folds)
HEARTBEAT_ATTR = "mltrack.heartbeat"  # trial user attr (journal storage): unix time of the last sign of life


class SearchIncomplete(UserError):
    """The workers ended before the study reached its target (no --timeout): rerun to continue it."""

    exit_code = 1


def grace_s(heartbeat_s: int) -> int:
    """Seconds without a heartbeat after which a RUNNING trial counts as lost."""
    return 2 * heartbeat_s + 5


def trial_target(opts: SearchOptions) -> int:
    """Finished trials the study aims for: ``n_trials``, or fewer when a grid has fewer points."""
    return min(opts.n_trials, grid_size(opts.space)) if opts.sampler == "grid" else opts.n_trials


def open_trial_run(cfg: RunConfig, opts: SearchOptions, study_run_id: str, number: int, params: dict[str, Any],
                   tags: dict[str, str], old_run_id: Optional[str]) -> Any:
    """The MLflow run of a trial that spans several folds (no training of its own: params, fold values and
    their mean); a retry re-opens ``old_run_id``. Returns its Tracker."""
    from mltrack.errors import CheckpointError
    from mltrack.tracking import Tracker

    folds = ",".join(map(str, opts.folds))
    run_tags = {**tags, "mltrack.role": "trial", "mltrack.dataset": cfg.data.dataset_name,
                "mltrack.trainer_type": cfg.training.trainer_type, "mltrack.folds": folds}
    start = partial(Tracker.start, cfg.tracking.experiment_name or cfg.data.dataset_name,
                    f"{opts.study_name}_trial_{number}", run_tags, parent_run_id=study_run_id,
                    spool_dir=Path(cfg.tracking.runs_dir) / ".tracking")
    try:
        tracker = start(resume_run_id=old_run_id)
    except CheckpointError:  # the lost trial's run was deleted meanwhile
        old_run_id, tracker = None, start()
    if old_run_id is None:
        tracker.log_params({**params, "search.folds": folds})
    return tracker


def close_orphan_runs(user_attrs: dict[str, Any], reason: str) -> None:
    """Set every MLflow run of a trial that is still RUNNING to FAILED (its process is gone)."""
    from mltrack.errors import CheckpointError
    from mltrack.tracking import run_info, set_run_status

    for key, run_id in user_attrs.items():
        if key == RUN_ATTR or key.startswith("mltrack.fold_run."):
            try:
                if run_info(str(run_id))["status"] == "RUNNING":
                    set_run_status(str(run_id), "FAILED", reason)
            except CheckpointError:
                pass  # the run was deleted: nothing to close



def resume_point(run_id: Optional[str]) -> Any:
    """The last checkpoint of a lost trial's run (local copy first, else the logged artifact), or None
    when the run never got to write one (the retry then starts afresh, in a new run)."""
    if not run_id:
        return None
    from mltrack.errors import CheckpointError
    from mltrack.resume import open_resume
    from mltrack.tracking import run_info

    try:
        run_dir = run_info(run_id)["tags"].get("mltrack.run_dir", "")
        local = Path(run_dir) / "weights" / "last.pt" if run_dir else None
        uri = str(local) if local is not None and local.is_file() else f"runs:/{run_id}/weights/last.pt"
        point = open_resume(uri)
    except CheckpointError as err:
        log.info("retry of run %s starts afresh: %s", run_id, err)
        return None
    log.info("retry resumes run %s from %s (epoch %d)", run_id, uri, point.state["progress"]["epoch"])
    return point
