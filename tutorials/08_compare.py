# %% [markdown]
# # 08 Comparing the VAE and the DDPM by numbers
#
# "VAE samples are blurry, diffusion samples are sharp" is a judgement by eye. This tutorial
# turns it into numbers anyone can reproduce, with the project's own evaluation commands:
#
# - a **judge**: a small CNN trained on MNIST (`common.judge`). Its penultimate layer is the
#   feature space of every sample metric, the way Inception features are for FID;
# - **MNIST-FD**: the Fréchet distance between Gaussians fitted to the judge's features of N
#   samples and of the test set. Even real digits do not score 0 (N is finite), so every FD is
#   shown next to its **floor**, the FD of N real training images, and as a ratio to it;
# - **accuracy**: the share of samples the judge labels as the digit that was asked for
#   (conditional models only);
# - **precision and recall** (Kynkäänniemi et al. 2019): the share of samples that fall on the
#   real-data manifold (sharp, realistic) and the share of real data that falls on the
#   samples' manifold (diverse, no mode collapse), each manifold the union of k-NN balls;
# - **likelihood bounds**: the VAE's ELBO and IWAE bound and the DDPM's variational bound.
#   They measure different things (the VAE's Bernoulli decoder treats grey levels as soft
#   targets), so they are reported, not ranked;
# - **cost**: seconds to draw 100 digits, and minutes of training.
#
# By default it reads the evaluated runs that the commands of docs/results.md write to `results/vae`,
# `results/cvae` and `results/ddpm` (`--runs DIR` for another folder). A run that is missing
# or not yet evaluated is replaced by a small one trained and evaluated here (a few minutes on
# a laptop CPU), and `--quick` always trains tiny ones (seconds, for CI).
#
# Run: `uv run python tutorials/08_compare.py [--out DIR] [--quick] [--data-dir DIR] [--runs DIR]`.

# %%
import argparse
import contextlib
import io
import json
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from _common import REPO, claim, setup, step

from common import compare, viz
from common.judge import JudgeConfig, train_classifier
from common.samples import load_samples
from ddpm import evaluate as ddpm_evaluate
from ddpm import train as ddpm_train
from vaegen import evaluate as vae_evaluate
from vaegen import train as vae_train

tut = setup("08_compare", "VAE, conditional VAE and DDPM side by side: sample quality, likelihood, cost")
extra = argparse.ArgumentParser()
extra.add_argument("--runs", type=Path, default=REPO / "results", help="holds evaluated vae/, cvae/, ddpm/")
runs_root = extra.parse_known_args()[0].runs
NAMES = ("vae", "cvae", "ddpm")


def evaluated(run: Path) -> bool:
    return (run / "metrics.json").is_file() and (run / "samples.npz").is_file()


def read_metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


# %% [markdown]
# ## 1. The runs and the judge
# Every number below comes from one judge, so the judge is fixed first: the project's cached
# one in `results/classifier` (trained on first use: 2.9 minutes and 99.67 % test accuracy when
# these notebooks were executed, by `python -m ddpm.evaluate`; the time is in `classifier.json`),
# or under `--quick` a tiny one trained here in seconds. Runs that already carry a
# `metrics.json` were scored by the judge named in it; the tutorial checks it is the same one.

# %%
step(1, "find evaluated runs, or train and evaluate small ones")
data_root = str(tut.data_root())
runs = {name: runs_root / name for name in NAMES}
to_make = [n for n in NAMES if tut.quick or not evaluated(runs[n])]
if tut.quick:
    judge = tut.out / "judge"
    tiny = JudgeConfig(channels=(4, 8), features=16, epochs=1, batch_size=64, augment=False)
    info = train_classifier(judge, data_root, tiny, log=lambda *a, **k: None)
    print(f"    tiny judge trained here: test accuracy {info['test_accuracy']:.3f}")
else:
    judge = REPO / "results" / "classifier"
    print(f"    judge: {judge}" + ("" if (judge / "classifier.pt").is_file() else " (trained on first use)"))
