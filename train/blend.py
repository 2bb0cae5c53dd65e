"""`python -m uio_gguf.train.blend START END OUT --share S`: a head part of the way along a run.

Every tensor of the head (encoder LoRA, transfer LoRA, slot embedding) becomes START + S (END - START):
S = 0 is START, 1 is END, 0.5 the midpoint of a run and the checkpoint it started from (WiSE-FT's
averaging of a fine-tuned model with its start). The midpoint of a short CPU run beat both its ends in
domain up to 16K tokens and kept most of the run's gain out of domain (docs/training-log.md, session
20), so `train/next_run.sh check` reads each run's midpoint beside the run. OUT is a checkpoint like
any other: `uio-gguf convert OUT` makes its bundle. Both checkpoints must hold the same head shape
(segment, ratio, LoRA rank and alpha) for the same base model.

    python -m uio_gguf.train.blend runs/next/r8/init-checkpoint runs/next/r8/checkpoint runs/next/r8/midpoint
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from uio_gguf.errors import UIOError
from uio_gguf.train.checkpoint import read_config, read_head_tensors, write_checkpoint
from uio_gguf.train.model import ENCODER, TRANSFER

# What two checkpoints must share for their difference to mean anything.
SAME = ("segment", "ratio", "rank", "alpha")


def blend_checkpoints(start: Path, end: Path, out: Path, share: float) -> Path:
    """Writes START + share (END - START) to `out` (a checkpoint with END's config, the blend recorded
    in it) and returns `out`."""
    start, end, out = Path(start), Path(end), Path(out)
    if not math.isfinite(share):
        raise UIOError(f"share {share} is not a number")
    first, last = read_config(start), read_config(end)
    for key in SAME:
        if first.get(key) != last.get(key):
            raise UIOError(f"{start} and {end} differ in {key} ({first.get(key)} against {last.get(key)})")
    if first.get("base", {}).get("fingerprint") != last.get("base", {}).get("fingerprint"):
        raise UIOError(f"{start} and {end} were trained on different base models (fingerprints differ)")
    (adapters_a, memory_a), (adapters_b, memory_b) = read_head_tensors(start), read_head_tensors(end)
    a = {**adapters_a, "memory": {"memory_embedding": memory_a}}
    b = {**adapters_b, "memory": {"memory_embedding": memory_b}}
    moved = {}
    for part in a:
        if a[part].keys() != b[part].keys() or any(a[part][n].shape != b[part][n].shape for n in a[part]):
            raise UIOError(f"{start} and {end} hold different {part} tensors")
        # lerp in float32: share 0 and 1 give START and END back bit for bit
        moved[part] = {n: torch.lerp(a[part][n].float(), b[part][n].float(), share).contiguous() for n in a[part]}
    config = {**last, "blend": {"start": str(start), "end": str(end), "share": share}}
    write_checkpoint(out, {p: moved[p] for p in (ENCODER, TRANSFER)}, moved["memory"]["memory_embedding"], config)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("start", type=Path, help="checkpoint the run started from (its OUT/init-checkpoint)")
    parser.add_argument("end", type=Path, help="checkpoint the run reached (its OUT/checkpoint)")
    parser.add_argument("out", type=Path, help="where the blended checkpoint is written (replaced if there)")
    parser.add_argument("--share", type=float, default=0.5, help="how far from START toward END (0.5: the midpoint)")
    args = parser.parse_args(argv)
    try:
        blend_checkpoints(args.start, args.end, args.out, args.share)
    except UIOError as err:
        raise SystemExit(f"blend: error: {err}") from None
    print(f"blend: {args.out} = {args.start} + {args.share:g} ({args.end} - {args.start})")


if __name__ == "__main__":
    main()
