"""Search spaces, search CLI values, storage URLs and the ask lock (mltrack.search_space: no optuna)."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest
import yaml

from mltrack.config import RunConfig, load_config
from mltrack.errors import ConfigError
from mltrack.search_space import (AskLock, ParamSpec, SearchOptions, apply_params, ask_lock_path, check_workers,
                                  default_study_name, grid, grid_size, load_space, options_from_json,
                                  options_to_json, parse_folds, parse_space, redact_storage, storage_kind)

ROOT = Path(__file__).resolve().parents[2]
BASE = RunConfig()


def test_parse_space_reads_each_distribution_type() -> None:
    space = parse_space({
        "optimizer.lr": {"type": "float", "low": 1e-4, "high": 0.1, "log": True},
        "scheduler.warmup_epochs": {"type": "int", "low": 0, "high": 4, "step": 2},
        "training.label_smoothing": {"type": "float", "low": 0, "high": 0.2, "step": 0.05},
        "optimizer.name": {"type": "categorical", "choices": ["adamw", "sgd"]},
    }, BASE)
    assert space["optimizer.lr"] == ParamSpec("optimizer.lr", "float", 1e-4, 0.1, log=True)
    assert space["scheduler.warmup_epochs"].grid_values() == [0, 2, 4]
    assert space["training.label_smoothing"].grid_values() == [0.0, 0.05, 0.1, 0.15, 0.2]
    assert isinstance(space["training.label_smoothing"].low, float)  # int 0 in YAML, float range
    assert space["optimizer.name"].choices == ("adamw", "sgd")
    assert grid_size({k: v for k, v in space.items() if k != "optimizer.lr"}) == 3 * 5 * 2


@pytest.mark.parametrize("tree, words", [
    ({"optimizer.lrr": {"type": "float", "low": 0.1, "high": 0.2}}, ["optimizer.lrr", "Did you mean 'optimizer.lr'"]),
    ({"optimizer.name": {"type": "categorical", "choices": ["adamw", "adamx"]}}, ["optimizer.name='adamx'"]),
    ({"optimizer.lr": {"type": "float", "low": -1.0, "high": 0.1}}, ["optimizer.lr=-1.0", "greater than 0"]),
    ({"optimizer.lr": {"type": "float", "low": 0.1, "high": 0.1}}, ["low (0.1) must be smaller than high"]),
    ({"optimizer.lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}, ["log: true needs low > 0"]),
    ({"optimizer.lr": {"type": "float", "low": 0.1, "high": 0.2, "log": True, "step": 0.01}}, ["step and log"]),
    ({"optimizer.lr": {"type": "float", "low": 0.1, "high": 0.2, "scale": "log"}}, ["unknown field(s) scale"]),
    ({"optimizer.lr": {"type": "uniform", "low": 0.1, "high": 0.2}}, ["float, int or categorical"]),
    ({"training.batch_size": {"type": "int", "low": 8.5, "high": 64}}, ["'low' must be an integer"]),
    ({"optimizer.name": {"type": "categorical", "choices": []}}, ["non-empty list"]),
    ({"optimizer.name": {"type": "categorical", "choices": ["sgd", "sgd"]}}, ["duplicates"]),
    ({"data.fold": {"type": "int", "low": 0, "high": 2}}, ["cannot be searched", "--folds"]),
    ({"tracking.run_name": {"type": "categorical", "choices": ["a"]}}, ["cannot be searched"]),
    ({"optimizer.lr": 0.01}, ["must be a mapping"]),
    ([1, 2], ["expected a mapping"]),
])
def test_bad_spaces_fail_naming_the_key(tree: object, words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        parse_space(tree, BASE, "space.yaml")
    assert str(err.value).startswith("space.yaml")
    for word in words:
        assert word in str(err.value)


def test_trainer_specific_keys_are_checked_against_the_base_config() -> None:
    # training.dp.* exists only for the dp trainer: the same space is wrong for one base and right for the other.
    tree = {"training.dp.noise_multiplier": {"type": "float", "low": 0.5, "high": 2.0}}
    with pytest.raises(ConfigError, match="training.dp.noise_multiplier"):
        parse_space(tree, BASE)
    dp = apply_params(BASE, {"training.trainer_type": "dp"})
    assert parse_space(tree, dp)["training.dp.noise_multiplier"].high == 2.0


def test_load_space_reports_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="search space file not found"):
        load_space(tmp_path / "nope.yaml", BASE)
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimizer.lr: {type: float, low: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_space(bad, BASE)


def test_shipped_digits_space_fits_the_digits_config() -> None:
    cfg = load_config(ROOT / "configs" / "digits.yaml")
    space = load_space(ROOT / "configs" / "search" / "digits.yaml", cfg)
    assert "optimizer.lr" in space and space["optimizer.lr"].log
    for spec in space.values():  # every boundary value makes a valid run config
        for value in spec.boundary_values():
            assert apply_params(cfg, {spec.key: value}) is not None


def test_grid_needs_a_step_for_float_ranges() -> None:
    space = parse_space({"optimizer.lr": {"type": "float", "low": 0.01, "high": 0.1}}, BASE)
    with pytest.raises(ConfigError, match="grid sampler needs a finite set"):
        grid(space)


def test_apply_params_uses_dotted_keys() -> None:
    cfg = apply_params(BASE, {"optimizer.lr": 0.5, "training.batch_size": 16})
    assert (cfg.optimizer.lr, cfg.training.batch_size) == (0.5, 16)
    assert apply_params(BASE, {}) is BASE


@pytest.mark.parametrize("text, expected", [(None, (3,)), ("", (3,)), ("0,1", (0, 1)), (" 2 , 0 ", (2, 0))])
def test_parse_folds(text: str | None, expected: tuple[int, ...]) -> None:
    assert parse_folds(text, 3) == expected


@pytest.mark.parametrize("text", ["a", "0,0", "-1", "1;2"])
def test_parse_folds_rejects_bad_lists(text: str) -> None:
    with pytest.raises(ConfigError, match="--folds"):
        parse_folds(text, 0)


def test_default_study_name_is_stable_for_the_same_command() -> None:
    cfg = apply_params(BASE, {"data.dataset_name": "my data"})
    assert default_study_name(cfg, "configs/search/lr only.yaml") == "my_data-lr_only"


@pytest.mark.parametrize("url, kind", [("sqlite:///optuna.db", "sqlite"), ("sqlite:////abs/o.db", "sqlite"),
                                       ("postgresql://u:p@h:5432/db", "rdb"), ("mysql+pymysql://h/db", "rdb"),
                                       ("journal:./optuna.journal", "journal")])
def test_storage_kind(url: str, kind: str) -> None:
    assert storage_kind(url) == kind


@pytest.mark.parametrize("url", ["optuna.db", "journal:", "journal:  "])
def test_storage_kind_rejects_what_is_not_a_storage(url: str) -> None:
    with pytest.raises(ConfigError, match="journal"):
        storage_kind(url)


def test_redact_storage_strips_credentials() -> None:
    assert redact_storage("postgresql://alice:pw@db.example:5432/optuna") == "postgresql://db.example:5432/optuna"
    assert redact_storage("postgresql://alice@db/optuna?password=pw") == "postgresql://db/optuna"
    assert redact_storage("sqlite:///optuna.db") == "sqlite:///optuna.db"
    assert redact_storage("journal:./a.journal") == "journal:./a.journal"


def test_sqlite_is_refused_for_several_workers_only() -> None:
    with pytest.raises(ConfigError) as err:
        check_workers("sqlite:///optuna.db", 2)
    assert "journal:./optuna.journal" in str(err.value) and "postgresql://" in str(err.value)
    check_workers("sqlite:///optuna.db", 1)
    check_workers("journal:./optuna.journal", 4)
    check_workers("postgresql://h/db", 8)


def test_worker_spec_round_trips_without_the_storage() -> None:
    space = parse_space({"optimizer.lr": {"type": "float", "low": 1e-4, "high": 0.1, "log": True},
                         "optimizer.name": {"type": "categorical", "choices": ["adamw", "sgd"]}}, BASE)
    opts = SearchOptions(space=space, space_path="s.yaml", study_name="s", storage="postgresql://u:secret@h/db",
                         folds=(0, 2), workers=3, sampler="grid", pruner="none", metric="val/loss",
                         direction="minimize")
    data = options_to_json(opts)
    assert "secret" not in yaml.safe_dump(data)
    assert options_from_json(data, opts.storage) == opts


def test_ask_lock_excludes_other_holders(tmp_path: Path) -> None:
    path = ask_lock_path("journal:./a.journal", "study", tmp_path)
    assert path != ask_lock_path("journal:./a.journal", "other", tmp_path)
    lock = AskLock(path)
    with lock:
        fd = os.open(path, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):  # another open file description: what another process has
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            lock.release()
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free as soon as it is released
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    lock.release()  # idempotent
