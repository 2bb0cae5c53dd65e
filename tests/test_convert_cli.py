"""`uio-gguf convert` and `uio-gguf info` as a user runs them: a bundle that opens, and one clear line
with a non-zero exit for each kind of bad input."""

from __future__ import annotations

import shutil

import pytest

from tests.helpers import run_cli
from uio_gguf.format import schema


def _fails_with(result, *fragments: str) -> None:
    """Non-zero exit, no traceback, and one error line (after any progress bars) naming the problem."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("uio-gguf: error: ")]
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr and len(errors) == 1, result.stderr
    assert result.stderr.strip().endswith(errors[0]), result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture(scope="module")
def checkpoint(make_tiny_checkpoint):
    return make_tiny_checkpoint("llama")[0]


@pytest.fixture(scope="module")
def bundle(make_tiny_bundle):
    return make_tiny_bundle("llama")[0]


def _bundle_with(bundle, tmp_path, name: str, content: bytes):
    """A copy of the bundle with one file replaced."""
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    (copy / name).write_bytes(content)
    return copy


def test_convert_refuses_an_existing_directory_then_replaces_it_with_force(checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _fails_with(run_cli("convert", str(checkpoint), "-o", str(out)), "already exists", "--force")
    run_cli("convert", str(checkpoint), "-o", str(out), "--outtype", "q8_0", "--force", check=True)
    shown = run_cli("info", str(out), check=True).stdout
    assert "Q8_0" in shown and "trained steps" in shown and "MISMATCH" not in shown
    assert shown.count(" ok") == 2  # model.gguf and encoder.lora.gguf fingerprints match


def test_checkpoint_for_another_base_is_refused(checkpoint, make_tiny_model_dir, tmp_path):
    other = make_tiny_model_dir("llama", seed=1)
    _fails_with(
        run_cli("convert", str(checkpoint), "-o", str(tmp_path / "out"), "--base", str(other)),
        "trained on another base model",
        "fingerprint",
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage, message", [("truncate", "truncated"), ("text", "not a GGUF file")])
def test_damaged_base_gguf_is_refused(damage, message, checkpoint, bundle, tmp_path):
    data = (bundle / schema.MODEL_FILE).read_bytes()
    bad = tmp_path / "base.gguf"
    bad.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"just some text\n")
    _fails_with(
        run_cli("convert", str(checkpoint), "-o", str(tmp_path / "out"), "--base-gguf", str(bad)), message, "base.gguf"
    )


@pytest.mark.parametrize(
    "damage, message", [("truncate", "truncated"), ("text", "not a GGUF file"), ("header", "truncated")]
)
def test_info_on_a_damaged_bundle_fails_cleanly(damage, message, bundle, tmp_path):
    data = (bundle / schema.MODEL_FILE).read_bytes()
    content = {"truncate": data[: len(data) - 1000], "text": b"not a model\n", "header": data[:1000]}[damage]
    _fails_with(
        run_cli("info", str(_bundle_with(bundle, tmp_path, schema.MODEL_FILE, content))), message, schema.MODEL_FILE
    )


def test_info_shows_and_refuses_files_that_do_not_belong_together(bundle, make_tiny_bundle, tmp_path):
    other, _, _ = make_tiny_bundle("llama", seed=1)
    mixed = _bundle_with(bundle, tmp_path, schema.MODEL_FILE, (other / schema.MODEL_FILE).read_bytes())
    result = run_cli("info", str(mixed))
    assert "MISMATCH" in result.stdout
    _fails_with(result, "do not belong together", schema.MODEL_FILE)


def test_unsupported_architecture_is_refused(checkpoint, tmp_path):
    import gguf
    import numpy as np

    from uio_gguf.convert.gguf_save import save

    foreign = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(foreign, "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    save(writer)
    _fails_with(
        run_cli("convert", str(checkpoint), "-o", str(tmp_path / "out"), "--base-gguf", str(foreign)),
        "unsupported architecture 'gpt2'",
    )


def test_unsupported_hf_architecture_is_refused(checkpoint, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32)).save_pretrained(
        tmp_path / "gpt2"
    )
    _fails_with(
        run_cli("convert", str(checkpoint), "-o", str(tmp_path / "out"), "--base", str(tmp_path / "gpt2")),
        "'gpt2'",
        "llama",
    )


def test_unknown_outtype_is_refused(checkpoint, tmp_path):
    _fails_with(
        run_cli("convert", str(checkpoint), "-o", str(tmp_path / "out"), "--outtype", "q3_zz"),
        "unknown output type",
        "q4_k_m",
    )


@pytest.mark.slow
def test_base_gguf_of_the_exact_weights_is_accepted(checkpoint, bundle, tmp_path):
    """An f32 model.gguf of ours, dequantised by transformers (LLaMA rows un-permuted), has exactly the
    fingerprint of the HF weights the checkpoint was trained on, so --base-gguf takes it as it is
    (~20 s: transformers rebuilds the 49K-token tokenizer from the GGUF)."""
    out = tmp_path / "out"
    run_cli("convert", str(checkpoint), "-o", str(out), "--base-gguf", str(bundle / schema.MODEL_FILE), check=True)
    assert (out / schema.MODEL_FILE).read_bytes() == (bundle / schema.MODEL_FILE).read_bytes()
    assert "MISMATCH" not in run_cli("info", str(out), check=True).stdout
