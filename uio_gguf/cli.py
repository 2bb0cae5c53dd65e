"""The `uio-gguf` command line. Each command imports its stage lazily, so `--help` is instant and the
runtime works without the training extra."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from uio_gguf.errors import UIOError

app = typer.Typer(
    help="Long-context memory for llama.cpp: compress a book into memory slots (UIO-LLMs) and chat with it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

TRAIN_EXTRA_HINT = "the training extra is not installed: pip install 'uio-gguf[train]' (install torch==2.13.0 first on CPU)"


def _require_training_stack() -> None:
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise UIOError(TRAIN_EXTRA_HINT) from None


@app.command()
def train(
    base: str = typer.Option(..., help="Base model: a Hugging Face directory or a .gguf file (LLaMA family)."),
    data: list[Path] = typer.Option(..., help="Training text: .txt files (one document each) or .jsonl with a 'text' field. Repeat for several."),
    out: Path = typer.Option(..., help="Output directory: checkpoint/, log.jsonl."),
    segment: int = typer.Option(1024, help="Segment length l in tokens."),
    ratio: int = typer.Option(32, help="Compression ratio r: k = l / r memory slots per segment."),
    segments: int = typer.Option(8, help="Segments per training crop (T)."),
    batch: int = typer.Option(1, help="Crops per step."),
    steps: int = typer.Option(1000, help="Optimizer steps."),
    estimator: str = typer.Option("unbiased", help="Gradient estimator: full, tbptt, incremental, unbiased."),
    window: int = typer.Option(2, help="S: TBPTT window / reservoir size."),
    rank: int = typer.Option(32, help="LoRA rank of the encoder and transfer adapters."),
    alpha: float = typer.Option(128.0, help="LoRA alpha."),
    lr: float = typer.Option(1e-4, help="Peak learning rate (AdamW, 1% warm-up, cosine)."),
    weight_decay: float = typer.Option(0.1, help="AdamW weight decay."),
    clip: float = typer.Option(1.0, help="Gradient-norm clip."),
    eval_every: int = typer.Option(100, help="Held-out perplexity every N steps."),
    save_every: int = typer.Option(100, help="Checkpoint every N steps (and at the end)."),
    seed: int = typer.Option(0, help="Seed for initialisation, crops and the reservoir."),
    resume: bool = typer.Option(False, "--resume", help="Continue the checkpoint in --out exactly where it stopped."),
    device: str = typer.Option("auto", help="auto (CUDA if available, bf16; else CPU, fp32), cpu or cuda."),
    kill_after: Optional[int] = typer.Option(None, hidden=True),
):
    """Train the UIO memory (encoder LoRA, transfer head, memory embedding) over a frozen base model."""
    _require_training_stack()
    from train.loop import TrainArgs
    from train.loop import train as run_training

    args = TrainArgs(
        base=base, data=[str(p) for p in data], out=str(out), segment=segment, ratio=ratio, segments=segments,
        batch=batch, steps=steps, estimator=estimator, window=window, rank=rank, alpha=alpha, lr=lr,
        weight_decay=weight_decay, clip=clip, eval_every=eval_every, save_every=save_every, seed=seed,
        resume=resume, device=device, kill_after=kill_after,
    )
    checkpoint = run_training(args)
    typer.echo(f"checkpoint: {checkpoint}")


@app.command("train-check")
def train_check(
    samples: int = typer.Option(200, help="Sampled estimates per (S, factor)."),
    segments: int = typer.Option(12, help="Segments in the test crop (T)."),
    windows: str = typer.Option("1,2,4,8", help="Reservoir sizes S, comma separated."),
    seed: int = typer.Option(0, help="Seed of the tiny model and the sampling."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of {S, factor, ratio, cosine}."),
):
    """The paper's Table 4 on a tiny random model: ||g_est|| / ||g_full|| of the unbiased estimator
    with and without the max(1, (t-1)/S) factor, and the cosine of the averaged estimate with g_full."""
    _require_training_stack()
    from train.check import PAPER_TABLE4, format_table, gradient_study

    rows = gradient_study(samples=samples, segments=segments, windows=[int(w) for w in windows.split(",")], seed=seed)
    typer.echo(json.dumps(rows) if as_json else format_table(rows, PAPER_TABLE4))


def main() -> None:
    try:
        app()
    except UIOError as err:
        typer.echo(f"uio-gguf: error: {err}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("uio-gguf: interrupted", err=True)
        sys.exit(130)
