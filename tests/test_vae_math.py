"""The VAE's math against closed forms: KL, ELBO <= log p(x), IWAE ordering, reparameterization."""

from __future__ import annotations

import math

import pytest
import torch

from common.distributions import bernoulli_log_prob, normal_log_prob
from vaegen.elbo import (
    elbo_terms,
    evaluate_bounds,
    iwae_bound,
    kl_to_prior,
    log_importance_weights,
    reconstruction_nll,
)
from vaegen.model import VAE, VAEConfig, reparameterize


def tiny_vae(conditional: bool = False, seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    return VAE(VAEConfig(image_size=4, hidden=16, latent_dim=3, conditional=conditional))


def binary_images(n: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, d, generator=g) < 0.3).float()


# ---- KL(q || p) -------------------------------------------------------------------------


def test_kl_matches_monte_carlo_and_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(2, 5, generator=g, dtype=torch.float64)
    logvar = torch.randn(2, 5, generator=g, dtype=torch.float64)
    kl = kl_to_prior(mu, logvar)

    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    torch.testing.assert_close(kl, torch.distributions.kl_divergence(q, p).sum(-1))

    # KL = E_q[log q(z) - log p(z)], estimated with 400k reparameterized samples
    eps = torch.randn(400_000, 2, 5, generator=g, dtype=torch.float64)
    z = reparameterize(mu, logvar, eps)
    zeros = torch.zeros_like(mu)
    mc = (normal_log_prob(z, mu, logvar) - normal_log_prob(z, zeros, zeros)).sum(-1).mean(0)
    torch.testing.assert_close(mc, kl, atol=0.03, rtol=0.01)


def test_kl_is_zero_at_the_prior_and_positive_elsewhere():
    zero = torch.zeros(4, 20, dtype=torch.float64)
    assert torch.equal(kl_to_prior(zero, zero), torch.zeros(4, dtype=torch.float64))
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(100, 20, generator=g, dtype=torch.float64)
    logvar = torch.randn(100, 20, generator=g, dtype=torch.float64)
    assert (kl_to_prior(mu, logvar) > 0).all()
    assert (kl_to_prior(mu, zero[:1].expand_as(mu)) > 0).all()  # mean off only
    assert (kl_to_prior(zero[:1].expand_as(mu), logvar) > 0).all()  # variance off only


def test_reconstruction_nll_is_bernoulli_negative_log_likelihood():
    g = torch.Generator().manual_seed(2)
    x = binary_images(8, seed=2).double()
    logits = torch.randn(8, 16, generator=g, dtype=torch.float64)
    oracle = -torch.distributions.Bernoulli(logits=logits).log_prob(x).sum(-1)
    torch.testing.assert_close(reconstruction_nll(x, logits), oracle)
    # grey levels: the cross-entropy formula, x log p + (1 - x) log(1 - p)
    xg = torch.rand(8, 16, generator=g, dtype=torch.float64)
    p = torch.sigmoid(logits)
    formula = -(xg * torch.log(p) + (1 - xg) * torch.log1p(-p)).sum(-1)
    torch.testing.assert_close(reconstruction_nll(xg, logits), formula)


# ---- the ELBO in a model where log p(x) is exact: linear-Gaussian -------------------------
# p(z) = N(0, I_J), p(x|z) = N(W z + b, s2 I_D)  =>  p(x) = N(b, W W^T + s2 I),
# p(z|x) = N(S W^T (x - b) / s2, S) with S = (I + W^T W / s2)^-1.
# With orthogonal columns in W the true posterior is diagonal, so a mean-field q can equal it.


def linear_gaussian(seed: int = 0, D: int = 6, J: int = 3):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(D, J, generator=g, dtype=torch.float64))
    W = Q * torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)  # orthogonal columns
    b = torch.randn(D, generator=g, dtype=torch.float64)
    s2 = 0.3
    x = torch.randn(5, D, generator=g, dtype=torch.float64) * 2
    return W, b, s2, x, g


def exact_log_px(W, b, s2, x):
    cov = W @ W.T + s2 * torch.eye(W.shape[0], dtype=W.dtype)
    return torch.distributions.MultivariateNormal(b, cov).log_prob(x)


