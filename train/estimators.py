"""The gradient estimators of docs/design.md §2.

A crop of T segments gives the objective J = 1/(T-1) · Σ_{t=2..T} J_t (J_1 sees no memory, so it has no
gradient), where J_t is the loss of window t given the memories m_1..m_{t-1}, and m_s = encoder(x_s)
depends on segment s alone. The transfer head lies inside J_t (exact "direct" terms in every estimator);
the estimators differ in which ∂J_t/∂m_s reach the encoder:

  full         all of them (plain BPTT; every encoder graph alive at once)
  tbptt S      only s in [t-S, t-1]
  incremental  the same gradient as tbptt, in O(T): the decoder sees detached leaf copies of the memories,
               each J_t is back-propagated once, and a segment's encoder graph is back-propagated (with
               the gradient its leaf gathered) when it leaves the window; at most S graphs alive
  unbiased     a reservoir of S encoder graphs (Vitter's algorithm R); at step t each retained m_s is
               in the reservoir with probability min(1, S/(t-1)), so its ∂J_t/∂m_s is multiplied by
               max(1, (t-1)/S), which makes the expectation the `full` gradient

Every estimator is a table: which m_s reach the encoder from J_t, with what factor. With windows_per_pass
N > 1 the table is drawn first (the same rng draws) and the crop runs in a few large calls instead of
one small call per segment: the encoder once over every segment, the decoder over N windows at a time
(each row reads its own memory, padded to the longest), the encoder backward once at the end. The
gradient is the same; the price is memory: every encoder graph the table uses stays alive until the end,
and N·B windows' decoder activations at once, their logits (l × vocabulary, float32) and a copy of the
memory for each (up to T·k rows): lower N as the batch grows. For GPUs, where the per-segment path is
launch-bound.

With loss_windows n < T-1, J is estimated from n windows drawn at random (without replacement) from
2..T: 1/n · Σ_{t drawn} J_t, whose expectation is J. Segments after the last drawn window are not
encoded and the other windows are not decoded, so a long crop costs its encoder passes and n decoder
windows: the way to train on memories of hundreds of segments where the decoder is the expensive part.

The decoder's view (View) can be the runtime's with a long raw window: window t reads
[the crop's first N tokens raw at 0..N-1 (sinks) ; m_1..m_{t-j-1} ; segments t-j..t raw], j + 1 drawn
for each scored window from the allowed raw-window lengths; J_t scores segment t alone. J_t then reads
no m_s with s > t-j-1 (those segments are raw), so every table keeps only s <= t-j-1; the factor of
each (t, s) is unchanged, so unbiased stays unbiased.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from uio_gguf.train.model import IGNORE, UIOModel

ESTIMATORS = ("full", "tbptt", "incremental", "unbiased")


@dataclass
class Crop:
    """T windows of one batch of token streams (B, T·l + 1): window t and its next-token targets.
    With labels (the same shape; IGNORE where nothing is scored, e.g. train.chat_recall's crops) the
    targets are the labels, and J_t is the mean loss over the scored tokens of window t."""

    tokens: torch.Tensor
    segment: int
    labels: torch.Tensor | None = None

    @property
    def n_segments(self) -> int:
        return (self.tokens.shape[1] - 1) // self.segment

    def window(self, t: int) -> torch.Tensor:  # t = 1..T
        return self.tokens[:, (t - 1) * self.segment : t * self.segment]

    def raw(self, t: int, j: int = 0) -> torch.Tensor:
        """Segments t-j..t, the raw window of window t: (B, (j+1)·l)."""
        return self.tokens[:, (t - j - 1) * self.segment : t * self.segment]

    def raw_targets(self, t: int, j: int = 0) -> torch.Tensor:
        """The targets of raw(t, j): segment t's; the earlier raw segments are context (IGNORE)."""
        targets = self.targets(t)
        if j == 0:
            return targets
        context = targets.new_full((targets.shape[0], j * self.segment), IGNORE)
        return torch.cat([context, targets], dim=1)

    def sinks(self, keep: int) -> torch.Tensor | None:
        """The crop's first `keep` tokens, kept raw in front of the memory: (B, keep), or None."""
        return self.tokens[:, :keep] if keep else None

    def targets(self, t: int) -> torch.Tensor:
        source = self.tokens if self.labels is None else self.labels
        return source[:, (t - 1) * self.segment + 1 : t * self.segment + 1]

    def scored_windows(self) -> list[int]:
        """The windows 2..T with a scored target (all of them without labels)."""
        return [t for t in range(2, self.n_segments + 1) if self.labels is None or (self.targets(t) != IGNORE).any()]


@dataclass(frozen=True)
class View:
    """What the decoder reads in front of window t's segment (the runtime's layout, Session(keep=N,
    raw_window=R)): the crop's first `keep` tokens raw at positions 0.. (attention sinks), the memory of
    the segments before the raw window, and a raw window of j + 1 segments, j + 1 drawn from
    `raw_segments`. The default, View(0, (1,)), is the training view [m_1..m_{t-1} ; segment t]."""

    keep: int = 0
    raw_segments: tuple[int, ...] = (1,)

    def draw(self, windows: list[int], rng: random.Random) -> dict[int, int]:
        """{t: j} for the scored windows: j + 1 uniform over raw_segments, clipped to t - 2 so that every
        window reads m_1 at least (a window without memory has no gradient, as J_1). No draw from rng
        when there is one choice, so such runs stay as they were."""
        choices = sorted(set(self.raw_segments))
        return {t: min((choices[0] if len(choices) == 1 else rng.choice(choices)) - 1, t - 2) for t in windows}


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by a constant on the way back."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def estimate_gradient(
    model: UIOModel,
    crop: Crop,
    estimator: str,
    window: int = 2,
    rng: random.Random | None = None,
    factor: bool = True,
    windows_per_pass: int = 1,
    loss_windows: int | None = None,
    view: View = View(),
) -> float:
    """Accumulates the estimator's gradient of J into .grad of the trainable parameters; returns J (its
    estimate from `loss_windows` random windows when that is set and below T-1). `view`: the decoder's
    layout (sinks, raw windows of several segments); the raw windows are drawn before the reservoir."""
    if crop.n_segments < 2:
        raise ValueError("a crop needs at least 2 segments (memory is built from earlier segments)")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator '{estimator}' (choose from {', '.join(ESTIMATORS)})")
    # Which memories reach the encoder from each window: full and tbptt keep a sliding window (the whole
    # crop or S segments), incremental the same as tbptt, unbiased a reservoir.
    rng = rng or random.Random()
    # Labelled crops score their labelled windows (all of them: they are few); others 2..T or a draw.
    windows = draw_windows(crop.n_segments, loss_windows, rng) if crop.labels is None else crop.scored_windows()
    if not windows:
        raise ValueError("the crop's labels score nothing in windows 2..T")
    raw = view.draw(windows, rng)  # {t: j}: window t reads segments t-j..t raw
    sinks = crop.sinks(view.keep)
    size = crop.n_segments if estimator == "full" else window
    policy = _Reservoir(window, rng, factor) if estimator == "unbiased" else _SlidingWindow(size)
    if windows_per_pass > 1:
        return _batched(model, crop, _table(policy, windows[-1], raw), windows_per_pass, raw, sinks)
    if estimator in ("full", "tbptt"):
        return _reference(model, crop, size, raw, sinks)  # the plain-BPTT reference
    return _streamed(model, crop, policy, raw, sinks)


