"""common.distributions: KLs, the discretized Gaussian, Bernoulli log-likelihood, bits/dim."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Normal, kl_divergence

from common.distributions import (
    bernoulli_log_prob,
    discretized_gaussian_log_likelihood,
    nats_to_bits_per_dim,
    normal_kl,
    standard_normal_kl,
)

D = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _params(n: int = 1000, seed: int = 0):
    g = _gen(seed)
    m1, m2 = (torch.randn(n, generator=g, dtype=D) * 3 for _ in range(2))
    lv1, lv2 = (torch.randn(n, generator=g, dtype=D) * 2 for _ in range(2))
    return m1, lv1, m2, lv2


# ---------------------------------------------------------------- Gaussian KL


def test_normal_kl_matches_torch_distributions():
    m1, lv1, m2, lv2 = _params()
    ours = normal_kl(m1, lv1, m2, lv2)
    ref = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    assert ours.shape == m1.shape and ours.dtype == D
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_normal_kl_is_nonnegative_and_zero_only_for_equal_arguments():
    m1, lv1, m2, lv2 = _params(seed=1)
    kl = normal_kl(m1, lv1, m2, lv2)
    assert (kl > 0).all()
    assert torch.equal(normal_kl(m1, lv1, m1, lv1), torch.zeros_like(m1))
    # only the variance differs, or only the mean: still strictly positive
    assert (normal_kl(m1, lv1, m1, lv1 + 0.1) > 0).all()
    assert (normal_kl(m1, lv1, m1 + 0.1, lv1) > 0).all()


def test_normal_kl_broadcasts_and_accepts_float_prior():
    m = torch.randn(4, 3, generator=_gen(2), dtype=D)
    lv = torch.randn(4, 3, generator=_gen(3), dtype=D)
    per_elem = normal_kl(m, lv, 0.0, 0.0)
    assert per_elem.shape == (4, 3) and per_elem.dtype == D
    zeros_row, zeros_col = torch.zeros(1, 3, dtype=D), torch.zeros(4, 1, dtype=D)
    torch.testing.assert_close(per_elem, normal_kl(m, lv, zeros_row, zeros_col))


def test_standard_normal_kl_is_normal_kl_against_zero_mean_unit_variance():
    m1, lv1, _, _ = _params(seed=3)
    ours = standard_normal_kl(m1, lv1)
    torch.testing.assert_close(ours, normal_kl(m1, lv1, torch.zeros_like(m1), torch.zeros_like(lv1)))
    ref = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(torch.zeros_like(m1), torch.ones_like(m1)))
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    zero = torch.zeros(3, dtype=D)
    assert torch.equal(standard_normal_kl(zero, zero), zero)


# ---------------------------------------------------------------- discretized Gaussian

MEANS = [-3.0, -1.5, -1.0, -1.0 + 1 / 255, -0.7, 0.0, 0.003, 1 / 255, 0.5, 0.999, 1.0, 1.2, 4.0]


def _levels(dtype) -> torch.Tensor:
    return torch.arange(256, dtype=dtype) / 127.5 - 1.0  # x = k / 127.5 - 1


@pytest.mark.parametrize("log_scale", [-20.0, -12.0, -8.0, -5.0, -3.0, -1.0, 0.0, 1.0, 3.0, 6.0])
def test_discretized_gaussian_sums_to_one_over_256_bins_float64(log_scale):
    x = _levels(D)[:, None]  # [256, 1] against a row of means
    mean = torch.tensor(MEANS, dtype=D)[None, :]
    logp = discretized_gaussian_log_likelihood(x, mean, torch.full_like(mean, log_scale))
    assert logp.shape == (256, len(MEANS))
    assert torch.isfinite(logp).all() and (logp <= 1e-12).all()
    torch.testing.assert_close(logp.exp().sum(0), torch.ones(len(MEANS), dtype=D), rtol=0, atol=1e-6)


def test_discretized_gaussian_sums_to_one_float32_random_params():
    # float32, the training dtype: the bins' shared edges are computed as x +- 1/255 in float32,
    # so for scales below ~e^-8 a mean on a bin edge can lose ~1e-4 of the mass; stay above that.
    g = _gen(4)
    mean = torch.rand(1, 500, generator=g) * 4 - 2  # means well outside [-1, 1] too
    log_scale = torch.rand(1, 500, generator=g) * 12 - 7  # [-7, 5]
    logp = discretized_gaussian_log_likelihood(_levels(torch.float32)[:, None], mean, log_scale)
    assert torch.isfinite(logp).all()
    torch.testing.assert_close(logp.exp().sum(0), torch.ones(500), rtol=0, atol=1e-4)


def test_discretized_gaussian_values():
    x = _levels(D)
    # a wide Gaussian: an interior bin's mass ~ density * bin width (2/255)
    mean, log_scale = torch.tensor(0.1, dtype=D), torch.tensor(0.0, dtype=D)
    logp = discretized_gaussian_log_likelihood(x, mean, log_scale)
    interior = slice(1, 255)
    approx = Normal(mean, log_scale.exp()).log_prob(x[interior]) + math.log(2 / 255)
    torch.testing.assert_close(logp[interior], approx, rtol=0, atol=1e-5)
    # the edge bins are open: they hold the whole tail beyond +-(1 - 1/255)
    tail = Normal(mean, log_scale.exp()).cdf(torch.tensor(-1 + 1 / 255, dtype=D))
    torch.testing.assert_close(logp[0].exp(), tail)
    # a very sharp Gaussian puts all its mass on the level nearest the mean
    for k in (0, 1, 77, 128, 254, 255):
        logp = discretized_gaussian_log_likelihood(x, x[k] + 0.2 / 255, torch.tensor(-12.0, dtype=D))
        assert logp.argmax().item() == k
        assert logp[k].item() == pytest.approx(0.0, abs=1e-9)
    # means beyond the range end up in the open edge bins
    far = discretized_gaussian_log_likelihood(x, torch.tensor(5.0, dtype=D), torch.tensor(-3.0, dtype=D))
    assert far[255].item() == pytest.approx(0.0, abs=1e-12)


def test_discretized_gaussian_is_elementwise():
    g = _gen(5)
    x = torch.randint(0, 256, (2, 1, 4, 4), generator=g).to(D) / 127.5 - 1
    mean = torch.randn(2, 1, 4, 4, generator=g, dtype=D) * 0.5
    log_scale = torch.randn(2, 1, 4, 4, generator=g, dtype=D) - 2
    out = discretized_gaussian_log_likelihood(x, mean, log_scale)
    assert out.shape == x.shape
    flat = discretized_gaussian_log_likelihood(x.flatten(), mean.flatten(), log_scale.flatten())
    torch.testing.assert_close(out.flatten(), flat, rtol=0, atol=0)


# ---------------------------------------------------------------- Bernoulli


def test_bernoulli_log_prob_is_minus_bce_with_logits():
    g = _gen(6)
    logits = torch.randn(10, 784, generator=g) * 5
    x = torch.rand(10, 784, generator=g)  # grey levels as soft targets
    out = bernoulli_log_prob(x, logits)
    assert out.shape == x.shape
    torch.testing.assert_close(out, -F.binary_cross_entropy_with_logits(logits, x, reduction="none"))
    # the definition x log p + (1 - x) log(1 - p), with log p = logsigmoid(l), log(1 - p) = logsigmoid(-l)
    l64, x64 = logits.double(), x.double()
    ref = x64 * F.logsigmoid(l64) + (1 - x64) * F.logsigmoid(-l64)
    torch.testing.assert_close(bernoulli_log_prob(x64, l64), ref, rtol=1e-12, atol=1e-12)
    assert (out <= 0).all()


def test_bernoulli_log_prob_matches_torch_bernoulli_for_binary_x():
    g = _gen(7)
    logits = torch.randn(5000, generator=g, dtype=D) * 10
    x = (torch.rand(5000, generator=g, dtype=D) < 0.5).to(D)
    torch.testing.assert_close(bernoulli_log_prob(x, logits), Bernoulli(logits=logits).log_prob(x))


def test_bernoulli_log_prob_is_stable_for_extreme_logits():
    logits = torch.tensor([-200.0, 200.0, -200.0, 200.0])
    x = torch.tensor([0.0, 1.0, 1.0, 0.0])
    out = bernoulli_log_prob(x, logits)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, -200.0, -200.0]))


# ---------------------------------------------------------------- units


def test_nats_to_bits_per_dim():
    assert nats_to_bits_per_dim(784 * math.log(2.0), 784) == pytest.approx(1.0)
    assert nats_to_bits_per_dim(0.0, 784) == 0.0
    nats = torch.tensor([784 * math.log(2.0), 2 * 784 * math.log(2.0)], dtype=D)
    torch.testing.assert_close(nats_to_bits_per_dim(nats, 784), torch.tensor([1.0, 2.0], dtype=D))
    # 80 nats per MNIST image (a typical VAE bound) is ~0.147 bits/dim
    assert nats_to_bits_per_dim(80.0, 784) == pytest.approx(80 / 784 / math.log(2))
