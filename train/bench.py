"""`python -m uio_gguf.train.bench`: peak memory and time per step of the gradient estimators on a tiny random
model, for crops of T = 4, 8, 16 segments (a benchmark, not a test).

Each (estimator, T) runs in a fresh interpreter: torch's CPU allocator keeps no statistics, and a
process's peak resident set size (ru_maxrss) only tells about one configuration if it ran alone.
The step peak is the rise of that high-water mark while the steps run, over what the imports, the
model and the crop had already taken.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time

DEFAULTS = dict(hidden=256, layers=4, segment=128, ratio=8, window=2, steps=3, threads=1, seed=0, windows_per_pass=1)


def _max_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def measure(config: dict) -> dict:
    """One configuration in this process: one warm-up step, then `steps` timed ones."""
    import torch

    from uio_gguf.train.estimators import Crop, estimate_gradient
    from uio_gguf.train.tiny import tiny_uio

    torch.set_num_threads(config["threads"])
    model = tiny_uio(
        segment=config["segment"],
        ratio=config["ratio"],
        seed=config["seed"],
        hidden=config["hidden"],
        layers=config["layers"],
    )
    gen = torch.Generator().manual_seed(config["seed"])
    length = config["segments"] * config["segment"] + 1
    crop = Crop(torch.randint(0, model.base.config.vocab_size, (1, length), generator=gen), config["segment"])
    rng = random.Random(config["seed"])

    def step() -> float:
        started = time.perf_counter()
        for p in model.trainable_parameters():
            p.grad = None
        estimate_gradient(
            model, crop, config["estimator"], config["window"], rng, windows_per_pass=config["windows_per_pass"]
        )
        return time.perf_counter() - started

    before = _max_rss_mb()
    step()  # warm-up: first-call allocations and thread start-up are not part of the step time
    times = [step() for _ in range(config["steps"])]
    peak = _max_rss_mb()
    return {
        "estimator": config["estimator"],
        "window": config["window"] if config["estimator"] != "full" else None,
        "segments": config["segments"],
        "windows_per_pass": config["windows_per_pass"],
        "step_peak_mb": round(peak - before, 1),
        "peak_rss_mb": round(peak, 1),
        "seconds_per_step": round(sum(times) / len(times), 4),
    }


def run_isolated(config: dict) -> dict:
    """`measure(config)` in a fresh interpreter, so that its peak memory is its own."""
    result = subprocess.run(
        [sys.executable, "-m", "uio_gguf.train.bench", "--worker", json.dumps(config)], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"benchmark worker failed for {config}:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict]) -> str:
    lines = [f"{'estimator':<12} {'S':>3} {'T':>3} {'N':>3} {'step peak MB':>12} {'peak RSS MB':>11} {'s/step':>8}"]
    for row in rows:
        window = "-" if row["window"] is None else row["window"]
        lines.append(
            f"{row['estimator']:<12} {window:>3} {row['segments']:>3} {row['windows_per_pass']:>3} {row['step_peak_mb']:>12.1f} "
            f"{row['peak_rss_mb']:>11.1f} {row['seconds_per_step']:>8.3f}"
        )
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m uio_gguf.train.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--estimators", default="full,unbiased", help="comma separated (full, tbptt, incremental, unbiased)"
    )
    parser.add_argument("--segments", type=_ints, default=[4, 8, 16], help="crop lengths T, comma separated")
    for name, value in DEFAULTS.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=int,
            default=value,
            help="decoder windows per call (1: one segment at a time)" if name == "windows_per_pass" else None,
        )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one configuration, as JSON
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return

    config = {name: getattr(args, name) for name in DEFAULTS}
    rows = []
    for estimator in args.estimators.split(","):
        for segments in args.segments:
            rows.append(run_isolated({**config, "estimator": estimator, "segments": segments}))
            print(f"  {estimator} T={segments}: done", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"config": config, "rows": rows}, indent=1))
    else:
        print(
            "tiny model: hidden {hidden}, {layers} layers, segment {segment}, ratio {ratio}, "
            "{threads} thread(s), mean of {steps} steps after one warm-up; N = decoder windows "
            "per call".format(**config)
        )
        print(format_table(rows))


if __name__ == "__main__":
    main()