def draw_windows(T: int, loss_windows: int | None, rng: random.Random) -> list[int]:
    """The windows whose loss estimates J, in order: all of 2..T, or `loss_windows` of them at random
    (no draw from rng when all are used, so such runs stay as they were)."""
    every = list(range(2, T + 1))
    if loss_windows is None or loss_windows >= len(every):
        return every
    if loss_windows < 1:
        raise ValueError("loss_windows must be at least 1")
    return sorted(rng.sample(every, loss_windows))


def _reference(model: UIOModel, crop: Crop, window: int, raw: dict[int, int], sinks) -> float:
    """BPTT in one backward pass; memories older than `window` enter J_t detached. raw: {t: j}, the
    scored windows and their raw windows; window t reads m_1..m_{t-j-1}."""
    memories = [model.encode(crop.window(s)) for s in range(1, max(t - j for t, j in raw.items()))]
    total = 0.0
    for t, j in raw.items():
        used = [m if s >= t - window else m.detach() for s, m in enumerate(memories[: t - j - 1], start=1)]
        total = total + model.window_loss(crop.raw(t, j), crop.raw_targets(t, j), torch.cat(used, dim=2), sinks)
    loss = total / len(raw)
    loss.backward()
    return loss.item()


class _SlidingWindow:
    """Keeps the last S segments: admits every new one, evicts the one that left the window."""

    def __init__(self, size: int):
        self.size = size
        self.retained: list[int] = []

    def admit(self, s: int) -> tuple[bool, list[int]]:
        evicted = [r for r in self.retained if r <= s - self.size]
        self.retained = [r for r in self.retained if r > s - self.size] + [s]
        return True, evicted

    def factor(self, t: int) -> float:
        return 1.0


class _Reservoir:
    """Vitter's algorithm R over the segments: after n segments each is retained with prob. min(1, S/n)."""

    def __init__(self, size: int, rng: random.Random, use_factor: bool):
        self.size, self.rng, self.use_factor = size, rng, use_factor
        self.retained: list[int] = []

    def admit(self, s: int) -> tuple[bool, list[int]]:
        if len(self.retained) < self.size:
            self.retained.append(s)
            return True, []
        j = self.rng.randrange(s)  # uniform over the s segments seen so far
        if j >= self.size:
            return False, []
        evicted, self.retained[j] = self.retained[j], s
        return True, [evicted]

    def factor(self, t: int) -> float:
        return max(1.0, (t - 1) / self.size) if self.use_factor else 1.0


