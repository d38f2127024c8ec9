"""``mltrack cv`` through the real click group: parent + children in MLflow, aggregates recomputed from the
children's logged values, the ensemble recomputed with plain torch, a fold subset with a failing fold."""
from __future__ import annotations

import csv
import io
import json
import re
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
        "--set", "training.device=cpu"]


def write_dataset(root: Path, folds: int, per_class: int = 9) -> Path:
    from mltrack.data.splits import make_splits

    for c in range(3):
        (root / "raw" / f"c{c}").mkdir(parents=True)
        for j in range(per_class):
            Image.fromarray(synthetic_image(c, j, SIZE)).save(root / "raw" / f"c{c}" / f"img_{j:03d}.png")
    make_splits(root / "raw", root / "splits", folds=folds, test_fraction=0.25, seed=3)
    return root


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cv_run_id(output: str) -> str:
    return re.search(r"cv run id:\s+(\w+)", output).group(1)


def fold_value(child: dict, key: str) -> float:
    """What the child logged: val/* at its best epoch (the checkpoint the fold keeps), test/* once."""
    from mltrack.tracking import metric_history

    history = dict(metric_history(child["run_id"], key))
    return history[int(child["tags"]["mltrack.best_epoch"])] if key.startswith("val/") else history[
        max(history)]


