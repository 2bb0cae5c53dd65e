"""The loop guard (uio_gguf.loop_guard): an answer stops where it starts to repeat itself, and the
repeat is never shown; answers without a repeat come out unchanged, however they are cut into pieces."""

from __future__ import annotations

import re

import pytest

from uio_gguf.loop_guard import LoopGuard
from uio_gguf.session import SamplingParams


def _guarded(pieces: list[str]) -> tuple[str, bool]:
    guard, shown = LoopGuard(), ""
    for piece in pieces:
        out, looped = guard.push(piece)
        shown += out
        if looped:
            return shown, True
    return shown + guard.flush(), False


def _cuts(text: str) -> list[list[str]]:
    """The same text as characters, as word-sized pieces, and whole."""
    return [list(text), re.findall(r"\s*\S+|\s+", text), [text]]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The pass key is 11059.\n\nThe pass key is 11059.\n\nThe pass key is 1", "The pass key is 11059."),
        ("The code is written in Python. The code is written in Python. The", "The code is written in Python."),
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


@pytest.fixture(scope="module")
def runtime(make_tiny_bundle):
    from uio_gguf.runtime import UIORuntime

    bundle = make_tiny_bundle("llama", segment=16, ratio=4, outtype="f32")[0]
    with UIORuntime(bundle, kv_type="f32") as rt:
        yield rt


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
