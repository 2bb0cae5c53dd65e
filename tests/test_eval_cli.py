"""`uio-gguf eval ppl` and `uio-gguf eval passkey` end to end on a tiny converted bundle: tables, JSON,
and one clear line for bad input."""

from __future__ import annotations

import json

import pytest

from tests.helpers import REPO, run_cli


@pytest.fixture(scope="module")
def text(tmp_path_factory, prose):
    path = tmp_path_factory.mktemp("heldout") / "heldout.txt"
    path.write_text(prose[:1500])
    return path


def test_eval_ppl_prints_a_table_and_writes_json(tiny_bundle, text, cache_env, tmp_path):
    out = tmp_path / "out.json"
    result = run_cli(
        "eval",
        "ppl",
        str(text),
        "-m",
        str(tiny_bundle),
        "--lengths",
        "32,64",
        "--json",
        str(out),
        env=cache_env,
        check=True,
    )
    assert "uio-r4" in result.stdout and "sliding-same:uio-r4" in result.stdout and "full-8k" in result.stdout
    report = json.loads(out.read_text())
    assert report["lengths"] == [32, 64]
    # by default every memory column has its raw window alone and a plain window of its cells beside it
    assert report["methods"] == [
        "uio-r4",
        "chat-r4",
        "raw-16",
        "raw-128",  # chat's default raw window: 8 segments
        "sliding-same:uio-r4",
        "sliding-same:chat-r4",
        "full-8k",
        "full",
    ]
    assert {(r["method"], r["length"]) for r in report["results"]} == {
        (m, n) for m in report["methods"] for n in (32, 64)
    }
    for r in report["results"]:
        assert set(r) >= {"method", "length", "ppl", "tokens", "seconds"}
        assert r["tokens"] == r["length"] - 1 and r["ppl"] > 1


def test_eval_ppl_baselines_can_be_left_out(tiny_bundle, text, cache_env, tmp_path):
    """--baselines picks columns; the methods are deterministic, so a column is the same with or without
    the others."""
    runs = {}
    for chosen in ("window,sliding,full", "none", "window"):
        out = tmp_path / f"{chosen}.json"
        run_cli(
            "eval",
            "ppl",
            str(text),
            "-m",
            str(tiny_bundle),
            "--lengths",
            "32,64",
            "--baselines",
            chosen,
            "--json",
            str(out),
            env=cache_env,
            check=True,
        )
        runs[chosen] = {(r["method"], r["length"]): r["ppl"] for r in json.loads(out.read_text())["results"]}
    assert {m for m, _ in runs["none"]} == {"uio-r4", "chat-r4"}
    assert {m for m, _ in runs["window"]} == {"uio-r4", "chat-r4", "window"}
    for chosen in ("none", "window"):
        assert all(runs["window,sliding,full"][key] == ppl for key, ppl in runs[chosen].items())
    _one_line_error(
        run_cli("eval", "ppl", str(text), "-m", str(tiny_bundle), "--baselines", "window,rag", env=cache_env),
        "unknown baseline rag",
    )
    _one_line_error(
        run_cli("eval", "ppl", str(text), "-m", str(tiny_bundle), "--lengths", "32", "--keep", "16", env=cache_env),
        "--keep takes 0 to 15 tokens",
    )
    _one_line_error(
        run_cli(
            "eval", "ppl", str(text), "-m", str(tiny_bundle), "--lengths", "32", "--columns", "nope", env=cache_env
        ),
        "--columns nope names none of this run's columns",
    )


