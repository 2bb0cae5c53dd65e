"""The raw window (docs/design.md §6): chat keeps the last R tokens raw; when the raw part reaches R its
oldest segment is compressed into k slots right after the memory (before the recall), its raw cells go
and the later ones shift down (seq_rm + seq_add, K re-rotated at the next decode).

The tiny LLaMA bundle (segment 16, ratio 4, f32 cache) over real prose, so the only differences between
two ways of computing the same cache are float32 rounding."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import QUESTION, SEGMENT, SLOTS, assert_contiguous
from uio_gguf.llamacpp.sampling import SamplingParams
from uio_gguf.llamacpp.template import first_turn
from uio_gguf.memory.session import DECODER_SEQ, SCRATCH_SEQ


def _close(got: np.ndarray, expected: np.ndarray) -> None:
    err = np.abs(got - expected).max()
    assert err < 1e-4 * max(1.0, np.abs(expected).max()), err


def test_compressing_the_oldest_segment_equals_the_view_rebuilt(runtime, stream):
    """A raw window of 3 segments behind a recall: when it fills, its oldest segment becomes memory and
    the rest shift down. The next tokens' logits equal a fresh session given that layout: the memory
    (the new segment's compressed anew), the recall decoded at its new place, and the other raw cells as
    they were decoded, rotated to their new positions here in numpy."""
    from uio_gguf.native.bindings import kv_read, kv_write

    window = 3 * SEGMENT
    memory = runtime.compress(stream[: 4 * SEGMENT])
    recalled, raw, question = stream[200:220], stream[64 : 64 + window], stream[300:305]
    n_mem = 4 * SLOTS
    with runtime.new_session(n_ctx=256) as s:
        s.raw_window = window
        s.add_memory(memory)
        s.set_recall(recalled)
        s.feed(raw)  # reaches R: the oldest segment is compressed
        assert s.compressed_segments == 5 and s.raw == [int(t) for t in raw[SEGMENT:]]
        assert_contiguous(runtime, s)
        got = s.feed(question, all_logits=True)
        assert_contiguous(runtime, s)
    with runtime.new_session(n_ctx=256) as twin, runtime.new_session(n_ctx=256) as ref:
        twin.raw_window = window + SEGMENT  # the same cells, before the compression
        twin.add_memory(memory)
        twin.set_recall(recalled)
        twin.feed(raw)
        positions, k, v = kv_read(runtime.plugin, twin.ctx.ptr, twin.layout, DECODER_SEQ)
        raw_at = n_mem + len(recalled)
        # the recall moves up by k (the new slots), the raw cells after the oldest segment down by l - k
        shift = np.where(positions < raw_at, SLOTS, SLOTS - SEGMENT)
        kept = np.flatnonzero((positions >= n_mem) & ((positions < raw_at) | (positions >= raw_at + SEGMENT)))
        kept = kept[np.argsort(positions[kept])]
        ref.add_memory(memory)
        ref.add_memory(runtime.compress(raw[:SEGMENT]))
        k_moved = runtime.rope.rotate(k[:, kept], shift[kept])
        moved = positions[kept] + shift[kept]
        assert np.array_equal(moved, np.arange(n_mem + SLOTS, n_mem + SLOTS + len(recalled) + 2 * SEGMENT))
        kv_write(runtime.plugin, ref.ctx.ptr, ref.layout, DECODER_SEQ, SCRATCH_SEQ, moved, k_moved, v[:, kept])
        start = moved[-1] + 1
        n = len(question)
        ref.batch.fill(np.arange(start, start + n), [[DECODER_SEQ]] * n, [True] * n, [int(t) for t in question])
        ref.ctx.decode(ref.batch)
        expected = np.stack([ref.ctx.logits(i) for i in range(n)])
    _close(got, expected)


def test_a_raw_window_of_one_segment_is_the_training_view_bit_for_bit(runtime, stream):
    """R = l (asked for, or the default) is the exact training path: the same logits, bit for bit, and
    the same as eval ppl's uio column; a longer window gives different logits past the first segment."""
    from uio_gguf.evals.ppl import uio_logits

    tokens = np.asarray(stream[:100], dtype=np.int32)

    def run(raw_window):
        with runtime.new_session(n_ctx=256) as s:
            if raw_window:
                s.raw_window = raw_window
            return s.feed(tokens, all_logits=True), s.n_mem, len(s.raw)

    default, exact, longer = run(None), run(SEGMENT), run(3 * SEGMENT)
    assert np.array_equal(default[0], exact[0]) and default[1:] == exact[1:] == (6 * SLOTS, 4)
    assert np.array_equal(np.concatenate(list(uio_logits(runtime, tokens))), default[0])
    assert np.array_equal(np.concatenate(list(uio_logits(runtime, tokens, raw_window=SEGMENT))), default[0])
    assert longer[1:] == (4 * SLOTS, 36)  # 100 = 4 compressed + 36 raw (between R - l and R - 1)
    assert np.array_equal(longer[0][:SEGMENT], default[0][:SEGMENT])
    assert not np.allclose(longer[0][SEGMENT:], default[0][SEGMENT:], atol=1e-3)


def test_conversation_of_one_segment_window_is_the_old_chat_path(runtime, planted_book):
    """Conversation(raw_window=l, recall 0): memory of every full segment, the remainder, the question,
    greedy answer, as chat did before the raw window."""
    from uio_gguf.chat.conversation import Conversation

    params = SamplingParams(max_tokens=8)
    with Conversation(
        runtime, planted_book, n_ctx=2048, use_memory_files=False, recall_tokens=0, raw_window=SEGMENT
    ) as c:
        answer = "".join(c.ask(QUESTION, params))
        tokens = list(c.book_tokens)
        first = first_turn(c.template, QUESTION)[1]
    n_full = len(tokens) // SEGMENT
    with runtime.new_session(2048) as s:
        s.add_memory(runtime.compress(tokens))
        s.feed(tokens[n_full * SEGMENT :])
        s.feed(runtime.model.tokenize(first, add_special=False))
        assert "".join(s.generate(params)) == answer


def test_conversation_keeps_the_books_tail_raw_and_recalls_only_the_memory(runtime, planted_book):
    from uio_gguf.chat.conversation import Conversation
    from uio_gguf.memory.runtime import ANSWER_RESERVE

    window = 5 * SEGMENT
    with Conversation(
        runtime, planted_book, n_ctx=2048, use_memory_files=False, recall_tokens=40, raw_window=window
    ) as c:
        s, n = c.session, len(c.book_tokens)
        assert s.raw_window == window and window - SEGMENT <= len(s.raw) < window
        assert s.raw == [int(t) for t in c.book_tokens[s.compressed_segments * SEGMENT :]]
        assert s.n_mem == (n - len(s.raw)) // SEGMENT * SLOTS
        assert c.recall.spans[-1].end == s.compressed_segments * SEGMENT  # the raw tail is not recalled
    # a window the book's memory leaves no room for shrinks to whole segments that fit (one at the least)
    with Conversation(
        runtime, planted_book, n_ctx=1400, use_memory_files=False, recall_tokens=40, raw_window=4096
    ) as c:
        memory = len(c.book_tokens) // SEGMENT * SLOTS
        n_ctx = c.session.ctx.n_ctx  # llama.cpp pads the 1400 asked for
        assert c.session.raw_window == (n_ctx - memory - 40 - ANSWER_RESERVE) // SEGMENT * SEGMENT >= SEGMENT


def test_recall_stays_contiguous_with_a_longer_raw_window(runtime, planted_book):
    """Three turns whose questions and answers fill the raw window past R: segments are compressed out of
    it while a recall is in place, recalls are replaced, and the cache stays [memory][raw][recall][raw],
    contiguous, with fewer than R raw tokens."""
    from uio_gguf.chat.conversation import Conversation

    window = 3 * SEGMENT
    params = SamplingParams(max_tokens=24)
    with Conversation(
        runtime, planted_book, n_ctx=2048, use_memory_files=False, recall_tokens=40, raw_window=window
    ) as c:
        s = c.session
        before = s.compressed_segments
        for question in (QUESTION, "Which module reads the archive?", "And the code?"):
            "".join(c.ask(question, params))
            assert 0 < len(s.recall) <= 40 and len(s.raw) < window
            assert s.n_past == s.n_mem + len(s.recall) + len(s.raw)
            assert_contiguous(runtime, s)
        assert s.compressed_segments > before + 1


def test_a_raw_window_shorter_than_a_segment_is_refused(runtime):
    from uio_gguf.chat.conversation import Conversation
    from uio_gguf.errors import UIOError

    with pytest.raises(UIOError, match="at least one segment"):
        Conversation(runtime, "text", use_memory_files=False, raw_window=SEGMENT - 1)
    with runtime.new_session(n_ctx=256) as s, pytest.raises(UIOError, match="at least one segment"):
        s.raw_window = SEGMENT - 1


def test_dry_reaches_llamas_sampler(runtime, stream):
    """llama.cpp's DRY sampler (chat's --dry) keeps greedy decoding from repeating a sequence of its own
    answer, where the plain greedy answer of this tiny random model loops."""
    from collections import Counter

    def answer(dry: float) -> list[int]:
        with runtime.new_session(n_ctx=512) as s:
            s.feed(stream[:40])
            text = "".join(s.generate(SamplingParams(max_tokens=40, dry_multiplier=dry)))
            return runtime.model.tokenize(text, add_special=False).tolist()

    def most_repeated_4gram(tokens: list[int]) -> int:
        return max(Counter(tuple(tokens[i : i + 4]) for i in range(len(tokens) - 3)).values())

    plain, dry = answer(0.0), answer(100.0)
    counts = most_repeated_4gram(plain), most_repeated_4gram(dry)
    assert counts[0] >= 3 > counts[1], (counts, plain, dry)  # a loop (a 4-gram 3 times); DRY breaks it


def test_the_default_memory_window_is_whole_segments_and_yields_to_attention_ranking(runtime, planted_book):
    """Chat's default memory window is DEFAULT_MEMORY_WINDOW cut to whole segments; 0 asks for every segment's
    memory; recall ranked by attention gets every segment's by default and refuses an explicit window."""
    from uio_gguf.chat.conversation import DEFAULT_MEMORY_WINDOW, Conversation, resolve_memory_window
    from uio_gguf.errors import UIOError

    assert resolve_memory_window(None, 16) == DEFAULT_MEMORY_WINDOW and resolve_memory_window(None, 12) == 1020
    assert resolve_memory_window(0, 16) is None and resolve_memory_window(None, 16, by_attention=True) is None
    assert resolve_memory_window(64, 16) == 64
    with pytest.raises(UIOError, match="takes no memory window"):
        resolve_memory_window(64, 16, by_attention=True)
    with pytest.raises(UIOError, match="0 .* or more cells"):
        resolve_memory_window(-1, 16)
    with Conversation(runtime, planted_book, n_ctx=2048, recall_tokens=0) as chat:
        assert chat.session.memory_window == DEFAULT_MEMORY_WINDOW
    with Conversation(runtime, planted_book, n_ctx=2048, recall_tokens=0, memory_window=0) as whole:
        assert whole.session.memory_window is None
