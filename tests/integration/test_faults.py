"""Issue 5, crash safety (RELIABILITY T01, T03, T04, T05, T08): a crash at every point of the epoch commit
protocol (including in the middle of a checkpoint write) resumes to the same history; hostile, corrupted
and incompatible checkpoints are refused before anything trains or any run changes."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import torch
from click.testing import CliRunner

from test_resume import (EPOCHS, Session, Store, artifact_names, assert_same_training, baseline, env_for,
                         last_checkpoint, resume, start_train)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# (fault point, 0-based epoch) in the order a run meets them, as two chains that run side by side: each
# crash is resumed from runs:/…/last.pt by a process that crashes at the chain's next point.
SWEEP = [[("after_train", 1), ("after_eval", 1), ("ckpt_write_half", 1), ("ckpt_before_replace", 1)],
         [("after_ckpt_write", 1), ("after_ckpt_upload", 1), ("after_metrics_log", 2), ("after_commit", 3)]]


def _fault_env(point: str, epoch: int) -> dict[str, str]:
    return {"MLTRACK_FAULT_AT": point, "MLTRACK_FAULT_EPOCH": str(epoch), "MLTRACK_FAULT_ACTION": "exit"}


def _local_weights(store: Store, run_id: str) -> Path:
    return Path(store.run(run_id).data.tags["mltrack.run_dir"]) / "weights"


def _stored(store: Store, run_id: str, name: str, into: Path) -> Path:
    return Path(store.client.download_artifacts(run_id, f"weights/{name}", str(into)))


def _assert_no_duplicate_steps(store: Store, run_id: str) -> None:
    for key in ("train/loss", "val/acc", "lr"):
        steps = [s for s, _ in store.history(run_id, key)]
        assert steps == sorted(set(steps)), (key, steps)


def _check_write_crash(point: str, store: Store, run_id: str, work: Path, before: set[Path]) -> set[Path]:
    """After a crash inside the checkpoint write: last.pt is the previous good file, verifies, and the
    temp file of the crashed write is left over (and the previous crash's one was cleaned at start)."""
    from mltrack import checkpoint

    weights = _local_weights(store, run_id)
    last = weights / "last.pt"
    checkpoint.verify(last)
    assert last.read_bytes() == _stored(store, run_id, "last.pt", work / f"dl_{point}").read_bytes()
    assert torch.load(last, weights_only=True)["progress"]["epoch"] == 1  # still the epoch-1 checkpoint
    strays = set(weights.glob(".*.tmp"))
    assert strays - before, f"{point}: the crashed write left no temp file"
    assert not (before & strays), f"{point}: a stray temp file of an earlier crash was not cleaned"
    return strays


def _crash_chain(root: Path, name: str, chain: list[tuple[str, int]]) -> Any:
    """Runs ``chain`` (a generator: advance it to wait for the next crash); returns (store, run id, work dir)."""
    cli, store = start_train(root, name, "standard", 2, **_fault_env(*chain[0]))
    work, strays = root / name, set()
    for n, (point, epoch) in enumerate(chain):
        yield
        done = cli.wait()
        assert done.rc == 137, f"{point}: rc={done.rc}\n{done.out[-3000:]}"
        run = store.only_run()  # never a second run
        run_id = run.info.run_id
        assert run.info.status == "RUNNING", point
        _assert_no_duplicate_steps(store, run_id)
        if point.startswith("ckpt_"):
            strays = _check_write_crash(point, store, run_id, work, strays)
        nxt = _fault_env(*chain[n + 1]) if n + 1 < len(chain) else {}
        cli = resume(store, work, f"runs:/{run_id}/weights/last.pt", f"resume_{n}", **nxt)
    yield
    cli.ok()
    return store, run_id, work


def _drive(chains: list[Any]) -> list[Any]:
    """Advance the chains in lockstep (their processes overlap) and collect what each returns."""
    results: list[Any] = [None] * len(chains)
    live = dict(enumerate(chains))
    while live:
        for k, chain in list(live.items()):
            try:
                next(chain)
            except StopIteration as end:
                results[k] = end.value
                del live[k]
    return results


def test_crash_point_sweep_resumes_to_the_same_history(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = Session.setup(tmp_path_factory)
    ref_cli, ref_store = baseline(tmp_path_factory, "standard", 2)
    results = _drive([_crash_chain(root, f"sweep_{k}", chain) for k, chain in enumerate(SWEEP)])
    assert "removed 1 temp file(s) left by an interrupted checkpoint write" in \
        (root / "sweep_0" / f"resume_{len(SWEEP[0]) - 1}.log").read_text()
    ref_cli.ok()
    ref_id = ref_store.only_run().info.run_id
    for store, run_id, work in results:
        run = store.run(run_id)
        assert run.info.status == "FINISHED"
        assert_same_training((ref_store, ref_id), (store, run_id))
        # The stored best/last match the history: last = the final epoch, best = the first best val/acc.
        stored_last = torch.load(_stored(store, run_id, "last.pt", work / "final"), weights_only=True)
        ref_last = last_checkpoint(ref_store, ref_id)
        assert stored_last["progress"]["epoch"] == EPOCHS
        assert all(torch.equal(stored_last["model"][k], v) for k, v in ref_last["model"].items())
        accs = store.history(run_id, "val/acc")
        best_epoch = max(accs, key=lambda sv: (sv[1], -sv[0]))[0]
        stored_best = torch.load(_stored(store, run_id, "best.pt", work / "final"), weights_only=True)
        assert stored_best["progress"]["best_epoch"] == best_epoch
        assert [row["val/acc"] for row in stored_last["progress"]["history"]] == [v for _, v in accs]


# ---------------------------------------------------------------- T01: hostile pickle in the artifact store


class Evil:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.target}",))


def test_malicious_checkpoint_is_refused_and_never_runs(tmp_path_factory: pytest.TempPathFactory,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from mltrack import checkpoint

    root = Session.setup(tmp_path_factory)
    work = root / "evil"
    work.mkdir()
    store = Store(work / "mlflow.db", root / "template.db")
    pwned = work / "PWNED"
    exp = store.client.create_experiment("tiny", artifact_location=str(work / "artifacts"))
    runs = {}
    for variant in ("with_manifest", "no_manifest"):
        run_id = store.client.create_run(exp, run_name=variant).info.run_id
        store.client.set_terminated(run_id, "KILLED")
        payload = work / variant / "weights" / "last.pt"
        payload.parent.mkdir(parents=True)
        torch.save({"schema": 1, "model": {"w": torch.zeros(2)}, "mlflow_run_id": run_id, "x": Evil(pwned)}, payload)
        if variant == "with_manifest":  # whoever can write the artifact can write a matching manifest too
            (payload.parent / "last.pt.sha256").write_text(f"{checkpoint.sha256_file(payload)}  last.pt\n")
        store.client.log_artifacts(run_id, str(payload.parent), "weights")
        runs[variant] = run_id
    # A real process with unsafe loads forced through the environment, and the command in this process.
    done = resume(store, work, f"runs:/{runs['with_manifest']}/weights/last.pt", "forced",
                  TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1").wait()
    assert done.rc == 2 and "Traceback" not in done.out, done.out[-3000:]
    assert "unsafe checkpoint" in done.out and "'posix.system'" in done.out, done.out[-2000:]
    rc, out, _ = _invoke(store, ["train", "--resume", f"runs:/{runs['no_manifest']}/weights/last.pt"], monkeypatch)
    assert rc == 2 and "unsafe checkpoint" in out and "'posix.system'" in out, out
    assert not pwned.exists()
    assert sorted(r.info.run_id for r in store.runs()) == sorted(runs.values())  # no new run
    assert {store.run(r).info.status for r in runs.values()} == {"KILLED"}  # and no status change


# ---------------------------------------------------------------- T04 / T05 on one killed run


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 4-epoch run killed (os._exit) after the commit of epoch 3: last.pt = 3 epochs, prev.pt = 2.
    Trained on its own copy of the dataset, so a test may modify the split files."""
    root = Session.setup(tmp_path_factory)
    data = root / "data_killed"
    shutil.copytree(root / "data", data)
    cli, store = start_train(root, "killed", "standard", 2, extra=("--data-dir", str(data)),
                             **_fault_env("after_commit", 2))
    assert cli.wait().rc == 137
    run_id = store.only_run().info.run_id
    return {"root": root, "store": store, "run_id": run_id, "work": root / "killed", "data": data}


def _invoke(store: Store, args: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, float]:
    """The real click command in this process (no interpreter start-up: measures the refusal itself)."""
    from mltrack.cli.main import cli

    for name, value in env_for(store.uri).items():
        if name.startswith("MLFLOW") or name.startswith("MLTRACK"):
            monkeypatch.setenv(name, value)
    began = time.perf_counter()
    result = CliRunner().invoke(cli, args)
    return result.exit_code, result.output, time.perf_counter() - began


@pytest.mark.parametrize("extra, message", [
    (["--architecture", "resnet18"], "the architecture differs (model.architecture"),
    (["--set", "model.num_classes=4"], "the class count differs (model.num_classes"),
    (["--lr", "0.1"], "cannot resume with a changed config: optimizer.lr 0.003 -> 0.1; pass --allow-config-change"),
    (["--batch-size", "8"], "cannot resume with a changed config: training.batch_size 4 -> 8"),
])
def test_incompatible_resume_is_refused(extra: list[str], message: str, killed_run: dict[str, Any],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    store, run_id = killed_run["store"], killed_run["run_id"]
    rc, out, seconds = _invoke(store, ["train", "--resume", f"runs:/{run_id}/weights/last.pt", *extra], monkeypatch)
    assert rc == 2 and message in out, out
    assert seconds < 5
    assert [r.info.run_id for r in store.runs()] == [run_id] and store.run(run_id).info.status == "RUNNING"


def test_changed_split_files_and_missing_targets_are_refused(killed_run: dict[str, Any],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    store, run_id = killed_run["store"], killed_run["run_id"]
    index = killed_run["data"] / "splits" / "fold_0_train.txt"
    original = index.read_text()
    lines = original.splitlines()
    index.write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # same files, another order: another digest
    try:
        rc, out, seconds = _invoke(store, ["train", "--resume", f"runs:/{run_id}/weights/last.pt"], monkeypatch)
    finally:
        index.write_text(original)
    assert rc == 2 and "the split files differ" in out and seconds < 5, out
    missing = [("runs:/0123456789abcdef0123456789abcdef/weights/last.pt", "id=0123456789abcdef0123456789abcdef not found"),
               (f"runs:/{run_id}/weights/nothing.pt", "cannot download"),
               (str(killed_run["work"] / "no" / "last.pt"), "no such local file")]
    for uri, message in missing:
        rc, out, seconds = _invoke(store, ["train", "--resume", uri], monkeypatch)
        assert rc == 2 and message in out and seconds < 5, (uri, out)
    assert [r.info.run_id for r in store.runs()] == [run_id] and store.run(run_id).info.status == "RUNNING"


def test_checkpoint_not_in_the_store_names_the_run_folders_copy(killed_run: dict[str, Any],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A process killed before its checkpoint upload landed (kill -9, a lost machine's store connection):
    the refusal says where the run folder's copy is and gives the command that resumes the same run."""
    store, run_id = killed_run["store"], killed_run["run_id"]
    stored = Path(urlparse(store.run(run_id).info.artifact_uri).path) / "weights"
    aside = stored.with_name("weights_aside")
    stored.rename(aside)
    try:
        rc, out, seconds = _invoke(store, ["train", "--resume", f"runs:/{run_id}/weights/last.pt"], monkeypatch)
    finally:
        aside.rename(stored)
    local = Path(store.run(run_id).data.tags["mltrack.run_dir"]) / "weights" / "last.pt"
    assert rc == 2 and seconds < 5, out
    assert f"cannot download runs:/{run_id}/weights/last.pt" in out
    assert f"holds {local} (3 epoch(s) done" in out and f"mltrack train --resume {local}" in out, out
    assert [r.info.run_id for r in store.runs()] == [run_id] and store.run(run_id).info.status == "RUNNING"
    from mltrack.resume import open_resume  # what the suggested command opens: the same run, 3 epochs done

    point = open_resume(str(local))
    assert point.run_id == run_id and point.state["progress"]["epoch"] == 3


def test_corrupted_artifact_is_detected_and_previous_checkpoint_used(
        killed_run: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    store, run_id, work = killed_run["store"], killed_run["run_id"], killed_run["work"]
    ref_cli, ref_store = baseline(tmp_path_factory, "standard", 2)
    stored = Path(urlparse(store.run(run_id).info.artifact_uri).path) / "weights" / "last.pt"
    good = stored.read_bytes()
    uri = f"runs:/{run_id}/weights/last.pt"
    # A process killed between uploading last.pt's manifest and last.pt itself leaves the new manifest
    # beside the previous file: that pair verifies (the manifest lists both) and resumes one epoch earlier.
    from mltrack.resume import open_resume

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    stored.write_bytes((stored.parent / "prev.pt").read_bytes())
    assert open_resume(uri).state["progress"]["epoch"] == 2
    stored.write_bytes(good)
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x01
    for name, bad in (("flipped byte", bytes(flipped)), ("truncated", good[: len(good) // 3])):
        stored.write_bytes(bad)
        rc, out, seconds = _invoke(store, ["train", "--resume", uri], monkeypatch)
        assert rc == 2 and "checksum mismatch" in out and seconds < 5, (name, out)
        assert store.run(run_id).info.status == "RUNNING" and len(store.runs()) == 1
    # The truncated file stays: --fallback-previous resumes from prev.pt (2 epochs), re-trains epoch 3
    # without logging its metrics twice, and tags the run. model/ is turned back on (a key free on resume):
    # the models:/ resume below needs the run registered.
    done = resume(store, work, uri, "fallback", "--fallback-previous", "--set", "tracking.log_model=true").ok()
    assert "at epoch 2" in done.out
    run = store.run(run_id)
    assert run.info.status == "FINISHED" and len(store.runs()) == 1
    assert "prev.pt" in run.data.tags["mltrack.resume_fallback"] and "epoch 2" in run.data.tags["mltrack.resume_fallback"]
    ref_cli.ok()
    assert_same_training((ref_store, ref_store.only_run().info.run_id), (store, run_id))
    assert "prev.pt" in artifact_names(store, run_id, "weights")
    # T05 (e): a FINISHED run is only extended with more epochs than it did.
    rc, out, _ = _invoke(store, ["train", "--resume", uri], monkeypatch)
    assert rc == 2 and f"run {run_id} is FINISHED after 4 epochs; pass --num-epochs larger than 4" in out, out
    assert store.run(run_id).info.status == "FINISHED"
    # models:/<name>@<alias> resumes the training run of that model version, from its last.pt.
    from mltrack.resume import open_resume
    from mltrack.tracking import register_model

    register_model(run_id, "tiny-clf", "champion")
    point = open_resume("models:/tiny-clf@champion")
    assert (point.run_id, point.uri, point.state["progress"]["epoch"]) == (run_id, uri, EPOCHS)
