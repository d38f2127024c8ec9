"""Classification metrics as pure functions: tensors in, plain Python out.

Everything derives from one confusion matrix (rows = true class, columns = predicted class), so a
distributed run only has to sum matrices. Ill-defined ratios (0/0) are 0.0, as scikit-learn's
``zero_division=0``. torch and matplotlib are imported lazily.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

_METRIC_KEY_BAD = re.compile(r"[^\w.\- /]")


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 (num_classes, num_classes) counts, ``cm[true, pred]``, on the inputs' device.

    ``preds`` holds class indices of the same shape as ``targets``, or logits with one more dimension
    (classes on dim 1), which are arg-maxed. One ``bincount``, no per-sample loop; on a GPU the range
    check and bincount's output sizing each read one scalar back. Raises ValueError if a label is
    outside ``[0, num_classes)`` (it would otherwise land silently in another cell).
    """
    import torch

    if preds.dim() == targets.dim() + 1:
        preds = preds.argmax(dim=1)
    if preds.shape != targets.shape:
        raise ValueError(f"confusion_matrix: preds {tuple(preds.shape)} vs targets {tuple(targets.shape)}")
    preds, targets = preds.reshape(-1).long(), targets.reshape(-1).long()
    both = torch.cat((preds, targets))
    if bool(((both < 0) | (both >= num_classes)).any()):
        low, high = int(both.min()), int(both.max())
        raise ValueError(f"confusion_matrix: labels must be in [0, {num_classes}), got [{low}, {high}]")
    flat = (targets * num_classes + preds).bincount(minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def accumulate_confusion(cm: torch.Tensor, preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Add one batch's ``cm[true, pred]`` counts into ``cm`` (n x n int64) in place; return how many
    pairs fell outside ``[0, n)`` (a 0-d tensor on the device; they are not counted).

    Unlike :func:`confusion_matrix` nothing is read back to the host, so the training loop can call it
    every batch without stalling the GPU queue; the caller checks the out-of-range count once, with
    :func:`check_labels`. ``scatter_add_`` on a 1-D tensor is deterministic on CUDA.
    """
    import torch

    n = cm.shape[0]
    preds, targets = preds.reshape(-1).long(), targets.reshape(-1).long()
    valid = (preds >= 0) & (preds < n) & (targets >= 0) & (targets < n)
    index = torch.where(valid, targets * n + preds, torch.zeros_like(preds))
    cm.view(-1).scatter_add_(0, index, valid.long())
    return (~valid).sum()


def check_labels(invalid: torch.Tensor, num_classes: int) -> None:
    """Raise ValueError if :func:`accumulate_confusion` met labels outside ``[0, num_classes)``."""
    count = int(invalid)
    if count:
        raise ValueError(f"{count} predicted or true labels were outside [0, {num_classes}): the model's "
                         "output size or the dataset's class indices are wrong")


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    # 0/0 -> 0 (sklearn zero_division=0) without a Python branch per class.
    import torch

    return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))


def summarize(cm: torch.Tensor) -> dict[str, Any]:
    """Scores from a confusion matrix, as floats / lists (JSON-able).

    Keys: ``acc``, ``balanced_acc`` (mean recall over classes that have support, as scikit-learn),
    ``f1_macro``, ``precision_macro``, ``recall_macro`` (unweighted means over all classes),
    ``n`` (samples), and per-class lists ``precision``, ``recall``, ``f1``, ``support`` (ints).
    """
    import torch

    cm = cm.detach().to("cpu", dtype=torch.float64)
    tp = cm.diagonal()
    support, predicted = cm.sum(dim=1), cm.sum(dim=0)
    precision = _ratio(tp, predicted)
    recall = _ratio(tp, support)
    f1 = _ratio(2 * tp, support + predicted)  # = 2PR/(P+R), and 0 where tp == 0
    total = float(cm.sum())
    present = support > 0
    return {
        "acc": float(tp.sum()) / total if total else 0.0,
        "balanced_acc": float(recall[present].mean()) if bool(present.any()) else 0.0,
        "f1_macro": float(f1.mean()),
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "n": int(total),
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "f1": f1.tolist(),
        "support": [int(s) for s in support.tolist()],
    }


def classification_report(cm: torch.Tensor, class_names: Sequence[str], digits: int = 2) -> tuple[str, dict[str, Any]]:
    """A text table in scikit-learn's layout and the same numbers as a JSON-able dict.

    The dict matches ``sklearn.metrics.classification_report(..., output_dict=True)``: one entry per
    class with precision / recall / f1-score / support, then ``accuracy``, ``macro avg``,
    ``weighted avg`` (support-weighted), plus ``balanced accuracy``.
    """
    if len(class_names) != cm.shape[0]:
        raise ValueError(f"classification_report: {len(class_names)} names for {cm.shape[0]} classes")
    s = summarize(cm)
    rows = {
        name: _row(s["precision"][i], s["recall"][i], s["f1"][i], s["support"][i])
        for i, name in enumerate(class_names)
    }
    total = s["n"]
    weights = [sup / total if total else 0.0 for sup in s["support"]]
    weighted = [sum(w * v for w, v in zip(weights, s[k])) for k in ("precision", "recall", "f1")]
    report: dict[str, Any] = dict(rows)
    report["accuracy"] = s["acc"]
    report["macro avg"] = _row(s["precision_macro"], s["recall_macro"], s["f1_macro"], total)
    report["weighted avg"] = _row(*weighted, total)
    report["balanced accuracy"] = s["balanced_acc"]
    return _report_text(report, list(class_names), digits), report


def _row(precision: float, recall: float, f1: float, support: int) -> dict[str, Any]:
    return {"precision": precision, "recall": recall, "f1-score": f1, "support": support}


def _report_text(report: dict[str, Any], names: list[str], digits: int) -> str:
    width = max([len(n) for n in names] + [len("weighted avg"), digits])
    cols = ("precision", "recall", "f1-score", "support")
    lines = [f"{'':>{width}} " + "".join(f" {c:>9}" for c in cols), ""]

    def line(label: str, r: dict[str, Any]) -> str:
        nums = "".join(f" {r[k]:>9.{digits}f}" for k in cols[:3])
        return f"{label:>{width}} {nums} {r['support']:>9}"

    lines += [line(n, report[n]) for n in names] + [""]
    lines.append(f"{'accuracy':>{width}}  {'':>9} {'':>9} {report['accuracy']:>9.{digits}f} {report['macro avg']['support']:>9}")
    lines += [line(label, report[label]) for label in ("macro avg", "weighted avg")]
    lines.append(f"{'balanced acc':>{width}}  {'':>9} {'':>9} {report['balanced accuracy']:>9.{digits}f}")
    return "\n".join(lines) + "\n"


def sanitize_metric_key(name: str) -> str:
    """A string MLflow accepts as (part of) a metric key: characters outside ``[\\w.\\- /]`` become ``_``
    (DESIGN §4), and path segments MLflow rejects (empty, ``.``, ``..``: leading/trailing/double ``/``)
    become underscores of the same length, so ``"a/../b"`` stays distinct from ``"b"``."""
    cleaned = _METRIC_KEY_BAD.sub("_", name)
    parts = cleaned.split("/")
    parts = ["_" * max(1, len(p)) if p.strip(".") == "" else p for p in parts]
    return "/".join(parts)


def confusion_matrix_figure(cm: torch.Tensor | Any, class_names: Sequence[str], title: str) -> Figure:
    """A matplotlib Figure (Agg canvas, no pyplot state) of ``cm``: colours are row-normalised (recall
    per true class, so rare classes are as visible as common ones), cells annotated with raw counts.
    Size grows with the class count so 10+ labels stay readable; annotations stop above 30 classes.
    ``cm``: a tensor, or a numpy array / nested lists."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(cm.detach().to("cpu") if hasattr(cm, "detach") else cm, dtype=np.int64)
    n = counts.shape[0]
    rows = np.maximum(counts.sum(axis=1, keepdims=True), 1)
    norm = counts.astype(np.float64) / rows
    side = max(4.0, 0.55 * n + 2.5)
    fig = Figure(figsize=(side + 1.0, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    ax.set(title=title, xlabel="predicted", ylabel="true", xticks=range(n), yticks=range(n))
    ax.set_xticklabels(class_names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticklabels(class_names)
    if n <= 30:
        size = 10 if n <= 12 else 7
        for i in range(n):
            for j in range(n):
                colour = "white" if norm[i, j] > 0.5 else "black"
                ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", color=colour, fontsize=size)
    fig.tight_layout()
    return fig
