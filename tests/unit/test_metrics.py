"""Metrics against scikit-learn on random labels, report layout, metric-key sanitising, the figure."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from mltrack.metrics import (
    classification_report,
    confusion_matrix,
    confusion_matrix_figure,
    sanitize_metric_key,
    summarize,
)

NAMES = ["cat", "dog", "bird with a long name", "never_predicted", "no_support", "f"]


def _labels(seed: int, n: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """Random targets and predictions over 6 classes; class 3 is never predicted, class 4 never true."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.tensor([0, 1, 2, 3, 5])[torch.randint(0, 5, (n,), generator=g)]
    noise = torch.randint(0, 6, (n,), generator=g)
    keep = torch.rand(n, generator=g) < 0.6
    preds = torch.where(keep, targets, noise)
    preds[preds == 3] = 1
    return preds, targets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_equal_scikit_learn(seed: int) -> None:
    preds, targets = _labels(seed)
    p, t, labels = preds.numpy(), targets.numpy(), list(range(6))
    cm = confusion_matrix(preds, targets, 6)
    assert cm.dtype == torch.int64
    assert np.array_equal(cm.numpy(), skm.confusion_matrix(t, p, labels=labels))
    s = summarize(cm)
    assert s["acc"] == pytest.approx(skm.accuracy_score(t, p))
    with pytest.warns(UserWarning, match="y_pred contains classes not in y_true"):
        balanced = skm.balanced_accuracy_score(t, p)  # sklearn skips the class without support, as we do
    assert s["balanced_acc"] == pytest.approx(balanced)
    for ours, average in (("f1_macro", skm.f1_score), ("precision_macro", skm.precision_score),
                          ("recall_macro", skm.recall_score)):
        assert s[ours] == pytest.approx(average(t, p, labels=labels, average="macro", zero_division=0))
    precision, recall, f1, support = skm.precision_recall_fscore_support(t, p, labels=labels, zero_division=0)
    assert s["precision"] == pytest.approx(precision.tolist())
    assert s["recall"] == pytest.approx(recall.tolist())
    assert s["f1"] == pytest.approx(f1.tolist())
    assert s["support"] == support.tolist() and s["n"] == len(t)
    assert s["precision"][3] == 0.0 and s["recall"][4] == 0.0  # the 0/0 cases


def test_logits_are_argmaxed_and_bad_labels_rejected() -> None:
    logits = torch.tensor([[0.1, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    cm = confusion_matrix(logits, torch.tensor([1, 2, 2]), 3)
    assert cm.tolist() == [[0, 0, 0], [0, 1, 0], [1, 0, 1]]
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\), got \[0, 3\]"):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="preds"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 1, 1]), 3)


def test_empty_input_gives_zeros_not_nan() -> None:
    s = summarize(confusion_matrix(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), 3))
    assert s["acc"] == s["balanced_acc"] == s["f1_macro"] == 0.0 and s["support"] == [0, 0, 0]


def test_classification_report_matches_scikit_learn() -> None:
    preds, targets = _labels(7)
    p, t = preds.numpy(), targets.numpy()
    text, report = classification_report(confusion_matrix(preds, targets, 6), NAMES)
    expected = skm.classification_report(t, p, labels=list(range(6)), target_names=NAMES, zero_division=0, output_dict=True)
    assert set(report) == set(expected) | {"balanced accuracy"}
    for key, value in expected.items():
        assert report[key] == pytest.approx(value), key
    expected_text = skm.classification_report(t, p, labels=list(range(6)), target_names=NAMES, zero_division=0)
    ours_lines = text.rstrip("\n").split("\n")
    assert ours_lines[:-1] == expected_text.rstrip("\n").split("\n")
    assert ours_lines[-1].split()[:2] == ["balanced", "acc"]
    import json

    assert json.loads(json.dumps(report)) == report


def test_sanitize_metric_key_gives_names_mlflow_accepts() -> None:
    from mlflow.utils.validation import _validate_metric_name

    assert sanitize_metric_key("val/f1/golden retriever") == "val/f1/golden retriever"
    assert sanitize_metric_key("val/f1/cat:dog?(x)") == "val/f1/cat_dog__x_"
    assert sanitize_metric_key("val/f1/Ünïcode-ok.1") == "val/f1/Ünïcode-ok.1"
    assert sanitize_metric_key("val/f1/..") == "val/f1/__"
    for name in ("a:b", "..", ".", "/lead", "trail/", "a//b", "x/./y", "%2e%2e", "tab\there", "", "日本"):
        _validate_metric_name(sanitize_metric_key(f"val/recall/{name}"))
        _validate_metric_name(sanitize_metric_key(name))


def test_confusion_matrix_figure_is_annotated_and_renders() -> None:
    from matplotlib.figure import Figure
    from PIL import Image

    g = torch.Generator().manual_seed(3)
    targets = torch.randint(0, 10, (500,), generator=g)
    preds = torch.where(torch.rand(500, generator=g) < 0.7, targets, torch.randint(0, 10, (500,), generator=g))
    cm = confusion_matrix(preds, targets, 10)
    names = [f"class_{i}" for i in range(10)]
    fig = confusion_matrix_figure(cm, names, "val — epoch 3")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert ax.get_title() == "val — epoch 3"
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    cells = sorted((round(t.get_position()[1]), round(t.get_position()[0]), int(t.get_text())) for t in ax.texts)
    assert cells == [(i, j, int(cm[i, j])) for i in range(10) for j in range(10)]
    image = ax.images[0].get_array()
    assert np.allclose(np.asarray(image).sum(axis=1), 1.0)  # colours are row-normalised
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    png = Image.open(io.BytesIO(buf.getvalue()))
    assert png.size[0] >= 600 and png.size[1] >= 600


def test_accumulate_confusion_matches_confusion_matrix_and_counts_out_of_range() -> None:
    import torch

    from mltrack.metrics import accumulate_confusion, check_labels, confusion_matrix

    gen = torch.Generator().manual_seed(0)
    preds, targets = torch.randint(0, 4, (200,), generator=gen), torch.randint(0, 4, (200,), generator=gen)
    cm = torch.zeros(4, 4, dtype=torch.int64)
    invalid = accumulate_confusion(cm, preds[:120], targets[:120]) + accumulate_confusion(cm, preds[120:], targets[120:])
    assert torch.equal(cm, confusion_matrix(preds, targets, 4)) and int(invalid) == 0
    check_labels(invalid, 4)
    bad = accumulate_confusion(cm, torch.tensor([0, 4, 1]), torch.tensor([-1, 0, 1]))
    assert int(bad) == 2 and int(cm.sum()) == 201  # only the in-range pair was counted
    with pytest.raises(ValueError, match=r"2 predicted or true labels were outside \[0, 4\)"):
        check_labels(bad, 4)
