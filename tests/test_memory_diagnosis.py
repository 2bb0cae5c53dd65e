"""The memory diagnosis (uio_gguf.train.memory_diagnosis) scores what the runtime computes: its default
layout is the training decoder's [memory ; raw window], its no-memory and sliding layouts are plain
forwards, and its attention shares account for every cell."""

from __future__ import annotations

import math

import pytest
import torch

SEGMENT, RATIO = 16, 4


@pytest.fixture(scope="module")
def setup(make_tiny_checkpoint):
    from uio_gguf.train.memory_diagnosis import compress

    _, model, _ = make_tiny_checkpoint("llama", segment=SEGMENT, ratio=RATIO)
    model.eval()
    ids = torch.randint(3, model.base.config.vocab_size, (8 * SEGMENT + 1,), generator=torch.Generator().manual_seed(0))
    ids = ids.tolist()
    return model, ids, compress(model, ids, batch=3)


def _plain_nll(model, context: list[int]) -> float:
    inputs, targets = torch.tensor([context[:-1]]), torch.tensor(context[-SEGMENT:])
    with torch.no_grad():
        logits = model.base(input_ids=inputs).logits[0, -SEGMENT:]
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum").item()


def test_default_layout_is_the_training_decoder(setup):
    from uio_gguf.train.memory_diagnosis import Layout, score_segment

    model, ids, memory = setup
    t, raw_window = 7, 2 * SEGMENT  # segments 6 and 7 raw, the memory of 0..5 before them
    nll = score_segment(model, ids, memory, t, raw_window, Layout())[0]
    h = memory[:6].permute(1, 0, 2, 3).reshape(1, model.n_layers, 6 * model.config.slots, -1)
    raw = torch.tensor([ids[6 * SEGMENT : 8 * SEGMENT + 1]])
    with torch.no_grad():
        logits = model.decode(raw[:, :-1], h)[0, -SEGMENT:]
    expected = torch.nn.functional.cross_entropy(logits.float(), raw[0, -SEGMENT:], reduction="sum").item()
    assert nll == pytest.approx(expected, rel=1e-5)
    # a scale of 1 changes nothing; a scale of V changes the loss (the memory is read)
    assert score_segment(model, ids, memory, t, raw_window, Layout(k_scale=1.0, v_scale=1.0))[0] == nll
    assert score_segment(model, ids, memory, t, raw_window, Layout(v_scale=0.0))[0] != pytest.approx(nll, rel=1e-4)


def test_layouts_without_memory_are_plain_forwards(setup):
    from uio_gguf.train.memory_diagnosis import Layout, score_segment, sliding_segment

    model, ids, memory = setup
    t = 7
    raw_only = score_segment(model, ids, memory, t, 2 * SEGMENT, Layout(memory=False))[0]
    assert raw_only == pytest.approx(_plain_nll(model, ids[6 * SEGMENT : 8 * SEGMENT + 1]), rel=1e-5)
    # a window that holds everything is full attention; a small one keeps the first 4 tokens
    assert sliding_segment(model, ids, t, 10**6) == pytest.approx(_plain_nll(model, ids[: 8 * SEGMENT + 1]), rel=1e-5)
    cells = 4 + 3 * SEGMENT
    expected = _plain_nll(model, ids[:4] + ids[(t - 2) * SEGMENT : (t + 1) * SEGMENT + 1])
    assert sliding_segment(model, ids, t, cells) == pytest.approx(expected, rel=1e-5)


def test_attention_shares_account_for_every_cell(setup):
    from uio_gguf.train.memory_diagnosis import Layout, attention_by_layer

    model, ids, memory = setup
    rows = attention_by_layer(model, ids, memory, 7, 2 * SEGMENT, Layout(sinks=4))
    assert len(rows) == model.n_layers
    for r in rows:
        assert r["sinks"] + r["memory"] + r["raw"] == pytest.approx(1.0, abs=1e-4)
        assert sum(r["memory_by_age"]) == pytest.approx(r["memory"], abs=1e-5)
        assert r["sinks"] > 0 and r["memory"] > 0 and not math.isnan(r["k_memory"])
