"""Typed, frozen run configuration: validated once at the edge, plain data everywhere else.

Precedence (highest first): CLI flag > ``--set a.b=c`` > ``--config`` YAML > defaults below.
``configs/base.yaml`` mirrors these defaults; a contract test keeps the two equal.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mltrack.errors import ConfigError

TrainerName = Literal["standard", "mixed_precision", "accelerate", "dp"]
OptimizerName = Literal["sgd", "adam", "adamw"]
SchedulerName = Literal["none", "step", "cosine", "onecycle", "plateau"]
TransformName = Literal["none", "basic", "digits", "imagenet"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class DataConfig(_Frozen):
    dataset_name: str = "digits"
    data_dir: str = "data/digits"  # must contain raw/ and splits/
    fold: int = Field(0, ge=0)
    image_size: int = Field(32, ge=1)  # square side the images are resized to
    transforms: TransformName = "digits"  # TRANSFORMS registry key (train augmentation recipe)
    num_workers: Optional[int] = Field(None, ge=0)  # None: sized to the CPU cores
    max_image_pixels: int = Field(40_000_000, ge=1)  # decompression-bomb limit, read from headers
    sampler: Literal["shuffle", "balanced"] = "shuffle"
    cache: Literal["none", "ram", "gpu", "decode_gpu", "auto"] = "auto"  # decode once (ram/gpu) or each epoch by nvJPEG (decode_gpu); auto: by device, memory
    precrop_size: Optional[int] = Field(None, ge=1)  # cache: square side imagenet train crops come from; None: ceil(image_size*8/7)
    # Batch mixing on the device (mltrack.data.mix), train only: a mixed batch pairs each image with its
    # neighbour in the (shuffled) batch and trains on soft targets. Both alphas 0: off.
    mixup_alpha: float = Field(0.0, ge=0.0)  # Beta(alpha, alpha) of the mixup weight; 0: no mixup
    cutmix_alpha: float = Field(0.0, ge=0.0)  # Beta(alpha, alpha) of the cutmix kept area; 0: no cutmix
    mix_prob: float = Field(1.0, ge=0.0, le=1.0)  # probability that a batch is mixed
    mix_switch_prob: float = Field(0.5, ge=0.0, le=1.0)  # both alphas > 0: probability of cutmix instead of mixup


class ModelConfig(_Frozen):
    architecture: str = "small_cnn"  # a MODELS registry key
    weights: str = "none"  # DEFAULT | <torchvision enum name> | <file.pth> | none
    num_classes: Optional[int] = Field(None, ge=2)  # None: detected from raw/

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, value: str) -> str:
        from mltrack.models import MODELS  # light: the registry holds strings, imports no torch

        if value not in MODELS:
            raise ValueError(_unknown("architecture", value, MODELS))
        return value


class EarlyStoppingConfig(_Frozen):
    patience: Optional[int] = Field(None, ge=1)  # None: never stop early
    min_delta: float = Field(0.0, ge=0.0)


class DPConfig(_Frozen):
    noise_multiplier: float = Field(1.1, gt=0.0)  # used when target_epsilon is None
    max_grad_norm: float = Field(1.0, gt=0.0)  # per-sample clipping bound C
    target_epsilon: Optional[float] = Field(None, gt=0.0)  # set: noise is solved for this budget
    target_delta: float = Field(1e-5, gt=0.0, lt=1.0)  # must be < 1/N (checked when N is known)
    accountant: Literal["prv", "rdp", "gdp"] = "prv"
    grad_sample_mode: Literal["auto", "hooks", "ew", "functorch"] = "auto"  # auto: ew for torchvision models, else hooks
    secure_mode: bool = False


class TrainingConfig(_Frozen):
    trainer_type: TrainerName = "standard"
    num_epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 42
    deterministic: bool = False  # torch.use_deterministic_algorithms + seeded workers
    amp_dtype: Optional[Literal["float16", "bfloat16"]] = None  # mixed_precision/accelerate; None: bfloat16 / no AMP
    channels_last: bool = False
    # fp32 matmuls/convolutions on TensorFloat-32 tensor cores (GPU only). On: ~1.9x faster fp32 training on an
    # H100 for a 10-bit mantissa inside the products; off: IEEE fp32 products, for bit-level comparisons.
    tf32: bool = True
    compile: bool = False  # torch.compile the model (not with dp)
    # torch.compile mode; reduce-overhead replays CUDA graphs (small batches: fewer kernel launches)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_grad_norm: Optional[float] = Field(None, gt=0.0)  # global-norm clipping; None: off
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    class_weights: Union[Literal["none", "auto"], list[float]] = "none"  # loss weights; auto: inverse frequency
    monitor: str = "val/acc"  # metric that picks best.pt and drives early stopping
    monitor_mode: Literal["max", "min"] = "max"
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    max_nonfinite_steps: int = Field(3, ge=1)  # consecutive non-finite losses before failing
    dp: Optional[DPConfig] = None  # dp trainer only

    @model_validator(mode="after")
    def _trainer_specific_keys(self) -> "TrainingConfig":
        if self.dp is not None and self.trainer_type != "dp":
            raise ValueError("training.dp is only valid with training.trainer_type: dp")
        if self.amp_dtype is not None and self.trainer_type not in ("mixed_precision", "accelerate"):
            raise ValueError("training.amp_dtype is only valid with trainer_type mixed_precision or accelerate")
        if self.trainer_type == "dp" and self.compile:
            raise ValueError("training.compile cannot be used with trainer_type dp (Opacus hooks)")
        return self

    @property
    def dp_or_default(self) -> DPConfig:
        return self.dp if self.dp is not None else DPConfig()


class OptimizerConfig(_Frozen):
    name: OptimizerName = "adamw"
    lr: float = Field(3e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    momentum: float = Field(0.9, ge=0.0)  # sgd only
    nesterov: bool = False  # sgd only
    betas: tuple[float, float] = (0.9, 0.999)  # adam/adamw only


class SchedulerConfig(_Frozen):
    name: SchedulerName = "cosine"
    warmup_epochs: int = Field(1, ge=0)  # cosine only: linear warm-up before the decay
    min_lr: float = Field(0.0, ge=0.0)  # cosine floor
    step_size: int = Field(10, ge=1)  # step only
    gamma: float = Field(0.1, gt=0.0)  # step only
    patience: int = Field(5, ge=0)  # plateau only
    factor: float = Field(0.1, gt=0.0, lt=1.0)  # plateau only


class TrackingConfig(_Frozen):
    experiment_name: Optional[str] = None  # None: MLFLOW_EXPERIMENT_NAME, else data.dataset_name
    run_name: Optional[str] = None  # None: auto from dataset, overrides and fold
    runs_dir: str = "runs"  # local mirror of the run's artifacts
    tensorboard: bool = True
    confusion_every_epoch: bool = True
    # model/ (the best weights as an MLflow pyfunc) at the end of a run, as MLflow autolog's log_models and
    # Lightning's MLFlowLogger(log_model=...). Off saves the packaging (~2.7 s a run on 2 cores, much of it
    # MLflow checking the requirements against every installed package) where only the checkpoints matter.
    log_model: bool = True
    progress: Literal["auto", "on", "off"] = "auto"  # rich progress bars; auto: only on a TTY

    @field_validator("progress", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare on/off as a boolean; accept what the user meant.
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class RunConfig(_Frozen):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _cache_with_trainer(self) -> "RunConfig":
        if self.data.cache in ("ram", "gpu", "decode_gpu") and self.training.trainer_type == "dp":
            raise ValueError("data.cache ram/gpu cannot be used with trainer_type dp, nor can decode_gpu (Opacus draws "
                             "Poisson-sampled batches from a DataLoader); use data.cache: none or auto")
        return self

    @model_validator(mode="after")
    def _mixing_with_trainer(self) -> "RunConfig":
        # DP-SGD's guarantee is per example: each loss term, clipped alone, must depend on one example.
        # A mixed image and its soft target carry two, so the accounted epsilon would not hold.
        if (self.data.mixup_alpha > 0 or self.data.cutmix_alpha > 0) and self.training.trainer_type == "dp":
            raise ValueError("data.mixup_alpha / data.cutmix_alpha cannot be used with trainer_type dp (a mixed "
                             "sample depends on two examples, which breaks per-example privacy accounting); "
                             "set both to 0")
        return self


# ---------------------------------------------------------------- loading

# CLI flag -> dotted key. The guide's flags; click passes None for flags not given.
CLI_FLAG_KEYS: dict[str, str] = {
    "data_dir": "data.data_dir",
    "fold": "data.fold",
    "num_workers": "data.num_workers",
    "num_epochs": "training.num_epochs",
    "batch_size": "training.batch_size",
    "device": "training.device",
    "trainer_type": "training.trainer_type",
    "lr": "optimizer.lr",
    "architecture": "model.architecture",
    "run_name": "tracking.run_name",
}


def _unknown(what: str, value: str, valid: Any) -> str:
    names = sorted(valid)
    close = difflib.get_close_matches(value, names, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    shown = ", ".join(names) if len(names) <= 30 else ", ".join(names[:30]) + f", … ({len(names)} in all)"
    return f"unknown {what} '{value}'.{hint} Valid: {shown}"


def parse_override(item: str) -> tuple[str, Any]:
    """Parse ``a.b=c`` with the value read as a YAML scalar (``1e-3`` -> float, ``none`` -> str)."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got '{item}' (example: --set optimizer.lr=0.01)")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: value '{raw}' is not valid YAML ({err})") from None
    return key, value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``tree['a']['b'] = value`` for ``key='a.b'``, creating dicts on the way."""
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config YAML file into a dict; a missing or malformed file is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p} (pass --config with an existing YAML file, e.g. configs/digits.yaml)")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {p} is not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections (data:, model:, training: …)")
    return tree


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    cli: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
) -> RunConfig:
    """Build a RunConfig: defaults < YAML at ``path`` (or ``base``) < ``--set`` overrides < CLI flags.

    ``cli`` maps flag names of ``CLI_FLAG_KEYS`` to values; None means "not given".
    Raises ConfigError naming the dotted key for unknown keys and invalid values.
    """
    # A deep copy: the caller's base (e.g. a checkpoint's config) must not be edited in place.
    tree: dict[str, Any] = copy.deepcopy(dict(base or {}))
    if path:
        tree = read_yaml(path)
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(tree, key, value)
    for flag, value in (cli or {}).items():
        if value is not None and flag in CLI_FLAG_KEYS:
            set_dotted(tree, CLI_FLAG_KEYS[flag], value)
    return validate(tree)


def validate(tree: dict[str, Any]) -> RunConfig:
    """Validate a nested dict into a RunConfig with messages that name the dotted key."""
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation(err)) from None


def _format_validation(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            parent, _, leaf = loc.rpartition(".")
            valid = _fields_at(parent)
            close = difflib.get_close_matches(leaf, valid, n=1)
            hint = f" Did you mean '{(parent + '.' if parent else '') + close[0]}'?" if close else ""
            lines.append(f"unknown config key '{loc}'.{hint}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"invalid config value for '{loc}': {msg}" if loc else f"invalid config: {msg}")
    return "config error: " + "; ".join(lines)


def _fields_at(dotted: str) -> list[str]:
    model: Any = RunConfig
    for part in [p for p in dotted.split(".") if p]:
        field = model.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        sub = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not sub:
            return []
        model = sub[0]
    return list(model.model_fields)


# ---------------------------------------------------------------- views


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as plain YAML-safe data (tuples become lists)."""
    return json.loads(cfg.model_dump_json())


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(cfg: RunConfig | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys -> leaf values (``training.batch_size``), the form logged as MLflow params."""
    tree = to_dict(cfg) if isinstance(cfg, RunConfig) else cfg
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def config_hash(cfg: RunConfig) -> str:
    """sha256 of the canonical JSON of the config (stored in checkpoints)."""
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()


def replace(cfg: RunConfig, **dotted: Any) -> RunConfig:
    """A copy of ``cfg`` with dotted keys changed (``replace(cfg, **{"model.num_classes": 3})``)."""
    tree = to_dict(cfg)
    for key, value in dotted.items():
        set_dotted(tree, key, value)
    return validate(tree)
