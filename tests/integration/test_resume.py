"""Issue 5, exact resume (RELIABILITY T06, T07, T09, T23): the real CLI in subprocesses, killed for real,
resumed from ``runs:/<id>/weights/last.pt`` into the same run, compared bit for bit with a run that was
never interrupted.

The helpers at the top are shared by the other issue-5 test files (test_faults, test_exit_paths,
test_outage). Uninterrupted reference runs are started once per pytest process (``baseline``) and run
in parallel with the runs that are compared against them.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import synthetic_image

REPO = Path(__file__).resolve().parents[2]
EPOCHS = 4
# Tiny but real: 3 classes x 12 PNGs of 16 px (15 train images -> 4 batches of 4, the last one of 3),
# random affine augmentation, deterministic algorithms, nothing that would slow a 2-core runner (no model/
# either: these tests resume checkpoints, and packaging the pyfunc costs each process ~3 s).
TRAIN_SETS = ["data.dataset_name=tiny", "data.image_size=16", "training.deterministic=true",
              "tracking.progress=off", "tracking.tensorboard=false", "tracking.confusion_every_epoch=false",
              "tracking.log_model=false"]
TRAINER_SETS = {"standard": [], "mixed_precision": ["training.amp_dtype=bfloat16"],
                "dp": ["training.dp.noise_multiplier=1.0", "training.dp.max_grad_norm=1.0"]}
COMPARED = ("train/loss", "train/acc", "val/loss", "val/acc", "val/f1_macro", "lr")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


# ---------------------------------------------------------------- helpers (shared)


@dataclass
class Done:
    rc: int
    out: str  # stdout + stderr
    seconds: float


class Cli:
    """``python -m <module> <args>`` started now in its own process (real signals reach only it)."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str], name: str, module: str = "mltrack") -> None:
        cwd.mkdir(parents=True, exist_ok=True)
        self.log = cwd / f"{name}.log"
        self.args = args
        self.started = time.monotonic()
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env=env, stdout=out,
                                         stderr=subprocess.STDOUT)
        self._done: Optional[Done] = None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = 300) -> Done:
        if self._done is None:
            try:
                rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"timed out: {' '.join(self.args)}\n{self.output()[-3000:]}") from None
            self._done = Done(rc, self.output(), time.monotonic() - self.started)
        return self._done

    def ok(self, timeout: float = 300) -> Done:
        done = self.wait(timeout)
        assert done.rc == 0, f"rc={done.rc}: {' '.join(self.args)}\n{done.out[-4000:]}"
        return done

    def wait_for(self, text: str, timeout: float = 180) -> None:
        """Block until ``text`` appears in the output (the process must still be alive)."""
        deadline = time.monotonic() + timeout
        while text not in self.output():
            assert self.proc.poll() is None, f"exited rc={self.proc.returncode} before '{text}':\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"'{text}' not seen in {timeout} s:\n{self.output()[-3000:]}"
            time.sleep(0.05)

    def wait_stopped(self, timeout: float = 180) -> None:
        """Block until the process has SIGSTOPped itself (MLTRACK_FAULT_ACTION=stop)."""
        deadline = time.monotonic() + timeout
        while _proc_state(self.proc.pid) != "T":
            assert self.proc.poll() is None, f"exited rc={self.proc.returncode}:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"not stopped after {timeout} s:\n{self.output()[-3000:]}"
            time.sleep(0.05)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "?"


def make_dataset(root: Path) -> Path:
    """``root/raw/c<i>/img_<j>.png`` (3 classes x 12) and 2-fold splits; returns ``root``."""
    from PIL import Image

    from mltrack.data.splits import make_splits

    if not (root / "splits").is_dir():
        for c in range(3):
            (root / "raw" / f"c{c}").mkdir(parents=True, exist_ok=True)
            for j in range(12):
                Image.fromarray(synthetic_image(c, j, 16)).save(root / "raw" / f"c{c}" / f"img_{j:03d}.png")
        make_splits(root / "raw", root / "splits", folds=2, test_fraction=0.2, seed=42)
    return root


