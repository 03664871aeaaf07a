# %% [markdown]
# # 10 VAE against DDPM, task by task
#
# Tutorial 08 compared the two models on one task, unconditional samples. This one sets them
# side by side on everything each is for, and lets the numbers say who wins and why:
#
# 1. **likelihood**, in the same units: bits per dimension of the 8-bit test images, the VAE
#    with a discretized logistic decoder (`vaegen.train --decoder logistic`), the DDPM through
#    its variational bound (`ddpm.likelihood`);
# 2. **reconstruction**: the VAE's encoder and decoder against the DDPM's DDIM round trip
#    (x0 -> x_T -> x0, `ddpm.interpolate`), the nearest thing a diffusion model has to an encoder;
# 3. **completion**: the top half of a digit given, the rest filled in, by the VAE's posterior
#    over z given the observed pixels (`vaegen.complete`) and by the DDPM's reverse process
#    conditioned on them (`ddpm.complete`: replacement and RePaint);
# 4. **interpolation**: a path between two test digits, in the VAE's 20-D latent space and
#    through the DDPM's 784-D noise;
# 5. **sampling cost**: seconds per 100 digits.
#
# Run: `uv run python tutorials/10_vae_vs_ddpm.py [--out DIR] [--quick] [--data-dir DIR] [--vae RUN]
# [--vae-logistic RUN] [--ddpm RUN]`. It reads `results/vae` (`python -m vaegen.train`),
# `results/vae_logistic` (`python -m vaegen.train --decoder logistic --out results/vae_logistic`)
# and `results/ddpm` (`python -m ddpm.train`); a run that is missing is replaced by a small one
# trained here (minutes), and `--quick` always trains tiny ones.

# %%
import argparse
import math
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from _common import REPO, claim, setup, step

from common.completion import completion_metrics, make_masks
from common.data import to_signed, to_unit
from common.distributions import nats_to_bits_per_dim
from common.judge import JudgeConfig, load_judge, train_classifier
from ddpm import complete as ddpm_complete
from ddpm.config import load_model
from ddpm.interpolate import noise_path, round_trip
from ddpm.likelihood import variational_bound
from ddpm.sample import generate as ddpm_generate
from ddpm.samplers import SamplerSpec, timesteps
from ddpm.train import main as ddpm_train
from vaegen import complete as vae_complete
from vaegen.elbo import evaluate_bounds
from vaegen.sample import generate as vae_generate
from vaegen.sample import load_vae
from vaegen.train import main as vae_train

tut = setup(
    "10_vae_vs_ddpm", "the VAE against the DDPM: likelihood, reconstruction, completion, interpolation"
)
extra = argparse.ArgumentParser()
extra.add_argument(
    "--vae", type=Path, default=REPO / "results" / "vae", help="a vaegen.train run (Bernoulli)"
)
extra.add_argument(
    "--vae-logistic",
    type=Path,
    default=REPO / "results" / "vae_logistic",
    help="a vaegen.train --decoder logistic run",
)
extra.add_argument("--ddpm", type=Path, default=REPO / "results" / "ddpm", help="a ddpm.train run")
runs = extra.parse_known_args()[0]
device = torch.device("cpu")

# %% [markdown]
# ## 1. The runs
# Two VAEs with the project's MLP body (784-400-20): for likelihood, the one with the
# discretized logistic decoder, whose ELBO bounds the probability of the 8-bit image as the
# DDPM's bound does; for everything else, the default Bernoulli VAE, whose decoder's mean image
# is a smooth digit (the logistic decoder's per-pixel location is not). The DDPM is the default
# conditional UNet, asked without a label (its null label) wherever the VAE has none, so
# neither model is told the digit.

# %%
step(1, "find the runs, or train small ones")
data_root = str(tut.data_root())


