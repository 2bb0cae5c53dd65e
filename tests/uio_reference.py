"""The PyTorch side of the runtime parity tests: what the UIO model computes for a token stream."""

from __future__ import annotations

import numpy as np
import torch


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(p || q) per row, from logits."""
    p = torch.log_softmax(torch.as_tensor(p_logits, dtype=torch.float64), -1)
    q = torch.log_softmax(torch.as_tensor(q_logits, dtype=torch.float64), -1)
    return (p.exp() * (p - q)).sum(-1).numpy()


def torch_memory(model, segments: np.ndarray) -> torch.Tensor:
    """h_mem of each segment: (N, n_layer, k, d)."""
    with torch.no_grad():
        return model.encode(torch.as_tensor(segments, dtype=torch.long))


def torch_stream_logits(model, stream: np.ndarray, segment: int) -> np.ndarray:
    """Logits of every token of the stream, window by window, each window after the memory of all the
    full segments before it (docs/design.md §1)."""
    n_full = len(stream) // segment
    memory = torch_memory(model, stream[: n_full * segment].reshape(n_full, segment))
    out = []
    with torch.no_grad():
        for t in range(0, len(stream), segment):
            window = torch.as_tensor(stream[t : t + segment], dtype=torch.long)[None]
            s = t // segment
            prefix = memory[:s].permute(1, 0, 2, 3).reshape(1, memory.shape[1], -1, memory.shape[3]) if s else None
            out.append(model.decode(window, prefix)[0].numpy())
    return np.concatenate(out)
