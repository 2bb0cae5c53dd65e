"""`python -m train.recall_check`: does a head's memory carry a pass key? Measured in PyTorch, in the
training format of train/retrieval.py (its tokenize_task), so that a miss of `uio-gguf eval passkey` can be told apart
from a runtime fault.

Each probe crop is T segments of held-out text with the pass-key sentence at a random point of
segments 1..T-1 and the question with its answer closing segment T (tokenized as the training tasks
are). The score is over the answer's number tokens: top-1 rate and mean NLL, with the memory of
segments 1..T-1 and, as the baseline, without any memory. A bundle is read through
train.from_bundle, so a shipped head can be probed as well as a checkpoint.

    python -m train.recall_check --base <GGUF> --heldout data/heldout.jsonl \\
        --head uio_gguf/bundles/smollm2-135m-l128-r8 --segments 4,16 --crops 16
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from train import synthetic
from train.estimators import Crop
from train.retrieval import tokenize_task
from uio_gguf.errors import UIOError


def probe_crops(tokenizer, filler: np.ndarray, segments: int, segment: int, count: int, seed: int = 0):
    """[(row of segments·segment + 1 ids, index in row of the answer's first number token, its length)]."""
    rng = np.random.default_rng(seed)
    length = segments * segment + 1
    _, prefix = tokenize_task(tokenizer, [], f"{synthetic.PASSKEY_QUESTION} The pass key is")
    crops = []
    for _ in range(count):
        key = int(rng.integers(10_000, 100_000))
        (fact,), tail = tokenize_task(tokenizer, [synthetic.passkey_fact(key)], synthetic.passkey_answer(key))
        shared = next((i for i, (a, b) in enumerate(zip(prefix, tail)) if a != b), len(prefix))
        answer = len(tail) - shared - 1  # the number's tokens, without the closing "."
        if answer < 1:
            raise UIOError("the tokenizer merges the pass key with the question: no answer tokens to score")
        room = (segments - 1) * segment - len(fact)
        if room < 1 or len(tail) > segment or len(filler) < length:
            raise UIOError(f"crops of {segments} segments of {segment} tokens cannot hold the pass-key task")
        start = int(rng.integers(0, len(filler) - length + 1))
        body = filler[start : start + length - len(fact) - len(tail)].tolist()
        at = int(rng.integers(0, room))
        row = body[:at] + fact + body[at:] + tail
        crops.append((row, len(row) - len(tail) + shared, answer))
    return crops


@torch.no_grad()
def recall(model, crops, segment: int, use_memory: bool) -> dict:
    """Top-1 rate and mean NLL of the answer tokens, reading the memory of segments 1..T-1 or none."""
    hits, nll, whole = [], [], []
    for row, first, n in crops:
        crop = Crop(torch.tensor([row]), segment)
        T = crop.n_segments
        memory = torch.cat([model.encode(crop.window(s)) for s in range(1, T)], dim=2) if use_memory else None
        logits = model.decode(crop.window(T), memory)[0].float()
        # logits at window position p predict row[(T-1)·segment + p + 1]
        positions = [first - (T - 1) * segment - 1 + j for j in range(n)]
        targets = torch.tensor(row[first : first + n])
        logp = torch.log_softmax(logits[positions], dim=-1)
        right = (logp.argmax(-1) == targets).tolist()
        hits += right
        whole.append(all(right))
        nll += (-logp[range(n), targets]).tolist()
    return {"top1": float(np.mean(hits)), "nll": float(np.mean(nll)), "whole_key": float(np.mean(whole))}


def load_head(head: Path, base: str, workdir: Path):
    """(UIOModel, tokenizer) of a checkpoint or a converted bundle over the base model `base`."""
    from train.base import load_config
    from train.checkpoint import find_checkpoint, load_uio_model
    from train.from_bundle import checkpoint_from_bundle, is_bundle

    directory = find_checkpoint(head) or find_checkpoint(head / "checkpoint")
    if directory is None:
        if not is_bundle(head):
            raise UIOError(f"not a UIO checkpoint or bundle: {head}")
        directory = checkpoint_from_bundle(head, workdir / head.name, load_config(base), base)
    model, tokenizer, _ = load_uio_model(directory, base)
    model.eval()
    return model, tokenizer


def main(argv: list[str] | None = None) -> None:
    from train.data import read_documents, tokenize

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the base model the heads were trained on (GGUF or HF directory)")
    parser.add_argument("--head", action="append", required=True, type=Path, help="checkpoint or bundle (repeatable)")
    parser.add_argument("--heldout", required=True, nargs="+", help="held-out text (.txt / .jsonl) for the filler")
    parser.add_argument("--segments", default="4,16", help="crop lengths T, comma separated")
    parser.add_argument("--crops", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        lengths = [int(t) for t in args.segments.split(",")]
    except ValueError:
        parser.error(f"--segments takes whole numbers separated by commas, not {args.segments!r}")
    try:
        with tempfile.TemporaryDirectory() as workdir:
            print(f"{'head':<40} {'T':>3} {'memory':>7} {'top-1':>6} {'NLL':>6} {'whole key':>9}")
            filler = None
            for head in args.head:
                model, tokenizer = load_head(head, args.base, Path(workdir))
                if filler is None:
                    filler = np.concatenate(tokenize(read_documents(args.heldout), tokenizer))
                for T in lengths:
                    crops = probe_crops(tokenizer, filler, T, model.config.segment, args.crops, args.seed)
                    for use_memory in (False, True):
                        r = recall(model, crops, model.config.segment, use_memory)
                        print(f"{str(head):<40} {T:>3} {'yes' if use_memory else 'no':>7} {r['top1']:>6.0%} "
                              f"{r['nll']:>6.2f} {r['whole_key']:>9.0%}", flush=True)
    except UIOError as err:
        raise SystemExit(f"recall_check: error: {err}")


if __name__ == "__main__":
    main()
