"""Likelihoods on one footing: the VAE's discretized logistic decoder and the DDPM's bound, sampled over t.

References: torch.distributions' logistic CDF for the decoder; for the bound, a closed form of each
KL term where the model's x0 prediction is a fixed point (the term is then deterministic), and on
1-D Gaussian data, where the optimal denoiser and so each term's expectation are known exactly.
"""

import math

import pytest
import torch
from torch.distributions import AffineTransform, SigmoidTransform, TransformedDistribution, Uniform

from ddpm.bound import prior_kl, strata, vlb_bits_per_dim, vlb_estimate, vlb_term
from ddpm.diffusion import GaussianDiffusion
from ddpm.schedule import cosine_betas
from vaegen.elbo import decoder_log_prob, discretized_logistic_log_prob, elbo_terms, iwae_bound
from vaegen.model import VAE, VAEConfig

F64 = torch.float64
LEVELS = torch.arange(256, dtype=F64) / 255  # the 256 pixel levels in [0, 1]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- the VAE's discretized logistic decoder --------------------------------------------------


def logistic(mean: torch.Tensor, scale: torch.Tensor) -> TransformedDistribution:
    """Logistic(mean, scale) as torch builds it: the inverse sigmoid of a uniform, shifted and scaled."""
    return TransformedDistribution(Uniform(0.0, 1.0), [SigmoidTransform().inv, AffineTransform(mean, scale)])


@pytest.mark.parametrize("mean, log_scale", [(0.3, -3.0), (0.0, -8.0), (1.2, -1.0), (0.5, -5.6), (-0.2, 0.5)])
def test_discretized_logistic_sums_to_one_and_matches_the_logistic_cdf(mean, log_scale):
    m, ls = torch.tensor(mean, dtype=F64), torch.tensor(log_scale, dtype=F64)
    log_p = discretized_logistic_log_prob(LEVELS, m, ls)
    assert abs(log_p.exp().sum().item() - 1.0) < 1e-12
    d = logistic(m, ls.exp())
    upper = torch.where(LEVELS > 1 - 1e-9, torch.ones(()), d.cdf((LEVELS + 0.5 / 255).clamp(max=1e9)))
    lower = torch.where(LEVELS < 1e-9, torch.zeros(()), d.cdf(LEVELS - 0.5 / 255))
    ref = upper - lower  # a difference of CDFs: accurate to ~1e-16 absolute, not relative, in the tails
    torch.testing.assert_close(log_p.exp(), ref, rtol=0, atol=1e-14)
    keep = ref > 1e-8
    torch.testing.assert_close(log_p[keep], ref[keep].log(), rtol=0, atol=1e-7)
    assert bool(torch.isfinite(log_p).all())


def test_discretized_logistic_stays_finite_far_in_the_tails():
    # a level 0.9 away from a sharp mean has P ~ e^{-0.9 / s}: the exact log keeps it (no log 0)
    log_p = discretized_logistic_log_prob(
        torch.tensor([0.9], dtype=F64), torch.zeros(1, dtype=F64), torch.full((1,), -6.0, dtype=F64)
    )
    s = math.exp(-6.0)
    expected = -(0.9 - 0.5 / 255) / s + math.log(1 - math.exp(-1 / (255 * s)))  # sigmoid(-a) ~ e^{-a}
    assert abs(log_p.item() - expected) < 1e-6 * abs(expected)


def test_logistic_vae_bounds_are_likelihoods_of_8bit_images_and_iwae_rises_with_k():
    torch.manual_seed(0)
    model = VAE(VAEConfig(image_size=4, hidden=16, latent_dim=3, decoder="logistic")).double()
    x_levels = torch.randint(0, 256, (32, 16), generator=gen(1)).to(F64) / 255
    with torch.no_grad():
        model.init_output_bias(x_levels.mean(0), x_levels.std(0))
        out = model.decode(torch.randn(5, 3, dtype=F64))
        assert out.shape == (5, 32)  # a mean and a log-scale per pixel
        # p(x|z) is a distribution over the 256 levels of every pixel: one pixel's levels sum to 1
        probs = decoder_log_prob("logistic", LEVELS[:, None].expand(256, 16), out[:1].expand(256, -1)).exp()
        torch.testing.assert_close(probs.sum(0), torch.ones(16, dtype=F64), rtol=1e-10, atol=1e-10)
        x = x_levels.repeat(50, 1)
        torch.manual_seed(2)
        elbo = -elbo_terms(model, x).neg_elbo.mean().item()
        bounds = {k: iwae_bound(model, x, k=k, chunk=7, generator=gen(3)).mean().item() for k in (1, 10, 100)}
    assert abs(bounds[1] - elbo) < 0.3  # L_1 is the ELBO in expectation (MC noise ~0.1 here)
    assert bounds[1] < bounds[10] < bounds[100] < 0  # log P(x) of a discrete x is below 0


def test_output_bias_init_of_the_logistic_decoder_is_the_mean_image():
    model = VAE(VAEConfig(decoder="logistic"))
    mean, std = torch.rand(784) * 0.9 + 0.05, torch.rand(784) * 0.3 + 0.05
    model.init_output_bias(mean, std)
    with torch.no_grad():
        out = model.dec_logits.bias
        torch.testing.assert_close(model.mean_image(out), mean)
        # a logistic's standard deviation is s pi / sqrt(3)
        torch.testing.assert_close(out[784:].exp() * math.pi / math.sqrt(3), std)


