"""Optuna search: the only module that imports optuna.

A trial is ``mltrack.run.train`` on the base config with the trial's dotted-key values applied, one MLflow
child run of the study run per trial (``mltrack.role=trial``, tags ``mltrack.trial`` and ``optuna.study``,
``user_attrs["mlflow_run_id"]``). With several ``--folds`` a trial is one non-training trial run (params,
``fold_<k>/<metric>`` and the mean) plus one training run per fold, also children of the study (role
``fold``, tag ``mltrack.trial_run_id``): runs never nest deeper than study -> run. A fold's value is the
best epoch value of ``--metric``; the objective is the mean over folds. Every epoch is reported at step
``fold_index * num_epochs + epoch`` so the pruner compares like with like.

Liveness: RDB storages (SQLite, PostgreSQL) use Optuna's heartbeat; a journal file has none, so each trial
writes ``user_attrs["mltrack.heartbeat"]`` and workers fail trials silent for longer than the grace period.
Either way a lost trial is failed once, its MLflow runs are closed as FAILED, and it is re-queued once with
the same params; the retry continues the lost trial's MLflow run from its last checkpoint when one exists.
"""
from __future__ import annotations

import importlib.util
import os
import socket
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from mltrack.config import RunConfig, replace
from mltrack.console import get_logger, setup_logging
from mltrack.errors import ConfigError, UserError
from mltrack.search_space import (HEARTBEAT_ATTR, RUN_ATTR, STUDY_RUN_ATTR, AskLock, SearchIncomplete, SearchOptions,
                                  SearchResult, apply_params, ask_lock_path, check_workers, close_orphan_runs,
                                  grace_s, grid, install_stop_handler, journal_path, open_study_run, open_trial_run,
                                  read_worker_spec, redact_storage, restore_stop_handler, resume_point, retrain_best,
                                  run_worker_processes, stop_requested, storage_kind, trial_target, write_best_config)

log = get_logger()
warnings.filterwarnings("ignore", category=ExperimentalWarning)  # heartbeat, retry callback, matplotlib plots
POLL_S = 1.0  # how often an idle worker looks for trials to retry while others hold the remaining budget
MAX_CONSECUTIVE_FAILURES = 3


class TrialError(Exception):
    """A trial failed for a reason of its own (non-finite loss, out of memory): the study goes on."""


# ---------------------------------------------------------------- storage, sampler, pruner, study


def open_storage(opts: SearchOptions) -> optuna.storages.BaseStorage:
    """The Optuna storage for ``opts.storage``; RDB storages get heartbeat + one retry of lost trials."""
    kind = storage_kind(opts.storage)
    try:
        if kind == "journal":
            path = journal_path(opts.storage)
            path.parent.mkdir(parents=True, exist_ok=True)
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            return JournalStorage(JournalFileBackend(str(path)))
        engine = {"connect_args": {"timeout": 60}} if kind == "sqlite" else {"pool_pre_ping": True}
        return optuna.storages.RDBStorage(opts.storage, engine_kwargs=engine, heartbeat_interval=opts.heartbeat_s,
                                          grace_period=grace_s(opts.heartbeat_s),
                                          heartbeat_stale_trial_callback=retry_lost_trial)
    except ModuleNotFoundError as err:
        raise UserError(f"cannot open Optuna storage {redact_storage(opts.storage)}: the database driver is "
                        f"missing ({err}); for postgresql:// URLs: pip install 'psycopg[binary]'") from None
    except Exception as err:  # noqa: BLE001 - SQLAlchemy/driver errors of every kind mean "unreachable"
        raise UserError(f"cannot open Optuna storage {redact_storage(opts.storage)}: {str(err).splitlines()[0]}"
                        ) from None