scored = ["--classifier", str(judge), "--data-dir", data_root, "--device", "cpu"]
for name in NAMES:
    if name not in to_make:
        print(f"    {name}: evaluated run {runs[name]}")
        continue
    runs[name] = run = tut.out / "runs" / name
    start = time.perf_counter()
    if name in ("vae", "cvae"):
        argv = ["--out", str(run), "--overwrite", "--data-dir", data_root, "--device", "cpu",
                "--epochs", str(tut.size(5, 1))] + (["--conditional"] if name == "cvae" else [])  # fmt: skip
        if tut.quick:
            argv += ["--batch-size", "64", "--max-steps", "4"]
        vae_train.main(argv)
        with contextlib.redirect_stdout(io.StringIO()):  # it prints metrics.json; we read the file
            vae_evaluate.main(["--run", str(run), "--n", str(tut.size(500, 50)),
                               "--iwae-k", str(tut.size(100, 10)), "--test-n", str(tut.size(1000, 64)),
                               *scored])  # fmt: skip
    else:
        argv = [
            "--out", str(run), "--overwrite", "--data-dir", data_root, "--device", "cpu", "--epochs", "1",
            "--base-channels", str(tut.size(16, 8)), "--channel-mult", tut.size("1,2,4", "1,2"),
            "--blocks-per-level", tut.size("0,1,1", "0,1"), "--attention-levels", tut.size("2", ""),
            "--batch-size", str(tut.size(64, 16)), "--warmup-steps", str(tut.size(50, 2)),
            "--timesteps", str(tut.size(1000, 50)),
        ]  # fmt: skip
        if tut.quick:
            argv += ["--max-steps", "8"]
        ddpm_train.main(argv)
        with contextlib.redirect_stdout(io.StringIO()):
            ddpm_evaluate.main(
                ["--run", str(run), "--guidance", tut.size("0,1,3", "0,2"),
                 "--samplers", tut.size("ddim10,ddim20", "ddim5"), "--n", str(tut.size(500, 50)),
                 "--vlb-n", str(tut.size(4, 2)), "--batch-size", str(tut.size(100, 50)), *scored]
            )  # fmt: skip
    print(f"    {name}: trained and evaluated here in {time.perf_counter() - start:.0f} s -> {run}")

m = {name: read_metrics(runs[name]) for name in NAMES}
judges = {(r["judge"]["test_accuracy"], r["judge"]["params"]) for r in m.values()}
claim(f"all three runs were scored by one judge (test accuracy, params: {sorted(judges)})", len(judges) == 1)

# %% [markdown]
# ## 2. The report
# `common.compare` reads only each run's `metrics.json`, `samples.npz` and `loss.csv`; it never
# imports a model package, so any model that writes these files can join the table. It writes
# `report.md` with the side-by-side table and its figures (sample grids, training curves,
# FD and accuracy against sampling steps, the guidance frontier, nearest training images).

# %%
step(2, "write the side-by-side report with common.compare")
report_dir = tut.out / "compare"
compare.main([*(str(runs[n]) for n in NAMES), "--out", str(report_dir), "--data-dir", data_root,
              "--classifier", str(judge)])  # fmt: skip
blocks = (report_dir / "report.md").read_text().split("\n\n")
table = next(b for b in blocks if b.startswith("| run | sampler"))  # the first table: samples and cost
print("\n".join("    " + line for line in table.splitlines()))


# %% [markdown]
# ## 3. Sample quality against sampling cost
# The VAE draws a digit with one decoder pass; the DDPM with one UNet pass per step, two with
# guidance (conditional and unconditional, batched together). So the fair comparison is not
# "which is better" but "how good, at what price": FD over its floor against seconds per 100
# digits, one point per model and sampler setting. Lower left is better.

# %%
step(3, "quality (MNIST-FD / floor) against the cost of 100 digits")
points = [(n, "decoder", m[n]["sampling"]["seconds_per_100"], m[n]["samples"]) for n in ("vae", "cvae")]
points += [("ddpm", s["name"], s["seconds_per_100"], s["metrics"]) for s in m["ddpm"]["settings"]]
curves: dict[str, list[tuple[float, float, dict]]] = {}  # DDPM: one curve per sampler, along w
for s in m["ddpm"]["settings"]:
    point = (s["guidance"], s["seconds_per_100"], s["metrics"])
    curves.setdefault(f"{s['method']}, {s['steps']} steps", []).append(point)


