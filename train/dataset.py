"""`uio-gguf data`: a reproducible training set from the sources of train.corpus_sources.

Documents are filtered (long enough, English), de-duplicated, split into train / held-out by document
(each source gives the same share to held-out, across its range of lengths; a document holding one of the
package's held-out evaluation texts is always held out), and the train side gets
copies of its prose documents if asked (--prose-share) and synthetic long-range tasks (uio_gguf.train.synthetic)
built from train text only, so held-out text never leaks into training.

The documents of an out-of-domain source (corpus_sources.Source.out_of_domain) are all held out, in a
file of their own: text of a kind training never saw, to measure how far the memory generalizes.

Writes train.jsonl, heldout.jsonl and heldout_out_of_domain.jsonl ({"text", "source", "license"} a line)
and sources.json.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from uio_gguf.atomic import atomic_file
from uio_gguf.errors import UIOError
from uio_gguf.train import synthetic
from uio_gguf.train.corpus_sources import SOURCES, Document, Source, SourceMissing, extra_dir
from uio_gguf.train.text_clean import looks_english


@dataclass
class DataArgs:
    out: str
    sources: list[str] | None = None  # None: every source in SOURCES
    extra_dirs: list[str] = field(default_factory=list)
    extra_license: str = "unknown (user-supplied)"
    min_chars: int = 2000
    max_docs: int | None = None
    heldout_share: float = 0.05
    synthetic_share: float = 0.05  # of the train characters
    synthetic_max_chars: int = 32_000  # synthetic documents are 1/4 to 1 times this long
    prose_share: float | None = None  # of the train characters; None: the sources' own share
    seed: int = 0
    require_all: bool = False  # stop if a selected source is not installed, instead of going on without it


def selected_sources(args: DataArgs) -> list[Source]:
    names = list(SOURCES) if args.sources is None else args.sources
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise UIOError(f"unknown source {', '.join(unknown)} (choose from {', '.join(SOURCES)})")
    chosen = [SOURCES[n] for n in names]
    for directory in args.extra_dirs:
        if not Path(directory).is_dir():
            raise UIOError(f"--extra-dir {directory} is not a directory")
        chosen.append(
            Source("extra", f"text files under {directory}", lambda d=directory: extra_dir(Path(d), args.extra_license))
        )
    if not chosen:
        raise UIOError("no sources selected: name some with --sources or add --extra-dir")
    return chosen


def _flat(text: str) -> str:
    """The text with its whitespace normalized: the form in which duplicates and evaluation texts are found,
    so that re-wrapped copies of a text match."""
    return " ".join(text.split())


def collect(sources: list[Source], min_chars: int, progress: bool) -> tuple[list[Document], list[dict]]:
    """Every usable document, in a fixed order; and the sources that are not installed."""
    from tqdm import tqdm

    documents, missing, seen = [], [], set()
    for source in sources:
        try:
            for doc in tqdm(
                source.read(), desc=f"reading {source.name}", unit="doc", disable=not progress, leave=False
            ):
                digest = hashlib.sha1(_flat(doc.text).encode()).digest()
                if len(doc.text) >= min_chars and digest not in seen and looks_english(doc.text):
                    seen.add(digest)
                    documents.append(doc)
        except SourceMissing as err:
            missing.append({"source": source.name, "description": source.description, "install": str(err)})
    return documents, missing


def _probes(text: str, count: int = 4, width: int = 200) -> list[str]:
    """Passages of a text (_flat), spread over its body (past the notice at its top)."""
    flat = _flat(text)
    start = min(2000, len(flat) // 4)
    step = max(1, (len(flat) - start - width) // count)
    return [flat[start + i * step : start + i * step + width] for i in range(count)]


def pin_evaluation_texts(documents: list[Document]) -> tuple[list[Document], list[Document]]:
    """(pinned, rest): the documents holding a passage of a held-out text the package ships (the texts
    `eval ppl` reads by default), which must go to held-out whatever the split draws. The split depends
    on the machine's packages, and on another machine it once drew the libpng manual for train."""
    from uio_gguf.text import packaged

    probes = [p for name in packaged.HELDOUT.values() for p in _probes(packaged.read(name))]
    pinned, rest = [], []
    for doc in documents:
        flat = _flat(doc.text)
        (pinned if any(p in flat for p in probes) else rest).append(doc)
    return pinned, rest


