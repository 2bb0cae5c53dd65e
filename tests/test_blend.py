"""`python -m uio_gguf.train.blend`: a head part of the way between two checkpoints of one run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from uio_gguf.errors import UIOError
from uio_gguf.train.blend import blend_checkpoints
from uio_gguf.train.checkpoint import ADAPTER_WEIGHTS, MEMORY_FILE, load_uio_model, read_config, write_checkpoint


def _parts(directory):
    parts = {adapter: load_file(str(directory / adapter / ADAPTER_WEIGHTS)) for adapter in ("encoder", "transfer")}
    parts["memory"] = load_file(str(directory / MEMORY_FILE))
    return parts


@pytest.fixture(scope="module")
def run(make_tiny_checkpoint, tmp_path_factory):
    """(start, end): a tiny checkpoint and the same head with every tensor moved, as a run would."""
    start = make_tiny_checkpoint("llama", seed=0)[0]
    gen = torch.Generator().manual_seed(5)
    moved = {p: {n: t + torch.randn(t.shape, generator=gen) for n, t in ts.items()} for p, ts in _parts(start).items()}
    end = tmp_path_factory.mktemp("run") / "checkpoint"
    config = {**read_config(start), "step": 12}
    write_checkpoint(end, {p: moved[p] for p in ("encoder", "transfer")}, moved["memory"]["memory_embedding"], config)
    return start, end


def test_the_ends_come_back_bit_for_bit_and_the_midpoint_is_the_mean(run, tmp_path):
    start, end = run
    a, b = _parts(start), _parts(end)
    for share, expected in ((0.0, a), (1.0, b)):
        got = _parts(blend_checkpoints(start, end, tmp_path / f"s{share}", share))
        assert all(torch.equal(got[p][n], expected[p][n]) for p in a for n in a[p])
    mid = blend_checkpoints(start, end, tmp_path / "mid", 0.5)
    got = _parts(mid)
    for p in a:
        for n in a[p]:
            assert not torch.equal(a[p][n], b[p][n])
            torch.testing.assert_close(got[p][n], (a[p][n] + b[p][n]) / 2, rtol=0, atol=1e-6)
    config = read_config(mid)
    assert config["blend"]["share"] == 0.5 and config["step"] == 12
    model, _, _ = load_uio_model(mid)  # a checkpoint like any other: the base is checked, the weights load
    torch.testing.assert_close(model.memory_embedding.detach(), got["memory"]["memory_embedding"])


def test_checkpoints_of_another_base_or_shape_are_refused(run, make_tiny_checkpoint, tmp_path):
    start, _ = run
    other_base = make_tiny_checkpoint("llama", seed=1)[0]
    with pytest.raises(UIOError, match="different base models"):
        blend_checkpoints(start, other_base, tmp_path / "x", 0.5)
    other_rank = make_tiny_checkpoint("llama", seed=0, rank=2, alpha=4.0)[0]
    with pytest.raises(UIOError, match="differ in rank"):
        blend_checkpoints(start, other_rank, tmp_path / "y", 0.5)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_the_command_gives_one_line_errors(run, tmp_path):
    start, end = run
    command = [sys.executable, "-m", "uio_gguf.train.blend", str(start), str(end), str(tmp_path / "mid")]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "mid" / "uio_config.json").read_text())["blend"]["share"] == 0.5
    failed = subprocess.run(
        [*command[:4], str(tmp_path / "nothing"), str(tmp_path / "z")], capture_output=True, text=True
    )
    assert failed.returncode == 1 and failed.stderr.strip().startswith("blend: error: not a UIO checkpoint")
    assert "Traceback" not in failed.stderr and len(failed.stderr.strip().splitlines()) == 1
