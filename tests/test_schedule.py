"""Invariants of the noise schedules (float64, against the closed form of Nichol & Dhariwal 2021, eq. 17)."""

import math

import pytest
import torch

from ddpm.schedule import cosine_betas, linear_betas, make_betas

T = 1000
S = 0.008


def f(u: float) -> float:
    """Nichol & Dhariwal 2021, eq. 17, written out independently of ddpm.schedule."""
    return math.cos((u / T + S) / (1 + S) * math.pi / 2) ** 2


@pytest.fixture(scope="module")
def betas() -> torch.Tensor:
    return cosine_betas(T)


def test_dtype_shape_range(betas):
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    assert bool((betas > 0).all()) and bool((betas <= 0.999).all())


def test_alpha_bar_strictly_decreasing(betas):
    alpha_bar = torch.cumprod(1 - betas, 0)
    assert bool((alpha_bar[1:] < alpha_bar[:-1]).all())
    assert 0 < alpha_bar[-1] < alpha_bar[0] < 1


def test_alpha_bar_matches_closed_form(betas):
    alpha_bar = torch.cumprod(1 - betas, 0)
    expected = torch.tensor([f(t + 1) / f(0) for t in range(T - 1)], dtype=torch.float64)
    assert torch.allclose(alpha_bar[:-1], expected, rtol=0, atol=1e-12)


def test_only_last_beta_clipped(betas):
    assert betas[-1].item() == 0.999
    assert bool((betas[:-1] < 0.999).all())
    unclipped_last = 1 - f(T) / f(T - 1)
    assert unclipped_last > 0.999  # f(T) = cos^2(pi/2) ~ 0: the clip is what keeps it finite
    assert torch.equal(cosine_betas(T, max_beta=1.0)[:-1], betas[:-1])


def test_first_beta_below_one_pixel_bin(betas):
    # s = 0.008 makes sqrt(beta_1) just under the bin width 1/127.5 of [-1, 1] images.
    assert betas[0].item() == pytest.approx(4.1e-5, rel=0.02)
    assert math.sqrt(betas[0].item()) < 1 / 127.5


def test_last_alpha_bar_is_pure_noise(betas):
    assert torch.cumprod(1 - betas, 0)[-1].item() < 1e-8


def test_linear_schedule_and_names():
    b = linear_betas(T, 1e-4, 0.02)
    assert b.dtype == torch.float64 and b.shape == (T,)
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    assert bool((b[1:] > b[:-1]).all())
    assert torch.equal(make_betas("linear", T), b)
    assert torch.equal(make_betas("cosine", T), cosine_betas(T))
    with pytest.raises(ValueError):
        make_betas("quadratic", T)
