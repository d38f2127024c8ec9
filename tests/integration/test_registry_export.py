"""Registry aliases, ONNX export with its parity check, and the logged pyfunc served by MLflow's own CLI.

One tiny run is trained per module through the real click group. ``mlflow models predict`` runs as a
subprocess without mltrack on PYTHONPATH: the model must carry its own code.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import synthetic_image
from test_evaluate_predict import only_training_run
from mltrack.cli import cli

SIZE = 8
TINY = ["--set", "data.dataset_name=tiny", "--set", f"data.image_size={SIZE}", "--set", "data.transforms=none",
        "--set", "data.num_workers=0", "--set", "training.batch_size=8", "--set", "tracking.progress=off",
        "--set", "tracking.confusion_every_epoch=false", "--set", "tracking.tensorboard=false",
        "--set", "training.device=cpu"]


def invoke(args: list[str]):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from mltrack.data.splits import make_splits

    root = tmp_path_factory.mktemp("regexp")
    data = root / "ds"
    for c in range(3):
        (data / "raw" / f"c{c}").mkdir(parents=True)
        for j in range(10):
            Image.fromarray(synthetic_image(c, j, SIZE)).save(data / "raw" / f"c{c}" / f"img_{j:03d}.png")
    make_splits(data / "raw", data / "splits", folds=2, test_fraction=0.25, seed=1)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(root)
        result = invoke(["train", "--data-dir", str(data), "--num-epochs", "1", *TINY])
        assert result.exit_code == 0, result.output
        run_id, run_dir = only_training_run()
        yield {"root": root, "data": data, "run_id": run_id, "run_dir": run_dir, "uri": uri}


@pytest.fixture
def env(trained: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained["uri"])
    monkeypatch.chdir(trained["root"])
    return trained


def predict_csv(model: str, inputs: Path, out: Path) -> list[dict[str, str]]:
    result = invoke(["predict", "--model", model, "--input", str(inputs), "--output", str(out)])
    assert result.exit_code == 0, result.output
    with open(out, newline="") as fh:
        return list(csv.DictReader(fh))


def test_register_sets_an_alias_that_round_trips_to_the_same_model(env: dict) -> None:
    from mlflow.tracking import MlflowClient

    run_id = env["run_id"]
    result = invoke(["register", "--run", run_id, "--name", "tiny-clf", "--alias", "champion"])
    assert result.exit_code == 0, result.output
    client = MlflowClient()
    version = client.get_model_version_by_alias("tiny-clf", "champion")
    assert (str(version.version), version.run_id) == ("1", run_id)
    inputs = env["data"] / "raw" / "c1"
    via_alias = predict_csv("models:/tiny-clf@champion", inputs, env["root"] / "alias.csv")
    via_run = predict_csv(f"runs:/{run_id}/model", inputs, env["root"] / "run.csv")
    assert len(via_alias) == 10
    assert [(r["path"], r["label"], r["prob_c1"]) for r in via_alias] == \
        [(r["path"], r["label"], r["prob_c1"]) for r in via_run]
    # Registering again makes version 2 and moves the alias; version 1 stays.
    assert invoke(["register", "--run", run_id, "--name", "tiny-clf", "--alias", "champion"]).exit_code == 0
    assert str(client.get_model_version_by_alias("tiny-clf", "champion").version) == "2"
    assert client.get_model_version("tiny-clf", "1").run_id == run_id


def test_register_refuses_a_run_without_a_model(env: dict) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    bare = client.create_run(client.get_run(env["run_id"]).info.experiment_id).info.run_id
    result = invoke(["register", "--run", bare, "--name", "nothing", "--alias", "a"])
    assert result.exit_code == 2 and "no MLflow model" in result.stderr


def test_onnx_export_passes_parity_and_the_logged_file_agrees_with_torch(env: dict) -> None:
    import onnxruntime
    from mlflow.tracking import MlflowClient

    from mltrack.export import METRIC
    from mltrack.tracking import download_artifact, run_metrics

    run_id = env["run_id"]
    result = invoke(["export", "--run", run_id, "--format", "onnx"])
    assert result.exit_code == 0, result.output
    assert 0.0 <= run_metrics(run_id)[METRIC] <= 1e-4
    assert MlflowClient().get_run(run_id).data.tags["mltrack.export.onnx"] == "passed"
    onnx_file = download_artifact(f"runs:/{run_id}/export/model.onnx", env["root"] / "dl")
    report = json.loads(download_artifact(f"runs:/{run_id}/export/onnx_model.json", env["root"] / "dl").read_text())
    assert report["class_names"] == ["c0", "c1", "c2"] and report["parity"]["passed"] is True
    # Independent check: ONNX Runtime on other images (batch size not seen at export) vs torch from best.pt.
    from mltrack.config import ModelConfig
    from mltrack.models import build_model

    state = torch.load(env["run_dir"] / "weights" / "best.pt", weights_only=True)
    model = build_model(ModelConfig(), 3).eval()
    model.load_state_dict(state["model"])
    x = torch.stack([torch.from_numpy(synthetic_image(i % 3, 200 + i, SIZE).copy()).permute(2, 0, 1)
                     for i in range(5)]).float() / 255.0
    x = (x - 0.5) / 0.5  # config default transform 'digits': eval = resize + normalise(0.5, 0.5)
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"image": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(got - want).max() <= 1e-4


def test_onnx_export_over_tolerance_fails_without_logging_a_model(env: dict) -> None:
    from mlflow.tracking import MlflowClient

    run_id = env["run_id"]
    before = {a.path for a in MlflowClient().list_artifacts(run_id, "export")}
    result = invoke(["export", "--run", run_id, "--tolerance", "1e-30"])  # runtimes differ by ~1e-8 here
    assert result.exit_code == 1 and "rejected" in result.stderr
    after = {a.path for a in MlflowClient().list_artifacts(run_id, "export")}
    assert after - before <= {"export/rejected"}
    assert MlflowClient().get_run(run_id).data.tags["mltrack.export.onnx"].startswith("failed")


def test_mlflow_models_predict_serves_the_logged_model_with_our_labels(env: dict) -> None:
    run_id, root = env["run_id"], env["root"]
    paths = sorted((env["data"] / "raw").rglob("*.png"))[::4]
    (root / "in.csv").write_text("image\n" + "\n".join(str(p) for p in paths) + "\n")
    child_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the model carries mltrack
    child_env["MLFLOW_TRACKING_URI"] = env["uri"]
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "models", "predict", "-m", f"runs:/{run_id}/model", "-i", "in.csv",
         "-t", "csv", "--env-manager", "local", "-o", "out.json"],
        cwd=root, env=child_env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = json.loads((root / "out.json").read_text())["predictions"]
    listing = root / "in_images"
    listing.mkdir()
    for i, p in enumerate(paths):  # same images, names that keep their order
        (listing / f"{i:03d}.png").write_bytes(p.read_bytes())
    ours = predict_csv(f"runs:/{run_id}/model", listing, root / "ours.csv")
    assert [row["label"] for row in served] == [row["label"] for row in ours]
    for row, mine in zip(served, ours):
        assert row["prob_c0"] == pytest.approx(float(mine["prob_c0"]), abs=1e-9)
        assert sum(row[f"prob_c{c}"] for c in range(3)) == pytest.approx(1.0, abs=1e-9)
