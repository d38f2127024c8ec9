"""``mltrack search`` end to end with real storages and real processes (issue 6; RELIABILITY T13, T14).

Every study trains a tiny CNN on 8 px images for 1-4 epochs; MLflow is a sqlite store in the test's
directory. The parallel and crash cases run the real CLI as subprocesses so processes and signals are real.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from mltrack.cli import cli
from mltrack.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
ROOT = Path(__file__).resolve().parents[2]
TINY = ["--num-epochs", "1", "--set", "data.dataset_name=tiny", "--set", "data.image_size=8",
        "--set", "data.num_workers=0", "--set", "training.batch_size=8", "--set", "tracking.progress=off",
        "--set", "tracking.confusion_every_epoch=false", "--set", "tracking.tensorboard=false",
        "--set", "scheduler.name=none"]
LOCK_ERRORS = ("database is locked", "OperationalError", "LockError")


@pytest.fixture
def workdir(tmp_path: Path, tiny_dataset: Any, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cwd = tmp_path holding data/ (3 classes x 10 images, 2 folds); MLflow at tmp_path/mlflow.db."""
    tiny_dataset(n_classes=3, per_class=10, size=8, name="data", folds=2)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLTRACK_SEARCH_STORAGE"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def write_space(path: Path, tree: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


def search_args(space: Path, *extra: str) -> list[str]:
    return ["search", "--data-dir", "data", *TINY, "--space", str(space), *extra]


