"""Loading the frozen base model (a Hugging Face directory or a GGUF file) and fingerprinting it."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch

from uio_gguf.errors import UIOError

# Decoders whose attention is exactly docs/design.md §1 (RMSNorm input, RoPE, q/k/v/o projections, GQA).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def check_architecture(config) -> None:
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UIOError(
            f"base model is '{config.model_type}', not a LLaMA-family decoder "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )


def _split_path(path: str | Path) -> tuple[str, dict]:
    """A GGUF file is loaded through transformers' `gguf_file=` (dequantised); a directory as usual."""
    path = Path(path)
    if not path.exists():
        raise UIOError(f"base model not found: {path}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise UIOError(f"base model must be a Hugging Face directory or a .gguf file: {path}")
        return str(path.parent), {"gguf_file": path.name}
    if not (path / "config.json").exists():
        raise UIOError(f"no config.json in {path}: not a Hugging Face model directory")
    return str(path), {}


def load_config(path: str | Path):
    """The base model's Hugging Face config alone (no weights), checked to be a supported decoder."""
    from transformers import AutoConfig

    where, extra = _split_path(path)
    try:
        config = AutoConfig.from_pretrained(where, **extra)
    except (ValueError, OSError, KeyError) as err:
        raise UIOError(f"cannot read the base model's config at {path}: {err}") from None
    check_architecture(config)
    return config


def load_base(path: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """Returns (model, tokenizer): the causal LM frozen and in eval mode (no dropout)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, extra = _split_path(path)
    load_config(path)  # a foreign or damaged base fails here with one line, before the slow load
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, attn_implementation=attn_implementation, **extra)
    tokenizer = GGUFTokenizer(path) if extra else AutoTokenizer.from_pretrained(where)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


class GGUFTokenizer:
    """llama.cpp's own tokenizer of a GGUF base, behind the slice of the HF tokenizer API that training
    uses. Why: transformers' rebuild of a GGUF tokenizer can differ from llama.cpp's (on SmolLM2 it
    drops the split-every-digit step), and training must see the token ids the runtime will feed."""

    def __init__(self, path: str | Path):
        self._path = path

    @functools.cached_property
    def _vocab(self):
        # Loaded on first use: a run that reuses its tokens.npz needs no llama.cpp (e.g. on a GPU box).
        from uio_gguf.llamacpp.api import Model

        return Model(self._path, vocab_only=True)

    @property
    def eos_token_id(self) -> int:
        return self._vocab.eos

    @property
    def chat_template(self) -> str | None:
        return self._vocab.chat_template()

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self._vocab.tokenize(text, add_special=add_special_tokens).tolist()}

    def decode(self, ids) -> str:
        return b"".join(self._vocab.piece(i) for i in ids).decode("utf-8", "replace")


def fingerprint(model) -> str:
    """sha256 over the base weights in float32 (name, shape, bytes), in name order.

    The same weights give the same fingerprint whether they came from a HF directory or were
    dequantised from a GGUF file, so the converter can check `--base-gguf` against a checkpoint.
    """
    digest = hashlib.sha256()
    digest.update(model.config.model_type.encode())
    for name, tensor in sorted(model.state_dict().items()):
        if ".lora_" in name:
            continue
        name = name.replace(".base_layer", "")  # the same weight before and after LoRA wrapping
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return "sha256:" + digest.hexdigest()
