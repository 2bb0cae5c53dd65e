"""`uio-gguf chat` / `compress` end to end on a tiny converted bundle: memory files, bad input, Ctrl-C."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, run_cli


@pytest.fixture(scope="module")
def book(tmp_path_factory, prose):
    path = tmp_path_factory.mktemp("book") / "book.txt"
    path.write_text(prose[:2500])
    return path


def _one_line_error(result, message):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_chat_compresses_once_then_reuses_the_memory_file(tiny_bundle, book, cache_env, tmp_path):
    args = ("chat", str(book), "-m", str(tiny_bundle), "--prompt", "What is this about?", "-n", "8")
    first = run_cli(*args, env=cache_env, check=True)
    assert "compressed at" in first.stderr and "KV cache:" in first.stderr
    cache = tmp_path / "cache" / "memory"
    files = [f for f in cache.glob("*.npz") if not f.name.endswith(".start.npz")]
    assert len(files) == 1 and len(list(cache.glob("*.start.npz"))) == 1  # the memory and its start cache
    second = run_cli(*args, env=cache_env, check=True)
    assert "memory file reused" in second.stderr
    assert second.stdout == first.stdout  # greedy: the same memory gives the same answer

    # damaged: detected and recomputed (the start cache of the old file is not used for it)
    files[0].write_bytes(files[0].read_bytes()[:100])
    third = run_cli(*args, env=cache_env, check=True)
    assert "damaged" in third.stderr and "compressed at" in third.stderr
    assert third.stdout == first.stdout


def test_compress_writes_the_memory_file_where_asked(tiny_bundle, book, cache_env, tmp_path):
    result = run_cli(
        "compress", str(book), "-m", str(tiny_bundle), "-o", str(tmp_path / "book.mem"), env=cache_env, check=True
    )
    assert (tmp_path / "book.mem").stat().st_size > 0
    assert "memory slots" in result.stdout


def test_non_utf8_book_is_read_with_a_warning(tiny_bundle, cache_env, tmp_path, prose):
    path = tmp_path / "latin1.txt"
    path.write_bytes(prose[:600].encode() + "caf\xe9 cr\xe8me".encode("latin-1"))
    result = run_cli("chat", str(path), "-m", str(tiny_bundle), "--prompt", "Hi", "-n", "2", env=cache_env)
    assert result.returncode == 0, result.stderr
    assert "not valid UTF-8" in result.stderr


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "book not found"),
        ("empty", "is empty"),
        ("binary", "looks like a binary file"),
        ("too_long", "holds at most"),
        ("mixed_bundle", "do not belong together"),
        ("memory_window", "memory window must be a whole number of segments' slots"),
        ("window_by_attention", "takes no memory window"),
    ],
)
def test_bad_input_gives_one_clear_line(case, message, tiny_bundle, book, cache_env, tmp_path, make_tiny_bundle):
    path, model, extra = book, tiny_bundle, []
    if case == "missing":
        path = tmp_path / "nope.txt"
    elif case == "empty":
        path = tmp_path / "empty.txt"
        path.write_text(" \n\n")
    elif case == "binary":
        path = tmp_path / "book.bin"
        path.write_bytes(bytes(range(256)) * 8)
    elif case == "too_long":
        extra = ["--n-ctx", "1100"]  # 16-token segments, 4 slots each: room for 256 tokens
    elif case == "memory_window":
        extra = ["--memory-window", "6"]  # 4 slots a segment
    elif case == "window_by_attention":
        extra = ["--memory-window", "8", "--recall-ranking", "attention"]
    elif case == "mixed_bundle":
        model = tmp_path / "mixed"
        shutil.copytree(tiny_bundle, model)
        other = make_tiny_bundle("llama", seed=1, segment=16, ratio=4, outtype="f32")[0]
        shutil.copy(other / "encoder.lora.gguf", model / "encoder.lora.gguf")
    result = run_cli("chat", str(path), "-m", str(model), "--prompt", "Hi", "-n", "2", *extra, env=cache_env)
    _one_line_error(result, message)


def test_ctrl_c_stops_the_answer_and_a_second_one_exits_cleanly(tiny_bundle, book, cache_env):
    """A long sampled answer is interrupted once (it stops, the REPL goes on), then again (clean exit)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from uio_gguf.cli import main; main()",
            "chat",
            str(book),
            "-m",
            str(tiny_bundle),
            "--temp",
            "1.0",
            "-n",
            "100000",
            "--n-ctx",
            "8192",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, **cache_env},
    )
    errors = b""

    def read_more() -> bytes:
        """What stdout gave since the last call; stderr is drained too, so a full pipe never blocks it."""
        nonlocal errors
        errors += proc.stderr.read() or b""
        return proc.stdout.read() or b""

    try:
        proc.stdin.write(b"Tell me everything.\n")
        proc.stdin.flush()
        os.set_blocking(proc.stdout.fileno(), False)
        os.set_blocking(proc.stderr.fileno(), False)
        seen = b""
        deadline = time.monotonic() + 120
        while len(seen) < 200 and time.monotonic() < deadline:  # the answer is streaming
            seen += read_more()
            time.sleep(0.05)
        assert len(seen) >= 200, "no streamed answer"
        proc.send_signal(signal.SIGINT)
        while not seen.endswith(b"[stopped]\n> ") and time.monotonic() < deadline:  # back at the prompt
            seen += read_more()
            time.sleep(0.05)
        assert b"[stopped]" in seen
        assert proc.poll() is None  # still running: back at the prompt
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    os.set_blocking(proc.stderr.fileno(), True)
    stderr = (errors + proc.stderr.read()).decode()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
