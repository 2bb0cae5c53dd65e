"""What a hostile user tried, each kept as a test: a small --n-ctx, the memory file versus a
fresh compression, damaged headers and head weights, output paths checked before the work, settings
without a meaning, binary books, and a failed `train`."""

from __future__ import annotations

import shutil
import struct

import numpy as np
import pytest

from tests.helpers import run_cli


def _one_line_error(result, message):
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("uio-gguf: error:") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def book(tmp_path_factory, prose):
    path = tmp_path_factory.mktemp("book") / "book.txt"
    path.write_text(prose[:2500])
    return path


def _copy_bundle(bundle, target):
    """A bundle directory whose head and encoder can be damaged (the model is linked, not copied)."""
    from uio_gguf.format import schema

    target.mkdir()
    (target / schema.MODEL_FILE).symlink_to(bundle / schema.MODEL_FILE)
    for name in (schema.ENCODER_FILE, schema.HEAD_FILE):
        shutil.copyfile(bundle / name, target / name)
    return target


def _rewrite_head(source, target, change=None, checksum=True):
    """Writes source's uio.gguf again with gguf-py, each tensor through change(name, array), with a fresh
    checksum or (checksum=False) none: a head damaged in a way its own checksum does not show."""
    import gguf

    from uio_gguf.format import schema
    from uio_gguf.format.bundle import head_checksum
    from uio_gguf.format.gguf_file import read_gguf

    reader = gguf.GGUFReader(source)
    arch = str(reader.fields[schema.GENERAL_ARCHITECTURE].contents())
    tensors = {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors}
    if change is not None:
        tensors = {name: change(name, data) for name, data in tensors.items()}

    def write(value):
        writer = gguf.GGUFWriter(target, arch)
        for name, field in reader.fields.items():
            if name.startswith("GGUF.") or name in (schema.GENERAL_ARCHITECTURE, schema.KEY_HEAD_CHECKSUM):
                continue
            writer.add_key_value(name, field.contents(), field.types[0])
        if value is not None:
            writer.add_string(schema.KEY_HEAD_CHECKSUM, value)
        for name, data in tensors.items():
            writer.add_tensor(name, np.ascontiguousarray(data))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write(None)
    if checksum:
        write(head_checksum(read_gguf(target)))


# ----- 1. a small --n-ctx: works or one line, never an abort -------------------------------------
def test_small_n_ctx_works_or_gives_one_line(make_tiny_bundle, cache_env, tmp_path, prose):
    """Segment 128 > --n-ctx 64: llama.cpp lowers n_batch to 64; a 128-token batch aborted it (exit 134)."""
    bundle = make_tiny_bundle("llama", segment=128, ratio=4, outtype="f32")[0]
    short = tmp_path / "short.txt"
    short.write_text(prose[:150])  # shorter than one segment
    result = run_cli("chat", str(short), "-m", str(bundle), "--n-ctx", "64", "--prompt", "q", "-n", "3", env=cache_env)
    assert result.returncode in (0, 1), result.stderr[-2000:]
    if result.returncode == 1:
        _one_line_error(result, "")
    else:
        assert "Traceback" not in result.stderr and "GGML_ASSERT" not in result.stderr
    for n_ctx in ("0", "-5"):
        bad = run_cli("chat", str(short), "-m", str(bundle), "--n-ctx", n_ctx, "--prompt", "q", env=cache_env)
        _one_line_error(bad, "--n-ctx must be a positive")


def test_session_batch_never_exceeds_llama_cpp_n_batch(make_tiny_bundle, prose):
    import llama_cpp

    from uio_gguf.memory.runtime import UIORuntime

    bundle, _, tokenizer = make_tiny_bundle("llama", segment=128, ratio=4, outtype="f32")
    with UIORuntime(bundle) as runtime, runtime.new_session(n_ctx=64) as session:
        assert session.batch.capacity <= llama_cpp.llama_n_batch(session.ctx.ptr)
        ids = tokenizer(prose[:400], add_special_tokens=False)["input_ids"][:60]
        logits = session.feed(ids)
        assert np.isfinite(logits).all() and session.n_past == 60


