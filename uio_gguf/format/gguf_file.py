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

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, Keys

from uio_gguf.errors import UIOError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = Keys.General.ALIGNMENT
# Arrays longer than this are summarised (ArrayInfo), not read: vocabularies, merges, token types.
MAX_ARRAY_READ = 256
MAX_ARRAY_DEPTH = 4  # arrays of arrays: GGUF allows them, no file of ours nests deeper than 1
MAX_DIMS = 4  # GGML_MAX_DIMS

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
    alignment: int = DEFAULT_ALIGNMENT

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
        count = math.prod(info.shape)
        try:
            with open(self.path, "rb") as f:
                f.seek(info.offset)
                data = np.fromfile(f, dtype=dtypes[info.type], count=count)
        except OSError as err:
            raise UIOError(f"cannot read tensor {name} of {self.path}: {err.strerror or err}") from None
        if data.size != count:
            raise UIOError(f"{self.path} is truncated (tensor {name} is cut short)")
        return data.astype(np.float32).reshape(info.shape)

    def check_packed(self) -> None:
        """UIOError unless the tensors tile the data section as GGUF writers lay it out: each at the next
        aligned offset after the one before, the file ending with the last one. A damaged offset, shape
        or type in the tensor table then cannot point a tensor at other bytes unnoticed."""
        expected = self.data_offset
        for info in sorted(self.tensors.values(), key=lambda t: t.offset):
            if info.offset != expected:
                raise UIOError(f"{self.path} is damaged (tensor {info.name} is not where the table before it ends)")
            expected = -(-(info.offset + info.n_bytes) // self.alignment) * self.alignment
        if self.size not in (expected, max((t.offset + t.n_bytes for t in self.tensors.values()), default=expected)):
            raise UIOError(f"{self.path} is damaged ({self.size} bytes, its tensors end at {expected})")


class _Cursor:
    """Reads little-endian values from a file, raising EOFError past its end. Every length and count
    read from the file is bounded by the bytes left in it before anything is allocated or skipped: a
    damaged size field is an error, never a huge allocation (MemoryError) or seek (OverflowError)."""

    def __init__(self, f, size: int):
        self.f = f
        self.size = size

    def left(self) -> int:
        return self.size - self.f.tell()

    def read(self, n: int) -> bytes:
        if n > self.left():
            raise EOFError
        data = self.f.read(n)
        if len(data) != n:
            raise EOFError
        return data

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def count(self, fmt: str, min_item_bytes: int) -> int:
        """A length or count field whose items take at least min_item_bytes each."""
        n = self.unpack(fmt)
        if n * min_item_bytes > self.left():
            raise EOFError
        return n

    def string(self) -> str:
        return self.read(self.count("<Q", 1)).decode("utf-8", errors="replace")

    def skip(self, n: int) -> None:
        if n > self.left():
            raise EOFError
        self.f.seek(n, 1)

    def value(self, vtype: GGUFValueType, depth: int = 0):
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise ValueError("arrays nested too deep")
            sub = GGUFValueType(self.unpack("<I"))
            length = self.count("<Q", _item_bytes(sub))
            if length <= MAX_ARRAY_READ:
                return [self.value(sub, depth + 1) for _ in range(length)]
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


def _item_bytes(vtype: GGUFValueType) -> int:
    """The fewest bytes one value of this type takes in the file."""
    if vtype == GGUFValueType.STRING:
        return 8  # its u64 length
    if vtype == GGUFValueType.ARRAY:
        return 12  # u32 type + u64 length
    return struct.calcsize(_SCALARS[vtype])


def read_gguf(path: str | Path) -> GGUFFile:
    """Parses the header of a GGUF file; UIOError (one line) if it is not one, is cut short or damaged:
    every failure of the reader ends in UIOError, whatever the bytes."""
    path = Path(path)
    if not path.is_file():
        raise UIOError(f"file not found: {path}")
    try:
        return _read(path)
    except UIOError:
        raise
    except EOFError:
        raise UIOError(f"{path} is truncated or damaged (its GGUF header runs past the end of the file)") from None
    except OSError as err:
        raise UIOError(f"cannot read {path}: {err.strerror or err}") from None
    except Exception as err:  # any other damage: unknown types, bad values, impossible sizes
        raise UIOError(f"{path} is not a valid GGUF file ({type(err).__name__}: {err})") from None


def _read(path: Path) -> GGUFFile:
    size = path.stat().st_size
    with open(path, "rb", buffering=1 << 20) as f:
        if f.read(4) != MAGIC:
            raise UIOError(f"not a GGUF file: {path}")
        cur = _Cursor(f, size)
        version = cur.unpack("<I")
        if version not in (2, 3):
            raise UIOError(f"{path}: unsupported GGUF version {version}")
        # A tensor info takes at least 24 bytes (name length, n_dims, type, offset), a KV pair 12.
        n_tensors, n_kv = cur.count("<Q", 24), cur.count("<Q", 12)
        out = GGUFFile(path=path, version=version, size=size)
        for _ in range(n_kv):
            key = cur.string()
            out.metadata[key] = cur.value(GGUFValueType(cur.unpack("<I")))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.unpack("<I")
            if not 1 <= n_dims <= MAX_DIMS:
                raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
            ne = [cur.unpack("<Q") for _ in range(n_dims)]
            infos.append((name, ne, GGMLQuantizationType(cur.unpack("<I")), cur.unpack("<Q")))
        end = f.tell()
    alignment = out.metadata.get(ALIGNMENT_KEY, DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"{ALIGNMENT_KEY} is {alignment!r}, not a power of two")
    out.alignment = alignment
    out.data_offset = -(-end // alignment) * alignment
    for name, ne, qtype, rel in infos:
        if name in out.tensors:
            raise ValueError(f"tensor {name!r} appears twice")
        block, type_size = GGML_QUANT_SIZES[qtype]
        count = math.prod(ne)  # Python ints: no overflow, whatever the fields hold
        if count % block or rel % alignment:
            raise ValueError(f"tensor {name!r} has a size or offset its type and alignment do not allow")
        n_bytes = count // block * type_size
        info = TensorInfo(name, tuple(reversed(ne)), qtype, out.data_offset + rel, n_bytes)
        if info.offset + n_bytes > size:
            raise UIOError(f"{path} is truncated ({size} bytes, tensor {name} needs {info.offset + n_bytes})")
        out.tensors[name] = info
    spans = sorted((t.offset, t.offset + t.n_bytes, t.name) for t in out.tensors.values())
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise ValueError(f"tensors {a!r} and {b!r} overlap")
    return out
