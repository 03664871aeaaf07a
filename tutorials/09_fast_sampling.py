# %% [markdown]
# # 09 Fast sampling: from 1000 steps to 10
#
# Ancestral sampling (tutorial 07) takes T = 1000 network passes per digit. `ddpm.sample` draws
# digits of the same quality in 10 steps, 14 passes. This tutorial derives each choice behind
# that default, one at a time, and checks each against something independent:
#
# 1. DDIM (Song et al. 2021) solves an ODE, the probability flow; for Gaussian data its exact
#    solution is a closed form, so a solver's error can be measured, not guessed;
# 2. DPM-Solver++(2M) (Lu et al. 2022) solves the same ODE to second order;
# 3. Karras spacing (Karras et al. 2022, eq. 5) chooses *which* 10 noise levels to visit;
# 4. `--sigma-min`: ending at noise level 0.1 instead of 0, because Min-SNR training (Hang et al.
#    2023) gives the lowest-noise steps almost no weight;
# 5. the guidance interval (Kynkäänniemi et al. 2024): guiding only where it helps;
#
# and finally measures all of them on a trained model: sample quality against network passes.
#
# Run: `uv run python tutorials/09_fast_sampling.py [--out DIR] [--quick] [--data-dir DIR]
# [--run RUN_DIR]`. It samples from `results/ddpm/` (`python -m ddpm.train`), else from the run
# of tutorial 07, else trains a small model for one epoch first (a few minutes).

# %%
import argparse
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from _common import REPO, check, claim, setup, step

from common.judge import JudgeConfig, load_judge, train_classifier
from common.score import score
from ddpm.config import load_model
from ddpm.diffusion import GaussianDiffusion
from ddpm.sample import generate, requested_labels
from ddpm.samplers import SamplerSpec, guided, sample, timesteps
from ddpm.schedule import cosine_betas
from ddpm.train import main as ddpm_train

tut = setup("09_fast_sampling", "DDIM, DPM-Solver++(2M), Karras spacing, sigma_min, the guidance interval")
extra = argparse.ArgumentParser()
extra.add_argument("--run", type=Path, default=None, help="a trained run directory to sample from")
run_arg = extra.parse_known_args()[0].run
F64 = torch.float64
diff = GaussianDiffusion(cosine_betas(1000))
T = diff.T


def setting(sampler: str, steps: int, spacing: str = "uniform", **kw) -> SamplerSpec:
    """A sampler setting: plain (to t = 0, unguided, unclipped) unless asked."""
    kw = {"sigma_min": None, "guidance": 0.0, "guidance_interval": None, "clip": False, **kw}
    return SamplerSpec(sampler, steps, spacing, **kw)


# %% [markdown]
# ## 1. A deterministic sampler solves an ODE, and for Gaussian data we know its answer
# DDIM with eta = 0 moves from step t to an earlier step s by
#
# $$x_s = \sqrt{\bar\alpha_s}\,\hat x_0 + \sqrt{1 - \bar\alpha_s}\,\hat\epsilon,$$
#
# re-noising its current guess of the data x0_hat with the noise it believes is in x_t. As the
# steps shrink it becomes the probability-flow ODE (Song et al. 2021, "Score-Based Generative
# Modeling through SDEs"): a deterministic path from x_T to x_0 whose marginals are those of the
# forward process. For data x_0 ~ N(m, s^2) per pixel the marginal at t is N(mu_t, v_t), with
# mu_t = sqrt(alpha_bar_t) m and v_t = alpha_bar_t s^2 + 1 - alpha_bar_t, and the ODE is linear
# in x, so its solution is the increasing affine map between two marginals:
#
# $$x_t = \mu_t + \sqrt{v_t / v_T}\,(x_T - \mu_T)$$
#
# (the standardised value (x - mu_t) / sqrt(v_t) stays constant along a path). The best noise
# predictor is known too (tutorial 05): eps*(x_t) = sqrt(1 - alpha_bar_t) (x_t - mu_t) / v_t. So
# we can run the samplers with eps* and measure how far each lands from the exact answer. The
# samplers end with the x0 prediction at their last step, E[x_0 | x_t], so that is applied to
# the exact path's last point too.

# %%
step(1, "DDIM against the exact probability-flow solution of Gaussian data")
m, s = 0.3, 0.6


