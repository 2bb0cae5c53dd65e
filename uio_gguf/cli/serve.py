"""The `serve` command: an OpenAI-compatible server with book memory (uio_gguf/serve/app.py, docs/serving.md)."""

from __future__ import annotations

import typer

from uio_gguf.cli.options import (
    DEFAULT_RATIO,
    EncoderFormat,
    FlashAttn,
    ForceNCtx,
    GpuLayers,
    KeepTokens,
    MemoryWindow,
    Model,
    NCtx,
    Ratio,
    RawWindow,
    RecallInContext,
    Reread,
    Threads,
    Verbose,
    app,
    check_n_ctx,
    open_runtime,
)
from uio_gguf.errors import UIOError
from uio_gguf.text.book import DEFAULT_MAX_UPLOAD_MB

SERVE_EXTRA_HINT = "the serve extra is not installed: pip install 'uio-gguf[serve]'"


def require_serve_stack() -> None:
    try:
        import fastapi  # noqa: F401
        import sse_starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UIOError(SERVE_EXTRA_HINT) from None


@app.command()
def serve(
    model: Model = None,
    ratio: Ratio = None,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    n_gpu_layers: GpuLayers = 0,
    parallel: int = typer.Option(1, "--parallel", min=1, help="Answers generated at once (a decoder context each)."),
    queue: int = typer.Option(16, "--queue", min=0, help="Requests that may wait for a slot; past that, 503."),
    api_key: str | None = typer.Option(None, "--api-key", help="Require `Authorization: Bearer KEY`."),
    n_ctx: NCtx = None,
    force_n_ctx: ForceNCtx = False,
    threads: Threads = None,
    keep: int = typer.Option(4, "--keep", min=0, help="Finished conversations kept open to be continued."),
    raw_window: RawWindow = None,
    keep_tokens: KeepTokens = None,
    reread: Reread = None,
    memory_window: MemoryWindow = None,
    recall_in_context: RecallInContext = None,
    alias: str | None = typer.Option(None, "--alias", help="The model id clients use (default: the bundle's name)."),
    max_upload_mb: float = typer.Option(
        DEFAULT_MAX_UPLOAD_MB, "--max-upload-mb", min=0.001, help="The largest book the web page takes, in MB."
    ),
    encoder_format: EncoderFormat = "auto",
    flash_attn: FlashAttn = False,
    verbose: Verbose = False,
):
    """Serve the web page and the OpenAI chat-completions API: a long user message (the book) goes into memory,
    once per book."""
    require_serve_stack()
    from uio_gguf.serve.app import create_app, run
    from uio_gguf.serve.engine import UIOLlama

    check_n_ctx(n_ctx)
    runtime = open_runtime(
        model,
        ratio,
        n_gpu_layers,
        flash_attn,
        verbose,
        n_ctx=n_ctx,
        force_n_ctx=force_n_ctx,
        threads=threads,
        encoder_format=encoder_format,
    )
    llm = UIOLlama(
        runtime=runtime,
        n_ctx=n_ctx,
        keep=keep,
        raw_window=raw_window,
        keep_tokens=keep_tokens,
        reread=reread,
        memory_window=memory_window,
        recall_in_context=recall_in_context,
    )
    if alias is None and model is None:  # the shipped bundle's name, not its cache folder's
        from uio_gguf.format.shipped import shipped_bundles

        alias = shipped_bundles()[DEFAULT_RATIO if ratio is None else ratio].name
    model_id = alias or runtime.bundle.path.name
    typer.echo(
        f"serving {model_id} on http://{host}:{port}/v1 (books up to {llm.max_book_tokens():,} tokens); "
        f"the web page: http://{host}:{port}/",
        err=True,
    )
    app_ = create_app(llm, model_id, parallel=parallel, queue=queue, api_key=api_key, max_upload_mb=max_upload_mb)
    try:
        run(app_, host, port)
    finally:
        llm.close()
        runtime.close()
    typer.echo("uio-gguf serve: stopped", err=True)
