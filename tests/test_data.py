"""`uio-gguf data` on a small fixture folder: split by document, synthetic share, reproducibility, and
the parts it is built from (text cleaning, synthetic tasks, a source that is not installed)."""

import json
import random
import re
import shutil
from dataclasses import replace

import pytest

from tests.helpers import run_cli
from uio_gguf.errors import UIOError
from uio_gguf.train import corpus_sources, synthetic
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
    with pytest.raises(UIOError, match=r"not installed: debian-reference \(apt-get install debian-reference-en\)"):
        build(
            DataArgs(
                out=str(tmp_path / "strict"),
                sources=["debian-reference"],
                extra_dirs=[str(fixture_dir)],
                require_all=True,
            ),
            progress=False,
        )
    assert not (tmp_path / "strict" / "train.jsonl").exists()


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


def _prose_stories(tag: str, count: int, description: str, **flags):
    """A prose source `{tag}-prose` of the fixture's first `count` stories, retagged `{tag}Nx` so that
    any piece of them is traceable to it."""
    from uio_gguf.train.corpus_sources import Document, Source

    name = f"{tag}-prose"

    def read():
        for i in range(count):
            yield Document(_story(i).replace(f"doc{i}x", f"{tag}{i}x"), name, "public domain", f"{tag}:{i}")

    return Source(name, description, read, prose=True, **flags)


def _build(out, source, fixture_dir, **options):
    """`uio-gguf data` on the fixture folder and one registered source, 20% held out."""
    args = DataArgs(
        out=str(out), sources=[source], extra_dirs=[str(fixture_dir)], heldout_share=0.2, synthetic_max_chars=2000
    )
    return build(replace(args, **options), progress=False)


def test_an_out_of_domain_source_is_held_out_whole(fixture_dir, tmp_path, monkeypatch):
    """Every document of an out-of-domain source goes to heldout_out_of_domain.jsonl: none reaches
    train.jsonl (nor a synthetic task's filler) or the in-domain held-out file."""
    from uio_gguf.train.dataset import format_report

    monkeypatch.setitem(
        corpus_sources.SOURCES, "far-prose", _prose_stories("far", 4, "prose training never sees", out_of_domain=True)
    )
    report = _build(tmp_path, "far-prose", fixture_dir, synthetic_share=0.2)
    train, heldout = _records(tmp_path / "train.jsonl"), _records(tmp_path / "heldout.jsonl")
    outside = _records(tmp_path / "heldout_out_of_domain.jsonl")
    assert sorted(re.search(r"far\d+x", r["text"]).group() for r in outside) == [f"far{i}x" for i in range(4)]
    assert {r["source"] for r in outside} == {"far-prose"} and {r["license"] for r in outside} == {"public domain"}
    assert not any("far" in r["text"] for r in train + heldout)
    assert len(heldout) == 2 and all(r["source"] == "extra" for r in heldout)  # the in-domain split is as before
    summary = json.loads((tmp_path / "sources.json").read_text())
    rows = {row["source"]: row for row in summary["sources"]}
    assert rows["far-prose"]["out_of_domain"] and rows["far-prose"]["train_docs"] == 0
    assert rows["far-prose"]["heldout_docs"] == 4 and not rows["extra"]["out_of_domain"]
    assert summary["out_of_domain"]["docs"] == 4 and summary["heldout"]["docs"] == 2
    assert summary["train"]["prose_share"] == 0  # the only prose source is out of domain
    assert "out of domain (held out whole): 4 documents" in format_report(report)


def test_bible_books_are_cut_at_each_books_first_chapter():
    from uio_gguf.train.corpus_sources import bible_books

    dump = (
        "\nGenesis 1\n\n  1 In the beginning.\n\nGenesis 2\n\n  1 Thus the heavens.\n"
        "\nExodus 1\n\n  1 Now these are the names.\n\n1 Kings 1\n\n  1 Now king David was old.\n"
    )
    books = dict(bible_books(dump))
    assert list(books) == ["Genesis", "Exodus", "1 Kings"]
    assert books["Genesis"].startswith("Genesis 1") and "Genesis 2" in books["Genesis"]
    assert books["1 Kings"].endswith("Now king David was old.") and "Exodus" not in books["1 Kings"]


def test_missing_prose_sources_say_how_to_install_them(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_sources, "SHARE", tmp_path / "empty")
    monkeypatch.setattr(corpus_sources, "AUSTEN_PACKAGE", tmp_path / "empty")
    monkeypatch.setattr(corpus_sources.shutil, "which", lambda name: None)
    for name, install in [
        ("bible-kjv", "apt-get install bible-kjv"),
        ("jane-austen", "apt-get install --no-install-recommends r-cran-janeaustenr"),
        ("devils-dictionary", "apt-get install dict-devil"),
    ]:
        with pytest.raises(corpus_sources.SourceMissing, match=re.escape(install)):
            next(corpus_sources.SOURCES[name].read())
    assert corpus_sources.SOURCES["bible-kjv"].out_of_domain
    assert not any(s.out_of_domain for n, s in corpus_sources.SOURCES.items() if n != "bible-kjv")