def vae_run_or_train(run: Path, name: str, flags: list[str]) -> Path:
    """`run` if it holds a trained VAE (and not --quick), else a small one trained here."""
    if not tut.quick and (run / "checkpoint.pt").is_file():
        return run
    out = tut.out / name
    epochs = tut.size(10, 2)
    print(f"    training a VAE ({' '.join(flags) or 'Bernoulli decoder'}) for {epochs} epochs into {out}")
    small = ["--batch-size", "64"] if tut.quick else []
    vae_train(
        [*flags, "--out", str(out), "--epochs", str(epochs), "--overwrite", "--data-dir", data_root, *small]
    )
    return out


vae_lik_run = vae_run_or_train(runs.vae_logistic, "vae_logistic", ["--decoder", "logistic"])
vae_run = vae_run_or_train(runs.vae, "vae", [])
ddpm_run = runs.ddpm
if tut.quick or not (ddpm_run / "checkpoint.pt").is_file():
    ddpm_run = tut.out / "ddpm"
    tiny = [
        "--base-channels",
        "8",
        "--channel-mult",
        "1,2,2",
        "--blocks-per-level",
        "0,1,1",
        "--mid-blocks",
        "1",
    ]
    size = [*tiny, "--timesteps", "50", "--epochs", "1"] if tut.quick else ["--epochs", "1"]
    print(f"    training a DDPM ({' '.join(size)}) into {ddpm_run}")
    ddpm_train(["--out", str(ddpm_run), "--overwrite", "--data-dir", data_root, *size])
vae_lik, vae = load_vae(vae_lik_run, device), load_vae(vae_run, device)
ddpm, diffusion, _ = load_model(ddpm_run, device)
claim(
    f"the likelihood VAE ({vae_lik_run.name}) has the logistic decoder", vae_lik.config.decoder == "logistic"
)
claim(f"the other VAE ({vae_run.name}) is unconditional", not vae.conditional)
x_test, y_test = tut.mnist(train=False)

# %% [markdown]
# ## 2. Likelihood: bits per dimension of the same 8-bit test images
# Both numbers bound -log2 P(x) / 784 for x the integers 0..255 of a test digit:
#
# - the VAE: -ELBO = KL(q(z|x) || p(z)) - E_q[log p(x|z)], with p(x|z) a discretized logistic per
#   pixel (Salimans et al. 2017), and the tighter -IWAE with k importance samples (Burda et al.);
# - the DDPM: L_T + sum_t L_{t-1} + L_0 (Ho et al. 2020, eq. 5), the sum over its 1000 steps
#   estimated from 50 stratified steps per image, with its standard error.
#
# Lower is better. The DDPM's bound splits into the prior L_T (nearly 0: x_T is almost pure
# noise), the KL terms, and the decoder L_0 (the last step's discretized Gaussian).

# %%
step(2, "likelihood in bits/dim on the same test images")
n_lik = tut.size(500, 8)
x8 = x_test[:n_lik]
k = tut.size(1000, 10)
start = time.perf_counter()
vae_bounds = evaluate_bounds(vae_lik, to_unit(x8).reshape(n_lik, -1), None, k=k, batch_size=100)
vae_seconds = time.perf_counter() - start
vae_bpd = {name: nats_to_bits_per_dim(v, 784) for name, v in vae_bounds.items()}
start = time.perf_counter()
strata = min(50, diffusion.T - 2)
ddpm_bound = variational_bound(ddpm, diffusion, to_signed(x8), None, seed=0, strata=strata)
ddpm_seconds = time.perf_counter() - start
print(f"    {n_lik} test images:")
print(
    f"    VAE  -ELBO          {vae_bpd['neg_elbo']:.3f} bits/dim   (KL {vae_bpd['kl']:.3f}, "
    f"reconstruction {vae_bpd['recon_nll']:.3f})"
)
print(f"    VAE  -IWAE k={k:<5d}  {vae_bpd[f'neg_iwae_k{k}']:.3f} bits/dim   ({vae_seconds:.0f} s)")
b = ddpm_bound
print(
    f"    DDPM bound          {b['bits_per_dim']:.3f} +- {b['bits_per_dim_stderr']:.3f} bits/dim (prior "
    f"{b['prior_bits_per_dim']:.4f}, KL terms {b['terms_bits_per_dim']:.3f}, decoder "
    f"{b['decoder_bits_per_dim']:.3f}; {ddpm_seconds:.0f} s)"
)
claim(
    "the IWAE bound is at least as tight as the ELBO (up to Monte Carlo noise)",
    vae_bpd[f"neg_iwae_k{k}"] <= vae_bpd["neg_elbo"] + 0.01,
)
best_vae = vae_bpd[f"neg_iwae_k{k}"]
winner = "VAE" if best_vae < ddpm_bound["bits_per_dim"] else "DDPM"
print(
    f"    lower bound on the code length: the {winner}, by "
    f"{abs(best_vae - ddpm_bound['bits_per_dim']):.3f} bits/dim"
)