def _streamed(model: UIOModel, crop: Crop, policy, raw: dict[int, int], sinks) -> float:
    graphs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # s -> (m_s with its encoder graph, leaf copy)
    values: list[torch.Tensor] = []  # m_s without graph, for every s

    def flush(s: int) -> None:
        """Back-propagate the gradient that m_s's leaf gathered through its encoder graph, then free it."""
        memory, leaf = graphs.pop(s)
        if leaf.grad is not None:
            memory.backward(leaf.grad)

    total = 0.0
    for t in range(2, max(raw) + 1):
        s = t - 1  # the segment that just completed
        keep, evicted = policy.admit(s)
        for e in evicted:
            flush(e)
        if keep:
            memory = model.encode(crop.window(s))
            graphs[s] = (memory, memory.detach().requires_grad_(True))
            values.append(memory.detach())
        else:
            with torch.no_grad():
                values.append(model.encode(crop.window(s)))
        if t not in raw:  # the reservoir still stepped: later windows see the same draws
            continue
        c, j = policy.factor(t), raw[t]
        used = [_ScaleGrad.apply(graphs[r][1], c) if r in graphs else values[r - 1] for r in range(1, t - j)]
        loss = model.window_loss(crop.raw(t, j), crop.raw_targets(t, j), torch.cat(used, dim=2), sinks) / len(raw)
        loss.backward()
        total += loss.item()
    for s in list(graphs):
        flush(s)
    return total


def _table(policy, T: int, raw: dict[int, int]) -> dict[int, dict[int, float]]:
    """For each window t = 2..T: {s: factor} of the memories whose encoder graph J_t reaches (the policy
    stepped exactly as _streamed steps it, so the rng draws are the same): the retained s that J_t reads,
    s <= t - j - 1 with j = raw[t] (0 for windows not scored)."""
    table, retained = {}, set()
    for t in range(2, T + 1):
        keep, evicted = policy.admit(t - 1)
        retained.difference_update(evicted)
        if keep:
            retained.add(t - 1)
        table[t] = {s: policy.factor(t) for s in retained if s < t - raw.get(t, 0)}
    return table


def _batched(model: UIOModel, crop: Crop, table: dict[int, dict[int, float]], per_pass: int, raw, sinks) -> float:
    batch, l, k = crop.tokens.shape[0], crop.segment, model.config.slots
    windows = sorted(raw)
    n_memory = {t: t - j - 1 for t, j in raw.items()}  # segments of memory window t reads

    def encode(segments: list[int]) -> dict[int, torch.Tensor]:
        if not segments:
            return {}
        memory = model.encode(torch.cat([crop.window(s) for s in segments]))
        return dict(zip(segments, memory.split(batch)))

    graphed = sorted(set().union(*(table[t] for t in windows)))
    graphs = encode(graphed)
    with torch.no_grad():
        values = encode([s for s in range(1, max(n_memory.values()) + 1) if s not in graphs])
    leaves = {s: m.detach().requires_grad_(True) for s, m in graphs.items()}
    values.update({s: leaf.detach() for s, leaf in leaves.items()})

    total = 0.0
    for first in range(0, len(windows), per_pass):
        chunk = windows[first : first + per_pass]
        longest = max(n_memory[t] for t in chunk)
        widest = max(raw[t] for t in chunk) + 1  # raw segments of the chunk's widest raw window
        rows, tokens, targets = [], [], []
        for t in chunk:
            used = [
                _ScaleGrad.apply(leaves[s], table[t][s]) if s in table[t] else values[s]
                for s in range(1, n_memory[t] + 1)
            ]
            padding = values[1].new_zeros(batch, values[1].shape[1], (longest - n_memory[t]) * k, values[1].shape[3])
            rows.append(torch.cat(used + [padding], dim=2))
            # a shorter raw window is padded at its end: causal, so no real token sees it, and it scores nothing
            extra = (widest - raw[t] - 1) * l
            tokens.append(torch.nn.functional.pad(crop.raw(t, raw[t]), (0, extra)))
            targets.append(torch.nn.functional.pad(crop.raw_targets(t, raw[t]), (0, extra), value=IGNORE))
        logits = model.decode(
            torch.cat(tokens),
            torch.cat(rows),
            [n_memory[t] * k for t in chunk for _ in range(batch)],
            None if sinks is None else sinks.repeat(len(chunk), 1),
        )
        targets = torch.cat(targets).view(len(chunk), -1)  # one row per window
        # the sum of the windows' mean losses (over their scored tokens), as _streamed adds them
        nll = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none"
        ).view(len(chunk), -1)
        loss = (nll.sum(1) / (targets != IGNORE).sum(1)).sum() / len(windows)
        loss.backward()
        total += loss.item()
    pending = [(graphs[s], leaves[s].grad) for s in graphed if leaves[s].grad is not None]
    if pending:
        torch.autograd.backward([m for m, _ in pending], [g for _, g in pending])
    return total
