"""Recall (docs/design.md §6): the question's passages brought back raw after the raw window read so far,
right before the question, replaced at each question without piling up, at contiguous positions; the
automatic ratio switch.

The tiny LLaMA bundle (segment 16, ratio 4, f32 cache) over real prose, so the only differences between
two ways of computing the same cache are float32 rounding."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import QUESTION, SEGMENT, SLOTS, assert_contiguous, run_cli
from uio_gguf.llamacpp.sampling import SamplingParams
from uio_gguf.llamacpp.template import first_turn
from uio_gguf.memory.session import DECODER_SEQ, SCRATCH_SEQ


def _decode_at(session, tokens, start: int) -> np.ndarray:
    """Decodes tokens at explicit positions start.. with no seq_rm/seq_add; the last token's logits."""
    tokens = [int(t) for t in tokens]
    for at in range(0, len(tokens), session.batch.capacity):
        chunk = tokens[at : at + session.batch.capacity]
        n = len(chunk)
        positions = np.arange(start + at, start + at + n)
        session.batch.fill(positions, [[DECODER_SEQ]] * n, [i == n - 1 for i in range(n)], chunk)
        session.ctx.decode(session.batch)
    return session.ctx.logits(n - 1)


def _decode_alone_at(session, tokens, start: int, lead=()) -> None:
    """The recall as the reference computes it: decoded (after its lead tokens) in the empty scratch
    sequence of the same context (the unified cache masks the memory out, so it attends to itself
    only), the lead's cells dropped, the rest given to the conversation's sequence. Session.set_recall
    instead decodes it in a context of its own and moves the cells over as llama.cpp's sequence state."""
    tokens = [int(t) for t in lead] + [int(t) for t in tokens]
    n, first = len(tokens), start - len(lead)
    session.batch.fill(np.arange(first, first + n), [[SCRATCH_SEQ]] * n, [False] * n, tokens)
    session.ctx.decode(session.batch)
    if len(lead):
        session.ctx.seq_rm(SCRATCH_SEQ, first, start)
    session.ctx.seq_cp(SCRATCH_SEQ, DECODER_SEQ)
    session.ctx.seq_rm(SCRATCH_SEQ)


def test_recall_ranks_the_planted_sentence_first(runtime, planted_book):
    from uio_gguf.chat.recall import Recall

    tokens = runtime.model.tokenize(planted_book, add_special=False)
    recall = Recall(runtime.model, tokens, 128)
    spans = recall.select(QUESTION, 128)
    assert len(spans) == 1 and "7419" in recall.text(spans[0])
    assert recall.scores("zzzz qqqq").max() == 0 and recall.select("zzzz qqqq", 1000) == []
    # a budget fills in book order, neighbours merged, separators counted
    many = recall.select("the archive of the code and the module", 400)
    assert all(a.end <= b.start for a, b in zip(many, many[1:]))
    cost = sum(s.end - s.start for s in many) + (len(many) - 1) * len(recall.separator)
    assert 0 < cost <= 400
    assert all(a.end != b.start for a, b in zip(many, many[1:]))  # neighbours were merged


def test_passages_holding_fewer_of_the_questions_words_are_left_out(runtime, prose):
    """A passage that shares one word of the question many times can score over half the answer's
    passage; read after it, nearer the question, it took the answer (pass keys at depth 0.1). Passages
    holding fewer of the question's words than the best one are left out whatever they score."""
    from uio_gguf.chat.recall import Recall

    question = "What is the pass key?"
    decoy = "Each pass of the pass loop makes one more pass over the rows, pass after pass."
    book = f"{prose[:1500]}\nThe pass key is 53207.\n{prose[1500:3000]}\n{decoy}\n{prose[3000:4500]}"
    recall = Recall(runtime.model, runtime.model.tokenize(book, add_special=False), 32)
    scores, coverage = recall.scores(question), recall.coverage(question)
    decoys = [i for i, span in enumerate(recall.spans) if "rows, pass after" in recall.text(span)]
    assert decoys and max(scores[decoys]) >= 0.5 * scores.max()  # the score floor alone would keep it
    assert max(coverage[decoys]) < coverage.max() == 2
    recalled = "".join(recall.text(span) for span in recall.select(question, 1000))
    assert "53207" in recalled and "rows, pass after" not in recalled


