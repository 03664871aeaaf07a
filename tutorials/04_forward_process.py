# %% [markdown]
# # 04 The forward process: how a digit is turned into noise
#
# A diffusion model (Sohl-Dickstein et al. 2015; Ho, Jain & Abbeel 2020, "DDPM") fixes a
# Markov chain that adds a little Gaussian noise at each of T steps,
#
# $$q(x_t \mid x_{t-1}) = N\big(\sqrt{1 - \beta_t}\, x_{t-1},\ \beta_t I\big),\qquad t = 1..T,$$
#
# and learns to run it backwards. Because every step is Gaussian and linear, any step can be
# reached from the data in one jump (Ho et al. eq. 4), with alpha_bar_t = prod_{s<=t} (1 - beta_s):
#
# $$q(x_t \mid x_0) = N\big(\sqrt{\bar\alpha_t}\, x_0,\ (1 - \bar\alpha_t) I\big)
#   \iff x_t = \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1 - \bar\alpha_t}\, \epsilon .$$
#
# The *schedule* beta_1..beta_T decides how fast the signal fades. This tutorial compares the
# linear schedule of Ho et al. with the squared-cosine schedule of Nichol & Dhariwal 2021
# ("Improved DDPM", eq. 17), which this project trains with, and explains its two constants.
#
# Code convention: schedule arrays are 0-based, so `betas[0]` is the paper's beta_1 and index
# t in the code is the paper's step t + 1 (see `ddpm/schedule.py`). Prose and titles below use
# the paper's steps 1..T.
#
# Run: `uv run python tutorials/04_forward_process.py [--out DIR] [--quick] [--data-dir DIR]`.

# %%
import math

import matplotlib.pyplot as plt
import torch
from _common import check, claim, setup, step

from common.data import to_signed
from common.distributions import nats_to_bits_per_dim, normal_kl
from ddpm.diffusion import GaussianDiffusion
from ddpm.schedule import cosine_betas, cosine_f, linear_betas

tut = setup(
    "04_forward_process", "noise schedules, a digit noised step by step, the cosine schedule's constants"
)
T = 1000
F64 = torch.float64

# %% [markdown]
# ## 1. Two schedules
# Ho et al. let beta rise linearly from 1e-4 to 0.02. Nichol & Dhariwal instead choose
# alpha_bar directly, alpha_bar_t = f(t) / f(0) with f(t) = cos^2( (t/T + s)/(1 + s) * pi/2 ),
# and derive beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}.
#
# The useful way to compare them is the signal-to-noise ratio of x_t,
# SNR(t) = alpha_bar_t / (1 - alpha_bar_t). The linear schedule drives it down quickly: by the
# middle of the chain almost no signal is left, and the last quarter of the steps are spent
# on what is already nearly pure noise. The cosine schedule makes log SNR = 2 log cot(theta_t)
# with an angle theta_t that grows linearly in t: log SNR falls steadily through the middle
# half of the chain (from 1.7 at t = T/4 to -1.8 at 3T/4) and steeply at both ends (10 at
# t = 1, -13 at t = T), so no long stretch of steps is spent on nearly pure noise.

# %%
step(1, "linear vs squared-cosine schedule")
schedules = {"linear (Ho et al. 2020)": linear_betas(T), "cosine (Nichol & Dhariwal 2021)": cosine_betas(T)}
diffs = {name: GaussianDiffusion(b) for name, b in schedules.items()}
lin, cos = diffs.values()
for name, d in diffs.items():
    ab = d.alpha_bar
    faded = (ab.sqrt() < 0.05).double().mean().item()
    print(
        f"    {name:>32}: alpha_bar at t=T/2 {ab[T // 2 - 1]:.4f}, at t=T {ab[-1]:.3g};"
        f" steps with signal sqrt(alpha_bar) < 5%: {faded:.1%}"
    )
