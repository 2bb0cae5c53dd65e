"""train.memory_check: each memory cap reads exactly the segments it names, and the command prints the
PyTorch twin of eval ppl's uio column for a checkpoint."""

import json
import math
import subprocess
import sys

import torch

from uio_gguf.train.estimators import Crop
from uio_gguf.train.memory_check import prefix_ppl, window_losses
from uio_gguf.train.tiny import tiny_uio

SEGMENT, T = 16, 6


def _memory_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "uio_gguf.train.memory_check", *args], capture_output=True, text=True)


def test_a_cap_reads_the_last_segments_and_nothing_else():
    model = tiny_uio(segment=SEGMENT, ratio=4)
    crop = Crop(torch.randint(0, 256, (1, T * SEGMENT + 1), generator=torch.Generator().manual_seed(0)), SEGMENT)
    losses = window_losses(model, crop, [None, 0, 2, T])
    assert losses[T] == losses[None]  # a cap past the crop is the whole memory
    with torch.no_grad():
        memories = [model.encode(crop.window(s)) for s in range(1, T)]
        for t in range(1, T + 1):
            alone = model.window_loss(crop.window(t), crop.targets(t), None).item()
            assert math.isclose(losses[0][t - 1], alone, rel_tol=1e-6)
            last_two = torch.cat(memories[max(0, t - 3) : t - 1], dim=2) if t > 1 else None
            assert math.isclose(
                losses[2][t - 1], model.window_loss(crop.window(t), crop.targets(t), last_two).item(), rel_tol=1e-6
            )
    assert losses[2][:3] == losses[None][:3]  # windows 1-3 have at most two segments of memory
    assert all(abs(a - b) > 1e-6 for a, b in zip(losses[2][3:], losses[None][3:]))  # later ones lose the oldest
    assert losses[0][0] == losses[None][0]  # window 1 has no memory at all
    assert math.isclose(prefix_ppl(losses[None], 2), math.exp((losses[None][0] + losses[None][1]) / 2))


def test_the_command_prints_a_row_per_cap(make_tiny_checkpoint, prose, tmp_path):
    checkpoint, _, _ = make_tiny_checkpoint("llama", segment=32, ratio=4)
    base = json.loads((checkpoint / "uio_config.json").read_text())["base"]["path"]
    text = tmp_path / "book.txt"
    text.write_text(prose)
    result = _memory_check(
        "--base",
        base,
        "--text",
        str(text),
        "--head",
        str(checkpoint),
        "--segments",
        "4",
        "--caps",
        "0,1,all",
        "--last",
        "2",
    )
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in result.stdout.splitlines()[2:]}
    assert set(rows) == {"0", "1", "all"} and all(len(r) == 2 for r in rows.values())  # 128 tokens, last 2
    assert rows["0"] != rows["all"]  # the memory changes the perplexity


def test_bad_caps_and_a_missing_head_give_one_line(tmp_path):
    result = _memory_check("--base", "x", "--text", "x", "--head", "x", "--caps", "3,most")
    assert result.returncode == 2 and "--caps" in result.stderr and "Traceback" not in result.stderr
    result = _memory_check("--base", "x", "--text", "x", "--head", str(tmp_path / "none"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("memory_check: error:")
