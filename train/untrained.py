"""An untrained UIO checkpoint: zero LoRA deltas (B = 0, as PEFT initialises) and e_mem = the EOS
embedding. Converted with --base-gguf it makes a working bundle before any training: the memory is then
the model's own states at the slot rows. `python -m uio_gguf.train.untrained --base FILE --out DIR`."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from uio_gguf.train.base import fingerprint, load_base
from uio_gguf.train.checkpoint import save_checkpoint
from uio_gguf.train.model import UIOConfig, UIOModel


def untrained_checkpoint(
    base: str | Path, out: str | Path, segment: int, ratio: int, rank: int, alpha: float, loaded=None
) -> Path:
    model, _ = loaded or load_base(base)
    torch.manual_seed(0)  # LoRA A is random (B is zero): fixed, so the files are reproducible
    uio = UIOModel(model, UIOConfig(segment=segment, ratio=ratio, rank=rank, alpha=alpha))
    meta = {
        "estimator": None,
        "window": None,
        "step": 0,
        "base": {
            "path": str(Path(base).resolve()),
            "model_type": model.config.model_type,
            "fingerprint": fingerprint(model),
        },
    }
    save_checkpoint(uio, Path(out), meta)
    return Path(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--segment", type=int, default=512)
    parser.add_argument("--ratio", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    args = parser.parse_args()
    print(untrained_checkpoint(args.base, args.out, args.segment, args.ratio, args.rank, args.alpha))


if __name__ == "__main__":
    main()