def test_conversation_recalls_the_planted_segment(runtime, planted_book):
    from uio_gguf.chat.conversation import Conversation

    with Conversation(runtime, planted_book, n_ctx=2048, use_memory_files=False, recall_tokens=48) as chat:
        "".join(chat.ask(QUESTION, SamplingParams(max_tokens=2)))
        recalled = b"".join(runtime.model.piece(t) for t in chat.session.recall).decode("utf-8", "replace")
        assert "7419" in recalled and 0 < len(chat.session.recall) <= 48
        assert_contiguous(runtime, chat.session)


def test_a_replaced_recall_shifts_the_raw_cells_after_it(runtime, stream):
    """set_recall puts the passages after the raw window read so far; the next set_recall removes them and
    moves the raw cells read after them down (llama.cpp seq_add, K re-rotated at the next decode): the
    question's logits equal a cache where those cells were rotated to their new positions here."""
    from uio_gguf.native.bindings import kv_read, kv_write

    memory = runtime.compress(stream[: 4 * SEGMENT])
    raw, first_recall, first_question = stream[64:70], stream[200:223], stream[300:305]
    recalled, question = stream[230:241], stream[320:324]
    n_mem = 4 * SLOTS
    with runtime.new_session(n_ctx=256) as s:
        s.add_memory(memory)
        s.feed(raw)
        s.set_recall(first_recall)
        assert s.recall_start == n_mem + len(raw)  # right before the question
        s.feed(first_question)
        positions, k, v = kv_read(runtime.plugin, s.ctx.ptr, s.layout, DECODER_SEQ)
        s.set_recall(recalled)
        assert s.recall_start == n_mem + len(raw) + len(first_question)
        got = s.feed(question)
        assert_contiguous(runtime, s)
    after = np.flatnonzero(positions >= n_mem + len(raw) + len(first_recall))  # the first question's cells
    after = after[np.argsort(positions[after])]
    moved = positions[after] - len(first_recall)
    k_moved = runtime.rope.rotate(k[:, after], np.full(len(after), -len(first_recall)))
    with runtime.new_session(n_ctx=256) as ref:
        ref.add_memory(memory)
        ref.feed(raw)
        kv_write(runtime.plugin, ref.ctx.ptr, ref.layout, DECODER_SEQ, SCRATCH_SEQ, moved, k_moved, v[:, after])
        at = n_mem + len(raw) + len(first_question)
        _decode_alone_at(ref, recalled, at)
        expected = _decode_at(ref, question, at + len(recalled))
    err = np.abs(got - expected).max()
    assert err < 1e-4 * max(1.0, np.abs(expected).max()), err


def test_the_lead_token_goes_before_the_passages_and_stays_out(runtime, stream):
    """set_recall(lead=...): the passages are decoded after the lead token, whose cell stays out of the
    conversation; the question's logits equal the reference's, and differ from a recall without it."""
    memory = runtime.compress(stream[: 4 * SEGMENT])
    recalled, question, lead = stream[200:223], stream[300:305], stream[:1]
    n_mem = 4 * SLOTS

    def asked(lead_tokens) -> np.ndarray:
        with runtime.new_session(n_ctx=256) as s:
            s.add_memory(memory)
            s.set_recall(recalled, lead=lead_tokens)
            assert_contiguous(runtime, s)
            return s.feed(question)

    got, without = asked(lead), asked(())
    with runtime.new_session(n_ctx=256) as ref:
        ref.add_memory(memory)
        _decode_alone_at(ref, recalled, n_mem, lead)
        expected = _decode_at(ref, question, n_mem + len(recalled))
    err = np.abs(got - expected).max()
    assert err < 1e-4 * max(1.0, np.abs(expected).max()), err
    assert np.abs(without - expected).max() > 100 * err + 1e-3


def test_three_questions_keep_memory_raw_and_the_current_recall_only(runtime, stream):
    """Compressions while a recall is in place (the segment around it is compressed and the recall moves
    down to the front of the raw window, then up past the new slots) and recalls replaced three times:
    the cache ends as a fresh session fed [memory][recall 3][question 3]."""
    raw0 = stream[64:70]
    questions = [stream[100:110], stream[120:136], stream[140:145]]  # 6+10 and 16 fill two segments
    recalls = [stream[200:220], stream[230:237], stream[250:283]]
    with runtime.new_session(n_ctx=256) as s:
        s.add_memory(runtime.compress(stream[: 4 * SEGMENT]))
        s.feed(raw0)
        for recalled, question in zip(recalls, questions):
            s.set_recall(recalled)
            assert_contiguous(runtime, s)
            got = s.feed(question)
            assert_contiguous(runtime, s)
            assert s.recall == [int(t) for t in recalled]
        assert s.compressed_segments == 6 and s.n_mem == 6 * SLOTS and len(s.raw) == len(questions[2])
        assert s.n_past == s.n_mem + len(recalls[2]) + len(questions[2])
    with runtime.new_session(n_ctx=256) as ref:
        ref.add_memory(runtime.compress(stream[: 4 * SEGMENT]))
        ref.add_memory(runtime.compress(np.concatenate([raw0, questions[0]])))
        ref.add_memory(runtime.compress(questions[1]))
        _decode_alone_at(ref, recalls[2], 6 * SLOTS)
        expected = _decode_at(ref, questions[2], 6 * SLOTS + len(recalls[2]))
    err = np.abs(got - expected).max()
    assert err < 1e-4 * max(1.0, np.abs(expected).max()), err


