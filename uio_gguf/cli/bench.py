"""`uio-gguf bench`: UIO memory against plain llama.cpp full attention, per text length (uio_gguf.bench.runtime)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from uio_gguf.cli.options import (
    DEFAULT_RATIO,
    ENCODER_FORMAT_HELP,
    FlashAttn,
    GpuLayers,
    MemoryWindow,
    Model,
    Ratio,
    Verbose,
    app,
    check_ratio,
    parse_lengths,
    write_json,
)
from uio_gguf.errors import UIOError


@app.command()
def bench(
    lengths: str = typer.Option(
        "4096,16384,32768", "--lengths", help="Token lengths, comma separated: the book is cut (or repeated) to each."
    ),
    ratio: Ratio = None,
    model: Model = None,
    n_gpu_layers: GpuLayers = 0,
    threads: int | None = typer.Option(
        None, "--threads", help="CPU threads, the same for both sides (default: the usable CPUs idle at start)."
    ),
    text: Path | None = typer.Option(
        None, "--text", help="A UTF-8 text (default: the packaged demo book); repeated when a length needs more."
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the results here as JSON."),
    decode_tokens: int = typer.Option(64, "--decode-tokens", help="Greedy tokens decoded on each side."),
    segments_per_batch: int = typer.Option(
        0, "--segments-per-batch", help="Segments per encoder batch (default: 1 on a CPU, 4 with --n-gpu-layers)."
    ),
    plain: bool = typer.Option(
        True, "--plain/--no-plain", help="--no-plain: UIO alone (for lengths full attention cannot afford)."
    ),
    encoder_format: str = typer.Option(
        "auto",
        "--encoder-format",
        help=ENCODER_FORMAT_HELP + " Several, comma separated, are measured one after the other in this run (plain "
        "llama.cpp with the first only: it runs on the decoder's weights, which they do not change).",
    ),
    first_token_runs: int = typer.Option(
        1,
        "--first-token-runs",
        help="New conversations timed for each first-token figure; the median is reported (the spread "
        "between runs on a small CPU can be as large as the change measured).",
    ),
    memory_window: MemoryWindow = None,
    flash_attn: FlashAttn = False,
    verbose: Verbose = False,
):
    """Speed you can reproduce: per length, on the same text, model and threads, plain llama.cpp (prefill,
    decode) against UIO memory (ingest, decode over the memory and the raw window), KV bytes of each, the time to
    a first token when the memory comes from its memory file, and ingest against its limit."""

    from uio_gguf.bench import runtime as runner
    from uio_gguf.format import derived
    from uio_gguf.format.shipped import default_bundle_path
    from uio_gguf.llamacpp.threads import default_threads
    from uio_gguf.memory.runtime import UIORuntime
    from uio_gguf.text import packaged
    from uio_gguf.text.book import read_book

    check_ratio(model, ratio)
    asked = parse_lengths(lengths)
    extra = {"command": "uio-gguf " + " ".join(sys.argv[1:]), "n_gpu_layers": n_gpu_layers}
    if threads is None:
        threads = default_threads()
    if threads < 1:
        raise UIOError(f"--threads must be 1 or more, not {threads}")
    if segments_per_batch < 0:
        raise UIOError(f"--segments-per-batch must be 0 (automatic) or more, not {segments_per_batch}")
    body = read_book(text) if text is not None else packaged.read(packaged.DEMO_BOOK)
    name = str(text) if text is not None else "uio_gguf/data/demo_book.txt (the demo book)"
    formats = [f.strip() for f in encoder_format.split(",") if f.strip()]
    unknown = [f for f in formats if f not in derived.FORMATS]
    if not formats or unknown:
        raise UIOError(f"--encoder-format takes {', '.join(derived.FORMATS)}, comma separated, not {encoder_format!r}")
    reports = []
    for i, fmt in enumerate(formats):
        with UIORuntime(
            model if model is not None else default_bundle_path(DEFAULT_RATIO if ratio is None else ratio),
            n_gpu_layers=n_gpu_layers,
            flash_attn=flash_attn,
            segments_per_batch=segments_per_batch,
            n_threads=threads,
            verbose=verbose,
            encoder_format=fmt,
        ) as runtime:
            done = list(reports)

            def saved(partial, done=done):
                if json_out:
                    json_out.write_text(json.dumps(_joined([*done, partial], extra), indent=2))

            report = runner.run(
                runtime,
                asked,
                body,
                name,
                n_decode=decode_tokens,
                plain=plain and i == 0,
                log=lambda line, fmt=fmt: typer.echo(f"[{fmt}] {line}" if len(formats) > 1 else line, err=True),
                on_row=saved,
                first_token_runs=first_token_runs,
                memory_window=memory_window,
            )
        reports.append(report)
    for report in reports:
        if len(reports) > 1:
            typer.echo(f"\n### encoder weights {report['model']['encoder_format']}\n")
        typer.echo(runner.format_table(report))
    if len(reports) > 1:
        typer.echo("\n" + runner.format_comparison(reports))
    write_json(json_out, _joined(reports, extra))


def _joined(reports: list[dict], extra: dict) -> dict:
    """One format's report as it always was; several: {"formats": [report, ...]}."""
    return {**reports[0], **extra} if len(reports) == 1 else {"formats": reports, **extra}
