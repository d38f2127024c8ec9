"""``mltrack evaluate`` and ``mltrack predict`` through the real click group, on one tiny trained run.

The run is trained once per module in directory ``start/`` with a *relative* data dir, so evaluating it
from another directory exercises the data-dir resolution. Expected values are recomputed independently
with plain torch from the run's best.pt (no mltrack inference code).
"""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import synthetic_image
from mltrack.cli import cli

SIZE = 8
TINY = ["--set", "data.dataset_name=tiny", "--set", f"data.image_size={SIZE}", "--set", "data.transforms=none",
        "--set", "data.num_workers=0", "--set", "training.batch_size=8", "--set", "tracking.progress=off",
        "--set", "tracking.confusion_every_epoch=false", "--set", "tracking.tensorboard=false",
        "--set", "model.architecture=small_cnn", "--set", "training.device=cpu"]


def write_dataset(root: Path, n_classes: int = 3, per_class: int = 10, folds: int = 2) -> Path:
    from mltrack.data.splits import make_splits

    for c in range(n_classes):
        (root / "raw" / f"c{c}").mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            Image.fromarray(synthetic_image(c, j, SIZE)).save(root / "raw" / f"c{c}" / f"img_{j:03d}.png")
    make_splits(root / "raw", root / "splits", folds=folds, test_fraction=0.25, seed=0)
    return root


def invoke(args: list[str]):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def torch_probs(best_pt: Path, paths: list[Path], tta: bool = False) -> torch.Tensor:
    """Class probabilities from best.pt with plain torch (8 px RGB PNGs need no resize; transform 'none')."""
    from mltrack.config import ModelConfig
    from mltrack.models import build_model

    state = torch.load(best_pt, map_location="cpu", weights_only=True)
    model = build_model(ModelConfig(), len(state["class_map"])).eval()
    model.load_state_dict(state["model"])
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).copy()).permute(2, 0, 1)
                     for p in paths]).float() / 255.0
    with torch.no_grad():
        views = [x, torch.flip(x, dims=[3])] if tta else [x]
        return torch.stack([torch.softmax(model(v).double(), 1) for v in views]).mean(0)


def only_training_run() -> tuple[str, Path]:
    """(run id, local run folder) of the one training run in the store (stdout is not parsed: it may be
    bound to another stream when mltrack.run was imported earlier in the test session)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "tags.`mltrack.role` = 'train'")
    assert len(runs) == 1
    return runs[0].info.run_id, Path(runs[0].data.tags["mltrack.run_dir"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("evalpred")
    start = root / "start"
    write_dataset(start / "ds")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.chdir(start)
        result = invoke(["train", "--data-dir", "ds", "--num-epochs", "2", *TINY])
        assert result.exit_code == 0, result.output
        run_id, run_dir = only_training_run()
        yield {"root": root, "start": start, "run_id": run_id, "run_dir": run_dir,
               "uri": f"sqlite:///{root / 'mlflow.db'}"}


@pytest.fixture
def elsewhere(trained: dict, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A different, empty working directory with the tracking URI set."""
    other = trained["root"] / "elsewhere"
    other.mkdir(exist_ok=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained["uri"])
    monkeypatch.chdir(other)
    return other


def snapshot(run_id: str) -> dict:
    from mltrack.tracking import metric_history, run_info

    info = run_info(run_id)
    return {"status": info["status"], "end_time": info["end_time"], "params": info["params"],
            "val_acc": metric_history(run_id, "val/acc"), "train_loss": metric_history(run_id, "train/loss")}


def test_evaluate_from_another_directory_reproduces_the_logged_test_accuracy(trained: dict, elsewhere: Path) -> None:
    from mlflow.tracking import MlflowClient

    from mltrack.tracking import metric_history, run_metrics

    run_id = trained["run_id"]
    before = snapshot(run_id)
    result = invoke(["evaluate", "--run", run_id, "--split", "test"])
    assert result.exit_code == 0, result.output
    metrics = run_metrics(run_id)
    assert metrics["eval/test/acc"] == metrics["test/acc"]
    assert metrics["eval/test/loss"] == pytest.approx(metrics["test/loss"], abs=1e-5)
    assert metrics["eval/test/f1_macro"] == pytest.approx(metrics["test/f1_macro"], abs=1e-12)
    assert snapshot(run_id) == before  # status, end time, params and training history untouched
    names = {a.path for a in MlflowClient().list_artifacts(run_id, "eval/test")}
    assert {"eval/test/classification_report.txt", "eval/test/confusion_matrix.png",
            "eval/test/predictions.csv"} <= names
    # A second evaluation is a new step of the same keys, not a rewrite.
    assert invoke(["evaluate", "--run", run_id]).exit_code == 0
    assert [s for s, _ in metric_history(run_id, "eval/test/acc")] == [0, 1]


def test_evaluate_val_with_tta_matches_an_independent_flip_average(trained: dict, elsewhere: Path) -> None:
    from mltrack.tracking import run_metrics

    result = invoke(["evaluate", "--run", trained["run_id"], "--split", "val", "--tta"])
    assert result.exit_code == 0, result.output
    start, fold_val = trained["start"], (trained["run_dir"] / "splits" / "fold_0_val.txt").read_text().split()
    names = sorted(p.name for p in (start / "ds" / "raw").iterdir())
    targets = torch.tensor([names.index(rel.split("/")[0]) for rel in fold_val])
    paths = [start / "ds" / "raw" / r for r in fold_val]
    probs = torch_probs(trained["run_dir"] / "weights" / "best.pt", paths, tta=True)
    expected_acc = float((probs.argmax(1) == targets).double().mean())
    expected_loss = float(-probs[torch.arange(len(targets)), targets].log().mean())
    metrics = run_metrics(trained["run_id"])
    assert metrics["eval/val/tta/acc"] == pytest.approx(expected_acc, abs=1e-12)
    assert metrics["eval/val/tta/loss"] == pytest.approx(expected_loss, abs=1e-5)


