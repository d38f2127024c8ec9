"""Model registry, builders and classifier-head helpers.

``MODELS`` maps ``model.architecture`` to a lazy ``"module:attr"`` reference. Importing this module must
stay light because config validation imports ``MODELS``: torch and torchvision are imported inside
functions only, and ``SmallCNN`` (a ``torch.nn.Module``) is defined on first attribute access (PEP 562).

The pretrained-weights policy (``model.weights``: none, a torchvision weights name, a .pth/.pt file) lives
in :mod:`mltrack.weights`, which reads this registry; its public names (``preflight_weights``,
``resolve_weights``, ``cached_weights_path``) stay importable from here, served lazily by ``__getattr__``
so that importing this module does not import that one (nor, through it, anything heavier).
"""
from __future__ import annotations

import difflib
import importlib
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mltrack.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mltrack.config import ModelConfig
    from mltrack.weights import cached_weights_path, preflight_weights, resolve_weights  # noqa: F401 (re-exports)

# torchvision 0.29.1 classification builders (list_models(module=torchvision.models)), written out so
# that reading the registry imports nothing; a unit test keeps the two sets equal.
TORCHVISION_NAMES: tuple[str, ...] = tuple(
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
MODELS.update({name: f"torchvision.models:{name}" for name in TORCHVISION_NAMES})

# Auxiliary classifiers are dropped: the one training loop expects a single logits tensor, and aux heads
# only help from-scratch ImageNet-scale training. Values: the attributes holding them.
AUX_HEADS: dict[str, tuple[str, ...]] = {"googlenet": ("aux1", "aux2"), "inception_v3": ("AuxLogits",)}
# Names of mltrack.weights that callers import from here (kept when the weights policy moved there).
_WEIGHTS_REEXPORTS = frozenset({"cached_weights_path", "preflight_weights", "resolve_weights"})


def resolve_ref(ref: str) -> Any:
    """The object a registry reference ``"module:attr"`` names (imports ``module``)."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


# ---------------------------------------------------------------- lazy attributes: SmallCNN, weights re-exports

_small_cnn_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    # PEP 562: defining the nn.Module subclass needs torch, which module import must not pull in.
    if name == "SmallCNN":
        with _small_cnn_lock:
            if "SmallCNN" not in globals():
                globals()["SmallCNN"] = _define_small_cnn()
        return globals()["SmallCNN"]
    if name in _WEIGHTS_REEXPORTS:
        # mltrack.weights imports this module at load time, so this one imports it only on demand.
        return getattr(importlib.import_module("mltrack.weights"), name)
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
    """Build ``cfg.architecture`` with ``num_classes`` logits, weights per ``cfg.weights`` (see mltrack.weights).

    ``num_classes`` is authoritative (``cfg.num_classes`` is checked against the data by the caller).
    ``image_size`` (px, square) matters only for fixed-size models (vit_*, maxvit_t); None: their default.
    The model is on CPU in train mode. Raises ConfigError (unknown name, unsupported size) or UserError
    (weights not cached, unknown enum name, weights file missing or not fitting).
    """
    from mltrack import weights  # not at module level: weights imports this module (see the module docstring)

    registry_entry(cfg.architecture)
    kind = weights.weights_kind(cfg.weights)
    if kind == "enum":
        model = weights.build_pretrained(cfg.architecture, cfg.weights, image_size)
        if output_classes(model) != num_classes:
            replace_head(model, num_classes)
    else:
        model = _build_fresh(cfg.architecture, num_classes, image_size)
        if kind == "file":
            weights.load_weights_file(model, cfg.architecture, Path(cfg.weights))
    return model.train()


def registry_entry(architecture: str) -> str:
    """The ``"module:attr"`` reference of ``architecture``; ConfigError naming the nearest valid one if unknown."""
    if architecture not in MODELS:
        close = difflib.get_close_matches(architecture, MODELS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown model.architecture '{architecture}'.{hint} Valid: {', '.join(sorted(MODELS))}")
    return MODELS[architecture]


def size_kwargs(architecture: str, image_size: int | None) -> dict[str, Any]:
    """Constructor arguments fixing the input size (px, square) of fixed-size models; {} for all others."""
    if image_size is None:
        return {}
    if architecture.startswith("vit_"):
        return {"image_size": image_size}
    if architecture == "maxvit_t":
        return {"input_size": (image_size, image_size)}
    return {}


def _build_fresh(architecture: str, num_classes: int, image_size: int | None) -> nn.Module:
    kwargs: dict[str, Any] = {"num_classes": num_classes, **size_kwargs(architecture, image_size)}
    if architecture in AUX_HEADS:
        kwargs.update(aux_logits=False, init_weights=True)
    try:
        return resolve_ref(MODELS[architecture])(**kwargs)
    except (AssertionError, ValueError) as err:
        # ViT asserts image_size % patch == 0; MaxViT needs sizes divisible by 7 at every stage (224k px).
        raise ConfigError(
            f"model.architecture '{architecture}' cannot be built for data.image_size {image_size}: {err}"
        ) from None


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
