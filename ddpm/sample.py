"""Draw digits from a trained DDPM: `python -m ddpm.sample --help`.

Writes the shared samples format (`images` uint8 [N, 28, 28], `labels` int64 [N]) and a PNG
grid beside it, with the EMA weights unless --raw-weights. The default setting: 10 Karras-spaced
steps of DPM-Solver++(2M) (--sampler dpm2m) down to sigma 0.1, guided at w = 0.35 where sigma_t
is in (0.28, 5.42] (docs/experiments.md says how it was chosen). `--sampler ddpm --steps 1000`
is the original ancestral sampler of Ho et al. (all T steps, down to t = 0); `--sampler ddim`
is DDIM, deterministic with --eta 0.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from common.cli import ArgumentParser, UserError, digit, digit_list, positive_int, user_errors
from common.config import add_flags, from_args
from common.data import signed_to_uint8
from common.runtime import pick_device
from common.samples import save_samples
from common.tensor import randn
from common.viz import save_grid
from ddpm.config import load_model
from ddpm.diffusion import GaussianDiffusion
from ddpm.samplers import SamplerSpec, sample
from ddpm.unet import UNet


def requested_labels(n: int, digit_: int | None, labels: list[int] | None) -> torch.Tensor:
    """--digit D: n of D; --labels a,b,c: that list repeated to n; neither: n/10 of each digit."""
    if digit_ is not None:
        return torch.full((n,), digit_, dtype=torch.long)
    pattern = torch.tensor(labels if labels else list(range(10)), dtype=torch.long)
    y = pattern.repeat(n // len(pattern) + 1)[:n]
    return y if labels else y.sort().values


def spec_for(spec: SamplerSpec, diffusion: GaussianDiffusion) -> SamplerSpec:
    """`spec.for_model`, its ValueError (steps that do not fit the model) as a one-line UserError."""
    try:
        return spec.for_model(diffusion)
    except ValueError as e:
        raise UserError(f"{spec.label}: {e}") from None


@torch.no_grad()
def generate(
    model: UNet,
    diffusion: GaussianDiffusion,
    spec: SamplerSpec,
    y: torch.Tensor,
    seed: int,
    batch_size: int = 500,
    progress: bool = False,
) -> torch.Tensor:
    """Samples as uint8 [N, 28, 28] for labels y [N], in batches, from one seeded generator."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for yb in y.split(batch_size):
        xT = randn((len(yb), 1, 28, 28), g, device, torch.float32)
        x = sample(diffusion, model, spec, xT, yb.to(device), g, progress=progress)
        out.append(signed_to_uint8(x)[:, 0].cpu())
    return torch.cat(out)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m ddpm.sample", description=__doc__)
    p.add_argument("--run", default="results/ddpm", help="run directory or checkpoint file")
    p.add_argument("--n", type=positive_int, default=100, help="number of digits")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--digit", type=digit, default=None, help="draw only this digit")
    which.add_argument(
        "--labels", type=digit_list, default=None, help="comma-separated digits, repeated to --n"
    )
    add_flags(p, SamplerSpec)
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


@user_errors
def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    device = pick_device(a.device)
    model, diffusion, ckpt = load_model(a.run, device, use_ema=not a.raw_weights)
    spec = spec_for(from_args(SamplerSpec, a), diffusion)
    run_dir = Path(a.run) if Path(a.run).is_dir() else Path(a.run).parent
    out = Path(a.out) if a.out else run_dir / "samples.npz"
    if out.suffix != ".npz":
        raise UserError(f"--out must end in .npz, got {out}")
    if out.exists() and not a.overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it or choose another --out")

    y = requested_labels(a.n, a.digit, a.labels)
    start = time.perf_counter()
    images = generate(model, diffusion, spec, y, a.seed, a.batch_size, progress=spec.steps > 50)
    seconds = time.perf_counter() - start
    save_samples(out, images, y)
    print(
        f"{a.n} digits in {seconds:.2f} s ({spec.label}; {spec.passes(diffusion)} model passes per batch; "
        f"step {ckpt['step']} weights) -> {out} and {out.with_suffix('.png')}"
    )
    if a.trajectory:
        g = torch.Generator(device=device).manual_seed(a.seed)
        traj: list[tuple[int, torch.Tensor]] = []
        xT = randn((10, 1, 28, 28), g, device, torch.float32)
        sample(diffusion, model, spec, xT, torch.arange(10, device=device), g, trajectory=traj)
        picks = torch.linspace(0, len(traj) - 1, min(10, len(traj))).round().long().tolist()
        frames = torch.stack([signed_to_uint8(traj[i][1])[:, 0].cpu() for i in picks], dim=1)  # [10, F, H, W]
        path = out.with_name(out.stem + "_trajectory.png")
        save_grid(frames.flatten(0, 1), path, nrow=len(picks))
        print(f"trajectory (t = {', '.join(str(traj[i][0]) for i in picks)}) -> {path}")


if __name__ == "__main__":
    main()
