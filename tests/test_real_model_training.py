"""A few training steps of the real embedded SmolLM2-135M (dequantised from its GGUF) on CPU."""

import random

import pytest
import torch

from uio_gguf.train.base import fingerprint, load_base
from uio_gguf.train.estimators import Crop, estimate_gradient
from uio_gguf.train.model import UIOConfig, UIOModel

pytestmark = pytest.mark.slow


def test_training_steps_lower_the_loss_on_a_real_batch(embedded_gguf, prose):
    base, tokenizer = load_base(embedded_gguf)
    assert base.config.model_type == "llama" and base.config.num_hidden_layers == 30
    assert fingerprint(base) == fingerprint(base)
    torch.manual_seed(0)
    model = UIOModel(base, UIOConfig(segment=64, ratio=8, rank=8, alpha=32))
    ids = tokenizer(prose[:20_000], add_special_tokens=False)["input_ids"]
    crop = Crop(torch.tensor([ids[: 4 * 64 + 1]]), 64)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    rng = random.Random(0)
    losses = []
    for _ in range(6):
        optimizer.zero_grad(set_to_none=True)
        losses.append(estimate_gradient(model, crop, "unbiased", 2, rng))
        torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), 1.0)
        optimizer.step()
    with torch.no_grad():
        memory = [model.encode(crop.window(s)) for s in range(1, 4)]
        final = (
            sum(
                model.window_loss(crop.window(t), crop.targets(t), torch.cat(memory[: t - 1], 2)).item()
                for t in range(2, 5)
            )
            / 3
        )
    print("losses", [round(x, 4) for x in losses], "final", round(final, 4))
    assert final < losses[0] - 0.05
