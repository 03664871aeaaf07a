"""Complete partly observed test digits with a trained DDPM: `python -m ddpm.complete --mask top`.

The diffusion model is never trained on half-images; completion conditions its reverse process
on the observed pixels instead (`repaint_loop`). At each step the observed part is what the
forward process makes of the known pixels at that noise level, and the rest is the model's own
ancestral step, so the model only ever denoises whole images:

    x_known   ~ q(x_{t-1} | x0)       = N(sqrt(alpha_bar_{t-1}) x0, (1 - alpha_bar_{t-1}) I)
    x_unknown ~ p_theta(x_{t-1} | x_t)                                 (Ho et al. 2020, Algorithm 2)
    x_{t-1}   = m * x_known + (1 - m) * x_unknown                      (Lugmayr et al. 2022, eq. 8)

with m the mask of observed pixels: the "replacement" method (Song et al. 2021, "Score-Based
Generative Modeling through SDEs", their imputation). Pasting the two together each step leaves
the model's half unaware of what the other half will be, so RePaint resamples (--resample U):
each step is taken U times, going back up by one forward step x_t ~ q(x_t | x_{t-1}) in between
(Lugmayr et al. 2022, Algorithm 1, with jumps of one step), which gives the model's part U
chances to agree with the observed part.
The model is asked without a label (its null label): it has to infer the digit from the pixels.
Steps are those of the ancestral sampler respaced to --steps (`GaussianDiffusion.respace`).
Shared with `vaegen.complete`: the digits, masks, scores and files (`common.completion`).
"""

from __future__ import annotations

import sys

import torch

from common.checkpoint import existing_run_dir
from common.cli import UserError, positive_int, user_errors
from common.completion import completion_parser, run_completion
from common.data import signed_to_uint8, to_signed
from common.runtime import pick_device
from common.tensor import randn
from ddpm.config import load_model
from ddpm.diffusion import GaussianDiffusion
from ddpm.samplers import Denoiser, step_pairs, timesteps


@torch.no_grad()
def repaint_loop(
    diffusion: GaussianDiffusion,
    denoiser: Denoiser,
    x: torch.Tensor,
    ts: torch.Tensor,
    x0_known: torch.Tensor,
    observed: torch.Tensor,
    resample: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Ancestral sampling conditioned on known pixels (Lugmayr et al. 2022, Algorithm 1, jump 1).

    x: x_T [B, C, H, W]; x0_known: the image [B, C, H, W] in [-1, 1], trusted only where observed
    (bool, same shape). On the process respaced to the visited steps ts, at each step i from the
    noisiest, `resample` times: x = m * q_sample(x0_known, i - 1) + (1 - m) * p_step(x, i) (x0_known
    itself after the last step), then, but for the last time, back up: x = q_step(x, i).
    Returns x0 with the observed pixels equal to x0_known's.
    """
    process = diffusion.respace(ts)
    m = observed.to(x.dtype)
    for k, (t, _) in enumerate(step_pairs(ts)):
        i = len(ts) - 1 - k  # the respaced process counts its steps up from the least noisy
        for u in range(resample):
            z = randn(x.shape, generator, x.device, x.dtype) if i > 0 else None
            unknown = process.p_step(denoiser(x, t), i, x, z)
            noise = randn(x.shape, generator, x.device, x.dtype)
            known = process.q_sample(x0_known, i - 1, noise) if i > 0 else x0_known
            x = m * known + (1 - m) * unknown
            if u < resample - 1:
                x = process.q_step(x, i, randn(x.shape, generator, x.device, x.dtype))
    return x


def completer(model: torch.nn.Module, diffusion: GaussianDiffusion, steps: int, resample: int):
    """`common.completion`'s complete(): uint8 digits and masks [B, 28, 28] -> uint8 completions."""
    device = next(model.parameters()).device
    ts = timesteps(diffusion, steps)

    @torch.no_grad()
    def complete(digits: torch.Tensor, observed: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x0 = to_signed(digits[:, None]).to(device)
        m = observed[:, None].to(device)
        null = torch.full((len(digits),), model.null_label, device=device)
        denoiser = Denoiser(model, null, diffusion.sigma)  # unguided, unconditional
        xT = randn(x0.shape, generator, device, x0.dtype)
        x = repaint_loop(diffusion, denoiser, xT, ts, x0, m, resample, generator)
        return torch.where(observed, digits, signed_to_uint8(x[:, 0]).cpu())

    return complete


def build_parser():
    p = completion_parser("python -m ddpm.complete", __doc__, "results/ddpm")
    p.add_argument("--steps", type=positive_int, default=50, help="ancestral steps (<= T), evenly spaced")
    p.add_argument(
        "--resample",
        type=positive_int,
        default=1,
        help="RePaint's resamplings U per step (1: the replacement method; cost x U)",
    )
    return p


@user_errors
def main(argv: list[str] | None = None) -> dict:
    a = build_parser().parse_args(argv)
    run, device = existing_run_dir(a.run), pick_device(a.device)
    model, diffusion, _ = load_model(run, device)
    if not 2 <= a.steps <= diffusion.T:
        raise UserError(f"--steps {a.steps}: the ancestral sampler takes 2..{diffusion.T} steps")
    method = {
        "model": "ddpm",
        "sampler": f"ancestral, {a.steps} steps, null label, unguided",
        "conditioning": "replacement" if a.resample == 1 else f"RePaint, {a.resample} resamplings per step",
        "resample": a.resample,
        "passes_per_digit": a.steps * a.resample,
    }
    command = "python -m ddpm.complete " + " ".join(sys.argv[1:] if argv is None else argv)
    return run_completion(a, run, completer(model, diffusion, a.steps, a.resample), method, command)


if __name__ == "__main__":
    main()
