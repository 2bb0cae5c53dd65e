"""Mask and positions of the encoder, and the independence structure of docs/design.md §1."""

import torch

from uio_gguf.train.estimators import Crop
from uio_gguf.train.model import step_expansion_mask
from uio_gguf.train.tiny import tiny_uio

SEG, RATIO = 16, 4
SLOTS = SEG // RATIO


def _perturb(tokens: torch.Tensor, j: int) -> torch.Tensor:
    changed = tokens.clone()
    changed[:, j] = (changed[:, j] + 17) % 256
    return changed


def test_slot_sees_token_j_iff_j_before_its_position():
    model = tiny_uio(segment=SEG, ratio=RATIO)
    tokens = torch.randint(0, 256, (1, SEG), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.encode(tokens)
        for j in range(SEG):
            out = model.encode(_perturb(tokens, j))
            for i in range(SLOTS):
                # Layer 0's input norm at a slot row is norm(e_mem): it sees nothing by construction.
                changed = (out[0, 1:, i] - ref[0, 1:, i]).abs().max().item() > 1e-6
                assert changed == (j < (i + 1) * RATIO), (j, i)
            assert torch.equal(out[0, 0], ref[0, 0])


def test_slots_do_not_see_each_other_and_tokens_ignore_slots():
    model = tiny_uio(segment=SEG, ratio=RATIO, distinct_slots=True)
    tokens = torch.randint(0, 256, (1, SEG), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model.encoder_states(tokens)
        for i in range(SLOTS):
            model.memory_embedding[i] += 1.0
            out = model.encoder_states(tokens)
            model.memory_embedding[i] -= 1.0
            assert torch.equal(out[:, :, :SEG], ref[:, :, :SEG]), "ordinary tokens saw a slot"
            for other in range(SLOTS):
                moved = (out[:, :, SEG + other] - ref[:, :, SEG + other]).abs().max().item() > 1e-6
                assert moved == (other == i), (i, other)


def test_mask_shape_matches_design():
    allowed = step_expansion_mask(SEG, RATIO, torch.float32)[0, 0] == 0
    assert allowed.shape == (SEG + SLOTS, SEG + SLOTS)
    assert not allowed[:SEG, SEG:].any()
    assert torch.equal(allowed[:SEG, :SEG], torch.ones(SEG, SEG, dtype=torch.bool).tril())
    for i in range(SLOTS):
        assert allowed[SEG + i].nonzero().flatten().tolist() == list(range((i + 1) * RATIO)) + [SEG + i]


def test_memory_of_segment_depends_on_that_segment_alone_and_batches_agree():
    model = tiny_uio(segment=SEG, ratio=RATIO)
    segments = torch.randint(0, 256, (3, SEG), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        together = model.encode(segments)
        alone = torch.cat([model.encode(segments[i : i + 1]) for i in range(3)])
        assert torch.allclose(together, alone, atol=1e-6)
        other = segments.clone()
        other[1] = torch.randint(0, 256, (SEG,), generator=torch.Generator().manual_seed(4))
        changed = model.encode(other)
        assert torch.allclose(changed[0], together[0], atol=1e-6) and torch.allclose(changed[2], together[2], atol=1e-6)
        assert not torch.allclose(changed[1], together[1], atol=1e-3)


def test_loss_of_segment_t_ignores_later_segments():
    model = tiny_uio(segment=SEG, ratio=RATIO)
    T = 5
    tokens = torch.randint(0, 256, (1, T * SEG + 1), generator=torch.Generator().manual_seed(5))

    def losses(toks):
        crop = Crop(toks, SEG)
        with torch.no_grad():
            memory = [model.encode(crop.window(s)) for s in range(1, T)]
            return [
                model.window_loss(crop.window(t), crop.targets(t), torch.cat(memory[: t - 1], dim=2)).item()
                for t in range(2, T + 1)
            ]

    ref = losses(tokens)
    t = 3
    later = tokens.clone()
    later[:, t * SEG + 1 :] = (later[:, t * SEG + 1 :] + 5) % 256  # segments after t, except J_t's last target
    out = losses(later)
    assert out[: t - 1] == ref[: t - 1]  # J_2..J_t bit-identical
    assert all(abs(a - b) > 1e-6 for a, b in zip(out[t - 1 :], ref[t - 1 :]))  # J_{t+1}.. do change


def test_decoder_with_memory_prefix_equals_plain_attention_over_memory_kv():
    """The decoder's cache prefix is exactly 'memory rows attended like earlier tokens': with no memory
    the decoder is the unmodified model."""
    model = tiny_uio(segment=SEG, ratio=RATIO)
    tokens = torch.randint(0, 256, (1, SEG), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        plain = model.base(input_ids=tokens).logits
        assert torch.allclose(model.decode(tokens, None), plain, atol=1e-5)
        memory = model.encode(tokens)
        with_memory = model.decode(tokens, memory)
        assert not torch.allclose(with_memory, plain, atol=1e-3)


def test_trained_parameters_stay_float32_over_a_bf16_base():
    """On CUDA the base runs in bf16; AdamW on bf16 weights would drop small updates, so everything trained
    is float32, and one optimizer step moves the memory embedding by a step far below bf16's resolution."""
    from uio_gguf.train.model import UIOConfig, UIOModel
    from uio_gguf.train.tiny import tiny_base

    base = tiny_base().to(torch.bfloat16)
    model = UIOModel(base, UIOConfig(segment=SEG, ratio=RATIO, rank=4, alpha=8.0))
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())
    before = model.memory_embedding.detach().clone()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5, weight_decay=0.0)
    crop = Crop(torch.randint(0, 256, (1, 2 * SEG + 1), generator=torch.Generator().manual_seed(3)), SEG)
    model.window_loss(crop.window(2), crop.targets(2), model.encode(crop.window(1))).backward()
    optimizer.step()
    moved = (model.memory_embedding.detach() - before).abs().max().item()
    assert 0 < moved < 1e-4  # bf16 near |x| ~ 1 rounds steps below ~4e-3 away
