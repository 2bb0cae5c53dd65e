"""A fast reader of a GGUF file's header: metadata, tensor table, where the tensor data lies.

Why not gguf.GGUFReader: it turns every array element into a numpy view, which takes seconds on a
model with a 50K-token vocabulary, and the runtime opens a bundle at every start. Here long arrays are
skipped (only their length and type are kept), and tensors are read on demand with numpy.

Format (little-endian, version 2 and 3): magic "GGUF", u32 version, u64 tensor count, u64 KV count;
KV pairs (string key, u32 type, value); tensor infos (string name, u32 n_dims, u64 ne[n_dims], u32 ggml
type, u64 offset into the data section); the data section starts at the next multiple of
general.alignment (default 32).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from uio_gguf.errors import UIOError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"
# Arrays longer than this are summarised (ArrayInfo), not read: vocabularies, merges, token types.
MAX_ARRAY_READ = 256

_SCALARS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


@dataclass(frozen=True)
class ArrayInfo:
    """A long metadata array, not read: its element type and length."""

    type: GGUFValueType
    length: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (outermost first): the reverse of ggml's ne
    type: GGMLQuantizationType
    offset: int  # absolute, in bytes from the start of the file
    n_bytes: int


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict = field(default_factory=dict)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    data_offset: int = 0  # where the tensor data section starts
    size: int = 0  # file size in bytes

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def tensor(self, name: str) -> np.ndarray:
        """A float32 copy of an F32/F16 tensor, numpy-shaped (outermost first)."""
        info = self.tensors.get(name)
        if info is None:
            raise UIOError(f"{self.path.name} has no tensor {name}")
        dtypes = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}
        if info.type not in dtypes:
            raise UIOError(f"{self.path.name}: tensor {name} is {info.type.name}, expected F32 or F16")
        count = int(np.prod(info.shape))
        with open(self.path, "rb") as f:
            f.seek(info.offset)
            data = np.fromfile(f, dtype=dtypes[info.type], count=count)
        return data.astype(np.float32).reshape(info.shape)


class _Cursor:
    """Reads little-endian values from a file, raising EOFError past its end."""

    def __init__(self, f):
        self.f = f

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise EOFError
        return data

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.read(self.unpack("<Q")).decode("utf-8", errors="replace")

    def skip(self, n: int) -> None:
        self.f.seek(n, 1)

    def value(self, vtype: GGUFValueType):
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            sub = GGUFValueType(self.unpack("<I"))
            length = self.unpack("<Q")
            if length <= MAX_ARRAY_READ:
                return [self.value(sub) for _ in range(length)]
            self.skip_array(sub, length)
            return ArrayInfo(sub, length)
        return self.unpack(_SCALARS[vtype])

    def skip_array(self, sub: GGUFValueType, length: int) -> None:
        if sub == GGUFValueType.STRING:
            # Each string carries its own length: hop from one to the next.
            for _ in range(length):
                self.skip(self.unpack("<Q"))
        elif sub == GGUFValueType.ARRAY:
            raise ValueError("nested long arrays are not supported")
        else:
            self.skip(struct.calcsize(_SCALARS[sub]) * length)


def read_gguf(path: str | Path) -> GGUFFile:
    """Parses the header of a GGUF file; UIOError (one line) if it is not one, or is cut short."""
    path = Path(path)
    if not path.is_file():
        raise UIOError(f"file not found: {path}")
    size = path.stat().st_size
    try:
        with open(path, "rb", buffering=1 << 20) as f:
            if f.read(4) != MAGIC:
                raise UIOError(f"not a GGUF file: {path}")
            cur = _Cursor(f)
            version = cur.unpack("<I")
            if version not in (2, 3):
                raise UIOError(f"{path}: unsupported GGUF version {version}")
            n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
            out = GGUFFile(path=path, version=version, size=size)
            for _ in range(n_kv):
                key = cur.string()
                out.metadata[key] = cur.value(GGUFValueType(cur.unpack("<I")))
            infos = []
            for _ in range(n_tensors):
                name = cur.string()
                ne = [cur.unpack("<Q") for _ in range(cur.unpack("<I"))]
                infos.append((name, ne, GGMLQuantizationType(cur.unpack("<I")), cur.unpack("<Q")))
            alignment = int(out.metadata.get(ALIGNMENT_KEY, DEFAULT_ALIGNMENT))
            end = f.tell()
    except EOFError:
        raise UIOError(f"{path} is truncated (its GGUF header is cut short)") from None
    except (ValueError, UnicodeDecodeError, struct.error) as err:
        raise UIOError(f"{path} is not a valid GGUF file ({err})") from None
    out.data_offset = -(-end // alignment) * alignment
    for name, ne, qtype, rel in infos:
        block, type_size = GGML_QUANT_SIZES[qtype]
        n_bytes = int(np.prod(ne)) // block * type_size
        out.tensors[name] = TensorInfo(name, tuple(reversed(ne)), qtype, out.data_offset + rel, n_bytes)
    data_end = max((t.offset + t.n_bytes for t in out.tensors.values()), default=out.data_offset)
    if data_end > size:
        raise UIOError(f"{path} is truncated ({size} bytes, its tensors need {data_end})")
    return out