def test_evaluate_needs_the_images_and_says_how_to_point_at_them(trained: dict, elsewhere: Path) -> None:
    data = trained["start"] / "ds"
    moved = elsewhere / "moved_ds"
    shutil.move(data, moved)
    try:
        result = invoke(["evaluate", "--run", trained["run_id"]])
        assert result.exit_code == 2
        assert "--data-dir" in result.stderr and "were not found" in result.stderr
        result = invoke(["evaluate", "--run", trained["run_id"], "--data-dir", str(moved)])
        assert result.exit_code == 0, result.output
    finally:
        shutil.move(moved, data)
    assert invoke(["evaluate", "--run", "0" * 32]).exit_code == 2


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_predict_on_a_folder_writes_one_row_per_image_with_probabilities_summing_to_one(
        trained: dict, elsewhere: Path) -> None:
    images = elsewhere / "to_predict"
    (images / "nested").mkdir(parents=True)
    paths = []
    for i in range(5):
        path = (images / "nested" if i % 2 else images) / f"x{i}.png"
        Image.fromarray(synthetic_image(i % 3, 100 + i, SIZE)).save(path)
        paths.append(path)
    (images / "notes.txt").write_text("not an image")
    out = elsewhere / "preds.csv"
    result = invoke(["predict", "--model", f"runs:/{trained['run_id']}/model", "--input", str(images),
                     "--output", str(out), "--top-k", "2"])
    assert result.exit_code == 0, result.output
    rows = read_csv(out)
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in paths)
    prob_cols = [c for c in rows[0] if c.startswith("prob_")]
    assert prob_cols == ["prob_c0", "prob_c1", "prob_c2"]
    expected = torch_probs(trained["run_dir"] / "weights" / "best.pt", [Path(r["path"]) for r in rows])
    for row, want in zip(rows, expected):
        probs = [float(row[c]) for c in prob_cols]
        assert sum(probs) == pytest.approx(1.0, abs=1e-9)
        assert probs == pytest.approx(want.tolist(), abs=1e-6)
        assert row["label"] == row["top1_label"] == prob_cols[int(np.argmax(probs))][len("prob_"):]
        assert float(row["top1_prob"]) >= float(row["top2_prob"])
    # The local checkpoint gives the same predictions as the logged pyfunc model.
    local = elsewhere / "local.csv"
    best = trained["run_dir"] / "weights" / "best.pt"
    assert invoke(["predict", "--model", str(best), "--input", str(images), "--output", str(local)]).exit_code == 0
    assert [r["label"] for r in read_csv(local)] == [r["label"] for r in rows]


def test_predict_stops_at_a_bad_image_unless_told_to_skip_it(trained: dict, elsewhere: Path) -> None:
    images = elsewhere / "with_bad"
    images.mkdir()
    Image.fromarray(synthetic_image(0, 7, SIZE)).save(images / "good.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    model = f"runs:/{trained['run_id']}/model"
    result = invoke(["predict", "--model", model, "--input", str(images), "--output", "p.csv"])
    assert result.exit_code == 2 and "broken.png" in result.stderr
    assert not Path("p.csv").exists()
    result = invoke(["predict", "--model", model, "--input", str(images), "--output", "p.csv", "--skip-bad"])
    assert result.exit_code == 0, result.output
    rows = {Path(r["path"]).name: r for r in read_csv(Path("p.csv"))}
    assert rows["broken.png"]["error"] and rows["broken.png"]["label"] == ""
    assert rows["good.png"]["error"] == "" and rows["good.png"]["label"] in ("c0", "c1", "c2")
    assert invoke(["predict", "--model", "runs:/" + "0" * 32 + "/model", "--input", str(images)]).exit_code == 2


def test_logged_pyfunc_takes_paths_bytes_and_data_uris_alike(trained: dict, elsewhere: Path) -> None:
    import base64

    import mlflow.pyfunc
    import pandas as pd

    model = mlflow.pyfunc.load_model(f"runs:/{trained['run_id']}/model")
    image = trained["start"] / "ds" / "raw" / "c2" / "img_004.png"
    raw = image.read_bytes()
    frame = pd.DataFrame({"image": [str(image), raw, "data:image/png;base64," + base64.b64encode(raw).decode()]})
    out = model.predict(frame)
    assert list(out.columns) == ["label", "prob_c0", "prob_c1", "prob_c2"]
    expected = torch_probs(trained["run_dir"] / "weights" / "best.pt", [image])[0].tolist()
    for _, row in out.iterrows():
        assert [row["prob_c0"], row["prob_c1"], row["prob_c2"]] == pytest.approx(expected, abs=1e-6)
    assert model.metadata.get_input_schema().input_names() == ["image"]
    with pytest.raises(Exception, match="not an image"):
        model.predict(pd.DataFrame({"image": [b"definitely not an image"]}))