# %% [markdown]
# Why: the DDPM was trained for samples, not for its bound. Its loss (v-prediction with a Min-SNR
# weight, noise levels drawn log-normally) puts almost no weight on the lowest-noise steps, and
# those are exactly the steps whose KL terms dominate the bound; the decoder L_0 then has to
# place each pixel in a bin 2/255 wide from a slightly noisy x_1. docs/results.md measures an
# eps-predicting, uniform-t run next to it to show how much likelihood that recipe gives up.
# The VAE pays for its blur differently: its KL term is the price of the 20-D code, and its
# decoder can be sure of the many pixels that are exactly 0.

# %% [markdown]
# ## 3. Reconstruction: an encoder against an inverted ODE
# The VAE encodes x to q(z|x) and decodes the mean of z; the DDPM has no encoder, but its
# deterministic DDIM sampler is a discretised ODE that can be run backwards (`ddim_inversion_loop`)
# and forwards again. Both errors are root-mean-square over pixels in [0, 1].

# %%
step(3, "reconstruction error: VAE encode-decode against the DDPM's DDIM round trip")
n_rec = tut.size(100, 8)
steps_rt = min(50, diffusion.T)
x_rec = x_test[:n_rec]
with torch.no_grad():
    mu, _ = vae.encode(to_unit(x_rec).reshape(n_rec, -1))
    vae_rec = vae.mean_image(vae.decode(mu)).reshape(n_rec, 28, 28)
start = time.perf_counter()
_, ddpm_back = round_trip(ddpm, diffusion, to_signed(x_rec), timesteps(diffusion, steps_rt))
rt_seconds = time.perf_counter() - start
ddpm_rec = (ddpm_back.clamp(-1, 1)[:, 0] + 1) / 2
truth = to_unit(x_rec)[:, 0]
rmse = {
    "VAE": ((vae_rec - truth) ** 2).mean().sqrt().item(),
    "DDPM": ((ddpm_rec - truth) ** 2).mean().sqrt().item(),
}
print(
    f"    RMSE over {n_rec} test digits: VAE {rmse['VAE']:.4f}, DDPM ({steps_rt} DDIM steps up and down, "
    f"{rt_seconds:.0f} s) {rmse['DDPM']:.4f}; the {min(rmse, key=rmse.get)} reconstructs better"
)
fig, axes = plt.subplots(3, 1, figsize=(8, 3.2))
for ax, images, title in zip(
    axes,
    (truth, vae_rec, ddpm_rec),
    ("test digits", "VAE: decode(mu(x))", f"DDPM: DDIM {steps_rt} steps up, then down"),
    strict=True,
):
    ax.imshow(torch.cat(list(images[:12]), dim=1), cmap="gray", vmin=0, vmax=1)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
tut.save(fig, "reconstruction.png")

# %% [markdown]
# The round trip is only approximately the identity: each inversion step evaluates eps at the
# point it starts from, not the one it lands on. The DDPM keeps the strokes' sharpness that the
# VAE blurs away, but where the inversion drifts it can land on a neighbouring digit's shape.