def split_by_document(documents: list[Document], share: float, rng: random.Random) -> tuple[list, list]:
    """Held-out gets round(share · n) documents of each source (at least one of a source with two or
    more), spread evenly over the source's documents ranked by length, so that held-out has long
    documents too (perplexity at 32K tokens needs some)."""
    train, heldout = [], []
    for name in dict.fromkeys(d.source for d in documents):
        group = sorted((d for d in documents if d.source == name), key=lambda d: (len(d.text), d.origin))
        n_held = max(1, round(share * len(group))) if share > 0 and len(group) >= 2 else 0
        offset = rng.random()
        held = {int((offset + i) * len(group) / n_held) for i in range(n_held)}
        heldout += [d for i, d in enumerate(group) if i in held]
        train += [d for i, d in enumerate(group) if i not in held]
    return train, heldout


def repeated_prose(train: list[Document], sources: list[Source], args: DataArgs, rng: random.Random) -> list[Document]:
    """Copies of train's prose documents until prose makes up `prose_share` of the train characters,
    the synthetic tasks added afterwards included. Whole documents, so prose passes the share by less than
    one document (and the synthetic tasks, which pass theirs by less than one task, pull it back a little);
    prose is only ever repeated, never dropped."""
    if args.prose_share is None:
        return []
    names = {s.name for s in sources if s.prose}
    prose = [d for d in train if d.source in names]
    if not prose:
        raise UIOError("--prose-share needs a prose source in train (jane-austen, devils-dictionary)")
    have = _share(train, names)
    want = args.prose_share / (1 - args.synthetic_share)  # of the real text: synthetic tasks come on top
    if have > want:
        raise UIOError(
            f"--prose-share {args.prose_share} is below the prose sources' own share "
            f"({have * (1 - args.synthetic_share):.2%}): prose is repeated, never dropped"
        )
    real = sum(len(d.text) for d in train)
    missing = (want - have) * real / (1 - want)  # characters x with (have · real + x) / (real + x) = want
    copies, added = [], 0
    while added < missing:
        for doc in rng.sample(prose, len(prose)):  # each round repeats every prose document once
            if added >= missing:
                break
            copies.append(doc)
            added += len(doc.text)
    return copies


