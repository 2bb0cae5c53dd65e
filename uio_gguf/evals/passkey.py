"""`uio-gguf eval passkey`: can the model find a number hidden far back in what it read?

A document of about L tokens of filler holds the pass-key sentence of the training tasks
(uio_gguf.train.synthetic) on a line of its own at depth d (0: its start, 1: its end). The document is read
through the chat path, as `uio-gguf chat` reads a book (memory files off), and the training task's
question is asked (with recall_tokens, after the passages BM25 ranks best for it are brought back
raw, as chat does by default; 0, the default here: the memory alone); a trial is a hit when the greedy answer (16 tokens at most) contains the number.
Beside the hits the report gives the share of the key's digits the answer got right at their place,
which shows a memory that carries the number approximately before it carries it whole.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable

from uio_gguf.errors import UIOError
from uio_gguf.train.synthetic import PASSKEY_QUESTION, filler, insert_at, passkey_fact

# The filler of the original passkey test (Mohtashami & Jaggi, 2023), one sentence group a line.
CLASSIC_FILLER_LINE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
ANSWER_TOKENS = 16


def digits_right(key: int, answer: str) -> int:
    """How many of the key's digits the answer's first number has at the same place ("55661" for 55761: 4)."""
    number = re.search(r"\d+", answer)
    return sum(a == b for a, b in zip(str(key), number.group())) if number else 0


def digit_share(samples: list[dict]) -> float:
    """The share of the samples' key digits that their answers got right at their place."""
    return sum(s["digits_right"] for s in samples) / sum(len(str(s["key"])) for s in samples)


def filler_text(model, n_tokens: int, rng: random.Random, texts: list[str] | None) -> str:
    """Exactly the first n_tokens tokens of the classic filler or, with texts, of a random stretch of them."""
    chars = 8 * n_tokens + 64
    while True:
        text = (
            CLASSIC_FILLER_LINE * (chars // len(CLASSIC_FILLER_LINE) + 1) if not texts else filler(texts, chars, rng)[0]
        )
        tokens = model.tokenize(text, add_special=False, parse_special=False)
        if len(tokens) >= n_tokens:
            return b"".join(model.piece(t) for t in tokens[:n_tokens]).decode("utf-8", "replace")
        chars *= 2


def document(model, length: int, depth: float, key: int, rng: random.Random, texts: list[str] | None) -> str:
    """About `length` tokens: filler with the pass-key sentence at `depth`."""
    fact = passkey_fact(key)
    room = length - len(model.tokenize(f"{fact}\n", add_special=False))
    if room < 1:
        raise UIOError(f"a {length}-token document cannot hold the pass-key sentence")
    return insert_at(filler_text(model, room, rng, texts), fact, depth)


def ask(runtime, book: str, question: str, recall_tokens: int = 0) -> str:
    from uio_gguf.chat.conversation import Conversation
    from uio_gguf.llamacpp.sampling import SamplingParams

    conversation = Conversation(runtime, book, use_memory_files=False, recall_tokens=recall_tokens)
    try:
        return "".join(conversation.ask(question, SamplingParams(max_tokens=ANSWER_TOKENS)))
    finally:
        conversation.session.close()


def check_grid(lengths: list[int], depths: list[float], trials: int) -> None:
    """The lengths, depths and trials of a needle evaluation (pass key, QA) make sense, or one error line."""
    if trials < 1:
        raise UIOError("--trials must be at least 1")
    if not lengths or min(lengths) < 1:
        raise UIOError("every length must be a positive number of tokens")
    if not depths or not all(0.0 <= d <= 1.0 for d in depths):
        raise UIOError("every depth must lie between 0 and 1")


def evaluate(
    runtime,
    lengths: list[int],
    depths: list[float],
    trials: int,
    seed: int = 0,
    texts: list[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    recall_tokens: int = 0,
) -> dict:
    """The report that `uio-gguf eval passkey` prints and writes as JSON."""
    check_grid(lengths, depths, trials)
    results, done, total = [], 0, len(lengths) * len(depths) * trials
    for length in lengths:
        for depth in depths:
            samples, started = [], time.perf_counter()
            for trial in range(trials):
                rng = random.Random(f"{seed}:{length}:{depth}:{trial}")  # each cell reproducible on its own
                key = rng.randint(10_000, 99_999)
                book = document(runtime.model, length, depth, key, rng, texts)
                answer = ask(runtime, book, PASSKEY_QUESTION, recall_tokens)
                samples.append(
                    {
                        "key": key,
                        "tokens": len(runtime.model.tokenize(book, add_special=False)),
                        "answer": answer,
                        "hit": str(key) in answer,
                        "digits_right": digits_right(key, answer),
                    }
                )
                done += 1
                if progress:
                    progress(done, total)
            hits = sum(s["hit"] for s in samples)
            results.append(
                {
                    "length": length,
                    "depth": depth,
                    "accuracy": hits / trials,
                    "hits": hits,
                    "digit_accuracy": round(digit_share(samples), 4),
                    "trials": trials,
                    "seconds": round(time.perf_counter() - started, 3),
                    "samples": samples,
                }
            )
    return {
        "lengths": lengths,
        "depths": depths,
        "trials": trials,
        "seed": seed,
        "ratio": runtime.bundle.ratio,
        "segment": runtime.segment,
        "filler": "texts" if texts else "classic",
        "recall_tokens": recall_tokens,
        "results": results,
    }


def format_report(report: dict) -> str:
    cell = {(r["length"], r["depth"]): r for r in report["results"]}
    head = (
        f"{'tokens':>8}"
        + "".join(f"{'depth ' + format(d, 'g'):>12}" for d in report["depths"])
        + f"{'all':>8}{'digits':>8}"
    )
    lines = [
        f"pass-key retrieval, ratio {report['ratio']}, recall {report.get('recall_tokens', 0)} tokens, "
        f"{report['trials']} trials a cell (hits / trials; "
        "digits: share of the key's digits right at their place)",
        head,
    ]
    for n in report["lengths"]:
        row = [cell[(n, d)] for d in report["depths"]]
        accuracy = sum(r["hits"] for r in row) / sum(r["trials"] for r in row)
        digits = digit_share([s for r in row for s in r["samples"]])
        lines.append(f"{n:>8,}" + "".join(f"{r['accuracy']:>12.0%}" for r in row) + f"{accuracy:>8.0%}{digits:>8.0%}")
    return "\n".join(lines)
