"""common.viz (PNG grids and curves) and common.samples (the shared samples file)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from common.cli import UserError
from common.samples import load_samples, save_samples
from common.viz import plot_curves, save_digit_grid, save_grid, tile

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png(path) -> np.ndarray:
    """The PNG as a uint8 [H, W] array (the grids are grey, saved as RGB)."""
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    return rgb[..., 0]


def _cell(grid: np.ndarray, row: int, col: int, size: int = 28, pad: int = 2) -> np.ndarray:
    top, left = pad + row * (size + pad), pad + col * (size + pad)
    return grid[top : top + size, left : left + size]


@pytest.mark.parametrize("n", [2, 7, 10, 23])  # (make_grid returns one image unpadded)
def test_tile_lays_out_like_torchvision_make_grid(n):
    from torchvision.utils import make_grid  # the layout readers know; we tile without importing it

    x = torch.rand(n, 3, 5, 4, generator=torch.Generator().manual_seed(n))
    expected = make_grid(x, nrow=10, padding=2, pad_value=1.0)
    assert torch.equal(tile(x, nrow=10, pad=2, pad_value=1.0), expected)


def test_save_grid_uint8_layout_and_exact_pixels(tmp_path):
    images = torch.stack([torch.full((28, 28), 20 * i, dtype=torch.uint8) for i in range(12)])
    path = tmp_path / "sub" / "grid.png"  # parent is created
    save_grid(images, path, nrow=5)
    grid = _png(path)
    assert grid.shape == (3 * 30 + 2, 5 * 30 + 2)  # 3 rows of 5, 2 px padding
    for i in range(12):
        assert (_cell(grid, i // 5, i % 5) == 20 * i).all()
    assert (_cell(grid, 2, 4) == 255).all()  # the unused cell is padding-white
    assert (grid[:2] == 255).all()  # padding


def test_save_grid_float_and_channel_dim(tmp_path):
    images = torch.linspace(0, 1, 4).reshape(4, 1, 1, 1).expand(4, 1, 8, 8).clone()
    images[0] = -0.5  # clamped into [0, 1]
    save_grid(images, tmp_path / "g.png", nrow=4, pad=1)
    grid = _png(tmp_path / "g.png")
    assert grid.shape == (8 + 2, 4 * 9 + 1)
    assert [int(_cell(grid, 0, c, size=8, pad=1).mean()) for c in range(4)] == [0, 85, 170, 255]


def test_save_digit_grid_one_row_per_digit(tmp_path):
    labels = torch.tensor([3, 0, 3, 9, 3, 0, 7])
    images = (labels * 25).to(torch.uint8)[:, None, None].expand(-1, 28, 28).clone()
    path = tmp_path / "digits.png"
    save_digit_grid(images, labels, path)
    grid = _png(path)
    width = 3  # the most images of any digit (three 3s)
    assert grid.shape == (10 * 30 + 2, width * 30 + 2)
    for d in range(10):
        count = int((labels == d).sum())
        for c in range(width):
            expected = 25 * d if c < count else 0  # missing images are black blanks
            assert (_cell(grid, d, c) == expected).all(), (d, c)

    save_digit_grid(images, labels, path, per_digit=2)  # rows cut to 2
    assert _png(path).shape == (10 * 30 + 2, 2 * 30 + 2)


def test_plot_curves_writes_png(tmp_path):
    steps = list(range(1, 51))
    path = tmp_path / "figs" / "loss.png"
    plot_curves(steps, {"train": [1 / s for s in steps], "test": [2 / s for s in steps[:20]]},
                path, xlabel="step", ylabel="loss (nats)", title="loss", logy=True)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (720, 480)  # 6x4 in at 120 dpi
        pixels = np.asarray(im.convert("L"))
    assert pixels.min() < 128 < pixels.max()  # something is drawn on a light background
    plot_curves([0, 1], {"only": [3.0, 2.0]}, tmp_path / "one.png", xlabel="x", ylabel="y")
    assert (tmp_path / "one.png").read_bytes()[:8] == PNG_MAGIC


def test_samples_round_trip_with_labels(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (25, 1, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.arange(25) % 10
    path = tmp_path / "out" / "samples.npz"
    save_samples(path, images, labels)
    got_images, got_labels = load_samples(path)
    assert got_images.dtype == torch.uint8 and got_images.shape == (25, 28, 28)
    assert got_labels.dtype == torch.int64 and got_labels.shape == (25,)
    assert torch.equal(got_images, images[:, 0]) and torch.equal(got_labels, labels)
    with np.load(path) as f:  # the documented on-disk format
        assert set(f.files) == {"images", "labels"}
        assert f["images"].dtype == np.uint8 and f["labels"].dtype == np.int64
    grid = _png(path.with_suffix(".png"))
    assert grid.shape == (10 * 30 + 2, 10 * 30 + 2)  # a row per digit, 10 columns


def test_samples_round_trip_without_labels(tmp_path):
    images = torch.randint(0, 256, (7, 28, 28), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    path = tmp_path / "uncond.npz"
    save_samples(path, images, None)
    got_images, got_labels = load_samples(path)
    assert got_labels is None and torch.equal(got_images, images)
    assert _png(tmp_path / "uncond.png").shape == (30 + 2, 7 * 30 + 2)


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(lambda p: p.write_bytes(b"\x00garbage" * 100), id="random-bytes"),
        pytest.param(lambda p: np.savez(p, labels=np.zeros(3, np.int64)), id="no-images"),
        pytest.param(lambda p: np.savez(p, images=np.zeros((3, 28, 28), np.float32)), id="float-images"),
        pytest.param(lambda p: np.savez(p, images=np.zeros((3, 784), np.uint8)), id="flat-images"),
        pytest.param(lambda p: p.write_bytes(b""), id="empty"),
    ],
)
def test_load_samples_of_a_bad_file_is_a_user_error(tmp_path, write):
    path = tmp_path / "bad.npz"
    write(path)
    assert path.exists()
    with pytest.raises(UserError) as info:
        load_samples(path)
    assert str(path) in str(info.value)


def test_load_samples_of_a_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_samples(tmp_path / "nope.npz")
