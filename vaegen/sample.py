"""Draw digits from a trained VAE: z ~ N(0, I), x = the decoder's mean image of p_theta(x|z).

    uv run python -m vaegen.sample --run results/vae --n 100 --out results/vae/samples.npz
    uv run python -m vaegen.sample --run results/cvae --n 100 --digit 7 --out sevens.npz
    uv run python -m vaegen.sample --run results/vae --interpolate 0,1 --out results/vae/samples.npz

Generation follows the model's generative process (Kingma & Welling 2013, Section 2.1:
z from the prior p(z), then x from p_theta(x|z)); like the paper's figures we show the
decoder's mean image instead of a binary draw. Writes the shared samples format (npz with
images uint8 [N, 28, 28], labels int64 [N] for the conditional model) and a PNG grid beside it.
`--interpolate A,B` adds <out>_interpolation.png: decoded points on the line between the
posterior means of test images A and B. A model with a 2-D latent space also gets
<out>_manifold.png (the paper's Figure 4: a grid of z through the Gaussian inverse CDF).
"""

from __future__ import annotations

from pathlib import Path

import torch

from common.checkpoint import load_checkpoint
from common.cli import ArgumentParser, UserError, digit, digit_list, index_pair, positive_int, user_errors
from common.data import DATA_DIR_HELP, load_mnist, to_unit, unit_to_uint8
from common.runtime import pick_device
from common.samples import save_samples
from common.viz import save_grid
from vaegen.model import VAE, VAEConfig


def load_vae(run: str | Path, device: torch.device) -> VAE:
    """The model stored in a vaegen.train checkpoint (run directory or checkpoint file), in eval mode."""
    state = load_checkpoint(run, "vae", map_location=device)
    try:
        config = VAEConfig.from_dict(state["config"]["model"])
        model = VAE(config)
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{run}: checkpoint does not hold a VAE of this project: {first[:200]}") from None
    return model.to(device).eval()


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m vaegen.sample", description=__doc__)
    p.add_argument("--run", default="results/vae", help="run directory (or its checkpoint.pt)")
    p.add_argument("--n", type=positive_int, default=100, help="number of samples")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--digit", type=digit, default=None, help="conditional model: draw only this digit")
    which.add_argument(
        "--labels", type=digit_list, default=None,
        help="conditional model: digits to draw, e.g. 0,1,2, repeated to fill --n (default: 0..9 in turn)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the latent draws")
    p.add_argument("--out", default=None, help="samples file (.npz); default <run>/samples.npz")
    p.add_argument(
        "--interpolate", type=index_pair, default=None, metavar="A,B",
        help="also write a latent interpolation strip between test images A and B (indices)",
    )
    p.add_argument("--steps", type=positive_int, default=10, help="points on the interpolation line")
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP + ", for --interpolate")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    return p


