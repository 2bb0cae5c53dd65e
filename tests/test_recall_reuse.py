"""Recalled passages decoded once (uio_gguf/memory/recall_states.py): a later question that recalls the
same passages takes their saved cells, at the same start or moved by llama.cpp's position shift, and
asks the same as after a fresh decode. The tiny LLaMA bundle with an f32 cache (conftest's `runtime`)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import QUESTION, SEGMENT, assert_contiguous
from uio_gguf.llamacpp.sampling import SamplingParams
from uio_gguf.memory.recall_states import RecallStates


def _asked(runtime, memory, recalled, question, lead, extra=None):
    """(the question's logits, session counters) in a fresh session: memory (and `extra` memory after
    it, which moves the recall's start), the recall after `lead`, the question."""
    with runtime.new_session(n_ctx=256) as s:
        s.add_memory(memory)
        if extra is not None:
            s.add_memory(extra)
        s.set_recall(recalled, lead=lead)
        assert_contiguous(runtime, s)
        return s.feed(question), (s.recall_decoded, s.recall_reused)


@pytest.fixture()
def fresh_states(runtime):
    runtime.recall_states.clear()
    yield runtime.recall_states
    runtime.recall_states.clear()


def test_the_same_recall_at_the_same_start_is_not_decoded_again(runtime, stream, fresh_states):
    memory = runtime.compress(stream[: 4 * SEGMENT])
    recalled, question, lead = stream[200:240], stream[300:306], stream[:1]
    first, (decoded, reused) = _asked(runtime, memory, recalled, question, lead)
    assert (decoded, reused) == (len(recalled) + 1, 0) and len(fresh_states) == 1
    again, (decoded, reused) = _asked(runtime, memory, recalled, question, lead)
    assert (decoded, reused) == (0, len(recalled) + 1)
    np.testing.assert_array_equal(again, first)  # the very cells: bit-identical


def test_a_recall_moved_to_a_later_start_equals_a_fresh_decode(runtime, stream, fresh_states):
    """Decoded at 4·k, reused at 6·k (two more segments of memory): shifted with seq_add, the question's
    logits equal those after decoding it afresh at 6·k, to the rounding of K's re-rotation."""
    memory = runtime.compress(stream[: 4 * SEGMENT])
    extra = runtime.compress(stream[4 * SEGMENT : 6 * SEGMENT])
    recalled, question, lead = stream[200:250], stream[300:306], stream[:1]
    _asked(runtime, memory, recalled, question, lead)  # saved at start 4·k
    moved, (decoded, reused) = _asked(runtime, memory, recalled, question, lead, extra)
    assert (decoded, reused) == (0, len(recalled) + 1)
    fresh_states.clear()
    fresh, (decoded, _) = _asked(runtime, memory, recalled, question, lead, extra)
    assert decoded == len(recalled) + 1
    scale = max(1.0, np.abs(fresh).max())
    err = np.abs(moved - fresh).max()
    assert err < 1e-3 * scale, err
    # and the shift matters: the cells left at 4·k (not moved) ask something else
    stale, _ = _asked(runtime, memory, recalled, question, lead, None)
    assert np.abs(stale - fresh).max() > 10 * err + 1e-3


def test_a_second_question_on_the_same_passages_decodes_none_of_them(runtime, planted_book, fresh_states):
    from uio_gguf.chat.conversation import Conversation

    with Conversation(
        runtime, planted_book, use_memory_files=False, recall_tokens=128, n_ctx=2048, recall_in_context=False
    ) as conv:
        for _ in conv.ask(QUESTION, SamplingParams(max_tokens=2, temperature=0)):
            pass
        decoded = conv.session.recall_decoded
        assert decoded > 0
        for _ in conv.ask(QUESTION, SamplingParams(max_tokens=2, temperature=0)):
            pass
        assert conv.session.recall_decoded == decoded and conv.session.recall_reused > 0


def test_recall_states_keep_the_most_recently_used_under_their_size():
    states = RecallStates(limit=100)
    blob = lambda n: bytearray(n)  # noqa: E731 (any buffer with a length)
    states.put(("a",), blob(40), 0)
    states.put(("b",), blob(40), 0)
    assert states.get(("a",)) is not None  # a is now the most recent
    states.put(("c",), blob(40), 5)
    assert states.get(("b",)) is None and states.get(("a",)) is not None and states.get(("c",)).start == 5
    states.put(("big",), blob(101), 0)  # larger than the limit: not kept, nothing dropped for it
    assert states.get(("big",)) is None and len(states) == 2