def analytic_elbo(W, b, s2, x, m, logvar):
    """E_q[log p(x|z)] - KL(q || p) for q = N(m, diag(exp(logvar))), both terms in closed form."""
    D = W.shape[0]
    resid = x - m @ W.T - b
    trace = (W**2 * torch.exp(logvar).unsqueeze(1)).sum((-2, -1))  # tr(W diag(v) W^T)
    expected_loglik = -0.5 * (D * math.log(2 * math.pi * s2) + ((resid**2).sum(-1) + trace) / s2)
    return expected_loglik - kl_to_prior(m, logvar)


def true_posterior(W, b, s2, x):
    S = torch.linalg.inv(torch.eye(W.shape[1], dtype=W.dtype) + W.T @ W / s2)
    mean = (x - b) @ W @ S.T / s2
    return mean, torch.log(torch.diagonal(S)).expand_as(mean)


def test_elbo_is_below_log_likelihood_and_tight_at_the_true_posterior():
    W, b, s2, x, g = linear_gaussian()
    log_px = exact_log_px(W, b, s2, x)
    m, logvar = true_posterior(W, b, s2, x)
    torch.testing.assert_close(analytic_elbo(W, b, s2, x, m, logvar), log_px)
    for _ in range(20):  # any other q is strictly below
        m2 = m + 0.3 * torch.randn(m.shape, generator=g, dtype=m.dtype)
        lv2 = logvar + 0.3 * torch.randn(m.shape, generator=g, dtype=m.dtype)
        assert (analytic_elbo(W, b, s2, x, m2, lv2) < log_px).all()


def test_importance_weights_are_constant_at_the_true_posterior():
    # log p(x, z) - log q(z|x) = log p(x) for every z when q = p(z|x): zero-variance estimator
    W, b, s2, x, g = linear_gaussian(seed=3)
    m, logvar = true_posterior(W, b, s2, x)
    z = reparameterize(m, logvar, torch.randn(50, *m.shape, generator=g, dtype=m.dtype))
    zeros = torch.zeros_like(z)
    log_pxz = normal_log_prob(x, z @ W.T + b, torch.full_like(x, math.log(s2))).sum(-1)
    log_w = log_pxz + normal_log_prob(z, zeros, zeros).sum(-1) - normal_log_prob(z, m, logvar).sum(-1)
    torch.testing.assert_close(log_w, exact_log_px(W, b, s2, x).expand_as(log_w))


# ---- the importance-weighted bound (Burda et al. 2015) -----------------------------------


def test_iwae_bound_is_above_the_elbo_and_rises_with_k():
    model = tiny_vae().double()
    with torch.no_grad():
        model.enc_logvar.bias.fill_(1.0)  # a q much broader than the posterior: a loose ELBO
    # the ordering holds for expectations: average over 100 copies of 32 images
    x = binary_images(32).double().repeat(100, 1)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # elbo_terms draws its noise from the global RNG
    with torch.no_grad():
        bounds = {k: iwae_bound(model, x, k=k, chunk=7, generator=g).mean().item() for k in (1, 5, 50)}
        elbo = -elbo_terms(model, x).neg_elbo.mean().item()
    assert abs(bounds[1] - elbo) < 0.05  # L_1 is the ELBO in expectation
    assert elbo < bounds[5] < bounds[50]
    assert bounds[5] - elbo > 0.5 and bounds[50] - bounds[5] > 0.1  # gaps well above the MC noise (~0.02)