def make_sampler(opts: SearchOptions, worker_index: int = 0) -> optuna.samplers.BaseSampler:
    seed = opts.seed + worker_index  # distinct per worker, reproducible per study
    if opts.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, constant_liar=opts.workers > 1)
    if opts.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if opts.sampler == "grid":
        return optuna.samplers.GridSampler(grid(opts.space), seed=seed)
    if opts.sampler == "cmaes":
        if importlib.util.find_spec("cmaes") is None:
            raise UserError("--sampler cmaes needs the cmaes package: pip install 'mltrack-platform[search]'")
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    raise ConfigError(f"unknown --sampler '{opts.sampler}' (tpe, random, grid, cmaes)")


def make_pruner(opts: SearchOptions, num_epochs: int) -> optuna.pruners.BasePruner:
    startup, warmup = opts.pruner_startup_trials, opts.pruner_warmup_epochs
    if opts.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=warmup)
    if opts.pruner == "percentile":
        return optuna.pruners.PercentilePruner(opts.pruner_percentile, n_startup_trials=startup, n_warmup_steps=warmup)
    if opts.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, num_epochs * len(opts.folds)))
    if opts.pruner == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"unknown --pruner '{opts.pruner}' (median, percentile, hyperband, none)")


def open_study(opts: SearchOptions, cfg: RunConfig, storage: optuna.storages.BaseStorage, worker_index: int = 0,
               create: bool = False) -> optuna.Study:
    """Create (``create``) or load the study ``opts.study_name``; a direction differing from an existing
    study's is refused, since the best trial would then mean the opposite."""
    sampler, pruner = make_sampler(opts, worker_index), make_pruner(opts, cfg.training.num_epochs)
    if create:
        study = optuna.create_study(storage=storage, study_name=opts.study_name, direction=opts.direction,
                                    sampler=sampler, pruner=pruner, load_if_exists=True)
    else:
        study = optuna.load_study(study_name=opts.study_name, storage=storage, sampler=sampler, pruner=pruner)
    if study.direction.name.lower() != opts.direction:
        raise ConfigError(f"study '{opts.study_name}' in {redact_storage(opts.storage)} was created with direction "
                          f"{study.direction.name.lower()}; pass --direction {study.direction.name.lower()} or use "
                          "another --study-name")
    return study


def counts(study: optuna.Study) -> dict[str, int]:
    """Trials per state name (COMPLETE, PRUNED, FAIL, RUNNING, WAITING) plus ``done`` = COMPLETE + PRUNED."""
    out = {state.name: 0 for state in TrialState}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] += 1
    out["done"] = out["COMPLETE"] + out["PRUNED"]
    return out


# ---------------------------------------------------------------- lost trials


def retry_lost_trial(study: optuna.Study, trial: FrozenTrial,
                     why: str = "no heartbeat within the grace period") -> None:
    """Called once per lost trial (already FAIL; by Optuna's heartbeat check or by :func:`fail_and_retry`):
    close its MLflow runs still RUNNING as FAILED, then re-queue it once with the same params."""
    log.warning("trial %d (worker %s) marked FAIL: %s; retrying it once with the same params", trial.number,
                trial.user_attrs.get("mltrack.worker", "unknown"), why)
    close_orphan_runs(trial.user_attrs, f"worker lost: {why}")
    RetryHeartbeatStaleTrialCallback(max_retry=1, inherit_intermediate_values=True)(study, trial)


def fail_and_retry(study: optuna.Study, storage: optuna.storages.BaseStorage, number: int, reason: str) -> bool:
    """Fail the RUNNING trial ``number`` and re-queue it; False if another worker got there first."""
    study_id = storage.get_study_id_from_name(study.study_name)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
    try:
        if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
            return False
    except UpdateFinishedTrialError:
        return False
    retry_lost_trial(study, storage.get_trial(trial_id), reason)
    return True


def reconcile(study: optuna.Study, storage: optuna.storages.BaseStorage, opts: SearchOptions) -> None:
    """Fail and retry lost trials: Optuna's heartbeat check for RDB, our heartbeat attribute for a journal."""
    if storage_kind(opts.storage) != "journal":
        optuna.storages.fail_stale_trials(study)
        return
    now, grace = time.time(), grace_s(opts.heartbeat_s)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        last = t.user_attrs.get(HEARTBEAT_ATTR) or (t.datetime_start.timestamp() if t.datetime_start else now)
        if now - float(last) > grace:
            fail_and_retry(study, storage, t.number, f"no heartbeat for {now - float(last):.0f} s (grace {grace} s)")


