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


def test_norm_matched_k_scales_give_the_memory_the_raw_windows_k_norm(setup):
    from uio_gguf.train.memory_diagnosis import Layout, norm_matched_k_scales, score_segment

    model, ids, memory = setup
    t, raw_window, n_mem = 7, 2 * SEGMENT, 6 * model.config.slots
    plain, _, _, plain_cache = score_segment(model, ids, memory, t, raw_window, Layout())
    per_layer, per_head = norm_matched_k_scales(model, ids, memory, t, raw_window)
    assert len(per_layer) == len(per_head) == model.n_layers
    assert all(len(heads) == model.base.config.num_key_value_heads for heads in per_head)
    # the scaled memory K rows take the mean norm the raw window's rows have without the scale (the raw
    # rows themselves move a little with the scale: they are read through the memory in earlier layers)
    scaled_layer = score_segment(model, ids, memory, t, raw_window, Layout(k_scale=per_layer))
    scaled_head = score_segment(model, ids, memory, t, raw_window, Layout(k_scale=per_head))
    for index, reference in enumerate(plain_cache.layers):
        raw = reference.keys[0].norm(dim=-1)[:, n_mem:]  # (heads, raw cells)
        by_layer = scaled_layer[3].layers[index].keys[0].norm(dim=-1)[:, :n_mem]
        by_head = scaled_head[3].layers[index].keys[0].norm(dim=-1)[:, :n_mem]
        assert by_layer.mean().item() == pytest.approx(raw.mean().item(), rel=1e-5)
        assert torch.allclose(by_head.mean(1), raw.mean(1), rtol=1e-5)
    # a scale per layer or per head that is the same everywhere is the uniform scale, which moves the loss
    uniform = score_segment(model, ids, memory, t, raw_window, Layout(k_scale=3.0))[0]
    heads = model.base.config.num_key_value_heads
    for scale in ((3.0,) * model.n_layers, ((3.0,) * heads,) * model.n_layers):
        assert score_segment(model, ids, memory, t, raw_window, Layout(k_scale=scale))[0] == pytest.approx(uniform)
    assert uniform != pytest.approx(plain, rel=1e-5)  # the tiny model attends nearly evenly: a small move
