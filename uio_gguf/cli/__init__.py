"""The `uio-gguf` command line. Each command imports its stage lazily, so `--help` is instant and the
runtime works without the training extra.

    options.py   the app, the options the commands share, opening a runtime, progress bars
    training.py  data, train, train-check, convert
    run.py       info, compress, chat, demo
    evaluate.py  eval ppl, eval passkey
    serve.py     serve (the OpenAI-compatible server; needs the serve extra)
"""

from __future__ import annotations

import _thread
import sys
import threading
import warnings

import typer

from uio_gguf.cli import bench, evaluate, run, serve, training  # noqa: F401  (each registers its commands on `app`)
from uio_gguf.cli.options import app
from uio_gguf.errors import UIOError


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """Warnings reach the user as one line, like errors (not Python's file, line and source line)."""
    return f"uio-gguf: warning: {message}\n"


def _interrupt_later(default_hook):
    """sys.unraisablehook: a Ctrl-C that lands inside a finalizer (llama_free in a __del__) cannot be raised
    there, and Python printed "Exception ignored ... KeyboardInterrupt"; it is raised again in the main
    thread instead, where the command handles it (from another thread, a moment later: raised at once, it
    would land in this hook, another place it cannot be raised)."""

    def hook(unraisable) -> None:
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            threading.Timer(0.05, _thread.interrupt_main).start()
        else:
            default_hook(unraisable)

    return hook


def main() -> None:
    warnings.formatwarning = _warning_line
    sys.unraisablehook = _interrupt_later(sys.unraisablehook)
    try:
        app()
    except UIOError as err:
        typer.echo(f"uio-gguf: error: {err}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("uio-gguf: interrupted", err=True)
        sys.exit(130)
