"""The native plugin on the real embedded SmolLM2-135M GGUF, through llama_cpp's low-level API:
state-format probe, KV writes and reads, activation capture checked against numpy, and memory that the
model actually attends to."""

from __future__ import annotations

import ctypes
import struct
from contextlib import contextmanager

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")
llama_cpp_logger = pytest.importorskip("llama_cpp._logger")
llama_cpp_logger.set_verbose(False)  # llama.cpp's per-context log lines drown a failure report

from uio_gguf.errors import UIOError  # noqa: E402
from uio_gguf.llamacpp.api import model_params  # noqa: E402
from uio_gguf.native import bindings  # noqa: E402
from uio_gguf.native.build import load_plugin  # noqa: E402

pytestmark = pytest.mark.slow

F32, F16 = llama_cpp.GGML_TYPE_F32, llama_cpp.GGML_TYPE_F16
N_LAYER, N_EMBD, N_HEAD_KV, HEAD_DIM = 30, 576, 3, 64
DK = DV = N_HEAD_KV * HEAD_DIM
SCRATCH = 3
TEXT = b"The quick brown fox jumps over the lazy dog while the cat sleeps."


@pytest.fixture(scope="module")
def model(embedded_gguf):
    llama_cpp.llama_backend_init()
    params = model_params()
    loaded = llama_cpp.llama_model_load_from_file(str(embedded_gguf).encode(), params)
    assert loaded, "cannot load the embedded model"
    yield loaded
    llama_cpp.llama_model_free(loaded)


@pytest.fixture(scope="module")
def tokens(model) -> list[int]:
    vocab = llama_cpp.llama_model_get_vocab(model)
    out = (llama_cpp.llama_token * 64)()
    n = llama_cpp.llama_tokenize(vocab, TEXT, len(TEXT), out, 64, False, False)
    assert n > 8
    return list(out[:n])


@contextmanager
def context(model, cache_type=F32, flash=False, capture=None, unified=True, n_seq_max=4, n_ubatch=64):
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = 256
    params.n_batch, params.n_ubatch = 64, n_ubatch
    params.n_seq_max = n_seq_max
    params.kv_unified = unified
    params.type_k = params.type_v = cache_type
    params.flash_attn_type = (
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    params.n_threads = params.n_threads_batch = 2
    if capture is not None:
        bindings.set_capture_callback(params, capture)
    ctx = llama_cpp.llama_init_from_model(model, params)
    assert ctx, "cannot create a llama.cpp context"
    try:
        yield ctx
    finally:
        llama_cpp.llama_free(ctx)


def decode(ctx, tokens, positions, seq=0) -> np.ndarray:
    """Decodes tokens at positions into seq; returns the logits of the last one."""
    batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
    try:
        batch.n_tokens = len(tokens)
        for i, (token, pos) in enumerate(zip(tokens, positions)):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = i == len(tokens) - 1
        assert llama_cpp.llama_decode(ctx, batch) == 0
    finally:
        llama_cpp.llama_batch_free(batch)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llama_cpp.llama_get_model(ctx)))
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).copy()


def seq_state(ctx, seq) -> bytes:
    size = llama_cpp.llama_state_seq_get_size(ctx, seq)
    buffer = (ctypes.c_uint8 * size)()
    assert llama_cpp.llama_state_seq_get_data(ctx, buffer, size, seq) == size
    return bytes(buffer)


def pos_range(ctx, seq) -> tuple[int, int]:
    mem = llama_cpp.llama_get_memory(ctx)
    return llama_cpp.llama_memory_seq_pos_min(mem, seq), llama_cpp.llama_memory_seq_pos_max(mem, seq)


