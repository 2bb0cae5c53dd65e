"""Start states (uio_gguf.store.start_state): a book opened again restores the cache its first opening built
(memory cells and raw remainder) from one file, cell for cell, and a damaged file is rebuilt."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import QUESTION
from uio_gguf.llamacpp.sampling import SamplingParams
from uio_gguf.memory.session import DECODER_SEQ


def _cells(runtime, session):
    """(positions, K, V) of the conversation's cells, in position order."""
    from uio_gguf.native.bindings import kv_read

    positions, k, v = kv_read(runtime.plugin, session.ctx.ptr, session.layout, DECODER_SEQ)
    order = np.argsort(positions)
    return positions[order], k[:, order], v[:, order]


def _open(runtime, book, keep=0):
    from uio_gguf.chat.conversation import Conversation

    with Conversation(runtime, book, n_ctx=2048, recall_tokens=48, keep=keep) as chat:
        s = chat.session
        cells = _cells(runtime, s)
        state = (s.n_mem, s.compressed_segments, list(s.raw), s.tokens_seen, list(s.sink))
        answer = "".join(chat.ask(QUESTION, SamplingParams(max_tokens=8)))
        return chat.stats, cells, state, answer, chat.memory_path


@pytest.mark.parametrize("keep", [0, 4])
def test_a_reopened_book_restores_its_start_cache_cell_for_cell(runtime, planted_book, monkeypatch, tmp_path, keep):
    monkeypatch.setenv("UIO_GGUF_CACHE", str(tmp_path))
    first = _open(runtime, planted_book, keep)
    again = _open(runtime, planted_book, keep)
    assert not first[0].from_file and not first[0].from_start_state
    assert again[0].from_file and again[0].from_start_state
    for a, b in zip(first[1], again[1]):
        assert np.array_equal(a, b)
    assert first[2] == again[2] and first[2][0] > 0 and first[2][2]  # memory and a raw remainder
    assert first[3] == again[3]
    assert len(first[2][4]) == keep and again[1][0][0] == 0  # the kept tokens, at positions 0..
    # another number of kept tokens is another cache
    assert not _open(runtime, planted_book, 4 - keep)[0].from_start_state
    # another raw window is another cache: not restored from this file
    from uio_gguf.chat.conversation import Conversation

    with Conversation(runtime, planted_book, n_ctx=2048, recall_tokens=48, raw_window=runtime.segment) as other:
        assert other.stats.from_file and not other.stats.from_start_state


def test_a_damaged_start_state_is_rebuilt(runtime, planted_book, monkeypatch, tmp_path):
    monkeypatch.setenv("UIO_GGUF_CACHE", str(tmp_path))
    first = _open(runtime, planted_book)
    (state_file,) = first[4].parent.glob("*.start.npz")
    state_file.write_bytes(state_file.read_bytes()[:-100])  # truncated
    with pytest.warns(UserWarning, match="start state .* is damaged"):
        again = _open(runtime, planted_book)
    assert again[0].from_file and not again[0].from_start_state
    assert again[3] == first[3]
    assert _open(runtime, planted_book)[0].from_start_state  # written again whole


def test_a_start_state_with_one_byte_changed_is_rebuilt(runtime, planted_book, monkeypatch, tmp_path):
    """The zip's CRC-32 is the state's only checksum: one bit changed in the middle of the saved cells (a
    length and a zip that are still whole) must be caught, not restored."""
    monkeypatch.setenv("UIO_GGUF_CACHE", str(tmp_path))
    first = _open(runtime, planted_book)
    (state_file,) = first[4].parent.glob("*.start.npz")
    data = bytearray(state_file.read_bytes())
    data[len(data) // 2] ^= 0x10
    state_file.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="start state .* is damaged .*CRC"):
        again = _open(runtime, planted_book)
    assert again[0].from_file and not again[0].from_start_state
    assert again[3] == first[3]


