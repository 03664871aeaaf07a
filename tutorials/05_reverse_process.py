# %% [markdown]
# # 05 The reverse process: from noise back to data
#
# Tutorial 04 destroyed a digit with T small Gaussian steps. Generation runs the chain
# backwards: start from x_T ~ N(0, I) and draw x_{t-1} ~ p(x_{t-1} | x_t) for t = T .. 1.
# Ho et al. 2020 make each reverse step Gaussian and learn only its mean, through a network
# eps_theta(x_t, t) that predicts the noise in x_t.
#
# Training a network is tutorial 07. Here we replace it by an *oracle*: on a toy 2-D data set,
# a mixture of three Gaussians, the best possible noise predictor has a closed form, so every
# sampler and the variational bound can be checked without any learning. Along the way:
# the posterior q(x_{t-1} | x_t, x_0) that the reverse step imitates, what one step does,
# DDPM against DDIM trajectories, why deterministic DDIM with few steps loses spread, and
# the terms of the bound.
#
# Run: `uv run python tutorials/05_reverse_process.py [--out DIR] [--quick]`.

# %%
import math

import matplotlib.pyplot as plt
import torch
from _common import check, claim, setup, step

from common.data import signed_to_uint8, to_signed
from common.distributions import normal_log_prob
from ddpm.bound import vlb_bits_per_dim
from ddpm.diffusion import GaussianDiffusion
from ddpm.samplers import SamplerSpec, sample
from ddpm.schedule import cosine_betas

tut = setup(
    "05_reverse_process", "the posterior, one reverse step, an oracle denoiser, DDPM vs DDIM, the bound"
)
torch.set_num_threads(1)  # every tensor here is tiny; thread hand-offs would cost more than they save
F64 = torch.float64
T = 1000
diff = GaussianDiffusion(cosine_betas(T))
g = torch.Generator().manual_seed(0)


def plain(sampler: str, steps: int = T) -> SamplerSpec:
    """`steps` evenly spaced steps of `sampler` down to t = 0, unguided and unclipped (the toy data
    here are points in the plane, not images in [-1, 1])."""
    return SamplerSpec(
        sampler, steps, "uniform", sigma_min=None, guidance=0.0, guidance_interval=None, clip=False
    )

# %% [markdown]
# ## 1. The posterior q(x_{t-1} | x_t, x_0)
# Given the clean x_0, the step before x_t is known in closed form. By Bayes,
# q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0): a Gaussian likelihood of the one
# step times the Gaussian marginal of tutorial 04, hence a Gaussian (Ho et al. eq. 6-7)
#
# $$\tilde\mu_t = \frac{\sqrt{\bar\alpha_{t-1}}\,\beta_t}{1 - \bar\alpha_t} x_0
#   + \frac{\sqrt{\alpha_t}\,(1 - \bar\alpha_{t-1})}{1 - \bar\alpha_t} x_t,\qquad
#   \tilde\beta_t = \frac{1 - \bar\alpha_{t-1}}{1 - \bar\alpha_t}\,\beta_t .$$
#
# Below, the product of the two densities is normalised numerically on a fine grid and its
# mean and variance compared with `GaussianDiffusion.q_posterior`. The figure uses a 10-step
# chain, where prior and likelihood have similar widths and the product is visibly narrower
# than both; the formula holds for any T. Its right panel compares beta_tilde with beta: they
# differ only in the first few steps, which is why Ho et al. found both choices of reverse
# variance to work about equally well.

# %%
step(1, "the posterior q(x_{t-1} | x_t, x_0): numerical Bayes vs Ho et al. eq. 7")


def bayes_on_grid(d: GaussianDiffusion, t: int, x0: float, xt: float):
    """Mean and variance of q(x_t | x_{t-1}) q(x_{t-1} | x0) over x_{t-1}, by brute force (1-D)."""
    a, ab_prev, beta = d.alphas[t], d.alpha_bar_prev[t], d.betas[t]
    lik_sd, prior_sd = (beta / a).sqrt(), (1 - ab_prev).sqrt()
    centre, width = xt / a.sqrt(), 12 * torch.minimum(lik_sd, prior_sd) + 1e-12
    grid = torch.linspace(centre - width, centre + width, 200_001, dtype=F64)
    log_lik = normal_log_prob(torch.tensor(xt, dtype=F64), a.sqrt() * grid, beta.log())
    log_prior = normal_log_prob(grid, ab_prev.sqrt() * x0, (1 - ab_prev).log())
    w = torch.softmax(log_lik + log_prior, dim=0)
    mean = (w * grid).sum()
    return grid, w, log_lik, log_prior, mean.item(), (w * (grid - mean) ** 2).sum().item()


