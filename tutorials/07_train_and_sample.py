# %% [markdown]
# # 07 Training the DDPM, and sampling from it
#
# Tutorials 04-06 built every piece: the forward process, the reverse step and its samplers
# (checked with an oracle), and the UNet that replaces the oracle. This one trains that UNet on
# MNIST and looks at what it learned: the loss at each noise level, a sample being denoised step
# by step, what classifier-free guidance does, and how few steps a sampler can get away with.
#
# Both algorithms of Ho et al. 2020 are written out here as a few lines over the library's
# functions, and checked against what the project runs: Algorithm 1 (one training step)
# against `ddpm.train.train_step`, Algorithm 2 (ancestral sampling) against
# `ddpm.samplers.sample`. Training itself is one call to the project's command,
# `ddpm.train.main(argv)`, here with a smaller UNet for one epoch, a few minutes on a laptop CPU.
# Its run directory (`<out>/run/`: config, checkpoint, loss.csv, sample grids) is kept, so
# `uv run python -m ddpm.sample --run <out>/run` works on it afterwards, and tutorials 06 and 09
# find it there. The digits of so short a run are recognisable but far from the best
# this project gets; a full run (`uv run python -m ddpm.train`, 6 epochs or 30 minutes on 2 CPU
# cores, whichever comes first) writes `results/ddpm/`, and `--run results/ddpm` makes this
# tutorial use it instead.
#
# Run: `uv run python tutorials/07_train_and_sample.py [--out DIR] [--quick] [--data-dir DIR]
# [--run RUN_DIR]`.

# %%
import argparse
import math
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from _common import REPO, check, claim, setup, step

from common import viz
from common.checkpoint import read_csv
from common.data import signed_to_uint8, to_signed
from common.ema import make_ema
from common.runtime import count_params
from ddpm.config import DDPMConfig, build_model, load_model
from ddpm.sample import generate
from ddpm.samplers import Denoiser, SamplerSpec, sample
from ddpm.train import TrainState, train_step
from ddpm.train import main as ddpm_train
from ddpm.unet import UNetConfig

tut = setup("07_train_and_sample", "train a small DDPM on CPU; denoising, guidance and step-count grids")
extra = argparse.ArgumentParser()
extra.add_argument(
    "--run", type=Path, default=None, help="a trained run directory to use instead of training"
)
run_arg = extra.parse_known_args()[0].run
cpu = torch.device("cpu")