@pytest.mark.skipif(shutil.which("bible") is None, reason="Debian's bible-kjv is not installed")
def test_the_kjv_is_read_book_by_book():
    books = list(corpus_sources.SOURCES["bible-kjv"].read())
    assert len(books) == 66 and books[0].origin == "bible-kjv#Genesis" and books[-1].origin == "bible-kjv#Revelation"
    assert "In the beginning God created the heaven and the earth." in books[0].text
    assert all(b.license == corpus_sources.KJV_LICENSE for b in books)


def test_prose_share_repeats_whole_train_prose_documents(fixture_dir, tmp_path, monkeypatch):
    """--prose-share repeats prose documents of train (never held-out ones) until prose makes up the
    share asked of all train characters, synthetic tasks included; the split is what it was without it."""
    from uio_gguf.train.dataset import format_report

    monkeypatch.setitem(corpus_sources.SOURCES, "near-prose", _prose_stories("near", 3, "prose that training reads"))

    def make(out, prose_share):
        return _build(out, "near-prose", fixture_dir, synthetic_share=0.1, prose_share=prose_share)

    plain = make(tmp_path / "plain", None)
    assert 0.05 < plain["train"]["prose_share"] < 0.4 and plain["train"]["repeated_docs"] == 0
    report = make(tmp_path / "more", 0.6)
    train = _records(tmp_path / "more" / "train.jsonl")
    prose = [r["text"] for r in train if r["source"] == "near-prose"]
    share = sum(map(len, prose)) / sum(len(r["text"]) for r in train)
    longest = max(map(len, prose)) / sum(len(r["text"]) for r in train)
    assert 0.6 - 0.05 < share < 0.6 + longest, share  # reached, overshooting by at most one document
    assert report["train"]["prose_share"] == pytest.approx(share)
    held = _records(tmp_path / "more" / "heldout.jsonl")
    assert (tmp_path / "more" / "heldout.jsonl").read_bytes() == (tmp_path / "plain" / "heldout.jsonl").read_bytes()
    held_texts = {r["text"] for r in held}
    distinct = set(prose)
    assert not distinct & held_texts and len(distinct) == 2  # one of three stories is held out
    assert len(prose) - len(distinct) == report["train"]["repeated_docs"] > 0
    rows = {row["source"]: row for row in report["sources"]}
    assert rows["near-prose"]["docs"] == 3 and rows["near-prose"]["train_docs"] == 2  # documents, not copies
    assert f"{report['train']['repeated_docs']} copies of prose documents" in format_report(report)
    with pytest.raises(UIOError, match=r"--prose-share 0.01 is below the prose sources' own share"):
        make(tmp_path / "less", 0.01)
    with pytest.raises(UIOError, match=r"--prose-share must be above 0 and below 1 - --synthetic-share"):
        make(tmp_path / "all", 0.95)
    result = run_cli(
        "data",
        "--out",
        str(tmp_path / "none"),
        "--sources",
        "none",
        "--extra-dir",
        str(fixture_dir),
        "--prose-share",
        "0.3",
    )
    assert result.returncode == 1 and "--prose-share needs a prose source in train" in result.stderr


def test_a_packaged_evaluation_text_is_always_held_out(fixture_dir, tmp_path):
    """A document that holds the shipped in-domain evaluation text (the libpng manual, here re-wrapped as a
    package would ship it) goes to held-out even when the split holds nothing out: `eval ppl` reads that
    text as held-out on every machine, whatever its packages make the split draw."""
    from uio_gguf.text import packaged

    folder = tmp_path / "texts"
    shutil.copytree(fixture_dir, folder)
    manual = packaged.read(packaged.HELDOUT["in"])
    (folder / "libpng-manual.txt").write_text("\n".join(" ".join(manual.split()[i : i + 9]) for i in range(0, 4000, 9)))
    out = tmp_path / "out"
    args = DataArgs(out=str(out), sources=[], extra_dirs=[str(folder)], heldout_share=0, synthetic_share=0)
    report = build(args, progress=False)
    train, heldout = _records(out / "train.jsonl"), _records(out / "heldout.jsonl")
    assert [r["text"][:20] for r in heldout] == ["libpng-manual.txt - "]
    assert not any("libpng" in r["text"] for r in train)
    assert len(train) == N_DOCS and report["heldout"]["docs"] == 1
