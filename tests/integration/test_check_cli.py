"""``mltrack check`` / ``split`` / ``train`` on hostile and imbalanced datasets through the real CLI (T15, T19, T20):
exit codes, exact report lines, quarantine, and a training run on the quarantined, imbalanced set."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from mltrack.cli import cli
from tests.unit.test_checks import BAD_LINES, _hostile, _imbalanced, _noise_jpeg

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

pytestmark = pytest.mark.timeout(180)


def run_cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_check_reports_bad_files_then_quarantine_unblocks_split(tiny_dataset):
    data = _hostile(tiny_dataset)
    raw = str(data / "raw")
    proc = subprocess.run([sys.executable, "-m", "mltrack", "check", "--raw-data", raw],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stdout.splitlines()
    for line in BAD_LINES.values():
        assert line in lines
    assert "result: FAILED (4 error(s), 0 warning(s))" in lines and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("error: dataset check failed: 4 error(s) (listed above); exclude bad files "
                                   "with --quarantine")
    rows = [[cell.strip() for cell in x.split("│")] for x in lines if "│" in x]  # the rich summary table
    assert ["c1", "9", "1", "0", "8"] in rows and ["total", "24", "4", "0", "20"] in rows

    code, out, err = run_cli("check", "--raw-data", raw, "--json")
    payload = json.loads(out)
    assert code == 2 and payload["ok"] is False and payload["classes"]["c0"]["bad"] == 2
    assert {b["path"] for b in payload["bad"]} == {"c0/half.jpg", "c0/zero.jpg", "c1/page.jpg", "c2/crc.png"}
    assert payload["cached"] == payload["params"]["data.check.images"] == 24  # second run: stats only

    code, out, err = run_cli("split", "--raw-data", raw, "--folds", "2")
    assert code == 2 and "bad file c0/zero.jpg: empty file (0 bytes)" in err and "--quarantine" in err
    assert not (data / "splits").exists()

    code, out, err = run_cli("check", "--raw-data", raw, "--quarantine")
    assert code == 0, err
    assert f"quarantine: 4 file(s) listed in {data / 'quarantine.txt'}; split and train skip them" in out
    assert "INFO    quarantined c1/page.jpg: not an image (unrecognised format)" in out.splitlines()
    code, out, err = run_cli("split", "--raw-data", raw, "--folds", "2")
    assert code == 0, err
    listed = {r for f in (data / "splits").glob("*.txt") for r in f.read_text().splitlines()}
    assert len(listed) == 20 and not listed & {"c0/half.jpg", "c0/zero.jpg", "c1/page.jpg", "c2/crc.png"}
    code, out, err = run_cli("check", "--raw-data", raw, "--splits", str(data / "splits"))
    assert code == 0 and out.splitlines()[-1] == "result: OK (0 error(s), 0 warning(s))", out

    # a leak in a hand-edited split file fails the check with exit 2
    test_txt = data / "splits" / "test.txt"
    moved = (data / "splits" / "fold_0_train.txt").read_text().splitlines()[0]
    test_txt.write_text(test_txt.read_text() + moved + "\n")
    code, out, err = run_cli("check", "--raw-data", raw, "--splits", str(data / "splits"))
    assert code == 2 and f"ERROR   leak: test and the train pool share 1 path(s): {moved}" in out.splitlines()


def test_bomb_header_rejected_by_limit(tiny_dataset):
    data = tiny_dataset(per_class=3, size=8)
    (data / "raw" / "c0" / "wide.jpg").write_bytes(_noise_jpeg(5, size=64))
    code, out, _ = run_cli("check", "--raw-data", str(data / "raw"), "--max-pixels", "1000")
    assert code == 2
    assert ("ERROR   bad file c0/wide.jpg: image size 64x64 = 4,096 px is outside 1..1,000 px (decompression-bomb "
            "limit data.max_image_pixels; raise it only for trusted data)") in out.splitlines()


def test_imbalanced_quarantined_set_splits_and_trains(tmp_path):
    """40/8/3 images plus bad files: check --quarantine, split refuses 5 folds, allows them with
    --allow-small-classes, and a 1-epoch run with class_weights auto completes and logs val/balanced_acc."""
    raw = _imbalanced(tmp_path, {"a": 40, "b": 8, "c": 3})
    (raw / "b" / "zero.jpg").write_bytes(b"")
    (raw / "c" / "page.png").write_bytes(b"<html></html>")
    code, out, _ = run_cli("check", "--raw-data", str(raw), "--quarantine")
    assert code == 0 and "WARNING class imbalance: largest/smallest = 40/3 = 13.3 > 10" in out

    code, _, err = run_cli("split", "--raw-data", str(raw), "--folds", "5")
    assert code == 2 and "class 'c' has 3 images < 5 folds" in err
    code, out, err = run_cli("split", "--raw-data", str(raw), "--folds", "5", "--allow-small-classes")
    assert code == 0, err
    assert "classes with fewer images than folds: c" in out
    assert "warning: class imbalance: largest/smallest = 40/3 = 13.3 > 10" in out

    db = tmp_path / "mlflow.db"
    env = {**ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    train = subprocess.run(
        [sys.executable, "-m", "mltrack", "train", "--data-dir", str(raw.parent), "--num-epochs", "1",
         "--batch-size", "16", "--num-workers", "0", "--device", "cpu",
         "--set", "data.dataset_name=imb", "--set", "data.image_size=8", "--set", "data.transforms=none",
         "--set", "training.class_weights=auto", "--set", "tracking.progress=off",
         "--set", "tracking.tensorboard=false", "--set", "tracking.confusion_every_epoch=false",
         "--set", "tracking.log_model=false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=170)
    assert train.returncode == 0, train.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("imb").experiment_id])
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "val/balanced_acc")
    assert [m.step for m in history] == [0] and 0.0 <= history[0].value <= 1.0
    assert run.data.params["training.class_weights"] == "auto"
