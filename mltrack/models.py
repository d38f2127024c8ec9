"""Model registry, builders and the pretrained-weights policy.

``MODELS`` maps ``model.architecture`` to a lazy ``"module:attr"`` reference. Importing this module must
stay light because config validation imports ``MODELS``: torch and torchvision are imported inside
functions only, and ``SmallCNN`` (a ``torch.nn.Module``) is defined on first attribute access (PEP 562).

Weights policy (``model.weights``):
- ``none``: random init, built with the head sized to the dataset.
- ``DEFAULT`` or an enum member name (``IMAGENET1K_V1``): torchvision weights, read only from the local
  hub cache (this platform runs offline) with ``torch.load(weights_only=True)``. torchvision's own loader
  unpickles the cached file without the weights-only guard, so we rebuild the architecture and load it ourselves.
- a ``.pth`` / ``.pt`` path: a state dict (or an mltrack checkpoint holding one under ``"model"``); a head
  of a different size is replaced, any other mismatch is a UserError.
"""
from __future__ import annotations

import difflib
import importlib
import os
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from mltrack.errors import CheckpointError, ConfigError, UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mltrack.config import ModelConfig

# torchvision 0.29.1 classification builders (list_models(module=torchvision.models)), written out so
# that reading the registry imports nothing; a unit test keeps the two sets equal.
_TORCHVISION_NAMES: tuple[str, ...] = tuple(
    """
    alexnet
    convnext_base convnext_large convnext_small convnext_tiny
    densenet121 densenet161 densenet169 densenet201
    efficientnet_b0 efficientnet_b1 efficientnet_b2 efficientnet_b3 efficientnet_b4 efficientnet_b5
    efficientnet_b6 efficientnet_b7 efficientnet_v2_l efficientnet_v2_m efficientnet_v2_s
    googlenet inception_v3 maxvit_t
    mnasnet0_5 mnasnet0_75 mnasnet1_0 mnasnet1_3
    mobilenet_v2 mobilenet_v3_large mobilenet_v3_small
    regnet_x_16gf regnet_x_1_6gf regnet_x_32gf regnet_x_3_2gf regnet_x_400mf regnet_x_800mf regnet_x_8gf
    regnet_y_128gf regnet_y_16gf regnet_y_1_6gf regnet_y_32gf regnet_y_3_2gf regnet_y_400mf
    regnet_y_800mf regnet_y_8gf
    resnet101 resnet152 resnet18 resnet34 resnet50
    resnext101_32x8d resnext101_64x4d resnext50_32x4d
    shufflenet_v2_x0_5 shufflenet_v2_x1_0 shufflenet_v2_x1_5 shufflenet_v2_x2_0
    squeezenet1_0 squeezenet1_1
    swin_b swin_s swin_t swin_v2_b swin_v2_s swin_v2_t
    vgg11 vgg11_bn vgg13 vgg13_bn vgg16 vgg16_bn vgg19 vgg19_bn
    vit_b_16 vit_b_32 vit_h_14 vit_l_16 vit_l_32
    wide_resnet101_2 wide_resnet50_2
    """.split()
)

MODELS: dict[str, str] = {"small_cnn": "mltrack.models:SmallCNN"}
MODELS.update({name: f"torchvision.models:{name}" for name in _TORCHVISION_NAMES})

