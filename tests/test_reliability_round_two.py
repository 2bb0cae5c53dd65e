"""What a second QA pass found, each kept as a test: a later turn too long for the window, a full disk, a
memory file trimmed without its start state, damage between the sampled blocks of a fingerprint, --n-ctx out
of range, threads on a busy CPU, and smaller items (the server's own cases are in tests/test_serve.py, the
cache files replaced by a directory, a FIFO or a device in tests/test_fuzz_readers.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, run_cli


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


# ----- 2. a full disk ------------------------------------------------------------------------------
FILE_SIZE_LIMIT = 4096  # bytes: the tiny bundle's memory files are ~32 KB


def limited(*args: str, env: dict) -> subprocess.CompletedProcess:
    """`uio-gguf ARGS` unable to write a file past FILE_SIZE_LIMIT bytes (a disk that fills up; Python
    ignores SIGXFSZ, so the write fails with EFBIG)."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))

    return subprocess.run(
        [sys.executable, "-c", "from uio_gguf.cli import main; main()", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **env},
        preexec_fn=limit,
    )


def one_line(result, message: str, code: int = 1) -> str:
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_compress_to_a_full_device_is_one_line(tiny_bundle, book, cache_env):
    result = run_cli("compress", str(book), "-m", str(tiny_bundle), "-o", "/dev/full", env=cache_env)
    one_line(result, "-o /dev/full: cannot write the memory file: No space left on device")
    assert Path("/dev/full").is_char_device()


def test_compress_on_a_full_disk_leaves_no_partial_file(tiny_bundle, book, cache_env, tmp_path, prose):
    memory = tmp_path / "cache" / "memory"
    run_cli("compress", str(book), "-m", str(tiny_bundle), env=cache_env, check=True)  # the plugin, the memory file
    cached = sorted(memory.iterdir())
    out = tmp_path / "out" / "book.mem"
    out.parent.mkdir()
    one_line(limited("compress", str(book), "-m", str(tiny_bundle), "-o", str(out), env=cache_env), "File too large")
    assert not list(out.parent.iterdir())  # neither book.mem nor a temporary
    other = tmp_path / "other.txt"
    other.write_text(prose[5000:7500])
    one_line(limited("compress", str(other), "-m", str(tiny_bundle), env=cache_env), "cannot write the memory file")
    assert sorted(memory.iterdir()) == cached  # nothing new, whole or partial


def test_chat_with_its_cache_on_a_full_disk_warns_and_answers(tiny_bundle, book, cache_env, tmp_path):
    args = ("chat", str(book), "-m", str(tiny_bundle), "--prompt", "Who wrote it?", "-n", "8")
    fresh = run_cli(*args, "--no-cache", env=cache_env, check=True)  # also builds the plugin into the cache
    result = limited(*args, env=cache_env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == fresh.stdout
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "uio-gguf: warning: cannot write the memory file" in warnings[0], result.stderr
    assert "Traceback" not in result.stderr and ".py:" not in result.stderr  # no Python source line
    assert not list((tmp_path / "cache" / "memory").iterdir())


# ----- 3. the cache keeps a memory file and its start state together ------------------------------
def test_a_cache_with_room_for_the_memory_file_alone_still_reuses_it(tiny_bundle, book, cache_env, tmp_path):
    """The memory cache limited to a little more than the memory file: trimming after the start state was
    written deleted the memory file, so every run compressed again."""
    args = ("chat", str(book), "-m", str(tiny_bundle), "--prompt", "Who wrote it?", "-n", "4")
    first = run_cli(*args, env=cache_env, check=True)
    memory = tmp_path / "cache" / "memory"
    (memory_file,) = [p for p in memory.glob("*.npz") if not p.name.endswith(".start.npz")]
    limit = {"UIO_GGUF_MEMORY_CACHE_GB": str(1.2 * memory_file.stat().st_size / 2**30)}
    for path in memory.iterdir():
        path.unlink()
    for _ in range(2):
        last = run_cli(*args, env={**cache_env, **limit}, check=True)
    assert "memory file reused" in last.stderr and last.stdout == first.stdout
    assert len(list(memory.glob("*.npz"))) == 2  # the memory file and its start state


# ----- 6. empty stop strings ------------------------------------------------------------------------
def test_an_empty_stop_string_is_ignored(tiny_bundle, book, cache_env):
    args = ("chat", str(book), "-m", str(tiny_bundle), "--prompt", "Who wrote it?", "-n", "8")
    plain = run_cli(*args, env=cache_env, check=True)
    assert plain.stdout.strip()
    assert run_cli(*args, "--stop", "", env=cache_env, check=True).stdout == plain.stdout


# ----- 8. --n-ctx out of range ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "command, n_ctx, message",
    [
        ("chat", "16", "--n-ctx must be a positive number of tokens, at least 256, not 16"),
        ("chat", "1000000", "--n-ctx 1000000 is past this model's trained context (8192 tokens)"),
        ("serve", "16", "at least 256"),
        ("serve", "1000000", "add --force-n-ctx to use it anyway"),
    ],
)
def test_an_n_ctx_out_of_range_is_refused_in_one_line(tiny_bundle, book, cache_env, tmp_path, command, n_ctx, message):
    """--n-ctx 1000000 took 74 s and GBs before the first answer; 16 was raised by llama.cpp in silence and
    the length error spoke of a 16-token window."""
    args = ["chat", str(book), "--prompt", "Hi", "-n", "2"] if command == "chat" else ["serve"]
    result = run_cli(*args, "-m", str(tiny_bundle), "--n-ctx", n_ctx, env=cache_env)
    one_line(result, message)
    assert not (tmp_path / "cache" / "memory").exists()  # refused before any work


