"""Real English prose that every Python installation carries: the docstrings of standard-library
modules. Used by the demo and the tests, so nothing is downloaded."""

from __future__ import annotations

import importlib
import inspect

MODULES = (
    "argparse",
    "asyncio",
    "collections",
    "contextlib",
    "csv",
    "dataclasses",
    "decimal",
    "email",
    "fractions",
    "functools",
    "heapq",
    "http.client",
    "inspect",
    "io",
    "json",
    "logging",
    "multiprocessing",
    "os",
    "pathlib",
    "pickle",
    "random",
    "re",
    "shutil",
    "socket",
    "sqlite3",
    "string",
    "subprocess",
    "tarfile",
    "threading",
    "unittest",
    "urllib.parse",
    "uuid",
    "zipfile",
)


def stdlib_prose(min_chars: int = 0) -> str:
    """Module, class and function docstrings, in a fixed order; repeated if min_chars asks for more."""
    parts = []
    for name in MODULES:
        module = importlib.import_module(name)
        if module.__doc__:
            parts.append(inspect.cleandoc(module.__doc__))
        for _, member in sorted(vars(module).items()):
            if (inspect.isclass(member) or inspect.isfunction(member)) and getattr(member, "__module__", None) == name:
                doc = inspect.getdoc(member)
                if doc and len(doc) > 200:
                    parts.append(doc)
    text = "\n\n".join(parts)
    while len(text) < min_chars:
        text = text + "\n\n" + text
    return text