u = torch.arange(T + 1, dtype=F64)
f = cosine_f(u, T)
rel = ((cos.alpha_bar[:-1] - f[1:-1] / f[0]) / cos.alpha_bar[:-1]).abs().max().item()
check("cosine: prod (1 - beta) vs f(t)/f(0), worst relative error (t < T)", rel, 0.0, 1e-10)
claim(
    "the linear schedule leaves many more steps with < 5% signal",
    (lin.alpha_bar.sqrt() < 0.05).sum() > 5 * (cos.alpha_bar.sqrt() < 0.05).sum(),
)

steps_1 = torch.arange(1, T + 1)
fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
for name, d in diffs.items():
    axes[0].plot(steps_1, d.betas, label=name)
    axes[1].plot(steps_1, d.alpha_bar, label=name)
    axes[2].plot(steps_1, (d.alpha_bar / (1 - d.alpha_bar)).log(), label=name)
axes[0].set_yscale("log")
axes[0].set_title("beta_t (log scale)")
axes[1].set_title("alpha_bar_t: share of signal variance left")
axes[2].set_title("log SNR = log alpha_bar / (1 - alpha_bar)")
axes[2].axhline(0, color="k", lw=0.6)
for ax in axes:
    ax.set_xlabel("step t")
    ax.grid(alpha=0.3)
axes[1].legend(fontsize=8)
tut.save(fig, "schedules.png")

# %% [markdown]
# ## 2. One digit, noised
# The same digit and the same eps under both schedules, so the only difference is alpha_bar_t.
# Under the linear schedule the digit is gone by t ~ 500; under the cosine schedule it is still
# visible at t = 600.
#
# The closed form of q(x_t | x_0) is what makes training cheap (one jump instead of t steps).
# To check it, run the chain itself one small step at a time on many copies of the digit
# and compare the empirical mean coefficient and noise level with sqrt(alpha_bar_t) and
# sqrt(1 - alpha_bar_t).

# %%
step(2, "one digit noised at t = 0 .. T; the one-jump formula against the step-by-step chain")
x_test, y_test = tut.mnist(train=False)
x0 = to_signed(x_test[:1]).double()  # [1, 1, 28, 28] in [-1, 1]
eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
shown = [0, 1, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]  # paper steps; 0 = x0 itself
fig, axes = plt.subplots(2, len(shown), figsize=(0.95 * len(shown), 2.45))
fig.subplots_adjust(wspace=0.05, hspace=0.08)
for row, (name, d) in enumerate(diffs.items()):
    for col, t in enumerate(shown):
        img = x0 if t == 0 else d.q_sample(x0, t - 1, eps)
        axes[row, col].imshow(img[0, 0], cmap="gray", vmin=-1.5, vmax=1.5)
        axes[row, col].set_xticks([])
        axes[row, col].set_yticks([])
        if row == 0:
            axes[row, col].set_title(f"t={t}", fontsize=8)
    axes[row, 0].set_ylabel(name.split()[0], fontsize=9)
fig.suptitle(
    "x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, same eps in both rows (grey scale -1.5..1.5)",
    fontsize=9,
)
tut.save(fig, "noised_digit.png")

n_chain = tut.size(500, 100)
x = x0.expand(n_chain, -1, -1, -1).clone()
g = torch.Generator().manual_seed(4)
checkpoints = {10, 100, 500, 900, 1000}
worst = 0.0
print("        t   mean coef: chain  sqrt(ab)   noise std: chain  sqrt(1-ab)")
for t in range(1, T + 1):  # x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) z, one step at a time
    beta = cos.betas[t - 1]
    x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn(x.shape, generator=g, dtype=F64)
    if t in checkpoints:
        m = x.mean(0, keepdim=True)
        coef = ((m * x0).sum() / (x0 * x0).sum()).item()  # least-squares fit of E[x_t] = c x0
        std = (x - m).std().item()
        ab = cos.alpha_bar[t - 1].item()
        worst = max(worst, abs(coef - math.sqrt(ab)), abs(std - math.sqrt(1 - ab)))
        print(f"    {t:5d}   {coef:14.4f}  {math.sqrt(ab):8.4f}   {std:16.4f}  {math.sqrt(1 - ab):10.4f}")
