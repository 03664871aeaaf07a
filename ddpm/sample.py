"""Draw digits from a trained DDPM: `python -m ddpm.sample --help`.

Writes the shared samples format (`images` uint8 [N, 28, 28], `labels` int64 [N]) and a PNG
grid beside it. EMA weights by default. A few steps of DPM-Solver++(2M) (the default) or DDIM
with classifier-free guidance is the fast path; `--sampler ddpm --steps 1000` is the original
ancestral sampler.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from common.checkpoint import load_checkpoint
from common.cli import (
    ArgumentParser,
    UserError,
    digit,
    digit_list,
    nonneg_float,
    positive_int,
    unit_float,
    user_errors,
)
from common.data import signed_to_uint8
from common.runtime import pick_device
from common.samples import save_samples
from common.viz import save_grid
from ddpm.diffusion import GaussianDiffusion
from ddpm.schedule import cosine_betas
from ddpm.unet import UNet, UNetConfig

# The cheapest setting at >= 99 % judged accuracy on both default-recipe runs of the README's
# Results (30 minutes on a slow 2-core CPU, and all 6 epochs): 10 Karras-spaced DPM-Solver++(2M)
# steps down to sigma 0.1 at w = 0.5, guided only where sigma_t is in (0.28, 5.42] (4 of the 10
# steps, 14 batch passes): FD 1.34 / 1.26 at 99.0 / 99.6 %, 3.2-3.3 s per 100 digits there.
# Guiding every step costs 20 passes; w = 0.75 scored 1.58 / 1.56.
DEFAULT_SAMPLER, DEFAULT_STEPS, DEFAULT_GUIDANCE = "dpm2m", 10, 0.5
DEFAULT_GUIDANCE_INTERVAL: tuple[float, float] | None = (0.28, 5.42)
DEFAULT_SPACING = "karras"
DEFAULT_SIGMA_MIN: float | None = 0.1


def sigma_interval(text: str) -> tuple[float, float] | None:
    """`LO,HI` -> (LO, HI), the noise levels sigma_t whose steps are guided; `all` -> None."""
    if text.strip().lower() == "all":
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (two numbers) or 'all', got {text!r}") from None
    if not (0 <= lo < hi) or math.isnan(hi):
        raise argparse.ArgumentTypeError(f"expected 0 <= LO < HI, got {text!r}")
    return lo, hi


def sigma_min_arg(text: str) -> float | None:
    """--sigma-min: a noise level, or 0 for none (the samplers then end at t = 0)."""
    return nonneg_float(text) or None


def add_sampler_flags(
    p: argparse.ArgumentParser,
    interval: tuple[float, float] | None = DEFAULT_GUIDANCE_INTERVAL,
    spacing: str = DEFAULT_SPACING,
    sigma_min: float | None = DEFAULT_SIGMA_MIN,
) -> None:
    """--guidance-interval, --spacing and --sigma-min (defaults given), shared by ddpm.sample and
    ddpm.evaluate."""
    p.add_argument(
        "--guidance-interval",
        type=sigma_interval,
        default=interval,
        help="guide only the steps whose sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) lies in "
        "(LO, HI], e.g. 0.28,5.42 (Kynkaanniemi et al. 2024); 'all' guides every step",
    )
    p.add_argument(
        "--spacing",
        choices=["uniform", "karras"],
        default=spacing,
        help="which steps a short sampler visits: evenly spaced t, or evenly spaced in "
        "sigma^(1/7) (Karras et al. 2022): more of them at the highest and the lowest noise",
    )
    p.add_argument(
        "--sigma-min",
        type=sigma_min_arg,
        default=sigma_min,
        help="end at the first step with sigma_t >= this and return its x0 prediction, skipping "
        "the lowest-noise steps (0: end at t = 0, sigma_0 = 0.0064)",
    )


def load_model(
    run: str | Path, device: torch.device, use_ema: bool = True
) -> tuple[UNet, GaussianDiffusion, dict]:
    """Rebuild the UNet and diffusion of a run from its checkpoint (kind 'ddpm')."""
    ckpt = load_checkpoint(run, "ddpm", map_location=device)
    cfg = ckpt["config"]
    model = UNet(UNetConfig.from_dict(cfg["unet"])).to(device)
    model.load_state_dict(ckpt["ema" if use_ema else "model"])
    model.eval()
    return model, GaussianDiffusion(cosine_betas(cfg["timesteps"])), ckpt


def requested_labels(n: int, digit_: int | None, labels: list[int] | None) -> torch.Tensor:
    """--digit D: n of D; --labels a,b,c: that list repeated to n; neither: n/10 of each digit."""
    if digit_ is not None:
        return torch.full((n,), digit_, dtype=torch.long)
    pattern = torch.tensor(labels if labels else list(range(10)), dtype=torch.long)
    y = pattern.repeat(n // len(pattern) + 1)[:n]
    return y if labels else y.sort().values


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m ddpm.sample", description=__doc__)
    p.add_argument("--run", default="results/ddpm", help="run directory or checkpoint file")
    p.add_argument("--n", type=positive_int, default=100, help="number of digits")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--digit", type=digit, default=None, help="draw only this digit")
    which.add_argument(
        "--labels", type=digit_list, default=None, help="comma-separated digits, repeated to --n"
    )
    p.add_argument(
        "--sampler",
        choices=["ddpm", "ddim", "dpm2m"],
        default=DEFAULT_SAMPLER,
        help="ddpm: ancestral; ddim: deterministic for --eta 0; dpm2m: DPM-Solver++(2M), second order",
    )
    p.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS, help="denoising steps (<= T)")
    p.add_argument("--eta", type=unit_float, default=0.0, help="DDIM noise: 0 deterministic, 1 ~ DDPM")
    p.add_argument(
        "--guidance",
        type=nonneg_float,
        default=DEFAULT_GUIDANCE,
        help="classifier-free guidance w: eps = (1+w) eps(x,y) - w eps(x,null)",
    )
    add_sampler_flags(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=500, help="digits per batch")
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights, not the EMA")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--trajectory",
        action="store_true",
        help="also write <out>_trajectory.png: x_t at several t, one digit per class",
    )
    p.add_argument("--out", default=None, help="samples .npz (default: <run>/samples.npz)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    return p


def check_sigma_min(
    diffusion: GaussianDiffusion, steps: int, spacing: str, sigma_min: float | None
) -> None:
    """A one-line error when --sigma-min leaves fewer noise levels than --steps."""
    try:
        diffusion.timesteps(steps, spacing, sigma_min=sigma_min)
    except ValueError as e:
        raise UserError(f"--sigma-min {sigma_min:g}: {e}") from None


@torch.no_grad()
def generate(
    model: UNet,
    diffusion: GaussianDiffusion,
    y: torch.Tensor,
    sampler: str,
    steps: int,
    eta: float,
    guidance: float,
    seed: int,
    batch_size: int = 500,
    progress: bool = True,
    guidance_interval: tuple[float, float] | None = None,
    spacing: str = DEFAULT_SPACING,
    sigma_min: float | None = None,
) -> torch.Tensor:
    """Samples as uint8 [N, 28, 28] for labels y [N], in batches, from one seeded generator."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for yb in y.split(batch_size):
        x = diffusion.sample(
            model,
            yb.to(device),
            sampler=sampler,
            steps=steps,
            eta=eta,
            guidance=guidance,
            guidance_interval=guidance_interval,
            spacing=spacing,
            sigma_min=sigma_min,
            generator=g,
            progress=progress,
        )
        out.append(signed_to_uint8(x)[:, 0].cpu())
    return torch.cat(out)


