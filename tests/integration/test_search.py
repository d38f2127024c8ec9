"""``mltrack search`` end to end with real storages and real processes (issue 6; RELIABILITY T13, T14).

Every study trains a tiny CNN on 8 px images for 1-4 epochs; MLflow is a sqlite store in the test's
directory. The parallel and crash cases run the real CLI as subprocesses so processes and signals are real.
"""
from __future__ import annotations

import glob
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import optuna
import pytest
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from mltrack.cli import cli, search_main
from mltrack.cli.args import normalize_args, option_arity
from mltrack.config import RunConfig, load_config
from mltrack.errors import ConfigError
from mltrack.search import HEARTBEAT_ATTR, fail_and_retry, open_storage, open_study, reconcile, suggest
from mltrack.search_space import SearchOptions, apply_params, open_study_run, parse_space

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240),
              pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]
ROOT = Path(__file__).resolve().parents[2]
TINY = ["--num-epochs", "1", "--set", "data.dataset_name=tiny", "--set", "data.image_size=8",
        "--set", "data.num_workers=0", "--set", "training.batch_size=8", "--set", "tracking.progress=off",
        "--set", "tracking.confusion_every_epoch=false", "--set", "tracking.tensorboard=false",
        "--set", "scheduler.name=none", "--set", "tracking.log_model=false"]  # trials here need no model/
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
    assert "mltrack.dp_note" not in study.data.tags
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
    # lr 1e-9 leaves the train loss at ln(3) while lr 0.01 lowers it by epoch 1: once trials of both have
    # finished, the median pruner must prune a later 1e-9 trial at epoch 1 (warm-up: epoch 0). The random
    # sampler, seeded by training.seed (42), proposes 1e-9, 0.01, 0.01, 1e-9.
    space = write_space(workdir / "space.yaml", {"optimizer.lr": {"type": "categorical", "choices": [0.01, 1e-9]}})
    args = search_args(space, "--num-epochs", "3", "--n-trials", "4", "--sampler", "random", "--pruner", "median",
                       "--pruner-startup-trials", "1", "--pruner-warmup-epochs", "1", "--metric", "train/loss",
                       "--direction", "minimize", "--study-name", "prune")
    code, out = run_cli(args)
    assert code == 0, out
    trials = load_trials("sqlite:///optuna.db", "prune")
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, [(t.number, t.params, t.state, t.intermediate_values) for t in trials]
    assert all(t.params["optimizer.lr"] == 1e-9 for t in pruned)
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 4
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


def test_mlproject_search_entry_point_reaches_the_cli() -> None:
    from mlflow.projects._project_spec import load_project

    entry = load_project(str(ROOT)).get_entry_point("search")
    sample = {"config": "c.yaml", "space": "s.yaml", "n_trials": "7", "study_name": "st", "storage": "journal:./j",
              "workers": "3", "sampler": "random", "pruner": "percentile", "metric": "val/loss",
              "direction": "minimize", "folds": "0,1", "timeout": "60", "data_dir": "data/my data",
              "num_epochs": "2", "overrides": "training.seed=7 optimizer.name=sgd"}
    assert set(entry.parameters) == set(sample)
    command = cli.get_command(None, "search")  # type: ignore[arg-type]

    def parsed(params: dict[str, str]) -> dict[str, Any]:
        argv = shlex.split(entry.compute_command(params, storage_dir=None))
        assert argv[:4] == ["python", "-m", "mltrack", "search"]
        return command.make_context("search", normalize_args(argv[4:], option_arity(command))).params

    given = parsed(sample)
    assert (given["config"], given["space"]) == (Path("c.yaml"), Path("s.yaml"))
    assert (given["n_trials"], given["timeout"]) == (7, 60)
    assert (given["study_name"], given["storage"], given["workers"], given["folds"]) == ("st", "journal:./j", 3, "0,1")
    assert (given["sampler"], given["pruner"], given["metric"], given["direction"]) == \
        ("random", "percentile", "val/loss", "minimize")
    assert (given["data_dir"], given["num_epochs"]) == ("data/my data", 2)
    assert given["overrides"] == "training.seed=7 optimizer.name=sgd"
    defaults = parsed({})  # "" means: the CLI's own default
    assert (defaults["sampler"], defaults["workers"], defaults["storage"], defaults["folds"]) == ("tpe", 1, None, None)