class _Heartbeat:
    """Writes ``mltrack.heartbeat`` (unix time) on the trial every ``interval`` s (journal storage only)."""

    def __init__(self, trial: optuna.Trial, interval: int, enabled: bool) -> None:
        self.trial, self.interval, self.enabled = trial, interval, enabled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="mltrack-heartbeat", daemon=True)

    def __enter__(self) -> "_Heartbeat":
        if self.enabled:
            self.trial.set_user_attr(HEARTBEAT_ATTR, time.time())
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.trial.set_user_attr(HEARTBEAT_ATTR, time.time())
            except UpdateFinishedTrialError:
                log.warning("trial %d was failed by another worker (heartbeat late); its result will be "
                            "discarded", self.trial.number)
                return


# ---------------------------------------------------------------- one trial


def suggest(trial: optuna.Trial, opts: SearchOptions) -> dict[str, Any]:
    """The trial's value for every key of the space (a retried trial gets its original values back)."""
    params: dict[str, Any] = {}
    for key, spec in opts.space.items():
        if spec.type == "categorical":
            params[key] = trial.suggest_categorical(key, list(spec.choices))
        elif spec.type == "int":
            params[key] = trial.suggest_int(key, int(spec.low), int(spec.high), step=int(spec.step or 1), log=spec.log)
        else:
            params[key] = trial.suggest_float(key, spec.low, spec.high, step=spec.step, log=spec.log)
    return params


class _Reporter:
    """Epoch callback of one fold: report ``metric`` at step ``offset + epoch``; raise StopTraining to prune."""

    def __init__(self, trial: optuna.Trial, metric: str, offset: int) -> None:
        self.trial, self.metric, self.offset = trial, metric, offset
        self.history: list[float] = []  # every epoch's value, restored epochs of a resumed run included

    def __call__(self, ctx: Any) -> None:
        from mltrack.trainers.loop import StopTraining

        metrics = ctx.last.metrics
        if self.metric not in metrics:
            shown = ", ".join(sorted(k for k in metrics if k.count("/") == 1))
            raise ConfigError(f"--metric {self.metric} is not a logged metric; choose one of {shown}")
        self.history = [float(row[self.metric]) for row in ctx.state.history if self.metric in row]
        self.trial.report(float(metrics[self.metric]), self.offset + ctx.state.epoch - 1)
        if self.trial.should_prune():
            raise StopTraining("pruned", status="KILLED")


