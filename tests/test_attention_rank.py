"""Recall ranked by the question's attention over the memory (uio_gguf.memory.attention_rank, docs/design.md §6).

The pieces are checked against what llama.cpp itself computed: keys made from the captured attention
inputs with the model's W_k and RoPE equal the cells llama.cpp wrote for the same tokens, and the
segment scores equal a per-head softmax over the memory's K as read back from the cache (un-rotated:
the ranking compares queries and keys by content, before RoPE). Tiny LLaMA
bundle (segment 16, ratio 4, f32 cache) over real prose."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import QUESTION, SEGMENT, SLOTS
from uio_gguf.llamacpp.sampling import SamplingParams
from uio_gguf.llamacpp.template import first_turn
from uio_gguf.memory.session import DECODER_SEQ


def _captured_inputs(session, tokens) -> tuple[np.ndarray, np.ndarray]:
    """Decodes tokens right after the conversation with the capture armed: (attention inputs
    (n_layer, T, n_embd), positions). The cells stay."""
    from uio_gguf.native.bindings import CaptureKind

    tokens = [int(t) for t in tokens]
    n, at = len(tokens), session.n_past
    positions = np.arange(at, at + n)
    session.batch.fill(positions, [[DECODER_SEQ]] * n, [i == n - 1 for i in range(n)], tokens)
    session._capture.decode(session.ctx, session.batch, n)
    return session._capture.layers(CaptureKind.ATTN_NORM), positions


def _reference_scores(queries, keys, n_head_kv, head_dim, slots) -> np.ndarray:
    """segment_scores the slow way: one softmax per layer, head and token, in float64."""
    n_layer, n_tok, width = queries.shape
    n_head = width // head_dim
    n_seg = keys.shape[1] // slots
    total = np.zeros(n_seg)
    for layer in range(n_layer):
        for head in range(n_head):
            kv = head // (n_head // n_head_kv)
            k = keys[layer][:, kv * head_dim : (kv + 1) * head_dim].astype(np.float64)
            for t in range(n_tok):
                q = queries[layer, t, head * head_dim : (head + 1) * head_dim].astype(np.float64)
                logits = k @ q / np.sqrt(head_dim)
                w = np.exp(logits - logits.max())
                w /= w.sum()
                total += w.reshape(n_seg, slots).sum(1)
    return total / (n_layer * n_head * n_tok)


def test_projected_keys_equal_the_cells_llama_cpp_wrote(runtime, stream):
    """Captured attention inputs x W_k (dequantized by gguf-py) rotated by our RoPE = the K llama.cpp
    cached for those tokens: the capture, the weight layout and the rotation are the model's own, so
    the queries made the same way with W_q are too."""
    from uio_gguf.memory.attention_rank import Projection
    from uio_gguf.native.bindings import kv_read

    with runtime.new_session(n_ctx=256, query_rows=16) as s:
        s.add_memory(runtime.compress(stream[: 4 * SEGMENT]))
        h, positions = _captured_inputs(s, stream[64:74])
        keys = Projection(runtime.bundle.model_path, runtime.model.n_layer, runtime.rope, "attn_k")(h, positions)
        cached_positions, k, _ = kv_read(runtime.plugin, s.ctx.ptr, s.layout, DECODER_SEQ)
    order = np.argsort(cached_positions)
    cells = order[np.isin(cached_positions[order], positions)]
    expected = k[:, cells]
    err = np.abs(keys - expected).max()
    assert expected.shape == keys.shape and err < 1e-4 * max(1.0, np.abs(expected).max()), err


def test_segment_scores_are_the_per_head_softmax_over_the_memory():
    from uio_gguf.memory.attention_rank import segment_scores

    rng = np.random.default_rng(0)
    n_layer, n_tok, n_head, n_kv, hd, slots, n_seg = 2, 3, 6, 2, 8, 4, 5
    queries = rng.normal(size=(n_layer, n_tok, n_head * hd)).astype(np.float32) * 2
    keys = rng.normal(size=(n_layer, n_seg * slots, n_kv * hd)).astype(np.float32)
    got = segment_scores(queries, keys, n_kv, hd, slots)
    expected = _reference_scores(queries, keys, n_kv, hd, slots)
    assert np.allclose(got, expected, rtol=1e-5, atol=1e-7) and abs(got.sum() - 1) < 1e-6


def test_question_attention_ranks_recall_and_leaves_the_cache_as_it_was(runtime, prose):
    """Session.memory_attention equals the reference scores of the same question over the memory's K as
    the cache holds it (turned back to before RoPE); the conversation recalls the segments those scores rank best, and its cache
    stays [memory][recall][raw] at contiguous positions over two questions."""
    from uio_gguf.chat.conversation import Conversation
    from uio_gguf.native.bindings import kv_read

    budget = 2 * SEGMENT + 8
    with Conversation(
        runtime, prose[:3000], n_ctx=2048, use_memory_files=False, recall_tokens=budget, recall_ranking="attention"
    ) as chat:
        s = chat.session
        delta = first_turn(chat.template, QUESTION)[1]
        tokens = runtime.model.tokenize(delta, add_special=False)
        n_past = s.n_past
        scores = s.memory_attention(tokens, runtime.query_projection())
        assert s.n_past == n_past and s.ctx.seq_pos_max(DECODER_SEQ) == n_past - 1  # the probe's cells are gone
        # the memory's K read back from the cache and turned back by its positions: K before RoPE
        cached_positions, k, _ = kv_read(runtime.plugin, s.ctx.ptr, s.layout, DECODER_SEQ)
        cells = np.argsort(cached_positions)[: s.n_mem]
        memory_keys = runtime.rope.rotate(k[:, cells], -cached_positions[cells])
        h, _ = _captured_inputs(s, tokens)
        s.ctx.seq_rm(DECODER_SEQ, n_past, -1)
        queries = runtime.query_projection()(h)  # compared by content: no RoPE on either side
        m = runtime.model
        expected = _reference_scores(queries, memory_keys, m.n_head_kv, m.head_dim, SLOTS)
        assert scores.shape == (s.compressed_segments,)
        assert np.allclose(scores, expected, rtol=1e-3, atol=1e-6), np.abs(scores - expected).max()

        "".join(chat.ask(QUESTION, SamplingParams(max_tokens=2)))
        recalled = chat.recall.tokens_for(chat.recall.segment_spans(scores, budget))
        assert 0 < len(recalled) <= budget and s.recall == [int(t) for t in recalled]
        "".join(chat.ask("And which module reads it?", SamplingParams(max_tokens=2)))
        assert 0 < len(s.recall) <= budget and s.n_past == s.n_mem + len(s.recall) + len(s.raw)
        assert np.array_equal(
            np.sort(kv_read(runtime.plugin, s.ctx.ptr, s.layout, DECODER_SEQ)[0]), np.arange(s.n_past)
        )


def test_a_conversation_reopened_from_its_start_state_ranks_the_same(runtime, prose, tmp_path, monkeypatch):
    """A start state holds no K to score against; the memory file gives it, so the reopened book recalls
    what the first opening did."""
    from uio_gguf.chat.conversation import Conversation

    monkeypatch.setenv("UIO_GGUF_CACHE", str(tmp_path / "cache"))
    book = prose[:3000]
    recalls = []
    for _ in range(2):
        with Conversation(runtime, book, n_ctx=2048, recall_tokens=40, recall_ranking="attention") as chat:
            "".join(chat.ask(QUESTION, SamplingParams(max_tokens=2)))
            recalls.append((chat.stats.from_start_state, list(chat.session.recall)))
    assert recalls[0][0] is False and recalls[1][0] is True
    assert recalls[0][1] and recalls[0][1] == recalls[1][1]


def test_unknown_ranking_is_refused(runtime):
    from uio_gguf.chat.conversation import Conversation
    from uio_gguf.errors import UIOError

    with pytest.raises(UIOError, match="recall ranking"):
        Conversation(runtime, "text", use_memory_files=False, recall_ranking="tf-idf")
