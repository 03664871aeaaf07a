"""Exponential moving average of model weights (Polyak averaging), as used for sampling.

ema <- decay * ema + (1 - decay) * theta after every optimizer step. We use torch's own
`AveragedModel` with `get_ema_multi_avg_fn` rather than a hand-written loop.
"""

from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def make_ema(model: torch.nn.Module, decay: float) -> AveragedModel:
    """A frozen copy of `model` whose `update_parameters(model)` applies one EMA step.

    The first update copies the weights; buffers (e.g. norm statistics) are averaged too.
    """
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ema.requires_grad_(False)
    return ema
