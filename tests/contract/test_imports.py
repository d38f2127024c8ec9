"""Import boundaries and forbidden unsafe calls, checked over every module under mltrack/ (AST, not grep,
so docstrings and comments that name the forbidden calls do not count)."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "mltrack"
# Third-party package -> the only module allowed to import it.
BOUNDARIES = {
    "mlflow": "mltrack/tracking.py",
    "optuna": "mltrack/search.py",
    "opacus": "mltrack/trainers/dp.py",
    "accelerate": "mltrack/trainers/accelerate.py",
}
HEAVY_FOR_CLI = {"torch", "torchvision", "mlflow", "optuna", "opacus", "accelerate", "sklearn", "matplotlib"}
REGISTRY_STRING = re.compile(r"^([A-Za-z_]\w*)(?:\.\w+)*:\w+$")  # "package.module:attr"


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def imported_packages(tree: ast.AST, module_level_only: bool = False) -> dict[str, int]:
    """Top-level package name -> first line importing it: import statements, ``importlib.import_module``
    / ``__import__`` with a literal name, and registry strings ``"pkg.mod:attr"``. With
    ``module_level_only`` the bodies of functions (run later, lazily) are skipped."""
    found: dict[str, int] = {}

    def add(name: str, line: int) -> None:
        found.setdefault(name.split(".")[0], line)

    def visit(node: ast.AST) -> None:
        if module_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            add(node.module, node.lineno)
        elif isinstance(node, ast.Call) and _literal_import(node):
            add(_literal_import(node), node.lineno)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = REGISTRY_STRING.match(node.value)
            if match:
                add(match.group(1), node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _literal_import(call: ast.Call) -> str:
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    if name in ("import_module", "__import__") and call.args and isinstance(call.args[0], ast.Constant):
        return str(call.args[0].value)
    return ""


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def unsafe_calls(tree: ast.AST) -> list[tuple[int, str]]:
    """Lines that deserialize untrusted data unsafely or relax image decoding checks."""
    hits: list[tuple[int, str]] = []
    imports_opacus = "opacus" in imported_packages(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            hits.extend(_unsafe_call(node, imports_opacus))
        elif isinstance(node, ast.ImportFrom) and node.module in ("pickle", "mlflow.pytorch"):
            bad = {a.name for a in node.names} & {"load", "loads", "Unpickler", "load_model"}
            hits.extend((node.lineno, f"from {node.module} import {name}") for name in sorted(bad))
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(_dotted(t).endswith("LOAD_TRUNCATED_IMAGES") for t in targets) and _is_true(node.value):
                hits.append((node.lineno, "LOAD_TRUNCATED_IMAGES = True"))
    return hits


def _unsafe_call(call: ast.Call, imports_opacus: bool) -> list[tuple[int, str]]:
    name = _dotted(call.func)
    keywords = {k.arg: k.value for k in call.keywords}
    hits = []
    if "weights_only" in keywords and not _is_true(keywords["weights_only"]):
        hits.append((call.lineno, f"{name}(weights_only=<not True>)"))
    if name in ("torch.load", "torch.serialization.load") and not _is_true(keywords.get("weights_only")):
        hits.append((call.lineno, "torch.load without an explicit weights_only=True"))
    if name in ("pickle.load", "pickle.loads", "pickle.Unpickler") or name.endswith("pytorch.load_model"):
        hits.append((call.lineno, name))
    if name.endswith("load_checkpoint") and (imports_opacus or "PrivacyEngine" in name):
        hits.append((call.lineno, f"{name} (PrivacyEngine.load_checkpoint unpickles)"))
    if name == "setattr" and len(call.args) == 3 and isinstance(call.args[1], ast.Constant):
        if call.args[1].value == "LOAD_TRUNCATED_IMAGES" and _is_true(call.args[2]):
            hits.append((call.lineno, "setattr LOAD_TRUNCATED_IMAGES True"))
    return hits


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def parse(path: Path) -> ast.AST:
    return ast.parse(path.read_text(), filename=str(path))


# ------------------------------------------------------------------ the scanners catch what they must


BAD_SOURCE = '''
"""Docstring naming torch.load(p, weights_only=False) and pickle.load does not count."""
import pickle
from mlflow.pytorch import load_model
import torch
from PIL import ImageFile
ImageFile.LOAD_TRUNCATED_IMAGES = True
REG = {"x": "optuna.samplers:TPESampler"}

def f(p, engine):
    torch.load(p, weights_only=False)
    torch.load(p)
    pickle.loads(b"")
    mlflow.pytorch.load_model("runs:/x/model")
    PrivacyEngine.load_checkpoint(path=p)
    importlib.import_module("accelerate.utils")
'''


def test_scanners_flag_known_bad_code() -> None:
    tree = ast.parse(BAD_SOURCE)
    lines = sorted(line for line, _ in unsafe_calls(tree))
    assert lines == [4, 7, 11, 11, 12, 13, 14, 15]  # line 11 breaks two rules
    assert set(imported_packages(tree)) == {"pickle", "mlflow", "torch", "PIL", "optuna", "accelerate"}
    assert set(imported_packages(tree, module_level_only=True)) == {"pickle", "mlflow", "torch", "PIL", "optuna"}
    assert unsafe_calls(ast.parse("torch.load(p, map_location='cpu', weights_only=True)")) == []


# ------------------------------------------------------------------ the package obeys them


def test_package_has_modules() -> None:
    names = {rel(p) for p in modules()}
    assert {"mltrack/config.py", "mltrack/cli/main.py", "mltrack/console.py"} <= names


@pytest.mark.parametrize("package,owner", sorted(BOUNDARIES.items()))
def test_import_boundaries(package: str, owner: str) -> None:
    offenders = [
        f"{rel(path)}:{found[package]}"
        for path in modules()
        if rel(path) != owner and package in (found := imported_packages(parse(path)))
    ]
    assert offenders == [], f"{package} may only be imported in {owner}"


def test_no_unsafe_deserialization_or_truncated_images() -> None:
    hits = [f"{rel(path)}:{line}: {what}" for path in modules() for line, what in unsafe_calls(parse(path))]
    assert hits == []


def test_cli_modules_import_nothing_heavy_at_module_level() -> None:
    offenders = [
        f"{rel(path)}:{line} imports {name}"
        for path in sorted((PACKAGE / "cli").glob("*.py"))
        for name, line in imported_packages(parse(path), module_level_only=True).items()
        if name in HEAVY_FOR_CLI
    ]
    assert offenders == []
    assert (PACKAGE / "__main__.py").exists()


def test_loading_every_cli_command_imports_no_torch_or_mlflow() -> None:
    # Transitive check in a fresh interpreter: what `mltrack --help` and `mltrack <cmd> --help` load.
    code = (
        "import sys\n"
        "from mltrack.cli.main import cli, COMMANDS\n"
        "cmds = [cli.get_command(None, name) for name in COMMANDS]\n"
        "assert all(c is not None for c in cmds)\n"
        f"print(sorted(m for m in {sorted(HEAVY_FOR_CLI)!r} if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
