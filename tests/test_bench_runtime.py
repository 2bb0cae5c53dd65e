"""`uio-gguf bench` end to end at the smallest settings on the tiny bundle: the JSON's shape, and KV
bytes and cells that agree with what the bench did (its timings are not asserted: speed belongs to
docs/benchmarks.md)."""

import json

from tests.helpers import run_cli

SEGMENT, RATIO, DECODE = 16, 4, 8  # the tiny bundle's segment and ratio; tokens decoded per side


def assert_uio_cells(uio: dict, tokens_read: int, cell: int) -> None:
    """The cells the bench counted in llama.cpp's cache are k per compressed segment plus one per raw
    token, the raw tokens being what the segments leave of the tokens read (fewer than the raw window
    R allows), and the bytes are those cells' bytes."""
    slots = SEGMENT // RATIO
    assert uio["memory_cells"] == uio["segments"] * slots
    assert uio["segments"] * SEGMENT + uio["raw_cells"] == tokens_read
    assert 0 < uio["raw_cells"] <= uio["raw_window"] and uio["raw_window"] % SEGMENT == 0
    assert uio["kv_cells"] == uio["memory_cells"] + uio["raw_cells"]
    assert uio["kv_bytes"] == uio["kv_cells"] * cell


def test_bench_json_and_kv_cells(make_tiny_bundle, cache_env, tmp_path):
    bundle, uio_model, _ = make_tiny_bundle("llama", segment=SEGMENT, ratio=RATIO, outtype="f32")
    out = tmp_path / "bench.json"
    result = run_cli(
        "bench", "-m", str(bundle), "--lengths", "64,101", "--threads", "1",
        "--decode-tokens", str(DECODE), "--json", str(out), env=cache_env, check=True,
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["command"].startswith("uio-gguf bench -m")
    assert report["settings"]["threads"] == 1 and report["settings"]["decode_tokens"] == DECODE
    assert [r["length"] for r in report["rows"]] == [64, 101]
    assert "| uio ingest, tok/s |" in result.stdout and "ingest limit" in result.stdout

    # A cell holds K and V of every layer, f16 (the runtime's default cache type): from the HF config.
    config = uio_model.base.config
    head_dim = config.hidden_size // config.num_attention_heads
    cell = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 2
    assert report["model"]["kv_cell_bytes"] == cell
    for row in report["rows"]:
        n = row["tokens"]
        assert abs(n - row["length"]) <= 4  # cut at a token boundary of the text, then re-tokenized
        plain, uio, limit = row["plain"], row["uio"], row["limit"]
        # plain full attention: every token of the document and every decoded token holds a cell
        assert plain["kv_cells"] == n + DECODE and plain["kv_bytes"] == (n + DECODE) * cell
        # uio: every token read is either in a compressed segment (k cells) or raw (one cell)
        assert uio["tokens"] == n
        assert_uio_cells(uio, n + DECODE, cell)
        assert uio["ttft_from_file"] is True  # the question's memory came from the file the ingest wrote
        assert row["ratios"]["kv"] == uio["kv_bytes"] / plain["kv_bytes"]
        assert row["ratios"]["decode"] == uio["decode_tok_s"] / plain["decode_tok_s"]
        assert limit["ingest_limit_tok_s"] == limit["short_prefill_tok_s"] * SEGMENT / (SEGMENT + SEGMENT // RATIO)
        assert limit["ingest_share"] == uio["ingest_tok_s"] / limit["ingest_limit_tok_s"]
        assert limit["short_prefill_tokens"] == n // SEGMENT * SEGMENT
        assert row["beyond_trained_window"] is False
        for value in (plain["prefill_tok_s"], plain["decode_tok_s"], uio["ingest_tok_s"], uio["decode_tok_s"]):
            assert value > 0
        assert uio["ttft_s"] > 0 and uio["ttft_recall_s"] > 0
        # the same-cell sliding window holds exactly uio's KV cells (the same KV size), and was timed
        sliding = row["sliding"]
        assert sliding["kv_cells"] == uio["kv_cells"] and sliding["kv_bytes"] == uio["kv_bytes"]
        assert sliding["ingest_tok_s"] > 0 and sliding["decode_tok_s"] > 0
    assert "| sliding-same decode, tok/s |" in result.stdout


def test_bench_no_plain_runs_uio_alone(tiny_bundle, cache_env, tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli(
        "bench", "-m", str(tiny_bundle), "--lengths", "48", "--threads", "1", "--decode-tokens", "2",
        "--no-plain", "--json", str(out), env=cache_env, check=True,
    )  # fmt: skip
    row = json.loads(out.read_text())["rows"][0]
    assert row["plain"] is None and row["ratios"] is None and row["uio"]["kv_cells"] > 0
    assert "plain prefill" not in result.stdout


def test_bench_bad_lengths_give_one_line(tiny_bundle, cache_env):
    for lengths in ("4k", "8"):  # not a number; shorter than a segment
        result = run_cli("bench", "-m", str(tiny_bundle), "--lengths", lengths, env=cache_env)
        assert result.returncode == 1
        assert result.stderr.startswith("uio-gguf: error:") and "Traceback" not in result.stderr


def test_uio_decode_after_a_book_of_whole_segments(tiny_bundle):
    """With a raw window of one segment, no raw token is left, hence no logits: decode still runs, and
    the cells are the arithmetic's."""
    from uio_gguf.bench import runtime as bench
    from uio_gguf.llamacpp.template import document_tokens
    from uio_gguf.memory.runtime import UIORuntime
    from uio_gguf.text import packaged

    with UIORuntime(tiny_bundle, n_threads=1) as runtime:
        text = packaged.read(packaged.DEMO_BOOK)[:2000]
        books = (bench.book_of_length(runtime.model, text, n)[0] for n in range(40, 120))
        book = next(b for b in books if len(document_tokens(runtime.model, b)) % SEGMENT == 0)
        n = len(document_tokens(runtime.model, book))
        with bench.private_memory_files():
            uio = bench.measure_uio(runtime, book, 3)
    assert uio["tokens"] == n and uio["ttft_from_file"] is True
    cell = runtime.model.n_layer * 2 * runtime.model.n_head_kv * runtime.model.head_dim * 2  # f16 K and V
    assert_uio_cells(uio, n + 3, cell)


def test_bench_compares_encoder_formats_in_one_run(tiny_bundle, cache_env, tmp_path):
    """--encoder-format model,f16: a report per format (plain llama.cpp with the first only), each naming
    its weights, and a table that puts them side by side; a later question reuses the recall."""
    out = tmp_path / "bench.json"
    result = run_cli(
        "bench", "-m", str(tiny_bundle), "--lengths", "48", "--threads", "1", "--decode-tokens", "2",
        "--encoder-format", "model,f16", "--json", str(out), env=cache_env, check=True,
    )  # fmt: skip
    reports = json.loads(out.read_text())["formats"]
    assert [r["model"]["encoder_format"] for r in reports] == ["f32", "f16"]  # the tiny bundle's model is F32
    assert all(r["model"]["decoder_format"] == "f32" for r in reports)
    assert reports[1]["model"]["encoder_weights_bytes"] < reports[0]["model"]["encoder_weights_bytes"]
    assert reports[0]["rows"][0]["plain"] is not None and reports[1]["rows"][0]["plain"] is None
    for report in reports:
        uio = report["rows"][0]["uio"]
        assert uio["ttft_from_file"] is True and uio["ttft_recall_again_s"] > 0
        assert uio["recall_reused"] is (uio["recall_tokens"] > 0)
    assert "| encoder weights | length |" in result.stdout and "| f16 | 48 |" in result.stdout


def test_first_token_times_are_the_median_of_the_runs_asked(tiny_bundle, cache_env, tmp_path):
    """--first-token-runs 3: three new conversations timed for each first-token figure, the report giving
    each run and their median; 0 is refused in one line."""
    import statistics

    out = tmp_path / "bench.json"
    result = run_cli(
        "bench", "-m", str(tiny_bundle), "--lengths", "48", "--threads", "1", "--decode-tokens", "2",
        "--no-plain", "--first-token-runs", "3", "--json", str(out), env=cache_env, check=True,
    )  # fmt: skip
    report = json.loads(out.read_text())
    uio = report["rows"][0]["uio"]
    assert report["settings"]["first_token_runs"] == 3
    for name in ("ttft_s", "ttft_recall_s", "ttft_recall_again_s"):
        assert len(uio[f"{name}_runs"]) == 3 and uio[name] == statistics.median(uio[f"{name}_runs"])
    assert uio["ttft_from_file"] is True and "each the median of 3 runs" in result.stdout
    refused = run_cli("bench", "-m", str(tiny_bundle), "--lengths", "48", "--first-token-runs", "0", env=cache_env)
    assert refused.returncode == 1 and "--first-token-runs must be 1 or more" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_bench_refuses_an_unknown_encoder_format(tiny_bundle, cache_env):
    result = run_cli("bench", "-m", str(tiny_bundle), "--lengths", "48", "--encoder-format", "q3", env=cache_env)
    assert result.returncode == 1 and "--encoder-format takes" in result.stderr and "Traceback" not in result.stderr


def test_bench_memory_window_holds_the_decoder_to_the_window(tiny_bundle, cache_env, tmp_path):
    """--memory-window W: the book's memory in the decoder is W cells (the latest segments'), the run says
    so, and the first questions are timed on the same layout (read from its start state)."""
    out = tmp_path / "bench.json"
    run_cli(
        "bench", "-m", str(tiny_bundle), "--lengths", "400", "--threads", "1", "--decode-tokens", "2", "--no-plain",
        "--memory-window", "32", "--json", str(out), env=cache_env, check=True,
    )  # fmt: skip
    report = json.loads(out.read_text())
    uio = report["rows"][0]["uio"]
    assert report["settings"]["memory_window"] == 32
    assert uio["memory_cells"] == 32 and uio["segments"] * 4 > 32  # 4 slots a segment: segments were left out
    assert uio["kv_cells"] == 32 + uio["raw_cells"] and uio["ttft_from_file"] is True
