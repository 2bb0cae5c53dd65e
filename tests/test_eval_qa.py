"""`uio-gguf eval qa` (docs/evaluation.md): the tasks put their needles where asked and are scored by exact
match; the memoryless baselines are honest (window = full-8k when the text fits, rag with no budget =
window); splicing needles into the filler's tokens and recompressing only the touched segments gives the
memory of the spliced text compressed from scratch, bit for bit.

Tiny LLaMA bundles (f32 cache) over real prose; answers are greedy."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from tests.helpers import SEGMENT, run_cli
from uio_gguf.evals import needles
from uio_gguf.evals import qa as eval_qa
from uio_gguf.llamacpp.sampling import SamplingParams

PARAMS = SamplingParams(max_tokens=12)


@pytest.fixture(scope="module")
def base(runtime, prose):
    return needles.base_document(runtime.model, 600, [prose], random.Random(0))


@pytest.fixture(scope="module")
def long_base(runtime, prose):
    return needles.base_document(runtime.model, 3000, [prose], random.Random(1))


@pytest.mark.parametrize("task", needles.TASKS)
@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_each_task_puts_its_needles_where_asked(task, depth, runtime, long_base):
    base = long_base
    sample = needles.make_sample(task, depth, random.Random(f"{task}{depth}"))
    doc = needles.splice(runtime.model, base, sample.needles)
    n_book = len(base.tokens) - base.skip
    assert len(doc.tokens) == len(base.tokens)  # written over, nothing shifted
    text = doc.book
    # every needle whole, on a line of its own, in book order; the asked one at its depth (a line's slack)
    places = [text.index(f"\n{sentence}\n") for sentence, _ in sample.needles]
    assert places == sorted(places)
    for (sentence, d), first in zip(sample.needles, doc.where):
        ids = needles.needle_ids(runtime.model, sentence)
        assert np.array_equal(doc.tokens[first : first + len(ids)], ids)
        if d == depth:  # the asked needle (vt: the chain's start); the others may move to make room
            assert round(d * (n_book - len(ids))) <= first - base.skip <= round(d * (n_book - len(ids))) + 16
    asked = [d for s, d in sample.needles if any(a in s for a in sample.answers)]
    assert depth in asked
    if task == "vt":
        assert sample.needles[0][1] == depth
    # the filler outside the needles is untouched
    touched = np.zeros(len(doc.tokens), bool)
    for (sentence, _), first in zip(sample.needles, doc.where):
        touched[first : first + len(needles.needle_ids(runtime.model, sentence))] = True
    assert np.array_equal(doc.tokens[~touched], base.tokens[~touched])
    # every expected answer is in the text, and the text tokenizes back to exactly the spliced tokens
    assert all(a in text for a in sample.answers)
    from uio_gguf.llamacpp.template import document_tokens

    assert np.array_equal(document_tokens(runtime.model, doc.book), doc.tokens)


def test_tasks_ask_what_they_hid():
    rng = random.Random(0)
    multikey = needles.make_sample("multikey", 0.5, rng)
    assert len(multikey.needles) == 4 and len(multikey.answers) == 1
    word = multikey.question.split(" for ")[1].rstrip("?")
    assert f"The special magic number for {word} is {multikey.answers[0]}." in [s for s, _ in multikey.needles]
    multivalue = needles.make_sample("multivalue", 0.5, rng)
    assert len(multivalue.answers) == 3 and all(len(a) == 7 for a in multivalue.answers)
    vt = needles.make_sample("vt", 0.2, rng)
    value = vt.question.split("value ")[1].split("?")[0]
    assert vt.needles[0][0] == f"VAR {vt.answers[0]} = {value}."
    assert [s for s, _ in vt.needles][1:] == [f"VAR {b} = VAR {a}." for a, b in zip(vt.answers, vt.answers[1:])]


@pytest.mark.parametrize(
    ("expected", "answer", "hit"),
    [
        ("1234567", "The special magic number is 1234567.", True),
        ("1234567", "1234567", True),
        ("1234567", "It is 12345678.", False),
        ("1234567", "It is 123456.", False),
        ("1234567", "It is 1234 567.", False),
        ("ABCDE", "VAR ABCDE, VAR XYZQW", True),
        ("ABCDE", "VAR ABCDEF", False),
    ],
)
def test_the_scorer_is_exact(expected, answer, hit):
    assert needles.found(expected, answer) is hit


def test_loops_are_4grams_three_times_or_more():
    assert needles.has_loop("The code is written in Python. " * 3)
    assert needles.has_loop("args.args.args.args.args.args.")
    assert not needles.has_loop("The pass key is 12345. The pass key is 12345.")
    assert not needles.has_loop("The special magic numbers are 1, 2 and 3.")


def test_splice_and_partial_recompression_equal_compressing_from_scratch(runtime, base):
    cache = eval_qa.SegmentCache(runtime)
    eval_qa.load_base(cache, base, use_memory_files=False)
    n_segments = len(base.tokens) // SEGMENT
    assert cache.compressed == n_segments
    for task in ("passkey", "multikey"):
        sample = needles.make_sample(task, 0.5, random.Random(task))
        doc = needles.splice(runtime.model, base, sample.needles)
        before = cache.compressed
        spliced = cache.compress(doc.tokens)
        fresh = runtime.compress(doc.tokens)
        assert spliced.k.dtype == fresh.k.dtype
        assert np.array_equal(spliced.k, fresh.k) and np.array_equal(spliced.v, fresh.v)
        changed = {
            i
            for i in range(n_segments)
            if not np.array_equal(
                doc.tokens[i * SEGMENT : (i + 1) * SEGMENT], base.tokens[i * SEGMENT : (i + 1) * SEGMENT]
            )
        }
        assert 0 < cache.compressed - before == len(changed) < n_segments


def test_the_filler_memory_file_is_read_back(runtime, base, tmp_path, monkeypatch):
    monkeypatch.setenv("UIO_GGUF_CACHE", str(tmp_path))
    first = eval_qa.SegmentCache(runtime)
    eval_qa.load_base(first, base, use_memory_files=True)
    second = eval_qa.SegmentCache(runtime)
    eval_qa.load_base(second, base, use_memory_files=True)
    assert first.compressed > 0 and second.compressed == 0
    assert np.array_equal(second.compress(base.tokens).k, runtime.compress(base.tokens).k)


def test_uio_answers_through_the_cache_as_from_scratch(runtime, base):
    from uio_gguf.chat.conversation import Conversation

    sample = needles.make_sample("single", 0.5, random.Random(1))
    doc = needles.splice(runtime.model, base, sample.needles)
    cache = eval_qa.SegmentCache(runtime)
    eval_qa.load_base(cache, base, use_memory_files=False)
    for method, budget, ranking in [("uio", 0, "bm25"), ("uio+recall", 64, "bm25"), ("uio+attn", 64, "attention")]:
        got = eval_qa.answer(cache, doc, sample.question, method, PARAMS, budget)
        with Conversation(
            runtime, doc.book, use_memory_files=False, recall_tokens=budget, raw_window=SEGMENT, recall_ranking=ranking
        ) as conversation:
            want = "".join(conversation.ask(sample.question, PARAMS))
        assert got.text == want


def test_fillers_take_turns_and_each_answer_is_as_from_scratch(runtime, prose):
    """With --fillers 2 the trials alternate between two fillers (the first the one drawn before there
    were several); both are compressed up front, and each answer is the one its own text gives. `window`
    reads the filler's tail alone (the needle is at mid-book), so its answers tell the fillers apart."""
    from uio_gguf.chat.conversation import Conversation

    params = SamplingParams(max_tokens=8, loop_guard=True)  # what evaluate asks with
    report = eval_qa.evaluate(
        runtime, [600], [0.5], 3, tasks=["passkey"], methods=["window", "uio+recall"], texts=[prose],
        recall_tokens=64, max_tokens=8, use_memory_files=False, fillers=2,
    )  # fmt: skip
    got = {(s["trial"], s["method"]): s for s in report["samples"]}
    assert report["fillers"] == 2 and [got[t, "window"]["filler"] for t in range(3)] == [0, 1, 0]
    bases = [needles.base_document(runtime.model, 600, [prose], needles.filler_rng(0, 600, i)) for i in range(2)]
    assert needles.filler_rng(0, 600, 0).random() == random.Random("0:filler:600").random()
    n_segments = len(bases[0].tokens) // SEGMENT
    for trial in range(3):
        sample = needles.make_sample("passkey", 0.5, random.Random(f"0:passkey:600:0.5:{trial}"))
        doc = needles.splice(runtime.model, bases[trial % 2], sample.needles)
        window = eval_qa.answer(eval_qa.SegmentCache(runtime), doc, sample.question, "window", params, 64)
        assert got[trial, "window"]["answer"] == window.text
        with Conversation(
            runtime, doc.book, use_memory_files=False, recall_tokens=64, raw_window=SEGMENT
        ) as conversation:
            assert got[trial, "uio+recall"]["answer"] == "".join(conversation.ask(sample.question, params))
        assert got[trial, "uio+recall"]["recompressed"] < n_segments  # its filler was compressed up front
    assert got[0, "window"]["answer"] != got[1, "window"]["answer"]  # the two fillers' tails read differently


