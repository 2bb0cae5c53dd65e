"""uio.gguf: what the runtime needs beyond the model and the encoder adapter (docs/design.md §1): the
memory embedding, the transfer-head LoRA (k, v), the UIO settings and the fingerprints that bind the
head to its model.gguf and encoder.lora.gguf."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from uio_gguf.convert.adapters import LoraWeights
from uio_gguf.convert.gguf_save import save
from uio_gguf.format import schema
from uio_gguf.train.arch import Arch


@dataclass
class HeadContents:
    arch: Arch
    segment: int
    ratio: int
    n_layer: int
    memory_embedding: np.ndarray  # (1 or k, d_model)
    transfer: LoraWeights
    encoder: LoraWeights
    trained_steps: int
    base_fingerprint: str  # of the base weights at training time (train.base.fingerprint)
    model_fingerprint: str  # gguf_fingerprint(model.gguf)
    encoder_fingerprint: str  # gguf_fingerprint(encoder.lora.gguf)
    model_checksum: str | None = None  # file_sha256(model.gguf): every byte
    encoder_checksum: str | None = None  # file_sha256(encoder.lora.gguf)


def write_head(head: HeadContents, path: Path) -> None:
    """Writes uio.gguf twice: the second time with the checksum of what the first holds, as read back
    (bundle.head_checksum leaves its own key out, so both files give the same checksum)."""
    from uio_gguf.format.bundle import head_checksum
    from uio_gguf.format.gguf_file import read_gguf

    _write(head, path, None)
    _write(head, path, head_checksum(read_gguf(path)))


def _write(head: HeadContents, path: Path, checksum: str | None) -> None:
    writer = gguf.GGUFWriter(path, head.arch.name)
    writer.add_type(schema.HEAD_GENERAL_TYPE)
    writer.add_uint32(schema.KEY_FORMAT_VERSION, schema.FORMAT_VERSION)
    writer.add_uint32(schema.KEY_SEGMENT, head.segment)
    writer.add_uint32(schema.KEY_RATIO, head.ratio)
    writer.add_string(schema.KEY_ROPE_TYPE, head.arch.rope_type)
    writer.add_uint32(schema.KEY_LAYER_COUNT, head.n_layer)
    writer.add_uint32(schema.KEY_TRANSFER_RANK, head.transfer.rank)
    writer.add_float32(schema.KEY_TRANSFER_ALPHA, head.transfer.alpha)
    writer.add_uint32(schema.KEY_ENCODER_RANK, head.encoder.rank)
    writer.add_float32(schema.KEY_ENCODER_ALPHA, head.encoder.alpha)
    writer.add_uint32(schema.KEY_TRAINED_STEPS, head.trained_steps)
    writer.add_string(schema.KEY_BASE_FINGERPRINT, head.base_fingerprint)
    writer.add_string(schema.KEY_MODEL_FINGERPRINT, head.model_fingerprint)
    writer.add_string(schema.KEY_ENCODER_FINGERPRINT, head.encoder_fingerprint)
    for key, value in (
        (schema.KEY_MODEL_CHECKSUM, head.model_checksum),
        (schema.KEY_ENCODER_CHECKSUM, head.encoder_checksum),
    ):
        if value is not None:
            writer.add_string(key, value)
    if checksum is not None:
        writer.add_string(schema.KEY_HEAD_CHECKSUM, checksum)
    writer.add_tensor(schema.MEMORY_EMBEDDING, np.ascontiguousarray(head.memory_embedding, dtype=np.float32))
    for name, data in head.transfer.tensors():
        writer.add_tensor(name, data)
    save(writer)
