"""The layers import one way (docs/design.md §3), and the runtime never needs the training stack.

Reads the imports of every module with ast (module level and inside functions alike), so a new import
that points up the layer order fails here before it can form a cycle.
"""

from __future__ import annotations

import ast
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Repository folder -> the package it installs as (setup.py's PACKAGE_DIR).
FOLDERS = {
    "uio_gguf": "uio_gguf",
    "native": "uio_gguf.native",
    "train": "uio_gguf.train",
    "convert": "uio_gguf.convert",
}
# A module's layer is the folder it sits in inside the package: uio_gguf/memory/session.py is in `memory`,
# train/loop.py (installed as uio_gguf.train.loop) in `train`. The modules directly in uio_gguf/ are the
# common helpers; uio_gguf/__init__.py (the public names) is the top.
# Lowest first: a layer may import its own modules and those of the layers before it.
LAYERS = [
    "common",  # errors, handles, atomic writes, the cache folder
    "native",  # the compiled plugin and its ctypes bindings
    "llamacpp",  # wrappers over llama.cpp's C API
    "format",  # files on disk: GGUF, bundles, the shipped bundles
    "text",  # reading books
    "memory",  # the runtime: encoder, transfer head, RoPE, Session
    "store",  # memory files and start states on disk
    "chat",  # Conversation, recall
    "train",  # the training stage (its own folder, train/)
    "convert",  # the converter (convert/)
    "serve",  # the OpenAI-compatible server
    "evals",  # evaluations
    "bench",  # benchmarks
    "cli",  # the command line
    "package",  # uio_gguf/__init__.py
]
# Layers that run without the `train` extra: none of them may import these at module level.
RUNTIME = set(LAYERS) - {"train", "convert"}
TRAINING_STACK = {"torch", "transformers", "peft", "safetensors"}


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


def layers(table: dict[str, Path]) -> dict[str, str]:
    """Module -> its layer, from its path: uio_gguf.<folder>.… is in <folder>; a module directly in
    uio_gguf/ is common; the package itself is the top."""
    found = {}
    for module, path in table.items():
        parts = module.split(".")
        if len(parts) == 1:
            found[module] = "package"
        elif len(parts) == 2 and path.name != "__init__.py":
            found[module] = "common"
        else:
            found[module] = parts[1]
    return found


def violations(root: Path = ROOT, folders: dict[str, str] = FOLDERS) -> list[str]:
    """Every import that points up the layer order, and every module-level training-stack import in
    the runtime, as 'file:line: what' lines."""
    table = modules(root, folders)
    layer = layers(table)
    found = []
    for module, path in table.items():
        where = path.relative_to(root)
        for target, line, top in imports(path, set(table)):
            if target.split(".")[0] in TRAINING_STACK and top and layer[module] in RUNTIME:
                found.append(f"{where}:{line}: the {layer[module]} layer imports {target} at module level")
            if target in table and LAYERS.index(layer[target]) > LAYERS.index(layer[module]):
                found.append(f"{where}:{line}: {module} ({layer[module]}) imports {target} ({layer[target]})")
    return found


def test_layers_import_one_way_and_the_runtime_needs_no_torch():
    assert violations() == []


def test_every_module_is_in_a_known_layer():
    """A new folder under uio_gguf/ takes its place in LAYERS before its imports can be checked."""
    table = modules()
    assert {"uio_gguf.cli", "uio_gguf.native.build", "uio_gguf.train.loop", "uio_gguf.convert.bundle_writer"} <= set(
        table
    )
    assert set(layers(table).values()) == set(LAYERS)


@pytest.mark.parametrize(
    "planted, expected",
    [
        (
            "from uio_gguf.train.loop import train\n",
            "uio_gguf.memory.session (memory) imports uio_gguf.train.loop (train)",
        ),
        ("import torch\n", "the memory layer imports torch at module level"),
        ("def f():\n    from uio_gguf.cli import main\n", "imports uio_gguf.cli (cli)"),
        ("from uio_gguf.chat.conversation import Conversation\n", "imports uio_gguf.chat.conversation (chat)"),
    ],
)
def test_a_planted_upward_import_is_caught(tmp_path, planted, expected):
    for folder in FOLDERS:
        (tmp_path / folder).mkdir()
    for folder in ("memory", "chat", "cli"):
        (tmp_path / "uio_gguf" / folder).mkdir()
    (tmp_path / "uio_gguf" / "cli" / "__init__.py").write_text("from uio_gguf.memory.session import Session\n")
    (tmp_path / "uio_gguf" / "chat" / "conversation.py").write_text("from uio_gguf.memory.session import Session\n")
    (tmp_path / "uio_gguf" / "memory" / "session.py").write_text(planted)
    (tmp_path / "train" / "loop.py").write_text("from uio_gguf.memory.session import Session\n\ntrain = None\n")
    found = violations(tmp_path)
    assert len(found) == 1 and expected in found[0], found


def test_only_the_server_imports_the_serve_stack():
    table = modules()
    at_top = {
        module
        for module, path in table.items()
        for target, _, top in imports(path, set(table))
        if top and target.split(".")[0] in {"fastapi", "uvicorn", "sse_starlette", "starlette"}
    }
    assert at_top == {"uio_gguf.serve.app", "uio_gguf.serve.web"}  # the app and its web page


def test_every_package_folder_is_installed():
    """setup.py finds uio_gguf's subpackages and maps the stage folders: a folder with an __init__.py
    that it missed would work in an editable install and be missing from the wheel."""
    setup = runpy.run_path(str(ROOT / "setup.py"), run_name="setup")
    assert set(setup["packages"]()) == {name for name, path in modules().items() if path.name == "__init__.py"}
    assert setup["PACKAGE_DIR"] == {package: folder for folder, package in FOLDERS.items()}