def test_rag_with_no_budget_equals_window(runtime, base):
    sample = needles.make_sample("passkey", 0.3, random.Random(2))
    doc = needles.splice(runtime.model, base, sample.needles)
    cache = eval_qa.SegmentCache(runtime)
    window = eval_qa.method_tokens(runtime, doc, sample.question, "window", 64)
    rag = eval_qa.method_tokens(runtime, doc, sample.question, "rag", 0)
    assert np.array_equal(rag, window)
    assert len(window) < len(doc.tokens)  # the window left the book's full segments out
    a = eval_qa.answer(cache, doc, sample.question, "rag", PARAMS, 0)
    b = eval_qa.answer(cache, doc, sample.question, "window", PARAMS, 64)
    assert (a.text, a.ended) == (b.text, b.ended)
    # with a budget, rag reads the needle's line (the question shares its words), window does not
    needle = runtime.model.tokenize("The pass key is", add_special=False)
    with_budget = eval_qa.method_tokens(runtime, doc, sample.question, "rag", 64)
    contains = (
        lambda tokens: any(  # noqa: E731
            np.array_equal(tokens[i : i + len(needle)], needle) for i in range(len(tokens) - len(needle) + 1)
        )
    )
    assert contains(with_budget) and not contains(window)


def test_sliding_recall_spends_the_memory_cells_on_the_book_tail(runtime, base):
    """sliding+recall reads what rag reads plus, in the cells uio's memory takes, the book's last raw
    tokens before the remainder: the same prompt with no budget as a plain window of those cells. Both
    read the recall right before the question."""
    sample = eval_qa.make_sample("passkey", 0.3, random.Random(2))
    doc = eval_qa.splice(runtime.model, base, sample.needles)
    n_full = len(doc.tokens) // runtime.segment * runtime.segment
    memory_cells = n_full // runtime.segment * runtime.slots
    question = eval_qa.method_tokens(runtime, doc, sample.question, "window", 0)[doc.skip + len(doc.tokens) - n_full :]
    for budget in (0, 64):
        rag = eval_qa.method_tokens(runtime, doc, sample.question, "rag", budget)
        sliding = eval_qa.method_tokens(runtime, doc, sample.question, "sliding+recall", budget)
        assert len(sliding) == len(rag) + memory_cells
        tail, remainder = doc.tokens[n_full - memory_cells :], len(doc.tokens) - n_full
        assert np.array_equal(sliding[: doc.skip], rag[: doc.skip])  # the opening
        assert np.array_equal(sliding[doc.skip : doc.skip + len(tail)], tail)
        # then what rag reads after its remainder: the recall (if any) and the question
        assert np.array_equal(sliding[doc.skip + len(tail) :], rag[doc.skip + remainder :])
        assert np.array_equal(sliding[len(sliding) - len(question) :], question)
        assert (len(sliding) - len(question) - doc.skip - len(tail) > 0) == (budget > 0)


