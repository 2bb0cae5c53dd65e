"""model.gguf from a Hugging Face causal LM (LLaMA, Mistral, Qwen2): hyper-parameters, tokenizer,
weights in llama.cpp's names and row layout, stored as the chosen output type."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

from uio_gguf.convert.gguf_save import save
from uio_gguf.convert.outtypes import Outtype, llama_quantize, outtype, tensor_type
from uio_gguf.errors import UIOError
from uio_gguf.format import schema
from uio_gguf.train.arch import Arch, arch_of_config, to_llama_layout


def write_base_model(
    model,
    path: Path,
    kind: Outtype | str,
    add_tokenizer: Callable[[gguf.GGUFWriter], None],
    name: str | None = None,
    progress: bool = False,
) -> None:
    """Writes `model` (a transformers causal LM) to `path`; add_tokenizer(writer) adds the tokenizer keys."""
    kind = outtype(kind) if isinstance(kind, str) else kind
    if kind.native:
        _write(model, path, kind, add_tokenizer, name, progress)
        return
    intermediate = path.with_name(path.name + ".f32.tmp")
    try:
        _write(model, intermediate, outtype("f32"), add_tokenizer, name, progress)
        llama_quantize(intermediate, path, kind)
    finally:
        intermediate.unlink(missing_ok=True)


def _write(model, path: Path, kind: Outtype, add_tokenizer, name: str | None, progress: bool) -> None:
    from tqdm import tqdm

    config = model.config
    arch = arch_of_config(config)
    # A temporary file holds the tensor data as it is produced, so memory stays at one tensor.
    writer = gguf.GGUFWriter(path, arch.name, use_temp_file=True)
    writer.add_type(schema.MODEL_GENERAL_TYPE)
    if name:
        writer.add_name(name)
    add_hparams(writer, config, arch)
    writer.add_file_type(kind.file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer)
    weights = hf_weights(model)
    for gguf_name, data in tqdm(
        llama_tensors(weights, config, arch), total=len(weights), desc=path.name, unit="tensor", disable=not progress
    ):
        qtype = tensor_type(kind, data.shape)
        writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    save(writer)


def add_hparams(writer: gguf.GGUFWriter, config, arch: Arch) -> None:
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or n_head)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = dict(getattr(config, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    rope_type = rope.get("rope_type", "default")
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type != "default":
        raise UIOError(f"RoPE scaling '{rope_type}' of the base model is not supported by the converter")


def hf_weights(model) -> dict[str, object]:
    """name -> torch tensor, the base weights only (adapter wrappers of a UIO model left out)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if ".lora_" in name:
            continue
        out[name.replace(".base_layer", "")] = tensor
    if getattr(model.config, "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)  # llama.cpp reuses token_embd when output.weight is absent
    return out


def llama_tensors(weights: dict, config, arch: Arch):
    """(llama.cpp name, float32 numpy array in llama.cpp's row layout) for each HF weight."""
    names = gguf.get_tensor_name_map(arch.gguf_arch, config.num_hidden_layers)
    for hf_name, tensor in weights.items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UIOError(f"the converter does not know where tensor {hf_name} goes in llama.cpp's {arch.name}")
        proj = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else gguf_name
        data = tensor.detach().float().cpu().numpy()
        yield gguf_name, np.ascontiguousarray(to_llama_layout(arch, config, proj, data))