def gaussian_oracle(xt, t, y):
    a = diff.alpha_bar.to(xt.dtype)[t].reshape(-1, *[1] * (xt.dim() - 1))
    return (1 - a).sqrt() / (a * s**2 + 1 - a) * (xt - a.sqrt() * m)


def exact_x0(xT: torch.Tensor, t_last: int = 0) -> torch.Tensor:
    """The ODE's exact path from x_T to the last visited step, then E[x_0 | x] there."""
    a_T, a_0 = diff.alpha_bar[-1], diff.alpha_bar[t_last]
    mu_T, v_T, mu_0, v_0 = a_T.sqrt() * m, a_T * s**2 + 1 - a_T, a_0.sqrt() * m, a_0 * s**2 + 1 - a_0
    x_last = mu_0 + (v_0 / v_T).sqrt() * (xT - mu_T)
    return m + a_0.sqrt() * s**2 / v_0 * (x_last - mu_0)


xT = torch.randn(tut.size(2000, 200), 4, generator=torch.Generator().manual_seed(0), dtype=F64)
exact = exact_x0(xT)


def error(spec: SamplerSpec) -> float:
    """Root-mean-square distance from the exact answer, in units of the data's std s."""
    return ((sample(diff, gaussian_oracle, spec, xT) - exact).pow(2).mean().sqrt() / s).item()


step_counts = [5, 10, 20, 40, 80, 160]
err = {name: [error(setting(name, n)) for n in step_counts] for name in ("ddim", "dpm2m")}
print("    steps:          " + "  ".join(f"{n:>7d}" for n in step_counts))
for name, values in err.items():
    print(f"    {name:>6}, even:   " + "  ".join(f"{v:7.4f}" for v in values))
ratios = [a / b for a, b in zip(err["ddim"], err["ddim"][1:], strict=False)]
print("    DDIM's error ratio per doubling of the steps: " + ", ".join(f"{r:.2f}" for r in ratios))
check("DDIM is first order: each doubling of the steps halves its error (ratio 80 -> 160 steps)",
      ratios[-1], 2.0, 0.25)  # fmt: skip
check("with all 1000 steps DDIM lands on the closed form (RMS error, in data stds)",
      error(setting("ddim", T)), 0.0, 0.01)  # fmt: skip

# %% [markdown]
# ## 2. DPM-Solver++(2M): the same ODE, to second order
# Lu et al. (2022) write the ODE in lambda = log(alpha / sigma) (alpha = sqrt(alpha_bar), sigma =
# sqrt(1 - alpha_bar), so lambda is half the log-SNR) and in terms of the x0 prediction. Its
# exact solution from t to s is
#
# $$x_s = \frac{\sigma_s}{\sigma_t} x_t
#   + \sigma_s \int_{\lambda_t}^{\lambda_s} e^{\lambda}\, \hat x_0(\lambda)\, d\lambda .$$
#
# Holding x0_hat constant over the step gives exactly the DDIM step above: first order. With
# h = lambda_s - lambda_t and the previous step's h_prev, DPM-Solver++(2M) instead extrapolates
# x0_hat linearly in lambda from the previous step's prediction,
#
# $$D = \Big(1 + \frac{1}{2r}\Big)\hat x_0^{(i)} - \frac{1}{2r}\hat x_0^{(i-1)},\quad r = h_{prev}/h,\qquad
#   x_s = \frac{\sigma_s}{\sigma_t} x_t - \alpha_s (e^{-h} - 1)\, D,$$
#
# which costs no extra network pass (`ddpm.samplers.dpm_solver_2m_step`). At its first step there
# is no previous prediction, and at its last two it is first order too (Lu et al.'s "lower order
# final" for few steps). Its error should fall as h^2, four times per doubling of the steps. With
# even spacing it is far below DDIM's but does not fall that cleanly: it is dominated by the
# jumps at both ends (section 3).

# %%
step(2, "DPM-Solver++(2M) against the same closed form")
ratios2 = [a / b for a, b in zip(err["dpm2m"], err["dpm2m"][1:], strict=False)]
print("    DPM-Solver++(2M)'s error ratio per doubling: " + ", ".join(f"{r:.2f}" for r in ratios2))
closer = all(d * 3 < e for d, e in zip(err["dpm2m"][1:], err["ddim"][1:], strict=True))
claim(f"from 10 steps on it is at least 3x closer than DDIM ({err['dpm2m'][1]:.4f} vs "
      f"{err['ddim'][1]:.4f} at 10 steps)", closer)  # fmt: skip

