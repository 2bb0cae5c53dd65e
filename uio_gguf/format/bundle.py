"""Reading a UIO bundle (model.gguf + encoder.lora.gguf + uio.gguf, see uio_gguf/format/schema.py).

`Bundle.open` checks that the three files are whole GGUF files of the right kinds and that they belong
together (the fingerprints uio.gguf recorded at conversion), so the runtime never mixes a head with a
model it was not trained for. The fingerprints of model.gguf and encoder.lora.gguf sample their data;
newer heads also hold a checksum of every byte of both (older ones do not), which verify() compares (the
model's once per file version: uio_gguf/format/digest.py), so damage anywhere is refused. Memory
files are keyed on every byte of all three files either way (memory_key).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from gguf import Keys

from uio_gguf.errors import UIOError
from uio_gguf.format import schema
from uio_gguf.format.digest import cached_sha256
from uio_gguf.format.gguf_file import GGUFFile, read_gguf

FINGERPRINT_BLOCKS = 16  # sampled blocks of tensor data
FINGERPRINT_BLOCK_BYTES = 1 << 16
SAMPLED = f"sampled: the header and {FINGERPRINT_BLOCKS} blocks of {FINGERPRINT_BLOCK_BYTES >> 10} KiB"
ADAPTERS = ("encoder", "transfer")


def gguf_fingerprint(path: str | Path, whole: bool = False) -> str:
    """sha256 over the file size, the whole header (metadata + tensor table) and evenly spaced blocks of
    the tensor data: a few MB read whatever the file size, yet any re-conversion changes it. whole=True
    hashes every byte (the head: a few MB, and a damaged block must change its memory files' key)."""
    info = read_gguf(path)
    digest = hashlib.sha256(info.size.to_bytes(8, "little"))
    data_bytes = info.size - info.data_offset
    with open(info.path, "rb") as f:
        digest.update(f.read(info.data_offset))
        if whole or data_bytes <= FINGERPRINT_BLOCKS * FINGERPRINT_BLOCK_BYTES:
            digest.update(f.read())
        else:
            last = data_bytes - FINGERPRINT_BLOCK_BYTES
            for i in range(FINGERPRINT_BLOCKS):
                f.seek(info.data_offset + last * i // (FINGERPRINT_BLOCKS - 1))
                digest.update(f.read(FINGERPRINT_BLOCK_BYTES))
    return "sha256:" + digest.hexdigest()


def head_checksum(head: GGUFFile) -> str:
    """sha256 over what uio.gguf holds as read: every metadata key and value but the checksum itself,
    and every tensor's name, shape, type and bytes. The converter stores it (schema.KEY_HEAD_CHECKSUM);
    Bundle.open compares, so no damaged setting or weight of the head is used unnoticed."""
    digest = hashlib.sha256()
    for key in sorted(head.metadata):
        if key != schema.KEY_HEAD_CHECKSUM:
            digest.update(repr((key, head.metadata[key])).encode() + b"\0")
    with open(head.path, "rb") as f:
        for name in sorted(head.tensors):
            info = head.tensors[name]
            digest.update(repr((name, info.shape, int(info.type))).encode() + b"\0")
            f.seek(info.offset)
            digest.update(f.read(info.n_bytes))
    return "sha256:" + digest.hexdigest()


def _short(fingerprint: str | None) -> str:
    return (fingerprint or "none")[:19]


class Bundle:
    """A bundle directory, opened. Use Bundle.open(path)."""

    path: Path
    model_path: Path
    encoder_path: Path
    head_path: Path

    def __init__(self, path: Path, model: GGUFFile, encoder: GGUFFile, head: GGUFFile):
        self.path = path
        self.model_path, self.encoder_path, self.head_path = model.path, encoder.path, head.path
        self._model, self._encoder, self._head = model, encoder, head
        self.architecture: str = _required(head, schema.GENERAL_ARCHITECTURE)
        self.segment: int = int(_required(head, schema.KEY_SEGMENT))
        self.ratio: int = int(_required(head, schema.KEY_RATIO))
        self.rope_type: str = _required(head, schema.KEY_ROPE_TYPE)
        self.n_layer: int = int(_required(head, schema.KEY_LAYER_COUNT))
        self.trained_steps: int = int(head.get(schema.KEY_TRAINED_STEPS, 0))
        self.memory_embedding: np.ndarray = head.tensor(schema.MEMORY_EMBEDDING)
        self.base_fingerprint: str | None = head.get(schema.KEY_BASE_FINGERPRINT)
        # As recorded at conversion; verify() compares them with the files.
        self.model_fingerprint: str = _required(head, schema.KEY_MODEL_FINGERPRINT)
        self.encoder_fingerprint: str = _required(head, schema.KEY_ENCODER_FINGERPRINT)
        self.head_fingerprint: str = gguf_fingerprint(head.path, whole=True)
        # every byte of model.gguf and encoder.lora.gguf, recorded at conversion (None in older heads)
        self.checksums: dict[str, str | None] = {
            schema.MODEL_FILE: head.get(schema.KEY_MODEL_CHECKSUM),
            schema.ENCODER_FILE: head.get(schema.KEY_ENCODER_CHECKSUM),
        }
        self._alpha = {
            "encoder": float(_required(encoder, schema.ADAPTER_LORA_ALPHA)),
            "transfer": float(_required(head, schema.KEY_TRANSFER_ALPHA)),
        }
        if self.segment <= 0 or self.ratio <= 0 or self.segment % self.ratio:
            raise UIOError(f"{head.path}: segment length {self.segment} is not a multiple of the ratio {self.ratio}")
        if self.rope_type not in (schema.ROPE_NORM, schema.ROPE_NEOX):
            raise UIOError(f"{head.path}: unknown RoPE type {self.rope_type!r}")
        if not all(np.isfinite(a) and a > 0 for a in self._alpha.values()):
            raise UIOError(f"{head.path} is damaged (LoRA alpha {self._alpha})")
        _check_weights(path, model, encoder, head, self.slots)

    # ----- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, check: bool = True) -> Bundle:
        """Opens a bundle directory; UIOError (one line) on a missing, damaged or foreign file, and with
        check=True also when the files' fingerprints say they were not converted together."""
        path = Path(path)
        if not path.is_dir():
            raise UIOError(f"not a bundle directory: {path}")
        files = {}
        for name in (schema.MODEL_FILE, schema.ENCODER_FILE, schema.HEAD_FILE):
            if not (path / name).is_file():
                raise UIOError(f"bundle {path} has no {name}")
            files[name] = read_gguf(path / name)
        model, encoder, head = files[schema.MODEL_FILE], files[schema.ENCODER_FILE], files[schema.HEAD_FILE]
        _check_kinds(path, model, encoder, head)
        for f in (encoder, head):
            f.check_packed()
        recorded = head.get(schema.KEY_HEAD_CHECKSUM)
        if recorded is not None and recorded != head_checksum(head):
            raise UIOError(f"{head.path} is damaged (its checksum does not match its contents)")
        try:
            bundle = cls(path, model, encoder, head)
        except (ValueError, TypeError, KeyError, OverflowError) as err:  # a value of the wrong type or range
            raise UIOError(f"{path}/{schema.HEAD_FILE} is damaged ({type(err).__name__}: {err})") from None
        if check:
            bundle.verify()
        return bundle

    def fingerprint_status(self) -> dict[str, tuple[str, str]]:
        """file name -> (fingerprint recorded in uio.gguf, fingerprint of the file on disk)."""
        return {
            schema.MODEL_FILE: (self.model_fingerprint, gguf_fingerprint(self.model_path)),
            schema.ENCODER_FILE: (self.encoder_fingerprint, gguf_fingerprint(self.encoder_path)),
        }

    @property
    def model_digest(self) -> str:
        """sha256 of every byte of model.gguf (computed once per file version, then cached)."""
        return cached_sha256(self.model_path)

    @property
    def encoder_digest(self) -> str:
        """sha256 of every byte of encoder.lora.gguf (a few MB)."""
        return cached_sha256(self.encoder_path)

    def digests(self) -> dict[str, str]:
        return {schema.MODEL_FILE: self.model_digest, schema.ENCODER_FILE: self.encoder_digest}

    def verify(self) -> None:
        for name, (recorded, actual) in self.fingerprint_status().items():
            if recorded != actual:
                raise UIOError(
                    f"the files of bundle {self.path} do not belong together: {name} is {_short(actual)}..., "
                    f"{schema.HEAD_FILE} was made for {_short(recorded)}... (a file from another conversion, or "
                    "damaged: convert the checkpoint again)"
                )
        for name, recorded in self.checksums.items():
            if recorded is not None and recorded != self.digests()[name]:
                raise UIOError(
                    f"{self.path / name} is damaged: its bytes do not match the checksum {schema.HEAD_FILE} "
                    "recorded at conversion (restore the file or convert the checkpoint again)"
                )

    # ----- contents ------------------------------------------------------------------------------
    @property
    def slots(self) -> int:
        return self.segment // self.ratio

    def lora(self, adapter: str, proj: str, layer: int) -> tuple[np.ndarray, np.ndarray, float]:
        """(A (rank, n_in), B (n_out, rank), scale alpha/rank) of one adapted projection, float32, in
        llama.cpp's row layout (on LLaMA, B of attn_q and attn_k is row-permuted like W_Q and W_K)."""
        projections = {"encoder": schema.ENCODER_PROJECTIONS, "transfer": schema.TRANSFER_PROJECTIONS}
        if adapter not in projections:
            raise ValueError(f"adapter must be one of {ADAPTERS}, not {adapter!r}")
        if proj not in projections[adapter]:
            raise ValueError(f"the {adapter} adapter has no {proj} (it adapts {', '.join(projections[adapter])})")
        if not 0 <= layer < self.n_layer:
            raise ValueError(f"layer {layer} out of range (the model has {self.n_layer})")
        source = self._encoder if adapter == "encoder" else self._head
        base = schema.layer_tensor(layer, proj)
        a, b = source.tensor(schema.lora_a(base)), source.tensor(schema.lora_b(base))
        return a, b, self._alpha[adapter] / a.shape[0]

    def _rank(self, adapter: str) -> int:
        proj = (schema.ENCODER_PROJECTIONS if adapter == "encoder" else schema.TRANSFER_PROJECTIONS)[0]
        source = self._encoder if adapter == "encoder" else self._head
        return source.tensors[schema.lora_a(schema.layer_tensor(0, proj))].shape[0]

    def info(self) -> dict:
        """What `uio-gguf info` prints: sizes, settings, types and the fingerprints with their status."""
        arch, meta = self.architecture, self._model.metadata
        types: dict[str, int] = {}
        for tensor in self._model.tensors.values():
            types[tensor.type.name] = types.get(tensor.type.name, 0) + 1
        token_embd = self._model.tensors.get("token_embd.weight")
        fingerprints = {}
        for name, (recorded, actual) in self.fingerprint_status().items():
            checksum = self.checksums[name]
            entry = {"recorded": recorded, "actual": actual, "matches": recorded == actual, "verified": SAMPLED}
            if checksum is not None:
                entry |= {"checksum": checksum, "verified": "every byte (its checksum)"}
                entry["matches"] = entry["matches"] and checksum == self.digests()[name]
            fingerprints[name] = entry
        return {
            "bundle": str(self.path),
            "architecture": arch,
            "layers": self.n_layer,
            "d_model": meta.get(Keys.LLM.EMBEDDING_LENGTH.format(arch=arch)),
            "heads": meta.get(Keys.Attention.HEAD_COUNT.format(arch=arch)),
            "kv_heads": meta.get(Keys.Attention.HEAD_COUNT_KV.format(arch=arch)),
            "vocab": token_embd.shape[0] if token_embd else None,
            "context_length": meta.get(Keys.LLM.CONTEXT_LENGTH.format(arch=arch)),
            "rope_type": self.rope_type,
            "segment": self.segment,
            "ratio": self.ratio,
            "slots": self.slots,
            "memory_embeddings": int(self.memory_embedding.shape[0]),
            "model_tensor_types": dict(sorted(types.items(), key=lambda kv: -kv[1])),
            "model_bytes": self._model.size,
            "encoder": {
                "rank": self._rank("encoder"),
                "alpha": self._alpha["encoder"],
                "projections": list(schema.ENCODER_PROJECTIONS),
            },
            "transfer": {
                "rank": self._rank("transfer"),
                "alpha": self._alpha["transfer"],
                "projections": list(schema.TRANSFER_PROJECTIONS),
            },
            "trained_steps": self.trained_steps,
            "format_version": int(self._head.get(schema.KEY_FORMAT_VERSION)),
            "base_fingerprint": self.base_fingerprint,
            "head_fingerprint": self.head_fingerprint,
            "fingerprints": fingerprints,
        }


def _required(f: GGUFFile, key: str):
    value = f.get(key)
    if value is None:
        raise UIOError(f"{f.path} lacks the key {key}")
    return value


def _check_kinds(path: Path, model: GGUFFile, encoder: GGUFFile, head: GGUFFile) -> None:
    """Each file is the kind of GGUF its name says, all for one architecture, in a format we read."""

    def where(f: GGUFFile) -> str:
        return f"{path}/{f.path.name}"

    if head.get(schema.GENERAL_TYPE) != schema.HEAD_GENERAL_TYPE:
        raise UIOError(f"{where(head)} is not a UIO head (general.type {head.get(schema.GENERAL_TYPE)!r})")
    version = head.get(schema.KEY_FORMAT_VERSION)
    if version != schema.FORMAT_VERSION:
        raise UIOError(
            f"{where(head)} has format version {version}; this uio-gguf reads version {schema.FORMAT_VERSION}"
        )
    if (
        encoder.get(schema.GENERAL_TYPE) != schema.ADAPTER_GENERAL_TYPE
        or encoder.get(schema.ADAPTER_TYPE) != schema.ADAPTER_LORA
    ):
        raise UIOError(f"{where(encoder)} is not a LoRA adapter (general.type {encoder.get(schema.GENERAL_TYPE)!r})")
    if model.get(schema.GENERAL_TYPE, schema.MODEL_GENERAL_TYPE) != schema.MODEL_GENERAL_TYPE:
        raise UIOError(f"{where(model)} is not a model (general.type {model.get(schema.GENERAL_TYPE)!r})")
    arch = head.get(schema.GENERAL_ARCHITECTURE)
    for f in (model, encoder):
        if f.get(schema.GENERAL_ARCHITECTURE) != arch:
            raise UIOError(
                f"{where(f)} is for architecture {f.get(schema.GENERAL_ARCHITECTURE)!r}, "
                f"{schema.HEAD_FILE} for {arch!r}"
            )
    layers = model.get(Keys.LLM.BLOCK_COUNT.format(arch=arch))
    if layers != head.get(schema.KEY_LAYER_COUNT):
        raise UIOError(f"{where(model)} has {layers} layers, {schema.HEAD_FILE} {head.get(schema.KEY_LAYER_COUNT)}")


def _check_weights(path: Path, model: GGUFFile, encoder: GGUFFile, head: GGUFFile, slots: int) -> None:
    """The head's and the encoder's tensors have the shapes the model asks for and hold finite numbers:
    a damaged tensor is refused here, not met as a broadcast error or a NaN memory later."""
    arch = head.get(schema.GENERAL_ARCHITECTURE)
    d_model = model.get(Keys.LLM.EMBEDDING_LENGTH.format(arch=arch))
    n_layer = int(head.get(schema.KEY_LAYER_COUNT))
    expected = {}
    memory = head.tensors.get(schema.MEMORY_EMBEDDING)
    if memory is None or memory.shape not in ((1, d_model), (slots, d_model)):
        got = None if memory is None else memory.shape
        raise UIOError(f"{path}/{schema.HEAD_FILE}: memory embedding {got} does not fit the model (d_model {d_model})")
    expected[schema.MEMORY_EMBEDDING] = (head, memory.shape)
    for source, projections in ((encoder, schema.ENCODER_PROJECTIONS), (head, schema.TRANSFER_PROJECTIONS)):
        rank = None
        for layer in range(n_layer):
            for proj in projections:
                base = schema.layer_tensor(layer, proj)
                weight = model.tensors.get(base)
                a, b = source.tensors.get(schema.lora_a(base)), source.tensors.get(schema.lora_b(base))
                if weight is None or a is None or b is None:
                    raise UIOError(f"{path}: no {base} LoRA in {source.path.name} or no {base} in the model")
                rank = a.shape[0] if rank is None else rank
                n_out, n_in = weight.shape
                if a.shape != (rank, n_in) or b.shape != (n_out, rank):
                    raise UIOError(
                        f"{path}/{source.path.name}: {base} LoRA shapes {a.shape}, {b.shape} do not fit the model "
                        f"({base} is {weight.shape})"
                    )
                expected[a.name], expected[b.name] = (source, a.shape), (source, b.shape)
    for name, (source, _) in expected.items():
        if not np.isfinite(source.tensor(name)).all():
            raise UIOError(f"{path}/{source.path.name} is damaged (tensor {name} holds non-finite values)")


def format_info(info: dict) -> str:
    """Bundle.info() as the table `uio-gguf info` prints."""
    types = ", ".join(f"{name} x{count}" for name, count in info["model_tensor_types"].items())
    rows = [
        ("bundle", info["bundle"]),
        ("architecture", f"{info['architecture']} (RoPE {info['rope_type']})"),
        ("layers", info["layers"]),
        ("d_model", f"{info['d_model']}  ({info['heads']} heads, {info['kv_heads']} KV heads)"),
        ("vocabulary", info["vocab"]),
        ("context", info["context_length"]),
        ("segment", f"{info['segment']} tokens, ratio {info['ratio']} -> {info['slots']} memory slots"),
        ("memory embedding", f"{info['memory_embeddings']} x {info['d_model']}"),
        ("model.gguf", f"{info['model_bytes'] / 1e6:.1f} MB: {types}"),
    ]
    for adapter in ADAPTERS:
        lora = info[adapter]
        rows.append(
            (f"{adapter} LoRA", f"rank {lora['rank']}, alpha {lora['alpha']:g} ({', '.join(lora['projections'])})")
        )
    rows += [("trained steps", info["trained_steps"]), ("format version", info["format_version"]), ("fingerprints", "")]
    for name, fp in info["fingerprints"].items():
        status = "ok" if fp["matches"] else f"MISMATCH ({schema.HEAD_FILE} expects {fp['recorded']})"
        if not fp["matches"] and fp["recorded"] == fp["actual"]:
            status = "DAMAGED (its bytes do not match the checksum recorded at conversion)"
        verified = fp["verified"]
        if verified == SAMPLED:  # an older head: damage between the sampled blocks goes unseen
            verified += "; no checksum of every byte recorded: convert again to have one"
        rows.append((f"  {name}", f"{fp['actual']}  {status}, {verified}"))
    rows += [
        (f"  {schema.HEAD_FILE}", f"{info['head_fingerprint']}  every byte"),
        ("  base (training)", info["base_fingerprint"]),
    ]
    width = max(len(label) for label, _ in rows) + 2
    return "\n".join(f"{label:<{width}}{value}".rstrip() for label, value in rows)
