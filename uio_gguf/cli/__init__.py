"""The `uio-gguf` command line. Each command imports its stage lazily, so `--help` is instant and the
runtime works without the training extra.

    options.py   the app, the options the commands share, opening a runtime, progress bars
    training.py  data, train, train-check, convert
    run.py       info, compress, chat, demo
    evaluate.py  eval ppl, eval passkey
    serve.py     serve (the OpenAI-compatible server; needs the serve extra)
"""

from __future__ import annotations

import sys
import warnings

import typer

from uio_gguf.cli import bench, evaluate, run, serve, training  # noqa: F401  (each registers its commands on `app`)
from uio_gguf.cli.options import app
from uio_gguf.errors import UIOError


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """Warnings reach the user as one line, like errors (not Python's file, line and source line)."""
    return f"uio-gguf: warning: {message}\n"


def main() -> None:
    warnings.formatwarning = _warning_line
    try:
        app()
    except UIOError as err:
        typer.echo(f"uio-gguf: error: {err}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("uio-gguf: interrupted", err=True)
        sys.exit(130)
