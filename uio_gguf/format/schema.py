"""The UIO GGUF schema: every file name, metadata key and tensor name of ours, in one place.

A bundle is a directory of three files:

    model.gguf         the base model, a plain llama.cpp GGUF (nothing of ours inside)
    encoder.lora.gguf  the encoder LoRA (q, v) as a stock llama.cpp LoRA adapter
    uio.gguf           the UIO head: memory embedding, transfer-head LoRA (k, v), settings, fingerprints

The converter writes these names, the runtime and `uio-gguf info` read them, the tests check them;
nothing else spells these strings.
"""

from __future__ import annotations

FORMAT_VERSION = 1

# ----- files of a bundle -------------------------------------------------------------------------
MODEL_FILE = "model.gguf"
ENCODER_FILE = "encoder.lora.gguf"
HEAD_FILE = "uio.gguf"

# ----- llama.cpp's own keys that we write (adapter files) or read (base model) ---------------------
GENERAL_TYPE = "general.type"
GENERAL_ARCHITECTURE = "general.architecture"
GENERAL_FILE_TYPE = "general.file_type"  # llama.cpp's LLAMA_FTYPE_* of a model file (uio_gguf/format/derived.py)
ADAPTER_TYPE = "adapter.type"
ADAPTER_LORA_ALPHA = "adapter.lora.alpha"
ADAPTER_GENERAL_TYPE = "adapter"  # value of general.type in a LoRA adapter
ADAPTER_LORA = "lora"  # value of adapter.type
MODEL_GENERAL_TYPE = "model"  # value of general.type in a base model GGUF

# ----- the UIO head (uio.gguf) ---------------------------------------------------------------------
HEAD_GENERAL_TYPE = "uio-head"  # value of general.type in uio.gguf
KEY_FORMAT_VERSION = "uio.format_version"  # u32, FORMAT_VERSION
KEY_SEGMENT = "uio.segment_length"  # u32, l
KEY_RATIO = "uio.ratio"  # u32, r (k = l / r slots per segment)
KEY_ROPE_TYPE = "uio.rope_type"  # str, ROPE_NORM or ROPE_NEOX: how llama.cpp rotates K of this model
KEY_LAYER_COUNT = "uio.layer_count"  # u32
KEY_TRANSFER_ALPHA = "uio.transfer.lora_alpha"  # f32
KEY_TRANSFER_RANK = "uio.transfer.lora_rank"  # u32
KEY_ENCODER_ALPHA = "uio.encoder.lora_alpha"  # f32, a copy of encoder.lora.gguf's alpha
KEY_ENCODER_RANK = "uio.encoder.lora_rank"  # u32
KEY_BASE_FINGERPRINT = "uio.base.fingerprint"  # str, the training-time fingerprint of the base weights
KEY_MODEL_FINGERPRINT = "uio.model.fingerprint"  # str, gguf_fingerprint(model.gguf)
KEY_ENCODER_FINGERPRINT = "uio.encoder.fingerprint"  # str, gguf_fingerprint(encoder.lora.gguf)
KEY_TRAINED_STEPS = "uio.trained_steps"  # u32, optimizer steps of the checkpoint (0 = untrained)
KEY_HEAD_CHECKSUM = "uio.head.checksum"  # str, bundle.head_checksum of this file (absent in older heads)
# str, digest.file_sha256 of every byte of model.gguf / encoder.lora.gguf (absent in older heads, which are
# checked by their sampled fingerprints alone)
KEY_MODEL_CHECKSUM = "uio.model.checksum"
KEY_ENCODER_CHECKSUM = "uio.encoder.checksum"

ROPE_NORM = "norm"  # adjacent pairs (LLaMA after the converter's Q/K row permutation)
ROPE_NEOX = "neox"  # halves (Qwen2)

MEMORY_EMBEDDING = "uio.memory_embd"  # (n, d_model): n = 1 shared slot embedding or k distinct ones


def layer_tensor(layer: int, proj: str) -> str:
    """llama.cpp's name of an attention projection weight: proj in {"attn_q", "attn_k", "attn_v"}."""
    return f"blk.{layer}.{proj}.weight"


def lora_a(base_tensor: str) -> str:
    """LoRA A of a base tensor, shape (rank, n_in): llama.cpp's adapter naming."""
    return f"{base_tensor}.lora_a"


def lora_b(base_tensor: str) -> str:
    """LoRA B of a base tensor, shape (n_out, rank)."""
    return f"{base_tensor}.lora_b"


# The encoder adapter (encoder.lora.gguf) targets these projections, the transfer head (uio.gguf) those.
ENCODER_PROJECTIONS = ("attn_q", "attn_v")
TRANSFER_PROJECTIONS = ("attn_k", "attn_v")

# Hugging Face module name -> llama.cpp projection name.
HF_PROJECTION = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v"}