# ---- the DDPM's bound, sampled over t --------------------------------------------------------

T_SMALL = 50
DIFF = GaussianDiffusion(cosine_betas(T_SMALL))


def fixed_point_model(diff: GaussianDiffusion, c: torch.Tensor):
    """An eps model whose x0 prediction is c for every input: eps = (xt - sqrt(a_t) c) / sqrt(1 - a_t)."""

    def eps_model(xt, t, y):
        a = diff.alpha_bar.to(xt.dtype)[t].view(-1, *([1] * (xt.dim() - 1)))
        return (xt - a.sqrt() * c) / (1 - a).sqrt()

    return eps_model


def grid_images(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 3, 3), generator=gen(seed)).to(F64) / 127.5 - 1


def test_kl_terms_match_the_closed_form_when_the_prediction_is_a_fixed_point():
    # With x0_hat = c whatever xt, mu_tilde - mu_theta = coef_x0 (x0 - c): each KL term is
    # coef_x0^2 ||x0 - c||^2 / (2 beta_tilde), the same for every draw of xt.
    x0, c = grid_images(3, 0), grid_images(1, 1)
    r = vlb_bits_per_dim(DIFF, fixed_point_model(DIFF, c), x0, None, generator=gen(2), clip=False)
    sq = ((x0 - c) ** 2).sum(dim=(1, 2, 3))  # [3]
    coef, var = DIFF.posterior_mean_coef_x0[1:], DIFF.posterior_variance[1:]
    nats = coef[None] ** 2 * sq[:, None] / (2 * var[None])  # [3, T - 1]
    torch.testing.assert_close(r["terms"][:, 1:], nats / (9 * math.log(2)), rtol=1e-9, atol=0)


def test_stratified_estimate_visits_every_step_once_with_t_minus_1_strata_and_is_unbiased():
    x0, c = grid_images(4, 3), grid_images(1, 4)
    model = fixed_point_model(DIFF, c)  # KL terms independent of xt: the only noise is the choice of t
    full = vlb_bits_per_dim(DIFF, model, x0, None, generator=gen(5), clip=False)
    every = vlb_estimate(DIFF, model, x0, None, T_SMALL - 1, generator=gen(6), clip=False)
    torch.testing.assert_close(every["terms"], full["terms"][:, 1:].sum(1), rtol=1e-12, atol=0)
    torch.testing.assert_close(every["prior"], full["prior"], rtol=1e-12, atol=0)
    # 7 strata: each draw is noisy, the mean over 400 draws is the full sum within its error
    x_rep = x0.repeat(400, 1, 1, 1)
    est = vlb_estimate(DIFF, model, x_rep, None, 7, generator=gen(7), clip=False)["terms"].view(400, 4)
    se = est.std(0) / math.sqrt(400)
    assert bool((est.std(0) > 0).all())
    assert bool(((est.mean(0) - full["terms"][:, 1:].sum(1)).abs() < 4 * se).all())
    for k in (1, 7, 30, T_SMALL - 1):
        edges = strata(T_SMALL, k)
        assert len(edges) == k + 1 and edges[0] == 1 and edges[-1] == T_SMALL
        assert bool((edges.diff() >= 1).all())
    edges = strata(T_SMALL, 7)
    assert edges[1] - edges[0] <= edges[-1] - edges[-2]  # narrow at low t, where the terms are large
    with pytest.raises(ValueError):
        strata(T_SMALL, T_SMALL)


def test_each_kl_term_on_1d_gaussian_data_is_the_closed_form_of_the_optimal_denoiser():
    # Data x0 ~ N(m, s^2) in 1-D: E[x0 | xt] is linear and Var(x0 | xt) = s^2 (1 - a) / (a s^2 + 1 - a).
    # The optimal eps model predicts x0_hat = E[x0 | xt], so
    # E[L_{t-1}] = coef_x0^2 Var(x0 | xt) / (2 beta_tilde).
    diff = GaussianDiffusion(cosine_betas(1000))
    m, s, n = 0.2, 0.5, 20000

    def oracle(xt, t, y):
        a = diff.alpha_bar.to(xt.dtype)[t].view(-1, 1, 1, 1)
        return (1 - a).sqrt() / (a * s**2 + 1 - a) * (xt - a.sqrt() * m)

    x0 = m + s * torch.randn(n, 1, 1, 1, generator=gen(8), dtype=F64)
    for step in (1, 10, 200, 700, 999):
        t = torch.full((n,), step)
        eps = torch.randn(n, 1, 1, 1, generator=gen(step), dtype=F64)
        kl = vlb_term(diff, oracle, x0, None, t, eps, clip=False)
        a = diff.alpha_bar[step]
        expected = diff.posterior_mean_coef_x0[step] ** 2 * s**2 * (1 - a) / (a * s**2 + 1 - a)
        expected = expected / (2 * diff.posterior_variance[step])
        assert abs(kl.mean().item() - expected.item()) < 4 * kl.std().item() / math.sqrt(n), step
    # the prior term: KL(N(sqrt(a_T) x0, 1 - a_T) || N(0, 1)) from the Gaussian KL's closed form
    a_T = diff.alpha_bar[-1]
    prior = 0.5 * (a_T * x0.view(-1) ** 2 - a_T - torch.log1p(-a_T))
    torch.testing.assert_close(prior_kl(diff, x0), prior, rtol=1e-9, atol=1e-15)
