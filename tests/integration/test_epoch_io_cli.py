"""Issue 9, epoch side effects on a background thread, through the real CLI and a real sqlite store:
the background mode (with MLflow writes from the sender process, ``MLTRACK_SENDER_PROCESS=1``) trains
bit-identically to the synchronous one (``MLTRACK_SYNC_EPOCH_IO=1``) and ends with the same verified
weights and a complete run, and a checkpoint that cannot be written (a file-size limit, as on a full
disk) ends the run FAILED with one message and no traceback."""
from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest

from mltrack import checkpoint
from test_resume import Session, Store, artifact_names, assert_same_training, env_for, start_train, train_args

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

EPOCHS = 3
FSIZE_LIMIT = 2 * 2**20  # above the store's sqlite file and the logs, below one checkpoint (~3.5 MB)


def _limited_file_size() -> None:
    # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG instead of killing the process.
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))


def test_background_epoch_io_matches_sync_and_a_write_error_fails_the_run(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    root = Session.setup(tmp_path_factory)
    # the background run also delivers to MLflow from the child process, as on a GPU
    background = start_train(root, "epoch_io_async", epochs=EPOCHS, MLTRACK_SENDER_PROCESS="1")
    sync = start_train(root, "epoch_io_sync", epochs=EPOCHS, MLTRACK_SYNC_EPOCH_IO="1")
    workdir = root / "epoch_io_full_disk"
    workdir.mkdir()
    full = Store(workdir / "mlflow.db", root / "template.db")
    assert full.db.stat().st_size < FSIZE_LIMIT // 2
    with open(workdir / "cli.log", "wb") as out:
        failing = subprocess.Popen([sys.executable, "-m", "mltrack", *train_args(root, workdir, epochs=EPOCHS)],
                                   cwd=workdir, env=env_for(full.uri), stdout=out, stderr=subprocess.STDOUT,
                                   preexec_fn=_limited_file_size)

    # The write error: exit 2, one "error:" line that says what and where, no traceback, the run FAILED.
    rc = failing.wait(240)
    out = (workdir / "cli.log").read_text()
    assert rc == 2, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    assert "cannot write the checkpoint of epoch 0 in" in errors[0] and "free space" in errors[0], out
    assert "Traceback" not in out, out
    run = full.only_run()
    assert run.info.status == "FAILED"
    assert "cannot write the checkpoint of epoch 0" in run.data.tags["mltrack.exit_reason"]
    assert "mltrack.committed_step" not in run.data.tags  # nothing of the failed step was committed
    assert full.history(run.info.run_id, "train/loss") == []  # nor its metrics sent (RELIABILITY rule 4)

    # Background vs synchronous: the same training, and complete, verified weights on disk and in the run.
    for cli, _ in (background, sync):
        cli.ok(240)
    (async_cli, async_store), (_, sync_store) = background, sync
    async_run, sync_run = async_store.only_run(), sync_store.only_run()
    assert async_run.info.status == sync_run.info.status == "FINISHED"
    assert async_run.data.tags["mltrack.committed_step"] == str(EPOCHS - 1)
    assert_same_training((sync_store, sync_run.info.run_id), (async_store, async_run.info.run_id), EPOCHS)
    weights = Path(async_run.data.tags["mltrack.run_dir"]) / "weights"
    for name in ("best.pt", "prev.pt", "last.pt"):
        checkpoint.verify(weights / name)
    assert {"best.pt", "prev.pt", "last.pt", "last.pt.sha256"} <= artifact_names(async_store, async_run.info.run_id,
                                                                                 "weights")
    assert "Traceback" not in async_cli.output()
    log = (Path(async_run.data.tags["mltrack.run_dir"]) / "logs" / "train.log").read_text()
    assert "MLflow writes go through sender process" in log  # the child delivered this run
