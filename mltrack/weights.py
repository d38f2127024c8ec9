"""The pretrained-weights policy (``model.weights``): resolve, preflight and load.

- ``none``: random init, built with the head sized to the dataset (:func:`mltrack.models.build_model`).
- ``DEFAULT`` or an enum member name (``IMAGENET1K_V1``): torchvision weights, read only from the local
  hub cache (this platform runs offline) with ``torch.load(weights_only=True)``. torchvision's own loader
  unpickles the cached file without the weights-only guard, so we rebuild the architecture and load it ourselves.
- a ``.pth`` / ``.pt`` path: a state dict (or an mltrack checkpoint holding one under ``"model"``); a head
  of a different size is replaced, any other mismatch is a UserError.

Like :mod:`mltrack.models` (whose registry this module reads), importing it imports no torch.
:mod:`mltrack.models` imports this module only inside functions and re-exports the public names.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from mltrack.errors import CheckpointError, ConfigError, UserError
from mltrack.models import AUX_HEADS, MODELS, TORCHVISION_NAMES, head_name, registry_entry, resolve_ref, size_kwargs

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mltrack.config import ModelConfig

_FILE_SUFFIXES = (".pth", ".pt")
# Key prefixes added by wrappers: DDP/DataParallel, torch.compile, Opacus GradSampleModule.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_module.")
# Old torchvision DenseNet files name layers 'norm.1' where the module is now 'norm1'.
_DENSENET_LEGACY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def weights_kind(weights: str) -> str:
    """``"none"``, ``"file"`` (a .pth/.pt path) or ``"enum"`` (a torchvision weights name) for ``model.weights``."""
    if weights.strip().lower() == "none":
        return "none"
    return "file" if weights.lower().endswith(_FILE_SUFFIXES) else "enum"


# ---------------------------------------------------------------- torchvision weights


def resolve_weights(architecture: str, weights: str) -> Any:
    """The torchvision weights enum member named by ``weights`` (``DEFAULT``, ``IMAGENET1K_V1``, or
    ``ResNet18_Weights.IMAGENET1K_V1``; case-insensitive). Unknown name -> UserError listing the valid ones."""
    if architecture not in TORCHVISION_NAMES:
        raise UserError(
            f"model.architecture '{architecture}' has no pretrained torchvision weights (model.weights: "
            f"{weights}); use model.weights: none or a .pth/.pt state dict file"
        )
    from torchvision.models import get_model_weights

    enum = get_model_weights(architecture)
    name = weights.strip().removeprefix(f"{enum.__name__}.").upper()
    if name not in enum.__members__:
        valid = ", ".join(enum.__members__)
        raise UserError(
            f"unknown model.weights '{weights}' for {architecture}. Valid: {valid}, none, or a .pth/.pt file"
        )
    return enum[name]


def cached_weights_path(member: Any) -> Path:
    """Where torch.hub keeps the file of weights enum ``member``: ``<hub dir>/checkpoints/<url basename>``
    (the hub dir follows ``TORCH_HOME``, read at call time)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(member.url).path)


def _offline_message(architecture: str, member: Any, path: Path) -> str:
    return (
        f"pretrained weights '{architecture}.{member.name}' are not in the cache {path} and this machine is "
        f"offline; copy the file there, use model.weights: <file.pth>, or model.weights: none"
    )


def preflight_weights(cfg: ModelConfig) -> None:
    """Fail fast, before any MLflow run exists, if ``cfg.weights`` cannot be loaded on this machine.

    Checks: the architecture is known; an enum name is valid for it and its file is in the torch hub
    cache (no download is ever attempted); a .pth/.pt path is an existing file. Reads no weights.
    """
    registry_entry(cfg.architecture)
    kind = weights_kind(cfg.weights)
    if kind == "file":
        path = Path(cfg.weights).expanduser()
        if not path.is_file():
            raise UserError(
                f"model.weights file not found: {path.resolve()} (give an existing .pth/.pt state dict, "
                f"a torchvision weights name such as DEFAULT, or none)"
            )
    elif kind == "enum":
        member = resolve_weights(cfg.architecture, cfg.weights)
        path = cached_weights_path(member)
        if not path.is_file():
            raise UserError(_offline_message(cfg.architecture, member, path))