def soft_vote(children: list[dict], data_dir: Path, dl: Path) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(test paths, mean softmax, labels), recomputed with plain torch from the children's logged best.pt
    (transform 'none' on 8 px images: pixels / 255)."""
    from mltrack.config import ModelConfig
    from mltrack.models import build_model
    from mltrack.tracking import download_artifact

    rels = (data_dir / "splits" / "test.txt").read_text().split()
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(data_dir / "raw" / r).convert("RGB")).copy())
                     .permute(2, 0, 1) for r in rels]).float() / 255.0
    y = torch.tensor([int(r.split("/")[0][1:]) for r in rels])
    probs = []
    for child in children:
        state = torch.load(download_artifact(f"runs:/{child['run_id']}/weights/best.pt", dl / child["run_id"]),
                           weights_only=True)
        model = build_model(ModelConfig(), 3).eval()
        model.load_state_dict(state["model"])
        with torch.no_grad():
            probs.append(torch.softmax(model(x).double(), 1))
    return [str(data_dir / "raw" / r) for r in rels], torch.stack(probs).mean(0), y


def test_two_fold_cv_gives_a_parent_whose_aggregates_are_the_childrens_statistics(workdir: Path) -> None:
    from mlflow.tracking import MlflowClient

    from mltrack.tracking import child_runs, run_info, run_metrics

    data = write_dataset(workdir / "ds", folds=2)
    result = CliRunner().invoke(cli, ["cv", "--data-dir", "ds", "--num-epochs", "2", *TINY], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    parent_id = cv_run_id(result.output)
    parent = run_info(parent_id)
    assert (parent["status"], parent["tags"]["mltrack.role"], parent["tags"]["mltrack.folds"]) == \
        ("FINISHED", "cv", "0,1")
    children = child_runs(parent_id)
    assert sorted((c["tags"]["mltrack.role"], c["tags"]["mltrack.fold"], c["status"]) for c in children) == \
        [("fold", "0", "FINISHED"), ("fold", "1", "FINISHED")]
    assert all(c["tags"]["mltrack.cv_run_id"] == parent_id for c in children)
    metrics = run_metrics(parent_id)
    for key in ("val/acc", "val/loss", "val/f1_macro", "test/acc", "test/loss", "test/f1/c1"):
        values = [fold_value(c, key) for c in children]
        assert metrics[f"cv/{key}_mean"] == pytest.approx(np.mean(values), abs=1e-12), key
        assert metrics[f"cv/{key}_std"] == pytest.approx(np.std(values), abs=1e-12), key
        assert (metrics[f"cv/{key}_min"], metrics[f"cv/{key}_max"]) == (min(values), max(values)), key
    assert metrics["cv/n_folds"] == 2
    paths, vote, labels = soft_vote(children, data, workdir / "dl")
    vote_acc = float((vote.argmax(1) == labels).double().mean())
    assert metrics["ensemble/test/acc"] == pytest.approx(vote_acc, abs=1e-12)
    client = MlflowClient()
    assert {a.path for a in client.list_artifacts(parent_id)} >= {"config.yaml", "cv", "ensemble", "model"}
    assert {a.path for a in client.list_artifacts(parent_id, "ensemble")} >= {
        "ensemble/confusion_matrix.png", "ensemble/classification_report.txt"}
    table = list(csv.DictReader(io.StringIO(
        Path(client.download_artifacts(parent_id, "cv/folds.csv", str(workdir))).read_text())))
    assert sorted((r["fold"], r["run_id"], r["status"]) for r in table) == \
        sorted((c["tags"]["mltrack.fold"], c["run_id"], "FINISHED") for c in children)
    md = Path(client.download_artifacts(parent_id, "cv/folds.md", str(workdir))).read_text()
    assert "mean ± std" in md and "ensemble (soft vote)" in md
    # The parent's model is one pyfunc holding both folds' weights.
    model_json = Path(client.download_artifacts(parent_id, "model/data/mltrack_model/model.json", str(workdir)))
    assert sorted(m["fold"] for m in json.loads(model_json.read_text())["members"]) == [0, 1]
    # ... and registers as one model whose predictions are the soft vote.
    runner = CliRunner()
    assert runner.invoke(cli, ["register", "--run", parent_id, "--name", "cv-ensemble", "--alias", "champion"],
                         catch_exceptions=False).exit_code == 0
    test_dir = workdir / "test_images"
    test_dir.mkdir()
    for i, path in enumerate(paths):  # numbered copies keep the order of test.txt
        (test_dir / f"{i:03d}.png").write_bytes(Path(path).read_bytes())
    out = workdir / "ensemble.csv"
    result = runner.invoke(cli, ["predict", "--model", "models:/cv-ensemble@champion", "--input", str(test_dir),
                                 "--output", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    got = torch.tensor([[float(r[f"prob_c{c}"]) for c in range(3)] for r in rows], dtype=torch.float64)
    assert torch.allclose(got, vote, atol=1e-6)


def test_fold_subset_runs_only_those_folds_and_a_failing_fold_does_not_stop_the_others(
        workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    from mltrack.tracking import child_runs, run_info, run_metrics
    from mltrack.trainers import loop

    write_dataset(workdir / "ds", folds=3)
    real_epoch = loop.run_epoch

    def fold_0_crashes(ctx):  # fault injection (as RELIABILITY T22): fold 0 dies inside its first epoch
        if ctx.cfg.data.fold == 0:
            raise RuntimeError("injected fault in fold 0")
        return real_epoch(ctx)

    monkeypatch.setattr(loop, "run_epoch", fold_0_crashes)
    result = CliRunner().invoke(cli, ["cv", "--data-dir", "ds", "--num-epochs", "1", "--folds", "0,2", *TINY],
                                catch_exceptions=False)
    assert result.exit_code == 1, result.output
    assert "fold(s) 0 failed" in result.stderr
    parent_id = cv_run_id(result.output)
    parent = run_info(parent_id)
    assert (parent["status"], parent["tags"]["mltrack.folds"], parent["tags"]["mltrack.failed_folds"]) == \
        ("FINISHED", "0,2", "0")
    by_fold = {c["tags"]["mltrack.fold"]: c for c in child_runs(parent_id)}
    assert sorted(by_fold) == ["0", "2"]  # fold 1 was not asked for
    assert by_fold["0"]["status"] == "FAILED" and "injected fault" in by_fold["0"]["tags"]["mltrack.exit_reason"]
    table = Path(MlflowClient().download_artifacts(parent_id, "cv/folds.csv", str(workdir))).read_text()
    failed_row = next(r for r in csv.DictReader(io.StringIO(table)) if r["fold"] == "0")
    assert (failed_row["status"], failed_row["run_id"]) == ("FAILED", by_fold["0"]["run_id"])
    assert "injected fault in fold 0" in failed_row["error"]
    assert by_fold["2"]["status"] == "FINISHED"
    metrics = run_metrics(parent_id)
    assert metrics["cv/n_folds"] == 1
    assert metrics["cv/test/acc_mean"] == fold_value(by_fold["2"], "test/acc")
    assert metrics["cv/test/acc_std"] == 0.0
    assert "ensemble/test/acc" in metrics


def test_bad_input_fails_before_any_run_exists(workdir: Path) -> None:
    from mlflow.tracking import MlflowClient

    data = write_dataset(workdir / "ds", folds=2)
    bad = CliRunner().invoke(cli, ["cv", "--data-dir", "ds", "--folds", "0,7", *TINY], catch_exceptions=False)
    assert bad.exit_code == 2 and "fold(s) [7] do not exist" in bad.stderr
    (data / "raw" / "c0" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with open(data / "splits" / "fold_1_val.txt", "a") as fh:
        fh.write("c0/zz_broken.png\n")
    bad = CliRunner().invoke(cli, ["cv", "--data-dir", "ds", *TINY], catch_exceptions=False)
    assert bad.exit_code == 2 and "zz_broken.png" in bad.stderr
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert client.search_runs(experiments) == []