# %% [markdown]
# ## 3. Which steps: Karras spacing
# Ten evenly spaced steps visit t = 999, 888, ..., 111, 0. In lambda, the variable the solver
# steps in, they are very uneven: a huge first jump from pure noise, small ones in the middle and
# another huge one into t = 0. Karras et al. (2022, eq. 5) space the noise levels evenly in
# sigma^(1/rho) instead, with sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) the noise-to-signal
# ratio, from sigma_max = 80 down to the last level, rho = 7 (`ddpm.samplers.timesteps`):
#
# $$\sigma_i = \Big(\sigma_{max}^{1/\rho}
#   + \tfrac{i}{S-1}\big(\sigma_{min}^{1/\rho} - \sigma_{max}^{1/\rho}\big)\Big)^\rho .$$
#
# That puts more steps at the highest noise, where a digit's class and shape are decided, and
# evens out the jumps in lambda. With the jumps even, DPM-Solver++(2M)'s error falls as a second
# order method's should. (On this Gaussian the errors at equal steps are not smaller than with
# even spacing: the oracle's x0 prediction changes smoothly with the noise level. On real digits
# it changes most at high noise, and there Karras spacing pays: section 6.)

# %%
step(3, "even and Karras spacing: the visited steps, their jumps in lambda, and the error")
for spacing in ("uniform", "karras"):
    ts = timesteps(diff, 10, spacing)
    lam = -torch.log(diff.sigma[ts])  # lambda = log(alpha / sigma) = -log(sigma_t)
    print(f"    {spacing:>7}: t = {ts.tolist()}")
    print(f"             jumps in lambda: {[round(h, 2) for h in (lam[1:] - lam[:-1]).tolist()]}")
err_karras = {name: [error(setting(name, n, "karras")) for n in step_counts] for name in ("ddim", "dpm2m")}
print("    steps:          " + "  ".join(f"{n:>7d}" for n in step_counts))
for name in ("ddim", "dpm2m"):
    print(f"    {name:>6}, Karras: " + "  ".join(f"{v:7.4f}" for v in err_karras[name]))
ratios_k = [a / b for a, b in zip(err_karras["dpm2m"], err_karras["dpm2m"][1:], strict=False)]
print("    DPM-Solver++(2M)'s error ratio per doubling, Karras: " + ", ".join(f"{r:.2f}" for r in ratios_k))
check("second order with even jumps: the error falls 4x per doubling (ratio 80 -> 160 steps)",
      ratios_k[-1], 4.0, 1.0)  # fmt: skip

fig, ax = plt.subplots(figsize=(6, 4))
for name, label in (("ddim", "DDIM"), ("dpm2m", "DPM-Solver++(2M)")):
    ax.loglog(step_counts, err[name], "o-", label=f"{label}, even steps")
    ax.loglog(step_counts, err_karras[name], "s--", label=f"{label}, Karras steps")
ax.loglog(step_counts, [err_karras["dpm2m"][3] * (40 / n) ** 2 for n in step_counts], "k:", lw=0.8,
          label="slope -2")  # fmt: skip
ax.set_xlabel("steps")
ax.set_ylabel("RMS error / data std")
ax.set_title("distance from the exact probability-flow answer", fontsize=10)
ax.legend(fontsize=7)
ax.grid(alpha=0.3, which="both")
tut.save(fig, "ode_error.png")

# %% [markdown]
# ## 4. Where to stop: sigma_min, and what Min-SNR training does to the last steps
# The project trains with the Min-SNR weighting of Hang et al. (2023): each step's squared error
# is weighted by min(SNR_t, 5) / SNR_t, so the many nearly clean steps (high SNR) count little.
# That is a good trade for training (their shape decides little about a sample), but it means the
# network is least trained exactly at the last steps a sampler visits. Karras et al.'s eq. 5 has
# a sigma_min, the noise level of the last step, where the sampler returns its x0 prediction;
# `ddpm.sample` ends at sigma_min = 0.1 instead of at t = 0 (sigma_0 = 0.0064) and so skips them.
# With a perfect denoiser that costs something: the last step's x0 prediction is the *mean* of
# what x_t could have come from, so the samples come out slightly blurred. On the Gaussian that
# is a shrink of the spread that the closed form gives, and many steps must reproduce it.