def test_kept_tokens_from_a_memory_file_are_the_cells_feed_leaves(runtime, planted_book, monkeypatch, tmp_path):
    """Conversation(keep=4) opens a book from its memory (keep_sink + add_memory + the remainder fed): the
    cache holds the same cells, at the same positions, as a session fed the whole document from its first
    token, which keeps them when it compresses the first segment (Session.keep, matched against PyTorch in
    test_eval_ppl)."""
    from uio_gguf.chat.conversation import Conversation

    monkeypatch.setenv("UIO_GGUF_CACHE", str(tmp_path))
    # the training view (R = one segment), which a session fed the document keeps too
    with Conversation(runtime, planted_book, n_ctx=2048, recall_tokens=0, keep=4, raw_window=runtime.segment) as chat:
        opened = _cells(runtime, chat.session)
        document, sink = chat.book_tokens, list(chat.session.sink)
    session = runtime.new_session(n_ctx=2048)
    try:
        session.keep = 4
        session.feed(document)
        fed = _cells(runtime, session)
        assert list(session.sink) == sink == [int(t) for t in document[:4]]
    finally:
        session.close()
    assert np.array_equal(opened[0], fed[0]) and len(opened[0]) > 4 + runtime.slots
    np.testing.assert_allclose(opened[1], fed[1], atol=1e-4)
    np.testing.assert_allclose(opened[2], fed[2], atol=1e-4)


def test_a_memory_window_holds_the_latest_segments_and_restores_them(runtime, planted_book, monkeypatch, tmp_path):
    """Conversation(memory_window=W): the decoder holds the memory of the book's latest W / slots segments
    right from position 0 (the cells of a session given those segments alone), the recall still finds the
    planted line whose memory the window left out, and a reopened book restores the same cells from its start
    state (another window is another state)."""
    from uio_gguf.chat.conversation import Conversation
    from uio_gguf.memory.encoder import SegmentMemory

    monkeypatch.setenv("UIO_GGUF_CACHE", str(tmp_path))
    seg, window = runtime.segment, 16 * runtime.slots

    def open_(memory_window):
        with Conversation(
            runtime, planted_book, n_ctx=2048, recall_tokens=48, memory_window=memory_window, raw_window=seg
        ) as chat:
            s = chat.session
            cells, state = _cells(runtime, s), (s.n_mem, s.compressed_segments, list(s.raw), s.tokens_seen)
            answer = "".join(chat.ask(QUESTION, SamplingParams(max_tokens=8)))
            recalled = [chat.book_tokens[span.start : span.end] for span in chat.recalled]
            return chat.stats, cells, state, answer, recalled, chat.book_tokens

    first, again = open_(window), open_(window)
    assert not first[0].from_start_state and again[0].from_start_state
    for a, b in zip(first[1], again[1]):
        assert np.array_equal(a, b)
    assert first[2:4] == again[2:4]
    n_mem, segments, raw, _ = first[2]
    assert n_mem == window and segments > 16  # the window left segments out
    book = first[5]

    def text(tokens) -> str:
        return b"".join(runtime.model.piece(int(t)) for t in tokens).decode("utf-8", "replace")

    assert "7419" in text(book[: (segments - 16) * seg])  # the planted line's memory is outside the window ...
    assert any("7419" in text(passage) for passage in first[4])  # ... and the recall brings it back
    memory = runtime.compress(book[: segments * seg])
    with runtime.new_session(n_ctx=2048) as ref:
        ref.raw_window = len(raw) + 1 if len(raw) >= seg else seg
        ref.add_memory(SegmentMemory(memory.k[-16:], memory.v[-16:]))
        ref.feed(book[segments * seg :])
        expected = _cells(runtime, ref)
    for a, b in zip(first[1], expected):
        assert a.shape == b.shape and np.allclose(a, b, atol=1e-5)
    assert not open_(window // 2)[0].from_start_state  # another window: another start state
