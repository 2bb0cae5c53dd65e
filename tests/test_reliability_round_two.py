"""Issue 39: what a second QA pass found, each kept as a test (the server's own in tests/test_serve.py,
the damaged cache files in tests/test_fuzz_readers.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def book(tmp_path_factory, prose):
    path = tmp_path_factory.mktemp("book") / "book.txt"
    path.write_text(prose[:2500])
    return path


def repl(*args: str, lines: list[str], env: dict) -> subprocess.CompletedProcess:
    """`uio-gguf ARGS` with `lines` typed at its prompt, then Ctrl-D."""
    return subprocess.run(
        [sys.executable, "-c", "from uio_gguf.cli import main; main()", *args],
        input="".join(f"{line}\n" for line in lines),
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **env},
    )


# ----- 1. a later turn too long for the window -----------------------------------------------------
def test_a_question_too_long_for_the_window_is_refused_and_the_chat_goes_on(tiny_bundle, book, cache_env, prose):
    """--n-ctx 2048 holds 4,048 tokens; a ~4,500-token question was fed until the window was full, then
    ended the chat. It is refused before it is read, and the next question is answered."""
    long_question = prose[:20000].replace("\n", " ")
    result = repl(
        "chat",
        str(book),
        "-m",
        str(tiny_bundle),
        "-n",
        "3",
        "--n-ctx",
        "2048",
        lines=[long_question, "Hi"],
        env=cache_env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "holds at most 4048: start a new conversation" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout.count("> ") == 3  # three prompts: the refused question, the answered one, Ctrl-D
