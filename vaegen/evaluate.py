"""Measure a trained VAE: `python -m vaegen.evaluate --run results/vae`.

Writes <run>/metrics.json (and prints it) and <run>/samples.npz, the scored samples:
- likelihood on the MNIST test set: the one-sample negative ELBO (Kingma & Welling 2013,
  eq. 10) and the negative IWAE bound with k = 1000 importance samples (Burda et al. 2015,
  eq. 8), in nats per image and in bits per dimension (nats / (784 ln 2));
- sample metrics from the judge classifier (common.score) for N = 5000 samples (--n),
  500 per digit for the conditional VAE: MNIST-FD with its floor, accuracy, precision,
  recall, class histogram and entropy, nearest-training-neighbour distances;
- sampling time per 100 images, training wall time, images seen, parameter count.

What the bounds are bounds of depends on the run (`LIKELIHOOD_NOTES`): with `--decoder logistic`
they bound -log P(x) of the 8-bit test images, in bits/dim beside the DDPM's (`ddpm.likelihood`);
with `--binarize`, -log p(x) of one fixed binary draw of the test set, in nats beside the VAE
papers'; the default Bernoulli decoder on grey levels scores soft targets, a likelihood of
neither.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from common.checkpoint import existing_run_dir, load_checkpoint, read_csv, write_json
from common.cli import ArgumentParser, nonneg_int, positive_int, user_errors
from common.data import DATA_DIR_HELP, load_mnist, to_unit
from common.distributions import nats_to_bits_per_dim
from common.judge import judge_summary, load_judge
from common.runtime import count_params, pick_device
from common.samples import save_samples
from common.score import score
from vaegen.elbo import evaluate_bounds
from vaegen.model import VAE
from vaegen.sample import generate, load_vae, sample_labels
from vaegen.train import TEST_BINARIZATION_SEED, TrainConfig, test_images

LIKELIHOOD_NOTES = {
    "grey": "Bernoulli decoder on grey levels in [0, 1] (soft targets): x log p + (1 - x) log(1 - p) of "
    "a grey x is neither the log-probability of one of 256 pixel levels nor a log density of grey "
    "levels, so these bits/dim are not comparable with a discrete bound such as the DDPM's VLB",
    "binarized": "dynamically binarized MNIST: the test set drawn once into {0, 1} (seed "
    f"{TEST_BINARIZATION_SEED}), Bernoulli decoder; nats comparable with the VAE literature's "
    "(e.g. Burda et al. 2016, Table 1)",
    "logistic": "discretized logistic decoder over the 256 levels (Salimans et al. 2017): a bound on "
    "-log P(x) of the 8-bit test images, comparable in bits/dim with the DDPM's VLB (ddpm.likelihood)",
}

# Which loss.csv columns `common.compare` plots for a VAE run.
CURVE = {"x": "epoch", "y": ["train_neg_elbo_nats", "test_neg_elbo_nats"],
         "ylabel": "negative ELBO (nats per image)", "logy": False}  # fmt: skip


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m vaegen.evaluate", description=__doc__)
    p.add_argument("--run", default="results/vae", help="run directory of vaegen.train")
    p.add_argument(
        "--n", type=positive_int, default=5000,
        help="samples to score (conditional: n/10 per digit); 5000, the N results are stated at",
    )
    p.add_argument(
        "--iwae-k", type=nonneg_int, default=1000, help="importance samples of the IWAE bound (0: skip)"
    )
    p.add_argument(
        "--test-n", type=positive_int, default=None, help="test images for the bounds (default: all)"
    )
    p.add_argument(
        "--classifier", default=None, help="judge directory (default results/classifier; trained if absent)"
    )
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    p.add_argument("--seed", type=int, default=0, help="seed of the latent draws and the bounds' noise")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    return p


def training_summary(run: Path, ckpt: dict) -> dict[str, Any]:
    """Wall time (sum of loss.csv's per-epoch seconds: training, test ELBO and sample grid),
    optimizer steps, images seen (steps x batch size) and epochs completed."""
    batch = TrainConfig.from_dict(ckpt["config"]).batch_size * int(ckpt.get("world_size", 1))  # global
    seconds = None
    if (run / "loss.csv").is_file():
        rows = read_csv(run / "loss.csv")
        if rows and "seconds" in rows[0]:
            seconds = sum(r["seconds"] for r in rows)
    return {
        "seconds": seconds,
        "steps": int(ckpt["step"]),
        "epochs": int(ckpt["epoch"]),
        "batch_size": batch,
        "images_seen": int(ckpt["step"]) * batch,
    }


@torch.no_grad()
def sampling_seconds_per_100(model: torch.nn.Module, y: torch.Tensor | None, repeats: int = 5) -> float:
    """Median wall time to draw 100 samples (z ~ N(0, I), one decoder pass, uint8 images)."""
    y100 = None if y is None else torch.arange(100) % 10
    times = []
    for i in range(repeats):
        g = torch.Generator().manual_seed(i)
        start = time.perf_counter()
        generate(model, 100, y100, g)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def likelihood_kind(cfg: TrainConfig) -> str:
    """Which data the run's bound is a likelihood of: 'binarized', 'logistic' (8-bit) or 'grey'."""
    return "binarized" if cfg.binarize else "logistic" if cfg.model.decoder == "logistic" else "grey"


def test_likelihood(
    model: VAE, cfg: TrainConfig, a: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    """The bounds on -log p(x) over the first --test-n test images (as the run was trained to see
    them: `vaegen.train.test_images`): the one-sample negative ELBO and its terms, and the negative
    IWAE bound with --iwae-k samples, with what metrics.json says."""
    dims = model.config.data_dim
    x_test, y_test = load_mnist(train=False, data_dir=a.data_dir, image_size=model.config.image_size)
    x_all = test_images(to_unit(x_test).reshape(len(x_test), -1), cfg)
    n_test = min(a.test_n or len(x_test), len(x_test))
    x = x_all[:n_test].to(device)
    y = y_test[:n_test].to(device) if model.conditional else None
    t0 = time.perf_counter()
    bounds = evaluate_bounds(model, x, y, k=a.iwae_k, batch_size=200 if a.iwae_k else 1000, seed=a.seed)
    likelihood: dict[str, Any] = {
        "test_n": n_test,
        "neg_elbo_nats": bounds["neg_elbo"],
        "neg_elbo_bits_per_dim": nats_to_bits_per_dim(bounds["neg_elbo"], dims),
        "recon_nll_nats": bounds["recon_nll"],
        "kl_nats": bounds["kl"],
    }
    if a.iwae_k:
        iwae = bounds[f"neg_iwae_k{a.iwae_k}"]
        likelihood.update(
            iwae_k=a.iwae_k, neg_iwae_nats=iwae, neg_iwae_bits_per_dim=nats_to_bits_per_dim(iwae, dims)
        )
    likelihood.update(
        data=likelihood_kind(cfg),
        bits_per_dim=likelihood.get("neg_iwae_bits_per_dim", likelihood["neg_elbo_bits_per_dim"]),
        bound=f"-IWAE (k = {a.iwae_k})" if a.iwae_k else "-ELBO",
        of="-log p(x | y)" if model.conditional else "-log p(x)",
        seconds=time.perf_counter() - t0,
        note=LIKELIHOOD_NOTES[likelihood_kind(cfg)],
    )
    return likelihood


@user_errors
def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = build_parser().parse_args(argv)
    run, device = existing_run_dir(a.run), pick_device(a.device)
    ckpt = load_checkpoint(run, "vae")
    model = load_vae(run, device)
    judge = load_judge(a.classifier, a.data_dir)  # before the slow part: fails fast without data
    started = time.perf_counter()
    name = "cvae" if model.conditional else "vae"

    likelihood = test_likelihood(model, TrainConfig.from_dict(ckpt["config"]), a, device)
    print(
        f"{name}: test -ELBO {likelihood['neg_elbo_nats']:.2f} nats"
        + (f", -IWAE(k={a.iwae_k}) {likelihood['neg_iwae_nats']:.2f} nats" if a.iwae_k else "")
        + f" ({likelihood['test_n']} images, {likelihood['seconds']:.0f} s)",
        file=sys.stderr,
        flush=True,
    )

    # samples: n of them, n/10 per digit for the conditional model
    labels = sample_labels(model, a.n, None, None)
    if labels is not None:
        labels = labels.sort(stable=True).values
    t0 = time.perf_counter()
    images = generate(model, a.n, labels, torch.Generator().manual_seed(a.seed))
    sample_seconds = time.perf_counter() - t0
    save_samples(run / "samples.npz", images, labels)
    sample_metrics = score(images, labels, judge)

    metrics = {
        "model": name,
        "run": str(run),
        "command": "python -m vaegen.evaluate " + " ".join(sys.argv[1:] if argv is None else argv),
        "conditional": model.conditional,
        "params": count_params(model),
        "train": training_summary(run, ckpt),
        "likelihood": likelihood,
        "sampling": {
            "method": "z ~ N(0, I), the decoder's mean image, one decoder pass",
            "steps": 1,
            "seconds_per_100": sampling_seconds_per_100(model, labels),
            "seconds_total": sample_seconds,
            "n": a.n,
            "device": str(device),
            "threads": torch.get_num_threads(),
        },
        "samples_file": "samples.npz",
        "samples": sample_metrics,
        "judge": judge_summary(judge),
        "curve": CURVE,
        "eval_seconds": time.perf_counter() - started,
    }
    write_json(run / "metrics.json", metrics)
    print((run / "metrics.json").read_text())
    return metrics


if __name__ == "__main__":
    main()
