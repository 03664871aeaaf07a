"""The VAE's objective in nats per image: the ELBO and the importance-weighted bound.

Kingma & Welling 2013, eq. 3: log p(x) >= L(theta, phi; x)
    = -KL( q_phi(z|x) || p(z) ) + E_{q_phi(z|x)}[ log p_theta(x|z) ].
With a Gaussian q and p(z) = N(0, I) the KL is analytic (Appendix B), and the expectation is
estimated with L reparameterized samples (eq. 10, the SGVB estimator B; we use L = 1):
    L~ = -KL + 1/L sum_l log p_theta(x | z_l),  z_l = mu + sigma (.) eps_l.
Burda et al. 2015, eq. 8, tighten it with k importance samples:
    L_k = E[ log 1/k sum_i p(x, z_i) / q(z_i|x) ],  L_1 = L <= L_k <= L_{k+1} <= log p(x).

Every function returns per-example values [B] in nats; means over a data set and the bits/dim
conversion happen at the end (`common.distributions.nats_to_bits_per_dim`).

The decoder p_theta(x|z) is Bernoulli (Kingma & Welling's, on grey levels as soft targets: not
a probability of the data) or a discretized logistic over the 256 levels (Salimans et al. 2017),
whose -ELBO in bits/dim bounds -log2 P(x) of the 8-bit image, as the DDPM's bound does.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from common.distributions import bernoulli_log_prob, normal_log_prob, standard_normal_kl
from common.tensor import sum_flat
from vaegen.model import VAE, reparameterize

LOG_SCALE_MIN = -9.0  # logistic scale >= 1.2e-4: far below a level's width (1/255), never a NaN


class ElboTerms(NamedTuple):
    """Per-example terms of the one-sample ELBO, each [B] in nats."""

    neg_elbo: torch.Tensor  # -L~ = recon_nll + kl
    recon_nll: torch.Tensor  # -log p_theta(x|z), z ~ q_phi(z|x)
    kl: torch.Tensor  # KL(q_phi(z|x) || N(0, I))


def discretized_logistic_log_prob(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    """log P(x) for pixels x on the 256 levels k / 255 of [0, 1] under a logistic(mean, s), elementwise.

    Salimans et al. 2017 (PixelCNN++), eq. 2: each level owns the bin [x - 1/510, x + 1/510] and
    P(x) = sigmoid((x + 1/510 - mean) / s) - sigmoid((x - 1/510 - mean) / s); the edge bins are
    open, (-inf, 1/510] at 0 and [1 - 1/510, inf) at 1, so the 256 probabilities sum to 1.
    The difference is taken in logs, exactly: with a = (x + 1/510 - mean) / s, b = a - 1/(255 s),
        sigmoid(a) - sigmoid(b) = sigmoid(a) sigmoid(-b) (1 - e^{b - a}),
    so a bin far in a tail keeps its (tiny) log-probability instead of underflowing to log 0.
    """
    inv_s = torch.exp(-log_scale.clamp(min=LOG_SCALE_MIN))
    a = (x - mean + 0.5 / 255.0) * inv_s
    b = (x - mean - 0.5 / 255.0) * inv_s
    log_cdf_a = F.logsigmoid(a)  # the edge bin at 0: P(X <= 1/510)
    log_sf_b = F.logsigmoid(-b)  # the edge bin at 1: P(X >= 1 - 1/510)
    log_bin = log_cdf_a + log_sf_b + torch.log(-torch.expm1(-inv_s / 255.0))
    return torch.where(x < 0.5 / 255.0, log_cdf_a, torch.where(x > 1.0 - 0.5 / 255.0, log_sf_b, log_bin))


def decoder_log_prob(decoder: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """log p_theta(x|z) per pixel [..., 784] from the decoder's output (`VAE.decode`) for x [..., 784].

    'bernoulli': x_j log y_j + (1 - x_j) log(1 - y_j), y = sigmoid(logits) (Kingma & Welling 2013,
    Appendix C.1, eq. 11; grey levels as soft targets). 'logistic': `discretized_logistic_log_prob`
    with the first 784 outputs the means and the last 784 the log-scales.
    """
    if decoder == "bernoulli":
        return bernoulli_log_prob(x, out)
    mean, log_scale = out.chunk(2, dim=-1)
    return discretized_logistic_log_prob(x, mean, log_scale)


def reconstruction_nll(x: torch.Tensor, out: torch.Tensor, decoder: str = "bernoulli") -> torch.Tensor:
    """-log p_theta(x|z) = -sum_j log p_theta(x_j|z) (`decoder_log_prob`). x: [B, 784] in [0, 1],
    out: the decoder's output for z ~ q_phi(z|x), [B, 784] (Bernoulli) or [B, 1568] -> [B]."""
    x = x.reshape(*out.shape[:-1], -1)
    return -sum_flat(decoder_log_prob(decoder, x, out))