def test_a_longer_raw_window_is_the_same_tail_for_every_method(runtime, base):
    """--raw-window R: uio+recall's conversation keeps the book's last tokens raw as chat does with R, and
    rag and sliding+recall read that same tail (sliding+recall: after the raw tokens the memory's cells
    could hold instead, fewer of them than with one segment, as the memory covers fewer segments)."""
    from uio_gguf.chat.conversation import Conversation

    window = 3 * SEGMENT
    sample = eval_qa.make_sample("passkey", 0.3, random.Random(2))
    doc = eval_qa.splice(runtime.model, base, sample.needles)
    cache = eval_qa.SegmentCache(runtime)
    eval_qa.load_base(cache, base, use_memory_files=False)
    got = eval_qa.answer(cache, doc, sample.question, "uio+recall", PARAMS, 64, raw_window=window)
    with Conversation(runtime, doc.book, use_memory_files=False, recall_tokens=64, raw_window=window) as conversation:
        tail = [int(t) for t in conversation.session.raw]
        n_mem = conversation.session.compressed_segments
        want = "".join(conversation.ask(sample.question, PARAMS))
    assert got.text == want and window - SEGMENT <= len(tail) < window
    assert n_mem * SEGMENT + len(tail) == len(doc.tokens)
    memory_cells = n_mem * runtime.slots
    window_prompt = eval_qa.method_tokens(runtime, doc, sample.question, "window", 0, window)
    assert np.array_equal(window_prompt[doc.skip : doc.skip + len(tail)], tail)
    rag = eval_qa.method_tokens(runtime, doc, sample.question, "rag", 64, window)
    sliding = eval_qa.method_tokens(runtime, doc, sample.question, "sliding+recall", 64, window)
    assert len(sliding) == len(rag) + memory_cells
    before = doc.tokens[n_mem * SEGMENT - memory_cells : n_mem * SEGMENT]
    assert np.array_equal(sliding[doc.skip : doc.skip + memory_cells + len(tail)], np.concatenate([before, tail]))
    assert np.array_equal(sliding[doc.skip + memory_cells :], rag[doc.skip :])


