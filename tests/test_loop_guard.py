"""The loop guard (uio_gguf.llamacpp.loop_guard): an answer stops where it starts to repeat itself, and the
repeat is never shown, nor kept in the conversation's cache; answers without a repeat come out unchanged,
however they are cut into pieces."""

from __future__ import annotations

import re

import numpy as np
import pytest

from uio_gguf.llamacpp.loop_guard import LoopGuard
from uio_gguf.llamacpp.sampling import SamplingParams


def _guarded(pieces: list[str]) -> tuple[str, bool]:
    guard, shown = LoopGuard(), ""
    for piece in pieces:
        out, looped = guard.push(piece)
        shown += out
        if looped:
            return shown, True
    return shown + guard.flush(), guard.looped


def _cuts(text: str) -> list[list[str]]:
    """The same text as characters, as word-sized pieces, and whole."""
    return [list(text), re.findall(r"\s*\S+|\s+", text), [text]]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The pass key is 11059.\n\nThe pass key is 11059.\n\nThe pass key is 1", "The pass key is 11059."),
        ("The code is written in Python. The code is written in Python. The", "The code is written in Python."),
        # the answer ends on the repeat, with no white space after it (seen on a 182K-token book)
        (
            "The father of Isaac is Abraham.\n\nThe text is from Genesis, chapter 27.\n\nThe text is from Genesis, chapter 27.",
            "The father of Isaac is Abraham.\n\nThe text is from Genesis, chapter 27.",
        ),
        # a line without a full stop, repeated after the line break as a sentence that has one
        ("The pass key is 11059\nThe pass key is 11059.\nThe pass key is 11059.", "The pass key is 11059"),
        ("The pass key is 11059!\nThe pass key is 11059. And", "The pass key is 11059!"),
    ],
)
def test_a_repeated_sentence_is_cut_before_it_is_shown(text, expected):
    for pieces in _cuts(text):
        assert _guarded(pieces) == (expected, True), pieces


def test_a_stutter_stops_at_its_third_unit():
    text = "It reads the parser args args args args args"
    for pieces in _cuts(text):
        shown, looped = _guarded(pieces)
        assert looped and text.startswith(shown) and shown.count("args") <= 2, pieces


def test_text_streams_unless_it_could_be_a_repeat():
    guard = LoopGuard()
    assert guard.push("The pass key is 11059.") == ("The pass key is 11059.", False)
    assert guard.push("\n\nThe pass") == ("", False)  # could be the same sentence again: held
    assert guard.push(" word") == ("\n\nThe pass word", False)  # it is not: shown at once


@pytest.mark.parametrize(
    "text",
    [
        "The special magic number for amber-falcon is 1234567. The special magic number for amber-falcon is 7654321.",
        "Line one is here.\n-----------------\nYes. Yes. Yes.",  # rules and short sentences may recur
        "The access code of the archive is 7419.",
        "A first sentence.\n\nA second sentence, then one left open",
    ],
)
def test_an_answer_without_a_repeat_comes_out_unchanged(text):
    for pieces in _cuts(text):
        assert _guarded(pieces) == (text, False), pieces


def test_a_disabled_guard_shows_every_piece_as_it_comes():
    guard = LoopGuard(enabled=False)
    assert [guard.push(p) for p in ("a. ", "a. ", "a. ")] == [("a. ", False)] * 3
    assert guard.flush() == ""


def test_a_looping_answer_stops_where_the_loop_starts(runtime, prose):
    """The tiny random model loops under greedy decoding; with the guard its answer is the same answer cut
    before the repeat, and the session says so (finish_reason stop, looped)."""
    prompt = runtime.model.tokenize(prose[:400], add_special=False)
    answers = {}
    for guard in (False, True):
        with runtime.new_session(n_ctx=512) as session:
            session.feed(prompt)
            answers[guard] = "".join(session.generate(SamplingParams(max_tokens=80, loop_guard=guard)))
            answers[guard, "state"] = (session.finish_reason, session.looped)
    assert answers[False, "state"] == ("length", False)
    assert answers[True, "state"] == ("stop", True)
    assert len(answers[True]) < len(answers[False]) and answers[False].startswith(answers[True])
    assert _guarded([answers[True]]) == (answers[True], False)  # what is shown holds no repeat itself


def test_text_that_was_not_shown_leaves_the_cache(runtime, prose):
    """Tokens decoded but never shown (a repeat the guard cut, or what follows a stop string: the same
    code) are taken back out of the conversation: the cache then holds the prompt and the shown answer's
    tokens (the one that straddles its end included), and the next turn reads what a session fed exactly
    those tokens reads."""
    model = runtime.model
    prompt = [int(t) for t in model.tokenize(prose[:400], add_special=False)]
    follow = [int(t) for t in model.tokenize(" And then?", add_special=False)]

    def session():
        s = runtime.new_session(n_ctx=512)
        s.raw_window = 400  # nothing is compressed: the raw window shows every cached token
        return s

    with session() as free:
        free.feed(prompt)
        whole = "".join(free.generate(SamplingParams(max_tokens=40)))
    at = next(i for i in range(len(whole) // 2, len(whole)) if whole.find(whole[i : i + 4]) == i)
    with session() as cut:
        cut.feed(prompt)
        shown = "".join(cut.generate(SamplingParams(max_tokens=40, stop=[whole[at : at + 4]])))
        assert shown == whole[:at] and cut.finish_reason == "stop"
        kept = cut.raw[len(prompt) :]
        assert cut.generated == len(kept) < 40 and cut.n_past == cut.tokens_seen == len(prompt) + len(kept)
        text = b"".join(model.piece(t) for t in kept).decode("utf-8", "replace")
        but_last = b"".join(model.piece(t) for t in kept[:-1]).decode("utf-8", "replace")
        assert whole.startswith(text) and len(but_last) < len(shown) <= len(text)
        got = cut.feed(follow)
    with session() as reference:
        want = reference.feed(prompt + kept + follow)
    np.testing.assert_allclose(got, want, atol=1e-4)
