"""MODELS registry, build_model, the weights policy and head helpers, on real torchvision models."""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torchvision

from mltrack.config import ModelConfig
from mltrack.errors import CheckpointError, ConfigError, UserError
from mltrack.models import (
    MODELS,
    build_model,
    cached_weights_path,
    output_classes,
    preflight_weights,
    replace_head,
    resolve_weights,
)

REPO = Path(__file__).resolve().parents[2]

# Smallest square input (px) each family accepts, so 80+ models fit the time budget; the default is 8.
_MIN_SIZE = {"alexnet": 64, "convnext": 32, "densenet": 32, "googlenet": 16, "inception": 75,
             "maxvit": 224, "squeezenet": 32, "vgg": 32, "vit_b_16": 16, "vit_l_16": 16,
             "vit_b_32": 32, "vit_l_32": 32, "vit_h_14": 14}
# Models above ~100 M parameters (vgg*, vit_l/h, regnet_y_128gf, convnext_large ...) would cost seconds
# and gigabytes each on a 2-core CPU: they are built with parameters on the meta device and only the
# logits shape is checked; their layer kinds are exercised on CPU by smaller members of their families.
# The set is written out (not measured) to avoid a second build per model; the test checks the counts.
_CPU_PARAM_LIMIT = 100_000_000
_META_ONLY = {"convnext_large", "efficientnet_v2_l", "regnet_x_32gf", "regnet_y_32gf", "regnet_y_128gf",
              "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
              "vit_h_14", "vit_l_16", "vit_l_32", "wide_resnet101_2"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # These tiny forward/backward passes gain nothing from intra-op threads, and on a shared 2-core
    # machine OpenMP threads spin-waiting on each other made this file several times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _input_size(name: str) -> int:
    return next((size for prefix, size in _MIN_SIZE.items() if name.startswith(prefix)), 8)


@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """Register every parameter and buffer on the meta device while building. Not ``torch.device('meta')``
    as a context: RegNet's constructor computes its widths with tensors and calls ``.tolist()``."""
    reg_param, reg_buffer = torch.nn.Module.register_parameter, torch.nn.Module.register_buffer

    def param(self: torch.nn.Module, name: str, p: torch.nn.Parameter | None) -> None:
        reg_param(self, name, None if p is None else torch.nn.Parameter(p.to("meta"), p.requires_grad))

    def buffer(self: torch.nn.Module, name: str, b: torch.Tensor | None, persistent: bool = True) -> None:
        reg_buffer(self, name, None if b is None else b.to("meta"), persistent)

    torch.nn.Module.register_parameter, torch.nn.Module.register_buffer = param, buffer  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter, torch.nn.Module.register_buffer = reg_param, reg_buffer  # type: ignore[method-assign]


def test_registry_is_every_torchvision_classifier_plus_small_cnn() -> None:
    expected = set(torchvision.models.list_models(module=torchvision.models)) | {"small_cnn"}
    assert set(MODELS) == expected
    for name, ref in MODELS.items():
        module, _, attr = ref.partition(":")
        assert callable(getattr(__import__(module, fromlist=[attr]), attr)), name


def test_importing_registry_and_config_imports_no_torch() -> None:
    code = ("import sys, mltrack.models; from mltrack.config import load_config; load_config(); "
            "bad = [m for m in ('torch', 'torchvision') if m in sys.modules]; assert not bad, bad")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_gives_logits_and_gradients(name: str) -> None:
    size = _input_size(name)
    cfg = ModelConfig(architecture=name)
    fixed = name.startswith("vit_") or name == "maxvit_t"
    if name in _META_ONLY:
        with _params_on_meta():
            probe = build_model(cfg, 5, image_size=size if fixed else None)
        assert sum(p.numel() for p in probe.parameters()) > _CPU_PARAM_LIMIT
        assert output_classes(probe) == 5
        replace_head(probe, 3)
        assert probe(torch.zeros(2, 3, size, size, device="meta")).shape == (2, 3)
        return
    torch.manual_seed(0)
    model = build_model(cfg, 5, image_size=size if fixed else None)
    assert model.training and output_classes(model) == 5
    assert sum(p.numel() for p in model.parameters()) <= _CPU_PARAM_LIMIT, "move it to _META_ONLY"
    replace_head(model, 3)  # the generic head swap, on every architecture
    assert output_classes(model) == 3
    logits = model(torch.randn(2, 3, size, size))
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 3)
    assert torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"{name}: parameters without gradient: {no_grad[:5]}"


def test_small_cnn_is_picklable_by_reference_and_sized_for_small_inputs() -> None:
    import pickle

    from mltrack.models import SmallCNN

    net = SmallCNN(num_classes=10, in_channels=1, width=8)
    again = pickle.loads(pickle.dumps(net))
    assert type(again) is SmallCNN and SmallCNN.__module__ == "mltrack.models"
    assert net(torch.zeros(4, 1, 4, 4)).shape == (4, 10)
    assert net(torch.zeros(4, 1, 64, 64)).shape == (4, 10)