def test_a_memory_window_reaches_uio_and_bounds_the_sliding_window(runtime, base):
    """--memory-window W: uio+recall answers as a conversation with that window, and sliding+recall spends W
    cells (not the whole memory's) on the book's raw tokens before the tail."""
    from uio_gguf.chat.conversation import Conversation

    sample = eval_qa.make_sample("passkey", 0.3, random.Random(2))
    doc = eval_qa.splice(runtime.model, base, sample.needles)
    cache = eval_qa.SegmentCache(runtime)
    eval_qa.load_base(cache, base, use_memory_files=False)
    window = 2 * runtime.slots
    got = eval_qa.answer(cache, doc, sample.question, "uio+recall", PARAMS, 64, memory_window=window)
    with Conversation(
        runtime, doc.book, use_memory_files=False, recall_tokens=64, raw_window=SEGMENT, memory_window=window
    ) as conversation:
        assert conversation.session.n_mem == window < conversation.session.compressed_segments * runtime.slots
        want = "".join(conversation.ask(sample.question, PARAMS))
    assert got.text == want
    rag = eval_qa.method_tokens(runtime, doc, sample.question, "rag", 64)
    sliding = eval_qa.method_tokens(runtime, doc, sample.question, "sliding+recall", 64, memory_window=window)
    assert len(sliding) == len(rag) + window