# %%
step(4, "the Min-SNR weight per noise level, and what ending at sigma 0.1 costs a perfect denoiser")
sigma = diff.sigma
weight = diff.min_snr_weight(torch.arange(T), 5.0).double()
for level in (0.045, 0.1, 0.3, 1.0):
    t_at = int(torch.searchsorted(sigma, torch.tensor([level], dtype=F64)))
    print(f"    sigma_t = {level:5.3f} (t = {t_at + 1:3d}): Min-SNR weight {weight[t_at]:.3f}")
t_last = int(timesteps(diff, 160, "karras", 0.1)[-1])
shrink = (exact_x0(xT, t_last).std() / exact.std()).item()  # the exact path, ending at t_last
fine = sample(diff, gaussian_oracle, setting("dpm2m", 160, "karras", sigma_min=0.1), xT)
few = sample(diff, gaussian_oracle, setting("dpm2m", 10, "karras", sigma_min=0.1), xT)
print(f"    ending at t = {t_last + 1} (sigma {sigma[t_last]:.3f}) shrinks the spread to {shrink:.4f} of "
      f"the exact answer's; 160 steps there: {fine.std() / exact.std():.4f}; 10 steps: "
      f"{few.std() / exact.std():.4f}")  # fmt: skip
check("spread with 160 Karras steps to sigma 0.1, against the closed form's shrink",
      fine.std() / exact.std(), shrink, 0.005)  # fmt: skip
print("    So with a perfect denoiser sigma_min costs about 1 % of the spread, less than 10 steps' own")
print("    error; what it buys, with a Min-SNR-trained network, is measured in section 6.")

fig, ax = plt.subplots(figsize=(6, 3.6))
ax.semilogx(sigma, weight, label="Min-SNR weight min(SNR, 5) / SNR")
ax.axvline(0.1, color="tab:red", ls="--", label="sigma_min = 0.1")
for t_k in timesteps(diff, 10, "karras").tolist():
    ax.axvline(sigma[t_k].item(), color="gray", lw=0.6, alpha=0.6)
ax.set_xlabel("noise level sigma_t (grey lines: 10 Karras steps to t = 0)")
ax.set_ylabel("weight in the training loss")
ax.legend(fontsize=8)
ax.grid(alpha=0.3, which="both")
tut.save(fig, "min_snr_weight.png")

# %% [markdown]
# ## 5. Guiding only where it helps
# Classifier-free guidance (tutorial 07) doubles the cost of a step: two predictions, with and
# without the label. Kynkäänniemi et al. (2024) found it harmful at the highest noise (it costs
# diversity) and nearly useless at the lowest; `ddpm.sample` guides only the steps whose sigma_t
# lies in (0.28, 5.42]. Of its 10 steps, these are guided (`ddpm.samplers.guided`):

# %%
step(5, "which of the default's 10 steps are guided, and what that costs")
default = SamplerSpec()  # ddpm.sample's default
ts_default = timesteps(diff, default.steps, default.spacing, default.sigma_min).tolist()
is_guided = [guided(float(sigma[t]), default.guidance, default.guidance_interval) for t in ts_default]
marks = [f"{sigma[t]:.2f}{'*' if g else ''}" for t, g in zip(ts_default, is_guided, strict=True)]
print(f"    sigma_t of the 10 steps (* guided): {', '.join(marks)}")
check("network passes per batch, 10 steps with 4 guided", default.passes(diff), 14, 0)
print(f"    guiding every step would cost {SamplerSpec(guidance_interval=None).passes(diff)} passes")

# %% [markdown]
# ## 6. All of it on a trained model: quality against network passes
# The oracle cannot say which settings give good *digits*. For that we sample from a trained
# model and score the samples with the project's judge (tutorial 08): MNIST-FD over its floor
# (lower is better, 1 is real data) and the share of digits the judge reads as requested. Each
# setting adds one idea to the previous one, at guidance w = 0.5, from the same seed. Small N
# makes these numbers noisy (at N = 1000, FD moves by 0.1-0.3 with the seed alone; see
# docs/experiments.md), so read them as a trend, and compare with the tables of docs/results.md.

