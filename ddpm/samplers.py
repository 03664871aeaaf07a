"""Samplers: which steps to visit, one short loop per sampler, and guidance in one place.

Every sampler starts from x_T ~ N(0, I) and walks down the visited steps ts = [T-1 > ... > t_min]
(`timesteps`), asking a `Denoiser` for eps at each, then returns x0:

  ddpm   ancestral sampling, Ho et al. 2020 Algorithm 2 (`ddpm_loop`, one `p_step` per step)
  ddim   Song et al. 2021 eq. 12 (`ddim_loop`, one `ddim_step` per step; eta = 0: deterministic)
  dpm2m  DPM-Solver++(2M), Lu et al. 2022 (`dpm_solver_2m_loop`, one `dpm_solver_2m_step` per step)

The `Denoiser` is where classifier-free guidance happens (Ho & Salimans 2022, eq. 6), for every
sampler. A `SamplerSpec` names one whole setting (sampler, steps, spacing, sigma_min, eta,
guidance, interval); `sample` draws with it. Shapes: x [B, C, H, W], y long [B] or None.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from common.cli import interval, nonneg_float, nonneg_or_none, positive_int, unit_float
from common.config import option
from common.tensor import randn
from ddpm.diffusion import EpsModel, GaussianDiffusion

SAMPLERS = {"ddpm": "DDPM", "ddim": "DDIM", "dpm2m": "DPM-Solver++(2M)"}
SPACINGS = ("uniform", "karras")


# ------------------------------------------------------------------------- which steps
def timesteps(
    diffusion: GaussianDiffusion,
    steps: int | None = None,
    spacing: str = "uniform",
    sigma_min: float | None = None,
    rho: float = 7.0,
    sigma_max: float = 80.0,
) -> torch.Tensor:
    """The steps a sampler visits, long [steps], from T-1 down to t_min (0 by default).

    steps = None or T gives T-1, T-2, ..., 0; fewer give (steps = 1 gives just T-1):
      'uniform': a rounded evenly spaced sub-sequence of T-1 .. t_min;
      'karras':  evenly spaced in sigma^(1/rho) (Karras et al. 2022, eq. 5), with
                 sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) (`diffusion.sigma`):
                   sigma_i = (sigma_max^(1/rho) + i / (S-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
                 each mapped to the first t with sigma_t >= sigma_i. The first step is still
                 T-1 (x_T is pure noise); ties, where steps crowd at low noise, are pushed
                 apart so the S steps stay distinct.
    sigma_min: the noise level of the last step, t_min = the first t with sigma_t >= sigma_min
    (default sigma_0, i.e. t_min = 0). The samplers return that step's x0 prediction, so a larger
    sigma_min ends with one denoising jump from there and skips the model's lowest-noise steps,
    which Min-SNR training weights least.
    """
    T = diffusion.T
    steps = T if steps is None else int(steps)
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..{T}, got {steps}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r} (use 'uniform' or 'karras')")
    sigma = diffusion.sigma  # increasing in t
    t_min = 0 if sigma_min is None else int(torch.searchsorted(sigma, sigma.new_tensor([sigma_min])))
    if not 0 <= t_min <= T - steps:
        raise ValueError(f"sigma_min {sigma_min} leaves fewer than {steps} steps to visit")
    if spacing == "uniform" or steps in (1, T):
        return torch.floor(torch.linspace(T - 1, t_min, steps, dtype=torch.float64) + 0.5).long()
    lo, hi = sigma[t_min].item() ** (1 / rho), min(sigma_max, sigma[-1].item()) ** (1 / rho)
    sigma_i = torch.linspace(hi, lo, steps, dtype=torch.float64) ** rho
    ts = torch.searchsorted(sigma, sigma_i).clamp(max=T - 1).tolist()
    ts[0] = T - 1
    for i in range(1, steps):  # strictly decreasing from the top ...
        ts[i] = min(ts[i], ts[i - 1] - 1)
    ts[-1] = t_min
    for i in range(steps - 2, -1, -1):  # ... and ending at t_min (stays below T: steps <= T - t_min)
        ts[i] = max(ts[i], ts[i + 1] + 1)
    return torch.tensor(ts, dtype=torch.long)


def step_pairs(ts: torch.Tensor, progress: bool = False) -> Iterator[tuple[int, int]]:
    """(t, s) for each step of a sampler: from visited step t to the next one s, and s = -1
    (x0 itself) after the last; with a progress bar if asked."""
    ts = ts.tolist()
    pairs = zip(ts, ts[1:] + [-1], strict=True)
    return iter(tqdm(pairs, total=len(ts), desc="sampling", leave=False, disable=not progress))


# ------------------------------------------------------------------------------ guidance
def guided(sigma_t: float, guidance: float, interval: tuple[float, float] | None) -> bool:
    """Whether a step at noise level sigma_t is guided: w > 0, and sigma_t in (lo, hi] if an
    interval is set."""
    return guidance > 0 and (interval is None or interval[0] < sigma_t <= interval[1])


@dataclass
class Denoiser:
    """eps~(x_t, t) for a batch with labels y: what every sampler asks at each step.

    Classifier-free guidance (Ho & Salimans 2022, eq. 6) with weight w = `guidance`:

        eps~ = (1 + w) eps(x_t, y) - w eps(x_t, null)

    both passes in one model call of batch 2B; the null label is the model's own
    (`eps_model.null_label`). With `interval` = (lo, hi) only the steps whose noise level
    sigma_t lies in (lo, hi] are guided, the others take the plain conditional eps
    (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval"): guidance at high noise
    costs diversity, at low noise it does little, and every unguided step is one pass of batch B
    instead of 2B. y = None: an unconditional model call, never guided. If `trajectory` is a
    list, each step's input (t, x_t) is appended to it.
    """

    eps_model: EpsModel
    y: torch.Tensor | None
    sigma: torch.Tensor  # sigma_t per step t (`GaussianDiffusion.sigma`), for the interval
    guidance: float = 0.0
    interval: tuple[float, float] | None = None
    trajectory: list[tuple[int, torch.Tensor]] | None = None

    def __call__(self, xt: torch.Tensor, t: int) -> torch.Tensor:
        if self.trajectory is not None:
            self.trajectory.append((t, xt))
        t_batch = torch.full((xt.shape[0],), t, dtype=torch.long, device=xt.device)
        if self.y is None or not guided(float(self.sigma[t]), self.guidance, self.interval):
            return self.eps_model(xt, t_batch, self.y)
        null = torch.full_like(self.y, self.eps_model.null_label)
        both = self.eps_model(torch.cat([xt, xt]), torch.cat([t_batch, t_batch]), torch.cat([self.y, null]))
        e_cond, e_uncond = both.chunk(2)
        return torch.lerp(e_uncond, e_cond, 1.0 + self.guidance)  # e_u + (1 + w)(e_c - e_u)


# ------------------------------------------------------------------------------ the loops
def ddpm_loop(
    diffusion: GaussianDiffusion,
    denoiser: Denoiser,
    x: torch.Tensor,
    ts: torch.Tensor,
    generator: torch.Generator | None = None,
    clip: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2): at each visited step, from the noisiest,

        z ~ N(0, I) (z = 0 at the last step),   x_{t-1} = mu_theta(x_t, t) + sigma_t z   (`p_step`)

    on the process respaced to the visited steps (`GaussianDiffusion.respace`): with all T steps
    this is Algorithm 2 itself; with fewer, each step is the posterior between two visited steps.
    The last visited step (step 0 of the respaced process) returns its x0 prediction.
    """
    process = diffusion.respace(ts)
    for k, (t, _) in enumerate(step_pairs(ts, progress)):
        i = len(ts) - 1 - k  # the respaced process counts its steps up from the least noisy
        z = randn(x.shape, generator, x.device, x.dtype) if i > 0 else None
        x = process.p_step(denoiser(x, t), i, x, z, clip)
    return x


def ddim_loop(
    diffusion: GaussianDiffusion,
    denoiser: Denoiser,
    x: torch.Tensor,
    ts: torch.Tensor,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    clip: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM (Song et al. 2021): from each visited step t to the next one s (`ddim_step`),

        x_s = sqrt(a_s) x0_hat + sqrt(1 - a_s - sigma^2) eps + sigma z,   (eq. 12)

    with sigma from eq. 16 (eta = 0: deterministic, eta = 1: the ancestral step).
    """
    for t, s in step_pairs(ts, progress):
        z = randn(x.shape, generator, x.device, x.dtype) if eta > 0 and s >= 0 else None
        x = diffusion.ddim_step(denoiser(x, t), t, s, x, eta, z, clip)
    return x


def dpm_solver_2m_step(
    diffusion: GaussianDiffusion,
    xt: torch.Tensor,
    t: int,
    s: int,
    x0_hat: torch.Tensor,
    x0_hat_prev: torch.Tensor | None = None,
    h_prev: float | None = None,
) -> tuple[torch.Tensor, float]:
    """One step of DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2) from step t to s < t.

    With alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar), lambda = log(alpha / sigma) and
    h = lambda_s - lambda_t (s = -1 is x0: alpha = 1, sigma = 0, h = inf):

        D   = x0_hat                                                    (first order)
        D   = (1 + 1/(2r)) x0_hat - 1/(2r) x0_hat_prev,  r = h_prev / h  (second order)
        x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) D

    The first-order step is DDIM's (eta = 0); the second order extrapolates the x0 predictions
    linearly in lambda from the previous step (which was h_prev long). Returns (x_s, h).
    """
    a_t = diffusion.alpha_bar[t].item()
    a_s = diffusion.alpha_bar[s].item() if s >= 0 else 1.0
    alpha_t, sigma_t = math.sqrt(a_t), math.sqrt(1 - a_t)
    alpha_s, sigma_s = math.sqrt(a_s), math.sqrt(1 - a_s)
    h = math.log(alpha_s * sigma_t / (alpha_t * sigma_s)) if sigma_s > 0 else math.inf
    D = x0_hat if x0_hat_prev is None else x0_hat + h / (2 * h_prev) * (x0_hat - x0_hat_prev)
    # -alpha_s (e^{-h} - 1) = alpha_s - alpha_t sigma_s / sigma_t, which stays finite at s = -1
    return sigma_s / sigma_t * xt + (alpha_s - alpha_t * sigma_s / sigma_t) * D, h


def dpm_solver_2m_loop(
    diffusion: GaussianDiffusion,
    denoiser: Denoiser,
    x: torch.Tensor,
    ts: torch.Tensor,
    clip: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """DPM-Solver++(2M): a second-order solver of the probability-flow ODE in x0 predictions.

    Each step is `dpm_solver_2m_step`. It is first order at the first step (no history) and at
    the last two, Lu et al.'s "lower order final" for few steps: the last step returns x0_hat
    itself, and the one before it can jump far in lambda, where extrapolating overshoots (10
    uniform steps to t = 0: 3.4 over the last step against 0.4-0.7 before; 10 Karras steps to
    sigma 0.1, the default, rise evenly from 0.5 to 1.1).
    """
    x0_prev, h_prev = None, None
    for i, (t, s) in enumerate(step_pairs(ts, progress)):
        x0_hat = diffusion.predict_x0(x, t, denoiser(x, t))
        x0_hat = x0_hat.clamp(-1.0, 1.0) if clip else x0_hat
        second_order = 0 < i < len(ts) - 2
        x, h = dpm_solver_2m_step(diffusion, x, t, s, x0_hat, x0_prev if second_order else None, h_prev)
        x0_prev, h_prev = x0_hat, h
    return x


# ------------------------------------------------------------------------------ a setting
@dataclass(frozen=True)
class SamplerSpec:
    """One way to draw samples, built once from the flags and passed to sampling, evaluation,
    bench and the report (and written into metrics.json as a dict). Defaults: `ddpm.sample`'s.

    Fields that cannot matter are normalised, so that equal settings compare and name equal:
    eta is 0 but for DDIM, the interval is None without guidance, sigma_min 0 is None.
    """

    sampler: str = option("dpm2m", "ddpm: ancestral; ddim: deterministic for --eta 0; dpm2m: "
                          "DPM-Solver++(2M), second order", choices=tuple(SAMPLERS))  # fmt: skip
    steps: int = option(10, "denoising steps (<= T; T visits every step)", positive_int)
    spacing: str = option("karras", "which steps a short sampler visits: evenly spaced t, or evenly "
                          "spaced in sigma^(1/7) (Karras et al. 2022): more at both ends",
                          choices=SPACINGS)  # fmt: skip
    sigma_min: float | None = option(
        0.1, "end at the first step with sigma_t >= this and return its x0 prediction, skipping the "
        "lowest-noise steps (0: end at t = 0; a sampler visiting all T steps always does)", nonneg_or_none,
    )  # fmt: skip
    eta: float = option(0.0, "DDIM noise: 0 deterministic, 1 ~ DDPM", unit_float)
    guidance: float = option(0.35, "classifier-free guidance w: eps = (1+w) eps(x,y) - w eps(x,null)",
                             nonneg_float)  # fmt: skip
    guidance_interval: tuple[float, float] | None = option(
        (0.28, 5.42), "guide only the steps whose sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) "
        "lies in (LO, HI], e.g. 0.28,5.42 (Kynkaanniemi et al. 2024); 'all' guides every step", interval,
    )  # fmt: skip
    clip: bool = option(True, "clip each x0 prediction to [-1, 1]")

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS or self.spacing not in SPACINGS or self.steps < 1:
            raise ValueError(f"not a sampler setting: {self.sampler!r}, {self.steps} steps, "
                             f"{self.spacing!r} (samplers: {', '.join(SAMPLERS)}; spacings: "
                             f"{', '.join(SPACINGS)})")  # fmt: skip
        gi = self.guidance_interval
        object.__setattr__(self, "eta", float(self.eta) if self.sampler == "ddim" else 0.0)
        object.__setattr__(self, "guidance_interval", tuple(gi) if gi and self.guidance else None)
        object.__setattr__(self, "sigma_min", self.sigma_min or None)

    def for_model(self, diffusion: GaussianDiffusion) -> SamplerSpec:
        """This setting for a model of T steps. All T steps visit every t: nothing to space and no
        step to skip, so spacing is uniform and sigma_min None. Raises ValueError if the steps do
        not fit (more than T, fewer noise levels above sigma_min, or 1 ancestral step: the
        respaced process needs two)."""
        if self.steps > diffusion.T:
            raise ValueError(f"{self.steps} steps is more than the model's T = {diffusion.T}")
        if self.sampler == "ddpm" and self.steps < 2:
            raise ValueError("the ancestral sampler takes at least 2 steps (1 step is DDIM's single jump)")
        spec = replace(self, spacing="uniform", sigma_min=None) if self.steps == diffusion.T else self
        timesteps(diffusion, spec.steps, spec.spacing, spec.sigma_min)
        return spec

    def passes(self, diffusion: GaussianDiffusion) -> int:
        """Model passes of batch B per sample: one per step, two where guided."""
        ts = timesteps(diffusion, self.steps, self.spacing, self.sigma_min).tolist()
        return sum(2 if guided(float(diffusion.sigma[t]), self.guidance, self.guidance_interval) else 1
                   for t in ts)  # fmt: skip

    @property
    def name(self) -> str:
        """Stable and file-safe, e.g. 'dpm2m10_w0.5_karras_smin0.1_gi0.28-5.42'."""
        name = f"{self.sampler}{self.steps}_w{self.guidance:g}"
        name += "_karras" if self.spacing == "karras" else ""
        name += f"_smin{self.sigma_min:g}" if self.sigma_min else ""
        name += f"_eta{self.eta:g}" if self.eta else ""
        name += "_gi{:g}-{:g}".format(*self.guidance_interval) if self.guidance_interval else ""
        return name + ("" if self.clip else "_noclip")

    @property
    def method(self) -> str:
        """The setting without its steps and w (what a curve over either shares), e.g.
        'DPM-Solver++(2M), Karras spacing, to sigma 0.1, guided in sigma (0.28, 5.42]'."""
        parts = [SAMPLERS[self.sampler] + (f" eta {self.eta:g}" if self.eta else "")]
        parts += ["Karras spacing"] if self.spacing == "karras" else []
        parts += [f"to sigma {self.sigma_min:g}"] if self.sigma_min else []
        if self.guidance_interval:
            parts.append("guided in sigma ({:g}, {:g}]".format(*self.guidance_interval))
        return ", ".join(parts + ([] if self.clip else ["unclipped"]))

    @property
    def label(self) -> str:
        """For people: 'DPM-Solver++(2M), Karras spacing, ..., 10 steps, w = 0.35'."""
        return f"{self.method}, {self.steps} steps, w = {self.guidance:g}"


@torch.no_grad()
def sample(
    diffusion: GaussianDiffusion,
    eps_model: EpsModel,
    spec: SamplerSpec,
    xT: torch.Tensor,
    y: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    trajectory: list[tuple[int, torch.Tensor]] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """x0 [B, C, H, W] drawn from noise xT [B, C, H, W] (dtype and device follow it) with `spec`.

    y: labels long [B], or None for an unconditional model call; `generator` drives every step's
    noise (a CPU generator also serves a CUDA xT: noise drawn on the CPU, then copied). If
    `trajectory` is a list it receives (t, x_t), the input of each step from T-1 down, then (-1, x0).
    """
    ts = timesteps(diffusion, spec.steps, spec.spacing, spec.sigma_min)
    denoiser = Denoiser(eps_model, y, diffusion.sigma, spec.guidance, spec.guidance_interval, trajectory)
    if spec.sampler == "ddpm":
        x = ddpm_loop(diffusion, denoiser, xT, ts, generator, spec.clip, progress)
    elif spec.sampler == "ddim":
        x = ddim_loop(diffusion, denoiser, xT, ts, spec.eta, generator, spec.clip, progress)
    else:
        x = dpm_solver_2m_loop(diffusion, denoiser, xT, ts, spec.clip, progress)
    x = x.clamp(-1.0, 1.0) if spec.clip else x
    if trajectory is not None:
        trajectory.append((-1, x))
    return x
