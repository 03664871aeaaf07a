"""Gaussian diffusion, the process itself: forward process, posterior, reverse steps, loss, bound.

Notation follows Ho et al. 2020 ("Denoising Diffusion Probabilistic Models"): betas,
alphas = 1 - betas, alpha_bar = prod alphas, x0 the data, xt the noised data at step t,
eps the standard normal noise, and the model is any callable
`eps_model(xt, t, y) -> eps_pred` (xt [B, C, H, W], t long [B], y long [B] or None); guidance
(`ddpm.samplers.Denoiser`) also reads its `null_label`, the "no label" class.
Index t is 0-based: t = 0 is the paper's step 1 (see `ddpm.schedule`), and `t_prev = -1`
stands for "x0 itself" (alpha_bar = 1).

Schedule arrays are float64, built once; every method casts what it needs to the input's
dtype and device (cached), so the same object serves float32 training on a GPU and float64
tests on the CPU. The loops that chain the reverse steps into samplers are in `ddpm.samplers`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from common.distributions import discretized_gaussian_log_likelihood, nats_to_bits_per_dim, normal_kl
from common.tensor import extract, mean_flat, randn, sum_flat

EpsModel = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class GaussianDiffusion:
    """The diffusion process of Ho et al. 2020 for a given beta schedule (float64 [T]).

    Precomputed (float64, length T, 0-based t):
      alphas                 = 1 - betas
      alpha_bar[t]           = prod_{i <= t} alphas[i]
      alpha_bar_prev[t]      = alpha_bar[t - 1], and 1 at t = 0
      snr[t]                 = alpha_bar / (1 - alpha_bar), the signal-to-noise ratio of xt
      sigma[t]               = sqrt((1 - alpha_bar) / alpha_bar) = 1 / sqrt(snr): the noise level of
                               xt / sqrt(alpha_bar_t) = x0 + sigma_t eps (Karras et al. 2022's sigma)
      posterior_variance     = beta_tilde = (1 - alpha_bar_prev) / (1 - alpha_bar) * betas  (Ho eq. 7)
      posterior_log_variance_clipped: log beta_tilde with the t = 0 entry (which is 0)
                               replaced by beta_tilde[1], so the log stays finite
      posterior_mean_coef_x0 = sqrt(alpha_bar_prev) betas / (1 - alpha_bar)                (Ho eq. 7)
      posterior_mean_coef_xt = sqrt(alphas) (1 - alpha_bar_prev) / (1 - alpha_bar)         (Ho eq. 7)
    """

    def __init__(self, betas: torch.Tensor) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if betas.dim() != 1 or len(betas) < 2:
            raise ValueError(f"betas must be a 1-D schedule of length >= 2, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must lie in (0, 1)")
        self.T = len(betas)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alpha_bar = torch.cumprod(self.alphas, dim=0)
        self.alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])
        # q(xt | x0) and its inverse (Ho eq. 4).
        self.sqrt_alpha_bar = self.alpha_bar.sqrt()
        self.sqrt_one_minus_alpha_bar = (1.0 - self.alpha_bar).sqrt()
        self.sqrt_recip_alpha_bar = self.alpha_bar.rsqrt()
        self.sqrt_recipm1_alpha_bar = (1.0 / self.alpha_bar - 1.0).sqrt()
        self.snr = self.alpha_bar / (1.0 - self.alpha_bar)
        self.sigma = self.sqrt_recipm1_alpha_bar  # the same numbers, named as a noise level
        # q(x_{t-1} | xt, x0) (Ho eq. 6-7).
        one_minus_ab = 1.0 - self.alpha_bar
        self.posterior_variance = betas * (1.0 - self.alpha_bar_prev) / one_minus_ab
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef_x0 = betas * self.alpha_bar_prev.sqrt() / one_minus_ab
        self.posterior_mean_coef_xt = self.alphas.sqrt() * (1.0 - self.alpha_bar_prev) / one_minus_ab
        self._cast: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    # ------------------------------------------------------------------ helpers
    def _coef(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The float64 array `name`, cast to `like`'s dtype and device (once, then cached)."""
        key = (name, like.dtype, like.device)
        a = self._cast.get(key)
        if a is None:
            a = getattr(self, name).to(dtype=like.dtype, device=like.device)
            self._cast[key] = a
        return a

    def _at(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`name[t]` per example, shaped [B, 1, ...] to broadcast against x."""
        return extract(self._coef(name, x), t, x.shape)

    @staticmethod
    def _as_t(t: torch.Tensor | int, x: torch.Tensor) -> torch.Tensor:
        """Accept an int for 'the same step for the whole batch'."""
        if isinstance(t, int):
            return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        return t

    # ---------------------------------------------------------- forward process
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor) -> torch.Tensor:
        """Draw xt ~ q(xt | x0) = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I) (Ho et al. 2020, eq. 4):

        xt = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps,  eps ~ N(0, I).
        """
        t = self._as_t(t, x0)
        return self._at("sqrt_alpha_bar", t, x0) * x0 + self._at("sqrt_one_minus_alpha_bar", t, x0) * eps

    def q_step(self, x_prev: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor) -> torch.Tensor:
        """One forward step x_t ~ q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) (Ho et al. 2020,
        eq. 2): x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) noise (x_{t-1} is x0 at t = 0)."""
        t = self._as_t(t, x_prev)
        return self._at("alphas", t, x_prev).sqrt() * x_prev + self._at("betas", t, x_prev).sqrt() * noise

    def predict_x0(self, xt: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor) -> torch.Tensor:
        """Invert eq. 4 for x0 (Ho et al. 2020, eq. 15):

        x0 = (xt - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
           = sqrt(1/alpha_bar_t) xt - sqrt(1/alpha_bar_t - 1) eps.
        """
        t = self._as_t(t, xt)
        return self._at("sqrt_recip_alpha_bar", t, xt) * xt - self._at("sqrt_recipm1_alpha_bar", t, xt) * eps

    def predict_eps(self, xt: torch.Tensor, t: torch.Tensor | int, x0: torch.Tensor) -> torch.Tensor:
        """Invert eq. 4 for eps: eps = (xt - sqrt(alpha_bar_t) x0) / sqrt(1 - alpha_bar_t)."""
        t = self._as_t(t, xt)
        return (self._at("sqrt_recip_alpha_bar", t, xt) * xt - x0) / self._at("sqrt_recipm1_alpha_bar", t, xt)

    def eps_from_v(self, xt: torch.Tensor, t: torch.Tensor | int, v: torch.Tensor) -> torch.Tensor:
        """eps from the velocity v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0 (Salimans & Ho
        2022, sec. 4): with eq. 4, eps = sqrt(alpha_bar_t) v + sqrt(1 - alpha_bar_t) xt."""
        t = self._as_t(t, xt)
        return self._at("sqrt_alpha_bar", t, xt) * v + self._at("sqrt_one_minus_alpha_bar", t, xt) * xt

    def q_posterior(
        self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor | int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_{t-1} | xt, x0) = N(mu_tilde, beta_tilde I) (Ho et al. 2020, eq. 6-7):

        mu_tilde   = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x0
                     + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) xt
        beta_tilde = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t

        Returns (mean [like x0], variance [B, 1, ...], log_variance [B, 1, ...]); the variance
        is 0 at t = 0 and the log-variance is the clipped one (see the class docstring).
        """
        t = self._as_t(t, xt)
        mean = self._at("posterior_mean_coef_x0", t, xt) * x0 + self._at("posterior_mean_coef_xt", t, xt) * xt
        return (
            mean,
            self._at("posterior_variance", t, xt),
            self._at("posterior_log_variance_clipped", t, xt),
        )

    # ----------------------------------------------------------- reverse process
    def p_mean_variance(
        self, eps_pred: torch.Tensor, t: torch.Tensor | int, xt: torch.Tensor, clip: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """p(x_{t-1} | xt) = N(mu_theta, beta_tilde I), the 'fixed small' variance (Ho et al. 2020, sec. 3.2).

        mu_theta = mu_tilde(x0_hat, xt) with x0_hat = predict_x0(xt, t, eps_pred), clipped to
        [-1, 1] when `clip`. Unclipped this equals Ho eq. 11,
        mu_theta = (xt - beta_t / sqrt(1 - alpha_bar_t) eps_pred) / sqrt(alpha_t).
        Returns (mean, variance, log_variance, x0_hat).
        """
        t = self._as_t(t, xt)
        x0_hat = self.predict_x0(xt, t, eps_pred)
        if clip:
            x0_hat = x0_hat.clamp(-1.0, 1.0)
        mean, var, log_var = self.q_posterior(x0_hat, xt, t)
        return mean, var, log_var, x0_hat

    def p_step(
        self,
        eps_pred: torch.Tensor,
        t: torch.Tensor | int,
        xt: torch.Tensor,
        noise: torch.Tensor | None = None,
        clip: bool = True,
    ) -> torch.Tensor:
        """One ancestral step x_{t-1} = mu_theta(xt, t) + sqrt(beta_tilde_t) z (Ho et al. 2020, Algorithm 2).

        mu_theta from `p_mean_variance`; z = `noise` (drawn with randn_like if None). No noise
        is added at t = 0, where beta_tilde = 0: the last step returns the (clipped) x0_hat.
        """
        t = self._as_t(t, xt)
        mean, var, _, _ = self.p_mean_variance(eps_pred, t, xt, clip)
        if not bool((t != 0).any()):
            return mean  # the last step: nothing to add, and no noise drawn
        if noise is None:
            noise = torch.randn_like(xt)
        nonzero = (t != 0).to(xt.dtype).reshape(-1, *([1] * (xt.dim() - 1)))
        return mean + nonzero * var.sqrt() * noise

    def _alpha_bar_at(self, t: torch.Tensor | int, x: torch.Tensor) -> torch.Tensor:
        """alpha_bar[t] shaped [B, 1, ...], with alpha_bar = 1 where t = -1 (i.e. at x0)."""
        t = self._as_t(t, x)
        ab = self._at("alpha_bar", t.clamp(min=0), x)
        return torch.where((t >= 0).reshape(ab.shape), ab, torch.ones_like(ab))

    def ddim_step(
        self,
        eps_pred: torch.Tensor,
        t: torch.Tensor | int,
        t_prev: torch.Tensor | int,
        xt: torch.Tensor,
        eta: float = 0.0,
        noise: torch.Tensor | None = None,
        clip: bool = True,
    ) -> torch.Tensor:
        """One DDIM step from step t to an earlier step t_prev (Song et al. 2021, eq. 12 and 16).

        With a_t = alpha_bar_t, a_s = alpha_bar_{t_prev} (a_s = 1 when t_prev = -1):
            x0_hat = (xt - sqrt(1 - a_t) eps) / sqrt(a_t)                            (clipped if `clip`)
            sigma  = eta sqrt((1 - a_s) / (1 - a_t)) sqrt(1 - a_t / a_s)            (eq. 16)
            x_s    = sqrt(a_s) x0_hat + sqrt(1 - a_s - sigma^2) eps + sigma z      (eq. 12)
        When x0_hat was clipped, eps is recomputed from it (so that x_s is consistent with the
        clipped prediction). eta = 0 is deterministic; eta = 1 is the DDPM ancestral step.
        """
        t = self._as_t(t, xt)
        a_t = self._alpha_bar_at(t, xt)
        a_s = self._alpha_bar_at(t_prev, xt)
        x0_hat = self.predict_x0(xt, t, eps_pred)
        eps = eps_pred
        if clip:
            x0_hat = x0_hat.clamp(-1.0, 1.0)
            eps = self.predict_eps(xt, t, x0_hat)
        sigma = eta * ((1.0 - a_s) / (1.0 - a_t) * (1.0 - a_t / a_s)).sqrt()
        x_prev = a_s.sqrt() * x0_hat + (1.0 - a_s - sigma**2).clamp(min=0.0).sqrt() * eps
        if eta > 0 and bool((sigma > 0).any()):  # into x0 (t_prev = -1) sigma is 0: no noise drawn
            if noise is None:
                noise = torch.randn_like(xt)
            x_prev = x_prev + sigma * noise
        return x_prev

    def respace(self, ts: torch.Tensor) -> GaussianDiffusion:
        """The same process seen only at the steps `ts` (long, any order): a GaussianDiffusion of
        length S whose step i is the model's step sorted(ts)[i] (Nichol & Dhariwal 2021, section 4).

        Its betas, beta'_i = 1 - alpha_bar_{t_i} / alpha_bar_{t_{i-1}} (alpha_bar = 1 before the
        first), keep alpha_bar_{t_i} at every kept step, so its posterior q(x_{t_{i-1}} | x_{t_i}, x0)
        is the ancestral step between two visited steps. Visiting every t gives the process back.
        """
        a = self.alpha_bar[torch.as_tensor(ts).long().sort().values.cpu()]
        return GaussianDiffusion(1.0 - a / torch.cat([a.new_ones(1), a[:-1]]))

    # -------------------------------------------------------------- objectives
    def loss(
        self,
        eps_model: EpsModel,
        x0: torch.Tensor,
        y: torch.Tensor | None,
        generator: torch.Generator | None = None,
        reduction: str = "mean",
        snr_gamma: float | None = None,
    ) -> torch.Tensor:
        """The training objective at random t and eps (Ho et al. 2020, Algorithm 1, lines 3-5):

            t ~ Uniform{0..T-1},  eps ~ N(0, I),  xt = q_sample(x0, t, eps),  `eps_loss`.

        x0 [B, C, H, W] in [-1, 1]; reduction 'mean' gives the scalar batch mean, 'none' the
        per-example values [B]. `ddpm.train.train_step` writes the same lines out.
        """
        B = x0.shape[0]
        g_device = generator.device if generator is not None else x0.device
        t = torch.randint(0, self.T, (B,), generator=generator, device=g_device).to(x0.device)
        eps = randn(x0.shape, generator, x0.device, x0.dtype)
        per_example = self.eps_loss(eps_model(self.q_sample(x0, t, eps), t, y), eps, t, snr_gamma)
        if reduction == "mean":
            return per_example.mean()
        if reduction == "none":
            return per_example
        raise ValueError(f"unknown reduction {reduction!r} (use 'mean' or 'none')")

    def eps_loss(
        self, eps_pred: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, snr_gamma: float | None = None
    ) -> torch.Tensor:
        """Per-example weighted noise-prediction error, averaged over pixels: [B, ...] -> [B]

            w_t || eps - eps_theta(xt, t) ||^2 / d,   w_t = min(SNR_t, gamma) / SNR_t

        Without `snr_gamma` (None or 0) w_t = 1: L_simple, Ho et al. 2020 eq. 14 (eq. 12 without its
        weights). With it, the Min-SNR weighting of Hang et al. 2023 (eq. 9, written for
        eps-prediction), SNR_t = alpha_bar_t / (1 - alpha_bar_t): the nearly clean steps, whose eps
        is hard to predict and matters little for samples, count less. The project trains with
        gamma = 5.
        """
        per_example = mean_flat((eps - eps_pred) ** 2)
        if snr_gamma:  # None or 0: unweighted (a weight of min(SNR, 0) would zero every term)
            per_example = per_example * self.min_snr_weight(t, snr_gamma).to(per_example.dtype)
        return per_example

    def min_snr_weight(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """min(SNR_t, gamma) / SNR_t per example [B] (Hang et al. 2023); 1 where SNR_t <= gamma."""
        snr = self._coef("snr", torch.empty(0, device=t.device))[t]  # float32: MPS has no float64
        return snr.clamp(max=gamma) / snr

    def vlb_term(
        self,
        eps_model: EpsModel,
        x0: torch.Tensor,
        y: torch.Tensor | None,
        t: torch.Tensor,
        eps: torch.Tensor,
        clip: bool = True,
    ) -> torch.Tensor:
        """One term of the bound (Ho et al. 2020, eq. 5) per image at its own 0-based step t, nats [B]:

            t >= 1:  L_{t-1} = KL(q(x_{t-1} | xt, x0) || p(x_{t-1} | xt)), with xt = q_sample(x0, t, eps)
                     (a one-sample estimate over xt; both Gaussians share beta_tilde, so it is
                     ||mu_tilde - mu_theta||^2 / (2 beta_tilde), summed over pixels)
            t = 0:   L_0 = -log p(x0 | x1), the discretized Gaussian of Ho et al. 2020, section 3.3 /
                     eq. 13, with mean mu_theta and the clipped log-variance of the first step.

        x0 [B, C, H, W] in [-1, 1] (on the 256-level grid for L_0 to be a likelihood), t long [B].
        """
        xt = self.q_sample(x0, t, eps)
        model_mean, _, model_log_var, _ = self.p_mean_variance(eps_model(xt, t, y), t, xt, clip)
        true_mean, _, true_log_var = self.q_posterior(x0, xt, t)
        kl = sum_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var))
        decoder = -sum_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var))
        return torch.where(t == 0, decoder, kl)

    def prior_kl(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x0) || N(0, I)) per image, nats [B]: the bound's prior term, in closed form."""
        t_last = torch.full((x0.shape[0],), self.T - 1, dtype=torch.long, device=x0.device)
        mean = self._at("sqrt_alpha_bar", t_last, x0) * x0
        log_var = torch.log1p(-self._at("alpha_bar", t_last, x0)).expand_as(x0)
        return sum_flat(normal_kl(mean, log_var, 0.0, 0.0))

    @torch.no_grad()
    def vlb_bits_per_dim(
        self,
        eps_model: EpsModel,
        x0: torch.Tensor,
        y: torch.Tensor | None,
        t_batch: int | None = None,
        generator: torch.Generator | None = None,
        clip: bool = True,
    ) -> dict[str, torch.Tensor]:
        """The variational bound on -log p(x0) (Ho et al. 2020, eq. 5), per image, in bits/dim,
        with every one of its T + 1 terms (`vlb_term`, `prior_kl`):

            L = L_T + sum_{t>=1} L_{t-1} + L_0                  (paper's 1-based steps)

        Returns a dict of tensors in bits per dimension: 'prior' [B], 'decoder' [B],
        'terms' [B, T] with terms[:, t] the contribution of 0-based step t, i.e. the KL term
        for t >= 1 and the decoder at t = 0 (terms[:, 0] == decoder), and
        'total' [B] = prior + terms.sum(1).

        All T steps cost T model evaluations of batch B; they run in chunks of `t_batch` steps
        per call (batch t_batch * B; default: as many as fit in a batch of about 512).
        `vlb_estimate` samples the steps instead, for many images at a few passes each.
        """
        B = x0.shape[0]
        dims = x0[0].numel()
        if t_batch is None:
            t_batch = max(1, 512 // B)
        t_batch = max(1, min(int(t_batch), self.T))
        terms = torch.empty(B, self.T, dtype=x0.dtype, device=x0.device)
        for start in range(0, self.T, t_batch):
            n = min(t_batch, self.T - start)
            t = torch.arange(start, start + n, device=x0.device).repeat_interleave(B)  # t0 x B, t1 x B, ...
            x0_rep = x0.repeat(n, *([1] * (x0.dim() - 1)))
            y_rep = None if y is None else y.repeat(n)
            eps = randn(x0_rep.shape, generator, x0.device, x0.dtype)
            nats = self.vlb_term(eps_model, x0_rep, y_rep, t, eps, clip)
            terms[:, start : start + n] = nats_to_bits_per_dim(nats, dims).view(n, B).T
        prior = nats_to_bits_per_dim(self.prior_kl(x0), dims)
        return {
            "total": prior + terms.sum(dim=1),
            "prior": prior,
            "terms": terms,
            "decoder": terms[:, 0].clone(),
        }

    def strata(self, k: int) -> torch.Tensor:
        """The edges of k strata over the KL steps 1..T-1, spaced geometrically: long [k + 1], from 1
        to T, strictly increasing; stratum j holds the steps edges[j] <= t < edges[j + 1].

        The KL terms fall steeply with t (most of the bound sits in the first few steps), so the
        strata are single steps at low t and widen towards T: each then holds terms of similar
        size, and sampling one t per stratum adds little variance (docs/experiments.md).
        """
        if not 1 <= k <= self.T - 1:
            raise ValueError(f"the number of t-strata must be in 1..{self.T - 1}, got {k}")
        edges = torch.logspace(0, math.log10(self.T), k + 1, dtype=torch.float64).round().long().tolist()
        edges[0], edges[-1] = 1, self.T
        for j in range(1, k + 1):  # strictly increasing from the bottom ...
            edges[j] = max(edges[j], edges[j - 1] + 1)
        edges[-1] = self.T
        for j in range(k - 1, 0, -1):  # ... and ending at T
            edges[j] = min(edges[j], edges[j + 1] - 1)
        return torch.tensor(edges, dtype=torch.long)

    @torch.no_grad()
    def vlb_estimate(
        self,
        eps_model: EpsModel,
        x0: torch.Tensor,
        y: torch.Tensor | None,
        k: int,
        generator: torch.Generator | None = None,
        clip: bool = True,
    ) -> dict[str, torch.Tensor]:
        """An unbiased estimate of the bound of `vlb_bits_per_dim` per image from k + 1 model passes,
        in bits/dim: the sum over t sampled as Nichol & Dhariwal 2021 (section 3.3) do, stratified.

            L = L_T + L_0 + sum_{j=1..k} n_j L_{t_j - 1},   t_j ~ Uniform(stratum j),

        over k strata of the steps 1..T-1 (`strata`; n_j steps in stratum j), one t and one xt per
        stratum and image: E[n_j L_{t_j - 1}] is the stratum's sum, so the estimate is unbiased
        for any strata. k = T - 1 visits every step.
        The decoder L_0 and the prior L_T are computed exactly. Returns 'total', 'prior',
        'decoder' and 'terms' (the estimated sum of the KL terms), each [B] in bits/dim.
        All k + 1 steps of all B images go through the model in one call of batch (k + 1) B.
        """
        B, dims = x0.shape[0], x0[0].numel()
        edges = self.strata(k).to(x0.device)
        sizes = (edges[1:] - edges[:-1]).to(x0.dtype)  # n_j [k]
        g_device = generator.device if generator is not None else x0.device
        u = torch.rand((k, B), generator=generator, device=g_device, dtype=torch.float64).to(x0.device)
        t_kl = edges[:-1, None] + (u * sizes[:, None].double()).long()  # [k, B], in each stratum
        t = torch.cat([torch.zeros(1, B, dtype=torch.long, device=x0.device), t_kl]).reshape(-1)
        x0_rep = x0.repeat(k + 1, *([1] * (x0.dim() - 1)))
        y_rep = None if y is None else y.repeat(k + 1)
        eps = randn(x0_rep.shape, generator, x0.device, x0.dtype)
        nats = self.vlb_term(eps_model, x0_rep, y_rep, t, eps, clip).view(k + 1, B)
        decoder = nats_to_bits_per_dim(nats[0], dims)
        terms = nats_to_bits_per_dim((sizes[:, None] * nats[1:]).sum(0), dims)
        prior = nats_to_bits_per_dim(self.prior_kl(x0), dims)
        return {"total": prior + decoder + terms, "prior": prior, "decoder": decoder, "terms": terms}