def parse_state_py(blob: bytes):
    """An independent reader of the f32/f16 state blob: (positions, K (L, n, dk), V (L, n, dv)) as float32."""
    offset = 0

    def take(fmt):
        nonlocal offset
        values = struct.unpack_from("<" + fmt, blob, offset)
        offset += struct.calcsize("<" + fmt)
        return values

    def floats(type_id, count):
        nonlocal offset
        dtype = {F32: np.float32, F16: np.float16}[type_id]
        array = np.frombuffer(blob, dtype=dtype, count=count, offset=offset).astype(np.float32)
        offset += count * np.dtype(dtype).itemsize
        return array

    magic, seq, n_stream, n_cells = take("IiII")
    assert (magic, n_stream) == (0xAF143CD8, 1)
    positions = [take("iIi")[0] for _ in range(n_cells)]
    v_trans, n_layer = take("II")
    ks, vs = [], []
    for _ in range(n_layer):
        k_type, row_bytes = take("iQ")
        ks.append(floats(k_type, n_cells * DK).reshape(n_cells, DK))
    for _ in range(n_layer):
        if v_trans:
            v_type, _, width = take("iII")
            vs.append(floats(v_type, n_cells * width).reshape(width, n_cells).T)
        else:
            v_type, row_bytes = take("iQ")
            vs.append(floats(v_type, n_cells * DV).reshape(n_cells, DV))
    assert offset == len(blob)
    return np.array(positions), np.stack(ks), np.stack(vs)


def by_position(positions, k, v):
    order = np.argsort(positions)
    return positions[order], k[:, order], v[:, order]


# --- probe -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cache_type", [F32, F16])
@pytest.mark.parametrize("flash", [True, False])
def test_probe_learns_the_layout(model, cache_type, flash):
    with context(model, cache_type, flash) as ctx:
        layout = bindings.probe(ctx, SCRATCH)
        assert (layout.n_layer, layout.n_embd_k_gqa, layout.n_embd_v_gqa) == (N_LAYER, DK, DV)
        assert layout.v_trans == (0 if flash else 1)
        assert layout.k_types == layout.v_types == [cache_type] * N_LAYER
        assert pos_range(ctx, SCRATCH) == (-1, -1), "the probe must leave the scratch sequence empty"


def test_probe_needs_a_unified_cache(model):
    with context(model, unified=False) as ctx:
        with pytest.raises(UIOError, match="kv_unified"):
            bindings.probe(ctx, SCRATCH)


def test_probe_refuses_a_busy_scratch_sequence(model, tokens):
    with context(model) as ctx:
        decode(ctx, tokens[:2], [0, 1], seq=SCRATCH)
        with pytest.raises(UIOError, match="not empty"):
            bindings.probe(ctx, SCRATCH)


# --- KV write / read -------------------------------------------------------------------------------


@pytest.mark.parametrize("cache_type,flash", [(F32, False), (F32, True), (F16, False), (F16, True)])
def test_kv_write_round_trip_keeps_other_cells(model, tokens, cache_type, flash):
    rng = np.random.default_rng(0)
    with context(model, cache_type, flash) as ctx:
        layout = bindings.probe(ctx, SCRATCH)
        decode(ctx, tokens[:3], [5, 6, 7])  # real cells of seq 0 that the write must keep
        before = parse_state_py(seq_state(ctx, 0))

        positions = np.arange(5, dtype=np.int32)
        k = rng.standard_normal((N_LAYER, 5, DK), dtype=np.float32)
        v = rng.standard_normal((N_LAYER, 5, DV), dtype=np.float32)
        bindings.kv_write(ctx, layout, 0, SCRATCH, positions, k, v)

        assert pos_range(ctx, 0) == (0, 7)
        assert pos_range(ctx, SCRATCH) == (-1, -1)
        got_pos, got_k, got_v = by_position(*parse_state_py(seq_state(ctx, 0)))
        assert list(got_pos) == list(range(8))
        expect_k, expect_v = (
            (k, v)
            if cache_type == F32
            else (k.astype(np.float16).astype(np.float32), v.astype(np.float16).astype(np.float32))
        )
        np.testing.assert_array_equal(got_k[:, :5], expect_k)
        np.testing.assert_array_equal(got_v[:, :5], expect_v)
        _, old_k, old_v = by_position(*before)
        np.testing.assert_array_equal(got_k[:, 5:], old_k)
        np.testing.assert_array_equal(got_v[:, 5:], old_v)

        # the plugin's own reader agrees with the independent one
        read_pos, read_k, read_v = by_position(*bindings.kv_read(ctx, layout, 0))
        np.testing.assert_array_equal(read_pos, got_pos)
        np.testing.assert_array_equal(read_k, got_k)
        np.testing.assert_array_equal(read_v, got_v)


