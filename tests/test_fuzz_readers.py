"""Fuzzing the readers of what uio-gguf keeps on disk, damaged as a hostile user or a failing disk would
damage it: memory files, a bundle's uio.gguf and encoder.lora.gguf, training checkpoints. Each case
damages one file in one way (a flipped bit in the header or in the data, truncation, a zeroed block,
appended garbage, another file swapped in), with a fixed seed, and the reader must end in a clean
UIOError (memory files: None, "recompute") or give back content equal to the original. Any other
exception fails the test, and so does an accepted bundle or checkpoint whose weights or settings differ."""

from __future__ import annotations

import copy
import shutil
import struct
import warnings

import numpy as np
import pytest

SEED = 19
CASES_PER_KIND = 12
KINDS = ("flip_header", "flip_data", "truncate", "zero_block", "append", "swap")


def _mutate(data: bytes, header_end: int, kind: str, rng: np.random.Generator, other: bytes) -> bytes:
    """One damaged copy of data; header_end splits header from data for the bit flips."""
    out = bytearray(data)
    header_end = max(1, min(header_end, len(data) - 1))
    if kind in ("flip_header", "flip_data"):
        lo, hi = (0, header_end) if kind == "flip_header" else (header_end, len(data))
        pos = int(rng.integers(lo, hi))
        out[pos] ^= 1 << int(rng.integers(0, 8))
    elif kind == "truncate":
        del out[int(rng.integers(0, len(data))) :]
    elif kind == "zero_block":
        size = int(rng.integers(1, 4097))
        start = int(rng.integers(0, len(data)))
        out[start : start + size] = bytes(len(out[start : start + size]))
    elif kind == "append":
        out += rng.integers(0, 256, size=int(rng.integers(1, 300)), dtype=np.uint8).tobytes()
    elif kind == "swap":
        return other
    return bytes(out)


def _cases():
    rng = np.random.default_rng(SEED)
    for kind in KINDS:
        for i in range(CASES_PER_KIND):
            yield kind, i, np.random.default_rng(rng.integers(2**32))


# ----- memory files ---------------------------------------------------------------------------
def test_memory_file_reader(tmp_path):
    from uio_gguf.memory.encoder import SegmentMemory
    from uio_gguf.store import memory_file

    rng = np.random.default_rng(SEED)
    k = rng.standard_normal((3, 2, 4, 16)).astype(np.float16).astype(np.float32)
    v = rng.standard_normal((3, 2, 4, 16)).astype(np.float16).astype(np.float32)
    original = memory_file.save(tmp_path / "orig.npz", "key-a", SegmentMemory(k, v)).read_bytes()
    other = memory_file.save(tmp_path / "other.npz", "key-b", SegmentMemory(v, k)).read_bytes()
    path = tmp_path / "m.npz"
    outcomes = {"refused": 0, "equal": 0}
    for kind, _, case_rng in _cases():
        damaged = _mutate(original, 512, kind, case_rng, other)
        path.write_bytes(damaged)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = memory_file.load(path, "key-a")
        if loaded is None:
            outcomes["refused"] += 1
        else:
            assert np.array_equal(loaded.k, k) and np.array_equal(loaded.v, v), (kind, "accepted other memory")
            outcomes["equal"] += 1
    assert outcomes["refused"] > len(KINDS) * CASES_PER_KIND // 2, outcomes


# ----- bundles ----------------------------------------------------------------------------------
def _snapshot(bundle) -> dict:
    """Everything the runtime reads from a bundle: settings and every tensor of the head and encoder."""
    from uio_gguf.format import schema

    out = {
        "settings": (bundle.architecture, bundle.segment, bundle.ratio, bundle.rope_type, bundle.n_layer),
        "alpha": dict(bundle._alpha),
        "memory": bundle.memory_embedding,
        "fingerprints": (bundle.model_fingerprint, bundle.encoder_fingerprint, bundle.head_fingerprint),
    }
    for f in (bundle._head, bundle._encoder):
        for name in f.tensors:
            out[f"{f.path.name}:{name}"] = f.tensor(name)
    out["head_meta"] = {k: v for k, v in bundle._head.metadata.items() if k != schema.KEY_HEAD_CHECKSUM}
    return out