class Objective:
    """``objective(trial) -> float`` for ``study.optimize``; see the module docstring for the run layout."""

    def __init__(self, cfg: RunConfig, opts: SearchOptions, study_run_id: str) -> None:
        self.cfg, self.opts, self.study_run_id = cfg, opts, study_run_id
        self.on_start: Callable[[], None] = lambda: None  # the worker releases its ask lock here
        self.current: Optional[int] = None  # number of the trial in progress (interrupt handling)
        self.failed = False

    def __call__(self, trial: optuna.Trial) -> float:
        self.on_start()
        self.current, self.failed = trial.number, False
        previous = dict(trial.user_attrs)  # non-empty only for the retry of a lost trial (attrs are copied)
        trial.set_user_attr("mltrack.trial_number", trial.number)
        trial.set_user_attr("mltrack.worker", f"{socket.gethostname()}:{os.getpid()}")
        params = suggest(trial, self.opts)
        cfg = apply_params(self.cfg, params)  # a ConfigError here is the user's space: it ends the search
        tags = {"mltrack.trial": str(trial.number), "optuna.study": self.opts.study_name}
        if "mltrack.trial_number" in previous:
            tags["mltrack.retry_of"] = str(previous["mltrack.trial_number"])
        journal = storage_kind(self.opts.storage) == "journal"
        with _Heartbeat(trial, self.opts.heartbeat_s, journal):
            try:
                if len(self.opts.folds) == 1:
                    return self._fold(trial, cfg, 0, RUN_ATTR, previous, "trial", tags)
                return self._folds(trial, cfg, params, previous, tags)
            except (optuna.TrialPruned, UserError):
                raise
            except Exception as err:  # noqa: BLE001 - the trial's own failure; the study goes on
                self.failed = True
                raise TrialError(f"trial {trial.number} failed: {type(err).__name__}: {err}") from err

    def _fold(self, trial: optuna.Trial, cfg: RunConfig, index: int, run_attr: str, previous: dict[str, Any],
              role: str, tags: dict[str, str]) -> float:
        from mltrack.run import train
        from mltrack.trainers.loop import StopTraining

        fold = self.opts.folds[index]
        suffix = f"_fold_{fold}" if len(self.opts.folds) > 1 else ""
        name = f"{self.opts.study_name}_trial_{trial.number}{suffix}"
        cfg = replace(cfg, **{"data.fold": fold, "tracking.run_name": name})
        resume = resume_point(previous.get(run_attr))
        reporter = _Reporter(trial, self.opts.metric, index * cfg.training.num_epochs)
        try:
            result = train(cfg, resume, parent_run_id=self.study_run_id, role=role, extra_tags=tags,
                           epoch_callback=reporter, on_start=lambda run_id: trial.set_user_attr(run_attr, run_id))
        except StopTraining as stop:
            if stop.reason == "pruned":
                raise optuna.TrialPruned(f"pruned after epoch {len(reporter.history) - 1} of fold {fold}") from None
            raise
        if reporter.history:
            best = max if self.opts.direction == "maximize" else min
            return best(reporter.history)
        if self.opts.metric == cfg.training.monitor and result.best_metric is not None:
            return float(result.best_metric)  # resumed after its last epoch: no epoch ran in this process
        raise TrialError(f"trial {trial.number}: no value of {self.opts.metric} was reported for fold {fold}")

    def _folds(self, trial: optuna.Trial, cfg: RunConfig, params: dict[str, Any], previous: dict[str, Any],
               tags: dict[str, str]) -> float:
        tracker = open_trial_run(self.cfg, self.opts, self.study_run_id, trial.number, params, tags,
                                 previous.get(RUN_ATTR))
        trial.set_user_attr(RUN_ATTR, tracker.run_id)
        status, reason = "FAILED", "exception"
        try:
            values = []
            for index, fold in enumerate(self.opts.folds):
                key = f"mltrack.fold_value.{fold}"
                if key in previous:  # a fold finished before a crash is not trained again
                    values.append(float(previous[key]))
                    continue
                value = self._fold(trial, cfg, index, f"mltrack.fold_run.{fold}", previous, "fold",
                                   {**tags, "mltrack.trial_run_id": tracker.run_id})
                trial.set_user_attr(key, value)
                tracker.log_metrics({f"fold_{fold}/{self.opts.metric}": value}, step=0)
                values.append(value)
            mean, std = statistics.fmean(values), statistics.pstdev(values)
            tracker.log_metrics({self.opts.metric: mean, f"{self.opts.metric}_std": std}, step=0)
            status, reason = "FINISHED", None
            return mean
        except optuna.TrialPruned:
            status, reason = "KILLED", "pruned"
            raise
        finally:
            tracker.finish(status, reason)


# ---------------------------------------------------------------- workers