def test_kv_write_quantizes_for_a_q8_0_cache(model):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    rng = np.random.default_rng(2)
    with context(model, llama_cpp.GGML_TYPE_Q8_0, flash=True) as ctx:  # a quantized V needs flash attention
        layout = bindings.probe(ctx, SCRATCH)
        assert layout.k_types == layout.v_types == [llama_cpp.GGML_TYPE_Q8_0] * N_LAYER
        k = rng.standard_normal((N_LAYER, 3, DK), dtype=np.float32)
        v = rng.standard_normal((N_LAYER, 3, DV), dtype=np.float32)
        bindings.kv_write(ctx, layout, 0, SCRATCH, [0, 1, 2], k, v)
        _, got_k, got_v = by_position(*bindings.kv_read(ctx, layout, 0))
    q8 = GGMLQuantizationType.Q8_0
    for got, sent in ((got_k, k), (got_v, v)):
        expect = dequantize(quantize(sent.reshape(-1, sent.shape[-1]), q8), q8).reshape(sent.shape)
        print(f"q8_0 cache vs gguf's q8_0 round trip: max abs difference {np.max(np.abs(got - expect)):.2e}")
        np.testing.assert_allclose(got, expect, atol=1e-6)


def test_kv_write_replaces_cells_at_the_same_positions(model, tokens):
    plugin = load_plugin()  # the runtime passes the library first: the same calls work that way too
    with context(model) as ctx:
        layout = bindings.probe(plugin, ctx, SCRATCH)
        decode(ctx, tokens[:4], [0, 1, 2, 3])
        k = np.full((N_LAYER, 2, DK), 7.0, dtype=np.float32)
        v = np.full((N_LAYER, 2, DV), -3.0, dtype=np.float32)
        bindings.kv_write(plugin, ctx, layout, 0, SCRATCH, [3, 1], k, v)
        positions, got_k, got_v = by_position(*bindings.kv_read(ctx, layout, 0))
        assert list(positions) == [0, 1, 2, 3]
        assert (got_k[:, [1, 3]] == 7.0).all() and (got_v[:, [1, 3]] == -3.0).all()
        assert not (got_k[:, [0, 2]] == 7.0).any()


def test_kv_write_rejects_bad_arguments(model):
    with context(model) as ctx:
        layout = bindings.probe(ctx, SCRATCH)
        k = np.zeros((N_LAYER, 2, DK), dtype=np.float32)
        v = np.zeros((N_LAYER, 2, DV), dtype=np.float32)
        with pytest.raises(UIOError, match="distinct"):
            bindings.kv_write(ctx, layout, 0, SCRATCH, [4, 4], k, v)
        with pytest.raises(UIOError, match="scratch"):
            bindings.kv_write(ctx, layout, 0, 0, [0, 1], k, v)
        with pytest.raises(UIOError, match="n_seq_max"):
            bindings.kv_write(ctx, layout, 0, 9, [0, 1], k, v)
        with pytest.raises(UIOError, match="do not fit"):
            bindings.kv_write(ctx, layout, 0, SCRATCH, [0, 1, 2], k, v)
        assert pos_range(ctx, 0) == (-1, -1)


# --- corrupted state -------------------------------------------------------------------------------