def synthetic_documents(train: list[Document], args: DataArgs, rng: random.Random) -> list[Document]:
    """Synthetic tasks until they make up `synthetic_share` of the train characters."""
    if args.synthetic_share <= 0 or not train:
        return []
    real = sum(len(d.text) for d in train)
    target = args.synthetic_share / (1 - args.synthetic_share) * real
    texts = [d.text for d in train]
    made, size = [], 0
    while size < target:
        task = rng.choice(sorted(synthetic.TASKS))
        length = rng.randint(args.synthetic_max_chars // 4, args.synthetic_max_chars)
        filler, used = synthetic.filler(texts, length, rng)
        text = synthetic.TASKS[task](filler, rng)
        licenses = sorted({train[i].license for i in used})
        made.append(Document(text, f"synthetic-{task}", "; ".join(licenses), f"synthetic:{task}:{len(made)}"))
        size += len(text)
    return made


def _write_jsonl(path: Path, documents: list[Document]) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for d in documents:
            f.write(json.dumps({"text": d.text, "source": d.source, "license": d.license}, ensure_ascii=False) + "\n")


def summary(
    train: list[Document],
    heldout: list[Document],
    out_of_domain: list[Document],
    sources: list[Source],
    missing: list[dict],
    args: DataArgs,
) -> dict:
    descriptions = {s.name: s.description for s in sources}
    held = heldout + out_of_domain  # the rows count both as held out; the totals keep them apart
    # Rows in the order of the sources asked for (those that gave documents), then the synthetic tasks.
    found = {d.source for d in train + held}
    names = [n for n in dict.fromkeys(s.name for s in sources) if n in found] + sorted(found - set(descriptions))
    rows = []
    for name in names:
        in_train = list(dict.fromkeys(d for d in train if d.source == name))  # each document once, not its copies
        in_heldout = [d for d in held if d.source == name]
        rows.append(
            {
                "source": name,
                "description": descriptions.get(name, "passkey / key-value recall in train text"),
                "docs": len(in_train) + len(in_heldout),
                "train_docs": len(in_train),
                "heldout_docs": len(in_heldout),
                "chars": sum(len(d.text) for d in in_train + in_heldout),
                "licenses": sorted({d.license for d in in_train + in_heldout}),
                "out_of_domain": any(s.out_of_domain for s in sources if s.name == name),
            }
        )
    synthetic = {d.source for d in train if d.source.startswith("synthetic-")}
    return {
        "args": {k: v for k, v in asdict(args).items() if k != "out"},
        "sources": rows,
        "missing": missing,
        "train": {
            "docs": len(train),
            "chars": sum(len(d.text) for d in train),
            "synthetic_share": _share(train, synthetic),
            "prose_share": _share(train, {s.name for s in sources if s.prose}),
            "repeated_docs": len(train) - len(set(train)),  # the copies of prose documents (--prose-share)
        },
        "heldout": _totals(heldout),
        "out_of_domain": _totals(out_of_domain),
    }


def _share(documents: list[Document], names: set[str]) -> float:
    """The share of the documents' characters that come from the sources named."""
    return sum(len(d.text) for d in documents if d.source in names) / max(1, sum(len(d.text) for d in documents))


def _totals(documents: list[Document]) -> dict:
    return {"docs": len(documents), "chars": sum(len(d.text) for d in documents)}


def build(args: DataArgs, progress: bool = True) -> dict:
    out = Path(args.out)
    if not 0 <= args.heldout_share < 1 or not 0 <= args.synthetic_share < 1:
        raise UIOError("--heldout-share and --synthetic-share must be in [0, 1)")
    if args.prose_share is not None and not 0 < args.prose_share < 1 - args.synthetic_share:
        raise UIOError(
            f"--prose-share must be above 0 and below 1 - --synthetic-share ({1 - args.synthetic_share:g}), "
            f"not {args.prose_share}"
        )
    sources = selected_sources(args)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UIOError(f"cannot write to the output directory {out}: {err.strerror}") from None

    rng = random.Random(args.seed)
    documents, missing = collect(sources, args.min_chars, progress)
    if missing and args.require_all:
        raise UIOError("not installed: " + "; ".join(f"{m['source']} ({m['install']})" for m in missing))
    if not documents:
        raise UIOError(
            f"no documents of at least {args.min_chars} English characters were found"
            + "".join(f"; {m['source']}: {m['install']}" for m in missing)
        )
    if args.max_docs is not None and len(documents) > args.max_docs:
        kept = sorted(rng.sample(range(len(documents)), args.max_docs))
        documents = [documents[i] for i in kept]
    outside = {s.name for s in sources if s.out_of_domain}
    out_of_domain = [d for d in documents if d.source in outside]
    pinned, in_domain = pin_evaluation_texts([d for d in documents if d.source not in outside])
    train, heldout = split_by_document(in_domain, args.heldout_share, rng)
    heldout += pinned
    train += repeated_prose(train, sources, args, rng)
    train += synthetic_documents(train, args, rng)
    rng.shuffle(train)

    _write_jsonl(out / "train.jsonl", train)
    _write_jsonl(out / "heldout.jsonl", heldout)
    _write_jsonl(out / "heldout_out_of_domain.jsonl", out_of_domain)
    report = summary(train, heldout, out_of_domain, sources, missing, args)
    (out / "sources.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def format_report(report: dict) -> str:
    lines = [f"{'source':<22} {'docs':>6} {'held-out':>8} {'chars':>12}  licence"]
    for row in report["sources"]:
        licenses = (
            row["licenses"][0] if len(row["licenses"]) == 1 else f"{len(row['licenses'])} licences (see sources.json)"
        )
        lines.append(f"{row['source']:<22} {row['docs']:>6} {row['heldout_docs']:>8} {row['chars']:>12,}  {licenses}")
    t, h, o = report["train"], report["heldout"], report["out_of_domain"]
    lines.append(
        f"train: {t['docs']} documents, {t['chars']:,} characters ({t['synthetic_share']:.1%} synthetic, "
        f"{t['prose_share']:.1%} prose"
        + (f", {t['repeated_docs']} copies of prose documents" if t["repeated_docs"] else "")
        + f"); held-out: {h['docs']} documents, {h['chars']:,} characters; "
        f"out of domain (held out whole): {o['docs']} documents, {o['chars']:,} characters"
    )
    for m in report["missing"]:
        lines.append(f"not installed: {m['source']} ({m['description']}): {m['install']}")
    return "\n".join(lines)