_FILE_SUFFIXES = (".pth", ".pt")
# Auxiliary classifiers are dropped: the one training loop expects a single logits tensor, and aux heads
# only help from-scratch ImageNet-scale training. Values: the attributes holding them.
_AUX_HEADS: dict[str, tuple[str, ...]] = {"googlenet": ("aux1", "aux2"), "inception_v3": ("AuxLogits",)}
# Key prefixes added by wrappers: DDP/DataParallel, torch.compile, Opacus GradSampleModule.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_module.")
# Old torchvision DenseNet files name layers 'norm.1' where the module is now 'norm1'.
_DENSENET_LEGACY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def _resolve(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


# ---------------------------------------------------------------- SmallCNN (defined lazily)

_small_cnn_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    # PEP 562: defining the nn.Module subclass needs torch, which module import must not pull in.
    if name == "SmallCNN":
        with _small_cnn_lock:
            if "SmallCNN" not in globals():
                globals()["SmallCNN"] = _define_small_cnn()
        return globals()["SmallCNN"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _define_small_cnn() -> type:
    from torch import nn

    def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
        # No conv bias: BatchNorm's shift makes it redundant. ReLU not in-place: Opacus' backward hooks
        # reject in-place ops on hooked outputs.
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    class SmallCNN(nn.Module):
        """A 3-stage conv-BN-ReLU network for 8–64 px inputs (the digits default, ~0.29 M params at width 32).

        Stages of two 3x3 convs at ``width``, ``2*width``, ``4*width`` channels with 2x max-pooling between
        them (32 px -> 8 px at the last stage), global average pooling, dropout and one linear layer.
        Works for any input of at least 4x4 px. Input: float (N, in_channels, H, W); output: logits (N, num_classes).
        """

        def __init__(self, num_classes: int, in_channels: int = 3, width: int = 32, dropout: float = 0.2) -> None:
            super().__init__()
            layers: list[nn.Module] = []
            cin = in_channels
            for stage, cout in enumerate((width, 2 * width, 4 * width)):
                if stage:
                    layers.append(nn.MaxPool2d(2))
                layers += [conv_bn_relu(cin, cout), conv_bn_relu(cout, cout)]
                cin = cout
            self.features = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.dropout = nn.Dropout(dropout)
            self.fc = nn.Linear(cin, num_classes)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):  # He init for ReLU; PyTorch's default (a=sqrt(5)) under-scales it
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.dropout(self.pool(self.features(x)).flatten(1)))

    # Pickling and torch.compile find the class by module + qualified name, served by __getattr__ above.
    SmallCNN.__qualname__ = "SmallCNN"
    SmallCNN.__module__ = __name__
    return SmallCNN


# ---------------------------------------------------------------- building


def build_model(cfg: ModelConfig, num_classes: int, *, image_size: int | None = None) -> nn.Module:
    """Build ``cfg.architecture`` with ``num_classes`` logits, weights per ``cfg.weights`` (module docstring).

    ``num_classes`` is authoritative (``cfg.num_classes`` is checked against the data by the caller).
    ``image_size`` (px, square) matters only for fixed-size models (vit_*, maxvit_t); None: their default.
    The model is on CPU in train mode. Raises ConfigError (unknown name, unsupported size) or UserError
    (weights not cached, unknown enum name, weights file missing or not fitting).
    """
    _entry(cfg.architecture)
    kind = _weights_kind(cfg.weights)
    if kind == "enum":
        model = _build_pretrained(cfg.architecture, cfg.weights, image_size)
        if output_classes(model) != num_classes:
            replace_head(model, num_classes)
    else:
        model = _build_fresh(cfg.architecture, num_classes, image_size)
        if kind == "file":
            _load_weights_file(model, cfg.architecture, Path(cfg.weights))
    return model.train()


