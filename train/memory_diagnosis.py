"""`python -m uio_gguf.train.memory_diagnosis`: why memory + a raw window is not better than the raw
window alone, measured in PyTorch (the llama.cpp runtime computes the same function: the parity tests).

The text's first N tokens are cut into segments and every segment is compressed once. Each of the last
--segments segments t is then scored (its next-token loss) under a cache layout:
  [sinks][memory of the segments before the raw window][raw window: the R - l tokens before t, then t]
which is what `Session.feed` with raw window R shows the last token of a window that has just filled.
The experiments change one thing each: sink tokens (the text's first tokens kept raw at positions
0.., as llama.cpp's --keep), the memory's positions (each slot at its own place in the text, or a gap
before the raw window), a scale on the memory's K or V (uniform, or per layer or per KV head: the one
that gives the memory's K rows the raw window's mean norm). `sliding-same` is a plain window with as many
cells, its first 4 tokens kept (eval ppl's sliding-same). Then, per layer, the attention the last
segment's queries put on the sinks, on the memory by its age (segments back) and on the raw window,
and the mean norms of memory K and V against the raw window's.

    python -m uio_gguf.train.memory_diagnosis --head uio_gguf/bundles/smollm2-135m-l128-r8 --raw-window 1024
"""

from __future__ import annotations

import argparse
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from uio_gguf.train.model import TRANSFER, memory_prefix_mask

AGE_BUCKETS = ((1, 4), (5, 16), (17, 10**9))  # memory age in segments back from the scored one


@dataclass(frozen=True)
class Layout:
    """One cache layout in front of the scored segment (the defaults: the runtime's)."""

    memory: bool = True
    sinks: int = 0  # the text's first tokens kept raw at positions 0.. (none when the raw window reaches them)
    positions: str = "contiguous"  # memory slots at consecutive positions, or "spaced": at their place in the text
    gap: int = 0  # extra positions between the memory and the raw window
    k_scale: float | tuple = 1.0  # a float, or per layer: a float or a tuple with one per KV head
    v_scale: float = 1.0
    memory_segments: int = 0  # the memory of at most this many segments (0: all): the latest ones, after the sink
    memory_sink: int = 0  # with memory_segments: the text's first segments whose memory always stays


EXPERIMENTS = {
    "raw-R": Layout(memory=False),
    "raw-R + sinks": Layout(memory=False, sinks=4),
    "memory + R (runtime)": Layout(),
    "sinks + memory + R": Layout(sinks=4),
    "memory at its text positions": Layout(positions="spaced"),
    "memory, 512-position gap": Layout(gap=512),
    "memory K x0.5": Layout(k_scale=0.5),
    "memory K x0.9": Layout(k_scale=0.9),
    "memory K x1.1": Layout(k_scale=1.1),
    "memory V x0.5": Layout(v_scale=0.5),
    "memory V x0": Layout(v_scale=0.0),
}


@torch.no_grad()
def compress(model, ids: list[int], batch: int = 8) -> torch.Tensor:
    """h_mem of every full segment: (T, n_layers, k, d)."""
    l = model.config.segment
    T = len(ids) // l
    segments = torch.tensor(ids[: T * l]).view(T, l)
    return torch.cat([model.encode(segments[i : i + batch]) for i in range(0, T, batch)], 0)