# %%
step(6, "a trained model: DDIM -> DPM-Solver++(2M) -> Karras -> sigma_min -> interval")
tutorial_07_run = REPO / "results" / "tutorials" / "07_train_and_sample" / "run"
runs = [run_arg] if run_arg else [REPO / "results" / "ddpm", tutorial_07_run]
run = next((r for r in runs if (r / "checkpoint.pt").is_file()), None)
if run is None or tut.quick:
    run = tut.out / "run"
    print(f"    no trained run found: training a small model into {run} (one epoch)")
    argv = ["--out", str(run), "--overwrite", "--data-dir", str(tut.data_root()), "--device", "cpu",
            "--epochs", "1", "--base-channels", tut.size("16", "8"), "--channel-mult", "1,2,4",
            "--lr", "2e-3", "--batch-size", str(tut.size(128, 16)),
            "--warmup-steps", str(tut.size(50, 2))]  # fmt: skip
    ddpm_train(argv + (["--max-steps", "12"] if tut.quick else []))
model, diffusion, ckpt = load_model(run, torch.device("cpu"))
print(f"    sampling from {run} (step {ckpt['step']} EMA weights)")
if tut.quick:
    judge_dir = tut.out / "judge"
    train_classifier(judge_dir, tut.data_root(), JudgeConfig(channels=(4, 8), features=16, epochs=1,
                     batch_size=64, augment=False), log=lambda *a, **k: None)  # fmt: skip
    judge = load_judge(judge_dir, tut.data_root(), train=False)
else:
    judge = load_judge(None, tut.data_root())  # results/classifier, trained there on first use
w = 0.5
settings = {
    "DDIM, even": setting("ddim", 10, guidance=w, clip=True),
    "DPM-Solver++(2M), even": setting("dpm2m", 10, guidance=w, clip=True),
    "+ Karras spacing": setting("dpm2m", 10, "karras", guidance=w, clip=True),
    "+ sigma_min 0.1": setting("dpm2m", 10, "karras", sigma_min=0.1, guidance=w, clip=True),
    "+ guidance interval (ddpm.sample)": SamplerSpec(guidance=w),  # its setting, at this w
}
n = tut.size(1000, 40)
y = requested_labels(n, None, None)
scores = {}
for name, spec in settings.items():
    images = generate(model, diffusion, spec.for_model(diffusion), y, seed=0)
    m_ = score(images, y, judge)
    scores[name] = (spec.passes(diffusion), m_["fd_ratio"], m_["accuracy"])
    print(f"    {name:>34}: {scores[name][0]:2d} passes, MNIST-FD {m_['fd_ratio']:.2f}x floor, "
          f"accuracy {m_['accuracy']:.1%} (N = {n})")  # fmt: skip
ddim_fine = setting("ddim", tut.size(50, 10), guidance=w, clip=True)
images = generate(model, diffusion, ddim_fine.for_model(diffusion), y, seed=0)
m_ = score(images, y, judge)
scores[f"DDIM, {ddim_fine.steps} even steps"] = (ddim_fine.passes(diffusion), m_["fd_ratio"], m_["accuracy"])
print(f"    {'DDIM, ' + str(ddim_fine.steps) + ' even steps':>34}: {ddim_fine.passes(diffusion)} passes, "
      f"MNIST-FD {m_['fd_ratio']:.2f}x floor, accuracy {m_['accuracy']:.1%}")  # fmt: skip

fig, ax = plt.subplots(figsize=(7, 4.2))
for name, (passes, fd, acc) in scores.items():
    ax.scatter(passes, fd, s=40)
    ax.annotate(f"{name}\n{acc:.1%}", (passes, fd), textcoords="offset points", xytext=(5, 2), fontsize=7)
ax.set_xscale("log")
ax.set_xlabel("network passes per batch (x2 where guided)")
ax.set_ylabel("MNIST-FD / floor (lower is better)")
ax.set_title(f"quality against cost, w = {w}, N = {n} (label: judge accuracy)", fontsize=10)
ax.grid(alpha=0.3, which="both")
tut.save(fig, "quality_vs_passes.png")
print("\ndone: docs/experiments.md has the measurements behind each default at N = 1000.")

# %% [markdown]
# ## Exercises
# 1. Add Heun's method (Karras et al. 2022, Algorithm 1) as a sampler, following
#    docs/extending.md, and add it to sections 1 and 2: does its error fall four times per
#    doubling, like DPM-Solver++(2M)'s? It costs two passes per step: compare at equal passes.
# 2. Change rho in `timesteps(diff, 10, "karras", rho=...)` to 1 and 20 and look at the visited
#    steps and their jumps in lambda: which rho is even spacing in sigma, and which in lambda?
# 3. In section 6, add the setting `SamplerSpec(guidance=0.25)` and `SamplerSpec(guidance=0.75)`:
#    how do FD and accuracy move with w?
