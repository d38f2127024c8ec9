"""MLproject <-> CLI, and the packaging pins: every MLproject parameter reaches the command it feeds.

Commands are rendered by MLflow's own project-spec code (the code ``mlflow run`` uses), then run
through the real click group with ``--print-config``.
"""
from __future__ import annotations

import re
import shlex
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mltrack.cli import cli
from mltrack.cli.args import normalize_args, option_arity
from mltrack.config import load_config, to_dict

ROOT = Path(__file__).resolve().parents[2]
MAIN_PARAMS = {"config", "data_dir", "fold", "num_epochs", "batch_size", "lr", "trainer_type", "overrides", "resume"}


@pytest.fixture(scope="module")
def project():
    from mlflow.projects._project_spec import load_project

    return load_project(str(ROOT))


def render(project, entry: str, params: dict[str, str]) -> list[str]:
    """The argv ``mlflow run`` would execute for ``entry``, after the shell splits it."""
    command = project.get_entry_point(entry).compute_command(params, storage_dir=None)
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "mltrack"], command
    return argv[3:]


def print_config(argv: list[str]) -> tuple[list[str], dict]:
    result = CliRunner().invoke(cli, [*argv, "--print-config"])
    assert result.exit_code == 0, result.stderr
    comments = [line for line in result.stdout.splitlines() if line.startswith("#")]
    return comments, yaml.safe_load(result.stdout)


def test_main_declares_the_documented_parameters_all_strings(project) -> None:
    params = project.get_entry_point("main").parameters
    assert set(params) == MAIN_PARAMS
    assert all(p.type == "string" for p in params.values())
    assert {name: p.default for name, p in params.items() if p.default != ""} == {"config": "configs/digits.yaml"}
    placeholders = set(re.findall(r"\{(\w+)\}", project.get_entry_point("main").command))
    assert placeholders == MAIN_PARAMS
    assert project.env_type == "conda_env" and Path(project.env_config_path).name == "conda.yaml"


def test_every_main_parameter_reaches_the_cli(project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    conf = tmp_path / "run.yaml"
    conf.write_text(yaml.safe_dump({"data": {"dataset_name": "mine"}, "training": {"seed": 1}}))
    sample = {
        "config": str(conf),
        "data_dir": "data/my data",  # a space survives MLflow's quoting
        "fold": "2",
        "num_epochs": "3",
        "batch_size": "16",
        "lr": "0.01",
        "trainer_type": "mixed_precision",
        "overrides": "training.seed=7 optimizer.weight_decay=0.05",
        "resume": "runs:/0123abcd/weights/last.pt",
    }
    comments, cfg = print_config(render(project, "main", sample))
    assert cfg["data"]["dataset_name"] == "mine"  # from the config file
    assert (cfg["data"]["data_dir"], cfg["data"]["fold"]) == ("data/my data", 2)
    training = cfg["training"]
    assert (training["num_epochs"], training["batch_size"], training["trainer_type"]) == (3, 16, "mixed_precision")
    assert (cfg["optimizer"]["lr"], cfg["optimizer"]["weight_decay"], training["seed"]) == (0.01, 0.05, 7)
    assert comments == [f"# config: {conf}", "# resume: runs:/0123abcd/weights/last.pt"]


def test_defaults_fall_back_to_the_config(project, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    comments, cfg = print_config(render(project, "main", {}))
    assert comments == ["# config: configs/digits.yaml"]
    assert cfg == to_dict(load_config(ROOT / "configs" / "digits.yaml"))


def test_undeclared_parameters_are_forwarded_with_underscores(project, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    _, cfg = print_config(render(project, "main", {"num_workers": "2", "run_name": "x_1", "device": "cpu"}))
    assert (cfg["data"]["num_workers"], cfg["tracking"]["run_name"], cfg["training"]["device"]) == (2, "x_1", "cpu")


def test_split_parameters_reach_the_split_command(project) -> None:
    argv = render(project, "split", {"raw_data": "data/other/raw", "folds": "3"})
    assert argv[0] == "split"
    command = cli.get_command(None, "split")  # type: ignore[arg-type]
    ctx = command.make_context("split", normalize_args(argv[1:], option_arity(command)))
    assert (str(ctx.params["raw_data"]), ctx.params["folds"]) == ("data/other/raw", 3)
    defaults = render(project, "split", {})
    assert defaults == ["split", "--raw-data", "data/digits/raw", "--folds", "5"]


# ------------------------------------------------------------------ packaging pins


def _pins(requirements: list[str]) -> dict[str, str]:
    pins = {}
    for req in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([\w.]+)", req.strip())
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_conda_pins_equal_pyproject_pins(pyproject: dict) -> None:
    project = pyproject["project"]
    extras = project["optional-dependencies"]
    expected = _pins(project["dependencies"] + extras["dp"] + extras["dist"])
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip_lists = [d["pip"] for d in conda["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_lists) == 1
    assert _pins(pip_lists[0]) == expected and len(pip_lists[0]) == len(expected)
    assert "python=3.11" in conda["dependencies"]


def test_pyproject_pins_are_exact_and_installed(pyproject: dict) -> None:
    project = pyproject["project"]
    extras = project["optional-dependencies"]
    pinned = project["dependencies"] + extras["dp"] + extras["dist"]
    assert len(_pins(pinned)) == len(pinned), "every dependency is pinned with =="
    for name, pin in _pins(pinned).items():
        assert version(name) == pin, f"{name}: pyproject pins {pin}, the environment has {version(name)}"
    assert project["name"] == "mltrack-platform" and project["requires-python"] == ">=3.11"
    assert project["scripts"] == {
        "mltrack": "mltrack.cli:main",
        "ml-split": "mltrack.cli:split_main",
        "ml-train": "mltrack.cli:train_main",
        "ml-search": "mltrack.cli:search_main",
    }
