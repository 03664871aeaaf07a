"""Timestep and class embeddings that condition the UNet.

The timestep uses the sinusoidal position encoding of Vaswani et al. 2017 (section 3.5), as
Ho et al. 2020 (Appendix B) do, followed by a small MLP. The digit label is a learned
embedding with one extra "null" class, so one network learns both p(x | y) and p(x):
classifier-free guidance (Ho & Salimans 2022, Algorithm 1) drops the label to null at random
during training and mixes the two predictions at sampling time.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps: t long [B] -> float [B, dim].

    emb[:, i] = sin(t / max_period^(i / half)) for i < half, and cos(...) for the rest.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:  # odd width: pad one zero column
        emb = nn.functional.pad(emb, (0, 1))
    return emb


class ConditionEmbedding(nn.Module):
    """emb(t, y) = MLP(sinusoid(t)) + E[y]: the vector every residual block is told.

    y is long [B] in 0..num_classes-1, or `num_classes` (the null label) for "no label";
    y=None means the null label for the whole batch.
    """

    def __init__(self, base_dim: int, emb_dim: int, num_classes: int = 10):
        super().__init__()
        self.base_dim = base_dim
        self.num_classes = num_classes
        self.time_mlp = nn.Sequential(nn.Linear(base_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim)  # last row: the null class

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if y is None:
            y = torch.full_like(t, self.null_label)
        return self.time_mlp(timestep_embedding(t, self.base_dim)) + self.class_emb(y)