def run_worker(cfg: RunConfig, opts: SearchOptions, study_run_id: str, worker_index: int = 0,
               log_file: Optional[Path] = None) -> int:
    """Join the study and run trials until it has ``trial_target`` finished ones, the timeout passes or a
    stop is requested; returns how many trials this worker ran. Between trials the console log goes to
    ``log_file`` (each trial's run logs to its own ``train.log``).

    "Check the budget, then ask" runs under a per-host file lock, so workers of one host never start
    more trials than the target. While the rest of the budget is running elsewhere the worker waits
    instead of leaving: if one of those trials is lost, its retry needs a live worker.
    """
    storage = open_storage(opts)
    study = open_study(opts, cfg, storage, worker_index)
    objective = Objective(cfg, opts, study_run_id)
    lock = AskLock(ask_lock_path(opts.storage, opts.study_name, Path(tempfile.gettempdir())))
    target, started, ran, failures = trial_target(opts), time.monotonic(), 0, 0
    while not stop_requested():
        if opts.timeout is not None and time.monotonic() - started >= opts.timeout:
            log.info("study %s: --timeout %.0f s reached; no new trials from this worker", opts.study_name,
                     opts.timeout)
            break
        with lock:
            reconcile(study, storage, opts)
            now = counts(study)
            if now["done"] >= target:
                break
            can_start = now["WAITING"] > 0 or now["done"] + now["RUNNING"] < target
            if can_start:
                objective.on_start = lock.release
                try:
                    _one_trial(study, storage, objective)
                finally:
                    setup_logging(log_file, os.environ.get("MLTRACK_LOG_LEVEL", "INFO"))
        if not can_start:
            time.sleep(POLL_S)
            continue
        ran += 1
        failures = failures + 1 if objective.failed else 0
        if failures >= MAX_CONSECUTIVE_FAILURES:
            raise UserError(f"study {opts.study_name}: {failures} trials in a row failed in this worker; see the "
                            "FAILED trial runs in MLflow (tag mltrack.exit_reason) and fix the space or config")
    return ran


def _one_trial(study: optuna.Study, storage: optuna.storages.BaseStorage, objective: Objective) -> None:
    try:
        study.optimize(objective, n_trials=1, catch=(TrialError,), gc_after_trial=True)
    except UpdateFinishedTrialError:
        log.warning("trial %s was failed by another worker while it ran (heartbeat late); its result is "
                    "discarded and its retry runs instead", objective.current)
    except SystemExit:  # SIGTERM/SIGINT in training: the run is KILLED with a checkpoint; re-queue the trial
        if objective.current is not None:
            fail_and_retry(study, storage, objective.current, "interrupted by a signal")
        raise


def run_worker_from_spec(spec_path: str, worker_index: int) -> int:
    """Entry point of a worker process (``mltrack search --worker <spec>``)."""
    cfg, opts, study_run_id = read_worker_spec(spec_path)
    logs = Path(cfg.tracking.runs_dir) / f"study_{opts.study_name}" / "logs"
    log_file = logs / f"worker_{worker_index}_{os.getpid()}.log"
    setup_logging(log_file, os.environ.get("MLTRACK_LOG_LEVEL", "INFO"))
    previous = install_stop_handler()
    try:
        return run_worker(cfg, opts, study_run_id, worker_index, log_file)
    finally:
        restore_stop_handler(previous)


# ---------------------------------------------------------------- the search


