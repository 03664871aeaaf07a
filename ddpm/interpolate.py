"""Interpolate between two test digits through the DDPM's noise: `python -m ddpm.interpolate --pair 0,1`.

A diffusion model has no encoder, but deterministic DDIM (eta = 0) is a discretised ODE, and an ODE
can be run backwards: `ddim_inversion_loop` takes each digit x0 up to x_T (Song et al. 2021,
section 4.3, "encoding"), the interpolation walks the sphere between the two x_T (`slerp`, since
Gaussian noise concentrates on a sphere of radius sqrt(d) and the straight line between two
draws passes well inside it), and deterministic DDIM brings each point back down
(`ddpm.samplers.ddim_loop`). Each inversion step evaluates eps at the point it starts from,
not the one it arrives at, so the round trip x0 -> x_T -> x0 is only approximately the identity,
more so at few steps: the reconstruction error is measured on --recon-n test digits and
reported. Unlike the VAE's latent path (`vaegen.sample --interpolate`), the model is asked
without a label (its null label), and x_T has 784 dimensions, not 20.

Writes <out>.png (the strip: x_a, the path, x_b; then the round trips of x_a and x_b) and
<out>.json with the reconstruction errors; default <run>/interpolation_A_B.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from common.checkpoint import existing_run_dir, write_json
from common.cli import ArgumentParser, UserError, index_pair, nonneg_int, positive_int, user_errors
from common.data import DATA_DIR_HELP, load_mnist, signed_to_uint8, to_signed
from common.runtime import pick_device
from common.viz import save_grid
from ddpm.config import load_model
from ddpm.diffusion import GaussianDiffusion
from ddpm.samplers import Denoiser, ddim_loop, timesteps


@torch.no_grad()
def ddim_inversion_loop(
    diffusion: GaussianDiffusion, denoiser: Denoiser, x0: torch.Tensor, ts: torch.Tensor
) -> torch.Tensor:
    """x_T from x0 [B, C, H, W] by DDIM's deterministic step (Song et al. 2021, eq. 12, eta = 0) run
    up the visited steps ts (given noisiest first, as the samplers take them), from s to the next t > s:

        eps    = eps~(x_s, t)                               (the model at the point we start from)
        x0_hat = (x_s - sqrt(1 - a_s) eps) / sqrt(a_s)       (x0 itself at the start, s = -1)
        x_t    = sqrt(a_t) x0_hat + sqrt(1 - a_t) eps

    The exact ODE step would use eps at x_t, which is not known yet: the approximation is what
    makes the inversion inexact, by an error that shrinks with the step size.
    """
    x, x0_hat = x0, x0
    s = -1
    for t in ts.flip(0).tolist():
        eps = denoiser(x, t)
        if s >= 0:
            x0_hat = diffusion.predict_x0(x, s, eps)
        a_t = diffusion.alpha_bar[t].item()
        x = math.sqrt(a_t) * x0_hat + math.sqrt(1 - a_t) * eps
        s = t
    return x


def slerp(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation (Shoemake 1985) between a and b [C, H, W] at lam [K] -> [K, C, H, W]:

    slerp(a, b; l) = sin((1 - l) theta) / sin(theta) a + sin(l theta) / sin(theta) b,
    cos(theta) = <a, b> / (|a| |b|)
    """
    cos = (a * b).sum() / (a.norm() * b.norm())
    theta = torch.arccos(cos.clamp(-1.0, 1.0))
    lam = lam.to(a.dtype).view(-1, *([1] * a.dim()))
    if theta.abs() < 1e-6:  # parallel: the straight line
        return (1 - lam) * a + lam * b
    return (torch.sin((1 - lam) * theta) * a + torch.sin(lam * theta) * b) / torch.sin(theta)