def test_conversation_turns_do_not_pile_up_recall(runtime, planted_book):
    from uio_gguf.chat.conversation import Conversation

    params = SamplingParams(max_tokens=6)
    with Conversation(runtime, planted_book, n_ctx=2048, use_memory_files=False, recall_tokens=40) as chat:
        for question in (QUESTION, "Which module reads the archive?", "And the code?"):
            "".join(chat.ask(question, params))
            s = chat.session
            assert len(s.recall) <= 40
            assert s.n_past == s.n_mem + len(s.recall) + len(s.raw)
            assert_contiguous(runtime, s)


def test_recall_zero_is_the_memory_alone(runtime, planted_book):
    """recall_tokens=0 is the path without recall, step for step: memory, the book's remainder, the
    question, greedy answer."""
    from uio_gguf.chat.conversation import Conversation

    params = SamplingParams(max_tokens=8)
    with Conversation(
        runtime, planted_book, n_ctx=2048, use_memory_files=False, recall_tokens=0, raw_window=SEGMENT
    ) as chat:
        answer = "".join(chat.ask(QUESTION, params))
        assert chat.recall is None and chat.session.recall == []
        tokens = list(chat.book_tokens)
    first = first_turn(chat.template, QUESTION)[1]
    n_full = len(tokens) // SEGMENT
    with runtime.new_session(2048) as s:
        s.add_memory(runtime.compress(tokens))
        s.feed(tokens[n_full * SEGMENT :])
        s.feed(runtime.model.tokenize(first, add_special=False))
        assert "".join(s.generate(params)) == answer


def test_recall_budget_leaves_room_for_the_answer(runtime, prose):
    from uio_gguf.chat.conversation import Conversation

    n_ctx = 2048  # the memory of this ~3K-token book leaves ~1.3K cells: less than the words shared
    question = "Which module, function, object, file, value, class, method, list and string?"
    with Conversation(runtime, prose[:14000], n_ctx=n_ctx, use_memory_files=False, recall_tokens=4096) as chat:
        s = chat.session
        room = chat._recall_room(0, 100)
        "".join(chat.ask(question, SamplingParams(max_tokens=100)))
        # Segments scoring under half the best are left out, so the recall need not fill its room.
        assert 0 < len(s.recall) <= room < 4096
        assert s.n_past <= n_ctx


def test_negative_recall_budget_is_refused(runtime):
    from uio_gguf.chat.conversation import Conversation
    from uio_gguf.errors import UIOError

    with pytest.raises(UIOError, match="recall budget"):
        Conversation(runtime, "text", use_memory_files=False, recall_tokens=-1)


# ----- the real embedded model ------------------------------------------------------------------------


@pytest.mark.slow
def test_long_book_switches_to_ratio_32_and_too_long_names_the_limit(capsys):
    from uio_gguf.cli.options import open_runtime
    from uio_gguf.errors import UIOError

    line = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
    book = line * 2800  # ~64K tokens: more than ratio 8 holds (56448), less than ratio 32
    with open_runtime(None, None, 0, False, False, book=book) as runtime:
        assert runtime.bundle.ratio == 32
    # (besides, in a fresh cache, the one line that says the encoder's F16 weights are written once)
    note = [line for line in capsys.readouterr().err.splitlines() if "copy of model.gguf" not in line]
    assert len(note) == 1 and "using the ratio-32 head" in note[0]
    with pytest.raises(UIOError, match="--ratio 32 holds up to"):
        open_runtime(None, 8, 0, False, False, book=book)  # asked for ratio 8: told, not switched
    with pytest.raises(UIOError, match=r"the ratio-32 head holds at most \d+: cut the text to \d+ tokens"):
        open_runtime(None, None, 0, False, False, book=line * 11000)  # ~250K tokens


