"""The samples file every tool reads and writes (docs/reference.md, "The samples file").

`numpy.savez(path, images=uint8 [N, 28, 28] in 0..255, labels=int64 [N])`, labels absent
for unconditional samples, plus a PNG grid beside it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from common.cli import UserError
from common.viz import save_digit_grid, save_grid


def save_samples(path: str | Path, images: torch.Tensor, labels: torch.Tensor | None) -> None:
    """Write the shared samples format: npz with images uint8 [N, 28, 28] (+ labels int64 [N]).

    A PNG grid is written beside it (same name, .png): one row per digit when labelled.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = images.reshape(images.shape[0], images.shape[-2], images.shape[-1]).to(torch.uint8)
    arrays = {"images": images.cpu().numpy()}
    if labels is not None:
        arrays["labels"] = labels.cpu().long().numpy().astype(np.int64)
    np.savez(path, **arrays)
    png = path.with_suffix(".png")
    if labels is not None:
        save_digit_grid(images.cpu(), labels.cpu(), png, per_digit=min(10, len(images)))
    else:
        save_grid(images[:100].cpu(), png, nrow=10)


def load_samples(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read the shared samples format -> (images uint8 [N, 28, 28], labels int64 [N] or None)."""
    try:
        with np.load(path) as f:
            images = torch.from_numpy(f["images"].copy())
            labels = torch.from_numpy(f["labels"].copy()).long() if "labels" in f else None
    except FileNotFoundError:
        raise UserError(f"samples file {path} does not exist") from None
    except Exception as e:
        raise UserError(f"{path} is not a samples file (npz with 'images'): {e}") from None
    if images.dtype != torch.uint8 or images.dim() != 3:
        raise UserError(f"{path}: 'images' must be uint8 [N, H, W], got {images.dtype} {tuple(images.shape)}")
    return images, labels