def run_search(cfg: RunConfig, opts: SearchOptions) -> SearchResult:
    """``mltrack search``: create or join the study and its MLflow study run, run trials in this process
    (one worker) or in worker processes, then log the summary; optionally retrain the best config.

    Raises SearchIncomplete when the workers ended before the study reached its target (no timeout)."""
    check_workers(opts.storage, opts.workers)
    if not opts.metric.startswith(("val/", "train/")):
        raise ConfigError(f"--metric {opts.metric}: use an epoch metric such as val/acc, val/loss or val/f1_macro")
    storage = open_storage(opts)
    study = open_study(opts, cfg, storage, create=True)
    tracker, study_dir = open_study_run(cfg, opts, study.user_attrs.get(STUDY_RUN_ATTR))
    study.set_user_attr(STUDY_RUN_ATTR, tracker.run_id)
    os.environ.pop("MLFLOW_RUN_ID", None)  # inside `mlflow run` that run is the study run; trials are children
    log_file = study_dir / "logs" / "search.log"
    setup_logging(log_file, os.environ.get("MLTRACK_LOG_LEVEL", "INFO"))
    now = counts(study)
    log.info("study %s (%s): %d of %d trials finished; study run %s", opts.study_name,
             redact_storage(opts.storage), now["done"], trial_target(opts), tracker.run_id)
    previous = install_stop_handler()
    status, reason, codes = "FAILED", "exception", [0]
    try:
        if opts.workers == 1:
            run_worker(cfg, opts, tracker.run_id, log_file=log_file)
        else:
            codes = run_worker_processes(cfg, opts, tracker.run_id, study_dir)
        result = summarize(study, cfg, opts, tracker, study_dir)
        tracker.log_artifacts(study_dir / "logs", "logs")
        status, reason = ("KILLED", stop_requested()) if stop_requested() else ("FINISHED", None)
    except SystemExit:
        status, reason = "KILLED", stop_requested() or "interrupted"
        raise
    except BaseException as err:  # noqa: BLE001 - the study run's status must be set on every path
        reason = f"{type(err).__name__}: {str(err)[:200]}"
        raise
    finally:
        restore_stop_handler(previous)
        tracker.finish(status, reason)
    if stop_requested():
        raise SystemExit(143 if stop_requested() == "SIGTERM" else 130)
    if result.counts["done"] < trial_target(opts) and opts.timeout is None:
        raise SearchIncomplete(f"study {opts.study_name} has {result.counts['done']} of {trial_target(opts)} finished "
                               f"trials (worker exit codes {codes}); run the same command again to continue it")
    if opts.retrain_best and result.best_config is not None:
        best_cfg = apply_params(cfg, study.best_trial.params)
        result.retrain_run_ids = retrain_best(best_cfg, opts, tracker.run_id, study.best_trial.number)
    return result


def summarize(study: optuna.Study, cfg: RunConfig, opts: SearchOptions, tracker: Any, study_dir: Path) -> SearchResult:
    """Log trial counts, the best trial (number, value, run id), best_config.yaml, trials.csv and plots."""
    now = counts(study)
    tracker.log_metrics({f"trials_{k.lower()}": now[k] for k in ("COMPLETE", "PRUNED", "FAIL")}, step=now["done"])
    result = SearchResult(opts.study_name, tracker.run_id, now)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if complete:
        best = study.best_trial
        best_cfg = replace(apply_params(cfg, best.params), **{"data.fold": opts.folds[0]})
        result.best_trial, result.best_value = best.number, float(best.value)
        result.best_run_id = best.user_attrs.get(RUN_ATTR)
        result.best_config = write_best_config(best_cfg, study_dir, opts.study_name, best.number, best.value)
        tracker.log_artifact(result.best_config)
        tracker.set_tags({"optuna.best_trial": str(best.number), "optuna.best_value": repr(float(best.value)),
                          "optuna.best_run_id": result.best_run_id or ""})
        tracker.log_metrics({"best_value": float(best.value)}, step=now["done"])
    else:
        log.warning("study %s has no COMPLETE trial yet: no best config", opts.study_name)
    study.trials_dataframe().to_csv(study_dir / "trials.csv", index=False)
    tracker.log_artifact(study_dir / "trials.csv")
    log_plots(study, tracker, study_dir / "plots", len(complete))
    return result


PLOTS = {"optimization_history": "plot_optimization_history", "param_importances": "plot_param_importances",
         "parallel_coordinate": "plot_parallel_coordinate", "intermediate_values": "plot_intermediate_values"}


def log_plots(study: optuna.Study, tracker: Any, plot_dir: Path, n_complete: int) -> list[str]:
    """Optuna's matplotlib plots as PNG artifacts under ``plots/`` (viewable without any server).
    Importances need 2 finished trials; a plot Optuna cannot draw yet is skipped with a log line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as views

    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, func in PLOTS.items():
        if name == "param_importances" and n_complete < 2:
            log.info("plot %s skipped: needs at least 2 completed trials", name)
            continue
        try:
            axes = getattr(views, func)(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as err:
            log.info("plot %s skipped: %s", name, err)
            continue
        fig = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        fig.set_size_inches(9, 6)
        fig.tight_layout()
        fig.savefig(plot_dir / f"{name}.png", format="png")
        plt.close(fig)
        tracker.log_artifact(plot_dir / f"{name}.png", "plots")
        written.append(name)
    return written