def tile(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """uint8 [N, 28, 28] -> one [H, W] grid in [0, 1] for imshow (white gutters)."""
    x = images.reshape(-1, 1, 28, 28).float() / 255
    return viz.tile(x, nrow)[0]


def knn_judge(reference: torch.Tensor, labels: torch.Tensor, k: int = 5):
    """A classifier with no training: the majority label of the k nearest reference digits in pixel space."""
    ref = reference.reshape(len(reference), -1).float() / 255

    def predict(images: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(images.reshape(len(images), -1).float() / 255, ref)
        return labels[d.topk(k, largest=False).indices].mode(dim=1).values

    return predict


# %% [markdown]
# ## 1. Algorithm 1, written out
# One training step of Ho et al. 2020, Algorithm 1, with the label dropped to the "no label"
# class 10 % of the time (Ho & Salimans 2022, Algorithm 1), so that the same network learns
# p(x | y) and p(x) for guidance:
#
#     x_0, y ~ data;  y = null with probability 0.1;  t ~ Uniform({1, ..., T});  eps ~ N(0, I)
#     gradient step on  || eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t, y) ||^2
#
# `algorithm_1_step` below is exactly that, over the library's `q_sample` (Ho et al. eq. 4) and
# `eps_loss` (eq. 14). `ddpm.train.train_step`, the step `python -m ddpm.train` runs, adds two
# things to it: gradient-norm clipping and an update of the weights' moving average (EMA),
# which is what we sample with. With clipping off, both must leave the same weights when they
# start from the same weights and the same seed; the check below runs both.

# %%
step(1, "Algorithm 1 as five lines, against ddpm.train.train_step")
P_UNCOND = 0.1


def algorithm_1_step(model, opt, diffusion, x0, y):
    """One step of Algorithm 1 (Ho et al. 2020) with the label drop of Ho & Salimans 2022."""
    drop = torch.rand(y.shape) < P_UNCOND  # y = null with probability 0.1
    y = torch.where(drop, torch.full_like(y, model.null_label), y)
    t = torch.randint(0, diffusion.T, (len(x0),))  # t ~ Uniform({1, ..., T}) (0-based here)
    eps = torch.randn_like(x0)  # eps ~ N(0, I)
    xt = diffusion.q_sample(x0, t, eps)  # sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
    loss = diffusion.eps_loss(model(xt, t, y), eps, t).mean()  # || eps - eps_theta(x_t, t, y) ||^2
    opt.zero_grad()
    loss.backward()
    opt.step()  # the gradient step
    return loss


def tiny_model():
    """A small UNet and its diffusion, with the same initial weights at every call."""
    torch.manual_seed(0)
    unet = UNetConfig(8, (1, 2), blocks_per_level=(0, 1), attention_levels=())
    return build_model(DDPMConfig(prediction="eps", unet=unet))


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


x_probe, y_probe = tut.mnist(train=True)
x_probe, y_probe = to_signed(x_probe[:16]), y_probe[:16]
model_a, diffusion_a = tiny_model()
before = flat(model_a)
opt_a = torch.optim.AdamW(model_a.parameters(), lr=1e-3, weight_decay=0.0)
torch.manual_seed(1)  # the same draws of labels, t and eps for both
algorithm_1_step(model_a, opt_a, diffusion_a, x_probe, y_probe)
model_b, diffusion_b = tiny_model()
opt_b = torch.optim.AdamW(model_b.parameters(), lr=1e-3, weight_decay=0.0)
torch.manual_seed(1)
state = TrainState(model_b, model_b, make_ema(model_b, 0.999, warmup=True), opt_b, diffusion_b)
train_step(state, x_probe, y_probe, lr=1e-3, p_uncond=P_UNCOND, snr_gamma=0, grad_clip=0)
print(f"    one step moved the weights by up to {(flat(model_a) - before).abs().max():.1e}")
check("largest weight difference, written out vs train_step", (flat(model_a) - flat(model_b)).abs().max(),
      0, 1e-7)  # fmt: skip

# %% [markdown]
# ## 2. Train (or load) the model
# The UNet here is the project's default layout (tutorial 06) with narrower levels, 16/32/64
# channels instead of 16/48/96: 0.55 M parameters instead of 1.2 M, and half the FLOPs (0.085
# GFLOP per image). It trains for one epoch (468 steps of 128 images): AdamW at 2e-3 after a
# short warm-up, cosine decay, gradient clipping, and the EMA of the weights.
#
# The loss is L_simple, the mean squared error of the predicted noise (Ho et al. eq. 14), at a
# t drawn uniformly from 1..T. (The project's default run weights each t's term by
# min(SNR_t, 5) / SNR_t, "Min-SNR", which learns faster per CPU minute (docs/experiments.md);
# here `--snr-gamma 0` keeps the plain L_simple, so that the logged loss is the eps MSE itself;
# tutorial 09 looks at what Min-SNR changes. The default run's UNet also outputs
# v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0, converted to eps (`ddpm.config.VPrediction`),
# and the default run draws t so that the noise level sigma_t = sqrt((1 - alpha_bar_t) /
# alpha_bar_t) is log-normal, half the steps at sigma in (1, 5.4]
# (`ddpm.schedule.lognormal_t_probs`); here `--prediction eps --noise-levels uniform` keep Ho et
# al.'s network, which outputs eps itself, and their uniform t.) A network that outputs zeros
# scores E[eps^2] = 1 (our UNet starts there: its last layer is initialised to
# zero). The loss *per t* tells where the work is. At large t, x_t is almost pure noise, so
# eps ~ x_t and predicting it is easy. At small t, x_t is almost the clean digit and the network
# must find a faint noise on top of it: on the flat background that is easy, on the strokes it
# is hard. We measure it on test digits, which training never saw; a test loss close to the
# training loss means no overfitting.

# %%
step(2, "train a small DDPM with ddpm.train (or load --run)")
x_test_u8, y_test = tut.mnist(train=False)
x_train_u8, y_train = tut.mnist(train=True)
small = tut.size(
    UNetConfig(base_channels=16, channel_mult=(1, 2, 4)),
    UNetConfig(base_channels=8, channel_mult=(1, 2), blocks_per_level=(0, 1), attention_levels=()),
)
if run_arg is not None:
    run = run_arg
    print(f"    using the trained run in {run} (no training)")
else:
    run = tut.out / "run"
    if (REPO / "results" / "ddpm" / "checkpoint.pt").is_file():
        print("    (a full run exists in results/ddpm: pass --run results/ddpm to sample from it instead)")

    def join(values: tuple[int, ...]) -> str:
        return ",".join(str(v) for v in values)

    argv = [
        "--out", str(run), "--overwrite", "--data-dir", str(tut.data_root()), "--device", "cpu",
        "--epochs", "1", "--batch-size", str(tut.size(128, 16)), "--warmup-steps", str(tut.size(50, 2)),
        "--lr", "2e-3", "--snr-gamma", "0", "--prediction", "eps", "--noise-levels", "uniform",
        "--log-every", str(tut.size(10, 1)),
        "--base-channels", str(small.base_channels), "--channel-mult", join(small.channel_mult),
        "--blocks-per-level", join(small.blocks_per_level), "--mid-blocks", str(small.mid_blocks),
        "--attention-levels", join(small.attention_levels),
    ]  # fmt: skip
    if tut.quick:  # a dozen steps, ending before the epoch's sample grid (16 steps on the synthetic data)
        argv += ["--max-steps", "12"]
    print("    python -m ddpm.train " + " ".join(argv))
    start = time.perf_counter()
    ddpm_train(argv)
    print(f"    trained in {time.perf_counter() - start:.0f} s")
model, diffusion, ckpt = load_model(run, cpu)  # the EMA weights
print(f"    UNet {count_params(model):,} parameters, {ckpt['step']} steps; T = {diffusion.T}")

rows = read_csv(run / "loss.csv")
steps_logged = [r["step"] for r in rows]
loss_logged = [r["loss"] for r in rows]
n_eval = tut.size(256, 16)
x0 = to_signed(x_test_u8[:n_eval])
y0 = y_test[:n_eval]
g = torch.Generator().manual_seed(0)
eps = torch.randn(x0.shape, generator=g)
t_grid = torch.logspace(0, math.log10(diffusion.T), tut.size(25, 5)).round().long().unique() - 1  # 0-based


def loss_at(t: int) -> torch.Tensor:
    """L_simple at one fixed step t (0-based) over the held-out digits, the same eps for every t."""
    xt = diffusion.q_sample(x0, t, eps)
    return ((model(xt, torch.full((n_eval,), t), y0) - eps) ** 2).mean()


with torch.no_grad():
    per_t = torch.stack([loss_at(int(t)) for t in t_grid])
    # L_simple itself (t uniform on 1..T, as in training), averaged over 4 draws of (t, eps) per digit
    test_loss = torch.stack([diffusion.loss(model, x0, y0, generator=g) for _ in range(4)]).mean().item()
zero_loss = (eps**2).mean().item()
late = [v for s, v in zip(steps_logged, loss_logged, strict=True) if s > 0.8 * steps_logged[-1]]
train_loss = sum(late) / len(late)
print(
    f"    L_simple: first logged {loss_logged[0]:.3f}, last 20% of training {train_loss:.4f};"
    f" test digits {test_loss:.4f}; zero predictor {zero_loss:.4f}"
)
shown_t = range(0, len(t_grid), 4)
print("    per t (test): " + ", ".join(f"t={int(t_grid[i]) + 1}: {per_t[i]:.3f}" for i in shown_t))
check("the zero predictor's loss", zero_loss, 1.0, 0.05, "E[eps^2] = 1")
claim(f"training lowered the loss: {loss_logged[0]:.3f} -> {train_loss:.4f}", train_loss < loss_logged[0])
if not tut.quick:
    claim(f"the trained model's test loss is far below 1: {test_loss:.4f}", test_loss < 0.2)
    check("test loss / training loss (no overfitting)", test_loss / train_loss, 1.0, 0.25)
    claim(
        f"the hardest steps are the least noisy: loss {per_t[0]:.3f} at t = 1, {per_t[-1]:.4f} at t = T",
        per_t[0] > per_t[len(per_t) // 2] > per_t[-1],
    )

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.8))
ax1.plot(
    steps_logged, loss_logged, lw=0.9, label=f"training batches (mean of every {int(steps_logged[0])} steps)"
)
ax1.axhline(test_loss, color="tab:orange", ls="--", label=f"test digits, EMA weights: {test_loss:.4f}")
ax1.set_yscale("log")
ax1.set_xlabel("optimizer step")
ax1.set_ylabel("L_simple (eps MSE)")
ax1.set_title("training loss")
ax1.legend(fontsize=8)
ax2.plot(t_grid + 1, per_t, "o-", ms=3, label="trained model (test digits)")
ax2.axhline(zero_loss, color="gray", ls=":", label="predicting eps = 0")
ax2.set_xscale("log")
ax2.set_yscale("log")
ax2.set_xlabel("step t (log scale)")
ax2.set_ylabel("eps MSE at this t")
ax2.set_title("where the work is: loss per noise level")
ax2.legend(fontsize=8)
for ax in (ax1, ax2):
    ax.grid(alpha=0.3, which="both")
tut.save(fig, "training.png")

# %% [markdown]
# ## 3. Algorithm 2, written out: one sample, step by step
# Ancestral sampling (Ho et al. 2020, Algorithm 2) from x_T ~ N(0, I), one digit per class:
#
#     x_T ~ N(0, I);  for t = T, ..., 1:  z ~ N(0, I) if t > 1, else z = 0
#         x_{t-1} = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta(x_t, t)) / sqrt(alpha_t) + sigma_t z
#
# `algorithm_2` below is that loop over the library's `p_step` (the line above, with sigma_t^2 =
# beta_tilde_t, Ho et al.'s "fixed small" variance, and x0_hat clipped to [-1, 1]). eps_theta is
# the guided prediction at w = 1 (section 4), from `ddpm.samplers.Denoiser`, the one place the
# project applies guidance. `ddpm.samplers.sample` with the ancestral sampler and all T steps
# must draw the same digits from the same seed; the check below runs both. Beside each x_t we
# show the network's current guess of the final image, x0_hat = (x_t - sqrt(1 - alpha_bar_t)
# eps_theta) / sqrt(alpha_bar_t) (tutorial 05, step 2).
#
# The guess settles long before x_t looks like anything. At t = T it is speckle: alpha_bar_T is
# tiny, so dividing by its square root magnifies every error of eps_theta, and clipping to
# [-1, 1] leaves black and white dots. A hundred steps later it is a blurred digit of the
# requested class, an average of everything that could still hide in the noise. By the middle
# of the chain the digit's identity and rough shape are decided: a judge that needs no training
# (the majority label of the 5 nearest training digits in pixel space; section 4 checks it on
# real digits) reads the requested digit in the guess, and the guess is close to the final
# sample. The remaining steps sharpen strokes and edges, the details that live at low noise.

# %%
step(3, "Algorithm 2 as a loop over p_step, against ddpm.samplers.sample; the trajectory")
judge = knn_judge(x_train_u8[:10_000], y_train[:10_000])
W = 1.0  # guidance at every step, in sections 3 and 5 (ddpm.sample guides at 0.35, in an interval)
SEED = 7
y10 = torch.arange(10)


@torch.no_grad()
def algorithm_2(model, diffusion, y, w, g, trajectory):
    """Ancestral sampling (Ho et al. 2020, Algorithm 2), guided with weight w; appends (t, x_t)."""
    x = torch.randn(len(y), 1, 28, 28, generator=g)  # x_T ~ N(0, I)
    eps_theta = Denoiser(model, y, diffusion.sigma, guidance=w)  # (1 + w) eps(x, y) - w eps(x, null)
    for t in reversed(range(diffusion.T)):  # t = T, ..., 1 (0-based: T - 1, ..., 0)
        trajectory.append((t, x))
        z = torch.randn(x.shape, generator=g) if t > 0 else None  # no noise at the last step
        x = diffusion.p_step(eps_theta(x, t), t, x, z)  # x_{t-1} = mu_theta(x_t, t) + sigma_t z
    return x


def plain(sampler: str, steps: int, w: float = W) -> SamplerSpec:
    """`steps` evenly spaced steps of `sampler` to t = 0, guided at every step with w."""
    return SamplerSpec(sampler, steps, "uniform", sigma_min=None, guidance=w, guidance_interval=None)


ddpm_steps = diffusion.T
start = time.perf_counter()
traj = []  # (t, x_t) at each step
x_ddpm = algorithm_2(model, diffusion, y10, W, torch.Generator().manual_seed(SEED), traj)
ddpm_seconds = time.perf_counter() - start
g = torch.Generator().manual_seed(SEED)
xT = torch.randn(10, 1, 28, 28, generator=g)
x_library = sample(diffusion, model, plain("ddpm", diffusion.T), xT, y10, g)
check("largest pixel difference, written-out Algorithm 2 vs ddpm.samplers.sample",
      (x_ddpm - x_library).abs().max(), 0, 1e-4)  # fmt: skip
traj.append((-1, x_ddpm))
guided = Denoiser(model, y10, diffusion.sigma, guidance=W)  # eps~ as the sampler saw it
picks = torch.linspace(0, len(traj) - 1, 11).round().long().tolist()
frames, guesses, gap, read = [], [], {}, {}
print("         t   RMS(x0_hat - final sample)   judge reads the requested digit in x0_hat")
for i in picks:
    t, xt = traj[i]
    if t >= 0:
        with torch.no_grad():
            x0_hat = diffusion.predict_x0(xt, t, guided(xt, t)).clamp(-1, 1)
    else:  # the end of the chain: the sample itself
        x0_hat = xt
    frames.append(signed_to_uint8(xt.clamp(-2.5, 2.5) / 2.5)[:, 0])  # noise shown on a -2.5..2.5 scale
    guesses.append(signed_to_uint8(x0_hat)[:, 0])
    gap[t + 1] = (x0_hat - x_ddpm).pow(2).mean().sqrt().item()
    read[t + 1] = (judge(guesses[-1]) == y10).float().mean().item()
    print(f"    {t + 1:6d}   {gap[t + 1]:26.3f}   {read[t + 1]:>20.0%}")
middle = min(gap, key=lambda t: abs(t - diffusion.T // 2))  # the shown step nearest T/2
if not tut.quick and not tut.synthetic:
    claim(
        f"at t = {middle} the guess is already {gap[middle] / gap[diffusion.T]:.0%} of its t = T distance"
        f" from the sample, and the judge reads {read[middle]:.0%} of the digits in it",
        gap[middle] < 0.5 * gap[diffusion.T] and read[middle] >= 0.7,
    )

fig, axes = plt.subplots(1, 2, figsize=(14, 6.8), layout="constrained")
titles = ("x_t, the sampler's state (scale -2.5..2.5)", "x0_hat, the network's guess of x_0 from x_t")
for ax, images, title in zip(axes, (frames, guesses), titles, strict=True):
    ax.imshow(tile(torch.stack(images, dim=1).flatten(0, 1), len(picks)), cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([16 + 30 * k for k in range(len(picks))], [str(traj[i][0] + 1) for i in picks], fontsize=8)
    ax.set_yticks([])
    ax.set_xlabel("step t (0: the sample)")
    ax.set_title(title, fontsize=10)
fig.suptitle(f"DDPM sampling, {ddpm_steps} steps, guidance w = {W:g}: one digit per class", fontsize=11)
tut.save(fig, "trajectory.png")

# %% [markdown]
# ## 4. Classifier-free guidance
# The network was trained both with the label and, 10% of the time, with the null label, so it
# predicts the noise of p(x | y) and of p(x). Guidance (Ho & Salimans 2022, eq. 6) samples with
#
# $$\tilde\epsilon = (1 + w)\,\epsilon_\theta(x_t, y) - w\,\epsilon_\theta(x_t, \varnothing),$$
#
# which, read as scores, is sampling from p(x | y) p(y | x)^w: it pushes each sample towards
# images that are *typical of their class*, beyond what the conditional model alone does. Below,
# the same starting noise for each w (DDIM, 50 steps). With w = 0 some digits are ambiguous or
# malformed; as w grows they turn into clearer members of their class and look more alike:
# guidance trades diversity for fidelity. (Grey blotches that guidance does not remove are a
# flaw of the short run's DDIM samples; section 5 comes back to them.)
#
# To measure "recognisable" we ask the judge of section 3 (5 nearest training digits in pixel
# space), after checking it on real test digits. It agrees with the requested label more often
# as w grows, while the spread within a class (the mean distance between two samples of one
# digit) shrinks.

# %%
step(4, "guidance strength w = 0, 1, 3: a grid, a judge, and the spread within a class")
n_judge = tut.size(1000, 64)
judge_acc = (judge(x_test_u8[:n_judge]) == y_test[:n_judge]).float().mean().item()
print(f"    the judge (5-NN on 10,000 training digits) on {n_judge} real test digits: {judge_acc:.1%}")
per_digit = tut.size(8, 2)
y_grid = torch.arange(10).repeat_interleave(per_digit)
ddim_fine = tut.size(50, 10)
samples, agree, spread, ink = {}, {}, {}, {}
for w in (0.0, 1.0, 3.0):
    samples[w] = generate(model, diffusion, plain("ddim", ddim_fine, w), y_grid, seed=11)
    agree[w] = (judge(samples[w]) == y_grid).float().mean().item()
    flat = samples[w].reshape(10, per_digit, -1).float() / 255
    spread[w] = (torch.cdist(flat, flat).sum() / (10 * per_digit * (per_digit - 1))).item()
    ink[w] = (samples[w].float() / 255).mean().item()
    print(
        f"    w = {w:g}: judge agrees {agree[w]:.1%}, spread within a class {spread[w]:.2f},"
        f" mean pixel {ink[w]:.3f}"
    )
if not tut.quick and not tut.synthetic:
    claim("the judge agrees more with w = 3 than with w = 0", agree[3.0] > agree[0.0])
    claim("guidance shrinks the spread within a class", spread[3.0] < spread[1.0] < spread[0.0])

fig, axes = plt.subplots(1, 3, figsize=(15, 6))
for ax, (w, images) in zip(axes, samples.items(), strict=True):
    ax.imshow(tile(images, per_digit), cmap="gray", vmin=0, vmax=1)
    ax.set_title(f"w = {w:g}: judge agrees {agree[w]:.0%}, spread {spread[w]:.2f}", fontsize=10)
    ax.axis("off")
fig.suptitle(f"classifier-free guidance, DDIM {ddim_fine} steps, the same x_T in every panel", fontsize=11)
tut.save(fig, "guidance.png")

# %% [markdown]
# ## 5. How many steps?
# DDIM with eta = 0 (Song et al. 2021) is deterministic: the sample is a function of x_T, and as
# the number of steps grows it converges to the solution of an ODE (tutorial 05, step 4). So
# from the same x_T, DDIM with 10, 20 and 50 evenly spaced steps (`spacing="uniform"`) gives
# nearly the same digit, each closer to the 50-step one, at a fifth and two fifths of its cost.
# `ddpm.sample` does not stop there: its default is 10 steps of DPM-Solver++(2M), a second-order
# solver of the same ODE, at steps spaced as Karras et al. 2022 space them, ending at a noise
# level of 0.1 and guiding only 4 of the 10 steps. Tutorial 09 derives each of these choices.
#
# The 1000-step DDPM of section 3 starts from the same x_T but adds fresh noise at every step, so
# it ends at a different sample of the same class, for 1000 network calls per digit. Its
# digits are also cleaner here: DDIM leaves grey haze or specks around some digits, DDPM a
# black background, as in the data. The fresh noise lets the chain undo errors the network made
# at earlier steps, while a deterministic path carries them to the end (Karras et al. 2022,
# "Elucidating the Design Space of Diffusion-Based Generative Models", section 4, make this
# argument). The better the network, the smaller the difference: compare `--run results/ddpm`.
# We measure the haze as the mean pixel value in the 4-pixel frame around the image, which is
# black in real digits. (DDPM with *few* steps is not shown: with our respacing its last jump
# lands on t = 0 and it behaves much like DDIM, as tutorial 05 showed.)

# %%
step(5, f"steps: DDIM {tut.size('10/20/50', '2/5/10')} vs DDPM {ddpm_steps}, all from the same x_T")
xT = torch.randn((10, 1, 28, 28), generator=torch.Generator().manual_seed(SEED))
claim(
    "the DDPM trajectory of section 3 started from the same x_T that DDIM draws from this seed",
    torch.equal(traj[0][1], xT),
)
rows_img, labels_row, seconds = [], [], {}
for S in tut.size((10, 20, 50), (2, 5, 10)):
    start = time.perf_counter()
    rows_img.append(generate(model, diffusion, plain("ddim", S), y10, seed=SEED))
    seconds[f"DDIM {S}"] = time.perf_counter() - start
    labels_row.append(f"DDIM {S}")
rows_img.append(signed_to_uint8(x_ddpm)[:, 0])
labels_row.append(f"DDPM {ddpm_steps}")
seconds[f"DDPM {ddpm_steps}"] = ddpm_seconds
ref = rows_img[2].float() / 255
dist = {
    name: ((img.float() / 255 - ref) ** 2).mean().sqrt().item()
    for name, img in zip(labels_row, rows_img, strict=True)
}
frame = torch.ones(28, 28, dtype=torch.bool)
frame[4:-4, 4:-4] = False  # the outer 4 pixels on every side


def haze(images: torch.Tensor) -> float:
    """Mean pixel value in [0, 1] over the frame of uint8 images [N, 28, 28]."""
    return (images[:, frame].float() / 255).mean().item()


hazes = {name: haze(img) for name, img in zip(labels_row, rows_img, strict=True)}
print(f"    frame haze of real test digits: {haze(x_test_u8[:1000, 0]):.4f}")
for name, img in zip(labels_row, rows_img, strict=True):
    agrees = (judge(img) == y10).float().mean().item()
    print(
        f"    {name:>9}: {seconds[name] / 10 * 1000:7.1f} ms per digit, RMS distance to {labels_row[2]}"
        f" {dist[name]:.3f}, judge agrees {agrees:.0%}, frame haze {hazes[name]:.4f}"
    )
claim(
    f"DDIM converges as steps grow: distance to {labels_row[2]} {dist[labels_row[0]]:.3f} ({labels_row[0]})"
    f" > {dist[labels_row[1]]:.3f} ({labels_row[1]})",
    dist[labels_row[0]] > dist[labels_row[1]],
)
if not tut.quick and not tut.synthetic:
    claim(
        f"DDPM's digits sit on a cleaner background: frame haze {hazes[labels_row[3]]:.4f} vs"
        f" {hazes[labels_row[2]]:.4f} for {labels_row[2]}",
        hazes[labels_row[3]] < hazes[labels_row[2]],
    )

fig, ax = plt.subplots(figsize=(10, 4.6))
ax.imshow(tile(torch.cat(rows_img), 10), cmap="gray", vmin=0, vmax=1)
ax.set_yticks(
    [16 + 30 * k for k in range(len(rows_img))],
    [f"{name}\n{seconds[name] / 10 * 1000:.0f} ms/digit" for name in labels_row],
    fontsize=8,
)
ax.set_xticks([16 + 30 * d for d in range(10)], [str(d) for d in range(10)])
ax.set_title(f"the same x_T for every row, guidance w = {W:g}", fontsize=10)
tut.save(fig, "steps.png")
print(
    f"\ndone: more samples from this model with `uv run python -m ddpm.sample --run {run}`;"
    " tutorial 08 compares it with the VAEs."
)

# %% [markdown]
# ## Exercises
# 1. Add gradient clipping to `algorithm_1_step` (`torch.nn.utils.clip_grad_norm_(model.parameters(),
#    1.0)` before `opt.step()`) and call `train_step` with `grad_clip=1.0`: the check of section 1
#    must still pass. Then give `train_step` `snr_gamma=5` and see it fail: Min-SNR reweights the
#    loss, so the gradient differs.
# 2. Run `algorithm_2` with `w = 0` and with `w = 3` from the same seed, and count with `judge`
#    how many of the ten digits it reads as requested; compare with the numbers of section 4.
# 3. Train for two epochs instead of one (`--epochs 2` in the `argv` of section 2) and compare the
#    per-t loss curve of `training.png`: which noise levels gain most from the second epoch?

