"""`python -m uio_gguf.train.recall_check`: does a head's memory carry a pass key? Measured in PyTorch, in a
training format, so that a miss of `uio-gguf eval passkey` can be told apart from a runtime fault.

Each probe crop is T segments of held-out text with the pass-key sentence at a random point of
segments 1..T-1 and the question with its answer closing segment T, in one of two formats:
  plain  train.retrieval's lines ("What is the pass key? The pass key is 71432."); scored: the number
  chat   train.chat_recall's chat turn, as `uio-gguf eval passkey` asks; scored: the whole answer turn
The scores are the top-1 rate and mean NLL of the scored tokens and the share of crops with all of them
right, with the memory of segments 1..T-1 and, as the baseline, without any memory. A bundle is read
through train.from_bundle, so a shipped head can be probed as well as a checkpoint.

    python -m uio_gguf.train.recall_check --base <GGUF> --heldout data/heldout.jsonl \\
        --head uio_gguf/bundles/smollm2-135m-l128-r8 --segments 4,16 --crops 16
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from uio_gguf.errors import UIOError
from uio_gguf.train import synthetic
from uio_gguf.train.chat_recall import ChatRecallCrops, ChatRecallPool
from uio_gguf.train.estimators import Crop
from uio_gguf.train.model import IGNORE
from uio_gguf.train.retrieval import tokenize_task


def probe_crops(tokenizer, filler: np.ndarray, segments: int, segment: int, count: int, seed: int = 0):
    """[(row of segments·segment + 1 ids, its labels: IGNORE except at the answer's number tokens)] in
    train.retrieval's plain format."""
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
        row = np.asarray(body[:at] + fact + body[at:] + tail)
        labels = np.full_like(row, IGNORE)
        first = len(row) - len(tail) + shared
        labels[first : first + answer] = row[first : first + answer]
        crops.append((row, labels))
    return crops


def chat_probe_crops(tokenizer, filler: np.ndarray, segments: int, segment: int, count: int, seed: int = 0):
    """The same in train.chat_recall's format (the pass-key chat turn), labelled on the whole answer turn."""
    rng = np.random.default_rng(seed)
    length = segments * segment + 1
    if len(filler) < length:
        raise UIOError(f"the held-out text is shorter than a crop of {segments} segments")
    maker = ChatRecallCrops(ChatRecallPool.build(tokenizer, count, seed), segment, length)
    starts = rng.integers(0, len(filler) - length + 1, size=count)
    return [maker.make(filler[s : s + length], rng) for s in starts]


@torch.no_grad()
def recall(model, crops, segment: int, use_memory: bool) -> dict:
    """Top-1 rate and mean NLL of the labelled tokens, and the share of crops with all of them right,
    reading the memory of segments 1..T-1 or none."""
    hits, nll, whole = [], [], []
    for row, labels in crops:
        crop = Crop(torch.as_tensor(row)[None], segment, torch.as_tensor(labels)[None])
        T = crop.n_segments
        memory = torch.cat([model.encode(crop.window(s)) for s in range(1, T)], dim=2) if use_memory else None
        logits = model.decode(crop.window(T), memory)[0].float()
        targets = crop.targets(T)[0]
        scored = targets != IGNORE
        logp = torch.log_softmax(logits[scored], dim=-1)
        right = (logp.argmax(-1) == targets[scored]).tolist()
        hits += right
        whole.append(all(right))
        nll += (-logp.gather(1, targets[scored][:, None])[:, 0]).tolist()
    return {"top1": float(np.mean(hits)), "nll": float(np.mean(nll)), "whole": float(np.mean(whole))}


FORMATS = {"plain": probe_crops, "chat": chat_probe_crops}


def load_head(head: Path, base: str, workdir: Path):
    """(UIOModel, tokenizer) of a checkpoint or a converted bundle over the base model `base`."""
    from uio_gguf.train.base import load_config
    from uio_gguf.train.checkpoint import find_checkpoint, load_uio_model
    from uio_gguf.train.from_bundle import checkpoint_from_bundle, is_bundle

    directory = find_checkpoint(head) or find_checkpoint(head / "checkpoint")
    if directory is None:
        if not is_bundle(head):
            raise UIOError(f"not a UIO checkpoint or bundle: {head}")
        directory = checkpoint_from_bundle(head, workdir / head.name, load_config(base), base)
    model, tokenizer, _ = load_uio_model(directory, base)
    model.eval()
    return model, tokenizer


def main(argv: list[str] | None = None) -> None:
    from uio_gguf.train.data import read_documents, tokenize

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", required=True, help="the base model the heads were trained on (GGUF or HF directory)")
    parser.add_argument("--head", action="append", required=True, type=Path, help="checkpoint or bundle (repeatable)")
    parser.add_argument("--heldout", required=True, nargs="+", help="held-out text (.txt / .jsonl) for the filler")
    parser.add_argument("--segments", default="4,16", help="crop lengths T, comma separated")
    parser.add_argument("--crops", type=int, default=16)
    parser.add_argument(
        "--format",
        choices=sorted(FORMATS),
        default="plain",
        help="plain: train.retrieval's lines, the number's tokens scored; chat: the pass-key chat "
        "turn of train.chat_recall and `uio-gguf eval passkey`, the whole answer scored",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        lengths = [int(t) for t in args.segments.split(",")]
    except ValueError:
        parser.error(f"--segments takes whole numbers separated by commas, not {args.segments!r}")
    try:
        with tempfile.TemporaryDirectory() as workdir:
            print(f"{'head':<40} {'T':>3} {'memory':>7} {'top-1':>6} {'NLL':>6} {'all right':>9}")
            filler = None
            for head in args.head:
                model, tokenizer = load_head(head, args.base, Path(workdir))
                if filler is None:
                    filler = np.concatenate(tokenize(read_documents(args.heldout), tokenizer))
                for T in lengths:
                    crops = FORMATS[args.format](tokenizer, filler, T, model.config.segment, args.crops, args.seed)
                    for use_memory in (False, True):
                        r = recall(model, crops, model.config.segment, use_memory)
                        print(
                            f"{str(head):<40} {T:>3} {'yes' if use_memory else 'no':>7} {r['top1']:>6.0%} "
                            f"{r['nll']:>6.2f} {r['whole']:>9.0%}",
                            flush=True,
                        )
    except UIOError as err:
        raise SystemExit(f"recall_check: error: {err}") from None


if __name__ == "__main__":
    main()