@torch.no_grad()
def round_trip(
    model: torch.nn.Module, diffusion: GaussianDiffusion, x0: torch.Tensor, ts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_T, x0 again): DDIM inversion up ts, then deterministic DDIM (unclipped) down the same steps."""
    null = torch.full((len(x0),), model.null_label, device=x0.device)
    denoiser = Denoiser(model, null, diffusion.sigma)
    xT = ddim_inversion_loop(diffusion, denoiser, x0, ts)
    return xT, ddim_loop(diffusion, denoiser, xT, ts, clip=False)


@torch.no_grad()
def noise_path(
    model: torch.nn.Module,
    diffusion: GaussianDiffusion,
    xT: torch.Tensor,
    lam: torch.Tensor,
    ts: torch.Tensor,
) -> torch.Tensor:
    """The digits [K, C, H, W] at lam [K] along slerp(xT[0], xT[1]), by deterministic DDIM (unclipped)."""
    null = torch.full((len(lam),), model.null_label, device=xT.device)
    return ddim_loop(
        diffusion, Denoiser(model, null, diffusion.sigma), slerp(xT[0], xT[1], lam), ts, clip=False
    )


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m ddpm.interpolate", description=__doc__)
    p.add_argument("--run", default="results/ddpm", help="run directory of ddpm.train")
    p.add_argument("--pair", type=index_pair, default=(0, 1), metavar="A,B", help="the ends: test indices")
    p.add_argument("--steps", type=positive_int, default=50, help="DDIM steps, up and down (<= T)")
    p.add_argument("--points", type=positive_int, default=8, help="points on the path between the ends")
    p.add_argument(
        "--recon-n",
        type=nonneg_int,
        default=100,
        help="test digits for the round-trip error (0: the pair only)",
    )
    p.add_argument("--out", default=None, help="figure path (.png); default <run>/interpolation_A_B.png")
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    return p


@user_errors
def main(argv: list[str] | None = None) -> dict:
    a = build_parser().parse_args(argv)
    run, device = existing_run_dir(a.run), pick_device(a.device)
    model, diffusion, _ = load_model(run, device)
    if a.steps > diffusion.T:
        raise UserError(f"--steps {a.steps} is more than the model's T = {diffusion.T}")
    x_test, _ = load_mnist(train=False, data_dir=a.data_dir)
    i, j = a.pair
    if max(i, j) >= len(x_test):
        raise UserError(f"--pair {i},{j}: the test set has indices 0..{len(x_test) - 1}")
    out = Path(a.out) if a.out else run / f"interpolation_{i}_{j}.png"
    if out.suffix != ".png":
        raise UserError(f"--out {out}: the figure must end in .png")
    ts = timesteps(diffusion, a.steps)
    ends = to_signed(x_test[[i, j]]).to(device)
    xT, back = round_trip(model, diffusion, ends, ts)
    lam = torch.linspace(0, 1, a.points + 2, device=device)[1:-1]
    path = noise_path(model, diffusion, xT, lam, ts)
    strip = torch.cat([ends[:1], path, ends[1:], back])  # x_a, path, x_b, round trips
    save_grid(signed_to_uint8(strip[:, 0]).cpu(), out, nrow=len(strip), scale=2)

    x = to_signed(x_test[: a.recon_n]).to(device) if a.recon_n else ends
    x_back = round_trip(model, diffusion, x, ts)[1] if a.recon_n else back
    err = ((x_back.clamp(-1, 1) - x) / 2) ** 2  # in [0, 1] pixel units
    report = {
        "pair": [i, j],
        "steps": a.steps,
        "points": a.points,
        "recon_n": len(x),
        "recon_mse": err.mean().item(),
        "recon_rmse_per_digit_max": err.mean((1, 2, 3)).sqrt().max().item(),
        "pair_recon_mse": (((back.clamp(-1, 1) - ends) / 2) ** 2).mean().item(),
        "x_T_norm_over_sqrt_d": (xT.flatten(1).norm(dim=1) / math.sqrt(ends[0].numel())).tolist(),
        "command": "python -m ddpm.interpolate " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    write_json(out.with_suffix(".json"), report)
    print(f"wrote {out}; round-trip MSE {report['recon_mse']:.5f} over {len(x)} digits", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