class Store:
    """A sqlite MLflow store (copied from an initialised template: no schema migration per test)."""

    def __init__(self, db: Path, template: Path) -> None:
        if not db.exists():
            shutil.copy(template, db)
        self.db = db
        self.uri = f"sqlite:///{db}"
        self.client = MlflowClient(tracking_uri=self.uri)

    def runs(self) -> list[Any]:
        exps = [e.experiment_id for e in self.client.search_experiments()]
        return list(self.client.search_runs(exps)) if exps else []

    def only_run(self) -> Any:
        runs = self.runs()
        assert len(runs) == 1, [r.info.run_id for r in runs]
        return runs[0]

    def run(self, run_id: str) -> Any:
        return self.client.get_run(run_id)

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in self.client.get_metric_history(run_id, key))


class Session:
    """Shared per pytest process: the root folder, the dataset, the template store, the baselines."""

    root: Optional[Path] = None
    baselines: dict[str, tuple[Cli, Store]] = {}

    @classmethod
    def setup(cls, factory: pytest.TempPathFactory) -> Path:
        if cls.root is None:
            root = factory.mktemp("issue5")
            make_dataset(root / "data")
            MlflowClient(tracking_uri=f"sqlite:///{root / 'template.db'}").search_experiments()
            cls.root = root
        return cls.root


def env_for(store_uri: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLTRACK_FAULT", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT"))}
    env.update({"MLFLOW_TRACKING_URI": store_uri, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                "MKL_NUM_THREADS": "1", "MLTRACK_FINISH_TIMEOUT_S": "30"})
    env.update(extra)
    return env


def train_args(root: Path, workdir: Path, trainer: str = "standard", workers: int = 0,
               epochs: int = EPOCHS, *extra: str) -> list[str]:
    args = ["train", "--data-dir", str(root / "data"), "--device", "cpu", "--batch-size", "4",
            "--num-epochs", str(epochs), "--num-workers", str(workers), "--trainer-type", trainer,
            "--set", f"tracking.runs_dir={workdir / 'runs'}"]
    for item in TRAIN_SETS + TRAINER_SETS[trainer]:
        args += ["--set", item]
    return args + list(extra)


def start_train(root: Path, name: str, trainer: str = "standard", workers: int = 0, epochs: int = EPOCHS,
                extra: tuple[str, ...] = (), **env: str) -> tuple[Cli, Store]:
    """Start a fresh training run in ``root/name`` with its own store (so runs can go in parallel)."""
    workdir = root / name
    workdir.mkdir(parents=True, exist_ok=True)
    store = Store(workdir / "mlflow.db", root / "template.db")
    cli = Cli(train_args(root, workdir, trainer, workers, epochs, *extra), workdir, env_for(store.uri, **env), name)
    return cli, store


def resume(store: Store, workdir: Path, uri: str, name: str, *extra: str, **env: str) -> Cli:
    return Cli(["train", "--resume", uri, *extra], workdir, env_for(store.uri, **env), name)


def baseline(factory: pytest.TempPathFactory, trainer: str, workers: int) -> tuple[Cli, Store]:
    """The uninterrupted EPOCHS-epoch run of this trainer (started on first use, shared afterwards)."""
    root = Session.setup(factory)
    key = f"{trainer}_w{workers}"
    if key not in Session.baselines:
        Session.baselines[key] = start_train(root, f"baseline_{key}", trainer, workers)
    return Session.baselines[key]


def last_checkpoint(store: Store, run_id: str) -> dict[str, Any]:
    run_dir = Path(store.run(run_id).data.tags["mltrack.run_dir"])
    return torch.load(run_dir / "weights" / "last.pt", map_location="cpu", weights_only=True)


def assert_one_value_per_step(store: Store, run_id: str, epochs: int = EPOCHS) -> None:
    for key in COMPARED:
        steps = [s for s, _ in store.history(run_id, key)]
        assert steps == list(range(epochs)), (key, steps)


