"""The DDPM's likelihood bound on MNIST test images: `python -m ddpm.likelihood --run results/ddpm`.

    -log p(x0) <= L_T + sum_{t>=1} L_{t-1} + L_0        (Ho et al. 2020, eq. 5)

in bits per dimension on the 8-bit test images (the integers 0..255 the model was trained on,
scaled to [-1, 1]; the decoder L_0 is a discretized Gaussian over the 256 levels), so the number
stands beside a VAE's -ELBO with a discretized decoder (`vaegen.train --decoder logistic`).
The sum over the T steps is estimated from --strata sampled steps per image
(`ddpm.bound.vlb_estimate`; 0: all T steps, `vlb_bits_per_dim`), and the standard error
over the images says how well the mean is known (it includes the spread between digits).

By default the model is asked without a label (its null label, the unconditional model that
label dropout trained), so the bound is on -log p(x0) as an unconditional VAE's is; `--condition
label` gives the bound on -log p(x0 | y) with the true digits. Writes <run>/likelihood.json (or
--out) and prints it.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from common.checkpoint import existing_run_dir, write_json
from common.cli import ArgumentParser, nonneg_int, positive_int, user_errors
from common.data import DATA_DIR_HELP, load_mnist, to_signed
from common.runtime import pick_device
from ddpm.bound import vlb_bits_per_dim, vlb_estimate
from ddpm.config import load_model
from ddpm.diffusion import GaussianDiffusion

CONDITIONS = ("none", "label")


@torch.no_grad()
def variational_bound(
    model: torch.nn.Module,
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    y: torch.Tensor | None,
    seed: int,
    strata: int = 50,
    batch_size: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Mean bound terms over images x0 [N, 1, 28, 28] in [-1, 1] with labels y [N] (None: the
    model's null label), in bits/dim, with the standard error of the total.

    strata > 0: `vlb_estimate` with that many sampled steps per image (strata + 1 passes each);
    strata = 0, or at least the T - 1 KL steps: `vlb_bits_per_dim`, every step (T passes each).
    Images go through in batches of `batch_size` (default: about 512 model inputs per call).
    """
    device = next(model.parameters()).device
    strata = 0 if strata >= diffusion.T - 1 else strata
    passes = strata + 1 if strata else diffusion.T
    batch_size = batch_size or max(1, 512 // passes)
    g = torch.Generator(device=device).manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {"total": [], "prior": [], "terms": [], "decoder": []}
    for start in tqdm(range(0, len(x0), batch_size), desc="bound", leave=False, disable=not progress):
        xb = x0[start : start + batch_size].to(device)
        yb = torch.full((len(xb),), model.null_label) if y is None else y[start : start + batch_size]
        yb = yb.to(device)
        if strata:
            out = vlb_estimate(diffusion, model, xb, yb, strata, generator=g)
        else:
            out = vlb_bits_per_dim(diffusion, model, xb, yb, generator=g)
            out = {**out, "terms": out["terms"][:, 1:].sum(1)}
        for name in parts:
            parts[name].append(out[name].double().cpu())
    cat = {name: torch.cat(v) for name, v in parts.items()}
    n = len(cat["total"])
    return {
        "bits_per_dim": cat["total"].mean().item(),
        "bits_per_dim_stderr": cat["total"].std().item() / math.sqrt(n) if n > 1 else None,
        "prior_bits_per_dim": cat["prior"].mean().item(),
        "terms_bits_per_dim": cat["terms"].mean().item(),
        "decoder_bits_per_dim": cat["decoder"].mean().item(),
        "test_n": n,
        "strata": strata or None,
        "passes_per_image": passes,
    }


def test_bound(
    model: torch.nn.Module,
    diffusion: GaussianDiffusion,
    n: int,
    condition: str,
    strata: int,
    seed: int,
    data_dir: str | None,
) -> dict[str, Any]:
    """`variational_bound` on the first n MNIST test images, with what a metrics file says of it."""
    x_test, y_test = load_mnist(train=False, data_dir=data_dir)
    n = min(n, len(x_test))
    y = y_test[:n] if condition == "label" else None
    t0 = time.perf_counter()
    bound = variational_bound(model, diffusion, to_signed(x_test[:n]), y, seed, strata, progress=True)
    how = f"{bound['strata']} stratified steps per image" if bound["strata"] else f"all {diffusion.T} steps"
    bound.update(
        subset=f"the first {n} MNIST test images (8-bit, 256 levels)",
        bound="VLB (Ho et al. 2020, eq. 5)",
        of="-log p(x0 | y) (true labels, no guidance)" if condition == "label" else "-log p(x0) (null label)",
        T=diffusion.T,
        seconds=time.perf_counter() - t0,
        note=f"sum over t estimated from {how}; each KL term a one-sample estimate over xt; "
        "discretized Gaussian decoder over 256 levels; stderr over images",
    )
    return bound


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m ddpm.likelihood", description=__doc__)
    p.add_argument("--run", default="results/ddpm", help="run directory of ddpm.train")
    p.add_argument("--n", type=positive_int, default=1000, help="test images (the first N)")
    p.add_argument(
        "--strata",
        type=nonneg_int,
        default=50,
        help="sampled steps per image for the sum over t (0: all T steps, T passes per image)",
    )
    p.add_argument(
        "--condition",
        choices=CONDITIONS,
        default="none",
        help="none: -log p(x0) through the null label; label: -log p(x0 | y) with the true digits",
    )
    p.add_argument("--out", default=None, help="where to write the JSON (default <run>/likelihood.json)")
    p.add_argument("--raw-weights", action="store_true", help="the raw weights, not the EMA")
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    p.add_argument("--seed", type=int, default=0, help="seeds the sampled steps and the noise")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    return p


@user_errors
def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = build_parser().parse_args(argv)
    run, device = existing_run_dir(a.run), pick_device(a.device)
    model, diffusion, _ = load_model(run, device, use_ema=not a.raw_weights)
    bound = test_bound(model, diffusion, a.n, a.condition, a.strata, a.seed, a.data_dir)
    bound.update(
        run=str(run),
        weights="raw" if a.raw_weights else "ema",
        command="python -m ddpm.likelihood " + " ".join(sys.argv[1:] if argv is None else argv),
    )
    out = a.out or run / "likelihood.json"
    write_json(out, bound)
    print(
        f"bound {bound['bits_per_dim']:.4f} +- {bound['bits_per_dim_stderr'] or math.nan:.4f} bits/dim "
        f"on {bound['test_n']} test images ({bound['seconds']:.0f} s); wrote {out}",
        file=sys.stderr,
    )
    return bound


if __name__ == "__main__":
    main()
