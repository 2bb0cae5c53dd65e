"""Weight formats of a bundle's model: the model file as shipped, or a copy derived from it in another
llama.cpp file type, made once and kept in the cache folder (models/).

Why: the embedded SmolLM2 is Q4_1, which llama.cpp 0.3.36's fast batched CPU kernels (llamafile's sgemm,
the Q4_0 repack) do not take, so a prompt of many tokens (the encoder's segments, a recall) runs at the
slow generic rate (docs/benchmarks.md: 190 tokens/s against 324 for the same weights in F16). The heads
were trained in PyTorch on the Q4_1 weights dequantised (train/base.py), so an F16 copy dequantised from
them is within fp16 rounding of what they were trained against; Q8_0 and Q4_0 copies are not (a second
quantisation), and are only candidates to measure.

The copy is written by llama.cpp's own quantizer (uio_gguf.llamacpp.api.quantize_model) under a name
keyed by the source file's sha256, atomically, beside a record of its own sha256: a copy whose bytes no
longer match the record is damaged and made again.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import llama_cpp

from uio_gguf.atomic import atomic_file
from uio_gguf.cache import cache_root
from uio_gguf.errors import UIOError
from uio_gguf.format import schema
from uio_gguf.format.digest import cached_sha256, file_sha256
from uio_gguf.format.gguf_file import read_gguf

MODEL = "model"  # the bundle's model file as it is
AUTO = "auto"  # F16 for a quantized model (the fast kernels, within fp16 of its weights), else the model as it is
# format -> llama.cpp file type (general.file_type)
FILE_TYPES = {
    "f32": llama_cpp.LLAMA_FTYPE_ALL_F32,
    "f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
    "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    "q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1,
}
FORMATS = (AUTO, MODEL, *FILE_TYPES)
# Types that hold a quantized model's weights (dequantised) to within fp16 rounding or better.
FLOAT_TYPES = {llama_cpp.LLAMA_FTYPE_ALL_F32, llama_cpp.LLAMA_FTYPE_MOSTLY_F16, llama_cpp.LLAMA_FTYPE_MOSTLY_BF16}


def file_type(path: str | Path) -> int | None:
    """The model file's llama.cpp file type (general.file_type; None when it does not say)."""
    value = read_gguf(path).get(schema.GENERAL_FILE_TYPE)
    return None if value is None else int(value)


def resolve(path: str | Path, fmt: str) -> str:
    """The format `fmt` stands for on this model file: MODEL when the file already is that type (or fmt is
    MODEL), else a name of FILE_TYPES. AUTO: f16 for a quantized model, the model itself otherwise."""
    if fmt not in FORMATS:
        raise UIOError(f"unknown weight format {fmt!r} (one of {', '.join(FORMATS)})")
    if fmt == MODEL:
        return MODEL
    own = file_type(path)
    if fmt == AUTO:
        return MODEL if own is None or own in FLOAT_TYPES else "f16"
    return MODEL if own == FILE_TYPES[fmt] else fmt


def label(path: str | Path, fmt: str) -> str:
    """What the weights of `fmt` are, for reports: the file type's name ("q4_1", "f16", ...)."""
    resolved = resolve(path, fmt)
    if resolved != MODEL:
        return resolved
    own = file_type(path)
    names = {v: k for k, v in FILE_TYPES.items()} | {llama_cpp.LLAMA_FTYPE_MOSTLY_BF16: "bf16"}
    return names.get(own, f"file type {own}")


def derived_path(source_digest: str, fmt: str) -> Path:
    """Where the copy of the model with sha256 `source_digest` in format `fmt` is kept."""
    return cache_root() / "models" / f"{source_digest.removeprefix('sha256:')[:32]}.{fmt}.gguf"


def _record(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _intact(path: Path) -> bool:
    """The copy is there and its bytes are those recorded when it was made."""
    record = _record(path)
    if not path.is_file():
        return False
    try:
        recorded = record.read_text().strip()
    except OSError:
        recorded = ""
    if recorded and cached_sha256(path) == recorded:
        return True
    warnings.warn(f"the derived model {path} is damaged or incomplete; making it again", stacklevel=3)
    return False


def weights_path(
    source: str | Path, fmt: str, source_digest: str | None = None, notice: Callable[[str], None] | None = None
) -> Path:
    """The model file for weight format `fmt`: `source` itself (resolve() gives MODEL), or its copy in
    that format, made now (a few seconds; `notice` gets one line, default stderr) if the cache has no
    intact one. source_digest: sha256 of the source when the caller knows it (a bundle does)."""
    source = Path(source)
    fmt = resolve(source, fmt)
    if fmt == MODEL:
        return source
    target = derived_path(source_digest or cached_sha256(source), fmt)
    if _intact(target):
        return target
    say = notice or (lambda line: print(line, file=sys.stderr, flush=True))
    say(f"uio-gguf: writing the {fmt.upper()} copy of {source.name} for the fast CPU kernels (once): {target}")
    with atomic_file(target, suffix=".gguf") as tmp:
        from uio_gguf.llamacpp.api import quantize_model

        quantize_model(source, tmp, FILE_TYPES[fmt])
        with atomic_file(_record(target)) as record:
            record.write_text(file_sha256(tmp) + "\n")
    if not _intact(target):
        raise UIOError(f"the {fmt} copy of {source} could not be written intact to {target}")
    return target
