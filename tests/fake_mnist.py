"""A tiny synthetic MNIST for the tests (and the tutorials' --synthetic runs): never the real one."""

from __future__ import annotations

from pathlib import Path

import torch

from common.data import write_idx


def write_fake_mnist(root: str | Path, n_train: int = 256, n_test: int = 64, seed: int = 0) -> Path:
    """A tiny synthetic MNIST in torchvision layout under `root` (digit-dependent blobs)."""
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.arange(n) % 10
        images = torch.randint(0, 40, (n, 28, 28), generator=g)
        for i, y in enumerate(labels.tolist()):  # a bright bar whose place encodes the digit
            images[i, 4 + 2 * y : 6 + 2 * y, 6:22] = 255
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return Path(root)