def _equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, np.ndarray):
            if x.shape != y.shape or not np.array_equal(x, y):
                return False
        elif key == "fingerprints":
            if x[:2] != y[:2]:  # the head's own fingerprint is of its bytes, which may differ (appended)
                return False
        elif x != y:
            return False
    return True


@pytest.mark.parametrize("target", ["uio.gguf", "encoder.lora.gguf"])
def test_bundle_reader(make_tiny_bundle, tmp_path, target):
    from uio_gguf.errors import UIOError
    from uio_gguf.format import schema
    from uio_gguf.format.bundle import Bundle
    from uio_gguf.format.gguf_file import read_gguf

    bundle_dir = make_tiny_bundle("llama", segment=16, ratio=4, outtype="f32")[0]
    foreign_dir = make_tiny_bundle("llama", seed=1, segment=16, ratio=4, outtype="f32")[0]
    work = tmp_path / "bundle"
    work.mkdir()
    (work / schema.MODEL_FILE).symlink_to(bundle_dir / schema.MODEL_FILE)
    for name in (schema.ENCODER_FILE, schema.HEAD_FILE):
        shutil.copyfile(bundle_dir / name, work / name)
    original_bytes = (bundle_dir / target).read_bytes()
    header_end = read_gguf(bundle_dir / target).data_offset
    reference = _snapshot(Bundle.open(work))
    swaps = [
        (foreign_dir / target).read_bytes(),
        (bundle_dir / (schema.ENCODER_FILE if target == schema.HEAD_FILE else schema.HEAD_FILE)).read_bytes(),
    ]
    outcomes = {"refused": 0, "equal": 0}
    for kind, i, case_rng in _cases():
        if kind == "flip_data" and target == schema.ENCODER_FILE:
            kind = "flip_header"  # the encoder's data is llama.cpp's to read; its header is ours
        damaged = _mutate(original_bytes, header_end, kind, case_rng, swaps[i % 2])
        (work / target).write_bytes(damaged)
        try:
            opened = Bundle.open(work)
        except UIOError as err:
            assert "\n" not in str(err)
            outcomes["refused"] += 1
            continue
        assert _equal(_snapshot(opened), reference), (kind, i, "accepted a bundle with other contents")
        outcomes["equal"] += 1
    (work / target).write_bytes(original_bytes)
    assert outcomes["refused"] >= len(KINDS) * CASES_PER_KIND // 2, outcomes


def test_gguf_header_reader_never_raises_anything_but_uio_error(tiny_bundle, tmp_path):
    """read_gguf alone on many more damaged headers (sizes, counts, types, offsets): a UIOError or a
    parse, never MemoryError, OverflowError or any other exception."""
    from uio_gguf.errors import UIOError
    from uio_gguf.format import schema
    from uio_gguf.format.gguf_file import read_gguf

    source = tiny_bundle / schema.HEAD_FILE
    original = source.read_bytes()
    header_end = read_gguf(source).data_offset
    rng = np.random.default_rng(SEED)
    path = tmp_path / "h.gguf"
    for _ in range(300):
        data = bytearray(original)
        pos = int(rng.integers(4, header_end))
        if rng.random() < 0.5:
            data[pos] ^= 1 << int(rng.integers(0, 8))
        else:  # a whole size field gone wild
            data[pos : pos + 8] = struct.pack("<Q", int(rng.integers(0, 2**63)))
        path.write_bytes(bytes(data))
        try:
            read_gguf(path)
        except UIOError:
            pass


