"""The encoder's weight format (uio_gguf/format/derived.py): a copy of the model in another llama.cpp
file type, written once into the cache, checked and rebuilt when damaged; the runtime's encoder (with its
LoRA) on it, memory keyed by it. The tiny LLaMA bundle (F32 model) here; the embedded Q4_1 model in
test_encoder_format_real.py."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.helpers import RATIO, SEGMENT
from uio_gguf.errors import UIOError
from uio_gguf.format import derived, schema
from uio_gguf.format.bundle import Bundle


@pytest.fixture()
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UIO_GGUF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def f32_bundle(make_tiny_bundle):
    return make_tiny_bundle("llama", segment=SEGMENT, ratio=RATIO, outtype="f32")[0]


def test_formats_resolve_against_the_models_own_type(f32_bundle):
    model = f32_bundle / schema.MODEL_FILE
    assert derived.resolve(model, "auto") == derived.MODEL  # a float model stays as it is
    assert derived.resolve(model, "f32") == derived.MODEL  # it already is F32
    assert derived.resolve(model, "f16") == "f16" and derived.label(model, "model") == "f32"
    with pytest.raises(UIOError, match="unknown weight format 'q3'"):
        derived.resolve(model, "q3")


def test_the_copy_is_written_once_and_a_damaged_one_is_written_again(f32_bundle, own_cache):
    source = f32_bundle / schema.MODEL_FILE
    said = []
    path = derived.weights_path(source, "f16", notice=said.append)
    assert path.parent == own_cache / "models" and len(said) == 1 and "F16" in said[0]
    assert derived.file_type(path) == derived.FILE_TYPES["f16"] and path.stat().st_size < source.stat().st_size
    assert derived.weights_path(source, "f16", notice=said.append) == path and len(said) == 1  # kept
    assert not list(path.parent.glob(".*"))  # no temporary left behind

    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # a flipped byte in the last tensor
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="damaged"):
        again = derived.weights_path(source, "f16", notice=said.append)
    assert again == path and len(said) == 2 and path.read_bytes()[-100] != data[-100]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        derived.weights_path(source, "f16", notice=said.append)  # intact again: no warning, no rewrite
    assert len(said) == 2

    path.with_name(path.name + ".sha256").unlink()  # an interrupted write leaves no record: not trusted
    with pytest.warns(UserWarning, match="damaged or incomplete"):
        derived.weights_path(source, "f16", notice=said.append)
    assert len(said) == 3


def test_the_encoder_on_f16_weights_makes_the_f32_memory_to_fp16_rounding(f32_bundle, own_cache, prose):
    """The encoder LoRA applies to the F16 copy: its memory is the F32 model's to fp16 rounding, and it
    is another memory file (its key names the format)."""
    from uio_gguf.memory.runtime import UIORuntime
    from uio_gguf.store import memory_file

    memories, keys = {}, {}
    for fmt in ("model", "f16"):
        with UIORuntime(f32_bundle, kv_type="f32", encoder_format=fmt) as rt:
            tokens = rt.model.tokenize(prose[:3000], add_special=False)[: 4 * SEGMENT]
            memories[fmt] = rt.compress(tokens)
            keys[fmt] = memory_file.locate(rt, tokens)[0]
            assert rt.encoder_weights == ("f32" if fmt == "model" else "f16")
            assert (rt.prefill_model is rt.model) == (fmt == "model")
            assert rt.encoder.adapter.model is rt.prefill_model
    exact, half = memories["model"], memories["f16"]
    for a, b in ((exact.k, half.k), (exact.v, half.v)):
        rel = np.abs(a - b).max() / np.abs(a).max()
        print(f"f16 encoder vs f32: max relative difference {rel:.2e}")
        assert 0 < rel < 5e-3, rel
    assert keys["model"] != keys["f16"]
    # the model's own weights keep the keys memory files had before formats
    assert keys["model"] == memory_file.memory_key(Bundle.open(f32_bundle), tokens, np.float32)


def test_a_runtime_refuses_an_unknown_format(f32_bundle):
    from uio_gguf.memory.runtime import UIORuntime

    with pytest.raises(UIOError, match="unknown weight format"):
        UIORuntime(f32_bundle, encoder_format="q3")


def test_compress_takes_the_encoder_format_and_keeps_a_memory_file_per_format(f32_bundle, cache_env, tmp_path, prose):
    from tests.helpers import run_cli

    book = tmp_path / "book.txt"
    book.write_text(prose[:4000])
    for fmt in ("f16", "model", "f16"):
        result = run_cli(
            "compress", str(book), "-m", str(f32_bundle), "--encoder-format", fmt, env=cache_env, check=True
        )
        assert ("copy of model.gguf" in result.stderr) == (fmt == "f16" and "cached" not in result.stdout)
    memory = [f for f in (tmp_path / "cache" / "memory").glob("*.npz") if not f.name.endswith(".start.npz")]
    assert len(memory) == 2  # one per format: the second f16 run read its own file
    assert "cached" in result.stdout
    bad = run_cli("compress", str(book), "-m", str(f32_bundle), "--encoder-format", "q3", env=cache_env)
    assert bad.returncode == 1 and "unknown weight format 'q3'" in bad.stderr