def test_iwae_approaches_log_px_of_a_vae_with_a_1d_latent():
    # A VAE of the project with J = 1: log p(x) = log int p(x|z) N(z; 0, 1) dz is a 1-D integral,
    # computed here by quadrature on a fine grid. Then, through the project's own bounds,
    # E[ELBO] <= E[IWAE_k] <= log p(x), and IWAE_k closes the gap as k grows (Burda et al. 2015).
    torch.manual_seed(0)
    model = VAE(VAEConfig(image_size=4, hidden=16, latent_dim=1)).double()
    with torch.no_grad():
        model.dec_hidden.weight.mul_(3)  # a decoder that depends strongly on z: a sharp posterior ...
        model.enc_logvar.bias.fill_(1.0)  # ... and a q much broader than it: a loose ELBO
    x = binary_images(6).double()
    z = torch.linspace(-9, 9, 20_001, dtype=torch.float64)
    with torch.no_grad():
        logits = model.decode(z[:, None])  # [Z, 16]: p(x|z) at every grid point
        log_px_z = bernoulli_log_prob(x[:, None, :].expand(-1, len(z), -1), logits.expand(6, -1, -1)).sum(-1)
        log_joint = log_px_z + normal_log_prob(z, torch.zeros(()), torch.zeros(()))
        log_px = torch.logsumexp(log_joint, 1) + math.log(z[1] - z[0])  # Riemann sum; tails ~ e^-40
        reps = x.repeat(400, 1)  # expectations over 400 independent draws per image
        elbo = -elbo_terms(model, reps).neg_elbo.view(400, 6).mean(0)
        iwae = {k: iwae_bound(model, reps, k=k, generator=torch.Generator().manual_seed(k))
                for k in (1, 10, 100, 1000)}  # fmt: skip
        iwae = {k: v.view(400, 6).mean(0) for k, v in iwae.items()}
    gaps = {k: (log_px - v).mean().item() for k, v in iwae.items()}
    assert (elbo < log_px).all() and all((v < log_px + 0.01).all() for v in iwae.values())
    assert (log_px - elbo).mean().item() > 0.3  # the ELBO is loose here ...
    assert gaps[1] > gaps[10] > gaps[100] > gaps[1000] >= -0.01  # ... and IWAE_k closes the gap
    assert gaps[1000] < 0.02 and abs(gaps[1] - (log_px - elbo).mean().item()) < 0.05  # L_1 = ELBO


def test_log_importance_weights_shape_and_chunking():
    model = tiny_vae(conditional=True)
    x, y = binary_images(6), torch.arange(6)
    with torch.no_grad():
        log_w = log_importance_weights(model, x, y, k=23, chunk=5)
    assert log_w.shape == (23, 6)
    assert torch.isfinite(log_w).all()


def test_evaluate_bounds_is_deterministic_and_ordered():
    model = tiny_vae()
    x = binary_images(50)
    a = evaluate_bounds(model, x, k=20, batch_size=16)
    b = evaluate_bounds(model, x, k=20, batch_size=16)
    assert a == b
    assert a["neg_iwae_k20"] < a["neg_elbo"]


# ---- model and reparameterization --------------------------------------------------------


def test_reparameterize_is_differentiable_in_mu_and_logvar():
    mu = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    logvar = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(4, 3, dtype=torch.float64)
    z = reparameterize(mu, logvar, eps)
    z.sum().backward()
    torch.testing.assert_close(mu.grad, torch.ones_like(mu))
    torch.testing.assert_close(logvar.grad, 0.5 * torch.exp(0.5 * logvar.detach()) * eps)


def test_gradients_reach_the_encoder_through_the_reconstruction_term():
    model = tiny_vae()
    x = binary_images(8)
    # the reconstruction term alone: the only path to the encoder is z = mu + sigma * eps
    reconstruction_nll(x, model(x)[0]).mean().backward()
    for p in (model.enc_hidden.weight, model.enc_mu.weight, model.enc_logvar.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    model.zero_grad()
    with torch.no_grad():  # mu, logvar computed without a graph: no gradient can reach the encoder
        mu, logvar = model.encode(x)
    reconstruction_nll(x, model.decode(reparameterize(mu, logvar))).mean().backward()
    assert model.enc_hidden.weight.grad is None


def test_model_shapes_and_conditioning():
    model = VAE(VAEConfig(conditional=True))
    x = torch.rand(5, 1, 28, 28)
    y = torch.tensor([0, 1, 2, 3, 4])
    logits, mu, logvar = model(x, y)
    assert logits.shape == (5, 784) and mu.shape == logvar.shape == (5, 20)
    z = torch.zeros(2, 20)
    assert not torch.allclose(model.decode(z, torch.tensor([1, 1])), model.decode(z, torch.tensor([7, 7])))
    assert model.decode(torch.zeros(3, 5, 20), y).shape == (3, 5, 784)  # [k, B, J] with y [B]
    with pytest.raises(ValueError):
        model.encode(x)
    assert VAE(VAEConfig()).decode(torch.zeros(2, 20)).shape == (2, 784)


def test_output_bias_init_predicts_the_mean_image():
    model = VAE(VAEConfig())
    mean = torch.rand(784) * 0.9 + 0.05
    model.init_output_bias(mean)
    torch.testing.assert_close(torch.sigmoid(model.dec_logits.bias.detach()), mean)