# %% [markdown]
# ## 4. Completion: the top half given
# The same test digits and the same mask for both. The VAE samples z from its posterior given
# only the observed pixels, p(z | x_o) proportional to p(z) p(x_o | z), by importance
# resampling, then decodes; the DDPM pastes the noised observed pixels into its own reverse
# process at every step (the replacement method) and, with RePaint, re-noises and repeats each
# step to let the two halves agree. Scores: the judge's accuracy at naming the true digit from
# the completion (neither model was told it), the squared error on the missing pixels, and the
# distance between two completions of one digit (diversity).

# %%
step(4, "completion of the bottom half from the top half")
judge_dir = REPO / "results" / "classifier"  # the project's judge, trained on first use (minutes)
if tut.quick:
    judge_dir = tut.out / "judge"
    tiny = JudgeConfig(channels=(4, 8), features=16, epochs=1, batch_size=64, augment=False)
    train_classifier(judge_dir, data_root, tiny, log=lambda *a, **k: None)
judge = load_judge(judge_dir, data_root)
n_comp = tut.size(100, 4)
digits, labels, observed = x_test[:n_comp, 0], y_test[:n_comp], make_masks("top", n_comp)
g = torch.Generator().manual_seed(0)
methods = {
    "VAE": vae_complete.completer(vae, tut.size(1000, 20)),
    "DDPM replacement": ddpm_complete.completer(ddpm, diffusion, min(50, diffusion.T), 1),
    "DDPM RePaint x4": ddpm_complete.completer(ddpm, diffusion, min(25, diffusion.T), 4),
}
scores, completions = {}, {}
for name, complete in methods.items():
    start = time.perf_counter()
    completions[name] = torch.stack([complete(digits, observed, g) for _ in range(2)], dim=1)
    scores[name] = completion_metrics(completions[name], digits, labels, observed, judge)
    scores[name]["seconds"] = time.perf_counter() - start
    s = scores[name]
    print(
        f"    {name:<17} accuracy {s['accuracy']:.3f}  masked MSE {s['masked_mse']:.4f}  diversity "
        f"{s['diversity']:.3f}  ({s['seconds']:.0f} s)"
    )
    claim(f"{name} keeps every observed pixel bit for bit", s["observed_kept"])
fig, axes = plt.subplots(1, len(methods), figsize=(9, 3.5))
for ax, name in zip(axes, methods, strict=True):
    shown = torch.where(observed[:6], digits[:6], torch.full_like(digits[:6], 128))
    cells = torch.cat([digits[:6, None], shown[:, None], completions[name][:6]], dim=1)
    grid = torch.cat([torch.cat(list(row), dim=1) for row in cells], dim=0)
    ax.imshow(grid, cmap="gray", vmin=0, vmax=255)
    ax.set_title(f"{name}\ntruth | seen | two draws", fontsize=8)
    ax.axis("off")
tut.save(fig, "completion.png")
print(
    f"    the best at naming the digit: {max(scores, key=lambda n: scores[n]['accuracy'])}; closest to the "
    f"truth: {min(scores, key=lambda n: scores[n]['masked_mse'])}"
)

# %% [markdown]
# The VAE answers in one decoder pass per proposal, and its completions are blurry means that
# sit close to the truth on average (a low squared error); the DDPM's are sharp digits, often
# a different writer's version of the same digit, which costs squared error but not accuracy.
# Replacement alone can commit to the wrong digit while the observed half is still buried in
# noise; RePaint's resampling gives the observed half its say at the same number of passes.

# %% [markdown]
# ## 5. Interpolation
# Between two test digits: the VAE walks the straight line between their posterior means in
# z (20-D) and decodes; the DDPM inverts both to x_T, walks the great circle between them
# (`slerp`: Gaussian noise lives near a sphere of radius sqrt(784), and the straight line
# passes inside it, where no training noise ever was) and runs DDIM back.

# %%
step(5, "interpolation: the VAE's latent line against the DDPM's noise sphere")
points = 8
pair = x_test[[0, 1]]
with torch.no_grad():
    mu, _ = vae.encode(to_unit(pair).reshape(2, -1))
    lam = torch.linspace(0, 1, points)[:, None]
    vae_path = vae.mean_image(vae.decode((1 - lam) * mu[0] + lam * mu[1])).reshape(points, 28, 28)
