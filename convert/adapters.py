"""The checkpoint's PEFT LoRA adapters in llama.cpp's layout, and encoder.lora.gguf: the encoder adapter
as a stock llama.cpp LoRA file (docs/design.md §4), loadable with llama_adapter_lora_init or `--lora`."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from uio_gguf.convert.gguf_save import save
from uio_gguf.errors import UIOError
from uio_gguf.format import schema
from uio_gguf.train.arch import Arch, to_llama_layout

# PEFT key of a LoRA matrix: base_model.model.model.layers.<L>.self_attn.<q_proj>.lora_<A|B>.weight
_PEFT_KEY = re.compile(r"\.layers\.(\d+)\.self_attn\.(\w+_proj)\.lora_([AB])\.weight$")


@dataclass
class LoraWeights:
    """One adapter: rank, alpha and per (layer, llama.cpp projection) the pair A (r, n_in), B (n_out, r),
    B already in llama.cpp's row layout."""

    rank: int
    alpha: float
    pairs: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]

    def tensors(self):
        """(llama.cpp tensor name, float32 array) in layer order, A before B."""
        for (layer, proj), (a, b) in sorted(self.pairs.items()):
            base = schema.layer_tensor(layer, proj)
            yield schema.lora_a(base), a
            yield schema.lora_b(base), b


def read_peft_adapter(directory: Path, arch: Arch, config, projections: tuple[str, ...]) -> LoraWeights:
    """A PEFT adapter directory of the checkpoint (adapter_config.json + adapter_model.safetensors)."""
    from peft.utils import CONFIG_NAME
    from safetensors.numpy import load_file

    from uio_gguf.train.checkpoint import ADAPTER_WEIGHTS

    try:
        settings = json.loads((directory / CONFIG_NAME).read_text())
        weights = load_file(str(directory / ADAPTER_WEIGHTS))
    except (OSError, ValueError) as err:
        raise UIOError(f"damaged adapter in the checkpoint ({directory.name}): {err}") from None
    found: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in weights.items():
        match = _PEFT_KEY.search(key)
        proj = schema.HF_PROJECTION.get(match.group(2)) if match else None
        if proj not in projections:
            raise UIOError(f"unexpected tensor {key} in the checkpoint's {directory.name} adapter")
        found.setdefault((int(match.group(1)), proj), {})[match.group(3)] = value.astype(np.float32)
    expected = {(layer, proj) for layer in range(config.num_hidden_layers) for proj in projections}
    if set(found) != expected or any(len(ab) != 2 for ab in found.values()):
        raise UIOError(
            f"the checkpoint's {directory.name} adapter does not cover {', '.join(projections)} of every layer"
        )
    pairs = {
        (layer, proj): (ab["A"], np.ascontiguousarray(to_llama_layout(arch, config, proj, ab["B"])))
        for (layer, proj), ab in found.items()
    }
    return LoraWeights(rank=int(settings["r"]), alpha=float(settings["lora_alpha"]), pairs=pairs)


def write_encoder_adapter(lora: LoraWeights, arch: Arch, path: Path) -> None:
    writer = gguf.GGUFWriter(path, arch.name)
    writer.add_type(schema.ADAPTER_GENERAL_TYPE)
    writer.add_string(schema.ADAPTER_TYPE, schema.ADAPTER_LORA)
    writer.add_float32(schema.ADAPTER_LORA_ALPHA, lora.alpha)
    for name, data in lora.tensors():
        writer.add_tensor(name, data)
    save(writer)
