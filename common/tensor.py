"""Small tensor helpers used by both models' math."""

from __future__ import annotations

import torch


def extract(a: torch.Tensor, t: torch.Tensor, x_shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Gather `a[t]` per example and reshape to broadcast against `x_shape`.

    a: [T] (any dtype), t: long [B] -> [B, 1, 1, ...] with len(x_shape) dims.
    """
    out = a.gather(0, t.to(a.device))
    return out.reshape(t.shape[0], *([1] * (len(x_shape) - 1)))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dim but the batch: [B, ...] -> [B]."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def sum_flat(x: torch.Tensor) -> torch.Tensor:
    """Sum over every dim but the batch: [B, ...] -> [B]."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def randn(
    shape: tuple[int, ...] | torch.Size,
    generator: torch.Generator | None,
    device: torch.device | str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """N(0, I) noise on `device`, drawn from `generator` wherever that generator lives.

    A CPU generator with a CUDA tensor draws on the CPU and copies, so one seed gives the
    same noise on every device.
    """
    if generator is not None and generator.device.type != torch.device(device).type:
        return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)
