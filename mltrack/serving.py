"""Inference from trained weights: the :class:`Predictor` shared by ``predict``, ``evaluate``, the CV
ensemble and the MLflow pyfunc model, whose loader is :func:`_load_pyfunc` (MLflow finds this module by
name, ``loader_module="mltrack.serving"``). No mlflow import here: serving needs only torch.

A packaged model is a directory (``MODEL_DIR_NAME`` inside the pyfunc's ``data/``)::

    model.json                 format, class names, members [{file, run_id, fold}]
    config.yaml                the run config of the first member (architecture, image size, transforms)
    weights/<member>.pt        {"schema", "model", "class_map", "config", "mlflow_run_id"} (+ .sha256)

Several members are a soft-vote ensemble: their softmax probabilities are averaged. Weights load only
through :func:`mltrack.checkpoint.load` (sha256 verified, ``weights_only=True``).

Inputs (column ``image`` of the pyfunc's DataFrame): a file path, raw image bytes, or a
``data:image/...;base64,`` URI (what a JSON REST request can carry). Every input is decoded by
:func:`mltrack.data.images.load_rgb` (pixel limit from the header, full decode, EXIF, RGB). A path is
opened on the serving host, so expose a served model only to callers you would let read images there.
"""
from __future__ import annotations

import base64
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mltrack import checkpoint
from mltrack.config import RunConfig, to_yaml, validate
from mltrack.errors import CheckpointError, DataError

if TYPE_CHECKING:
    import pandas as pd
    from PIL import Image

MODEL_DIR_NAME = "mltrack_model"  # the pyfunc's data_path basename: <model>/data/mltrack_model/
FORMAT = 1
IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"
_DATA_URI_PREFIX = "data:"


def prob_column(class_name: str) -> str:
    """Output column holding the probability of ``class_name``."""
    return f"prob_{class_name}"


# ---------------------------------------------------------------- weights


def slim_state(state: dict[str, Any]) -> dict[str, Any]:
    """The part of a training checkpoint inference needs (no optimizer, RNG or history): plain data."""
    return {"schema": checkpoint.SCHEMA, "model": state["model"], "class_map": list(state["class_map"]),
            "config": state["config"], "mlflow_run_id": state.get("mlflow_run_id")}


def build_network(cfg: RunConfig, num_classes: int) -> nn.Module:
    """A fresh ``cfg.model.architecture`` with ``num_classes`` logits in eval mode, shaped as training left
    it: no pretrained download (the weights are loaded next) and, for the dp trainer, the same layer
    replacements (BatchNorm -> GroupNorm) that Opacus training made."""
    from mltrack.config import replace
    from mltrack.models import build_model

    plain = replace(cfg, **{"model.weights": "none"})
    model = build_model(plain.model, num_classes, image_size=cfg.data.image_size)
    if cfg.training.trainer_type == "dp":
        from mltrack.trainers.dp import fix_model

        model, _ = fix_model(model)
    return model.eval()


def network_from_state(state: dict[str, Any]) -> tuple[nn.Module, RunConfig]:
    """Rebuild the network of a (slim or full) checkpoint dict and load its weights strictly."""
    cfg = validate(state["config"])
    model = build_network(cfg, len(state["class_map"]))
    try:
        model.load_state_dict(state["model"])  # strict: a silent partial load would predict garbage
    except RuntimeError as err:
        raise CheckpointError(f"the weights do not fit {cfg.model.architecture}: {str(err)[:500]}") from None
    return model.eval(), cfg


# ---------------------------------------------------------------- decoding inputs