# ----- 2. fresh and cached memory: bit-identical -------------------------------------------------
@pytest.mark.parametrize("kv_type", ["f16", "f32"])
def test_fresh_and_cached_memory_give_bit_identical_logits(make_tiny_bundle, prose, tmp_path, kv_type):
    """Compress once, ask many: the memory read back from its file is what a fresh compression injects,
    so the decoder's logits are the same bits (they differed when fresh memory was f32, files f16)."""
    from uio_gguf.memory.runtime import UIORuntime
    from uio_gguf.store import memory_file

    bundle, _, tokenizer = make_tiny_bundle("llama", segment=16, ratio=4, outtype="f32")
    ids = np.asarray(tokenizer(prose[:3000], add_special_tokens=False)["input_ids"], dtype=np.int32)
    book, question = ids[: 5 * 16], ids[5 * 16 : 5 * 16 + 11]
    with UIORuntime(bundle, kv_type=kv_type) as runtime:
        dtype = runtime.encoder.head.memory_dtype
        fresh = runtime.compress(book)
        key = memory_file.memory_key(runtime.bundle, book, dtype)
        path = memory_file.save(tmp_path / "m.npz", key, fresh, dtype)
        cached = memory_file.load(path, key)
        assert cached is not None
        assert np.array_equal(fresh.k, cached.k) and np.array_equal(fresh.v, cached.v)
        logits = []
        for memory in (fresh, cached):
            with runtime.new_session(n_ctx=256) as session:
                session.add_memory(memory)
                logits.append(session.feed(question, all_logits=True))
        assert np.array_equal(logits[0], logits[1])
        # the rounding is the file's: f16 memory is exactly representable in f16, f32 is left alone
        assert np.array_equal(fresh.k.astype(dtype).astype(np.float32), fresh.k)
    if kv_type == "f32":  # another file than the f16 one
        assert key != memory_file.memory_key(runtime.bundle, book)


def test_chat_answer_is_the_same_fresh_and_from_the_memory_file(tiny_bundle, book, cache_env):
    args = ("chat", str(book), "-m", str(tiny_bundle), "--prompt", "Who wrote it?", "-n", "12")
    fresh = run_cli(*args, "--no-cache", env=cache_env, check=True)
    run_cli(*args, env=cache_env, check=True)  # writes the memory file
    cached = run_cli(*args, env=cache_env, check=True)
    assert "memory file reused" in cached.stderr
    assert cached.stdout == fresh.stdout


# ----- 3. damaged uio.gguf header: one line -------------------------------------------------------
def _header_fields(path):
    """Offsets of the u64 tensor count, the u64 KV count, and the first key's u64 length."""
    return {"n_tensors": 8, "n_kv": 16, "key_length": 24}


@pytest.mark.parametrize("field", ["n_tensors", "n_kv", "key_length"])
@pytest.mark.parametrize("value", [2**63 - 1, 2**64 - 1, 2**40])
def test_huge_sizes_in_a_header_are_a_clean_error(tiny_bundle, tmp_path, field, value):
    from uio_gguf.errors import UIOError
    from uio_gguf.format import schema
    from uio_gguf.format.gguf_file import read_gguf

    path = tmp_path / "uio.gguf"
    data = bytearray((tiny_bundle / schema.HEAD_FILE).read_bytes())
    offset = _header_fields(path)[field]
    data[offset : offset + 8] = struct.pack("<Q", value)
    path.write_bytes(bytes(data))
    with pytest.raises(UIOError):
        read_gguf(path)


