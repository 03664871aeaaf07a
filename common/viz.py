"""Figures: image grids and training curves (matplotlib, Agg).

Grids are tiled here with einops rather than by torchvision, whose import costs seconds
(it pulls in torch._dynamo): every command and tutorial that draws a grid would pay it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from einops import rearrange  # noqa: E402
from matplotlib import image as mpimg  # noqa: E402


def tile(images: torch.Tensor, nrow: int = 10, pad: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """Images [N, C, H, W] -> one grid [C, H', W'], `nrow` per row, `pad`-pixel gutters around each.

    The last row is filled with `pad_value`; fewer than `nrow` images make a single, shorter row.
    """
    n, c, h, w = images.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    cells = images.new_full((rows * cols, c, h + pad, w + pad), pad_value)
    cells[:n, :, pad:, pad:] = images
    grid = rearrange(cells, "(r k) c h w -> c (r h) (k w)", k=cols)
    return F.pad(grid, (0, pad, 0, pad), value=pad_value)  # the right and bottom gutters


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 10, pad: int = 2, scale: int = 1) -> None:
    """Save images as one PNG grid, each pixel drawn as scale x scale pixels (for figures that must
    be readable at their native size, as on a web page).

    images: uint8 [N, H, W] or [N, 1, H, W] in 0..255, or float in [0, 1].
    """
    if images.dim() == 3:
        images = images.unsqueeze(1)
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float().clamp(0, 1)
    grid = rearrange(tile(x, nrow, pad), "c h w -> h w c")
    grid = (grid * 255 + 0.5).clamp(0, 255).to(torch.uint8)  # rounded, so uint8 input round-trips
    if grid.shape[-1] == 1:
        grid = grid.expand(-1, -1, 3)  # grey as RGB: the PNG shows the values, not a colour map
    grid = grid.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    mpimg.imsave(str(path), grid.contiguous().numpy())


def save_digit_grid(
    images: torch.Tensor, labels: torch.Tensor, path: str | Path, per_digit: int | None = None, scale: int = 1
) -> None:
    """One row per digit 0..9 (images grouped by label), up to `per_digit` per row."""
    if images.dim() == 3:
        images = images.unsqueeze(1)
    rows = [images[labels == d] for d in range(10)]
    width = per_digit or max(len(r) for r in rows)
    blank = torch.zeros_like(images[:1]) if images.dtype != torch.uint8 else images[:1] * 0
    padded = []
    for r in rows:
        r = r[:width]
        padded.append(torch.cat([r, blank.expand(width - len(r), *blank.shape[1:])]))
    save_grid(torch.cat(padded), path, nrow=width, scale=scale)


def plot_curves(
    x: Sequence[float],
    series: dict[str, Sequence[float]],
    path: str | Path,
    xlabel: str,
    ylabel: str,
    title: str = "",
    logy: bool = False,
) -> None:
    """Line plot of one or more series against `x`, saved as PNG."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, ys in series.items():
        ax.plot(list(x)[: len(ys)], list(ys), label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
