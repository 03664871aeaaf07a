"""Log-likelihoods and KL divergences shared by the VAE's ELBO and the DDPM's bound.

Every function is elementwise (same shape in, same shape out) and in nats; reduce with
`common.tensor.sum_flat` and convert with `nats_to_bits_per_dim` at the end.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """KL( N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)) ), elementwise, in nats.

    KL = 1/2 [ logvar2 - logvar1 + (exp(logvar1) + (mean1 - mean2)^2) / exp(logvar2) - 1 ]
    (the Gaussian KL used by Ho et al. 2020, eq. 5, for the bound's L_{t-1} terms).
    """
    # Either side may be a plain float (e.g. the N(0, I) prior); make it a tensor.
    like = next(v for v in (mean1, logvar1, mean2, logvar2) if torch.is_tensor(v))
    mean1, logvar1, mean2, logvar2 = (
        torch.as_tensor(v, dtype=like.dtype, device=like.device)
        for v in (mean1, logvar1, mean2, logvar2)
    )
    return 0.5 * (
        logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0
    )


def standard_normal_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL( N(mean, exp(logvar)) || N(0, 1) ) = -1/2 (1 + logvar - mean^2 - exp(logvar)).

    Kingma & Welling 2013, Appendix B (the VAE's regulariser, per latent dimension).
    """
    return -0.5 * (1.0 + logvar - mean**2 - torch.exp(logvar))


def normal_log_prob(x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, exp(logvar)) = -1/2 [ log(2 pi) + logvar + (x - mean)^2 / exp(logvar) ], elementwise.

    The Gaussian density of Kingma & Welling 2013, Appendix C.2 (log q_phi(z|x), log p(z));
    the importance weights of Burda et al. 2015, eq. 8, need it as a density, not a KL.
    """
    return -0.5 * (math.log(2.0 * math.pi) + logvar + (x - mean) ** 2 * torch.exp(-logvar))


def bernoulli_log_prob(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """log Bernoulli(x; sigmoid(logits)) = x log p + (1 - x) log(1 - p), elementwise.

    x in [0, 1] (grey levels act as soft targets, as in Kingma & Welling 2013, Appendix C.1).
    Computed from logits for stability: it equals -binary_cross_entropy_with_logits.
    """
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none")


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    """log P(x) for pixels x in [-1, 1] on 256 levels under N(mean, exp(log_scale)^2).

    Ho et al. 2020, eq. 13: each level k owns the bin [x - 1/255, x + 1/255]; the edge bins
    are open, (-inf, -1 + 1/255] and [1 - 1/255, inf), so the 256 probabilities sum to 1.
    """
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + 1.0 / 255.0)
    lower = inv_std * (x - mean - 1.0 / 255.0)
    log_cdf_upper = torch.special.log_ndtr(upper)          # edge bin at -1: P(X <= upper)
    log_sf_lower = torch.special.log_ndtr(-lower)          # edge bin at +1: P(X >= lower)
    mass = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12)
    return torch.where(
        x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, torch.log(mass))
    )


def nats_to_bits_per_dim(nats: torch.Tensor | float, dims: int) -> torch.Tensor | float:
    """Convert a per-image negative log-likelihood in nats to bits per dimension."""
    return nats / (dims * math.log(2.0))