def test_window_equals_full_8k_when_the_text_fits(make_tiny_bundle, prose):
    from uio_gguf.memory.runtime import UIORuntime

    bundle = make_tiny_bundle("llama", segment=64, ratio=4, outtype="f32")[0]
    with UIORuntime(bundle, kv_type="f32") as rt:
        base = needles.base_document(rt.model, 20, [prose], random.Random(3))
        doc = needles.splice(rt.model, base, [("VAR QWERT = 123.", 0.5)])
        assert len(doc.tokens) < rt.segment  # fits in the raw remainder
        question = "Which variables are assigned the value 123?"
        window = eval_qa.method_tokens(rt, doc, question, "window", 0)
        assert np.array_equal(window, eval_qa.method_tokens(rt, doc, question, "full-8k", 0))
        cache = eval_qa.SegmentCache(rt)
        a = eval_qa.answer(cache, doc, question, "window", PARAMS, 0)
        b = eval_qa.answer(cache, doc, question, "full-8k", PARAMS, 0)
        assert (a.text, a.ended) == (b.text, b.ended) and a.text


def test_eval_qa_prints_a_table_and_writes_json(tiny_bundle, prose, cache_env, tmp_path):
    filler = tmp_path / "filler.txt"
    filler.write_text(prose[:20000])
    out = tmp_path / "qa.json"
    result = run_cli(
        "eval", "qa", "-m", str(tiny_bundle), "--lengths", "200", "--depths", "0.5", "--trials", "1",
        "--tasks", "passkey,vt", "--filler", str(filler), "-n", "6", "--recall", "32", "--json", str(out),
        env=cache_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "accuracy" in result.stdout and "uio+recall" in result.stdout and "vt" in result.stdout
    report = json.loads(out.read_text())
    assert report["methods"] == list(eval_qa.DEFAULT_METHODS) and report["recall_tokens"] == 32
    assert report["max_tokens"] == {"passkey": 6, "vt": 6}  # -n overrides every task's default
    assert len(report["samples"]) == 2 * len(eval_qa.DEFAULT_METHODS)
    assert {r["method"] for r in report["results"]} == set(eval_qa.DEFAULT_METHODS)
    for r in report["results"]:
        assert r["n"] == 1 and 0 <= r["accuracy"] <= 1 and r["ttft_median"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", "passkey,nope"], "unknown task nope"),
        (["--methods", "uio,bm25"], "unknown method bm25"),
        (["--lengths", "100000"], "--ratio 32"),
        (["--depths", "2"], "between 0 and 1"),
        (["-n", "0"], "at least 1 token"),
        (["--trials", "2", "--fillers", "3"], "--fillers must be from 1 to --trials"),
    ],
)
def test_eval_qa_bad_input_gives_one_clear_line(args, message, tiny_bundle, cache_env):
    result = run_cli("eval", "qa", "-m", str(tiny_bundle), "--lengths", "100", *args, env=cache_env)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_loop_guard_cuts_an_answer_where_it_repeats_and_changes_nothing_before(runtime, base):
    """Each method's answer with the guard is its answer without it, cut where it began to repeat; the
    tiny random model loops, so some are cut (and a cut answer does not count as ended)."""
    sample = needles.make_sample("single", 0.5, random.Random(1))
    doc = needles.splice(runtime.model, base, sample.needles)
    cache = eval_qa.SegmentCache(runtime)
    eval_qa.load_base(cache, base, use_memory_files=False)
    cut = 0
    for method in ("window", "rag", "uio+recall"):
        free = eval_qa.answer(cache, doc, sample.question, method, SamplingParams(max_tokens=80), 64)
        guarded = eval_qa.answer(
            cache, doc, sample.question, method, SamplingParams(max_tokens=80, loop_guard=True), 64
        )
        assert free.text.startswith(guarded.text) and not free.looped, method
        if guarded.looped:
            cut += 1
            assert len(guarded.text) < len(free.text) and not guarded.ended, method
    assert cut > 0
