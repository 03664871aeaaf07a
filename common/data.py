"""MNIST, held in memory as uint8 tensors, and the pixel-range conventions.

Where the files are looked for: in `--data-dir` if it is given, else in `$MNIST_DIR`, then
`./data`. Each is a torchvision root, i.e. the four raw IDX files sit in `<root>/MNIST/raw/`.
If none has them, we try to download into the first candidate; if that fails, a UserError
names the folders searched and the four files. The whole split is one uint8 tensor
[N, 1, H, W] and batches are index slices: on 2 CPU cores a per-item DataLoader with PIL
transforms would cost more than a VAE epoch.

Pixel conventions (conversions live here only): uint8 0..255; the VAE sees [0, 1]
(`to_unit`), the DDPM sees [-1, 1] (`to_signed`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from common.cli import UserError

DATA_DIR_HELP = "DIR holding MNIST/raw/ (if not given: $MNIST_DIR, else ./data)"  # every --data-dir flag
RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def candidate_dirs(data_dir: str | Path | None = None) -> list[Path]:
    """Where MNIST is looked for: only `--data-dir` when it is given (it is never silently replaced
    by another folder); otherwise $MNIST_DIR, then ./data."""
    if data_dir is not None:
        return [Path(data_dir)]
    return [Path(d) for d in (os.environ.get("MNIST_DIR") or None, "data") if d is not None]


def has_mnist(root: Path) -> bool:
    return all((root / "MNIST" / "raw" / name).is_file() for name in RAW_FILES)


def find_mnist(data_dir: str | Path | None = None, download: bool = True) -> Path:
    """Return the torchvision root that holds MNIST, downloading it into the first candidate
    (`--data-dir` if given, else $MNIST_DIR or ./data) if allowed and possible."""
    dirs = candidate_dirs(data_dir)
    for root in dirs:
        if has_mnist(root):
            return root
    if download:
        from torchvision.datasets import MNIST

        try:
            MNIST(root=str(dirs[0]), train=True, download=True)
            MNIST(root=str(dirs[0]), train=False, download=True)
        except Exception:
            pass  # offline: fall through to the message below
        if has_mnist(dirs[0]):
            return dirs[0]
    searched = " or ".join(str(d / "MNIST" / "raw") for d in dirs)
    raise UserError(
        f"MNIST not found in {searched} (download {'failed' if download else 'off'}). Put the four "
        f"raw IDX files {', '.join(RAW_FILES)} in DIR/MNIST/raw/ and pass --data-dir DIR "
        "(or set MNIST_DIR=DIR)"
    )


def load_mnist(
    train: bool = True,
    data_dir: str | Path | None = None,
    image_size: int = 28,
    download: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One split as (images uint8 [N, 1, S, S], labels int64 [N]).

    The IDX files are read here (`read_idx`), not by torchvision's MNIST class, which is only
    needed to download: importing torchvision costs several seconds per process on 2 cores.
    """
    raw = find_mnist(data_dir, download) / "MNIST" / "raw"
    prefix = "train" if train else "t10k"
    try:
        images = read_idx(raw / f"{prefix}-images-idx3-ubyte")  # [N, 28, 28]
        labels = read_idx(raw / f"{prefix}-labels-idx1-ubyte")  # [N]
        if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
            raise ValueError(f"images {tuple(images.shape)} do not match labels {tuple(labels.shape)}")
    except (OSError, ValueError) as e:  # truncated or foreign files in the right place
        raise UserError(f"could not read MNIST in {raw}: {e}") from None
    images = images.unsqueeze(1).contiguous()  # [N, 1, 28, 28] uint8
    labels = labels.long()
    if image_size != images.shape[-1]:
        images = resize(images, image_size)
    return images, labels


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize of uint8 images [N, 1, H, W] -> [N, 1, size, size]."""
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8)


def batch_indices(
    n: int, batch_size: int, seed: int, epoch: int, drop_last: bool = True
) -> Iterator[torch.Tensor]:
    """Shuffled index batches for one epoch; the order depends only on (seed, epoch).

    That makes runs reproducible and lets `--resume` continue with exactly the data order
    an uninterrupted run would have seen.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        yield perm[i : i + batch_size]


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float [0, 1] (the VAE's Bernoulli targets)."""
    return images.float() / 255.0


def binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each pixel x in [0, 1] becomes 1 with probability x, else 0: a Bernoulli draw per pixel.

    Drawn afresh for every training batch, this is "dynamically binarized" MNIST, the benchmark
    VAE papers report in nats (Burda et al. 2016, section 5.1; Salakhutdinov & Murray 2008 drew
    it once). x: float [...] in [0, 1] -> float [...] in {0, 1}.
    """
    return torch.bernoulli(x, generator=generator)


def to_signed(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float [-1, 1] (the DDPM's data space)."""
    return images.float() / 127.5 - 1.0


def unit_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [0, 1] -> uint8 0..255 (rounded, clamped)."""
    return (x.clamp(0, 1) * 255.0).round().to(torch.uint8)


def signed_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 0..255 (rounded, clamped)."""
    return ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


def read_idx(path: str | Path) -> torch.Tensor:
    """Read a uint8 IDX file (magic 0 0 0x08 ndim, ndim big-endian sizes, the bytes): a tensor."""
    data = Path(path).read_bytes()
    if len(data) < 4 or data[:3] != bytes([0, 0, 0x08]):
        raise ValueError(f"{Path(path).name} is not a uint8 IDX file")
    ndim = data[3]
    start = 4 + 4 * ndim
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if len(data) != start + math.prod(shape):
        raise ValueError(f"{Path(path).name}: {len(data) - start} bytes of data for shape {shape}")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=start).reshape(shape)


def write_idx(path: str | Path, array: torch.Tensor) -> None:
    """Write a uint8 tensor as an IDX file (the MNIST format: magic, dims, big-endian sizes).

    The tests write tiny synthetic MNIST folders with it (tests/fake_mnist.py).
    """
    array = array.to(torch.uint8).contiguous()
    header = bytes([0, 0, 0x08, array.dim()])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    Path(path).write_bytes(header + array.numpy().tobytes())
