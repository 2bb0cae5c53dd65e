"""The bundle reads back exactly what the checkpoint held (uio_gguf/format/bundle.py), in llama.cpp's layout,
and the reader refuses what it cannot trust."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from uio_gguf.errors import UIOError
from uio_gguf.format import schema
from uio_gguf.format.bundle import Bundle, gguf_fingerprint
from uio_gguf.format.gguf_file import ArrayInfo, read_gguf


def llama_row_order(n_rows: int, n_head: int) -> np.ndarray:
    """Index form of the LLaMA Q/K permutation (docs/design.md §4): llama row 2j of a head is HF row j,
    llama row 2j+1 is HF row j + head_dim/2. Written independently of the converter's reshape."""
    head_dim = n_rows // n_head
    order = []
    for h in range(n_head):
        for j in range(head_dim // 2):
            order += [h * head_dim + j, h * head_dim + j + head_dim // 2]
    return np.array(order)


def peft_pair(model, adapter: str, layer: int, hf_proj: str) -> tuple[np.ndarray, np.ndarray]:
    linear = getattr(model.layers[layer].self_attn, hf_proj)
    return (linear.lora_A[adapter].weight.detach().numpy(), linear.lora_B[adapter].weight.detach().numpy())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_head_round_trip(arch, make_tiny_bundle):
    path, model, _ = make_tiny_bundle(arch)
    bundle = Bundle.open(path)
    cfg, hf = model.config, model.base.config
    assert (bundle.architecture, bundle.segment, bundle.ratio, bundle.slots) == (
        arch,
        cfg.segment,
        cfg.ratio,
        cfg.slots,
    )
    assert bundle.rope_type == (schema.ROPE_NORM if arch == "llama" else schema.ROPE_NEOX)
    assert bundle.n_layer == hf.num_hidden_layers and bundle.trained_steps == 7
    np.testing.assert_array_equal(bundle.memory_embedding, model.memory_embedding.detach().numpy())
    heads = {"q_proj": hf.num_attention_heads, "k_proj": hf.num_key_value_heads}
    for adapter, projections in (("encoder", ("q_proj", "v_proj")), ("transfer", ("k_proj", "v_proj"))):
        for layer in range(bundle.n_layer):
            for hf_proj in projections:
                a, b, scale = bundle.lora(adapter, schema.HF_PROJECTION[hf_proj], layer)
                a_ref, b_ref = peft_pair(model, adapter, layer, hf_proj)
                if arch == "llama" and hf_proj in heads:
                    b_ref = b_ref[llama_row_order(b_ref.shape[0], heads[hf_proj])]
                np.testing.assert_array_equal(a, a_ref)
                np.testing.assert_array_equal(b, b_ref)
                assert scale == cfg.alpha / cfg.rank
                assert a.dtype == b.dtype == np.float32


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_transfer_k_in_llama_layout_matches_the_model(arch, make_tiny_bundle):
    """K_mem = h (W_K + scale B A)^T + b_K from model.gguf and uio.gguf is the UIO model's K projection with
    its rows in llama.cpp's order: the LoRA B and W_K permutations agree."""
    path, model, _ = make_tiny_bundle(arch)
    bundle = Bundle.open(path)
    weights = read_gguf(path / schema.MODEL_FILE)
    h = torch.randn(5, model.base.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for layer in range(bundle.n_layer):
        attn = model.layers[layer].self_attn
        with torch.no_grad():
            ref = (attn.k_proj.base_layer(h) + attn.k_proj.delta(h, "transfer")).numpy()
        if arch == "llama":
            ref = ref[:, llama_row_order(ref.shape[1], model.base.config.num_key_value_heads)]
        a, b, scale = bundle.lora("transfer", "attn_k", layer)
        w = weights.tensor(schema.layer_tensor(layer, "attn_k"))
        ours = h.numpy() @ (w + scale * b @ a).T
        bias = f"blk.{layer}.attn_k.bias"
        if bias in weights.tensors:
            ours += weights.tensor(bias)
        np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_distinct_slot_embeddings_round_trip(make_tiny_bundle):
    path, model, _ = make_tiny_bundle("llama", distinct_slots=True)
    bundle = Bundle.open(path)
    assert bundle.memory_embedding.shape == (bundle.slots, model.base.config.hidden_size)
    np.testing.assert_array_equal(bundle.memory_embedding, model.memory_embedding.detach().numpy())


def test_lora_rejects_what_an_adapter_does_not_have(make_tiny_bundle):
    bundle = Bundle.open(make_tiny_bundle("llama")[0])
    for args in (
        ("encoder", "attn_k", 0),
        ("transfer", "attn_q", 0),
        ("decoder", "attn_v", 0),
        ("encoder", "attn_q", 99),
    ):
        with pytest.raises(ValueError):
            bundle.lora(*args)


def test_header_reader_agrees_with_gguf_reader(make_tiny_bundle):
    import gguf

    path = make_tiny_bundle("qwen2")[0]
    for name in (schema.MODEL_FILE, schema.ENCODER_FILE, schema.HEAD_FILE):
        ours, ref = read_gguf(path / name), gguf.GGUFReader(path / name)
        assert ours.data_offset == ref.data_offset
        assert list(ours.tensors) == [t.name for t in ref.tensors]
        for t in ref.tensors:
            info = ours.tensors[t.name]
            assert (info.offset, info.n_bytes, info.type) == (
                t.data_offset,
                t.n_bytes,
                t.tensor_type,
            )  # absolute in both
        for key, field in ref.fields.items():
            if key.startswith("GGUF."):
                continue  # the reader's pseudo-fields for the header
            value, mine = field.contents(), ours.metadata[key]
            if isinstance(mine, ArrayInfo):  # long arrays are summarised, not read
                assert mine.length == len(value)
            else:
                assert mine == (pytest.approx(value) if isinstance(value, float) else value), key


def test_fingerprint_sees_data_and_metadata_changes(make_tiny_bundle, tmp_path):
    source = make_tiny_bundle("llama")[0] / schema.MODEL_FILE
    copy = tmp_path / "m.gguf"
    shutil.copyfile(source, copy)
    assert gguf_fingerprint(copy) == gguf_fingerprint(source)
    info = read_gguf(copy)
    original = copy.read_bytes()
    # first and last tensor byte, a character of the chat template (metadata)
    for offset in (info.data_offset, info.size - 1, original.find(b"im_start") + 1):
        data = bytearray(original)
        data[offset] ^= 0x55
        copy.write_bytes(bytes(data))
        assert gguf_fingerprint(copy) != gguf_fingerprint(source), offset


def _patched(bundle_dir, tmp_path, name: str, old: bytes, new: bytes):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    data = (copy / name).read_bytes()
    assert data.count(old) == 1
    (copy / name).write_bytes(data.replace(old, new))
    return copy


def _u32_field(key: str, value: int) -> bytes:
    """A GGUF key/value pair of type u32, as it lies in the file."""
    return len(key).to_bytes(8, "little") + key.encode() + (4).to_bytes(4, "little") + value.to_bytes(4, "little")


@pytest.mark.parametrize(
    "change, message",
    [
        ("version", "format version 99"),
        ("type", "not a UIO head"),
        ("missing", "has no encoder.lora.gguf"),
    ],
)
def test_open_refuses_a_foreign_or_incomplete_bundle(change, message, make_tiny_bundle, tmp_path):
    path = make_tiny_bundle("llama")[0]
    if change == "version":
        bad = _patched(
            path,
            tmp_path,
            schema.HEAD_FILE,
            _u32_field(schema.KEY_FORMAT_VERSION, schema.FORMAT_VERSION),
            _u32_field(schema.KEY_FORMAT_VERSION, 99),
        )
    elif change == "type":
        head_type = schema.HEAD_GENERAL_TYPE.encode()
        bad = _patched(path, tmp_path, schema.HEAD_FILE, head_type, head_type[:-1] + b"?")
    else:
        bad = tmp_path / "bundle"
        shutil.copytree(path, bad)
        (bad / schema.ENCODER_FILE).unlink()
    with pytest.raises(UIOError, match=message):
        Bundle.open(bad)


def test_open_refuses_files_from_two_conversions(make_tiny_bundle, tmp_path):
    path, other = make_tiny_bundle("llama")[0], make_tiny_bundle("llama", seed=1)[0]
    mixed = tmp_path / "bundle"
    shutil.copytree(path, mixed)
    shutil.copyfile(other / schema.ENCODER_FILE, mixed / schema.ENCODER_FILE)
    with pytest.raises(UIOError, match="do not belong together: encoder.lora.gguf"):
        Bundle.open(mixed)
    assert Bundle.open(mixed, check=False).segment == 16  # check=False: the caller takes the risk
