"""model.gguf in other types than f32 stays close to the Hugging Face model, and its tokenizer tokenizes
like the Hugging Face one.

The models here tie the output layer to the embeddings (as SmolLM2 and small Qwen2 do): their logits
then have a clear winner at most positions, so top-1 agreement measures the converter and not the
coin-flips of a flat random distribution (an untied random model's top two logits differ by less than
q8_0's rounding)."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from tests.helpers import llama_logits

N_TOKENS = 32
# outtype: (least top-1 agreement, bound on the mean KL(HF || llama.cpp) in nats); observed on these
# models: f16 100% / 3e-9, bf16 100% / 2e-7, q8_0 100% / 2e-6, q4_k_m (mostly q5_0 fallbacks: rows of 64
# are too short for k-quants) 90.6-96.9% / 3e-5.
BOUNDS = {"f16": (0.95, 1e-6), "bf16": (0.95, 1e-5), "q8_0": (0.95, 1e-4), "q4_k_m": (0.85, 1e-3)}


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    p = torch.log_softmax(torch.as_tensor(p_logits, dtype=torch.float64), -1)
    q = torch.log_softmax(torch.as_tensor(q_logits, dtype=torch.float64), -1)
    return (p.exp() * (p - q)).sum(-1).numpy()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tied(request, make_tiny_model_dir, prose):
    """(arch, HF model dir, HF model, tokenizer, tokens, HF logits)."""
    from uio_gguf.train.base import load_base

    directory = make_tiny_model_dir(request.param, tie_word_embeddings=True, random_biases=request.param == "qwen2")
    model, tokenizer = load_base(directory)
    tokens = tokenizer(prose[:2000], add_special_tokens=False)["input_ids"][:N_TOKENS]
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].numpy()
    return request.param, directory, model, tokenizer, tokens, logits


def _write(tied, tmp_path, outtype: str):
    from uio_gguf.convert.base_model import write_base_model
    from uio_gguf.convert.tokenizer import write_hf_tokenizer

    _, directory, model, tokenizer, _, _ = tied
    path = tmp_path / f"model-{outtype}.gguf"
    add_tokenizer = partial(
        write_hf_tokenizer, tokenizer=tokenizer, directory=directory, vocab_size=model.config.vocab_size
    )
    write_base_model(model, path, outtype, add_tokenizer)
    return path


@pytest.mark.parametrize("outtype", list(BOUNDS))
def test_quantized_model_stays_close(outtype, tied, tmp_path):
    from uio_gguf.format.gguf_file import read_gguf

    arch, _, _, _, tokens, ref = tied
    path = _write(tied, tmp_path, outtype)
    assert "output.weight" not in read_gguf(path).tensors  # tied: llama.cpp reuses token_embd
    ours = llama_logits(path, tokens)
    agreement = (ours.argmax(-1) == ref.argmax(-1)).mean()
    kl = kl_divergence(ref, ours).mean()
    print(
        f"{arch} {outtype}: top-1 agreement {agreement:.1%}, mean KL {kl:.1e}, max |dlogit| {np.abs(ours - ref).max():.1e}"
    )
    least, bound = BOUNDS[outtype]
    assert agreement >= least and kl < bound


def test_tokenizer_and_special_tokens_match_hf(tied, tmp_path, prose):
    """llama.cpp tokenizes a real text (digits, punctuation, line breaks) into the HF tokenizer's ids,
    and knows the same special tokens and chat template."""
    import llama_cpp

    from uio_gguf.format.gguf_file import read_gguf

    _, _, _, tokenizer, _, _ = tied
    path = _write(tied, tmp_path, "f16")
    text = prose[:3000] + "\nIn 2024, 12345 cats & 3.14 dogs!\n\n\tTabs\r\n"
    vocab_only = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    assert (
        vocab_only.tokenize(text.encode(), add_bos=False, special=False)
        == tokenizer(text, add_special_tokens=False)["input_ids"]
    )
    meta = read_gguf(path).metadata
    assert meta["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert meta["tokenizer.ggml.add_bos_token"] is False  # the HF tokenizer adds none
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