# ----- training checkpoints ---------------------------------------------------------------------
def test_checkpoint_reader(make_tiny_checkpoint, tmp_path):
    import torch

    from uio_gguf.errors import UIOError
    from uio_gguf.train import checkpoint as ckpt
    from uio_gguf.train.model import ENCODER, TRANSFER

    source, model, _ = make_tiny_checkpoint("llama", segment=16, ratio=4)
    model = copy.deepcopy(model)
    reference_config = ckpt.read_config(source)
    reference = {a: ckpt.adapter_state_dict(model, a) for a in (ENCODER, TRANSFER)}
    reference_memory = model.memory_embedding.detach().clone()
    work = tmp_path / "checkpoint"
    shutil.copytree(source, work)
    files = sorted(p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file())
    assert ckpt.MANIFEST in files
    outcomes = {"refused": 0, "equal": 0}
    for kind, i, case_rng in _cases():
        name = files[i % len(files)]
        original = (work / name).read_bytes()
        header_end = 8 + struct.unpack("<Q", original[:8])[0] if name.endswith(".safetensors") else 64
        other = (work / files[(i + 1) % len(files)]).read_bytes()
        (work / name).write_bytes(_mutate(original, header_end, kind, case_rng, other))
        try:
            config = ckpt.read_config(work)
            ckpt.load_weights(model, work)
        except UIOError as err:
            assert "\n" not in str(err)
            outcomes["refused"] += 1
        else:
            assert config == reference_config, (kind, name)
            for adapter in (ENCODER, TRANSFER):
                got = ckpt.adapter_state_dict(model, adapter)
                assert all(torch.equal(got[k], reference[adapter][k]) for k in reference[adapter]), (kind, name)
            assert torch.equal(model.memory_embedding.detach(), reference_memory), (kind, name)
            outcomes["equal"] += 1
        finally:
            (work / name).write_bytes(original)
    assert outcomes["refused"] >= len(KINDS) * CASES_PER_KIND // 2, outcomes


# ----- something else in place of a cached file ------------------------------------------------
def _put(kind: str, path) -> None:
    """A directory, a FIFO or a symlink to /dev/zero where a cached file was."""
    import os

    if kind == "directory":
        path.mkdir()
        (path / "x").write_text("x")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")


def _clear(path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _within(seconds: float, work, fifo):
    """work() in a thread; a thread still blocked after `seconds` (on the FIFO) fails the test, once the
    FIFO was given an end of file to let it go."""
    import os
    import threading

    out: dict = {}

    def run() -> None:
        try:
            out["value"] = work()
        except BaseException as err:  # re-raised in the test's thread
            out["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if fifo.exists() and not fifo.is_file():
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(seconds)
        pytest.fail(f"opening the book blocked on {fifo.name}")
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.mark.parametrize("target", ["memory file", "start state"])
def test_a_non_regular_file_in_place_of_a_cached_one_is_skipped(make_tiny_bundle, prose, tmp_path, monkeypatch, target):
    """A directory there gave an IsADirectoryError traceback on every run, a FIFO hung for ever.
    Each is skipped, the memory recomputed (or read from its memory file), and the answer is the same."""
    from uio_gguf.chat.conversation import Conversation
    from uio_gguf.llamacpp.sampling import SamplingParams
    from uio_gguf.memory.runtime import UIORuntime

    monkeypatch.setenv("UIO_GGUF_CACHE", str(tmp_path / "cache"))
    bundle = make_tiny_bundle("llama", segment=16, ratio=4, outtype="f32")[0]
    book = prose[:2500]
    with UIORuntime(bundle) as runtime:

        def opened():
            with Conversation(runtime, book, recall_tokens=0) as conv:
                answer = "".join(conv.ask("Who wrote it?", SamplingParams(max_tokens=6)))
                return conv.stats.from_file, conv.stats.from_start_state, answer

        assert opened()[:2] == (False, False)  # compressed; the memory file and its start state written
        (state,) = (tmp_path / "cache" / "memory").glob("*.start.npz")
        memory = state.with_name(state.name.split(".", 1)[0] + ".npz")
        path = memory if target == "memory file" else state
        reference = _within(60, opened, path)
        assert reference[:2] == (True, True)
        for kind in ("directory", "fifo", "dev_zero"):
            _clear(path)
            _put(kind, path)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a directory cannot be replaced: the cache warns it is not written
                got = _within(60, opened, path)
            assert got[2] == reference[2], kind
            assert got[:2] == ((False, False) if target == "memory file" else (True, False)), kind
            _clear(path)
            _within(60, opened, path)  # the cache written again, whole