def run_cli(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(cli, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def run_subprocess(args: list[str], cwd: Path, timeout: float = 200) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mltrack", *args], cwd=cwd, env=subprocess_env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)


def subprocess_env() -> dict[str, str]:
    # One thread per process: the workers share 2 cores, and oversubscription only slows every one of them.
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def mlflow_runs(tmp: Path) -> list[Any]:
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, max_results=1000)


def by_role(runs: list[Any], role: str) -> list[Any]:
    return [r for r in runs if r.data.tags.get("mltrack.role") == role]


def load_trials(storage: Any, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


# ---------------------------------------------------------------- one process


def test_two_trial_study_with_folds_logs_parent_and_child_runs(workdir: Path) -> None:
    space = write_space(workdir / "space.yaml", {
        "optimizer.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
        "training.label_smoothing": {"type": "categorical", "choices": [0.0, 0.1]}})
    code, out = run_cli(search_args(space, "--n-trials", "2", "--folds", "0,1", "--sampler", "random",
                                    "--study-name", "e2e", "--retrain-best"))
    assert code == 0, out
    trials = load_trials("sqlite:///optuna.db", "e2e")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    runs = mlflow_runs(workdir)
    (study,) = by_role(runs, "study")
    assert study.info.status == "FINISHED"
    assert study.data.tags["optuna.study"] == "e2e" and study.data.tags["optuna.storage"] == "sqlite:///optuna.db"
    best = max(trials, key=lambda t: t.value)
    assert study.data.tags["optuna.best_trial"] == str(best.number)
    assert study.data.tags["optuna.best_run_id"] == best.user_attrs["mlflow_run_id"]
    # Study -> runs, never deeper: every run but the study is its direct child.
    assert all(r.data.tags.get("mlflow.parentRunId") == study.info.run_id for r in runs if r is not study)
    trial_runs = {r.info.run_id: r for r in by_role(runs, "trial")}
    assert len(trial_runs) == 2
    for t in trials:
        run = trial_runs[t.user_attrs["mlflow_run_id"]]
        assert run.info.status == "FINISHED" and run.data.tags["mltrack.trial"] == str(t.number)
        assert float(run.data.params["optimizer.lr"]) == t.params["optimizer.lr"]
        folds = [run.data.metrics["fold_0/val/acc"], run.data.metrics["fold_1/val/acc"]]
        assert run.data.metrics["val/acc"] == pytest.approx(sum(folds) / 2) == pytest.approx(t.value)
    fold_runs = by_role(runs, "fold")
    assert sorted((r.data.tags["mltrack.trial"], r.data.tags["mltrack.fold"]) for r in fold_runs) == \
        [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")]
    assert {r.data.tags["mltrack.trial_run_id"] for r in fold_runs} == set(trial_runs)
    retrained = [r for r in runs if r.data.tags.get("mltrack.retrain") == "best"]
    assert sorted(r.data.tags["mltrack.fold"] for r in retrained) == ["0", "1"]
    assert all(float(r.data.params["optimizer.lr"]) == best.params["optimizer.lr"] for r in retrained)
    client = MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(study.info.run_id)}
    assert {"best_config.yaml", "trials.csv", "search_space.yaml", "plots"} <= artifacts
    plots = {Path(a.path).name for a in client.list_artifacts(study.info.run_id, "plots")}
    assert plots == {"optimization_history.png", "param_importances.png", "parallel_coordinate.png",
                     "intermediate_values.png"}
    local = Path(client.download_artifacts(study.info.run_id, "best_config.yaml", str(workdir)))
    cfg = load_config(local)  # a complete config that `mltrack train --config` accepts
    assert cfg.optimizer.lr == best.params["optimizer.lr"]
    assert cfg.training.label_smoothing == best.params["training.label_smoothing"]


def test_pruner_prunes_bad_trials_and_mlflow_says_so(workdir: Path) -> None:
    # lr 1e-9 leaves the train loss at ln(3) while lr 0.01 lowers it by epoch 1: with one finished trial
    # of each, the median pruner must prune a later 1e-9 trial at epoch 1 (warm-up: epoch 0).
    space = write_space(workdir / "space.yaml", {"optimizer.lr": {"type": "categorical", "choices": [0.01, 1e-9]}})
    args = search_args(space, "--num-epochs", "3", "--n-trials", "5", "--sampler", "random", "--pruner", "median",
                       "--pruner-startup-trials", "1", "--pruner-warmup-epochs", "1", "--metric", "train/loss",
                       "--direction", "minimize", "--study-name", "prune")
    code, out = run_cli(args)
    assert code == 0, out
    trials = load_trials("sqlite:///optuna.db", "prune")
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, [(t.number, t.params, t.state, t.intermediate_values) for t in trials]
    assert all(t.params["optimizer.lr"] == 1e-9 for t in pruned)
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 5
    runs = {r.info.run_id: r for r in mlflow_runs(workdir)}
    client = MlflowClient()
    for t in trials:
        run = runs[t.user_attrs["mlflow_run_id"]]
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        if t.state == TrialState.PRUNED:
            assert run.info.status == "KILLED" and run.data.tags["mltrack.exit_reason"] == "pruned"
            assert steps == [0, 1]  # stopped early: epoch 2 never ran
        else:
            assert run.info.status == "FINISHED" and "mltrack.exit_reason" not in run.data.tags
            assert steps == [0, 1, 2]


def test_sqlite_with_several_workers_is_refused_with_advice(workdir: Path) -> None:
    space = write_space(workdir / "space.yaml", {"optimizer.lr": {"type": "float", "low": 1e-3, "high": 1e-2}})
    code, out = run_cli(search_args(space, "--workers", "2"))
    assert code == 2
    assert "database is locked" in out and "journal:./optuna.journal" in out and "postgresql://" in out
    assert not (workdir / "optuna.db").exists()


def test_bad_space_fails_before_any_run(workdir: Path) -> None:
    space = write_space(workdir / "space.yaml", {"optimizer.lrr": {"type": "float", "low": 1e-3, "high": 1e-2}})
    code, out = run_cli(search_args(space))
    assert code == 2 and "optimizer.lrr" in out and "optimizer.lr" in out
    assert not (workdir / "optuna.db").exists() and not mlflow_runs(workdir)


# ---------------------------------------------------------------- several processes


def check_parallel_study(workdir: Path, storage: str, name: str, n_trials: int, output: str) -> None:
    """T14's checks: unique numbers, all finished, no lock errors, exactly one MLflow trial run per trial."""
    assert not any(err in output for err in LOCK_ERRORS), output[-3000:]
    trials = load_trials(storage, name)
    assert len({t.number for t in trials}) == len(trials) == n_trials
    assert all(t.state == TrialState.COMPLETE for t in trials), [(t.number, t.state) for t in trials]
    assert len({t.user_attrs["mltrack.worker"] for t in trials}) >= 2  # trials really ran in parallel workers
    runs = mlflow_runs(workdir)
    (study,) = by_role(runs, "study")
    trial_runs = by_role(runs, "trial")
    assert sorted(int(r.data.tags["mltrack.trial"]) for r in trial_runs) == sorted(t.number for t in trials)
    assert {r.info.run_id for r in trial_runs} == {t.user_attrs["mlflow_run_id"] for t in trials}
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all(r.data.tags["mlflow.parentRunId"] == study.info.run_id for r in trial_runs)


def test_four_workers_share_one_journal_study(workdir: Path) -> None:
    space = write_space(workdir / "space.yaml", {"optimizer.lr": {"type": "float", "low": 1e-3, "high": 3e-2}})
    proc = run_subprocess(search_args(space, "--n-trials", "6", "--workers", "4", "--pruner", "none",
                                      "--storage", "journal:./optuna.journal", "--study-name", "par"), workdir)
    assert proc.returncode == 0, proc.stdout[-3000:]
    check_parallel_study(workdir, _journal(workdir / "optuna.journal"), "par", 6, proc.stdout)


def _journal(path: Path) -> Any:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(str(path)))


def test_killed_worker_trial_is_failed_retried_once_and_resumed(workdir: Path) -> None:
    """T13 with SQLite + heartbeat: kill -9 the (single) worker in its trial's epoch 2, run the command
    again; the lost trial is failed, retried once with the same params from its checkpoint, and the study
    still reaches its trial count."""
    space = write_space(workdir / "space.yaml", {"optimizer.lr": {"type": "float", "low": 1e-3, "high": 3e-2}})
    args = search_args(space, "--num-epochs", "4", "--n-trials", "2", "--pruner", "none", "--heartbeat-interval", "1",
                       "--study-name", "crash")
    with open(workdir / "first.log", "wb") as log:
        first = subprocess.Popen([sys.executable, "-m", "mltrack", *args], cwd=workdir, env=subprocess_env(),
                                 stdout=log, stderr=subprocess.STDOUT)
    try:
        victim = wait_for_epoch(first, workdir / "optuna.db", "crash", step=1)
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    proc = run_subprocess(args, workdir)
    assert proc.returncode == 0, proc.stdout[-3000:]
    trials = load_trials("sqlite:///optuna.db", "crash")
    lost = trials[victim.number]
    assert lost.state == TrialState.FAIL
    retries = [t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == lost.number]
    assert len(retries) == 1 and retries[0].params == lost.params and retries[0].state == TrialState.COMPLETE
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2
    run_id = lost.user_attrs["mlflow_run_id"]
    assert retries[0].user_attrs["mlflow_run_id"] == run_id  # the retry continued the lost trial's run
    runs = {r.info.run_id: r for r in mlflow_runs(workdir)}
    assert all(r.info.status != "RUNNING" for r in runs.values())
    resumed = runs[run_id]
    assert resumed.info.status == "FINISHED" and resumed.data.tags["mltrack.retry_of"] == str(lost.number)
    assert "mltrack.resumed_from" in resumed.data.tags  # from its checkpoint, not from scratch
    steps = sorted(m.step for m in MlflowClient().get_metric_history(run_id, "val/acc"))
    assert steps == [0, 1, 2, 3]  # every epoch logged exactly once across the crash


def wait_for_epoch(proc: subprocess.Popen[bytes], db: Path, name: str, step: int,
                   timeout: float = 150) -> optuna.trial.FrozenTrial:
    """The RUNNING trial once it reported ``step`` (its checkpoint for that epoch is written by then)."""
    deadline = time.monotonic() + timeout
    storage = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the search ended before it could be killed"
        if storage is None and db.exists():
            time.sleep(1.0)  # let the search create its tables first
            storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
        try:
            for t in load_trials(storage, name) if storage is not None else []:
                if t.state == TrialState.RUNNING and step in t.intermediate_values:
                    return t
        except KeyError:  # the study is not created yet
            pass
        time.sleep(0.1)
    raise TimeoutError(f"no trial reached step {step}")