def test_eval_ppl_reports_out_of_domain_text_in_a_table_of_its_own(tiny_bundle, text, cache_env, tmp_path):
    out = tmp_path / "out.json"
    book = tmp_path / "book.txt"
    book.write_text(text.read_text()[::-1])  # another text of the same length
    result = run_cli(
        "eval",
        "ppl",
        str(text),
        "--out-of-domain",
        str(book),
        "-m",
        str(tiny_bundle),
        "--lengths",
        "32",
        "--no-chat",
        "--json",
        str(out),
        env=cache_env,
        check=True,
    )
    report = json.loads(out.read_text())
    assert report["domains"] == ["in", "out"] and "chat-r4" not in report["methods"]
    assert [(t["name"], t["domain"]) for t in report["texts"]] == [("heldout.txt", "in"), ("book.txt", "out")]
    assert {(r["domain"], r["method"]) for r in report["results"]} == {
        (d, m) for d in ("in", "out") for m in ("uio-r4", "raw-16", "sliding-same:uio-r4", "full-8k", "full")
    }
    assert "in domain: heldout.txt" in result.stdout and "out of domain: book.txt" in result.stdout
    assert "share of the same-cell gap closed" in result.stdout


def test_eval_ppl_without_texts_reads_the_packaged_ones(tiny_bundle, cache_env, tmp_path):
    out = tmp_path / "out.json"
    run_cli(
        "eval",
        "ppl",
        "-m",
        str(tiny_bundle),
        "--lengths",
        "32",
        "--baselines",
        "none",
        "--no-chat",
        "--json",
        str(out),
        env=cache_env,
        check=True,
    )
    report = json.loads(out.read_text())
    assert [(t["name"], t["domain"]) for t in report["texts"]] == [
        ("heldout_libpng_manual.txt", "in"),
        ("heldout_kjv_genesis_exodus.txt", "out"),
    ]


def test_eval_passkey_prints_a_table_and_writes_json(tiny_bundle, cache_env, tmp_path):
    out = tmp_path / "out.json"
    result = run_cli(
        "eval",
        "passkey",
        "-m",
        str(tiny_bundle),
        "--lengths",
        "64",
        "--depths",
        "0.5",
        "--trials",
        "2",
        "--json",
        str(out),
        env=cache_env,
        check=True,
    )
    assert "depth 0.5" in result.stdout
    report = json.loads(out.read_text())
    assert report["lengths"] == [64] and report["depths"] == [0.5] and report["trials"] == 2
    (cell,) = report["results"]
    assert cell["length"] == 64 and cell["depth"] == 0.5 and 0 <= cell["accuracy"] <= 1
    assert len(cell["samples"]) == 2 and cell["hits"] == sum(s["hit"] for s in cell["samples"])
    assert cell["digit_accuracy"] == sum(s["digits_right"] for s in cell["samples"]) / 10
    assert "digits" in result.stdout
    assert all(abs(s["tokens"] - 64) <= 4 for s in cell["samples"])  # the document is about L tokens long
    assert not list((tmp_path / "cache").glob("memory/*"))  # memory files stay off


def test_digits_right_counts_the_digits_at_their_place():
    from uio_gguf.evals.passkey import digits_right

    assert digits_right(55761, "The pass key is 55761.") == 5
    assert digits_right(55761, "The pass key is 55661.") == 4
    assert digits_right(16388, "The pass key is 138888.") == 3  # 1 _ _ 8 8: compared place by place
    assert digits_right(29377, "It is 2 and 9377") == 1  # only the first number counts
    assert digits_right(12345, "I do not know.") == 0


def test_passkey_document_holds_the_key_at_its_depth(tiny_bundle):
    import random

    from uio_gguf.evals.passkey import document
    from uio_gguf.llamacpp.api import Model

    model = Model(f"{tiny_bundle}/model.gguf")
    for depth in (0.0, 0.5, 1.0):
        book = document(model, 400, depth, 12345, random.Random(0), None)
        where = book.index("The pass key is 12345.") / len(book)
        assert abs(where - depth) < 0.05 and abs(len(model.tokenize(book)) - 400) <= 4