def decode_image(value: Any, max_pixels: int) -> Image.Image:
    """An RGB image from a path (str/PathLike), raw bytes, or a base64 ``data:`` URI.

    Bytes go through a temporary file so that every input takes the one validated decode path.
    Raises DataError naming the input for anything unreadable.
    """
    from mltrack.data.images import load_rgb

    if isinstance(value, str) and value.startswith(_DATA_URI_PREFIX):
        head, _, payload = value.partition(",")
        if ";base64" not in head:
            raise DataError(f"unsupported data URI '{head[:40]}': only base64 data URIs are accepted")
        try:
            value = base64.b64decode(payload, validate=True)
        except ValueError as err:
            raise DataError(f"invalid base64 in data URI: {err}") from None
    if isinstance(value, (bytes, bytearray, memoryview)):
        fd, tmp = tempfile.mkstemp(prefix="mltrack-input-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(bytes(value))
            return load_rgb(Path(tmp), max_pixels)
        finally:
            os.unlink(tmp)
    if isinstance(value, (str, os.PathLike)):
        return load_rgb(Path(value), max_pixels)
    raise DataError(f"cannot read an image from a {type(value).__name__}: give a path, bytes or a data URI")


def data_uri(path: Path, image_size: int, max_pixels: int) -> str:
    """A small PNG data URI of the image at ``path`` resized to ``image_size`` (the input example)."""
    import io

    image = decode_image(path, max_pixels).resize((image_size, image_size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class _Inputs(Dataset):
    """Item i: (image tensor, error message or ""). With ``skip_bad`` an unreadable input yields a zero
    image and its error instead of raising, so a caller can report it without stopping the batch."""

    def __init__(self, sources: Sequence[Any], transform: Callable[..., torch.Tensor], size: int,
                 max_pixels: int, skip_bad: bool) -> None:
        self.sources, self.transform, self.size = list(sources), transform, size
        self.max_pixels, self.skip_bad = max_pixels, skip_bad

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        try:
            return self.transform(decode_image(self.sources[index], self.max_pixels)), ""
        except DataError as err:
            if not self.skip_bad:
                raise
            return torch.zeros(3, self.size, self.size), str(err)


# ---------------------------------------------------------------- the predictor


@dataclass
class Prediction:
    """Per input: log of the (ensemble, TTA-averaged) class probabilities and the decode error, if any."""

    log_probs: torch.Tensor  # (N, C) float64; rows of skipped inputs are NaN
    errors: list[str]

    @property
    def probs(self) -> torch.Tensor:
        return self.log_probs.exp()


class Predictor:
    """One network or a soft-vote ensemble with the eval transform of its config.

    All members must share the class map, architecture and preprocessing (checked at construction).
    ``predict`` is the MLflow pyfunc interface.
    """

    def __init__(self, networks: list[nn.Module], cfg: RunConfig, class_names: list[str],
                 device: torch.device | str = "cpu") -> None:
        from mltrack.data.transforms import build_transform

        if not networks:
            raise CheckpointError("a predictor needs at least one network")
        self.device = torch.device(device)
        self.networks = [n.to(self.device).eval() for n in networks]
        self.cfg, self.class_names = cfg, list(class_names)
        self.transform = build_transform(cfg.data.transforms, cfg.data.image_size, train=False)

    @classmethod
    def from_states(cls, states: list[dict[str, Any]], device: torch.device | str = "cpu") -> "Predictor":
        """Build from checkpoint dicts (full or slim); refuses members that disagree on what they predict."""
        built = [network_from_state(s) for s in states]
        first_cfg, names = built[0][1], list(states[0]["class_map"])
        for state, (_, cfg) in zip(states[1:], built[1:]):
            if list(state["class_map"]) != names:
                raise CheckpointError(f"ensemble members disagree on the class map: {names} vs {state['class_map']}")
            if (cfg.model.architecture, cfg.data.image_size, cfg.data.transforms) != \
                    (first_cfg.model.architecture, first_cfg.data.image_size, first_cfg.data.transforms):
                raise CheckpointError("ensemble members differ in architecture, image size or transforms")
        return cls([net for net, _ in built], first_cfg, names, device)

    @classmethod
    def from_checkpoint(cls, path: Path, device: torch.device | str = "cpu") -> "Predictor":
        """From one mltrack checkpoint file (``weights/best.pt``), verified against its sha256 manifest."""
        return cls.from_states([checkpoint.load(Path(path))], device)

    @classmethod
    def from_model_dir(cls, path: Path, device: torch.device | str = "cpu") -> "Predictor":
        """From a packaged model: the ``mltrack_model`` directory, or a pyfunc model directory holding it."""
        root = find_model_dir(Path(path))
        meta = json.loads((root / "model.json").read_text())
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{root} holds model format {meta.get('format')}, this mltrack reads {FORMAT}")
        states = [checkpoint.load(root / m["file"]) for m in meta["members"]]
        return cls.from_states(states, device)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @torch.no_grad()
    def log_probs(self, images: torch.Tensor, tta: bool = False) -> torch.Tensor:
        """(N, C) float64 log of the mean softmax over members (and, with ``tta``, over the image and its
        horizontal mirror): ``logsumexp(log_softmax) - log(K)``, exact for a single view and member."""
        images = images.to(self.device)
        views = [images, torch.flip(images, dims=[3])] if tta else [images]
        parts = [torch.log_softmax(net(v).double(), dim=1) for net in self.networks for v in views]
        return (torch.logsumexp(torch.stack(parts), dim=0) - math.log(len(parts))).cpu()

    def run(self, sources: Sequence[Any], *, batch_size: int = 64, num_workers: int = 0, tta: bool = False,
            skip_bad: bool = False, advance: Callable[..., None] | None = None) -> Prediction:
        """Decode, transform and classify ``sources`` (paths, bytes or data URIs) in batches, in order.

        ``advance(n)`` is called after each batch (a progress bar). Raises DataError on the first
        unreadable input unless ``skip_bad``, which records it in ``errors`` and leaves its row NaN.
        """
        size = self.cfg.data.image_size
        data = _Inputs(sources, self.transform, size, self.cfg.data.max_image_pixels, skip_bad)
        loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        rows, errors = [], []
        for images, batch_errors in loader:
            out = self.log_probs(images, tta)
            bad = torch.tensor([bool(e) for e in batch_errors])
            out[bad] = float("nan")
            rows.append(out)
            errors.extend(batch_errors)
            if advance is not None:
                advance(len(batch_errors))
        log_probs = torch.cat(rows) if rows else torch.empty(0, self.num_classes, dtype=torch.float64)
        return Prediction(log_probs, list(errors))

    def to_frame(self, prediction: Prediction) -> pd.DataFrame:
        """``label`` + one ``prob_<class>`` column per class, one row per input."""
        import pandas as pd

        probs = prediction.probs.numpy()
        labels = [self.class_names[int(i)] if not err else "" for i, err in
                  zip(prediction.log_probs.nan_to_num(-math.inf).argmax(1).tolist(), prediction.errors)]
        frame = pd.DataFrame({LABEL_COLUMN: labels})
        for j, name in enumerate(self.class_names):
            frame[prob_column(name)] = probs[:, j]
        return frame

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """MLflow pyfunc entry: a DataFrame with column ``image`` (or a list of inputs) -> label + probabilities.

        ``params``: ``tta`` (bool), ``batch_size`` (int).
        """
        import pandas as pd

        params = params or {}
        if isinstance(model_input, pd.DataFrame):
            if IMAGE_COLUMN not in model_input.columns:
                raise DataError(f"the input needs a column '{IMAGE_COLUMN}' (image path, bytes or data URI); "
                                f"got columns {list(model_input.columns)}")
            sources = model_input[IMAGE_COLUMN].tolist()
        else:
            sources = list(model_input)
        prediction = self.run(sources, batch_size=int(params.get("batch_size", 64)), tta=bool(params.get("tta", False)))
        return self.to_frame(prediction)


# ---------------------------------------------------------------- packaged model directory


def find_model_dir(path: Path) -> Path:
    """The ``mltrack_model`` directory at or under ``path`` (a pyfunc dir keeps it in ``data/``)."""
    for candidate in (path, path / MODEL_DIR_NAME, path / "data" / MODEL_DIR_NAME):
        if (candidate / "model.json").is_file():
            return candidate
    raise CheckpointError(f"{path} is not an mltrack model (no model.json in it, in {MODEL_DIR_NAME}/ or in "
                          f"data/{MODEL_DIR_NAME}/)")


def write_model_dir(dst: Path, states: list[dict[str, Any]], members: list[dict[str, Any]]) -> Path:
    """Write a packaged model to ``dst`` (created; must not exist): one weights file per member.

    ``members[i]`` describes ``states[i]`` (``run_id``, ``fold``, ``name``) and gets its ``file`` added.
    Returns ``dst``.
    """
    if len(states) != len(members) or not states:
        raise ValueError("write_model_dir needs one member description per state, at least one")
    dst.mkdir(parents=True)
    described = []
    for state, member in zip(states, members):
        rel = f"weights/{member['name']}.pt"
        checkpoint.save(slim_state(state), dst / rel)
        described.append({**member, "file": rel})
    cfg = validate(states[0]["config"])
    meta = {"format": FORMAT, "class_names": list(states[0]["class_map"]), "members": described,
            "architecture": cfg.model.architecture, "image_size": cfg.data.image_size,
            "transforms": cfg.data.transforms, "input_column": IMAGE_COLUMN}
    (dst / "model.json").write_text(json.dumps(meta, indent=2))
    (dst / "config.yaml").write_text(to_yaml(cfg))
    return dst


def _load_pyfunc(data_path: str) -> Predictor:
    """MLflow pyfunc loader: ``data_path`` is the model's ``data/mltrack_model`` directory.

    Device: env ``MLTRACK_DEVICE`` (cpu, cuda, cuda:N), else CUDA when available, else CPU.
    """
    device = os.environ.get("MLTRACK_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return Predictor.from_model_dir(Path(data_path), device)
