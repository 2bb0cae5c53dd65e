"""The stages import one way (docs/design.md §3), and the runtime never needs the training stack.

Reads the imports of every module with ast (module level and inside functions alike), so a new import
that points up the stage order fails here before it can form a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Repository folder -> the package it installs as (pyproject.toml's package-dir).
FOLDERS = {
    "uio_gguf": "uio_gguf",
    "native": "uio_gguf.native",
    "train": "uio_gguf.train",
    "convert": "uio_gguf.convert",
}
# Lowest first: a stage may import its own modules and those of the stages before it.
STAGES = ["common", "native", "core", "train", "convert", "app"]
COMMON = {"uio_gguf.errors", "uio_gguf.cache", "uio_gguf.files", "uio_gguf.handles"}
# The app: the package's public names, the command line, the evaluations, benchmarks and the server.
APP = {"uio_gguf", "uio_gguf.cli", "uio_gguf.server", "uio_gguf.web"}
APP_PREFIXES = ("uio_gguf.cli.", "uio_gguf.eval_", "uio_gguf.bench")
# Stages that run without the `train` extra: none of them may import these at module level.
RUNTIME = {"common", "native", "core", "app"}
TRAINING_STACK = {"torch", "transformers", "peft", "safetensors"}


def stage_of(module: str) -> str:
    if module in COMMON:
        return "common"
    if module in APP or module.startswith(APP_PREFIXES):
        return "app"
    for sub in ("native", "train", "convert"):
        if module == f"uio_gguf.{sub}" or module.startswith(f"uio_gguf.{sub}."):
            return sub
    return "core"


def modules(root: Path = ROOT, folders: dict[str, str] = FOLDERS) -> dict[str, Path]:
    """Installed module name -> source file, for every module of the package."""
    found = {}
    for folder, package in folders.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            if parts[0] in {sub.split(".")[-1] for sub in folders.values() if sub != package}:
                continue  # a stage folder of its own (only in a tree that nests them)
            found[".".join((package, *parts)).removesuffix(".__init__")] = path
    return found


def imports(path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for each import in the file; `from P import name`
    counts as P.name when that is a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # imports under a module-level if/try still run at import time
        if isinstance(node, (ast.If, ast.Try)):
            top_level.update(id(child) for child in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.append((name if name in known else node.module, node.lineno, id(node) in top_level))
    return found


def violations(root: Path = ROOT, folders: dict[str, str] = FOLDERS) -> list[str]:
    """Every import that points up the stage order, and every module-level training-stack import in
    the runtime, as 'file:line: what' lines."""
    table = modules(root, folders)
    found = []
    for module, path in table.items():
        stage = stage_of(module)
        where = path.relative_to(root)
        for target, line, top in imports(path, set(table)):
            if target.split(".")[0] in TRAINING_STACK and top and stage in RUNTIME:
                found.append(f"{where}:{line}: the {stage} stage imports {target} at module level")
            if target in table and STAGES.index(stage_of(target)) > STAGES.index(stage):
                found.append(f"{where}:{line}: {module} ({stage}) imports {target} ({stage_of(target)})")
    return found


def test_stages_import_one_way_and_the_runtime_needs_no_torch():
    assert violations() == []


def test_every_module_is_seen():
    table = modules()
    assert {"uio_gguf.cli", "uio_gguf.native.build", "uio_gguf.train.loop", "uio_gguf.convert.bundle_writer"} <= set(
        table
    )
    assert {stage_of(m) for m in table} == set(STAGES)


@pytest.mark.parametrize(
    "planted, expected",
    [
        ("from uio_gguf.train.loop import train\n", "uio_gguf.session (core) imports uio_gguf.train.loop (train)"),
        ("import torch\n", "the core stage imports torch at module level"),
        ("def f():\n    from uio_gguf.cli import main\n", "imports uio_gguf.cli (app)"),
    ],
)
def test_a_planted_upward_import_is_caught(tmp_path, planted, expected):
    for folder in FOLDERS:
        (tmp_path / folder).mkdir()
    (tmp_path / "uio_gguf" / "cli.py").write_text("from uio_gguf.session import Session\n")
    (tmp_path / "uio_gguf" / "session.py").write_text(planted)
    (tmp_path / "train" / "loop.py").write_text("from uio_gguf.session import Session\n\ntrain = None\n")
    found = violations(tmp_path)
    assert len(found) == 1 and expected in found[0], found


def test_every_package_folder_is_installed():
    """pyproject.toml lists the packages by hand (package-dir mapping): a new subpackage left out of the
    list works in an editable install and is missing from the wheel."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {name for name in modules() if modules()[name].name == "__init__.py"}
    assert set(config["packages"]) == packages
    assert {config["package-dir"][p] for p in FOLDERS.values()} == set(FOLDERS)