check("cosine chain vs eq. 4, worst difference over those t", worst, 0.0, tut.size(0.01, 0.03))

# %% [markdown]
# ## 3. Why s = 0.008
# Without the offset (s = 0), f'(0) = 0: the first steps add almost no noise, sqrt(beta_1) =
# sin(pi / 2T) = 0.0016, a fifth of one grey level (1/127.5 = 0.0078 in [-1, 1], tutorial 01).
# Noise that small does not change the 8-bit image at all, yet the network is asked to predict
# it: the eps target is recoverable only from sub-quantisation detail, a hard and useless
# problem. Nichol & Dhariwal (section 3.2) therefore pick s so that sqrt(beta_1) is slightly
# *smaller* than one bin, and s = 0.008 does that. The linear schedule starts above one bin.
#
# The number below: the chance that the first step's noise, sqrt(beta_1) * eps, stays within
# half a bin (1/255), so that the noised pixel still rounds to its original grey level.

# %%
step(3, "why s = 0.008: the first step's noise against one grey level (1/127.5)")
bin_width = 1 / 127.5
s_grid = torch.logspace(-4, -1, 200, dtype=F64)
first_noise = torch.stack([cosine_betas(T, s.item())[0].sqrt() for s in s_grid])


def p_invisible(std: float) -> float:
    """P(|std * eps| < half a bin), eps ~ N(0, 1): the pixel still rounds to its grey level."""
    return math.erf((bin_width / 2) / std / math.sqrt(2))


for label, s in (("cosine, s = 0", 0.0), ("cosine, s = 0.008", 0.008)):
    sd = cosine_betas(T, s)[0].sqrt().item()
    print(
        f"    {label:>18}: sqrt(beta_1) = {sd:.5f} = {sd / bin_width:.2f} bins;"
        f" the first step leaves a pixel's grey level unchanged with probability {p_invisible(sd):.1%}"
    )
sd_lin = lin.betas[0].sqrt().item()
print(
    f"    {'linear':>18}: sqrt(beta_1) = {sd_lin:.5f} = {sd_lin / bin_width:.2f} bins;"
    f" unchanged with probability {p_invisible(sd_lin):.1%}"
)
lo, hi = 0.0, 0.1  # bisection for the s at which sqrt(beta_1) equals one bin exactly
for _ in range(60):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if cosine_betas(T, mid)[0].sqrt() < bin_width else (lo, mid)
print(f"    sqrt(beta_1) equals one bin at s = {lo:.4f}")
check(
    "cosine s = 0: sqrt(beta_1)",
    cosine_betas(T, 0.0)[0].sqrt(),
    math.sin(math.pi / (2 * T)),
    1e-12,
    "sin(pi / 2T)",
)
claim(
    f"s = 0.008 gives slightly less than one bin ({cos.betas[0].sqrt():.5f} < {bin_width:.5f}),"
    f" and s = 0.008 < {lo:.4f}",
    cos.betas[0].sqrt() < bin_width and 0.008 < lo,
)

# %% [markdown]
# ## 4. Why beta is clipped at 0.999
# At the other end f(T) = cos^2(pi/2) = 0, so the last step would have beta_T = 1 - 0/f(T-1)
# = 1: alpha_T = 0 and alpha_bar_T = 0. The reverse process divides by sqrt(alpha_t)
# (Ho et al. eq. 11, mu = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t)) and by
# sqrt(alpha_bar_t) when it predicts x_0, so the first sampling step would be a division by
# zero. Nichol & Dhariwal clip beta at 0.999; only the very last step is touched, and
# 1/sqrt(alpha_T) becomes 1/sqrt(0.001) = 31.6 instead of infinity. `GaussianDiffusion`
# refuses an unclipped schedule outright.
#
# Either way x_T is pure noise for practical purposes: the prior term of the bound,
# L_T = KL(q(x_T | x_0) || N(0, I)), is tiny for both schedules.