def test_repeat_penalty_reaches_llamas_sampler(runtime, stream):
    """A strong repetition penalty (llama.cpp's penalties sampler) keeps greedy decoding from repeating
    any token of its last 64, where the plain greedy answer of this tiny random model loops."""

    def answer(penalty: float) -> list[str]:
        with runtime.new_session(n_ctx=512) as s:
            s.feed(stream[:40])
            return list(s.generate(SamplingParams(max_tokens=30, repeat_penalty=penalty)))

    plain, penalized = answer(1.0), answer(100.0)
    assert len(set(plain)) < len(plain)  # the loop the penalty is for
    assert len(penalized) == 30 and len(set(penalized)) == len(penalized)


@pytest.mark.slow
def test_demo_answers_the_access_code_with_the_defaults():
    """`uio-gguf demo` as a user runs it (its memory file is reused from an earlier demo when there is one)."""
    result = run_cli("demo", check=True)
    assert "7419" in result.stdout, result.stdout


def test_eval_passkey_takes_a_recall_budget(tiny_bundle, cache_env, tmp_path):
    import json

    out = tmp_path / "out.json"
    args = ("eval", "passkey", "-m", str(tiny_bundle), "--lengths", "96", "--depths", "0.5", "--trials", "1")
    result = run_cli(*args, "--recall", "32", "--json", str(out), env=cache_env, check=True)
    assert "recall 32 tokens" in result.stdout
    assert json.loads(out.read_text())["recall_tokens"] == 32


def test_a_recall_read_in_context_is_its_tokens_read_raw(runtime, stream):
    """Session.recall_in_context: the passages are decoded in the conversation after the raw window, so
    the question's logits are those of a session that reads the same tokens as raw text; decoded alone
    (the default) they differ, since the passages then read nothing before them."""
    memory = runtime.compress(stream[: 4 * SEGMENT])
    raw, recalled, question = stream[64:70], stream[230:241], stream[320:324]
    got = {}
    for in_context in (True, False):
        with runtime.new_session(n_ctx=256) as s:
            s.raw_window, s.recall_in_context = 4 * SEGMENT, in_context
            s.add_memory(memory)
            s.feed(raw)
            s.set_recall(recalled)
            got[in_context] = s.feed(question)
            assert s.recall_start == 4 * SLOTS + len(raw)
            assert_contiguous(runtime, s)
    with runtime.new_session(n_ctx=256) as ref:
        ref.raw_window = 4 * SEGMENT
        ref.add_memory(memory)
        ref.feed(np.concatenate([raw, recalled]))
        expected = ref.feed(question)
    err = np.abs(got[True] - expected).max()
    assert err < 1e-4 * max(1.0, np.abs(expected).max()), err
    assert np.abs(got[False] - expected).max() > 1e-2


@pytest.mark.parametrize("in_context", [True, False])
def test_a_recall_is_read_again_with_the_raw_window(runtime, stream, in_context):
    """With reread, a compression decodes the raw window again behind the new memory. A recall read in
    context is read again in its place with it; a recall decoded alone keeps its cells (llama.cpp decodes a
    sequence only after its last cell, so they go and come back around the raw tokens before them). The
    next logits are those of a fresh session given the memory (the compressed segment's too), the raw
    tokens before the recall, the recall as it is read, and the raw tokens after it."""
    window = 3 * SEGMENT
    memory = runtime.compress(stream[: 4 * SEGMENT])
    raw, recalled, question = stream[64 : 64 + window], stream[230:241], stream[320:324]
    with runtime.new_session(n_ctx=256) as s:
        s.raw_window, s.reread, s.recall_in_context = window, True, in_context
        s.add_memory(memory)
        s.feed(raw[: SEGMENT + 4])
        s.set_recall(recalled)
        s.feed(raw[SEGMENT + 4 :])  # reaches R: the oldest segment is compressed, the rest read again
        assert s.compressed_segments == 5 and s.recall_at == 4
        assert_contiguous(runtime, s)
        got = s.feed(question)
    with runtime.new_session(n_ctx=256) as ref:
        ref.raw_window = 4 * window
        ref.add_memory(memory)
        ref.add_memory(runtime.compress(raw[:SEGMENT]))
        ref.recall_in_context = in_context
        ref.feed(raw[SEGMENT : SEGMENT + 4])
        ref.set_recall(recalled)
        ref.feed(raw[SEGMENT + 4 :])
        expected = ref.feed(question)
    err = np.abs(got - expected).max()
    assert err < 1e-4 * max(1.0, np.abs(expected).max()), err
