"""Gaussian diffusion: forward process, posterior, DDPM and DDIM samplers, guidance, bound.

Notation follows Ho et al. 2020 ("Denoising Diffusion Probabilistic Models"): betas,
alphas = 1 - betas, alpha_bar = prod alphas, x0 the data, xt the noised data at step t,
eps the standard normal noise, and the model is any callable
`eps_model(xt, t, y) -> eps_pred` (t long [B], y long [B] or None).
Index t is 0-based: t = 0 is the paper's step 1 (see `ddpm.schedule`), and `t_prev = -1`
stands for "x0 itself" (alpha_bar = 1).

Schedule arrays are float64, built once; every method casts what it needs to the input's
dtype and device (cached), so the same object serves float32 training on a GPU and float64
tests on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from common.distributions import discretized_gaussian_log_likelihood, nats_to_bits_per_dim, normal_kl
from common.tensor import extract, mean_flat, sum_flat

EpsModel = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def randn(
    shape: tuple[int, ...] | torch.Size,
    generator: torch.Generator | None,
    device: torch.device | str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """N(0, I) noise on `device`, drawn from `generator` wherever that generator lives.

    A CPU generator with a CUDA tensor draws on the CPU and copies, so one seed gives the
    same noise on every device.
    """
    if generator is not None and generator.device.type != torch.device(device).type:
        return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def guided_eps(
    eps_model: EpsModel,
    xt: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor | None,
    guidance: float,
    null_label: int = 10,
) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6):

        eps~ = (1 + w) eps(xt, y) - w eps(xt, null)

    with the null label as the unconditional input. Both passes run as one model call of
    batch 2B. w = 0 (or y = None, fully unconditional) is a single plain call.
    `GaussianDiffusion.sample` inlines the same computation with its inputs prepared once.
    """
    if guidance == 0 or y is None:
        return eps_model(xt, t, y)
    y_null = torch.full_like(y, null_label)
    e_cond, e_uncond = eps_model(torch.cat([xt, xt]), torch.cat([t, t]), torch.cat([y, y_null])).chunk(2)
    return torch.lerp(e_uncond, e_cond, 1.0 + guidance)  # e_u + (1 + w)(e_c - e_u)


