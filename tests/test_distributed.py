"""`uio-gguf train` under torchrun on the CPU (gloo): two processes train one run (train.distributed)."""

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, checkpoint_weights, run_cli

CLI = ("-c", "from uio_gguf.cli import main; main()")


# The tiny run of tests/test_train_cli.py (segments of 16 tokens, 4 slots, LoRA rank 4), on the CPU
# (float32, gloo) even where there is a GPU.
TINY_RUN = {"--segment": 16, "--ratio": 4, "--segments": 4, "--rank": 4, "--alpha": 8, "--lr": 1e-3, "--device": "cpu"}


def _options(model_dir, book, out, batch: int, *extra) -> list[str]:
    """`train` options: the tiny run, checkpointed every step, with this --batch (per process)."""
    shape = [str(item) for pair in TINY_RUN.items() for item in pair]
    paths = ["--base", str(model_dir), "--data", str(book), "--out", str(out)]
    return ["train", *paths, *shape, "--batch", str(batch), "--eval-every", "2", "--save-every", "1", *extra]


def _torchrun(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 --no-python uio-gguf ARGS` (rendezvous on a free port)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, "--no-python", sys.executable, *CLI, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"torchrun uio-gguf {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def _log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_two_processes_of_batch_one_train_as_one_process_of_batch_two(make_tiny_model_dir, book, tmp_path):
    """Each rank trains on its own crop and the gradients are averaged: after 2 steps the weights are
    those of one process training on both crops as one batch."""
    model_dir = make_tiny_model_dir("llama")
    run_cli(*_options(model_dir, book, tmp_path / "one", 2, "--steps", "2"), check=True)
    _torchrun(*_options(model_dir, book, tmp_path / "two", 1, "--steps", "2"))
    one, two = checkpoint_weights(tmp_path / "one" / "checkpoint"), checkpoint_weights(tmp_path / "two" / "checkpoint")
    moved = 0.0
    for name in one:
        assert (one[name] - two[name]).abs().max() <= 1e-6, name
        moved = max(moved, one[name].abs().max().item())
    assert moved > 1e-4  # the adapters did train (LoRA B starts at zero)
    assert [r["step"] for r in _log(tmp_path / "two")] == [1, 2]  # rank 0 alone writes the log
    assert [r["loss"] for r in _log(tmp_path / "two")] == pytest.approx([r["loss"] for r in _log(tmp_path / "one")])
    config = json.loads((tmp_path / "two" / "checkpoint" / "uio_config.json").read_text())
    assert config["world_size"] == 2 and config["train_args"]["batch"] == 1


def test_torchrun_killed_after_step_two_resumes_onto_the_unbroken_run(make_tiny_model_dir, book, tmp_path):
    """A 2-process run killed after step 2's checkpoint, resumed under torchrun, lands on the weights of
    one that was never killed: every rank's crop and reservoir rngs are in the checkpoint."""
    model_dir = make_tiny_model_dir("llama")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _torchrun(*_options(model_dir, book, straight, 1, "--steps", "4"))
    result = _torchrun(*_options(model_dir, book, killed, 1, "--steps", "4", "--kill-after", "2"), check=False)
    assert result.returncode != 0  # SIGKILL: no clean shutdown
    assert json.loads((killed / "checkpoint" / "uio_config.json").read_text())["step"] == 2
    state = torch.load(killed / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert len(state["rank_rngs"]) == 2 and "estimator_rng" in state["rank_rngs"][1]

    alone = run_cli(*_options(model_dir, book, killed, 1, "--steps", "4", "--resume"))
    assert alone.returncode != 0 and "Traceback" not in alone.stderr
    assert "trained on 2 process(es), not 1" in alone.stderr.strip().splitlines()[-1]

    _torchrun(*_options(model_dir, book, killed, 1, "--steps", "4", "--resume"))
    a, b = checkpoint_weights(straight / "checkpoint"), checkpoint_weights(killed / "checkpoint")
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    assert [r["step"] for r in _log(killed)] == [1, 2, 3, 4]
    assert [r["loss"] for r in _log(killed)] == [r["loss"] for r in _log(straight)]
