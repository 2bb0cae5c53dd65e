"""`uio-gguf train-check`: the paper's Table 4 on a tiny random model."""

from __future__ import annotations

import random

import torch
from tqdm import tqdm

from uio_gguf.train.estimators import Crop, View, estimate_gradient
from uio_gguf.train.tiny import tiny_uio

# arXiv 2406.18173, Table 4: mean ||g_est|| / ||g_full|| (without / with the max(1, (t-1)/S) factor).
PAPER_TABLE4 = {
    (1, False): 0.676,
    (4, False): 0.818,
    (8, False): 0.935,
    (1, True): 0.994,
    (4, True): 0.980,
    (8, True): 1.024,
}


def encoder_side(model) -> list:
    """The parameters whose gradient the estimators approximate: e_mem and the encoder LoRA. (The
    transfer head's gradient is exact in every estimator, so including it only dilutes the study.)"""
    return [p for name, p in model.named_trainable_parameters() if name == "memory_embedding" or ".encoder." in name]


def flat_gradient(
    model,
    crop: Crop,
    estimator: str,
    window: int = 2,
    rng=None,
    factor: bool = True,
    params: list | None = None,
    windows_per_pass: int = 1,
    loss_windows: int | None = None,
    view: View = View(),
) -> torch.Tensor:
    for p in model.trainable_parameters():
        p.grad = None
    estimate_gradient(model, crop, estimator, window, rng, factor, windows_per_pass, loss_windows, view)
    params = model.trainable_parameters() if params is None else params
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]).double()


def gradient_study(samples: int, segments: int, windows: list[int], seed: int = 0, progress: bool = True) -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only wait on each other (badly so on a busy CPU)
    try:
        return _study(samples, segments, windows, seed, progress)
    finally:
        torch.set_num_threads(threads)


def _study(samples: int, segments: int, windows: list[int], seed: int, progress: bool) -> list[dict]:
    model = tiny_uio(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.base.config.vocab_size, (1, segments * model.config.segment + 1), generator=gen)
    crop = Crop(tokens, model.config.segment)
    params = encoder_side(model)
    g_full = flat_gradient(model, crop, "full", params=params)
    rows = []
    bar = tqdm(total=len(windows) * 2 * samples, desc="train-check", disable=not progress, leave=False)
    for window in windows:
        for factor in (False, True):
            ratios, total = [], torch.zeros_like(g_full)
            for i in range(samples):
                g = flat_gradient(model, crop, "unbiased", window, random.Random(seed * 100_003 + i), factor, params)
                ratios.append((g.norm() / g_full.norm()).item())
                total += g
                bar.update(1)
            mean = total / samples
            cosine = torch.nn.functional.cosine_similarity(mean, g_full, dim=0).item()
            rows.append({"S": window, "factor": factor, "ratio": sum(ratios) / samples, "cosine": cosine})
    bar.close()
    return rows


def format_table(rows: list[dict], paper: dict) -> str:
    lines = [f"{'S':>3}  {'factor':>6}  {'||g_est||/||g_full||':>20}  {'paper':>6}  {'cos(mean g_est, g_full)':>23}"]
    for row in rows:
        ref = paper.get((row["S"], row["factor"]))
        lines.append(
            f"{row['S']:>3}  {'yes' if row['factor'] else 'no':>6}  {row['ratio']:>20.3f}  "
            f"{(f'{ref:.3f}' if ref else '-'):>6}  {row['cosine']:>23.4f}"
        )
    return "\n".join(lines)