def _one_line_error(result, message):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "not found"),
        ("empty", "is empty"),
        ("too_short", "fewer than every length"),
        ("bad_lengths", "comma separated token counts"),
    ],
)
def test_eval_ppl_bad_input_gives_one_clear_line(case, message, tiny_bundle, text, cache_env, tmp_path):
    path, lengths = text, "32,64"
    if case == "missing":
        path = tmp_path / "nope.txt"
    elif case == "empty":
        path = tmp_path / "empty.txt"
        path.write_text("  \n")
    elif case == "too_short":
        path = tmp_path / "short.txt"
        path.write_text("Only a few words here.")
    elif case == "bad_lengths":
        lengths = "32,many"
    result = run_cli("eval", "ppl", str(path), "-m", str(tiny_bundle), "--lengths", lengths, env=cache_env)
    _one_line_error(result, message)


def test_eval_passkey_bad_depth_gives_one_clear_line(tiny_bundle, cache_env):
    result = run_cli("eval", "passkey", "-m", str(tiny_bundle), "--lengths", "64", "--depths", "1.5", env=cache_env)
    _one_line_error(result, "between 0 and 1")


def test_eval_qa_domain_out_reads_the_packaged_out_of_domain_text(tiny_bundle, cache_env, tmp_path):
    """--domain out asks about the shipped KJV text: the same answers as --filler with that file."""
    from uio_gguf.text.packaged import HELDOUT

    shipped = REPO / "uio_gguf" / "data" / HELDOUT["out"]
    reports = {}
    for name, args in [("domain", ["--domain", "out"]), ("file", ["--filler", str(shipped)])]:
        out = tmp_path / f"{name}.json"
        run_cli(
            "eval", "qa", "-m", str(tiny_bundle), "--lengths", "200", "--depths", "0.5", "--trials", "1",
            "--tasks", "passkey", "--methods", "window,uio", "-n", "4", "--no-cache", "--json", str(out), *args,
            env=cache_env, check=True,
        )  # fmt: skip
        reports[name] = json.loads(out.read_text())
    assert reports["domain"]["filler"] == HELDOUT["out"] and reports["file"]["filler"] == "custom"
    untimed = {name: [{k: v for k, v in s.items() if k != "ttft"} for s in r["samples"]] for name, r in reports.items()}
    assert untimed["domain"] == untimed["file"] and len(untimed["file"]) == 2
    _one_line_error(run_cli("eval", "qa", "-m", str(tiny_bundle), "--domain", "sideways", env=cache_env), "--domain")


def test_eval_ppl_resume_continues_the_json_of_a_stopped_run(tiny_bundle, text, cache_env, tmp_path):
    """A run cut to some columns, then the whole command with --resume: the table holds every column, and
    the cells measured before are the earlier run's to the last digit. A damaged file is refused in one
    line and left as it was."""
    out = tmp_path / "ppl.json"
    command = ("eval", "ppl", str(text), "-m", str(tiny_bundle), "--lengths", "32,64", "--baselines", "same")
    run_cli(*command, "--columns", "uio-", "--json", str(out), env=cache_env, check=True)
    first = {(r["method"], r["length"]): r["ppl"] for r in json.loads(out.read_text())["results"]}
    result = run_cli(*command, "--json", str(out), "--resume", env=cache_env, check=True)
    report = json.loads(out.read_text())
    assert report["methods"] == [
        "uio-r4",
        "chat-r4",
        "raw-16",
        "raw-128",
        "sliding-same:uio-r4",
        "sliding-same:chat-r4",
    ]
    assert all(r["ppl"] for r in report["results"])
    for r in report["results"]:
        if r["method"] == "uio-r4":
            assert r["ppl"] == first[("uio-r4", r["length"])]
    assert "sliding-same:chat-r4" in result.stdout

    out.write_text('{"results": []}')
    _one_line_error(run_cli(*command, "--json", str(out), "--resume", env=cache_env), "cannot resume from")
    assert out.read_text() == '{"results": []}'
    _one_line_error(run_cli(*command, "--resume", env=cache_env), "--resume continues")
