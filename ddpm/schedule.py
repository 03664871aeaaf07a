"""Noise schedules: the variances beta_t of the forward process q(x_t | x_{t-1}), and a
distribution over the steps t for training (`lognormal_t_probs`).

Indexing convention (used everywhere in `ddpm`): arrays have length T and index t is
0-based, so `betas[0]` is the paper's beta_1 and `betas[T - 1]` its beta_T. Likewise
`alpha_bar[t]` is the paper's alpha_bar_{t+1}, and "x_t at index t" is the paper's x_{t+1}.
Schedules are built in float64; `GaussianDiffusion` casts them to the data's dtype on use.
"""

from __future__ import annotations

import math

import torch


def cosine_f(u: torch.Tensor, T: int, s: float = 0.008) -> torch.Tensor:
    """f(u) = cos^2( (u/T + s) / (1 + s) * pi/2 ), so that alpha_bar = f(t)/f(0).

    Nichol & Dhariwal 2021, eq. 17 (u is the paper's continuous step, 0 <= u <= T).
    """
    return torch.cos((u / T + s) / (1.0 + s) * (math.pi / 2)) ** 2


def cosine_betas(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """The squared-cosine schedule, float64 [T].

    beta[t] = min(1 - f(t+1)/f(t), max_beta) for 0-based t = 0..T-1, with f from `cosine_f`
    (Nichol & Dhariwal 2021, eq. 17; clipping at 0.999 from their section 3.2, which keeps
    the last step, where f(T) = 0 would give beta = 1, from being singular). The product
    prod_{i<=t} (1 - beta[i]) telescopes to f(t+1)/f(0), the paper's alpha_bar.

    The offset s = 0.008 makes sqrt(beta_1) a little smaller than one pixel bin, 1/127.5,
    so the first step barely perturbs [-1, 1] images (their section 3.2).
    """
    u = torch.arange(T + 1, dtype=torch.float64)
    f = cosine_f(u, T, s)
    betas = 1.0 - f[1:] / f[:-1]
    return betas.clamp(max=max_beta)


def linear_betas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """beta[t] linear from beta_start to beta_end, float64 [T] (Ho et al. 2020, section 4).

    Ho et al. use 1e-4 .. 0.02 with T = 1000; kept here for comparison with the cosine schedule.
    """
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


SCHEDULES = {"cosine": cosine_betas, "linear": linear_betas}


def make_betas(schedule: str, T: int = 1000) -> torch.Tensor:
    """A schedule by its name in SCHEDULES ('cosine' or 'linear'), as configs record it."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {schedule!r} (use {' or '.join(map(repr, SCHEDULES))})")
    return SCHEDULES[schedule](T)


def lognormal_t_probs(sigma: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """P(t) [T], float32, that draws the noise level with ln sigma_t ~ N(mean, std^2) (Karras et
    al. 2022, sec. 5, their P_mean and P_std); sigma [T] increasing, e.g. `GaussianDiffusion.sigma`
    = sqrt((1 - alpha_bar_t) / alpha_bar_t):

        P(t) = Phi((m_t - mean) / std) - Phi((m_{t-1} - mean) / std),

    m_t the midpoint of ln sigma_t and ln sigma_{t+1} (m_{-1} = -inf, m_{T-1} = +inf), Phi the
    standard normal CDF. Training draws t from it instead of uniformly; the loss weights stay
    as they are, so the objective is reweighted by T P(t) (the point: more steps where the
    noise level is middling, fewer where it is almost 0 or almost pure noise).
    """
    log_sigma = torch.as_tensor(sigma, dtype=torch.float64).log()
    mid = (log_sigma[1:] + log_sigma[:-1]) / 2
    cdf = 0.5 * (1.0 + torch.erf((mid - mean) / (std * 2.0**0.5)))
    cdf = torch.cat([cdf.new_zeros(1), cdf, cdf.new_ones(1)])
    return (cdf[1:] - cdf[:-1]).float()