short = GaussianDiffusion(cosine_betas(10))
worst_mean = worst_var = 0.0
for name, d, t in (
    ("T=10, t=3", short, 2),
    ("T=1000, t=2", diff, 1),
    ("T=1000, t=500", diff, 499),
    ("T=1000, t=990", diff, 989),
):
    x0_1d = 0.6
    xt_1d = d.q_sample(torch.tensor([[x0_1d]], dtype=F64), t, torch.tensor([[0.8]], dtype=F64)).item()
    *_, m_num, v_num = bayes_on_grid(d, t, x0_1d, xt_1d)
    m, v, _ = d.q_posterior(torch.tensor([[x0_1d]], dtype=F64), torch.tensor([[xt_1d]], dtype=F64), t)
    print(
        f"    {name:>14}: mean by numerical Bayes {m_num:.6f} vs eq. 7 {m.item():.6f};"
        f" variance {v_num:.4e} vs {v.item():.4e}"
    )
    worst_mean = max(worst_mean, abs(m_num - m.item()))
    worst_var = max(worst_var, abs(v_num / v.item() - 1))
check("posterior mean, worst |Bayes - eq. 7|", worst_mean, 0, 1e-6)
check("posterior variance, worst relative error", worst_var, 0, 1e-4)

t_fig, x0_fig = 2, 0.6
xt_fig = short.q_sample(torch.tensor([[x0_fig]], dtype=F64), t_fig, torch.tensor([[0.8]], dtype=F64)).item()
grid, w, log_lik, log_prior, *_ = bayes_on_grid(short, t_fig, x0_fig, xt_fig)
dx = (grid[1] - grid[0]).item()
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
ax1.plot(grid, torch.softmax(log_prior, 0) / dx, "--", label="q(x_{t-1} | x_0): tutorial 04's marginal")
ax1.plot(grid, torch.softmax(log_lik, 0) / dx, ":", label="q(x_t | x_{t-1}) as a function of x_{t-1}")
ax1.plot(grid, w / dx, lw=2, label="their product, normalised")
m, v, _ = short.q_posterior(torch.tensor([[x0_fig]], dtype=F64), torch.tensor([[xt_fig]], dtype=F64), t_fig)
ax1.plot(
    grid[::4000],
    normal_log_prob(grid[::4000], m[0, 0], v[0, 0].log()).exp(),
    "k.",
    label="N(mu_tilde, beta_tilde), eq. 7",
)
ax1.axvline(x0_fig, color="gray", lw=0.8)
ax1.set_xlabel("x_{t-1}")
ax1.set_title(f"Bayes for one step (T = 10, t = 3, x_0 = {x0_fig}, x_t = {xt_fig:.2f})", fontsize=10)
ax1.set_xlim(-1.6, 2.4)
ax1.set_ylim(0, 1.5 * (w / dx).max().item())
ax1.legend(fontsize=7, loc="upper left")
steps_1 = torch.arange(1, T + 1)
ax2.semilogx(steps_1[1:], (diff.posterior_variance / diff.betas)[1:], label="beta_tilde_t / beta_t")
ax2.set_xlabel("step t (log scale)")
ax2.set_title("the two reverse variances of Ho et al. (T = 1000, cosine)", fontsize=10)
ax2.set_ylim(0, 1.05)
ax2.grid(alpha=0.3, which="both")
ax2.legend(fontsize=8)
tut.save(fig, "posterior.png")

# %% [markdown]
# ## 2. One reverse step
# The reverse step p(x_{t-1} | x_t) = N(mu_theta(x_t, t), beta_tilde_t I) plugs the network's
# estimate of x_0 into the posterior mean: x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps_theta) /
# sqrt(alpha_bar_t), then mu_theta = mu_tilde(x0_hat, x_t). Substituting gives Ho et al.'s
# eq. 11, mu_theta = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta) / sqrt(alpha_t). If the
# prediction were the true noise, the step would sample exactly from the posterior of step 1.
# We check that on an MNIST digit (clipping of x0_hat off, since we compare formulas).