ts = timesteps(diffusion, min(50, diffusion.T))
xT, _ = round_trip(ddpm, diffusion, to_signed(pair), ts)
ddpm_path = noise_path(ddpm, diffusion, xT, lam.view(-1), ts)
ddpm_path = (ddpm_path.clamp(-1, 1)[:, 0] + 1) / 2
norms = xT.flatten(1).norm(dim=1) / math.sqrt(784)
print(f"    |x_T| / sqrt(784) of the two inverted digits: {norms[0]:.3f}, {norms[1]:.3f} (noise: about 1)")
fig, axes = plt.subplots(2, 1, figsize=(8, 2.4))
for ax, path, title in (
    (axes[0], vae_path, "VAE: decode((1 - l) mu_a + l mu_b)"),
    (axes[1], ddpm_path, "DDPM: DDIM(slerp(invert(x_a), invert(x_b), l))"),
):
    ax.imshow(torch.cat(list(path), dim=1), cmap="gray", vmin=0, vmax=1)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
tut.save(fig, "interpolation.png")

# %% [markdown]
# The VAE's path is smooth, and its middle points are blends: ghosts of both digits at once,
# since the decoder's mean averages over what a point between two codes could be. The DDPM's
# points stay sharp digits and switch from one digit to the other within a point or two: most
# directions of x_T change how a digit is written, few change which digit it is.

# %% [markdown]
# ## 6. Sampling cost

# %%
step(6, "seconds per 100 digits")
start = time.perf_counter()
vae_generate(vae, 100, None, torch.Generator().manual_seed(0))
vae_s = time.perf_counter() - start
spec = SamplerSpec().for_model(diffusion) if diffusion.T >= 200 else SamplerSpec(steps=5, sigma_min=None)
start = time.perf_counter()
ddpm_generate(ddpm, diffusion, spec, torch.arange(100) % 10, 0, 100)
ddpm_s = time.perf_counter() - start
print(
    f"    VAE: one decoder pass, {vae_s * 1000:.1f} ms; DDPM ({spec.label}): {ddpm_s:.2f} s, "
    f"{ddpm_s / vae_s:.0f}x the VAE's"
)
claim("a VAE sample costs less than a DDPM sample", vae_s < ddpm_s)

# %% [markdown]
# ## Who wins what
#
# | task | measured above | why |
# |---|---|---|
# | likelihood (bits/dim) | step 2 | a bound is tight where the training objective is the bound |
# | reconstruction | step 3 | the DDPM's inverted ODE keeps 784 numbers per digit; the VAE's code keeps 20 |
# | completion | step 4 | the VAE's posterior is cheap and blurry; the DDPM's completions are digits |
# | interpolation | step 5 | the VAE blends two digits; the DDPM moves between sharp ones |
# | sampling | step 6 | one decoder pass against 14 UNet passes |
#
# ## Exercises
# 1. Run step 2 with the DDPM asked for the true label: `variational_bound(ddpm, diffusion,
#    to_signed(x8), y_test[:n_lik], 0)`. How many bits/dim does knowing the digit save, and
#    is that more or less than log2(10) / 784?
# 2. Train the eps-predicting, uniform-t DDPM (`python -m ddpm.train --prediction eps
#    --noise-levels uniform --snr-gamma 0 --out results/ddpm_eps`) and rerun with `--ddpm
#    results/ddpm_eps`: which of the bound's three parts moves?
# 3. Complete with the `random` mask instead of `top` (`make_masks("random", n_comp)`). Which
#    model gains more, and why does a scattered half say more about a digit than its top half?
# 4. In step 3, use 10 DDIM steps instead of 50: how much does the round trip's error grow?
# 5. Replace `slerp` by a straight line in step 5 and print the norms of the midpoints: what does
#    the DDPM make of noise that is too small?
