"""Output types of model.gguf: the ones the gguf package writes itself, and llama.cpp's quantizer for
the rest (k-quants and friends), run on an f32 intermediate file."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import gguf

from uio_gguf.errors import UIOError

Q = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType


@dataclass(frozen=True)
class Outtype:
    name: str
    file_type: int  # general.file_type (llama_ftype)
    tensor_type: gguf.GGMLQuantizationType | None = None  # written by gguf-py; None: llama.cpp quantizes

    @property
    def native(self) -> bool:
        return self.tensor_type is not None


NATIVE = {
    "f32": Outtype("f32", FT.ALL_F32, Q.F32),
    "f16": Outtype("f16", FT.MOSTLY_F16, Q.F16),
    "bf16": Outtype("bf16", FT.MOSTLY_BF16, Q.BF16),
    "q8_0": Outtype("q8_0", FT.MOSTLY_Q8_0, Q.Q8_0),
}
# llama.cpp types that need no importance matrix.
QUANTIZER = (
    "q4_0",
    "q4_1",
    "q5_0",
    "q5_1",
    "q2_k",
    "q3_k_s",
    "q3_k_m",
    "q3_k_l",
    "q4_k_s",
    "q4_k_m",
    "q5_k_s",
    "q5_k_m",
    "q6_k",
    "iq4_nl",
    "iq4_xs",
)
OUTTYPES = (*NATIVE, *QUANTIZER)


def outtype(name: str) -> Outtype:
    key = name.lower()
    if key in NATIVE:
        return NATIVE[key]
    if key in QUANTIZER:
        return Outtype(key, int(getattr(FT, f"MOSTLY_{key.upper()}")))
    raise UIOError(f"unknown output type {name!r} (choose from {', '.join(OUTTYPES)})")


def tensor_type(kind: Outtype, shape: tuple[int, ...]) -> gguf.GGMLQuantizationType:
    """What a tensor is stored as: vectors (norms, biases) stay f32, as llama.cpp expects; matrices get
    the output type when their rows split into its blocks, else f16."""
    if len(shape) < 2 or kind.tensor_type == Q.F32:
        return Q.F32
    block, _ = gguf.GGML_QUANT_SIZES[kind.tensor_type]
    return kind.tensor_type if shape[-1] % block == 0 else Q.F16


def llama_quantize(source: Path, target: Path, kind: Outtype) -> None:
    """llama.cpp's own quantizer (llama_model_quantize), as `llama-quantize` runs it."""
    import llama_cpp
    from llama_cpp import _logger

    _logger.set_verbose(False)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = kind.file_type
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
        raise UIOError(f"llama.cpp could not quantize {source.name} to {kind.name}")