# %%
step(2, "one reverse step with the true noise equals the posterior")
x_test, _ = tut.mnist(train=False)
x0 = to_signed(x_test[:4]).double()
t = 499
eps = torch.randn(x0.shape, generator=g, dtype=F64)
xt = diff.q_sample(x0, t, eps)
mean_p, var_p, _, x0_hat = diff.p_mean_variance(eps, t, xt, clip=False)
mean_q, var_q, _ = diff.q_posterior(x0, xt, t)
eq11 = (xt - diff.betas[t] / diff.sqrt_one_minus_alpha_bar[t] * eps) / diff.alphas[t].sqrt()
check("x0_hat from the true eps vs x_0, max", (x0_hat - x0).abs().max(), 0, 1e-12)
check("mu_theta(true eps) vs mu_tilde(x_0, x_t), max", (mean_p - mean_q).abs().max(), 0, 1e-12)
check("mu_theta vs Ho eq. 11 written out, max", (mean_p - eq11).abs().max(), 0, 1e-12)
z = torch.randn(x0.shape, generator=g, dtype=F64)
x_prev = diff.p_step(eps, t, xt, noise=z, clip=False)
check("p_step - (mu + sqrt(beta_tilde) z), max", (x_prev - mean_p - var_p.sqrt() * z).abs().max(), 0, 1e-12)
print(
    f"    at t = {t + 1}: the step moves each pixel by {(mean_p - xt).abs().mean():.4f} on average and adds"
    f" noise of std {var_p[0].sqrt().item():.4f}; sqrt(beta_t) = {diff.betas[t].sqrt():.4f}"
)

# %% [markdown]
# ## 3. The oracle denoiser on a toy 2-D distribution
# The network is trained with L_simple = E ||eps - eps_theta(x_t, t)||^2 (Ho et al. eq. 14).
# A squared error is minimised by the conditional mean, so the best predictor is
# eps*(x_t, t) = E[eps | x_t]. Tweedie's formula (Efron 2011) turns this into the score of the
# noised data distribution q_t:
#
# $$\epsilon^*(x_t, t) = -\sqrt{1 - \bar\alpha_t}\,\nabla_{x_t} \log q_t(x_t)$$
#
# (the link between denoising and score matching: Vincent 2011; Song & Ermon 2019). For a
# mixture of Gaussians, q_t is again a mixture: component k, N(m_k, S_k), becomes
# N(sqrt(alpha_bar_t) m_k, alpha_bar_t S_k + (1 - alpha_bar_t) I). So the score, and eps*, are
# exact. Checks: eps* has a lower L_simple than any rescaled version of itself, and the
# 1000-step DDPM sampler driven by it reproduces the mixture.

# %%
step(3, "an oracle eps for a mixture of three 2-D Gaussians")
weights = torch.tensor([0.3, 0.3, 0.4], dtype=F64)
means = torch.tensor([[-0.5, -0.35], [0.55, -0.3], [0.0, 0.5]], dtype=F64)
covs = torch.tensor(
    [[[0.012, 0.008], [0.008, 0.012]], [[0.004, 0.0], [0.0, 0.02]], [[0.025, 0.0], [0.0, 0.004]]], dtype=F64
)


def mixture_log_prob(x, a, weights=weights, means=means, covs=covs):
    """Per-component log w_k N(x; sqrt(a) m_k, a S_k + (1 - a) I) [B, K], and V^-1 (x - mean) [B, K, 2]."""
    a = a.reshape(-1, 1, 1, 1)
    V = a * covs + (1 - a) * torch.eye(2, dtype=x.dtype)  # [B, K, 2, 2]
    d = x[:, None, :] - a[..., 0].sqrt() * means  # [B, K, 2]
    det = V[..., 0, 0] * V[..., 1, 1] - V[..., 0, 1] ** 2
    inv = (
        torch.stack(
            [torch.stack([V[..., 1, 1], -V[..., 0, 1]], -1), torch.stack([-V[..., 1, 0], V[..., 0, 0]], -1)],
            -2,
        )
        / det[..., None, None]
    )
    inv_d = (inv @ d[..., None])[..., 0]
    quad = (d * inv_d).sum(-1)
    return weights.log() - math.log(2 * math.pi) - 0.5 * det.log() - 0.5 * quad, inv_d


