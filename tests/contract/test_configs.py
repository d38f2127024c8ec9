"""Shipped configs: each validates, base.yaml equals the model defaults and documents every key."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from mltrack.config import DPConfig, RunConfig, flatten, load_config, read_yaml, to_dict, validate

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))  # configs/search/ holds search spaces, another schema
KEY_LINE = re.compile(r"^(?P<indent> *)(?P<commented>#\s+)?(?P<key>[A-Za-z_]\w*):(?P<rest>.*)$")
# Keys that cannot be written with their default under trainer_type standard (the models reject them
# there), so base.yaml documents them as commented-out lines.
COMMENTED_KEYS = {f"training.dp.{k}" for k in DPConfig.model_fields}


def documented_keys(text: str) -> dict[str, tuple[bool, bool]]:
    """Dotted key -> (commented out, has its own comment) for every ``key:`` line of a YAML file.

    Nesting comes from indentation. In a commented line the ``# `` marker stands where the key would
    be, and spaces beyond the one after ``#`` indent further: ``  # amp_dtype:`` is a sibling of
    ``  seed:``, ``  #   noise_multiplier:`` a child of the ``  dp:`` line above it.
    """
    keys: dict[str, tuple[bool, bool]] = {}
    stack: list[tuple[int, str]] = []
    for line in text.splitlines():
        match = KEY_LINE.match(line)
        if match is None:
            continue
        commented = match["commented"] is not None
        depth = len(match["indent"]) + (len(match["commented"]) - 2 if commented else 0)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        dotted = ".".join([name for _, name in stack] + [match["key"]])
        keys[dotted] = (commented, "#" in match["rest"])
        stack.append((depth, match["key"]))  # popped by the next line at the same or a lower depth
    return keys


def test_shipped_configs_exist() -> None:
    assert {p.name for p in CONFIGS} >= {"base.yaml", "digits.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_validates(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    # A complete run config: every section is written out, not left to the defaults.
    assert set(read_yaml(path)) == set(RunConfig.model_fields)


def test_base_yaml_equals_defaults() -> None:
    cfg = validate(read_yaml(ROOT / "configs" / "base.yaml"))
    assert cfg == RunConfig()
    assert to_dict(cfg) == to_dict(RunConfig())


def test_base_yaml_documents_every_key_once_with_a_comment() -> None:
    documented = documented_keys((ROOT / "configs" / "base.yaml").read_text())
    leaves = set(flatten(RunConfig())) | COMMENTED_KEYS
    sections = {".".join(k.split(".")[:i]) for k in leaves for i in range(1, k.count(".") + 1)}
    assert set(documented) == leaves | sections
    for key in leaves:
        commented, has_comment = documented[key]
        assert commented == (key in COMMENTED_KEYS), key
        assert has_comment, f"{key} has no comment in base.yaml"


def test_commented_keys_hold_the_defaults() -> None:
    text = (ROOT / "configs" / "base.yaml").read_text()
    values = {}
    for line in text.splitlines():
        match = KEY_LINE.match(line)
        if match and match["commented"]:
            values[match["key"]] = yaml.safe_load(match["rest"].split("#")[0])
    expected = DPConfig().model_dump()
    assert values == expected


def test_digits_config_is_the_digits_demo() -> None:
    cfg = load_config(ROOT / "configs" / "digits.yaml")
    assert (cfg.data.dataset_name, cfg.data.data_dir, cfg.data.image_size, cfg.data.transforms) == (
        "digits", "data/digits", 32, "digits",
    )
    assert (cfg.model.architecture, cfg.training.num_epochs, cfg.training.batch_size) == ("small_cnn", 30, 64)
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.scheduler.name, cfg.scheduler.warmup_epochs) == (
        "adamw", 3e-3, "cosine", 1,
    )


def test_documented_keys_parser_sees_nesting() -> None:
    text = "a:  # s\n  b: 1  # c\n  # d: 2  # e\n  f: null\n  #   g: x\nh: 3\n"
    assert documented_keys(text) == {
        "a": (False, True), "a.b": (False, True), "a.d": (True, True), "a.f": (False, False),
        "a.f.g": (True, False), "h": (False, False),
    }
