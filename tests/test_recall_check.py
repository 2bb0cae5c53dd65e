"""train.recall_check: the probe crops have the training tasks' layout, and a head read from its bundle
scores exactly as its checkpoint."""

import json
import re
import subprocess
import sys

import numpy as np

from uio_gguf.train import synthetic
from uio_gguf.train.model import IGNORE
from uio_gguf.train.recall_check import probe_crops

SEGMENT, T = 32, 4


def _recall_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "uio_gguf.train.recall_check", *args], capture_output=True, text=True)


def test_probe_crops_hide_the_fact_in_memory_and_end_with_the_answer(make_tiny_checkpoint, prose):
    _, _, tokenizer = make_tiny_checkpoint("llama", segment=SEGMENT, ratio=4)
    filler = np.asarray(tokenizer(prose, add_special_tokens=False)["input_ids"])
    for row, labels in probe_crops(tokenizer, filler, T, SEGMENT, count=8):
        scored = np.flatnonzero(labels != IGNORE)
        assert len(row) == T * SEGMENT + 1 and len(scored) >= 1
        assert (labels[scored] == row[scored]).all() and (np.diff(scored) == 1).all()
        first = scored[0]
        assert first >= (T - 1) * SEGMENT + 1  # the answer is predicted inside the last window
        assert re.fullmatch(r" ?\d{5}", tokenizer.decode(row[scored]))  # the number alone is scored
        answer = tokenizer.decode(row[first:])
        assert re.fullmatch(r" ?\d{5}\.", answer), answer
        key = int(answer.strip(" ."))
        fact = tokenizer(f"\n{synthetic.passkey_fact(key)}\n", add_special_tokens=False)["input_ids"]
        row = row.tolist()
        at = next(i for i in range(len(row)) if row[i : i + len(fact)] == fact)
        assert at + len(fact) <= (T - 1) * SEGMENT  # the fact is only in the memory segments


def test_a_bundle_scores_as_its_checkpoint(make_tiny_checkpoint, make_tiny_bundle, prose, tmp_path):
    checkpoint, _, _ = make_tiny_checkpoint("llama", segment=SEGMENT, ratio=4)
    bundle, _, _ = make_tiny_bundle("llama", segment=SEGMENT, ratio=4)
    base = json.loads((checkpoint / "uio_config.json").read_text())["base"]["path"]
    text = tmp_path / "heldout.txt"
    text.write_text(prose)
    result = _recall_check(
        "--base",
        base,
        "--heldout",
        str(text),
        "--head",
        str(checkpoint),
        "--head",
        str(bundle),
        "--segments",
        str(T),
        "--crops",
        "4",
    )
    assert result.returncode == 0, result.stderr
    rows = [line.split()[1:] for line in result.stdout.splitlines()[1:]]  # T, memory, top-1, NLL, all right
    assert len(rows) == 4 and rows[:2] == rows[2:]  # the bundle scores exactly as its checkpoint
    without, with_memory = rows[0], rows[1]
    assert (without[1], with_memory[1]) == ("no", "yes") and without[3] != with_memory[3]  # the memory is read


def test_a_missing_head_gives_one_line(tmp_path):
    result = _recall_check("--base", "x", "--heldout", "x", "--head", str(tmp_path / "none"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "not a UIO checkpoint or bundle" in result.stderr.strip().splitlines()[-1]
