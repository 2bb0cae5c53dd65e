"""A UIO checkpoint rebuilt from a converted head, so that a shipped or converted head can be trained
further (`uio-gguf train --init BUNDLE`) without the checkpoint it came from.

It undoes what convert/bundle_writer.py wrote: encoder.lora.gguf (encoder LoRA q, v) and uio.gguf
(memory embedding, transfer LoRA k, v, segment, ratio, base fingerprint). The converter stores these
float32 and only reorders the rows of LoRA B of q and k for llama.cpp's rope, so the weights come back
bit for bit. model.gguf is not needed: the base model is the one training is given (--base), and the
fingerprint recorded in uio.gguf must match it (train.loop checks, as for any --init checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import torch

from uio_gguf.errors import UIOError
from uio_gguf.format import schema
from uio_gguf.format.gguf_file import read_gguf
from uio_gguf.train.arch import arch_of_gguf, from_llama_layout
from uio_gguf.train.checkpoint import FORMAT, PEFT_PREFIX, write_checkpoint
from uio_gguf.train.model import ENCODER, TRANSFER

HF_MODULE = {proj: module for module, proj in schema.HF_PROJECTION.items()}  # attn_q -> q_proj


def is_bundle(directory: str | Path) -> bool:
    return (Path(directory) / schema.HEAD_FILE).is_file()


def checkpoint_from_bundle(bundle: str | Path, out: str | Path, base_config, base_path: str) -> Path:
    """Writes the checkpoint of the head in directory `bundle` to `out` and returns `out`.
    base_config: the Hugging Face config of the base (the row order of q and k depends on its heads)."""
    bundle = Path(bundle)
    for name in (schema.ENCODER_FILE, schema.HEAD_FILE):
        if not (bundle / name).is_file():
            raise UIOError(f"bundle {bundle} has no {name}")
    encoder, head = read_gguf(bundle / schema.ENCODER_FILE), read_gguf(bundle / schema.HEAD_FILE)
    if head.get(schema.GENERAL_TYPE) != schema.HEAD_GENERAL_TYPE:
        raise UIOError(f"{head.path} is not a UIO head (general.type {head.get(schema.GENERAL_TYPE)!r})")
    arch = arch_of_gguf(head.get(schema.GENERAL_ARCHITECTURE))
    n_layer = int(head.get(schema.KEY_LAYER_COUNT))
    if n_layer != base_config.num_hidden_layers:
        raise UIOError(f"the head in {bundle} has {n_layer} layers, the base model {base_config.num_hidden_layers}")
    ranks = {int(head.get(schema.KEY_ENCODER_RANK)), int(head.get(schema.KEY_TRANSFER_RANK))}
    alphas = {float(encoder.get(schema.ADAPTER_LORA_ALPHA)), float(head.get(schema.KEY_TRANSFER_ALPHA))}
    if len(ranks) != 1 or len(alphas) != 1:
        raise UIOError(f"the head in {bundle} has adapters of different rank or alpha, which training does not offer")

    def adapter(source, projections) -> dict[str, torch.Tensor]:
        tensors = {}
        for layer in range(n_layer):
            for proj in projections:
                base = schema.layer_tensor(layer, proj)
                key = f"{PEFT_PREFIX}model.layers.{layer}.self_attn.{HF_MODULE[proj]}"
                b = from_llama_layout(arch, base_config, proj, source.tensor(schema.lora_b(base)))
                tensors[f"{key}.lora_A.weight"] = torch.from_numpy(source.tensor(schema.lora_a(base)))
                tensors[f"{key}.lora_B.weight"] = torch.from_numpy(b.copy())
        return tensors

    config = {
        "format": FORMAT,
        "segment": int(head.get(schema.KEY_SEGMENT)),
        "ratio": int(head.get(schema.KEY_RATIO)),
        "rank": ranks.pop(),
        "alpha": alphas.pop(),
        "distinct_slots": head.tensor(schema.MEMORY_EMBEDDING).shape[0] > 1,
        "base": {
            "path": base_path,
            "model_type": base_config.model_type,
            "fingerprint": head.get(schema.KEY_BASE_FINGERPRINT),
        },
        "step": int(head.get(schema.KEY_TRAINED_STEPS, 0)),
        "from_bundle": str(bundle),
    }
    adapters = {
        ENCODER: adapter(encoder, schema.ENCODER_PROJECTIONS),
        TRANSFER: adapter(head, schema.TRANSFER_PROJECTIONS),
    }
    write_checkpoint(out, adapters, torch.from_numpy(head.tensor(schema.MEMORY_EMBEDDING)), config)
    return Path(out)