def make_oracle(weights, means, covs):
    def eps_model(xt, t, y=None):
        a = diff.alpha_bar.to(xt)[t]
        logp, inv_d = mixture_log_prob(xt, a, weights, means, covs)
        score = -(torch.softmax(logp, dim=1)[..., None] * inv_d).sum(1)  # grad log q_t(x_t)
        return -(1 - a)[:, None].sqrt() * score

    return eps_model


oracle = make_oracle(weights, means, covs)


def sample_data(n: int, gen: torch.Generator) -> torch.Tensor:
    k = torch.multinomial(weights, n, replacement=True, generator=gen)
    chol = torch.linalg.cholesky(covs)
    return means[k] + (chol[k] @ torch.randn(n, 2, 1, generator=gen, dtype=F64))[..., 0]


def component_of(x: torch.Tensor) -> torch.Tensor:
    """The most probable component for each point (at t = 0)."""
    return mixture_log_prob(x, torch.ones(len(x), dtype=F64))[0].argmax(1)


n = tut.size(4000, 600)
data = sample_data(n, g)
losses = {}
for scale in (0.9, 1.0, 1.1):

    def scaled(xt, t, y, s=scale):
        return s * oracle(xt, t, y)

    losses[scale] = diff.loss(scaled, data, None, generator=torch.Generator().manual_seed(5)).item()
print(
    "    L_simple with the same x_0, t, eps: " + ", ".join(f"{s} x oracle {v:.4f}" for s, v in losses.items())
)
claim(
    "the oracle has the lowest loss; it stays above 0 (eps is not fully determined by x_t)",
    losses[1.0] < min(losses[0.9], losses[1.1]) and losses[1.0] > 0,
)

x_ddpm = sample(diff, oracle, plain("ddpm"), torch.randn(n, 2, generator=g, dtype=F64), generator=g)
share_true = torch.bincount(component_of(data), minlength=3) / n
share_ddpm = torch.bincount(component_of(x_ddpm), minlength=3) / n
print(
    "    component shares, data: "
    + " ".join(f"{v:.3f}" for v in share_true.tolist())
    + "   DDPM samples: "
    + " ".join(f"{v:.3f}" for v in share_ddpm.tolist())
)
check("largest share difference", (share_true - share_ddpm).abs().max(), 0, tut.size(0.04, 0.1))
cov_err = (torch.cov(x_ddpm.T) - torch.cov(data.T)).abs().max().item()
check("sample covariance vs data covariance, largest entry difference", cov_err, 0, tut.size(0.01, 0.03))

lim = 1.3
gx = torch.linspace(-lim, lim, 161, dtype=F64)
GX, GY = torch.meshgrid(gx, gx, indexing="xy")
grid_pts = torch.stack([GX.flatten(), GY.flatten()], 1)


def density_on_grid(t_idx: int | None) -> torch.Tensor:
    a = torch.ones(len(grid_pts), dtype=F64) if t_idx is None else diff.alpha_bar[t_idx].expand(len(grid_pts))
    return mixture_log_prob(grid_pts, a)[0].logsumexp(1).exp().reshape(GX.shape)


qx = torch.linspace(-lim, lim, 17, dtype=F64)
QX, QY = torch.meshgrid(qx, qx, indexing="xy")
quiver_pts = torch.stack([QX.flatten(), QY.flatten()], 1)
fig, axes = plt.subplots(1, 4, figsize=(16, 4.2))
axes[0].contour(GX, GY, density_on_grid(None), levels=8, cmap="Blues")
axes[0].scatter(*data[:800].T, s=2, c="k", alpha=0.5)
axes[0].set_title("data: a mixture of three Gaussians")
for ax, t_show in zip(axes[1:], (50, 300, 700), strict=True):
    ax.contourf(GX, GY, density_on_grid(t_show - 1), levels=12, cmap="Blues")
    e = oracle(quiver_pts, torch.full((len(quiver_pts),), t_show - 1), None)
    ax.quiver(QX, QY, -e[:, 0].reshape(QX.shape), -e[:, 1].reshape(QX.shape), color="tab:red", scale=25)
    ax.set_title(f"q_t and -eps*(x, t), t = {t_show}")
for ax in axes:
    ax.set_aspect("equal")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
tut.save(fig, "oracle.png")

