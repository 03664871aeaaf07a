"""The variational bound on -log p(x0) of a diffusion model (Ho et al. 2020, eq. 5), in bits/dim:

    L = L_T + sum_{t>=1} L_{t-1} + L_0                  (the paper's 1-based steps)
    prior     L_T     = KL(q(x_T | x0) || N(0, I))                              `prior_kl`
    terms     L_{t-1} = KL(q(x_{t-1} | xt, x0) || p(x_{t-1} | xt))              `vlb_term`, t >= 1
    decoder   L_0     = -log p(x0 | x1), a discretized Gaussian over 256 levels `vlb_term`, t = 0

`vlb_bits_per_dim` sums all T + 1 terms (T model passes per image); `vlb_estimate` samples the
sum over t in strata (k + 1 passes per image), which is what `ddpm.likelihood` measures test sets
with. Index t is 0-based as in `ddpm.diffusion`: t = 0 is the paper's step 1, so the 0-based
step t carries L_{t-1} for t >= 1 and the decoder L_0 at t = 0.
"""

from __future__ import annotations

import math

import torch

from common.distributions import discretized_gaussian_log_likelihood, nats_to_bits_per_dim, normal_kl
from common.tensor import randn, sum_flat
from ddpm.diffusion import EpsModel, GaussianDiffusion


def vlb_term(
    diffusion: GaussianDiffusion,
    eps_model: EpsModel,
    x0: torch.Tensor,
    y: torch.Tensor | None,
    t: torch.Tensor,
    eps: torch.Tensor,
    clip: bool = True,
) -> torch.Tensor:
    """One term of the bound per image at its own 0-based step t, nats [B]:

        t >= 1:  L_{t-1} = KL(q(x_{t-1} | xt, x0) || p(x_{t-1} | xt)), with xt = q_sample(x0, t, eps)
                 (a one-sample estimate over xt; both Gaussians share beta_tilde, so it is
                 ||mu_tilde - mu_theta||^2 / (2 beta_tilde), summed over pixels)
        t = 0:   L_0 = -log p(x0 | x1), the discretized Gaussian of Ho et al. 2020, section 3.3 /
                 eq. 13, with mean mu_theta and the clipped log-variance of the first step.

    x0 [B, C, H, W] in [-1, 1] (on the 256-level grid for L_0 to be a likelihood), t long [B].
    """
    xt = diffusion.q_sample(x0, t, eps)
    model_mean, _, model_log_var, _ = diffusion.p_mean_variance(eps_model(xt, t, y), t, xt, clip)
    true_mean, _, true_log_var = diffusion.q_posterior(x0, xt, t)
    kl = sum_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var))
    decoder = -sum_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var))
    return torch.where(t == 0, decoder, kl)


def prior_kl(diffusion: GaussianDiffusion, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x0) || N(0, I)) per image, nats [B]: the bound's prior term, in closed form."""
    a_T = diffusion.alpha_bar[-1].item()
    mean = math.sqrt(a_T) * x0
    log_var = torch.full_like(x0, math.log1p(-a_T))
    return sum_flat(normal_kl(mean, log_var, 0.0, 0.0))