def test_parser_detects_a_changed_format(model, tokens):
    with context(model) as ctx:
        decode(ctx, tokens[:3], [0, 1, 2])
        blob = bytearray(seq_state(ctx, 0))
    layout, n_cells = bindings.parse_state(bytes(blob))
    assert (n_cells, layout.n_layer, layout.n_embd_k_gqa, layout.v_trans) == (3, N_LAYER, DK, 1)

    def corrupted(offset, fmt, value):
        bad = bytearray(blob)
        struct.pack_into("<" + fmt, bad, offset, value)
        return bytes(bad)

    cells_end = 16 + 3 * 12
    cases = {
        "magic": corrupted(0, "I", 0xDEADBEEF),
        "streams": corrupted(8, "I", 2),
        "lists 2 sequences": corrupted(16 + 4, "I", 2),
        "n_layer": corrupted(cells_end + 4, "I", 0),
        "layer 0": corrupted(cells_end + 4, "I", N_LAYER - 1),  # one layer less: V headers misread
        "left after": bytes(blob) + bytes(4),
        "layer 1 K row of 100 bytes": corrupted(cells_end + 8 + (12 + 3 * DK * 4) + 4, "Q", 100),
        "truncated": bytes(blob[:-10]),
    }
    for reason, bad in cases.items():
        with pytest.raises(UIOError, match="state format differs") as error:
            bindings.parse_state(bad)
        assert reason in str(error.value), str(error.value)


# --- capture -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_weights(embedded_gguf):
    """(tensors by name, scalar(key)) of the embedded GGUF, read with the gguf package."""
    import gguf

    reader = gguf.GGUFReader(str(embedded_gguf))
    fields = {name: field for name, field in reader.fields.items()}
    tensors = {tensor.name: tensor for tensor in reader.tensors}

    def scalar(key):
        field = fields[key]
        return field.parts[field.data[0]][0]

    return tensors, scalar


def embedding_rows(tensors, token_ids):
    from gguf.quants import dequantize

    tensor = tensors["token_embd.weight"]
    return dequantize(tensor.data[token_ids], tensor.tensor_type).astype(np.float64)


def rope_norm(x, positions, base):
    """llama.cpp's NORM RoPE (adjacent pairs) of x [n, n_head, head_dim] at positions."""
    half = x.shape[-1] // 2
    freqs = base ** (-np.arange(half, dtype=np.float64) * 2 / x.shape[-1])
    angle = np.asarray(positions, dtype=np.float64)[:, None, None] * freqs
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * np.cos(angle) - odd * np.sin(angle)
    out[..., 1::2] = even * np.sin(angle) + odd * np.cos(angle)
    return out