# %% [markdown]
# ## 4. DDPM and DDIM trajectories
# DDPM (Ho et al. Algorithm 2) is ancestral sampling: each step draws fresh noise, so paths
# wander and two runs from the same x_T end in different places. DDIM (Song, Meng & Ermon
# 2021, eq. 12 with eta = 0) keeps the same marginals q(x_t | x_0) but makes each step
# deterministic: x_{t-1} = sqrt(alpha_bar_{t-1}) x0_hat + sqrt(1 - alpha_bar_{t-1}) eps_theta.
# The sample is then a function of x_T, and paths are smooth: for small steps DDIM follows the
# probability-flow ODE of Song et al. 2021 ("Score-Based Generative Modeling through SDEs").

# %%
step(4, "DDPM vs DDIM trajectories from the same starting noise")
n_paths = 5
xT = torch.randn(n_paths, 2, generator=torch.Generator().manual_seed(11), dtype=F64)
paths = {}
for sampler in ("ddpm", "ddim"):
    traj = []  # (t, x_t) at each step, then (-1, x_0)
    sample(diff, oracle, plain(sampler), xT, generator=torch.Generator().manual_seed(12), trajectory=traj)
    paths[sampler] = torch.stack([x for _, x in traj])  # [T + 1, n_paths, 2]
again = sample(diff, oracle, plain("ddim"), xT)
other = sample(diff, oracle, plain("ddpm"), xT, generator=torch.Generator().manual_seed(13))
claim("DDIM (eta = 0) from the same x_T gives the same sample", torch.equal(again, paths["ddim"][-1]))
print(
    f"    DDPM from the same x_T with other noise ends {(other - paths['ddpm'][-1]).norm(dim=1).mean():.3f}"
    " away on average"
)
length = {s: (p[1:] - p[:-1]).norm(dim=-1).sum(0).mean().item() for s, p in paths.items()}
print(
    f"    mean path length: DDPM {length['ddpm']:.2f}, DDIM {length['ddim']:.2f}"
    f" (straight line from x_T: {(paths['ddim'][-1] - xT).norm(dim=1).mean():.2f})"
)
claim("DDIM paths are much shorter than DDPM's", length["ddim"] * 2 < length["ddpm"])

dens = density_on_grid(None)
fig, axes = plt.subplots(1, 2, figsize=(11, 5.3))
for ax, (sampler, p) in zip(axes, paths.items(), strict=True):
    ax.contour(GX, GY, dens, levels=6, cmap="Blues")
    for i in range(n_paths):
        ax.plot(p[:, i, 0], p[:, i, 1], lw=0.6, alpha=0.75)
    ax.scatter(*p[0].T, marker="o", facecolors="none", edgecolors="k", s=25, label="start x_T", zorder=3)
    ax.scatter(*p[-1].T, marker="*", c="k", s=40, label="end x_0", zorder=3)
    ax.set_title(
        {"ddpm": "DDPM, 1000 stochastic steps", "ddim": "DDIM (eta = 0), 1000 deterministic steps"}[sampler]
    )
    ax.set_xlim(-3, 3)
    ax.set_ylim(-3, 3)
    ax.set_aspect("equal")
    ax.legend(fontsize=8, loc="lower right")
tut.save(fig, "trajectories.png")

# %% [markdown]
# ## 5. Few deterministic steps shrink the spread
# With S < T steps, both samplers jump between S evenly spaced steps with the same formulas
# (`ddpm.samplers.timesteps`). Every jump first estimates x0_hat = E[x_0 | x_t], a
# conditional *mean*: from a very noisy x_t it lies near the middle of everything x_t could
# have come from, between the clusters. A deterministic DDIM step never adds back the variance
# that this averaging removes, so with few steps the samples are pulled inwards: with one or
# two steps every sample lands on the overall mean of the data, and with a handful they fill
# the space between the clusters. Only when the visited steps are close together is each
# x0_hat close to a single data point, and the spread right. We measure the spread as
# sqrt(trace Cov), as a fraction of the data's, and count the samples that fall off the data
# (a log-density below the 1st percentile of the data's own).
#
# Ancestral DDPM with the same few steps does not rescue this here: its last jump, from the
# last visited step to t = 1, adds noise of variance about 1 - alpha_bar_1 = 4e-5, so its output
# is also a conditional mean. Few steps need a sampler built for them (DDIM's eta = 0 is the
# better of the two in image quality; Song et al. 2021, Table 1), or a distilled model.