@torch.no_grad()
def vlb_bits_per_dim(
    diffusion: GaussianDiffusion,
    eps_model: EpsModel,
    x0: torch.Tensor,
    y: torch.Tensor | None,
    t_batch: int | None = None,
    generator: torch.Generator | None = None,
    clip: bool = True,
) -> dict[str, torch.Tensor]:
    """The bound per image in bits per dimension, with every one of its T + 1 terms.

    Returns 'prior' [B], 'decoder' [B], 'terms' [B, T] with terms[:, t] the contribution of
    0-based step t, i.e. the KL term for t >= 1 and the decoder at t = 0 (terms[:, 0] ==
    decoder), and 'total' [B] = prior + terms.sum(1).

    All T steps cost T model evaluations of batch B; they run in chunks of `t_batch` steps per
    call (batch t_batch * B; default: as many as fit in a batch of about 512).
    """
    B, dims, T = x0.shape[0], x0[0].numel(), diffusion.T
    t_batch = max(1, min(int(t_batch or max(1, 512 // B)), T))
    terms = torch.empty(B, T, dtype=x0.dtype, device=x0.device)
    for start in range(0, T, t_batch):
        n = min(t_batch, T - start)
        t = torch.arange(start, start + n, device=x0.device).repeat_interleave(B)  # t0 x B, t1 x B, ...
        x0_rep = x0.repeat(n, *([1] * (x0.dim() - 1)))
        y_rep = None if y is None else y.repeat(n)
        eps = randn(x0_rep.shape, generator, x0.device, x0.dtype)
        nats = vlb_term(diffusion, eps_model, x0_rep, y_rep, t, eps, clip)
        terms[:, start : start + n] = nats_to_bits_per_dim(nats, dims).view(n, B).T
    prior = nats_to_bits_per_dim(prior_kl(diffusion, x0), dims)
    return {"total": prior + terms.sum(dim=1), "prior": prior, "terms": terms, "decoder": terms[:, 0].clone()}


def strata(T: int, k: int) -> torch.Tensor:
    """The edges of k strata over the KL steps 1..T-1, spaced geometrically: long [k + 1], from 1
    to T, strictly increasing; stratum j holds the steps edges[j] <= t < edges[j + 1].

    The KL terms fall steeply with t (most of the bound sits in the first few steps), so the
    strata are single steps at low t and widen towards T: each then holds terms of similar
    size, and sampling one t per stratum adds little variance (docs/experiments.md).
    """
    if not 1 <= k <= T - 1:
        raise ValueError(f"the number of t-strata must be in 1..{T - 1}, got {k}")
    edges = torch.logspace(0, math.log10(T), k + 1, dtype=torch.float64).round().long().tolist()
    edges[0] = 1
    for j in range(1, k + 1):  # strictly increasing from the bottom ...
        edges[j] = max(edges[j], edges[j - 1] + 1)
    edges[-1] = T
    for j in range(k - 1, 0, -1):  # ... and ending at T
        edges[j] = min(edges[j], edges[j + 1] - 1)
    return torch.tensor(edges, dtype=torch.long)


@torch.no_grad()
def vlb_estimate(
    diffusion: GaussianDiffusion,
    eps_model: EpsModel,
    x0: torch.Tensor,
    y: torch.Tensor | None,
    k: int,
    generator: torch.Generator | None = None,
    clip: bool = True,
) -> dict[str, torch.Tensor]:
    """An unbiased estimate of `vlb_bits_per_dim`'s total per image from k + 1 model passes, in
    bits/dim: the sum over t sampled, as Nichol & Dhariwal 2021 (section 3.3) do, in strata:

        L = L_T + L_0 + sum_{j=1..k} n_j L_{t_j - 1},   t_j ~ Uniform(stratum j),

    over k strata of the steps 1..T-1 (`strata`; n_j steps in stratum j), one t and one xt per
    stratum and image: E[n_j L_{t_j - 1}] is the stratum's sum, so the estimate is unbiased for
    any strata. k = T - 1 visits every step. The decoder L_0 and the prior L_T are computed
    exactly. Returns 'total', 'prior', 'decoder' and 'terms' (the estimated sum of the KL
    terms), each [B] in bits/dim. All k + 1 steps of all B images go through the model in one
    call of batch (k + 1) B.
    """
    B, dims = x0.shape[0], x0[0].numel()
    edges = strata(diffusion.T, k).to(x0.device)
    sizes = edges[1:] - edges[:-1]  # n_j [k]
    g_device = generator.device if generator is not None else x0.device
    u = torch.rand((k, B), generator=generator, device=g_device, dtype=torch.float64).to(x0.device)
    t_kl = edges[:-1, None] + (u * sizes[:, None]).long()  # [k, B], one step in each stratum
    t = torch.cat([torch.zeros(1, B, dtype=torch.long, device=x0.device), t_kl]).reshape(-1)
    x0_rep = x0.repeat(k + 1, *([1] * (x0.dim() - 1)))
    y_rep = None if y is None else y.repeat(k + 1)
    eps = randn(x0_rep.shape, generator, x0.device, x0.dtype)
    nats = vlb_term(diffusion, eps_model, x0_rep, y_rep, t, eps, clip).view(k + 1, B)
    decoder = nats_to_bits_per_dim(nats[0], dims)
    terms = nats_to_bits_per_dim((sizes[:, None].to(x0.dtype) * nats[1:]).sum(0), dims)
    prior = nats_to_bits_per_dim(prior_kl(diffusion, x0), dims)
    return {"total": prior + decoder + terms, "prior": prior, "decoder": decoder, "terms": terms}