def test_info_and_chat_on_a_damaged_header_give_one_line(tiny_bundle, book, cache_env, tmp_path):
    from uio_gguf.format import schema

    damaged = _copy_bundle(tiny_bundle, tmp_path / "bundle")
    data = bytearray((damaged / schema.HEAD_FILE).read_bytes())
    data[16:24] = struct.pack("<Q", 2**62)  # the KV count
    (damaged / schema.HEAD_FILE).write_bytes(bytes(data))
    _one_line_error(run_cli("info", str(damaged), env=cache_env), "uio.gguf")
    _one_line_error(run_cli("chat", str(book), "-m", str(damaged), "--prompt", "q", env=cache_env), "uio.gguf")


# ----- 4. compress -o checked before the work ----------------------------------------------------
@pytest.mark.parametrize("where", ["missing_dir", "a_dir"])
def test_compress_output_path_is_checked_before_the_work(tiny_bundle, book, cache_env, tmp_path, where):
    out = tmp_path / "missing" / "book.mem" if where == "missing_dir" else tmp_path
    result = run_cli("compress", str(book), "-m", str(tiny_bundle), "-o", str(out), env=cache_env)
    _one_line_error(result, "does not exist" if where == "missing_dir" else "is a directory")
    assert not (tmp_path / "cache" / "memory").exists()  # nothing was compressed


# ----- 5. damaged head weights ------------------------------------------------------------------
def test_non_finite_or_huge_weight_in_the_head_is_refused(tiny_bundle, book, cache_env, tmp_path):
    from uio_gguf.errors import UIOError
    from uio_gguf.format import schema
    from uio_gguf.format.bundle import Bundle
    from uio_gguf.format.gguf_file import read_gguf

    # A NaN written over a weight's bytes: the head's checksum no longer matches
    damaged = _copy_bundle(tiny_bundle, tmp_path / "nan-bytes")
    head = read_gguf(damaged / schema.HEAD_FILE)
    target = head.tensors[schema.lora_b(schema.layer_tensor(0, "attn_v"))]
    with open(damaged / schema.HEAD_FILE, "r+b") as f:
        f.seek(target.offset)
        f.write(np.float32(np.nan).tobytes())
    with pytest.raises(UIOError, match="checksum"):
        Bundle.open(damaged)

    # The same NaN in a head without a checksum (as written before it had one): the weights are checked
    nan_head = tmp_path / "nan"
    _copy_bundle(tiny_bundle, nan_head)

    def nan(name, data):
        if name == target.name:
            data = data.copy()
            data.flat[3] = np.nan
        return data

    _rewrite_head(tiny_bundle / schema.HEAD_FILE, nan_head / schema.HEAD_FILE, nan, checksum=False)
    with pytest.raises(UIOError, match="non-finite"):
        Bundle.open(nan_head)
    _one_line_error(run_cli("chat", str(book), "-m", str(nan_head), "--prompt", "q", env=cache_env), "non-finite")

    # 3e38 is finite but the memory it makes is not: refused, and no memory file is written
    huge = tmp_path / "huge"
    _copy_bundle(tiny_bundle, huge)
    _rewrite_head(
        tiny_bundle / schema.HEAD_FILE,
        huge / schema.HEAD_FILE,
        lambda name, data: np.full_like(data, 3e38) if name == target.name else data,
    )
    result = run_cli("chat", str(book), "-m", str(huge), "--prompt", "q", "-n", "3", env=cache_env)
    _one_line_error(result, "non-finite memory")
    assert not list((tmp_path / "cache").rglob("*.npz"))


def test_a_tensor_of_another_shape_is_refused_when_the_bundle_opens(tiny_bundle, tmp_path):
    from uio_gguf.errors import UIOError
    from uio_gguf.format import schema
    from uio_gguf.format.bundle import Bundle

    name = schema.lora_a(schema.layer_tensor(1, "attn_k"))
    damaged = _copy_bundle(tiny_bundle, tmp_path / "shape")
    _rewrite_head(
        tiny_bundle / schema.HEAD_FILE,
        damaged / schema.HEAD_FILE,
        lambda n, data: data[:, :-2] if n == name else data,
    )
    with pytest.raises(UIOError, match="do not fit the model"):
        Bundle.open(damaged)