# %%
step(5, "spread of samples against the number of steps")


def spread(x: torch.Tensor) -> float:
    """Root-mean-square distance from the sample mean, sqrt(trace Cov)."""
    return torch.cov(x.T).trace().sqrt().item()


def log_density(x: torch.Tensor) -> torch.Tensor:
    return mixture_log_prob(x, torch.ones(len(x), dtype=F64))[0].logsumexp(1)


base = spread(data)
floor = log_density(data).quantile(0.01)
n5 = tut.size(2000, 400)
xT5 = torch.randn(n5, 2, generator=torch.Generator().manual_seed(21), dtype=F64)
step_counts = [2, 3, 5, 10, 20, 50, 1000]
results, ratio, off = {}, {}, {}
print("    steps   spread: DDIM   DDPM    off the data: DDIM   DDPM   (data: spread 1.00, 1% off)")
for S in step_counts:
    for sampler in ("ddim", "ddpm"):
        x = sample(diff, oracle, plain(sampler, S), xT5, generator=torch.Generator().manual_seed(22))
        results[sampler, S], ratio[sampler, S] = x, spread(x) / base
        off[sampler, S] = (log_density(x) < floor).double().mean().item()
    print(
        f"    {S:5d}   {ratio['ddim', S]:12.2f} {ratio['ddpm', S]:6.2f}"
        f"   {off['ddim', S]:18.1%} {off['ddpm', S]:6.1%}"
    )
claim(
    f"DDIM's spread shrinks with few steps: {ratio['ddim', 3]:.2f} (3 steps), {ratio['ddim', 5]:.2f} (5),"
    f" {ratio['ddim', 1000]:.2f} (1000)",
    ratio["ddim", 3] < 0.6 and ratio["ddim", 5] < 0.85 and abs(ratio["ddim", 1000] - 1) < 0.1,
)
claim(
    f"and its samples fall off the data: {off['ddim', 5]:.0%} with 5 steps,"
    f" {off['ddim', 1000]:.1%} with 1000",
    off["ddim", 5] > 0.2 and off["ddim", 1000] < 0.05,
)
check("DDPM with 1000 steps, spread ratio", ratio["ddpm", 1000], 1.0, 0.1)

fig, axes = plt.subplots(2, len(step_counts), figsize=(2.4 * len(step_counts), 5.2))
for row, sampler in enumerate(("ddim", "ddpm")):
    for col, S in enumerate(step_counts):
        ax = axes[row, col]
        ax.contour(GX, GY, dens, levels=5, cmap="Blues", linewidths=0.6)
        ax.scatter(*results[sampler, S][:600].T, s=1.5, c="k", alpha=0.6)
        ax.set_xlim(-1.1, 1.1)
        ax.set_ylim(-1.1, 1.1)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{sampler.upper()}, {S} steps: {ratio[sampler, S]:.2f}", fontsize=9)
fig.suptitle("samples from the oracle, all from the same x_T (title: spread, data = 1.00)", fontsize=10)
tut.save(fig, "few_steps.png")

# %% [markdown]
# ## 6. The terms of the variational bound
# DDPM is a latent-variable model, so -log p(x_0) is bounded by (Ho et al. eq. 5)
#
# $$L = \underbrace{\mathrm{KL}(q(x_T|x_0)\,\|\,N(0,I))}_{L_T}
#     + \sum_{t>1} \underbrace{\mathrm{KL}(q(x_{t-1}|x_t,x_0)\,\|\,p(x_{t-1}|x_t))}_{L_{t-1}}
#     \underbrace{- \log p(x_0 \mid x_1)}_{L_0}.$$
#
# Both Gaussians in L_{t-1} have variance beta_tilde, so each term is a squared error between
# the true and the predicted posterior mean; L_0 scores x_0 on the 256-level pixel grid with a
# discretised Gaussian. `ddpm.bound.vlb_bits_per_dim` returns all of it in bits per
# dimension. The toy points are rounded to the same grid (via uint8) so that the bound is a
# bound on a probability. Since the bound is an upper bound on -log p_model, and any model's
# cross-entropy is at least the data's entropy, the oracle's average bound must lie above the
# true -log P(x_0) of the rounded mixture. (Even the exact eps* does not reach it: each reverse
# step is a Gaussian of fixed variance beta_tilde, while the true reverse step is neither exactly
# Gaussian nor of that variance; learning the variance, Nichol & Dhariwal 2021, or computing it,
# Bao et al. 2022, "Analytic-DPM", tightens the bound.) A worse model, the best single Gaussian (matching the
# data's mean and covariance, whose eps* is analytic too), pays more, and only at the steps
# below t ~ 400, where the three clusters are still told apart.