def plot_models(ax, x_of, y_of) -> None:
    """VAE and CVAE as single points, the DDPM as a curve per sampler labelled by guidance w."""
    for name in ("vae", "cvae"):
        ax.scatter(x_of(m[name]["sampling"]["seconds_per_100"], m[name]["samples"]),
                   y_of(m[name]["samples"]), s=50, label=name)  # fmt: skip
    for sampler, rows in sorted(curves.items()):
        rows.sort(key=lambda r: r[0])
        xs, ys = [x_of(sec, r) for _, sec, r in rows], [y_of(r) for _, _, r in rows]
        ax.plot(xs, ys, "o-", ms=5, label=f"ddpm {sampler}")
        for (w, _, _), x, y in zip(rows, xs, ys, strict=True):
            ax.annotate(f"w={w:g}", (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")


for name, setting, sec, s in points:
    print(f"    {name:5s} {setting:10s} {sec:9.4f} s / 100 digits   "
          f"FD {s['fd']:.2f} = {s['fd_ratio']:.1f}x floor")  # fmt: skip
fig, ax = plt.subplots(figsize=(6.5, 4.2))
plot_models(ax, lambda sec, r: sec, lambda r: r["fd_ratio"])
ax.set(xscale="log", yscale="log", xlabel="seconds per 100 digits (log)", ylabel="MNIST-FD / floor (log)",
       title="sample quality against sampling cost")  # fmt: skip
ax.axhline(1.0, color="grey", ls=":", lw=1)
ax.grid(alpha=0.3, which="both")
ax.legend(fontsize=8)
tut.save(fig, "quality_vs_cost.png")
vae_sec = max(m[n]["sampling"]["seconds_per_100"] for n in ("vae", "cvae"))
ddpm_sec = min(s["seconds_per_100"] for s in m["ddpm"]["settings"])
claim(f"one decoder pass is cheaper than any diffusion sampler: VAE {vae_sec * 1e3:.2f} ms vs DDPM "
      f"{ddpm_sec * 1e3:.0f} ms per 100 digits ({ddpm_sec / vae_sec:.0f}x)", vae_sec < ddpm_sec)  # fmt: skip

# %% [markdown]
# ## 4. Sharp or diverse: precision and recall
# Blurry averages land between the real digits, off the data manifold: low precision. A model
# that draws only a few kinds of each digit has high precision but low recall (mode collapse).
# Real training images mark what a perfect model would score at this N and k (the floor).
# Classifier-free guidance (Ho & Salimans 2022) moves the DDPM along this axis: larger w, more
# precise and more accurate, less diverse.

# %%
step(4, "precision against recall, and what guidance does")
fig, ax = plt.subplots(figsize=(5.5, 4.2))
floor = m["vae"]["samples"]
ax.scatter(floor["recall_floor"], floor["precision_floor"], marker="*", s=160, color="k", label="real images")
plot_models(ax, lambda sec, r: r["recall"], lambda r: r["precision"])
ax.set(xlabel="recall (diversity)", ylabel="precision (realism)", title="precision and recall (k-NN)")
ax.grid(alpha=0.3)
ax.legend(fontsize=8, loc="lower left")
tut.save(fig, "precision_recall.png")
for sampler, rows in sorted(curves.items()):
    print(f"    {sampler}: " + "; ".join(
        f"w={w:g} accuracy {r['accuracy']:.3f} precision {r['precision']:.2f} recall {r['recall']:.2f}"
        for w, _, r in rows))  # fmt: skip
print(f"    conditional VAE: accuracy {m['cvae']['samples']['accuracy']:.3f} precision "
      f"{m['cvae']['samples']['precision']:.2f} recall {m['cvae']['samples']['recall']:.2f}")  # fmt: skip
memo = {n: m[n]["samples"]["memorization"]["ratio"] for n in NAMES}
print("    memorisation check, distance to the nearest training image over the same for test images: "
      + ", ".join(f"{n} {r:.2f}" for n, r in memo.items()) + " (well below 1: copying)")  # fmt: skip


# %% [markdown]
# ## 5. The likelihoods, and why they are not ranked
# Each bound is an upper bound on -log p(x): the VAE's single-sample negative ELBO, its
# importance-weighted bound (tighter, Burda et al. 2015), and the DDPM's sum of KL terms
# (Ho et al. 2020, eq. 5). The VAE's nats are a density of continuous grey levels under a
# Bernoulli decoder; the DDPM's bits are a probability of 256 discrete levels. Different
# quantities, so they go in the table but do not decide the comparison.

# %%
step(5, "likelihood bounds")
for name in ("vae", "cvae"):
    lik = m[name]["likelihood"]
    print(f"    {name}: -ELBO {lik['neg_elbo_nats']:.2f} nats = recon {lik['recon_nll_nats']:.2f} + KL "
          f"{lik['kl_nats']:.2f}; -IWAE (k = {lik['iwae_k']}) {lik['neg_iwae_nats']:.2f} nats "
          f"({lik['test_n']} test images)")  # fmt: skip
    if not tut.quick:  # a barely trained VAE has a posterior close to its prior, and the two bounds meet
        claim(f"{name}: the IWAE bound is tighter than the ELBO ({lik['neg_iwae_nats']:.2f} <= "
              f"{lik['neg_elbo_nats']:.2f} nats)", lik["neg_iwae_nats"] <= lik["neg_elbo_nats"])  # fmt: skip
lik = m["ddpm"]["likelihood"]
print(f"    ddpm: VLB {lik['bits_per_dim']:.3f} bits/dim = prior {lik['prior_bits_per_dim']:.3f} + KL terms "
      f"{lik['terms_bits_per_dim']:.3f} + decoder {lik['decoder_bits_per_dim']:.3f} "
      f"({lik['test_n']} test images)")  # fmt: skip

# %% [markdown]
# ## 6. The pictures behind the numbers
# Ten samples per digit from each model (the DDPM at its best setting). The unconditional VAE
# cannot be asked for a digit, so its samples are shown in the order drawn.

# %%
step(6, "samples side by side")


def tile(images: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Ten per digit, a row per digit when labelled; else the first 100."""
    if labels is not None:
        order = torch.cat([torch.nonzero(labels == d).flatten()[:10] for d in range(10)])
        images = images[order]
    x = images[:100].reshape(-1, 1, 28, 28).float() / 255
    return viz.tile(x, 10)[0]


fig, axes = plt.subplots(1, 3, figsize=(12, 4.3))
for ax, name in zip(axes, NAMES, strict=True):
    images, labels = load_samples(runs[name] / "samples.npz")
    ax.imshow(tile(images, labels), cmap="gray", vmin=0, vmax=1)
    s = m[name]["samples"]
    what = "decoder" if name != "ddpm" else m["ddpm"]["best"]
    ax.set_title(f"{name} ({what}): FD {s['fd_ratio']:.1f}x floor", fontsize=9)
    ax.axis("off")
tut.save(fig, "samples_side_by_side.png")
print(f"    the full report, with all its figures, is {report_dir / 'report.md'}")

# %% [markdown]
# ## Exercises
# 1. Score a samples file yourself: `uv run python -m common.score results/vae/samples.npz
#    --data-dir DIR` prints the same keys as the `samples` entry of `results/vae/metrics.json`;
#    check that `fd` and `accuracy` agree.
# 2. The floor depends on N: score the first 100 of the DDPM's samples (save them with
#    `common.samples.save_samples`) and compare `fd_floor` and `fd_ratio` with N = 1000.
# 3. Add a point to the quality-against-cost figure: evaluate the DDPM at 20 steps
#    (`python -m ddpm.evaluate --samplers dpm2m20 --guidance 0.5` on a copy of the run) and
#    see where the new point lands.