def test_ml_search_alias_is_the_search_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        search_main(["--help"])
    assert done.value.code == 0 and "--n-trials" in capsys.readouterr().out


@pytest.mark.parametrize("base, space", [
    ({"training.trainer_type": "dp"}, {"optimizer.lr": {"type": "float", "low": 1e-3, "high": 1e-2}}),
    ({}, {"training.trainer_type": {"type": "categorical", "choices": ["standard", "dp"]}}),
])
def test_dp_study_run_says_selection_is_not_privacy_accounted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base: dict[str, Any], space: dict[str, Any]) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    cfg = apply_params(RunConfig(), base)
    opts = SearchOptions(space=parse_space(space, cfg), space_path="s.yaml", study_name="dp",
                         storage=f"journal:{tmp_path / 'j'}")
    tracker, _ = open_study_run(cfg, opts, None)
    tracker.finish()
    tags = MlflowClient().get_run(tracker.run_id).data.tags
    assert tags["mltrack.role"] == "study"
    assert tags["mltrack.dp_note"] == "hyper-parameter selection not privacy-accounted"


# ---------------------------------------------------------------- study plumbing (no training)


def lr_options(storage: str, **kw: Any) -> SearchOptions:
    space = parse_space({"optimizer.lr": {"type": "float", "low": 0.01, "high": 0.05, "step": 0.01},
                         "training.batch_size": {"type": "categorical", "choices": [8, 16]}}, RunConfig())
    return SearchOptions(space=space, space_path="space.yaml", study_name="plumbing", storage=storage, **kw)


@pytest.mark.parametrize("sampler, pruner", [("tpe", "median"), ("random", "percentile"), ("grid", "hyperband"),
                                             ("cmaes", "none")])
def test_every_sampler_and_pruner_drives_a_study(tmp_path: Path, sampler: str, pruner: str) -> None:
    opts = lr_options(f"journal:{tmp_path / 'o.journal'}", sampler=sampler, pruner=pruner)
    study = open_study(opts, RunConfig(), open_storage(opts), create=True)

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, opts)
        for epoch in range(3):
            trial.report(params["optimizer.lr"] * (epoch + 1), epoch)
        return params["optimizer.lr"]

    study.optimize(objective, n_trials=4)
    trials = study.get_trials()
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:
        assert 0.01 <= t.params["optimizer.lr"] <= 0.05 and t.params["training.batch_size"] in (8, 16)
    if sampler == "grid":
        assert len({tuple(t.params.values()) for t in trials}) == 4  # a grid never repeats a point


def test_joining_a_study_with_the_opposite_direction_is_refused(tmp_path: Path) -> None:
    opts = lr_options(f"journal:{tmp_path / 'o.journal'}")
    open_study(opts, RunConfig(), open_storage(opts), create=True)
    flipped = lr_options(opts.storage, direction="minimize")
    with pytest.raises(ConfigError, match="--direction maximize"):
        open_study(flipped, RunConfig(), open_storage(flipped))