def relative_error(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module", params=[False, True], ids=["flash-off", "flash-on"])
def captured(request, model, tokens):
    """One armed decode of 6 tokens at positions 2..7 into an f32 cache, and what the cache stored."""
    capture = bindings.Capture(N_LAYER, N_EMBD, DK, DV, 16)
    positions = list(range(2, 8))
    with context(model, F32, flash=request.param, capture=capture) as ctx:
        layout = bindings.probe(ctx, SCRATCH)
        capture.arm(6)
        decode(ctx, tokens[:6], positions)
        capture.disarm()
        capture.check()
        stored = by_position(*bindings.kv_read(ctx, layout, 0))
        rows = {(kind, layer): capture.rows(kind, layer) for kind in bindings.CaptureKind for layer in range(N_LAYER)}
    yield rows, positions, stored
    capture.close()


def test_capture_attn_norm_matches_numpy(captured, tokens, gguf_weights):
    rows, _, _ = captured
    tensors, scalar = gguf_weights
    x = embedding_rows(tensors, tokens[:6])
    eps = float(scalar("llama.attention.layer_norm_rms_epsilon"))
    expect = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * tensors["blk.0.attn_norm.weight"].data
    error = relative_error(rows[(0, 0)], expect)
    print(f"attn_norm-0 max relative error {error:.2e}")
    assert error < 1e-4


@pytest.mark.parametrize("layer", [0, 17, N_LAYER - 1])
def test_cache_holds_rope_of_captured_kcur_and_the_captured_vcur(captured, gguf_weights, layer):
    rows, positions, (stored_pos, stored_k, stored_v) = captured
    _, scalar = gguf_weights
    assert list(stored_pos) == positions
    kcur = rows[(1, layer)].reshape(6, N_HEAD_KV, HEAD_DIM).astype(np.float64)
    expect = rope_norm(kcur, positions, float(scalar("llama.rope.freq_base"))).reshape(6, DK)
    error = relative_error(stored_k[layer], expect)
    print(f"layer {layer}: cache K vs RoPE(Kcur) max relative error {error:.2e}")
    assert error < 1e-4
    np.testing.assert_array_equal(stored_v[layer], rows[(2, layer)])


def test_capture_reports_a_row_count_mismatch(model, tokens):
    capture = bindings.Capture(N_LAYER, N_EMBD, DK, DV, 8)
    with context(model, capture=capture) as ctx:
        capture.arm(3)
        decode(ctx, tokens[:4], range(4))
        assert capture.status() < 0 and "4 rows" in capture.error_message()
        capture.disarm()
        decode(ctx, tokens[4:5], [4])  # disarmed: nothing asked, nothing recorded
        assert "4 rows" in capture.error_message()
        capture.arm(1)
        assert capture.status() < 0 and "not seen" in capture.error_message()  # armed but no decode yet
        decode(ctx, tokens[5:6], [5])
        capture.check()
    capture.close()


def test_capture_reports_a_split_batch(model, tokens):
    capture = bindings.Capture(load_plugin(), N_LAYER, N_EMBD, DK, DV, 8)
    with context(model, capture=capture, n_ubatch=2) as ctx:
        capture.arm(4)
        decode(ctx, tokens[:4], range(4))
        with pytest.raises(UIOError, match="n_ubatch"):
            capture.check()
    capture.close()


# The capture's strided and non-float32 paths do not occur in SmolLM2's graph (its Kcur/Vcur rows are
# dense float32), but fused-QKV models hand over padded views: this harness feeds the callback such
# nodes directly, on CPU buffers, through the same static code.
CAPTURE_HARNESS = r"""
#include "uio_plugin.c"
#include "ggml-alloc.h"

static int check(uio_capture * cap, int kind, int layer, const float * expect, int n) {
    const float * got = uio_capture_rows(cap, kind, layer);
    for (int i = 0; i < n; i++) {
        if (got[i] != expect[i]) { printf("mismatch at %d: %f != %f\n", i, got[i], expect[i]); return 0; }
    }
    return 1;
}

int main(void) {
    struct ggml_init_params params = {1 << 20, NULL, true};
    struct ggml_context * g = ggml_init(params);
    /* K: 3 heads of 4 values, padded to 6, for 5 tokens; a view drops the padding */
    struct ggml_tensor * padded = ggml_new_tensor_3d(g, GGML_TYPE_F32, 6, 3, 5);
    struct ggml_tensor * half = ggml_new_tensor_2d(g, GGML_TYPE_F16, 8, 5);
    ggml_backend_alloc_ctx_tensors_from_buft(g, ggml_backend_cpu_buffer_type());
    float host[90], expect_k[60], expect_norm[40];
    ggml_fp16_t host16[40];
    for (int i = 0; i < 90; i++) host[i] = (float) i;
    for (int i = 0; i < 40; i++) { expect_norm[i] = 0.5f * i; host16[i] = ggml_fp32_to_fp16(expect_norm[i]); }
    for (int t = 0; t < 5; t++) for (int h = 0; h < 3; h++) for (int e = 0; e < 4; e++) expect_k[t * 12 + h * 4 + e] = host[t * 18 + h * 6 + e];
    ggml_backend_tensor_set(padded, host, 0, sizeof(host));
    ggml_backend_tensor_set(half, host16, 0, sizeof(host16));
    struct ggml_tensor * view = ggml_view_3d(g, padded, 4, 3, 5, padded->nb[1], padded->nb[2], 0);
    ggml_backend_view_init(view);
    ggml_set_name(view, "Kcur-1");
    ggml_set_name(half, "attn_norm-0");

    uio_capture * cap = uio_capture_new(2, 8, 12, 12, 8);
    uio_capture_arm(cap, 5);
    if (!uio_capture_eval_cb(view, true, cap) || !uio_capture_eval_cb(half, true, cap)) { printf("not asked\n"); return 1; }
    uio_capture_eval_cb(view, false, cap);
    uio_capture_eval_cb(half, false, cap);
    if (cap->status != UIO_OK) { printf("error: %s\n", cap->message); return 1; }
    if (!check(cap, 1, 1, expect_k, 60) || !check(cap, 0, 0, expect_norm, 40)) return 1;
    printf("ok\n");
    return 0;
}
"""


def test_capture_reads_strided_and_half_precision_nodes(tmp_path):
    import subprocess

    from uio_gguf.native import build

    source = tmp_path / "harness.c"
    source.write_text(CAPTURE_HARNESS)
    include, lib = build.llama_cpp_paths()
    exe = tmp_path / "harness"
    command = [
        build.find_compiler(),
        "-O1",
        "-std=c11",
        f"-I{include}",
        f"-I{build.HERE}",
        str(source),
        "-o",
        str(exe),
        f"-L{lib}",
        "-lllama",
        "-lggml-base",
        f"-Wl,-rpath,{lib}",
    ]
    subprocess.run(command, check=True, capture_output=True)
    result = subprocess.run([str(exe)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr


# --- memory the model attends to ------------------------------------------------------------------


def test_written_memory_is_attended_and_reproduces_the_cache(model, tokens):
    prefix, last = tokens[:5], tokens[5]
    with context(model, F32) as ctx:
        layout = bindings.probe(ctx, SCRATCH)
        decode(ctx, prefix, range(5))
        reference = decode(ctx, [last], [5])
        positions, k, v = bindings.kv_read(ctx, layout, 0)
        keep = positions < 5
        positions, k, v = positions[keep], k[:, keep], v[:, keep]
    with context(model, F32) as ctx:
        without_memory = decode(ctx, [last], [5])
    with context(model, F32) as ctx:
        bindings.kv_write(ctx, layout, 0, SCRATCH, positions, k, v)
        with_memory = decode(ctx, [last], [5])
    with context(model, F32) as ctx:
        rng = np.random.default_rng(1)
        bindings.kv_write(ctx, layout, 0, SCRATCH, positions, rng.standard_normal(k.shape, dtype=np.float32), v)
        with_random_memory = decode(ctx, [last], [5])
    error = float(np.max(np.abs(with_memory - reference)))
    print(
        f"logits with the cache's own K/V written back: max abs error {error:.2e}; "
        f"without memory: {np.max(np.abs(without_memory - reference)):.2f}, random K: {np.max(np.abs(with_random_memory - reference)):.2f}"
    )
    assert error < 1e-3
    assert np.max(np.abs(without_memory - reference)) > 0.5
    assert np.max(np.abs(with_random_memory - reference)) > 0.5


# --- build ----------------------------------------------------------------------------------------


def test_build_reports_a_missing_compiler(monkeypatch, tmp_path):
    from uio_gguf.native import build

    monkeypatch.setenv("UIO_GGUF_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(UIOError, match="no C compiler found"):
        build.build()


def test_build_reports_the_first_compiler_error(monkeypatch, tmp_path):
    from uio_gguf.native import build

    broken = tmp_path / "broken.c"
    broken.write_text("int main(void) { return undefined_name; }\n")
    monkeypatch.setenv("UIO_GGUF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "SOURCES", (broken, build.SOURCES[1]))
    with pytest.raises(UIOError, match="undefined_name"):
        build.build()
    assert not list((tmp_path / "cache").rglob("*.so")), "a failed build must leave no library behind"