def kl_to_prior(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL( N(mu, diag(exp(logvar))) || N(0, I) ) = -1/2 sum_j (1 + logvar_j - mu_j^2 - exp(logvar_j)).

    Kingma & Welling 2013, Appendix B (the analytic KL in eq. 10). mu, logvar: [B, J] -> [B].
    """
    return sum_flat(standard_normal_kl(mu, logvar))


def elbo_terms(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, eps: torch.Tensor | None = None
) -> ElboTerms:
    """One-sample SGVB estimate of -L (Kingma & Welling 2013, eq. 10, L = 1), per example.

    x: [B, 784] or [B, 1, 28, 28] in [0, 1]; y: long [B] for the conditional VAE;
    eps: [B, J] standard normal noise (drawn from the global RNG if None). `model` may be a
    VAE wrapped in DistributedDataParallel: everything goes through its forward().
    """
    x = x.reshape(x.shape[0], -1)
    out, mu, logvar = model(x, y, eps)
    decoder = getattr(model, "module", model).config.decoder  # DDP keeps the VAE as .module
    recon = reconstruction_nll(x, out, decoder)
    kl = kl_to_prior(mu, logvar)
    return ElboTerms(recon + kl, recon, kl)


def log_importance_weights(
    model: VAE,
    x: torch.Tensor,
    y: torch.Tensor | None,
    k: int,
    chunk: int = 100,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """log w_i = log p_theta(x|z_i) + log p(z_i) - log q_phi(z_i|x), z_i ~ q_phi(z|x), i = 1..k.

    Burda et al. 2015, eq. 8 (the unnormalised importance weights). x: [B, 784] -> [k, B].
    The encoder runs once; the decoder runs on `chunk` samples at a time ([chunk, B, 784]
    logits), so k = 1000 over the test set fits in memory.
    """
    x = x.reshape(x.shape[0], -1)
    mu, logvar = model.encode(x, y)
    zeros = torch.zeros_like(mu)
    out = []
    for start in range(0, k, chunk):
        c = min(chunk, k - start)
        eps = torch.randn((c, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
        z = reparameterize(mu, logvar, eps)  # [c, B, J]
        params = model.decode(z, y)  # [c, B, 784] (Bernoulli) or [c, B, 1568] (logistic)
        log_px_z = decoder_log_prob(model.config.decoder, x.expand(c, *x.shape), params).sum(-1)
        log_pz = normal_log_prob(z, zeros, zeros).sum(-1)
        log_qz_x = normal_log_prob(z, mu, logvar).sum(-1)
        out.append(log_px_z + log_pz - log_qz_x)
    return torch.cat(out, dim=0)


def iwae_bound(
    model: VAE,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    k: int = 1000,
    chunk: int = 100,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """L_k = log (1/k) sum_i w_i = logsumexp_i(log w_i) - log k (Burda et al. 2015, eq. 8), [B] nats.

    A lower bound on log p(x) that tightens as k grows; k = 1 is the ELBO (in expectation).
    """
    log_w = log_importance_weights(model, x, y, k, chunk, generator)
    return torch.logsumexp(log_w, dim=0) - math.log(k)


@torch.no_grad()
def evaluate_bounds(
    model: VAE,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    k: int = 0,
    batch_size: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Mean bounds over a data set, in nats per image.

    x: float [N, 784] in [0, 1] on the model's device; y: long [N] or None. Returns the
    one-sample negative ELBO and its terms (fixed noise `seed`, so epochs compare fairly)
    and, if k > 0, the negative IWAE bound -L_k.
    """
    was_training = model.training
    model.eval()
    g = torch.Generator(device=x.device).manual_seed(seed)
    sums = {"neg_elbo": 0.0, "recon_nll": 0.0, "kl": 0.0}
    if k > 0:
        sums[f"neg_iwae_k{k}"] = 0.0
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size]
        yb = None if y is None else y[start : start + batch_size]
        eps = torch.randn((xb.shape[0], model.config.latent_dim), generator=g, device=x.device)
        terms = elbo_terms(model, xb, yb, eps)
        sums["neg_elbo"] += terms.neg_elbo.sum().item()
        sums["recon_nll"] += terms.recon_nll.sum().item()
        sums["kl"] += terms.kl.sum().item()
        if k > 0:
            sums[f"neg_iwae_k{k}"] -= iwae_bound(model, xb, yb, k, generator=g).sum().item()
    model.train(was_training)
    return {name: total / x.shape[0] for name, total in sums.items()}