class GaussianDiffusion:
    """The diffusion process of Ho et al. 2020 for a given beta schedule (float64 [T]).

    Precomputed (float64, length T, 0-based t):
      alphas                 = 1 - betas
      alpha_bar[t]           = prod_{i <= t} alphas[i]
      alpha_bar_prev[t]      = alpha_bar[t - 1], and 1 at t = 0
      snr[t]                 = alpha_bar / (1 - alpha_bar)
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
        self.snr = self.alpha_bar / (1.0 - self.alpha_bar)  # signal-to-noise ratio of xt
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
        if eta > 0:
            if noise is None:
                noise = torch.randn_like(xt)
            x_prev = x_prev + sigma * noise
        return x_prev

    # ------------------------------------------------------------------ samplers
    def timesteps(
        self,
        steps: int | None = None,
        spacing: str = "uniform",
        rho: float = 7.0,
        sigma_max: float = 80.0,
        sigma_min: float | None = None,
    ) -> torch.Tensor:
        """The steps a sampler visits, long [steps], from T-1 down to t_min (0 by default).

        steps = None or T gives T-1, T-2, ..., 0; fewer give (steps = 1 gives just T-1):
          'uniform': a rounded evenly spaced sub-sequence of T-1 .. t_min;
          'karras':  evenly spaced in sigma^(1/rho) (Karras et al. 2022, eq. 5), where
                     sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t):
                       sigma_i = (sigma_max^(1/rho) + i / (S-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
                     each mapped to the first t with sigma_t >= sigma_i. The first step is
                     still T-1 (x_T is pure noise); ties, where steps crowd at low noise, are
                     pushed apart so the S steps stay distinct.
        sigma_min: the noise level of the last step, t_min = the first t with sigma_t >= sigma_min
        (default sigma_0, i.e. t_min = 0). The samplers return that step's x0 prediction, so a
        larger sigma_min ends with one denoising jump from there and skips the model's lowest-noise
        steps (which Min-SNR training weights least; README, "Choosing the steps").
        """
        steps = self.T if steps is None else int(steps)
        if not 1 <= steps <= self.T:
            raise ValueError(f"steps must be in 1..{self.T}, got {steps}")
        if spacing not in ("uniform", "karras"):
            raise ValueError(f"unknown spacing {spacing!r} (use 'uniform' or 'karras')")
        sigma = self.sqrt_recipm1_alpha_bar  # increasing in t
        t_min = 0 if sigma_min is None else int(torch.searchsorted(sigma, sigma.new_tensor([sigma_min])))
        if not 0 <= t_min <= self.T - steps:
            raise ValueError(f"sigma_min {sigma_min} leaves fewer than {steps} steps to visit")
        if spacing == "uniform" or steps in (1, self.T):
            return torch.floor(torch.linspace(self.T - 1, t_min, steps, dtype=torch.float64) + 0.5).long()
        lo, hi = sigma[t_min].item() ** (1 / rho), min(sigma_max, sigma[-1].item()) ** (1 / rho)
        sigma_i = torch.linspace(hi, lo, steps, dtype=torch.float64) ** rho
        ts = torch.searchsorted(sigma, sigma_i).clamp(max=self.T - 1).tolist()
        ts[0] = self.T - 1
        for i in range(1, steps):  # strictly decreasing from the top ...
            ts[i] = min(ts[i], ts[i - 1] - 1)
        ts[-1] = t_min
        for i in range(steps - 2, -1, -1):  # ... and ending at t_min (stays below T: steps <= T - t_min)
            ts[i] = max(ts[i], ts[i + 1] + 1)
        return torch.tensor(ts, dtype=torch.long)

    def sampling_coefficients(
        self, ts: torch.Tensor, sampler: str = "ddpm", eta: float = 0.0
    ) -> torch.Tensor:
        """Per-step coefficients (a, b, c, d, sigma, e), float64 [S, 6], for the visited steps `ts`.

        Every sampler is, per step from t to the next visited s (s = -1 after the last):
            x0_hat = a xt - b eps_pred           a = sqrt(1/a_t), b = sqrt(1/a_t - 1)   (eq. 4 inverted)
            D      = clip(x0_hat) + e (clip(x0_hat) - x0_hat_prev)     (e = 0 but for dpm2m)
            x_s    = c D + d xt + sigma z
        with a_t = alpha_bar_t, a_s = alpha_bar_s (1 for s = -1), and
          ddpm: the posterior q(x_s | xt, x0) of Ho eq. 6-7 for the respaced process whose
                step s -> t has beta' = 1 - a_t / a_s (Nichol & Dhariwal 2021, section 4):
                c = sqrt(a_s) beta' / (1 - a_t), d = sqrt(1 - beta') (1 - a_s) / (1 - a_t),
                sigma^2 = (1 - a_s) / (1 - a_t) beta'  (for all T steps: exactly Ho eq. 7);
          ddim: Song et al. 2021 eq. 12 with eps rewritten through x0_hat and xt,
                k = sqrt(1 - a_s - sigma^2) / sqrt(1 - a_t), c = sqrt(a_s) - k sqrt(a_t), d = k,
                sigma from eq. 16;
          dpm2m: DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): the DDIM
                (eta = 0) step, which is its first-order case, applied to a linear extrapolation
                D of the x0 predictions in lambda = log(sqrt(a) / sqrt(1 - a)): with
                h_i = lambda_s - lambda_t and r = h_{i-1} / h_i, D = (1 + 1/(2r)) x0_hat_i -
                1/(2r) x0_hat_{i-1}, so e = h_i / (2 h_{i-1}). e = 0 (first order) at the
                first step (no history), at the last (lambda_s = inf; x_s = x0_hat) and at the
                one into the last: lambda jumps there (into t = 0: 3.4 over the last of 10
                steps against 0.7 before), and extrapolating over that jump overshoots (the
                "lower order final" of Lu et al.). `eta` is ignored.
        """
        ts = ts.long().cpu()
        ts_prev = torch.cat([ts[1:], ts.new_tensor([-1])])
        a_t = self.alpha_bar[ts]
        a_s = torch.where(ts_prev >= 0, self.alpha_bar[ts_prev.clamp(min=0)], torch.ones_like(a_t))
        a = a_t.rsqrt()
        b = (1.0 / a_t - 1.0).sqrt()
        e = torch.zeros_like(a_t)
        if sampler == "ddpm":
            beta = 1.0 - a_t / a_s
            c = a_s.sqrt() * beta / (1.0 - a_t)
            d = (1.0 - beta).sqrt() * (1.0 - a_s) / (1.0 - a_t)
            sigma = ((1.0 - a_s) / (1.0 - a_t) * beta).sqrt()
        elif sampler == "ddim":
            sigma = eta * ((1.0 - a_s) / (1.0 - a_t) * (1.0 - a_t / a_s)).sqrt()
            k = (1.0 - a_s - sigma**2).clamp(min=0.0).sqrt() / (1.0 - a_t).sqrt()
            c = a_s.sqrt() - k * a_t.sqrt()
            d = k
        elif sampler == "dpm2m":
            sigma = torch.zeros_like(a_t)
            d = ((1.0 - a_s) / (1.0 - a_t)).sqrt()
            c = a_s.sqrt() - d * a_t.sqrt()
            lam = 0.5 * torch.log(a_t / (1.0 - a_t))  # lambda at each visited t
            lam_s = torch.cat([lam[1:], lam.new_tensor([float("inf")])])
            h = lam_s - lam
            e[1:-2] = h[1:-2] / (2.0 * h[:-3])
        else:
            raise ValueError(f"unknown sampler {sampler!r} (use 'ddpm', 'ddim' or 'dpm2m')")
        return torch.stack([a, b, c, d, sigma, e], dim=1)

    @torch.no_grad()
    def sample(
        self,
        eps_model: EpsModel,
        y: torch.Tensor | None,
        shape: tuple[int, ...] | torch.Size | None = None,
        sampler: str = "ddpm",
        steps: int | None = None,
        eta: float = 0.0,
        guidance: float = 0.0,
        generator: torch.Generator | None = None,
        progress: bool = True,
        clip: bool = True,
        null_label: int = 10,
        guidance_interval: tuple[float, float] | None = None,
        spacing: str = "uniform",
        sigma_min: float | None = None,
        return_trajectory: bool = False,
        xT: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
        """Generate x0 by running the reverse process from xT ~ N(0, I).

        - sampler 'ddpm': ancestral sampling, Ho et al. 2020 Algorithm 2 (variance beta_tilde);
          'ddim': Song et al. 2021 eq. 12 with sigma from eq. 16 (eta = 0: deterministic).
        - steps: None = all T; fewer visit `timesteps(steps, spacing)` ('uniform': evenly
          spaced indices; 'karras': denser at both ends, Karras et al. 2022), ending at t = 0,
          or at the noise level sigma_min if given, whose x0 prediction is returned.
        - y: labels long [B], or None for a fully unconditional model call (eps_model(x, t, None)).
        - guidance w > 0: eps~ = (1 + w) eps(x, y) - w eps(x, null_label) (Ho & Salimans 2022,
          eq. 6), both passes in one eps_model call of batch 2B.
        - guidance_interval (lo, hi): guide only the steps whose noise level
          sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) lies in (lo, hi], and take the plain
          conditional eps elsewhere (Kynkaanniemi et al. 2024, "Applying guidance in a limited
          interval"): guidance at high noise costs diversity, at low noise it does little, and
          every unguided step is one pass of batch B instead of 2B.
        - clip: clip each x0_hat to [-1, 1] (and the result); then x0 is in [-1, 1].
        - generator: drives xT and every step's noise (reproducible samples); a CPU generator
          also works for a CUDA sample (noise drawn on the CPU, then copied).
        - xT: start from this noise instead of drawing it; shape, device, dtype default to it.
        - shape defaults to [len(y), 1, 28, 28]; device to y's (else CPU); dtype to float32.
        - return_trajectory: also return [(t, xt), ...], the input of each step (t from T-1
          down) and finally (-1, x0); it keeps S + 1 copies of the batch in memory.

        Returns x0 float [B, ...] (and the trajectory if asked).
        """
        if device is None:
            device = xT.device if xT is not None else (y.device if torch.is_tensor(y) else "cpu")
        device = torch.device(device)
        if dtype is None:
            dtype = xT.dtype if xT is not None else torch.float32
        if y is not None:
            y = torch.as_tensor(y, dtype=torch.long, device=device)
        if shape is None:
            if xT is not None:
                shape = xT.shape
            elif y is not None:
                shape = (len(y), 1, 28, 28)
            else:
                raise ValueError("sample: give `shape` (or `y` or `xT`) to know how many images to draw")
        shape = tuple(shape)
        if y is not None and len(y) != shape[0]:
            raise ValueError(f"sample: {len(y)} labels for a batch of {shape[0]}")

        ts = self.timesteps(steps, spacing, sigma_min=sigma_min)
        coefs = self.sampling_coefficients(ts, sampler, eta).tolist()  # python floats: no per-step casts
        if xT is not None:
            x = xT.to(device=device, dtype=dtype)
        else:
            x = randn(shape, generator, device, dtype)

        guided = guidance != 0 and y is not None
        if guided and guidance_interval is not None:
            sigma_t = self.sqrt_recipm1_alpha_bar[ts]
            guide_at = ((sigma_t > guidance_interval[0]) & (sigma_t <= guidance_interval[1])).tolist()
        else:
            guide_at = [guided] * len(ts)
        n_in = 2 * shape[0] if guided else shape[0]
        t_in = ts.to(device).view(-1, 1).repeat(1, n_in)  # [S, n_in]: row i is the model's t at step i
        y_in = torch.cat([y, torch.full_like(y, null_label)]) if guided else y
        w = float(guidance)
        noise = torch.empty(shape, device=device, dtype=dtype)
        noise_here = generator is None or generator.device.type == device.type
        trajectory: list[tuple[int, torch.Tensor]] = []
        x0_prev = x  # dpm2m's previous x0_hat (unused at its first step, where e = 0)

        for i in tqdm(range(len(ts)), desc=f"{sampler} sampling", disable=not progress, leave=False):
            a, b, c, d, sigma, e = coefs[i]
            if guide_at[i]:
                e_cond, e_uncond = eps_model(torch.cat([x, x]), t_in[i], y_in).chunk(2)
                eps = torch.lerp(e_uncond, e_cond, 1.0 + w)
            else:
                eps = eps_model(x, t_in[i, : shape[0]], y)
            if return_trajectory:
                trajectory.append((int(ts[i]), x))
            x0_hat = torch.add(x * a, eps, alpha=-b)
            if clip:
                x0_hat.clamp_(-1.0, 1.0)
            if sampler == "dpm2m":  # second order: extrapolate from the previous step's x0_hat
                d_hat = torch.lerp(x0_prev, x0_hat, 1.0 + e) if e else x0_hat.clone()
                x0_prev, x0_hat = x0_hat, d_hat
            x_next = x0_hat.mul_(c).add_(x, alpha=d)  # x0_hat's buffer is fresh: reuse it
            if sigma > 0:
                if noise_here:
                    noise.normal_(generator=generator)
                else:
                    noise.copy_(randn(shape, generator, device, dtype))
                x_next.add_(noise, alpha=sigma)
            x = x_next

        if clip:
            x = x.clamp(-1.0, 1.0)
        if return_trajectory:
            trajectory.append((-1, x))
            return x, trajectory
        return x

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
        """L_simple (Ho et al. 2020, eq. 14: eq. 12 without its weights), averaged over pixels:

            E_{t, x0, eps} || eps - eps_theta(sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, t) ||^2

        t is uniform over all T steps 0..T-1. With `snr_gamma` > 0 each example's term is weighted
        by min(SNR_t, gamma) / SNR_t, SNR_t = alpha_bar_t / (1 - alpha_bar_t) (the "Min-SNR"
        weighting of Hang et al. 2023, eq. 9, written for eps-prediction): the nearly clean
        steps, whose eps is hard to predict and matters little for samples, count less.
        reduction 'mean' gives the scalar batch mean, 'none' the per-example values [B].
        """
        B = x0.shape[0]
        g_device = generator.device if generator is not None else x0.device
        t = torch.randint(0, self.T, (B,), generator=generator, device=g_device).to(x0.device)
        eps = randn(x0.shape, generator, x0.device, x0.dtype)
        per_example = mean_flat((eps - eps_model(self.q_sample(x0, t, eps), t, y)) ** 2)
        if snr_gamma:  # None or 0: unweighted (a weight of min(SNR, 0) would zero every term)
            per_example = per_example * self.min_snr_weight(t, snr_gamma).to(per_example.dtype)
        if reduction == "mean":
            return per_example.mean()
        if reduction == "none":
            return per_example
        raise ValueError(f"unknown reduction {reduction!r} (use 'mean' or 'none')")

    def min_snr_weight(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """min(SNR_t, gamma) / SNR_t per example [B] (Hang et al. 2023); 1 where SNR_t <= gamma."""
        snr = self._coef("snr", torch.empty(0, device=t.device))[t]  # float32: MPS has no float64
        return snr.clamp(max=gamma) / snr

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
        """The variational bound on -log p(x0) (Ho et al. 2020, eq. 5), per image, in bits/dim.

            L = L_T + sum_{t>=1} L_{t-1} + L_0                  (paper's 1-based steps)
            prior     L_T     = KL(q(x_T | x0) || N(0, I))
            terms     L_{t-1} = KL(q(x_{t-1} | xt, x0) || p(x_{t-1} | xt)), one-sample estimate
                                with xt ~ q(xt | x0); both Gaussians share beta_tilde, so it is
                                ||mu_tilde - mu_theta||^2 / (2 beta_tilde)
            decoder   L_0     = -log p(x0 | x1), the discretized Gaussian of Ho et al. 2020,
                                section 3.3 / eq. 13, with mean mu_theta and the clipped
                                log-variance at the first step.

        Returns a dict of tensors in bits per dimension: 'prior' [B], 'decoder' [B],
        'terms' [B, T] with terms[:, t] the contribution of 0-based step t, i.e. the KL term
        for t >= 1 and the decoder at t = 0 (terms[:, 0] == decoder), and
        'total' [B] = prior + terms.sum(1).

        All T steps cost T model evaluations of batch B; they run in chunks of `t_batch` steps
        per call (batch t_batch * B; default: as many as fit in a batch of about 512).
        x0 is data in [-1, 1] (on the 256-level grid for the decoder to be a likelihood).
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
            xt = self.q_sample(x0_rep, t, eps)
            model_mean, _, model_log_var, _ = self.p_mean_variance(eps_model(xt, t, y_rep), t, xt, clip)
            true_mean, _, true_log_var = self.q_posterior(x0_rep, xt, t)
            nats = sum_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var))
            if start == 0:  # the first B rows are t = 0: the decoder replaces the KL there
                log_p = discretized_gaussian_log_likelihood(x0, model_mean[:B], 0.5 * model_log_var[:B])
                nats[:B] = -sum_flat(log_p)
            terms[:, start : start + n] = nats_to_bits_per_dim(nats, dims).view(n, B).T

        t_last = torch.full((B,), self.T - 1, dtype=torch.long, device=x0.device)
        prior_mean = self._at("sqrt_alpha_bar", t_last, x0) * x0
        prior_log_var = torch.log1p(-self._at("alpha_bar", t_last, x0)).expand_as(x0)
        prior = nats_to_bits_per_dim(sum_flat(normal_kl(prior_mean, prior_log_var, 0.0, 0.0)), dims)
        return {
            "total": prior + terms.sum(dim=1),
            "prior": prior,
            "terms": terms,
            "decoder": terms[:, 0].clone(),
        }