def _entry(architecture: str) -> str:
    if architecture not in MODELS:
        close = difflib.get_close_matches(architecture, MODELS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown model.architecture '{architecture}'.{hint} Valid: {', '.join(sorted(MODELS))}")
    return MODELS[architecture]


def _weights_kind(weights: str) -> str:
    if weights.strip().lower() == "none":
        return "none"
    return "file" if weights.lower().endswith(_FILE_SUFFIXES) else "enum"


def _size_kwargs(architecture: str, image_size: int | None) -> dict[str, Any]:
    if image_size is None:
        return {}
    if architecture.startswith("vit_"):
        return {"image_size": image_size}
    if architecture == "maxvit_t":
        return {"input_size": (image_size, image_size)}
    return {}


def _build_fresh(architecture: str, num_classes: int, image_size: int | None) -> nn.Module:
    kwargs: dict[str, Any] = {"num_classes": num_classes, **_size_kwargs(architecture, image_size)}
    if architecture in _AUX_HEADS:
        kwargs.update(aux_logits=False, init_weights=True)
    try:
        return _resolve(MODELS[architecture])(**kwargs)
    except (AssertionError, ValueError) as err:
        # ViT asserts image_size % patch == 0; MaxViT needs sizes divisible by 7 at every stage (224k px).
        raise ConfigError(
            f"model.architecture '{architecture}' cannot be built for data.image_size {image_size}: {err}"
        ) from None


def _build_pretrained(architecture: str, weights: str, image_size: int | None) -> nn.Module:
    member = resolve_weights(architecture, weights)
    path = cached_weights_path(member)
    if not path.is_file():
        raise UserError(_offline_message(architecture, member, path))
    native = member.meta.get("min_size")
    if image_size is not None and _size_kwargs(architecture, image_size) and native != (image_size, image_size):
        raise ConfigError(
            f"{architecture} weights {member.name} are trained at {native[0]} px but data.image_size is "
            f"{image_size}; set data.image_size: {native[0]} or model.weights: none"
        )
    kwargs: dict[str, Any] = {"num_classes": len(member.meta["categories"])}
    # The constructor arguments torchvision's builder implies for these weights (torchvision/models/*.py).
    if architecture in _AUX_HEADS:
        kwargs.update(transform_input=True, aux_logits=True, init_weights=False)
    elif architecture.startswith("vgg"):
        kwargs["init_weights"] = False
    elif architecture.startswith("vit_"):
        kwargs["image_size"] = native[0]
    elif architecture == "maxvit_t":
        kwargs["input_size"] = native
    model = _resolve(MODELS[architecture])(weights=None, **kwargs)
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
    if architecture in _AUX_HEADS:
        model.aux_logits = False
        for attr in _AUX_HEADS[architecture]:
            setattr(model, attr, None)


# ---------------------------------------------------------------- weights


def resolve_weights(architecture: str, weights: str) -> Any:
    """The torchvision weights enum member named by ``weights`` (``DEFAULT``, ``IMAGENET1K_V1``, or
    ``ResNet18_Weights.IMAGENET1K_V1``; case-insensitive). Unknown name -> UserError listing the valid ones."""
    if architecture not in _TORCHVISION_NAMES:
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
    _entry(cfg.architecture)
    kind = _weights_kind(cfg.weights)
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


def _load_weights_file(model: nn.Module, architecture: str, path: Path) -> None:
    """Load a state dict file into ``model``. The file's head is dropped when its size differs (the model
    keeps its fresh ``num_classes`` head) or is absent; any other difference is a UserError, never a
    silent partial load."""
    state = _read_state_dict(path.expanduser())
    own = model.state_dict()
    head = head_name(model)
    head_keys = {k for k in own if k.startswith(f"{head}.")}
    shapes = {k for k in state.keys() & own.keys() if state[k].shape != own[k].shape}
    aux = tuple(f"{attr}." for attr in _AUX_HEADS.get(architecture, ())) or None  # we build without aux heads
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


# ---------------------------------------------------------------- head


def head_name(model: nn.Module) -> str:
    """Dotted name of the classifier layer: the last ``nn.Linear`` registered in ``model`` or, for models
    without one (SqueezeNet), the last ``nn.Conv2d``. Every torchvision classifier registers its output
    layer last, after any auxiliary heads."""
    from torch import nn

    linear = conv = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            linear = name
        elif isinstance(module, nn.Conv2d):
            conv = name
    found = linear if linear is not None else conv
    if found is None:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv2d layer to act as a classifier head")
    return found


def output_classes(model: nn.Module) -> int:
    """Number of logits ``model`` produces (out_features / out_channels of its head layer)."""
    head = model.get_submodule(head_name(model))
    return int(getattr(head, "out_features", None) or head.out_channels)


def replace_head(model: nn.Module, num_classes: int) -> None:
    """Replace the head layer (see ``head_name``) in place with a fresh one of ``num_classes`` outputs,
    on the same device and dtype. Everything else keeps its weights."""
    from torch import nn

    name = head_name(model)
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, leaf)
    like = {"device": old.weight.device, "dtype": old.weight.dtype}
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None, **like)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding,
                        bias=old.bias is not None, **like)
        # SqueezeNet's final conv starts small so the initial logits are near uniform.
        nn.init.normal_(new.weight, 0.0, 0.01)
        if new.bias is not None:
            nn.init.zeros_(new.bias)
    setattr(parent, leaf, new)
    if hasattr(model, "num_classes"):
        model.num_classes = num_classes