def test_the_head_fingerprint_covers_every_byte():
    """A zeroed 4 KB block anywhere in the shipped head (2.9 MB, more than the sampled 1 MB) changes
    its fingerprint, so a memory file made with the undamaged head is not reused."""
    import tempfile
    from pathlib import Path

    from uio_gguf.format import schema
    from uio_gguf.format.bundle import FINGERPRINT_BLOCK_BYTES, FINGERPRINT_BLOCKS, gguf_fingerprint
    from uio_gguf.format.gguf_file import read_gguf
    from uio_gguf.format.shipped import shipped_bundles

    source = next(iter(shipped_bundles().values())) / schema.HEAD_FILE
    info = read_gguf(source)
    data = bytearray(source.read_bytes())
    assert info.size - info.data_offset > 16 * 65536
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / schema.HEAD_FILE
        path.write_bytes(bytes(data))
        before = gguf_fingerprint(path, whole=True)
        last = info.size - info.data_offset - FINGERPRINT_BLOCK_BYTES
        start = info.data_offset + last // (FINGERPRINT_BLOCKS - 1) + FINGERPRINT_BLOCK_BYTES + 1000  # between two
        data[start : start + 4096] = bytes(4096)
        path.write_bytes(bytes(data))
        assert gguf_fingerprint(path, whole=True) != before
        assert gguf_fingerprint(path) == gguf_fingerprint(source)  # the sampled one misses it


def test_a_memory_with_non_finite_values_is_never_saved(tmp_path):
    from uio_gguf.errors import UIOError
    from uio_gguf.memory.encoder import SegmentMemory
    from uio_gguf.store import memory_file

    k = np.zeros((1, 2, 4, 8), np.float32)
    k[0, 1, 2, 3] = np.inf
    with pytest.raises(UIOError, match="non-finite"):
        memory_file.save(tmp_path / "m.npz", "key", SegmentMemory(k, np.zeros_like(k)))
    assert not list(tmp_path.iterdir())
    big = np.full_like(k, 1e6)  # finite in f32, inf in the file's f16
    with pytest.raises(UIOError, match="non-finite"):
        memory_file.save(tmp_path / "m.npz", "key", SegmentMemory(big, big))


# ----- 6. minor --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--max-tokens", "-1", "max tokens"),
        ("--temp", "-1", "temperature"),
        ("--top-k", "-3", "top-k"),
        ("--top-p", "1.5", "top-p"),
    ],
)
def test_settings_without_a_meaning_are_refused(tiny_bundle, book, cache_env, tmp_path, option, value, message):
    result = run_cli("chat", str(book), "-m", str(tiny_bundle), "--prompt", "q", option, value, env=cache_env)
    _one_line_error(result, message)
    assert not (tmp_path / "cache" / "memory").exists()  # refused before the compression


def test_binary_without_nul_bytes_is_not_text(tmp_path, prose):
    import warnings

    from uio_gguf.errors import UIOError
    from uio_gguf.text.book import read_book

    noise = np.random.default_rng(0).integers(1, 256, size=20_000, dtype=np.uint8).tobytes()
    assert b"\0" not in noise
    (tmp_path / "noise.bin").write_bytes(noise)
    with pytest.raises(UIOError, match="binary"):
        read_book(tmp_path / "noise.bin")
    # text in another encoding is still read, with a warning
    (tmp_path / "latin1.txt").write_bytes(prose[:3000].replace("e", "\xe9").encode("latin-1", "replace"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read_book(tmp_path / "latin1.txt")
    assert any("not valid UTF-8" in str(w.message) for w in caught)


def test_a_failed_train_leaves_no_empty_out_directory(make_tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = run_cli(
        "train", "--base", str(make_tiny_model_dir("llama")), "--data", str(tmp_path / "missing.txt"), "--out", str(out)
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not out.exists()
