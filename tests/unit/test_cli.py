"""The CLI: argument normalisation, config precedence, errors and exit codes, aliases, console logging."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from mltrack import console
from mltrack.cli import cli, train_main
from mltrack.cli.args import normalize_args, option_arity
from mltrack.cli.main import COMMANDS, MltrackGroup
from mltrack.config import CLI_FLAG_KEYS
from mltrack.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
# The subprocesses import mltrack from this checkout whatever their cwd (PYTHONPATH=. is relative).
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \| (?P<level>[A-Z]+) *\| (?P<msg>.*)$")


def run_cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def printed_config(*args: str) -> dict:
    code, out, err = run_cli("train", *args, "--print-config")
    assert code == 0, err
    return yaml.safe_load(out)


@pytest.fixture
def empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory without configs/digits.yaml, so built-in defaults apply."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_yaml(path: Path, tree: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree))
    return path


# ------------------------------------------------------------------ normalisation (pure)


def test_normalize_rewrites_option_names_only() -> None:
    arity = {"--num-epochs": True, "--run-name": True, "--print-config": False}
    args = ["--num_epochs", "3", "--run_name", "my_run", "--print_config", "--set=a.b_c=d_e"]
    assert normalize_args(args, arity) == [
        "--num-epochs", "3", "--run-name", "my_run", "--print-config", "--set=a.b_c=d_e",
    ]


def test_normalize_drops_empty_values_but_keeps_flags_and_values() -> None:
    arity = {"--lr": True, "--fold": True, "--run-name": True, "--print-config": False}
    args = ["--lr", "", "--fold=", "--print-config", "", "--run-name", "--odd_value", "--unknown_opt", ""]
    # "--print-config" is a flag: never dropped; the value of --run-name is kept verbatim.
    assert normalize_args(args, arity) == ["--print-config", "", "--run-name", "--odd_value"]


def test_normalize_leaves_everything_after_double_dash() -> None:
    assert normalize_args(["--a_b", "--", "--c_d", ""], {}) == ["--a-b", "--", "--c_d", ""]


def test_every_train_flag_maps_to_a_config_key() -> None:
    train = cli.get_command(click.Context(cli), "train")
    names = {p.name for p in train.params if isinstance(p, click.Option)}
    non_config = {"config", "resume", "sets", "overrides", "print_config", "allow_config_change", "fallback_previous"}
    assert names - non_config == set(CLI_FLAG_KEYS)
    assert all(option_arity(train)[f"--{n.replace('_', '-')}"] for n in CLI_FLAG_KEYS)


# ------------------------------------------------------------------ train --print-config


def test_underscore_flags_equal_dashed_flags(empty_cwd: Path) -> None:
    underscored = run_cli("train", "--num_epochs", "3", "--batch_size=16", "--data_dir", "d/x", "--print_config")
    dashed = run_cli("train", "--num-epochs", "3", "--batch-size=16", "--data-dir", "d/x", "--print-config")
    assert underscored == dashed
    cfg = yaml.safe_load(dashed[1])
    assert (cfg["training"]["num_epochs"], cfg["training"]["batch_size"], cfg["data"]["data_dir"]) == (3, 16, "d/x")


def test_precedence_flag_over_set_over_yaml_over_default(empty_cwd: Path) -> None:
    tree = {"training": {"num_epochs": 5, "batch_size": 16}, "optimizer": {"lr": 0.01}}
    conf = write_yaml(empty_cwd / "c.yaml", tree)
    default = printed_config()
    from_yaml = printed_config("--config", str(conf))
    from_set = printed_config("--config", str(conf), "--set", "training.num_epochs=7")
    from_flag = printed_config("--config", str(conf), "--set", "training.num_epochs=7", "--num-epochs", "9")
    assert [c["training"]["num_epochs"] for c in (default, from_yaml, from_set, from_flag)] == [30, 5, 7, 9]
    assert from_flag["training"]["batch_size"] == 16 and from_flag["optimizer"]["lr"] == 0.01
    assert default["optimizer"]["lr"] == 0.003


def test_set_wins_over_overrides_string_and_values_are_yaml(empty_cwd: Path) -> None:
    cfg = printed_config(
        "--overrides", "training.seed=1 optimizer.name=sgd optimizer.lr=1e-2", "--set", "training.seed=2"
    )
    assert (cfg["training"]["seed"], cfg["optimizer"]["name"], cfg["optimizer"]["lr"]) == (2, "sgd", 0.01)


def test_empty_values_fall_back_to_config(empty_cwd: Path) -> None:
    conf = write_yaml(empty_cwd / "c.yaml", {"training": {"batch_size": 8}, "data": {"fold": 3}})
    cfg = printed_config("--config", str(conf), "--batch-size", "", "--fold=", "--lr", "", "--overrides", "")
    assert (cfg["training"]["batch_size"], cfg["data"]["fold"], cfg["optimizer"]["lr"]) == (8, 3, 0.003)


def test_default_config_is_configs_digits_yaml_in_cwd(empty_cwd: Path) -> None:
    write_yaml(empty_cwd / "configs" / "digits.yaml", {"training": {"num_epochs": 4}})
    code, out, _ = run_cli("train", "--print-config")
    assert code == 0
    assert out.splitlines()[0] == "# config: configs/digits.yaml"
    assert yaml.safe_load(out)["training"]["num_epochs"] == 4


def test_unknown_key_exits_2_with_dotted_key_and_suggestion(empty_cwd: Path) -> None:
    code, out, err = run_cli("train", "--set", "training.num_epoch=3", "--print-config")
    assert code == 2 and out == ""
    assert err.startswith("error: ")
    assert "'training.num_epoch'" in err and "training.num_epochs" in err
    assert "Traceback" not in err


def test_missing_config_file_is_a_user_error(empty_cwd: Path) -> None:
    code, _, err = run_cli("train", "--config", "nope.yaml", "--print-config")
    assert code == 2 and "config file not found: nope.yaml" in err


def test_usage_errors_keep_click_exit_code(empty_cwd: Path) -> None:
    code, _, err = run_cli("train", "--num-epochs", "three")
    assert code == 2 and "Invalid value for '--num-epochs'" in err
    code, _, err = run_cli("train", "--no_such_flag", "1")
    assert code == 2 and "No such option '--no-such-flag'" in err


def test_ml_train_alias_equals_group_command(empty_cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expected = run_cli("train", "--num-epochs", "3", "--print-config")[1]
    with pytest.raises(SystemExit) as exc:
        train_main(["--num_epochs", "3", "--print_config"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == expected


def test_user_error_and_interrupt_exit_codes() -> None:
    group = MltrackGroup(name="mltrack")

    @group.command("bad")
    def bad() -> None:
        raise DataError("raw/ not found at /x (run mltrack demo-data first)")

    @group.command("stop")
    def stop() -> None:
        raise KeyboardInterrupt

    runner = CliRunner()
    result = runner.invoke(group, ["bad"])
    assert result.exit_code == 2
    assert result.stderr == "error: raw/ not found at /x (run mltrack demo-data first)\n"
    result = runner.invoke(group, ["stop"])
    assert result.exit_code == 130 and "interrupted" in result.stderr


# ------------------------------------------------------------------ real subprocesses


def test_python_m_mltrack_help_is_fast_and_dashed() -> None:
    start = time.perf_counter()
    helps = [
        subprocess.run(
            [sys.executable, "-m", "mltrack", *cmd, "--help"],
            cwd=ROOT, env=ENV, capture_output=True, text=True, check=True,
        ).stdout
        for cmd in ([], *([name] for name in COMMANDS))
    ]
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0 * len(helps), f"--help took {elapsed:.1f}s for {len(helps)} calls"
    assert all(name in helps[0] for name in COMMANDS)
    options = {opt for text in helps for opt in re.findall(r"--[A-Za-z][\w-]*", text)}
    assert "--num-epochs" in options and "--raw-data" in options
    assert not [opt for opt in options if "_" in opt], options


def test_demo_data_then_split_guide_spelling(tmp_path: Path) -> None:
    env_cwd = dict(cwd=tmp_path, env=ENV, capture_output=True, text=True)
    demo = subprocess.run([sys.executable, "-m", "mltrack", "demo-data", "data/digits"], **env_cwd)
    assert demo.returncode == 0, demo.stderr
    split = subprocess.run(
        [sys.executable, "-m", "mltrack", "split", "--raw_data", "data/digits/raw", "--folds", "3"], **env_cwd
    )
    assert split.returncode == 0, split.stderr
    splits = tmp_path / "data" / "digits" / "splits"
    expected = [f"fold_{k}_{s}.txt" for k in range(3) for s in ("train", "val")]
    assert sorted(p.name for p in splits.glob("fold_*")) == expected
    assert "3 folds:" in split.stdout and re.search(r"^9 +\d+", split.stdout, re.M)
    assert LINE.match(split.stderr.strip().splitlines()[-1]).group("level") == "SUCCESS"
    missing = subprocess.run([sys.executable, "-m", "mltrack", "split", "--raw-data", "nowhere/raw"], **env_cwd)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and "Traceback" not in missing.stderr


# ------------------------------------------------------------------ console logging


def test_setup_logging_twice_does_not_duplicate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log_file = tmp_path / "logs" / "train.log"
    console.setup_logging(log_file)
    console.setup_logging(log_file, level="WARNING")
    console.get_logger().info("file only")
    console.success("best model saved")
    logging.getLogger("mltrack.sub").warning("from a child")
    err_lines = capsys.readouterr().err.strip().splitlines()
    console.setup_logging()  # closes the file handler
    file_lines = log_file.read_text().strip().splitlines()
    assert [LINE.match(x).group("level", "msg") for x in file_lines] == [
        ("INFO", "file only"), ("SUCCESS", "best model saved"), ("WARNING", "from a child"),
    ]
    assert [LINE.match(x).group("level", "msg") for x in err_lines] == [("WARNING", "from a child")]
    ours = [h for h in console.get_logger().handlers if isinstance(h, console._OUR_HANDLERS)]
    assert len(ours) == 1


def test_progress_disabled_is_noop_and_enabled_runs(capsys: pytest.CaptureFixture[str]) -> None:
    with console.progress(3, "epoch 1", enabled=False) as advance:
        advance()
        advance(2, loss=0.5)
    assert capsys.readouterr().err == ""
    with console.progress(4, "epoch 2", enabled=True) as advance:
        for _ in range(4):
            advance(loss=0.25, acc=0.9)


def test_progress_bar_starts_only_once_the_pass_has_run_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    import rich.progress

    made: list[Any] = []
    real = rich.progress.Progress

    class Recorded(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(rich.progress, "Progress", Recorded)
    with console.progress(8, "epoch 1 train", enabled=True) as advance:  # a short pass: no bar at all
        for _ in range(8):
            advance(loss=0.5)
    assert made == []
    monkeypatch.setattr(console, "BAR_DELAY_S", 0.05)
    with console.progress(8, "epoch 2 train", enabled=True) as advance:
        advance(3, loss=0.4)  # before the delay: counted, not shown
        assert made == []
        time.sleep(0.06)
        advance(1, loss=0.3)  # the bar starts here, with the steps so far
        advance(2)
        task = made[0].tasks[0]
        assert (task.description, task.completed, task.total, task.fields) == ("epoch 2 train", 6, 8, {"loss": 0.3})
    assert len(made) == 1 and made[0].live.refresh_per_second == console.BAR_REFRESH_PER_S