def _save_state(path: Path, state: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def test_pth_file_with_1000_class_head_loads_and_head_is_replaced(tmp_path: Path) -> None:
    source = torchvision.models.resnet18(num_classes=1000)
    file = _save_state(tmp_path / "rn18.pth", source.state_dict())
    model = build_model(ModelConfig(architecture="resnet18", weights=str(file)), 3)
    assert output_classes(model) == 3
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    # An mltrack/DDP-style checkpoint: state dict under "model" with "module." prefixes.
    wrapped = {"model": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}
    file2 = _save_state(tmp_path / "ckpt.pt", wrapped)
    model2 = build_model(ModelConfig(architecture="resnet18", weights=str(file2)), 1000)
    assert torch.equal(model2.fc.weight, source.fc.weight)


def test_pth_file_of_another_body_is_a_user_error(tmp_path: Path) -> None:
    from mltrack.models import SmallCNN

    narrow = _save_state(tmp_path / "narrow.pth", SmallCNN(num_classes=10, width=16).state_dict())
    with pytest.raises(UserError, match=r"does not fit model.architecture 'small_cnn'.*features\.0\.0\.weight: file \(16, 3, 3, 3\)"):
        build_model(ModelConfig(architecture="small_cnn", weights=str(narrow)), 10)
    other = _save_state(tmp_path / "r34.pth", torchvision.models.resnet34(num_classes=3).state_dict())
    with pytest.raises(UserError, match=r"unexpected keys \(layer1\.2\."):
        build_model(ModelConfig(architecture="resnet18", weights=str(other)), 3)


def test_unsafe_pickle_weights_file_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    file = _save_state(tmp_path / "evil.pth", {"fc.weight": torch.zeros(3, 8), "x": Evil()})
    with pytest.raises(CheckpointError, match="cannot be loaded as plain tensors"):
        build_model(ModelConfig(architecture="small_cnn", weights=str(file)), 3)
    assert not marker.exists()


def test_preflight_names_the_cache_path_then_passes_and_builds_from_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cfg = ModelConfig(architecture="resnet18", weights="DEFAULT")
    expected = tmp_path / "torch_home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert cached_weights_path(resolve_weights("resnet18", "DEFAULT")) == expected
    with pytest.raises(UserError) as err:
        preflight_weights(cfg)
    assert str(err.value) == (
        f"pretrained weights 'resnet18.IMAGENET1K_V1' are not in the cache {expected} and this machine is "
        f"offline; copy the file there, use model.weights: <file.pth>, or model.weights: none"
    )
    with pytest.raises(UserError, match="not in the cache"):
        build_model(cfg, 3)
    source = torchvision.models.resnet18(num_classes=1000)
    _save_state(expected, source.state_dict())
    preflight_weights(cfg)
    model = build_model(cfg, 3)
    assert output_classes(model) == 3
    assert torch.equal(model.layer3[0].conv1.weight, source.layer3[0].conv1.weight)


def test_pretrained_googlenet_loads_aux_weights_then_drops_aux_heads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    member = resolve_weights("googlenet", "IMAGENET1K_V1")
    source = torchvision.models.GoogLeNet(num_classes=1000, aux_logits=True, transform_input=True, init_weights=False)
    _save_state(cached_weights_path(member), source.state_dict())
    model = build_model(ModelConfig(architecture="googlenet", weights="imagenet1k_v1"), 4)
    assert model.aux1 is None and model.aux2 is None and model.transform_input
    assert torch.equal(model.inception5b.branch1.conv.weight, source.inception5b.branch1.conv.weight)
    out = model(torch.randn(2, 3, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 4)


def test_legacy_densenet_key_names_are_mapped(tmp_path: Path) -> None:
    source = torchvision.models.densenet121(num_classes=10)
    legacy = {}
    for key, value in source.state_dict().items():
        for new, old in (("norm1", "norm.1"), ("norm2", "norm.2"), ("conv1", "conv.1"), ("conv2", "conv.2")):
            if ".denselayer" in key:
                key = key.replace(f".{new}.", f".{old}.")
        legacy[key] = value
    assert any("norm.1" in k for k in legacy)
    file = _save_state(tmp_path / "dn.pth", legacy)
    model = build_model(ModelConfig(architecture="densenet121", weights=str(file)), 10)
    assert torch.equal(model.features.denseblock1.denselayer1.norm1.weight,
                       source.features.denseblock1.denselayer1.norm1.weight)


def test_weights_names_and_files_are_checked_with_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match=r"unknown model.weights 'IMAGENET' for resnet50\. Valid: IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT"):
        preflight_weights(ModelConfig(architecture="resnet50", weights="IMAGENET"))
    with pytest.raises(UserError, match="'small_cnn' has no pretrained torchvision weights"):
        preflight_weights(ModelConfig(architecture="small_cnn", weights="DEFAULT"))
    missing = tmp_path / "nope.pth"
    with pytest.raises(UserError, match=re.escape(f"model.weights file not found: {missing.resolve()}")):
        preflight_weights(ModelConfig(architecture="resnet18", weights=str(missing)))
    preflight_weights(ModelConfig(architecture="resnet18", weights="none"))
    # A fixed-size model with pretrained weights must be fed its native size.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    _save_state(cached_weights_path(resolve_weights("vit_b_16", "DEFAULT")), {})
    with pytest.raises(ConfigError, match="trained at 224 px but data.image_size is 32"):
        build_model(ModelConfig(architecture="vit_b_16", weights="DEFAULT"), 3, image_size=32)


def test_unknown_architecture_and_unbuildable_sizes_are_config_errors() -> None:
    bogus = ModelConfig.model_construct(architecture="resnet19", weights="none", num_classes=None)
    with pytest.raises(ConfigError, match=r"unknown model.architecture 'resnet19'. Did you mean 'resnet18'\?.*small_cnn"):
        build_model(bogus, 3)
    with pytest.raises(ConfigError, match="'vit_b_32' cannot be built for data.image_size 40"):
        build_model(ModelConfig(architecture="vit_b_32"), 3, image_size=40)


def test_squeezenet_conv_head_is_found_and_replaced() -> None:
    model = build_model(ModelConfig(architecture="squeezenet1_1"), 7)
    assert output_classes(model) == 7 and isinstance(model.classifier[1], torch.nn.Conv2d)
    replace_head(model, 2)
    assert model.classifier[1].out_channels == 2 and model.num_classes == 2
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 2)