# %%
step(4, "why beta is clipped at 0.999")
raw = cosine_betas(T, max_beta=1.0)
print("    last five betas, unclipped: " + ", ".join(f"{b:.4f}" for b in raw[-5:].tolist()))
print("    last five betas, clipped:   " + ", ".join(f"{b:.4f}" for b in cos.betas[-5:].tolist()))
claim(
    f"the clip changes only the last step ({int((raw != cos.betas).sum())} of {T})",
    int((raw != cos.betas).sum()) == 1 and raw[-1] == 1.0,
)
try:
    GaussianDiffusion(raw)
    refused = ""
except ValueError as e:
    refused = str(e)
claim(f"GaussianDiffusion refuses beta_T = 1: '{refused}'", bool(refused))
print(f"    1/sqrt(alpha_T) with the clip: {(1 - cos.betas[-1]).rsqrt():.1f}; without: 1/sqrt(0) = inf")
for name, d in diffs.items():
    ab_T = d.alpha_bar[-1]
    kl = normal_kl(ab_T.sqrt() * x0, torch.log1p(-ab_T).expand_as(x0), 0.0, 0.0).sum()
    bpd = nats_to_bits_per_dim(kl, x0.numel()).item()
    print(f"    {name:>32}: prior term L_T = {bpd:.2e} bits/dim")
    claim(f"x_T is N(0, I) to within {bpd:.1e} bits/dim", bpd < 1e-3)

t_end = torch.arange(T - 11, T + 1)
alphas = 1 - cos.betas[-12:]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
ax1.semilogx(s_grid, first_noise, label="cosine: sqrt(beta_1)")
ax1.axhline(bin_width, color="r", ls="--", label="one grey level, 1/127.5")
ax1.axhline(sd_lin, color="tab:gray", ls=":", label="linear: sqrt(beta_1) = 0.01")
ax1.axvline(0.008, color="k", lw=0.8, label="s = 0.008")
ax1.set_xlabel("offset s")
ax1.set_ylabel("noise std of the first step")
ax1.set_title("start of the chain: the offset s")
ax1.legend(fontsize=8)
ax1.grid(alpha=0.3)
ax2.semilogy(t_end, alphas.rsqrt(), "o-", label="1/sqrt(alpha_t), beta clipped at 0.999")
ax2.axhline(1 / math.sqrt(0.001), color="r", ls="--", label="clip bound 1/sqrt(0.001) = 31.6")
ax2.annotate(
    "without the clip: alpha_T = 0,\n1/sqrt(alpha_T) = inf",
    xy=(T, 31.6),
    xytext=(T - 11, 4),
    arrowprops={"arrowstyle": "->"},
    fontsize=8,
)
ax2.set_ylim(0.8, 150)
ax2.set_xlabel("step t")
ax2.set_title("end of the chain: the factor of Ho et al. eq. 11")
ax2.legend(fontsize=8, loc="upper left")
ax2.grid(alpha=0.3, which="both")
tut.save(fig, "cosine_constants.png")
print("\ndone: tutorial 05 runs this chain backwards.")

# %% [markdown]
# ## Exercises
# 1. Find the step where SNR(t) = 1 (alpha_bar_t = 0.5) for both schedules from `alpha_bar`,
#    and check it against the figure of step 1.
# 2. Build `cosine_betas(T, s=0.0)` and compare sqrt(beta_1) with one grey level, 1/127.5: what
#    does step 3's argument predict?
# 3. Noise one digit to t = 500 a thousand times with `q_sample` and check that the mean image is
#    sqrt(alpha_bar_500) times the digit and the per-pixel variance 1 - alpha_bar_500.