def assert_same_training(ref: tuple[Store, str], got: tuple[Store, str], epochs: int = EPOCHS) -> None:
    """Metric histories (each step once, equal values) and final model/optimizer state bit-identical."""
    (ref_store, ref_id), (store, run_id) = ref, got
    assert_one_value_per_step(store, run_id, epochs)
    for key in COMPARED:
        assert store.history(run_id, key) == ref_store.history(ref_id, key), key
    a, b = last_checkpoint(ref_store, ref_id), last_checkpoint(store, run_id)
    assert a["progress"]["epoch"] == b["progress"]["epoch"] == epochs
    assert a["model"].keys() == b["model"].keys()
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in sa:
            assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), k
    assert a["trainer"] == b["trainer"] or _same_nested(a["trainer"], b["trainer"])


def _same_nested(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_nested(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_nested(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def artifact_names(store: Store, run_id: str, path: str) -> set[str]:
    return {Path(f.path).name for f in store.client.list_artifacts(run_id, path)}


# ---------------------------------------------------------------- T06: kill -9 after the epoch-2 commit


@pytest.mark.parametrize("trainer, workers", [("standard", 2), ("mixed_precision", 0), ("dp", 0)])
def test_kill9_after_epoch_2_then_resume_is_bit_identical(trainer: str, workers: int,
                                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    if trainer == "dp":
        pytest.importorskip("opacus")
    root = Session.setup(tmp_path_factory)
    for other in (("standard", 2), ("mixed_precision", 0), ("dp", 0)):
        baseline(tmp_path_factory, *other)  # all three start now and run beside the tests that need them
    ref_cli, ref_store = baseline(tmp_path_factory, trainer, workers)
    # The process SIGSTOPs itself right after the epoch-2 (step 1) commit; the test then sends a real SIGKILL.
    cli, store = start_train(root, f"kill9_{trainer}", trainer, workers, MLTRACK_FAULT_AT="after_commit",
                             MLTRACK_FAULT_EPOCH="1", MLTRACK_FAULT_ACTION="stop")
    cli.wait_stopped()
    os.kill(cli.proc.pid, signal.SIGKILL)
    assert cli.wait().rc == -signal.SIGKILL
    killed = store.only_run()
    run_id = killed.info.run_id
    assert killed.info.status == "RUNNING"  # kill -9: nobody could mark it; the resume continues it
    assert [s for s, _ in store.history(run_id, "train/loss")] == [0, 1]
    params = dict(killed.data.params)

    resumed = resume(store, root / f"kill9_{trainer}", f"runs:/{run_id}/weights/last.pt", "resume")
    done = resumed.ok()
    assert "Resumed from" in done.out and "at epoch 2" in done.out
    ref_cli.ok()
    ref_id = ref_store.only_run().info.run_id

    assert store.only_run().info.run_id == run_id  # continued in the same run, no second one
    run = store.run(run_id)
    assert run.info.status == "FINISHED"
    assert dict(run.data.params) == params  # params never re-logged or changed
    assert run.data.tags["mltrack.resumed_from"] == f"runs:/{run_id}/weights/last.pt"
    assert_same_training((ref_store, ref_id), (store, run_id))
    if trainer == "dp":  # the accountant went on from the checkpoint: same epsilon as never stopping
        eps = store.history(run_id, "dp/epsilon")
        assert eps == ref_store.history(ref_id, "dp/epsilon") and eps[-1][1] > eps[1][1] > 0
    # best.pt is the epoch with the best logged val/acc (first maximum: improvements are strict)
    accs = store.history(run_id, "val/acc")
    best_epoch = max(accs, key=lambda sv: (sv[1], -sv[0]))[0]
    run_dir = Path(run.data.tags["mltrack.run_dir"])
    best = torch.load(run_dir / "weights" / "best.pt", weights_only=True)
    assert best["progress"]["best_epoch"] == best_epoch == int(run.data.tags["mltrack.best_epoch"])
    assert {"last.pt", "last.pt.sha256", "best.pt", "best.pt.sha256", "prev.pt"} <= artifact_names(store, run_id, "weights")
    # tracking.log_model=false (TRAIN_SETS), kept through the resume: no model/ packaged, here or in the store.
    assert not (run_dir / "model").exists() and "model" not in artifact_names(store, run_id, "")


# ---------------------------------------------------------------- T07: SIGTERM inside an epoch, via `mlflow run`


def _mlflow_run(store: Store, workdir: Path, name: str, params: dict[str, str], run_id: Optional[str]) -> Cli:
    args = ["run", str(REPO), "--env-manager", "local", "--experiment-name", "tiny"]
    for key, value in params.items():
        args += ["-P", f"{key}={value}"]
    if run_id:
        args += ["--run-id", run_id]
    env = env_for(store.uri, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return Cli(args, workdir, env, name, module="mlflow")


def test_sigterm_mid_epoch_checkpoint_resumes_exactly_via_mlflow_run(tmp_path_factory: pytest.TempPathFactory) -> None:
    """SIGTERM after batch 2 of epoch 2 (a real signal, sent by the process to itself at that exact step):
    the step completes, a step-granular checkpoint is uploaded, KILLED, exit 143 within 30 s. ``mlflow run
    -P resume=… --run-id <id>`` continues it bit-identically; without ``--run-id`` a new run continues the
    history (extension to 5 epochs) and records ``mltrack.resumed_from``."""
    root = Session.setup(tmp_path_factory)
    ref_cli, ref_store = baseline(tmp_path_factory, "standard", 2)
    cli, store = start_train(root, "sigterm", "standard", 2, MLTRACK_FAULT_AT="in_epoch", MLTRACK_FAULT_EPOCH="1",
                             MLTRACK_FAULT_BATCH="1", MLTRACK_FAULT_ACTION="sigterm")
    done = cli.wait()
    assert done.rc == 143, done.out[-3000:]
    assert "checkpoint saved at epoch 1, batch 2" in done.out
    killed = store.only_run()
    run_id = killed.info.run_id
    assert killed.info.status == "KILLED" and killed.data.tags["mltrack.exit_reason"] == "SIGTERM"
    # The uploaded last.pt holds the position inside epoch 2 (2 of its 4 batches done).
    local = store.client.download_artifacts(run_id, "weights/last.pt", str(root / "sigterm" / "dl"))
    state = torch.load(local, weights_only=True)
    assert (state["progress"]["epoch"], state["progress"]["batch"]) == (1, 2)
    assert state["progress"]["global_step"] == 4 + 2

    uri = f"runs:/{run_id}/weights/last.pt"
    same = _mlflow_run(store, root / "sigterm", "mlflow_run_same", {"resume": uri}, run_id).ok()
    assert "at epoch 1, batch 2" in same.out
    ref_cli.ok()
    ref_id = ref_store.only_run().info.run_id
    assert [r.info.run_id for r in store.runs()] == [run_id]
    assert store.run(run_id).info.status == "FINISHED"
    assert_same_training((ref_store, ref_id), (store, run_id))

    _mlflow_run(store, root / "sigterm", "mlflow_run_new", {"resume": uri, "num_epochs": "5"}, None).ok()
    new = [r for r in store.runs() if r.info.run_id != run_id]
    assert len(new) == 1 and new[0].info.status == "FINISHED"
    new_id = new[0].info.run_id
    assert new[0].data.tags["mltrack.resumed_from"] == uri
    assert new[0].data.params["training.num_epochs"] == "5"
    assert_one_value_per_step(store, new_id, 5)  # the history continues there: steps 0..4, each once
    assert store.history(new_id, "train/loss")[:4] == store.history(run_id, "train/loss")
    assert {"last.pt", "best.pt"} <= artifact_names(store, new_id, "weights")
    assert store.run(run_id).info.status == "FINISHED" and len(store.history(run_id, "train/loss")) == 4