@user_errors
def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    device = pick_device(a.device)
    model, diffusion, ckpt = load_model(a.run, device, use_ema=not a.raw_weights)
    T = diffusion.T
    if a.steps > T:
        raise UserError(f"--steps {a.steps} is more than the model's T = {T}")
    check_sigma_min(diffusion, a.steps, a.spacing, a.sigma_min)
    run_dir = Path(a.run) if Path(a.run).is_dir() else Path(a.run).parent
    out = Path(a.out) if a.out else run_dir / "samples.npz"
    if out.suffix != ".npz":
        raise UserError(f"--out must end in .npz, got {out}")
    if out.exists() and not a.overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it or choose another --out")

    y = requested_labels(a.n, a.digit, a.labels)
    start = time.perf_counter()
    images = generate(
        model,
        diffusion,
        y,
        a.sampler,
        a.steps,
        a.eta,
        a.guidance,
        a.seed,
        a.batch_size,
        guidance_interval=a.guidance_interval,
        spacing=a.spacing,
        sigma_min=a.sigma_min,
    )
    seconds = time.perf_counter() - start
    save_samples(out, images, y)
    lo_hi = a.guidance_interval
    where = f" where sigma_t is in ({lo_hi[0]:g}, {lo_hi[1]:g}]" if lo_hi else " at every step"
    end = f" down to sigma {a.sigma_min:g}" if a.sigma_min else ""
    print(
        f"{a.n} digits in {seconds:.2f} s ({a.sampler}, {a.steps} {a.spacing} steps{end}, guidance "
        f"{a.guidance}{where}, step {ckpt['step']} weights) -> {out} and {out.with_suffix('.png')}"
    )

    if a.trajectory:
        yt = torch.arange(10, device=device)
        g = torch.Generator(device=device).manual_seed(a.seed)
        _, traj = diffusion.sample(
            model,
            yt,
            sampler=a.sampler,
            steps=a.steps,
            eta=a.eta,
            guidance=a.guidance,
            guidance_interval=a.guidance_interval,
            spacing=a.spacing,
            sigma_min=a.sigma_min,
            generator=g,
            progress=False,
            return_trajectory=True,
        )
        picks = torch.linspace(0, len(traj) - 1, min(10, len(traj))).round().long().tolist()
        frames = torch.stack([signed_to_uint8(traj[i][1])[:, 0].cpu() for i in picks], dim=1)  # [10, F, H, W]
        path = out.with_name(out.stem + "_trajectory.png")
        save_grid(frames.flatten(0, 1), path, nrow=len(picks))
        print(f"trajectory (t = {', '.join(str(traj[i][0]) for i in picks)}) -> {path}")


if __name__ == "__main__":
    main()
