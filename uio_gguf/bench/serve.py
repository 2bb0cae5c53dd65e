"""Load benchmark of `uio-gguf serve` (docs/benchmarks.md): N concurrent clients × M questions about 2 books.

    python -m uio_gguf.bench.serve [-m BUNDLE] [--clients 4] [--questions 3] [--parallel 2] [--book-chars 8000]

Starts the server in this process on 127.0.0.1 with a memory-file cache of its own (so the first
request about each book compresses it), then each client thread streams its questions through the
`openai` client, alternating between two books cut from the bundled demo text. Prints the p50/p95 time
to the first token, tokens/s per answer and in all, how many requests compressed a book against how
many read its memory file, and the errors (there should be none). Needs the serve and test extras.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import threading
import time

from uio_gguf.text.packaged import DEMO_BOOK, DEMO_QUESTION, read

QUESTIONS = [
    DEMO_QUESTION,
    "Who keeps the archive?",
    "What is this text about?",
    "Where does the story take place?",
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--model", default=None, help="bundle directory (default: the embedded one)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--questions", type=int, default=3, help="questions per client")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--book-chars", type=int, default=8000, help="characters per book")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--n-ctx", type=int, default=None)
    args = parser.parse_args(argv)

    import httpx
    import openai
    import uvicorn

    cache = tempfile.mkdtemp(prefix="uio-bench-serve-")
    os.environ["UIO_GGUF_CACHE"] = cache  # the bundle is assembled here too: a cold start, as a new user's
    from uio_gguf.serve.app import create_app
    from uio_gguf.serve.engine import UIOLlama

    text = read(DEMO_BOOK)
    books = [text[: args.book_chars], text[args.book_chars : 2 * args.book_chars]]
    llm = UIOLlama(args.model, n_ctx=args.n_ctx, keep=args.parallel * 2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = args.clients * args.questions  # nothing may be refused: every request can wait
    app = create_app(llm, "bench", parallel=args.parallel, queue=queue)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    while not server.started:
        time.sleep(0.05)

    ttft, rates, tokens, errors = [], [], [], []
    lock = threading.Lock()

    def client(i: int) -> None:
        api = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=3600)
        for j in range(args.questions):
            book = books[(i + j) % 2]
            question = QUESTIONS[(i + j) % len(QUESTIONS)]
            started = time.perf_counter()
            first, pieces = None, 0
            try:
                stream = api.chat.completions.create(
                    model="bench",
                    messages=[{"role": "user", "content": f"{book}\n\n{question}"}],
                    temperature=0,
                    max_tokens=args.max_tokens,
                    stream=True,
                )
                for chunk in stream:
                    if chunk.choices[0].delta.content:
                        first = first or time.perf_counter()
                        pieces += 1
                ended = time.perf_counter()
                with lock:
                    if first is not None:
                        ttft.append(first - started)
                        if pieces > 1:
                            rates.append((pieces - 1) / max(ended - first, 1e-9))
                    tokens.append(pieces)
            except Exception as err:  # counted and shown: a benchmark reports, it does not stop
                with lock:
                    errors.append(f"client {i} question {j}: {err}")

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    counters = httpx.get(f"{base}/health").json()["counters"]
    book_tokens = [len(llm.runtime.model.tokenize(b)) for b in books]
    server.should_exit = True
    llm.close()

    report = {
        "clients": args.clients,
        "questions_per_client": args.questions,
        "parallel": args.parallel,
        "book_tokens": book_tokens,
        "requests": args.clients * args.questions,
        "answered": len(tokens),
        "errors": errors,
        "ttft_p50_s": percentile(ttft, 0.5),
        "ttft_p95_s": percentile(ttft, 0.95),
        "tokens_per_s_per_answer_median": statistics.median(rates) if rates else float("nan"),
        "tokens_per_s_total": sum(tokens) / wall,
        "wall_s": wall,
        "compressed": counters["compressed"],
        "from_file": counters["from_file"],
    }
    print(
        f"{report['requests']} requests ({args.clients} clients × {args.questions}, books of {book_tokens} tokens, "
        f"--parallel {args.parallel}): {report['answered']} answered, {len(errors)} errors\n"
        f"time to first token p50 {report['ttft_p50_s']:.2f} s, p95 {report['ttft_p95_s']:.2f} s; "
        f"{report['tokens_per_s_per_answer_median']:.1f} tokens/s per answer (median), "
        f"{report['tokens_per_s_total']:.1f} tokens/s in all over {wall:.1f} s\n"
        f"books compressed {report['compressed']} times, read from their memory file {report['from_file']} times"
    )
    for line in errors:
        print("error:", line)
    return report


if __name__ == "__main__":
    main()