def sample_labels(model: VAE, n: int, digit: int | None, labels: list[int] | None) -> torch.Tensor | None:
    """Labels y long [n] for a conditional model (None for an unconditional one)."""
    if not model.conditional:
        if digit is not None or labels:
            flag = "--digit" if digit is not None else "--labels"
            raise UserError(f"{flag} needs a conditional model; this run was trained without --conditional")
        return None
    if digit is not None:
        return torch.full((n,), digit, dtype=torch.long)
    if labels is not None:
        if not labels:
            raise UserError("--labels is empty; give digits such as 0,1,2")
        return torch.tensor(labels, dtype=torch.long).repeat(n // len(labels) + 1)[:n]
    return torch.arange(n, dtype=torch.long) % 10


@torch.no_grad()
def generate(
    model: VAE, n: int, y: torch.Tensor | None, generator: torch.Generator, batch_size: int = 10_000
) -> torch.Tensor:
    """n decoder mean images (`VAE.mean_image`), z ~ N(0, I) -> uint8 images [n, 28, 28]."""
    device = next(model.parameters()).device
    side = model.config.image_size
    out = []
    for start in range(0, n, batch_size):
        m = min(batch_size, n - start)
        z = torch.randn(m, model.config.latent_dim, generator=generator).to(device)
        yb = None if y is None else y[start : start + m].to(device)
        out.append(unit_to_uint8(model.mean_image(model.decode(z, yb))).reshape(m, side, side).cpu())
    return torch.cat(out)


@torch.no_grad()
def interpolation_strip(
    model: VAE, x_a: torch.Tensor, x_b: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, steps: int
) -> torch.Tensor:
    """[steps + 2, 28, 28] in [0, 1]: x_a, decode((1 - t) mu_a + t mu_b) for t in [0, 1], x_b.

    mu is the posterior mean of q_phi(z|x); a conditional model also blends the one-hot labels.
    """
    device = next(model.parameters()).device
    x = torch.stack([x_a, x_b]).reshape(2, -1).to(device)
    y = torch.stack([y_a, y_b]).to(device) if model.conditional else None
    mu, _ = model.encode(x, y)
    t = torch.linspace(0, 1, steps, device=device).unsqueeze(1)  # [steps, 1]
    z = (1 - t) * mu[0] + t * mu[1]
    y_t = None
    if model.conditional:
        onehot = torch.nn.functional.one_hot(y, model.config.num_classes).float()
        y_t = (1 - t) * onehot[0] + t * onehot[1]
    decoded = model.mean_image(model.decode(z, y_t)).cpu()
    side = model.config.image_size
    return torch.cat([x[:1].cpu(), decoded, x[1:].cpu()]).reshape(-1, side, side)


@torch.no_grad()
def latent_manifold(model: VAE, y: int | None, size: int = 20) -> torch.Tensor:
    """[size^2, 28, 28] decoder means over a size x size grid in a 2-D latent space.

    As in Kingma & Welling 2013, Figure 4: evenly spaced points of the unit square mapped
    through the Gaussian inverse CDF, so the grid covers the prior's mass evenly.
    """
    device = next(model.parameters()).device
    u = torch.linspace(0.05, 0.95, size)
    coords = torch.special.ndtri(u)
    # rows go top to bottom in the figure, so z_2 decreases down the grid
    z = torch.stack(torch.meshgrid(coords.flip(0), coords, indexing="ij"), dim=-1).reshape(-1, 2)
    z = z[:, [1, 0]].to(device)  # (z_1 along the row, z_2 down the column)
    yb = None if y is None else torch.full((z.shape[0],), y, dtype=torch.long, device=device)
    side = model.config.image_size
    return model.mean_image(model.decode(z, yb)).reshape(-1, side, side).cpu()


@user_errors
def main(argv: list[str] | None = None) -> Path:
    """Write the samples file (and figures); returns its path."""
    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    model = load_vae(args.run, device)
    run_dir = Path(args.run) if Path(args.run).is_dir() else Path(args.run).parent
    out = Path(args.out) if args.out else run_dir / "samples.npz"
    if out.suffix != ".npz":
        raise UserError(f"--out {out}: the samples file must end in .npz")

    y = sample_labels(model, args.n, args.digit, args.labels)
    if args.interpolate is not None:  # check the indices before writing anything
        x_test, y_test = load_mnist(train=False, data_dir=args.data_dir, image_size=model.config.image_size)
        a, b = args.interpolate
        if max(a, b) >= len(x_test):
            raise UserError(f"--interpolate {a},{b}: the test set has indices 0..{len(x_test) - 1}")

    g = torch.Generator().manual_seed(args.seed)
    images = generate(model, args.n, y, g)
    save_samples(out, images, y)
    print(f"wrote {args.n} samples to {out} and {out.with_suffix('.png')}")

    if args.interpolate is not None:
        strip = interpolation_strip(
            model, to_unit(x_test[a]), to_unit(x_test[b]), y_test[a], y_test[b], args.steps
        )
        path = out.with_name(out.stem + "_interpolation.png")
        save_grid(strip, path, nrow=len(strip))
        print(f"wrote the interpolation between test images {a} and {b} to {path}")

    if model.config.latent_dim == 2:
        if model.conditional and args.digit is None:
            print("2-D latent manifold skipped: give --digit for a conditional model")
        else:
            path = out.with_name(out.stem + "_manifold.png")
            save_grid(latent_manifold(model, args.digit), path, nrow=20)
            print(f"wrote the 2-D latent manifold to {path}")
    return out


if __name__ == "__main__":
    main()