def test_force_n_ctx_goes_past_the_trained_context(tiny_bundle, book, cache_env):
    args = ("chat", str(book), "-m", str(tiny_bundle), "--prompt", "Hi", "-n", "2", "--n-ctx", "16384")
    assert run_cli(*args, "--force-n-ctx", env=cache_env, check=True).stderr.count("memory slots") == 1


# ----- 10. smaller items ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--repeat-penalty", "0", "the repetition penalty must be a finite number above 0"),
        ("--repeat-penalty", "-1.5", "repetition penalty"),
        ("--temp", "inf", "the temperature must be 0 (greedy) or a finite number"),
        ("--dry", "inf", "DRY multiplier"),
    ],
)
def test_sampling_settings_without_a_meaning_are_refused(
    tiny_bundle, book, cache_env, tmp_path, option, value, message
):
    result = run_cli("chat", str(book), "-m", str(tiny_bundle), "--prompt", "q", option, value, env=cache_env)
    one_line(result, message)
    assert not (tmp_path / "cache" / "memory").exists()  # before the compression


@pytest.mark.parametrize("command", ["chat", "serve"])
def test_a_ratio_beside_a_bundle_is_refused(tiny_bundle, book, cache_env, command):
    args = ["chat", str(book), "--prompt", "q"] if command == "chat" else ["serve"]
    result = run_cli(*args, "-m", str(tiny_bundle), "--ratio", "32", env=cache_env)
    one_line(result, "--ratio 32 picks a shipped bundle")


@pytest.mark.parametrize("where", ["the folder", "a folder above it"])
def test_a_cache_that_is_a_file_is_one_line(tiny_bundle, book, tmp_path, where):
    file = tmp_path / "file"
    file.write_text("x")
    cache = file if where == "the folder" else file / "cache"
    result = run_cli("chat", str(book), "-m", str(tiny_bundle), "--prompt", "q", env={"UIO_GGUF_CACHE": str(cache)})
    one_line(result, f"the cache folder {cache} cannot be made: {file} is not a folder")


def test_a_book_that_cannot_be_read_is_one_line(tiny_bundle, cache_env):
    result = run_cli("chat", "/proc/self/mem", "-m", str(tiny_bundle), "--prompt", "q", env=cache_env)
    one_line(result, "cannot read the book /proc/self/mem: Input/output error")  # a regular file that fails to read


