"""Start states (uio_gguf.store.start_state): a book opened again restores the cache its first opening built
(memory cells and raw remainder) from one file, cell for cell, and a damaged file is rebuilt."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import QUESTION
from uio_gguf.llamacpp.sampling import SamplingParams
from uio_gguf.memory.session import DECODER_SEQ


def _open(runtime, book):
    from uio_gguf.chat.conversation import Conversation
    from uio_gguf.native.bindings import kv_read

    with Conversation(runtime, book, n_ctx=2048, recall_tokens=48) as chat:
        s = chat.session
        positions, k, v = kv_read(runtime.plugin, s.ctx.ptr, s.layout, DECODER_SEQ)
        order = np.argsort(positions)
        cells = (positions[order], k[:, order], v[:, order])
        state = (s.n_mem, s.compressed_segments, list(s.raw), s.tokens_seen)
        answer = "".join(chat.ask(QUESTION, SamplingParams(max_tokens=8)))
        return chat.stats, cells, state, answer, chat.memory_path


def test_a_reopened_book_restores_its_start_cache_cell_for_cell(runtime, planted_book, monkeypatch, tmp_path):
    monkeypatch.setenv("UIO_GGUF_CACHE", str(tmp_path))
    first = _open(runtime, planted_book)
    again = _open(runtime, planted_book)
    assert not first[0].from_file and not first[0].from_start_state
    assert again[0].from_file and again[0].from_start_state
    for a, b in zip(first[1], again[1]):
        assert np.array_equal(a, b)
    assert first[2] == again[2] and first[2][0] > 0 and first[2][2]  # memory and a raw remainder
    assert first[3] == again[3]
    # another raw window is another cache: not restored from this file
    from uio_gguf.chat.conversation import Conversation

    with Conversation(runtime, planted_book, n_ctx=2048, recall_tokens=48, raw_window=8 * 16) as other:
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
