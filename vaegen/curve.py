"""Nats against training minutes for evaluated VAE runs: `python -m vaegen.curve --runs R1 R2 ...`.

Each run (trained by `vaegen.train`, scored by `vaegen.evaluate`) is a line of its test -ELBO
after each epoch (loss.csv) against the minutes of training so far, ending in its final
-ELBO and -IWAE (metrics.json); with `--reference NATS` a horizontal line marks a published
number (for dynamically binarized MNIST, Burda et al. 2016, Table 1: 86.76 nats, -IWAE k = 5000
of a one-stochastic-layer VAE trained with k = 1). Runs of different lengths show where a
shorter schedule stops and what a longer one buys: each run anneals its learning rate over its
own epochs, so a long run's early points are not what a short run reaches. Writes --out and
prints one line per run.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt

import common.viz  # noqa: F401  (selects the Agg backend)
from common.checkpoint import existing_run_dir, read_csv
from common.cli import ArgumentParser, UserError, positive_float, user_errors


def run_curve(run: Path) -> dict:
    """A run's per-epoch (minutes, test -ELBO) and its final bounds, from loss.csv and metrics.json."""
    metrics_path = run / "metrics.json"
    if not metrics_path.is_file():
        raise UserError(f"{run} has no metrics.json: run python -m vaegen.evaluate --run {run} first")
    metrics = json.loads(metrics_path.read_text())
    if metrics.get("model") not in ("vae", "cvae"):
        raise UserError(f"{run}/metrics.json is not a VAE's (model {metrics.get('model')!r})")
    rows = read_csv(run / "loss.csv")
    minutes, total = [], 0.0
    for r in rows:
        total += r["seconds"] / 60
        minutes.append(total)
    lik = metrics["likelihood"]
    return {
        "name": run.name,
        "epochs": metrics["train"]["epochs"],
        "minutes": minutes,
        "test_neg_elbo": [r["test_neg_elbo_nats"] for r in rows],
        "neg_elbo": lik["neg_elbo_nats"],
        "neg_iwae": lik.get("neg_iwae_nats"),
        "iwae_k": lik.get("iwae_k"),
        "data": lik.get("data"),
    }


def plot(curves: list[dict], path: Path, reference: float | None) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for c in curves:
        (line,) = ax.plot(
            c["minutes"], c["test_neg_elbo"], lw=1, label=f"{c['name']} ({c['epochs']} epochs): -ELBO"
        )
        if c["neg_iwae"] is not None:
            ax.plot(
                [c["minutes"][-1]],
                [c["neg_iwae"]],
                "o",
                color=line.get_color(),
                label=f"{c['name']}: -IWAE (k = {c['iwae_k']}) {c['neg_iwae']:.2f}",
            )
    if reference is not None:
        ax.axhline(reference, color="k", ls="--", lw=0.8, label=f"published: {reference:g}")
    ax.set_xscale("log")
    ax.set_xlabel("training minutes (2 CPU cores)")
    ax.set_ylabel("test bound (nats per image)")
    lows = [v for c in curves for v in [min(c["test_neg_elbo"]), c["neg_iwae"] or 1e9]] + [reference or 1e9]
    ax.set_ylim(min(lows) - 1, min(lows) + 15)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m vaegen.curve", description=__doc__)
    p.add_argument("--runs", nargs="+", required=True, help="evaluated vaegen.train run directories")
    p.add_argument("--reference", type=positive_float, default=None, help="a published bound in nats")
    p.add_argument("--out", default="results/vae_curve.png", help="figure path (.png)")
    return p


@user_errors
def main(argv: list[str] | None = None) -> list[dict]:
    a = build_parser().parse_args(argv)
    out = Path(a.out)
    if out.suffix != ".png":
        raise UserError(f"--out {out}: the figure must end in .png")
    curves = [run_curve(existing_run_dir(r)) for r in a.runs]
    plot(curves, out, a.reference)
    for c in curves:
        iwae = f", -IWAE (k = {c['iwae_k']}) {c['neg_iwae']:.2f}" if c["neg_iwae"] is not None else ""
        minutes = c["minutes"][-1]
        print(f"{c['name']}: {c['epochs']} epochs, {minutes:.1f} min, -ELBO {c['neg_elbo']:.2f}{iwae} nats")
    print(f"wrote {out}")
    return curves


if __name__ == "__main__":
    main()
