"""Gaussian diffusion, the process itself: forward process, posterior, reverse steps, loss.

Notation follows Ho et al. 2020 ("Denoising Diffusion Probabilistic Models"): betas,
alphas = 1 - betas, alpha_bar = prod alphas, x0 the data, xt the noised data at step t,
eps the standard normal noise, and the model is any callable
`eps_model(xt, t, y) -> eps_pred` (xt [B, C, H, W], t long [B], y long [B] or None); guidance
(`ddpm.samplers.Denoiser`) also reads its `null_label`, the "no label" class.
Index t is 0-based: t = 0 is the paper's step 1 (see `ddpm.schedule`), and `t_prev = -1`
stands for "x0 itself" (alpha_bar = 1).

Schedule arrays are float64, built once; every method casts what it needs to the input's
dtype and device (cached), so the same object serves float32 training on a GPU and float64
tests on the CPU. The loops that chain the reverse steps into samplers are in `ddpm.samplers`,
the variational bound built from these pieces in `ddpm.bound`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from common.tensor import extract, mean_flat, randn

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
