"""A frozen nn.Linear with named low-rank adapters, in PEFT's naming (lora_A, lora_B, alpha / r).

Why not PEFT's own layers: UIO puts two adapters on v_proj (encoder and transfer head) and switches the
encoder adapter on and off inside one training step. PEFT's `set_adapter` / `disable_adapter` flip
`requires_grad` on the adapters they turn off, and autograd then silently drops gradients that a
graph built earlier still owes them. Here switching is a plain flag; the checkpoint is still written
in PEFT's format (see train/checkpoint.py) and loads with `PeftModel.from_pretrained`.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active: set[str] = set()  # adapters added to the output of forward()

    def add_adapter(self, name: str, rank: int, alpha: float) -> None:
        base = self.base_layer
        # Adapters stay float32 whatever the base dtype (bf16 on CUDA): AdamW on bf16 weights loses updates.
        a = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        b = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))  # PEFT's default: A random, B zero, so delta = 0
        nn.init.zeros_(b.weight)
        self.lora_A[name] = a
        self.lora_B[name] = b
        self.scaling[name] = alpha / rank

    def delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The adapter's contribution x · (alpha/r) · Aᵀ Bᵀ, without the base weight."""
        a, b = self.lora_A[name], self.lora_B[name]
        return (b(a(x.to(a.weight.dtype))) * self.scaling[name]).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        for name in self.active:
            y = y + self.delta(x, name)
        return y