def build_pretrained(architecture: str, weights: str, image_size: int | None) -> nn.Module:
    """``architecture`` with the cached torchvision ``weights`` loaded (its original head, aux heads dropped).

    ``image_size`` (px) must equal the weights' native size for fixed-size models (ConfigError otherwise).
    Raises UserError when the file is not cached, CheckpointError when it does not fit the architecture.
    """
    member = resolve_weights(architecture, weights)
    path = cached_weights_path(member)
    if not path.is_file():
        raise UserError(_offline_message(architecture, member, path))
    native = member.meta.get("min_size")
    if image_size is not None and size_kwargs(architecture, image_size) and native != (image_size, image_size):
        raise ConfigError(
            f"{architecture} weights {member.name} are trained at {native[0]} px but data.image_size is "
            f"{image_size}; set data.image_size: {native[0]} or model.weights: none"
        )
    kwargs: dict[str, Any] = {"num_classes": len(member.meta["categories"])}
    # The constructor arguments torchvision's builder implies for these weights (torchvision/models/*.py).
    if architecture in AUX_HEADS:
        kwargs.update(transform_input=True, aux_logits=True, init_weights=False)
    elif architecture.startswith("vgg"):
        kwargs["init_weights"] = False
    elif architecture.startswith("vit_"):
        kwargs["image_size"] = native[0]
    elif architecture == "maxvit_t":
        kwargs["input_size"] = native
    model = resolve_ref(MODELS[architecture])(weights=None, **kwargs)
    try:
        missing, unexpected = model.load_state_dict(_read_state_dict(path), strict=False)
    except RuntimeError as err:  # shape mismatches raise even with strict=False
        missing, unexpected = [str(err).splitlines()[-1].strip()], []
    if missing or unexpected:
        raise CheckpointError(
            f"cached weights {path} do not fit {architecture} (missing: {missing[:3]}, unexpected: "
            f"{unexpected[:3]}); delete the file and copy the original torchvision file there"
        )
    _drop_aux_heads(model, architecture)
    return model


def _drop_aux_heads(model: nn.Module, architecture: str) -> None:
    if architecture in AUX_HEADS:
        model.aux_logits = False
        for attr in AUX_HEADS[architecture]:
            setattr(model, attr, None)


# ---------------------------------------------------------------- state dict files


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict with ``weights_only=True``; accepts a bare state dict or a dict holding one under
    ``model`` / ``state_dict`` (mltrack checkpoints), and strips wrapper prefixes (``module.`` ...).
    The ``_metadata`` (per-module versions) is kept: BatchNorm and MNASNet read it to load old files."""
    import pickle

    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"weights file {path} cannot be loaded as plain tensors ({first}); it is corrupt or an unsafe "
            f"pickle — use a state dict saved with torch.save(model.state_dict(), ...)"
        ) from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"weights file {path} does not hold a state dict (name -> tensor)")
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in obj):
            obj = _rekey(obj, lambda k, p=prefix: k[len(p):] if k.startswith(p) else ("" if k == p[:-1] else k))
    return _rekey(obj, _legacy_densenet_key)


def _rekey(state: dict[str, Any], rename: Any, keep: Any = None) -> dict[str, Any]:
    """A copy of ``state`` with keys renamed (and filtered by ``keep``), its ``_metadata`` following."""
    from collections import OrderedDict

    out: Any = OrderedDict((rename(k), v) for k, v in state.items() if keep is None or keep(k))
    meta = getattr(state, "_metadata", None)
    if meta is not None:
        out._metadata = OrderedDict((rename(k), v) for k, v in meta.items())
    return out


def _legacy_densenet_key(key: str) -> str:
    match = _DENSENET_LEGACY.match(key)
    return match.group(1) + match.group(2) if match else key


def load_weights_file(model: nn.Module, architecture: str, path: Path) -> None:
    """Load a state dict file into ``model``. The file's head is dropped when its size differs (the model
    keeps its fresh ``num_classes`` head) or is absent; any other difference is a UserError, never a
    silent partial load."""
    state = _read_state_dict(path.expanduser())
    own = model.state_dict()
    head = head_name(model)
    head_keys = {k for k in own if k.startswith(f"{head}.")}
    shapes = {k for k in state.keys() & own.keys() if state[k].shape != own[k].shape}
    aux = tuple(f"{attr}." for attr in AUX_HEADS.get(architecture, ())) or None  # we build without aux heads
    drop = head_keys if shapes and shapes <= head_keys else set()
    state = _rekey(state, lambda k: k, keep=lambda k: k not in drop and not (aux and k.startswith(aux)))
    if shapes - drop:
        raise UserError(_mismatch_message(path, architecture, [], [], sorted(shapes - drop), state, own))
    result = model.load_state_dict(state, strict=False)
    missing = sorted(set(result.missing_keys) - head_keys)
    if missing or result.unexpected_keys:
        raise UserError(_mismatch_message(path, architecture, missing, sorted(result.unexpected_keys), [], state, own))


def _mismatch_message(
    path: Path, architecture: str, missing: list[str], unexpected: list[str], shapes: list[str],
    state: dict[str, Any], own: dict[str, Any],
) -> str:
    def some(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (", …" if len(keys) > 3 else "")

    parts = [f"{len(missing)} missing keys ({some(missing)})"] if missing else []
    parts += [f"{len(unexpected)} unexpected keys ({some(unexpected)})"] if unexpected else []
    parts += [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in shapes[:3]]
    return (
        f"weights file {path} does not fit model.architecture '{architecture}': {'; '.join(parts)}. "
        f"Use a file saved from the same architecture, or model.weights: none"
    )
