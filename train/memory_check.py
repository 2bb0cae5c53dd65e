"""`python -m uio_gguf.train.memory_check`: does a head read a long memory, or is it lost in it? Measured in PyTorch.

The longest document of the given text is cut into T segments. Every window t reads the memory of the
segments before it, or only of the last K of them (a cap), and the table prints the perplexity of the
windows 1..L/segment for each prefix length L (what `uio-gguf eval ppl` reports as its uio column,
computed here without llama.cpp) and of the last --last windows alone (where the memory is longest).
A head that reads its memory well gets better as K grows; one that was trained only on short
memories gets worse with the whole memory than with the last few segments of it.

    python -m uio_gguf.train.memory_check --base <GGUF> --text data/heldout.jsonl --segments 256 --caps 0,15,all \\
        --head uio_gguf/bundles/smollm2-135m-l128-r8
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from uio_gguf.errors import UIOError
from uio_gguf.train.estimators import Crop


@torch.no_grad()
def window_losses(model, crop: Crop, caps: list[int | None]) -> dict[int | None, list[float]]:
    """{cap: [loss of window t for t = 1..T]}: window t reads the memory of segments max(1, t-cap)..t-1
    (cap None: all of them; 0: none). Each segment is encoded once for every cap."""
    T, k = crop.n_segments, model.config.slots
    memory = torch.cat([model.encode(crop.window(s)) for s in range(1, T)], dim=2) if T > 1 else None
    losses = {cap: [] for cap in caps}
    for t in range(1, T + 1):
        for cap in caps:
            first = 1 if cap is None else max(1, t - cap)  # the oldest segment this window reads
            rows = None if first >= t else memory[:, :, (first - 1) * k : (t - 1) * k]
            losses[cap].append(model.window_loss(crop.window(t), crop.targets(t), rows).item())
    return losses


def prefix_ppl(losses: list[float], windows: int) -> float:
    """Perplexity of the first `windows` windows (every token of them counts the same)."""
    return math.exp(float(np.mean(losses[:windows])))


def parse_caps(text: str) -> list[int | None]:
    caps = []
    for part in text.split(","):
        if part.strip() == "all":
            caps.append(None)
        elif part.strip().isdigit():
            caps.append(int(part))
        else:
            raise ValueError(part)
    return caps


def main(argv: list[str] | None = None) -> None:
    from uio_gguf.train.data import read_documents
    from uio_gguf.train.recall_check import load_head

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", required=True, help="the base model the heads were trained on (GGUF or HF directory)")
    parser.add_argument("--head", action="append", required=True, type=Path, help="checkpoint or bundle (repeatable)")
    parser.add_argument("--text", required=True, nargs="+", help="text (.txt / .jsonl): its longest document is read")
    parser.add_argument("--segments", type=int, default=256, help="T: segments read from the document")
    parser.add_argument(
        "--caps", default="0,15,all", help="memory caps K in segments (0: no memory, all: the whole memory)"
    )
    parser.add_argument("--last", type=int, default=16, help="also score the last N windows alone")
    args = parser.parse_args(argv)
    try:
        caps = parse_caps(args.caps)
    except ValueError as bad:
        parser.error(f"--caps takes whole numbers or 'all', separated by commas, not {bad}")
    if args.segments < 2 or not 1 <= args.last <= args.segments:
        parser.error("--segments must be at least 2 and --last between 1 and --segments")
    try:
        with tempfile.TemporaryDirectory() as workdir:
            document = max(read_documents(args.text), key=len)
            for head in args.head:
                model, tokenizer = load_head(head, args.base, Path(workdir))
                segment = model.config.segment
                ids = tokenizer(document, add_special_tokens=False)["input_ids"][: args.segments * segment + 1]
                if len(ids) < args.segments * segment + 1:
                    raise UIOError(
                        f"the longest document has {len(ids)} tokens, fewer than {args.segments} segments of {segment}"
                    )
                losses = window_losses(model, Crop(torch.tensor([ids]), segment), caps)
                lengths = sorted({2**n for n in range(5, 20) if 2**n <= args.segments} | {args.segments})
                print(f"{head}: perplexity by memory cap (segments of {segment} tokens)")
                print(
                    f"{'cap':>5} " + " ".join(f"{n * segment:>9,}" for n in lengths) + f" {'last ' + str(args.last):>9}"
                )
                for cap in caps:
                    cells = [f"{prefix_ppl(losses[cap], n):>9.3f}" for n in lengths]
                    last = prefix_ppl(losses[cap][-args.last :], args.last)
                    print(f"{'all' if cap is None else cap:>5} " + " ".join(cells) + f" {last:>9.3f}", flush=True)
    except UIOError as err:
        raise SystemExit(f"memory_check: error: {err}") from None


if __name__ == "__main__":
    main()