def test_journal_reconciliation_fails_a_silent_trial_once_and_requeues_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No heartbeat in a journal: a RUNNING trial whose mltrack.heartbeat is older than the grace period
    is failed by exactly one of the workers that notice, its MLflow run is closed as FAILED, and it is
    re-queued once with the same params; a trial that beats is left alone."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    opts = lr_options(f"journal:{tmp_path / 'o.journal'}", heartbeat_s=1)
    storage = open_storage(opts)
    study = open_study(opts, RunConfig(), storage, create=True)
    silent, alive = study.ask(), study.ask()
    for trial, beat in ((silent, time.time() - 60), (alive, time.time())):
        suggest(trial, opts)
        trial.set_user_attr(HEARTBEAT_ATTR, beat)
    silent.set_user_attr("mlflow_run_id", run_id)
    other_storage = open_storage(opts)  # a second worker process's view of the same journal
    other = open_study(opts, RunConfig(), other_storage)
    reconcile(study, storage, opts)
    reconcile(other, other_storage, opts)
    assert fail_and_retry(other, other_storage, silent.number, "late") is False  # already failed: no 2nd retry
    trials = study.get_trials()
    assert [t.state for t in trials[:2]] == [TrialState.FAIL, TrialState.RUNNING]
    (retry,) = [t for t in trials if t.state == TrialState.WAITING]
    assert retry.params == trials[0].params and RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == 0
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and "worker lost" in run.data.tags["mltrack.exit_reason"]


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
    proc = run_subprocess(search_args(space, "--n-trials", "5", "--workers", "4", "--pruner", "none",
                                      "--storage", "journal:./optuna.journal", "--study-name", "par"), workdir)
    assert proc.returncode == 0, proc.stdout[-3000:]
    check_parallel_study(workdir, _journal(workdir / "optuna.journal"), "par", 5, proc.stdout)


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
        _wait_for_committed_epoch(first, victim.user_attrs["mlflow_run_id"])
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


def _wait_for_committed_epoch(proc: subprocess.Popen[bytes], run_id: str, timeout: float = 60) -> None:
    """Until the run's epoch 0 metrics are in MLflow: they go out after its checkpoint (RELIABILITY rule 4),
    which the writer thread writes and uploads while the next epoch trains, so a trial's Optuna report alone
    does not mean a checkpoint exists for the retry to resume from."""
    deadline = time.monotonic() + timeout
    while not MlflowClient().get_metric_history(run_id, "val/acc"):
        assert proc.poll() is None, "the search ended before it could be killed"
        assert time.monotonic() < deadline, f"no epoch of run {run_id} committed in {timeout} s"
        time.sleep(0.1)


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


# ---------------------------------------------------------------- PostgreSQL


PG_PASSWORD = "s3cret-pw"  # trust auth ignores it; it is there to prove it never reaches MLflow or the logs


def pg_binary(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


@pytest.fixture
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL server on 127.0.0.1 (initdb in a temp dir, trust auth); yields a storage URL."""
    initdb, pg_ctl = pg_binary("initdb"), pg_binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL server binaries not found; install them with: apt-get install -y postgresql")
    # SQLAlchemy 2.1 maps postgresql:// to psycopg 3 (the dev extra installs psycopg[binary]).
    psycopg = pytest.importorskip("psycopg", reason="psycopg missing; pip install -e '.[dev]' installs it")

    prefix: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="mltrack-pg-"))
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(base, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data = base / "data"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.STDOUT, "check": True, "timeout": 120}
    try:
        subprocess.run([*prefix, initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                        "--no-sync"], **quiet)
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-l", str(base / "server.log"), "-w", "-t", "60", "-o",
                        f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off", "start"], **quiet)
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE optuna")
        yield f"postgresql://postgres:{PG_PASSWORD}@127.0.0.1:{port}/optuna"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.STDOUT, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def test_workers_share_one_postgresql_study(workdir: Path, postgres: str) -> None:
    space = write_space(workdir / "space.yaml", {"optimizer.lr": {"type": "float", "low": 1e-3, "high": 3e-2}})
    proc = run_subprocess(search_args(space, "--n-trials", "4", "--workers", "2", "--pruner", "none",
                                      "--storage", postgres, "--study-name", "pg"), workdir)
    assert proc.returncode == 0, proc.stdout[-3000:]
    check_parallel_study(workdir, postgres, "pg", 4, proc.stdout)
    runs = mlflow_runs(workdir)
    (study,) = by_role(runs, "study")
    assert study.data.tags["optuna.storage"] == postgres.replace(f"postgres:{PG_PASSWORD}@", "")
    everything = [proc.stdout, *(str(r.data.tags) + str(r.data.params) for r in runs)]
    everything += [p.read_text(errors="replace") for p in (workdir / "runs").rglob("*") if p.is_file()
                   and p.suffix in (".log", ".yaml", ".json", ".txt", ".csv")]
    assert not any(PG_PASSWORD in text for text in everything)