def _memory_kv(model, h: torch.Tensor, first: int, layout: Layout) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """model.memory_kv, with the slots at their text positions when layout.positions == "spaced"."""
    if layout.positions == "contiguous":
        return model.memory_kv(h, first_position=first)
    cfg, n = model.config, h.shape[2]
    positions = (
        torch.arange(n // cfg.slots)[:, None] * cfg.segment + (torch.arange(cfg.slots) + 1) * cfg.ratio
    ).flatten()
    cos, sin = model.base.model.rotary_emb(h, positions[None])
    out = []
    for index, layer in enumerate(model.layers):
        attn, x = layer.self_attn, h[:, index]
        k = (attn.k_proj.base_layer(x) + attn.k_proj.delta(x, TRANSFER)).view(1, n, -1, attn.head_dim).transpose(1, 2)
        v = (attn.v_proj.base_layer(x) + attn.v_proj.delta(x, TRANSFER)).view(1, n, -1, attn.head_dim).transpose(1, 2)
        out.append((model._apply_rope(k, k, cos, sin)[1], v))
    return out


def _layer_scale(scale: float | tuple, index: int) -> float | torch.Tensor:
    """Layer `index`'s factor for a (1, heads, cells, head_dim) K: a float, or one per KV head."""
    if isinstance(scale, (int, float)):
        return scale
    per_layer = scale[index]
    return per_layer if isinstance(per_layer, (int, float)) else torch.tensor(per_layer).view(1, -1, 1, 1)


@torch.no_grad()
def score_segment(
    model, ids: list[int], memory: torch.Tensor, t: int, raw_window: int, layout: Layout, attentions=False
):
    """(summed NLL of segment t's targets, its outputs) under the layout; t counts segments from 0."""
    l, k = model.config.segment, model.config.slots
    first_raw = max(0, t - raw_window // l + 1)  # segments first_raw..t are raw
    raw = torch.tensor([ids[first_raw * l : (t + 1) * l + 1]])
    inputs, targets = raw[:, :-1], raw[0, -l:]
    sinks = ids[: layout.sinks] if first_raw * l >= layout.sinks else []
    held = list(range(first_raw)) if layout.memory else []
    if layout.memory_segments and len(held) > layout.memory_segments:  # Session.limit_memory
        held = held[: layout.memory_sink] + held[layout.memory_sink - layout.memory_segments :]
    n_mem = len(held) * k
    kv = []
    if n_mem:
        h = memory[held].permute(1, 0, 2, 3).reshape(1, model.n_layers, n_mem, -1)
        kv = [
            (key * _layer_scale(layout.k_scale, index), value * layout.v_scale)
            for index, (key, value) in enumerate(_memory_kv(model, h, len(sinks), layout))
        ]
    cache = model.prefix_cache(torch.tensor([sinks]) if sinks else None, kv)  # training's decoder prefix
    prefix = len(sinks) + n_mem
    start = first_raw * l if layout.positions == "spaced" else prefix + layout.gap
    out = model.base(
        input_ids=inputs,
        attention_mask=memory_prefix_mask(prefix, inputs.shape[1], torch.float32),
        position_ids=torch.arange(start, start + inputs.shape[1])[None],
        cache=cache,
        output_attentions=attentions,
        logits_to_keep=l,
    )
    nll = torch.nn.functional.cross_entropy(out.logits[0].float(), targets, reduction="sum").item()
    return nll, out, (len(sinks), n_mem, first_raw), cache


@torch.no_grad()
def sliding_segment(model, ids: list[int], t: int, cells: int, keep: int = 4) -> float:
    """Summed NLL of segment t in a plain window of `cells` cells: the first `keep` tokens, then the
    tokens before t that fit (the fewest its first token sees in llama.cpp's shifted window)."""
    l = model.config.segment
    start = max(keep, t * l - (cells - keep - l))
    context = ids[:keep] + ids[start : (t + 1) * l + 1] if start > keep else ids[: (t + 1) * l + 1]
    inputs, targets = torch.tensor([context[:-1]]), torch.tensor(context[-l:])
    out = model.base(input_ids=inputs, position_ids=torch.arange(inputs.shape[1])[None], logits_to_keep=l)
    return torch.nn.functional.cross_entropy(out.logits[0].float(), targets, reduction="sum").item()


@torch.no_grad()
def norm_matched_k_scales(model, ids, memory, t: int, raw_window: int) -> tuple[tuple, tuple]:
    """The K scales, (per layer, per layer and KV head), that give the memory's K rows the mean norm of
    the raw window's in front of segment t under the runtime's layout (RoPE keeps norms); one forward."""
    _, _, (n_sink, n_mem, _), cache = score_segment(model, ids, memory, t, raw_window, Layout())
    per_layer, per_head = [], []
    for layer in cache.layers:
        norms = layer.keys[0].norm(dim=-1)  # (heads, cells)
        memory_rows, raw_rows = norms[:, n_sink : n_sink + n_mem], norms[:, n_sink + n_mem :]
        per_layer.append(raw_rows.mean().item() / memory_rows.mean().item())
        per_head.append(tuple((raw_rows.mean(1) / memory_rows.mean(1)).tolist()))
    return tuple(per_layer), tuple(per_head)


def attention_by_layer(model, ids, memory, t: int, raw_window: int, layout: Layout) -> list[dict]:
    """Per layer: the attention of segment t's queries (mean over heads and queries) on the sinks, on
    the memory (and by age), on the raw window and its first token; the mean norms of K and V rows."""
    l, k = model.config.segment, model.config.slots
    implementation = model.base.config._attn_implementation
    model.base.config._attn_implementation = "eager"  # sdpa does not return the weights
    try:
        _, out, (n_sink, n_mem, first_raw), cache = score_segment(model, ids, memory, t, raw_window, layout, True)
    finally:
        model.base.config._attn_implementation = implementation
    rows = []
    for index, weights in enumerate(out.attentions):
        w = weights[0, :, -l:, :].float().mean(dim=(0, 1))  # over heads and queries: (cells,)
        on_memory = w[n_sink : n_sink + n_mem]
        ages = [
            sum(on_memory[s * k : (s + 1) * k].sum().item() for s in range(first_raw) if lo <= t - s <= hi)
            for lo, hi in AGE_BUCKETS
        ]
        keys, values = (
            cache.layers[index].keys[0].norm(dim=-1).mean(0),
            cache.layers[index].values[0].norm(dim=-1).mean(0),
        )
        memory_rows, raw_rows = slice(n_sink, n_sink + n_mem), slice(n_sink + n_mem, None)
        rows.append(
            {
                "sinks": w[:n_sink].sum().item(),
                "memory": on_memory.sum().item(),
                "memory_by_age": ages,
                "raw_first": w[n_sink + n_mem].item(),
                "raw": w[n_sink + n_mem :].sum().item(),
                "k_memory": keys[memory_rows].mean().item() if n_mem else math.nan,
                "k_raw": keys[raw_rows].mean().item(),
                "v_memory": values[memory_rows].mean().item() if n_mem else math.nan,
                "v_raw": values[raw_rows].mean().item(),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    from importlib import resources

    from uio_gguf.train.recall_check import load_head

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--head", required=True, type=Path, help="checkpoint or bundle")
    parser.add_argument("--base", default=None, help="the base model (default: the embedded SmolLM2 GGUF)")
    parser.add_argument("--tokens", type=int, default=8192, help="the text's first N tokens")
    parser.add_argument("--segments", type=int, default=4, help="score the last N segments")
    parser.add_argument("--raw-window", type=int, default=1024, help="R in tokens (a multiple of the segment)")
    parser.add_argument(
        "--text",
        nargs="+",
        default=["heldout_libpng_manual.txt", "heldout_kjv_genesis_exodus.txt"],
        help="texts to read: files, or the names of the held-out texts in uio_gguf/data (in and out of domain)",
    )
    args = parser.parse_args(argv)
    if args.base is None:
        from uio_gguf.format.embedded import default_model_path

        args.base = str(default_model_path())
    with tempfile.TemporaryDirectory() as workdir:
        model, tokenizer = load_head(args.head, args.base, Path(workdir))
        l, k = model.config.segment, model.config.slots
        for name in args.text:
            path = Path(name) if Path(name).is_file() else resources.files("uio_gguf").joinpath("data", name)
            text = path.read_text(encoding="utf-8")
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][: args.tokens + 1]
            memory = compress(model, ids)
            T = len(ids) // l
            scored = range(T - args.segments, T)
            cells = (T - args.raw_window // l) * k + args.raw_window
            print(f"{name}: segments {scored[0]}..{scored[-1]} of {T}, R = {args.raw_window}, {cells} cells")
            experiments = dict(EXPERIMENTS)
            scales = norm_matched_k_scales(model, ids, memory, T - 1, args.raw_window)
            for label, scale in zip(("memory K norm-matched per layer", "... per KV head"), scales):
                experiments[label] = Layout(k_scale=scale)
                flat = torch.tensor(scale).flatten()
                print(f"  {label}: K scales {flat.min():.3f}..{flat.max():.3f} (mean {flat.mean():.3f})")
            for label, layout in experiments.items():
                nll = sum(score_segment(model, ids, memory, t, args.raw_window, layout)[0] for t in scored)
                print(f"  {label:<32} {math.exp(nll / (len(scored) * l)):9.3f}", flush=True)
            nll = sum(sliding_segment(model, ids, t, cells) for t in scored)
            print(f"  {'sliding-same (' + str(cells) + ' cells)':<32} {math.exp(nll / (len(scored) * l)):9.3f}")
            for label, layout in (("memory + R", Layout()), ("sinks + memory + R", Layout(sinks=4))):
                print(f"  attention of the last segment's queries, {label} (mean over heads):")
                print("  layer  sinks memory [age 1-4  5-16  17+] raw-first   raw  |K mem| |K raw| |V mem| |V raw|")
                for index, r in enumerate(attention_by_layer(model, ids, memory, T - 1, args.raw_window, layout)):
                    a = r["memory_by_age"]
                    print(
                        f"  {index:>5} {r['sinks']:6.3f} {r['memory']:6.3f} [{a[0]:6.3f} {a[1]:5.3f} {a[2]:5.3f}] "
                        f"{r['raw_first']:9.3f} {r['raw']:5.3f} {r['k_memory']:7.2f} {r['k_raw']:7.2f} "
                        f"{r['v_memory']:7.3f} {r['v_raw']:7.3f}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