@pytest.mark.parametrize("word", ["exit", "quit", "/bye"])
def test_exit_words_leave_the_repl_unasked(tiny_bundle, book, cache_env, word):
    result = repl("chat", str(book), "-m", str(tiny_bundle), "-n", "3", lines=[word, "Hi"], env=cache_env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == "> "  # one prompt, and nothing answered


def test_a_ctrl_c_inside_a_finalizer_interrupts_the_command_without_exception_ignored():
    """A second Ctrl-C that lands in a __del__ (llama_free) printed "Exception ignored ... KeyboardInterrupt"
    and was lost. A finalizer raising KeyboardInterrupt, as that signal does, inside a command:"""
    code = "\n".join(
        [
            "import signal, sys, time",
            # as in a terminal: Python handles SIGINT (a job a script starts in the background has it ignored,
            # and interrupt_main then does nothing: this failed in such a CI rehearsal)
            "signal.signal(signal.SIGINT, signal.default_int_handler)",
            "from uio_gguf.cli import main",
            "from uio_gguf.cli.options import app",
            "class Handle:",
            "    def __del__(self):",
            "        raise KeyboardInterrupt",
            "@app.command('finalize')",
            "def finalize():",
            "    handle = Handle()",
            "    del handle",
            "    time.sleep(0.5)",
            "    print('not interrupted')",
            "sys.argv[1:] = ['finalize']",
            "main()",
        ]
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert (result.returncode, result.stdout) == (130, "")  # interrupted, as by a Ctrl-C anywhere else
    assert "Exception ignored" not in result.stderr and "Traceback" not in result.stderr


def test_a_damaged_memory_file_warns_in_one_line(tiny_bundle, book, cache_env, tmp_path):
    args = ("chat", str(book), "-m", str(tiny_bundle), "--prompt", "Hi", "-n", "2")
    run_cli(*args, env=cache_env, check=True)
    memory = tmp_path / "cache" / "memory"
    for path in memory.glob("*.npz"):
        path.write_bytes(path.read_bytes()[:200])
    result = run_cli(*args, env=cache_env, check=True)
    warnings = [line for line in result.stderr.splitlines() if "damaged" in line]
    assert len(warnings) == 1 and warnings[0].startswith("uio-gguf: warning: memory file "), result.stderr
    assert ".py:" not in result.stderr and "warnings.warn" not in result.stderr


# ----- 4. damage that went unseen ---------------------------------------------------------------------
def _bundle_copy(source: Path, target: Path, copy_model: bool) -> Path:
    """A bundle directory whose encoder and head (and, copy_model, model) can be damaged."""
    import shutil

    from uio_gguf.format import schema

    target.mkdir()
    for name in (schema.MODEL_FILE, schema.ENCODER_FILE, schema.HEAD_FILE):
        if name == schema.MODEL_FILE and not copy_model:
            (target / name).symlink_to((source / name).resolve())
        else:
            shutil.copyfile(source / name, target / name)
    return target


def _scale_tensors(path: Path, factor: float, count: int = 4) -> None:
    """`count` (f32) tensors of a GGUF file multiplied by `factor`, in place (the header as it was): the
    first ones that lie between the blocks its sampled fingerprint reads, where the file has such blocks."""
    import numpy as np

    from uio_gguf.format.bundle import FINGERPRINT_BLOCK_BYTES, FINGERPRINT_BLOCKS
    from uio_gguf.format.gguf_file import read_gguf

    info = read_gguf(path)
    data_bytes, block = info.size - info.data_offset, FINGERPRINT_BLOCK_BYTES
    last = data_bytes - block
    starts = [info.data_offset + last * i // (FINGERPRINT_BLOCKS - 1) for i in range(FINGERPRINT_BLOCKS)]

    def unsampled(t) -> bool:
        return data_bytes > FINGERPRINT_BLOCKS * block and all(
            t.offset + t.n_bytes <= s or t.offset >= s + block for s in starts
        )

    tensors = list(info.tensors.values())
    tensors = ([t for t in tensors if unsampled(t)] or tensors)[:count]
    with open(path, "r+b") as f:
        for tensor in tensors:
            assert int(tensor.type) == 0  # F32
            f.seek(tensor.offset)
            data = np.frombuffer(f.read(tensor.n_bytes), dtype=np.float32) * np.float32(factor)
            f.seek(tensor.offset)
            f.write(data.tobytes())


def test_damage_anywhere_in_a_bundle_converted_now_is_refused(tiny_bundle, book, cache_env, tmp_path):
    """64 inverted bytes at 37% of model.gguf fell between the sampled blocks of its fingerprint: the bundle
    opened and answered otherwise. The converter now records a checksum of every byte, which is compared."""
    from uio_gguf.errors import UIOError
    from uio_gguf.format.bundle import Bundle

    model_damaged = _bundle_copy(tiny_bundle, tmp_path / "model", copy_model=True)
    data = bytearray((model_damaged / "model.gguf").read_bytes())
    at = int(len(data) * 0.37)
    data[at : at + 64] = bytes(b ^ 0xFF for b in data[at : at + 64])
    (model_damaged / "model.gguf").write_bytes(bytes(data))
    encoder_damaged = _bundle_copy(tiny_bundle, tmp_path / "encoder", copy_model=False)
    _scale_tensors(encoder_damaged / "encoder.lora.gguf", 50)
    # the tiny encoder is smaller than the sampled blocks: its fingerprint reads every byte already
    for damaged, message in (
        (model_damaged, "model.gguf is damaged"),
        (encoder_damaged, "do not belong together: encoder.lora.gguf"),
    ):
        with pytest.raises(UIOError, match=re.escape(message)):
            Bundle.open(damaged)
        info = run_cli("info", str(damaged), env=cache_env)
        one_line(info, message)
        assert ("DAMAGED" in info.stdout or "MISMATCH" in info.stdout) and "every byte" in info.stdout
        one_line(run_cli("chat", str(book), "-m", str(damaged), "--prompt", "q", env=cache_env), message)
    assert "ok, every byte" in run_cli("info", str(tiny_bundle), env=cache_env, check=True).stdout


def test_a_damaged_encoder_of_an_older_bundle_gets_memory_of_its_own(tmp_path, monkeypatch):
    """The shipped bundles record no checksum of every byte: four encoder tensors scaled by 50 pass their
    sampled fingerprint (info says so), but the memory is keyed on every byte, so the memory file made
    with the whole encoder is not reused."""
    import numpy as np

    from uio_gguf.format.bundle import Bundle
    from uio_gguf.format.shipped import default_bundle_path
    from uio_gguf.store.memory_file import memory_key

    monkeypatch.setenv("UIO_GGUF_CACHE", str(tmp_path / "cache"))
    whole = default_bundle_path(8)
    damaged = _bundle_copy(whole, tmp_path / "damaged", copy_model=False)
    _scale_tensors(damaged / "encoder.lora.gguf", 50)
    tokens = np.arange(256, dtype=np.int32)
    original, changed = Bundle.open(whole), Bundle.open(damaged)  # opens: no checksum to compare
    assert memory_key(changed, tokens) != memory_key(original, tokens)
    info = run_cli("info", str(damaged), env={"UIO_GGUF_CACHE": str(tmp_path / "cache")}, check=True).stdout
    line = next(row for row in info.splitlines() if row.strip().startswith("encoder.lora.gguf"))
    assert "sampled" in line and "no checksum of every byte recorded" in line


# ----- 9. speed under load ----------------------------------------------------------------------------
def test_the_default_threads_leave_out_a_cpu_another_process_keeps_busy(tiny_bundle, cache_env):
    """llama.cpp's threads spin at every step: with one on a CPU another process kept busy, compression ran
    25 times slower than with one thread. The default leaves such a CPU out (bench measures the speed)."""
    import time

    cpus = sorted(os.sched_getaffinity(0))
    spin = f"import os\nos.sched_setaffinity(0, {{{cpus[0]}}})\nwhile True:\n    pass"
    busy = subprocess.Popen([sys.executable, "-c", spin])
    code = (
        "import llama_cpp\nfrom uio_gguf.memory.runtime import UIORuntime\n"
        f"rt = UIORuntime({str(tiny_bundle)!r})\nprint(llama_cpp.llama_n_threads(rt.encoder.ctx.ptr))"
    )
    try:
        time.sleep(0.5)  # the spinning process has its CPU
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env={**os.environ, **cache_env}
        )
    finally:
        busy.kill()
        busy.wait()
    assert result.returncode == 0, result.stderr[-2000:]
    assert 1 <= int(result.stdout) <= max(1, len(cpus) - 1)


def test_threads_can_be_set_and_are_checked(tiny_bundle, book, cache_env):
    args = ("chat", str(book), "-m", str(tiny_bundle), "--prompt", "Who wrote it?", "-n", "4")
    one_line(run_cli(*args, "--threads", "0", env=cache_env), "--threads must be 1 or more, not 0")
    assert run_cli(*args, "--threads", "1", env=cache_env, check=True).stdout.strip()