# %%
step(6, "the variational bound, term by term")
n6 = tut.size(512, 64)
x6 = to_signed(signed_to_uint8(sample_data(n6, g))).double()  # on the 256-level grid
gauss = make_oracle(torch.ones(1, dtype=F64), data.mean(0, keepdim=True), torch.cov(data.T)[None])
bounds = {
    name: vlb_bits_per_dim(diff, m, x6, None, generator=torch.Generator().manual_seed(31), clip=False)
    for name, m in (("mixture oracle", oracle), ("best single Gaussian", gauss))
}
vlb = bounds["mixture oracle"]
check(
    "total - (prior + sum of terms), max",
    (vlb["total"] - vlb["prior"] - vlb["terms"].sum(1)).abs().max(),
    0,
    1e-9,
)
check("decoder - terms[:, 0], max", (vlb["decoder"] - vlb["terms"][:, 0]).abs().max(), 0, 0)
bin_area = (2 / 255) ** 2  # each point owns a (1/127.5) x (1/127.5) square
true_nll = -(mixture_log_prob(x6, torch.ones(n6, dtype=F64))[0].logsumexp(1) + math.log(bin_area)) / (
    2 * math.log(2)
)
for name, b in bounds.items():
    print(
        f"    {name:>22}: bound {b['total'].mean():.4f} bits/dim = prior {b['prior'].mean():.1e}"
        f" + decoder {b['decoder'].mean():.4f}"
        f" + sum of {T - 1} KL terms {b['terms'][:, 1:].sum(1).mean():.4f}"
    )
gap = vlb["total"] - true_nll
print(f"    true -log P(x_0) of the rounded mixture: {true_nll.mean():.4f} bits/dim")
print(
    f"    oracle bound minus truth, same points: {gap.mean():.4f} +- {gap.std() / math.sqrt(n6):.4f} bits/dim"
)
claim(
    "the oracle's bound is not below the truth (within 3 standard errors)",
    gap.mean() > -3 * gap.std() / math.sqrt(n6),
)
claim(
    "the single Gaussian's bound is higher than the oracle's",
    bounds["best single Gaussian"]["total"].mean() > vlb["total"].mean(),
)

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
for name, b in bounds.items():
    terms = b["terms"].mean(0)
    ax1.loglog(steps_1, terms.clamp(min=1e-8), lw=0.8, label=name)
    ax2.semilogx(steps_1, terms.cumsum(0) + b["prior"].mean(), label=f"{name}: {b['total'].mean():.3f}")
ax2.axhline(true_nll.mean(), color="k", ls="--", label=f"true -log P(x_0): {true_nll.mean():.3f}")
ax1.set_xlabel("step t (t = 1: the decoder term L_0)")
ax1.set_ylabel("bits/dim (mean over points)")
ax1.set_title("each term of the bound")
ax2.set_xlabel("step t")
ax2.set_ylabel("bits/dim")
ax2.set_title("L_T + the terms up to step t: where the bits are spent")
for ax in (ax1, ax2):
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
tut.save(fig, "vlb_terms.png")
print("\ndone: tutorial 06 builds the network that replaces the oracle on MNIST.")

# %% [markdown]
# ## Exercises
# 1. In step 5, replace DDPM by DDIM with eta = 1 (`SamplerSpec("ddim", S, "uniform",
#    sigma_min=None, guidance=0.0, guidance_interval=None, eta=1.0, clip=False)`): the spreads
#    must match DDPM's, because the respaced ancestral step is DDIM's eta = 1 step.
# 2. Add DPM-Solver++(2M) (`plain("dpm2m", S)`) to step 5: at 5 and 10 steps, is its spread closer
#    to the data's than DDIM's? (Tutorial 09 explains why.)
# 3. Scale the oracle's eps by 1.05 in step 3 and sample with DDPM: does the spread of the
#    samples grow or shrink?
