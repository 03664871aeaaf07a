"""Exponential moving average of model weights (Polyak averaging), as used for sampling.

ema <- d * ema + (1 - d) * theta after every optimizer step. We use torch's own
`AveragedModel`; only the decay rule is ours.

Why a warm-up: with a fixed d = 0.999 the initial weights keep a share d^n of the average,
still 6% after 2800 steps. Our UNet's output layer starts at zero, so such an EMA predicts
eps about 6% too small, and the last denoising steps leave visible speckle noise. With
d_n = min(d, (1 + n) / (10 + n)) the early weights are forgotten quickly while the
horizon grows to 1 / (1 - d) steps (the rule of TensorFlow's ExponentialMovingAverage
with num_updates).

The horizon grows slowly: (1 + n) / (10 + n) stays below d until n = (10 d - 1) / (1 - d),
step 8,991 for d = 0.999, so a shorter run never reaches d and its average does not depend on
it. Until then, after N updates the weights of update k (k >= 1; the first is a copy) carry the
share 9 N! (k + 9)! / ((k + 1)! (N + 9)!), proportional to (k + 2)(k + 3)...(k + 9), about k^8:
a power-function EMA profile with gamma = 8 (Karras et al. 2024, sec. 3.1), whose length grows
with the run: its standard deviation is about 0.09 of the steps so far.
"""

from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def ema_decay(decay: float, n: int, warmup: bool) -> float:
    """The decay used for the update after n earlier ones."""
    return min(decay, (1.0 + n) / (10.0 + n)) if warmup else decay


def make_ema(model: torch.nn.Module, decay: float, warmup: bool = False) -> AveragedModel:
    """A frozen copy of `model` whose `update_parameters(model)` applies one EMA step.

    The first update copies the weights; buffers (e.g. norm statistics) are averaged too.
    """
    if warmup:

        def multi_avg_fn(ema_tensors: list, tensors: list, n_averaged: torch.Tensor) -> None:
            weight = 1.0 - ema_decay(decay, int(n_averaged), True)
            for e, t in zip(ema_tensors, tensors, strict=True):
                e.lerp_(t, weight) if e.is_floating_point() else e.copy_(t)  # counters: just copy

    else:
        multi_avg_fn = get_ema_multi_avg_fn(decay)
    ema = AveragedModel(model, multi_avg_fn=multi_avg_fn, use_buffers=True)
    ema.requires_grad_(False)
    return ema
