"""`uio-gguf data` on a small fixture folder: split by document, synthetic share, reproducibility, and
the parts it is built from (text cleaning, synthetic tasks, a source that is not installed)."""

import json
import random
import re

import pytest

from tests.conftest import run_cli
from uio_gguf import synthetic
from uio_gguf.train import corpus_sources
from uio_gguf.train.dataset import DataArgs, build
from uio_gguf.train.text_clean import html_to_text, looks_english, rst_to_text

N_DOCS = 10


def _story(i: int) -> str:
    """An English document whose every line carries its own tag `docNx`, so any piece of it is traceable;
    longer as i grows."""
    return "\n".join(
        f"This is line {j} of the story of doc{i}x, which is told in the valley by the river "
        f"and it is not the same as any other one."
        for j in range(30 + 3 * i)
    )


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("texts")
    for i in range(N_DOCS):
        (folder / f"story{i:02d}.txt").write_text(_story(i))
    (folder / "short.txt").write_text("This is too short to be a document of its own.")
    (folder / "french.md").write_text("Le chat dort sur la table pendant toute la journée, puis il mange. " * 60)
    (folder / "notes.bin").write_text(_story(99))  # not a text-file suffix
    return folder


def _data(fixture_dir, out, *extra):
    return run_cli(
        "data",
        "--out",
        str(out),
        "--sources",
        "none",
        "--extra-dir",
        str(fixture_dir),
        "--extra-license",
        "CC0-1.0",
        "--heldout-share",
        "0.2",
        "--synthetic-share",
        "0.2",
        "--synthetic-max-chars",
        "2000",
        *extra,
        check=True,
    )


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def made(fixture_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    result = _data(fixture_dir, out, "--seed", "3")
    return out, result


def test_split_is_by_document_and_every_document_is_whole(made):
    out, result = made
    train, heldout = _records(out / "train.jsonl"), _records(out / "heldout.jsonl")
    assert all(set(r) == {"text", "source", "license"} for r in train + heldout)
    real_train = [r for r in train if r["source"] == "extra"]
    assert len(heldout) == 2 and len(real_train) == N_DOCS - 2  # 20% of 10 documents held out
    stories = {_story(i) for i in range(N_DOCS)}
    assert {r["text"] for r in real_train + heldout} == stories  # whole, once; short/French/.bin left out
    assert not {r["text"] for r in real_train} & {r["text"] for r in heldout}
    lengths = sorted(len(_story(i)) for i in range(N_DOCS))
    assert max(len(r["text"]) for r in heldout) >= lengths[N_DOCS // 2]  # held-out spans the lengths
    assert all(r["license"] == "CC0-1.0" for r in real_train + heldout)
    assert "train: " in result.stdout and "held-out: 2 documents" in result.stdout


def test_synthetic_tasks_use_train_text_only_at_the_asked_share(made):
    out, _ = made
    train, heldout = _records(out / "train.jsonl"), _records(out / "heldout.jsonl")
    fake = [r for r in train if r["source"].startswith("synthetic-")]
    assert {r["source"] for r in fake} <= {"synthetic-passkey", "synthetic-key-value"} and fake
    share = sum(len(r["text"]) for r in fake) / sum(len(r["text"]) for r in train)
    assert 0.15 < share < 0.3, share
    held_tags = {re.search(r"doc\d+x", r["text"]).group() for r in heldout}
    for record in fake:
        assert not set(re.findall(r"doc\d+x", record["text"])) & held_tags  # no held-out text leaks in
    for record in fake:
        if record["source"] == "synthetic-passkey":
            key = re.search(r"The pass key is (\d{5})\. Remember it\.", record["text"]).group(1)
            assert record["text"].endswith(f"What is the pass key? The pass key is {key}.")
    summary = json.loads((out / "sources.json").read_text())
    rows = {row["source"]: row for row in summary["sources"]}
    assert rows["extra"]["docs"] == N_DOCS and rows["extra"]["heldout_docs"] == 2
    assert rows["extra"]["licenses"] == ["CC0-1.0"] and rows["extra"]["chars"] > 0
    assert summary["train"]["synthetic_share"] == pytest.approx(share)


def test_same_seed_same_output_other_seed_other_split(made, fixture_dir, tmp_path):
    out, _ = made
    _data(fixture_dir, tmp_path / "again", "--seed", "3")
    _data(fixture_dir, tmp_path / "other", "--seed", "4")
    for name in ("train.jsonl", "heldout.jsonl", "sources.json"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes()
    assert (tmp_path / "other" / "train.jsonl").read_bytes() != (out / "train.jsonl").read_bytes()


def test_max_docs_keeps_a_sample(fixture_dir, tmp_path):
    _data(fixture_dir, tmp_path, "--max-docs", "5", "--synthetic-share", "0")
    records = _records(tmp_path / "train.jsonl") + _records(tmp_path / "heldout.jsonl")
    assert len(records) == 5 and all(r["source"] == "extra" for r in records)


def test_a_missing_source_says_how_to_install_it(fixture_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_sources, "SHARE", tmp_path / "empty")
    report = build(
        DataArgs(
            out=str(tmp_path / "out"), sources=["debian-reference", "debian-handbook"], extra_dirs=[str(fixture_dir)]
        ),
        progress=False,
    )
    assert {m["source"]: m["install"] for m in report["missing"]} == {
        "debian-reference": "apt-get install debian-reference-en",
        "debian-handbook": "apt-get install debian-handbook",
    }
    assert [row["source"] for row in report["sources"]][0] == "extra"


def test_bad_arguments_give_one_clear_line(tmp_path):
    result = run_cli("data", "--out", str(tmp_path), "--sources", "nonesuch")
    assert result.returncode == 1 and "unknown source nonesuch" in result.stderr
    result = run_cli("data", "--out", str(tmp_path), "--sources", "none", "--extra-dir", str(tmp_path / "absent"))
    assert result.returncode == 1 and "is not a directory" in result.stderr


def test_synthetic_tasks_hide_the_fact_at_a_line_start_and_ask_at_the_end():
    filler = "\n".join(f"Line {i} of the filler text." for i in range(200))
    depths = []
    for seed in range(20):
        text = synthetic.passkey(filler, random.Random(seed))
        key = re.search(r"^The pass key is (\d+)\. Remember it\. \1 is the pass key\.$", text, re.M).group(1)
        assert text.endswith(f"\n\nWhat is the pass key? The pass key is {key}.")
        assert text.replace(f"The pass key is {key}. Remember it. {key} is the pass key.\n", "", 1).startswith(filler)
        depths.append(text.index("The pass key") / len(filler))
    assert min(depths) < 0.3 and max(depths) > 0.7  # spread over the depth
    for seed in range(10):  # a filler of one line: the fact goes before or after it, still on its own line
        text = synthetic.passkey("A single line of filler.", random.Random(seed))
        assert re.search(r"^The pass key is (\d+)\. Remember it\. \1 is the pass key\.$", text, re.M)
    text = synthetic.key_value(filler, random.Random(0))
    facts = dict(re.findall(r"^The value of key ([a-z]+-[a-z]+) is (\d+)\.$", text, re.M))
    asked = re.findall(r"What is the value of key ([a-z-]+)\? The value of key \1 is (\d+)\.", text)
    assert len(facts) >= 3 and len(asked) == 2 and all(facts[k] == v for k, v in asked)


def test_text_cleaning():
    html = (
        '<html><head><title>T</title></head><body><div id="banner">Download</div>'
        '<ul class="docnav"><li>Next</li></ul><div class="para">\n\t\tFirst <em>para</em>.</div>'
        "<p>Second<br/>line &amp; more</p></body></html>"
    )
    assert html_to_text(html, skip={"banner", "docnav"}) == "First para.\n\nSecond\nline & more"
    rst = ".. _label:\n\nTitle\n=====\n\n.. function:: open(file)\n\n   Opens :func:`io.open <io.open>` ``x``.\n   :noindex:\n"
    assert rst_to_text(rst) == "Title\n\nopen(file)\n\n   Opens io.open x."
    assert looks_english(_story(1)) and not looks_english("Le chat dort sur la table, puis il mange. " * 20)
