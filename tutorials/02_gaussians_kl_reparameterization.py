# %% [markdown]
# # 02 The VAE's pieces: Gaussian KL, the reparameterization trick, Bernoulli pixels
#
# A variational autoencoder (Kingma & Welling 2013, "Auto-Encoding Variational Bayes") fits a
# decoder p(x | z) and an encoder q(z | x) by maximising the evidence lower bound (their eq. 3)
#
# $$\mathcal{L}(x) = \mathbb{E}_{q(z|x)}[\log p(x|z)] - \mathrm{KL}(q(z|x)\,\|\,p(z)) \le \log p(x).$$
#
# It is built from three pieces, each checked here on its own before tutorial 03 trains the
# whole model:
#
# 1. the KL between the Gaussian q(z | x) = N(mu, diag sigma^2) and the prior N(0, I), which
#    has a closed form;
# 2. the expectation over q, estimated with samples z, and differentiated *through* those
#    samples: the reparameterization trick;
# 3. log p(x | z) for 784 pixels, a product of Bernoulli distributions.
#
# Run: `uv run python tutorials/02_gaussians_kl_reparameterization.py [--out DIR] [--quick]`.

# %%
import math

import matplotlib.pyplot as plt
import torch
from _common import check, claim, setup, step

from common.data import to_unit
from common.distributions import (
    bernoulli_log_prob,
    nats_to_bits_per_dim,
    normal_kl,
    normal_log_prob,
    standard_normal_kl,
)
from vaegen.elbo import elbo_terms
from vaegen.model import VAE, VAEConfig, reparameterize

tut = setup("02_gaussians_kl_reparameterization", "Gaussian KL, reparameterization, Bernoulli pixels")
F64 = torch.float64

# %% [markdown]
# ## 1. KL between Gaussians: closed form against Monte Carlo
# For diagonal Gaussians the KL splits into a sum over dimensions, and each term is
#
# $$\mathrm{KL}(N(m_1, s_1^2)\,\|\,N(m_2, s_2^2))
#   = \log\frac{s_2}{s_1} + \frac{s_1^2 + (m_1 - m_2)^2}{2 s_2^2} - \frac12 .$$
#
# With the standard-normal prior this is the VAE's regulariser (Kingma & Welling, Appendix B):
# KL = 1/2 sum_j (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2). The mu^2 part pulls codes to the
# origin; the sigma^2 - 1 - log sigma^2 part is zero at sigma = 1 and grows without bound as
# sigma -> 0, which stops the encoder from collapsing q to a point.
#
# The definition, KL = E_q[log q(z) - log p(z)], is an expectation, so it can also be
# estimated by sampling. Both must agree; the closed form is exact and noise-free, which is
# why the VAE uses it (the paper's estimator B, eq. 7, rather than A, eq. 6; eq. 10 is B for
# a Gaussian q and prior).

# %%
step(1, "KL of two 20-dimensional diagonal Gaussians: closed form vs Monte Carlo")
g = torch.Generator().manual_seed(1)
J = 20
mu_q = 0.8 * torch.randn(J, generator=g, dtype=F64)
logvar_q = 0.5 * torch.randn(J, generator=g, dtype=F64) - 1.0
mu_p = 0.3 * torch.randn(J, generator=g, dtype=F64)
logvar_p = 0.3 * torch.randn(J, generator=g, dtype=F64)

kl_closed = normal_kl(mu_q, logvar_q, mu_p, logvar_p).sum().item()
oracle = (
    torch.distributions.kl_divergence(
        torch.distributions.Normal(mu_q, (0.5 * logvar_q).exp()),
        torch.distributions.Normal(mu_p, (0.5 * logvar_p).exp()),
    )
    .sum()
    .item()
)
n_mc = tut.size(200_000, 20_000)
z = reparameterize(mu_q, logvar_q, torch.randn(n_mc, J, generator=g, dtype=F64))
log_ratio = (normal_log_prob(z, mu_q, logvar_q) - normal_log_prob(z, mu_p, logvar_p)).sum(-1)  # [n]
kl_mc, kl_se = log_ratio.mean().item(), (log_ratio.std() / math.sqrt(n_mc)).item()
print(f"    KL by Monte Carlo {kl_mc:.3f} +- {kl_se:.3f} (n = {n_mc:,}) vs closed form {kl_closed:.3f}")
claim(
    f"Monte Carlo within 4 standard errors of the closed form ({abs(kl_mc - kl_closed) / kl_se:.1f} SE)",
    abs(kl_mc - kl_closed) < 4 * kl_se,
)
check("closed form (common.distributions.normal_kl)", kl_closed, oracle, 1e-10, "torch.distributions")
diff = (standard_normal_kl(mu_q, logvar_q) - normal_kl(mu_q, logvar_q, 0.0, 0.0)).abs().max().item()
check("standard_normal_kl minus normal_kl(., ., 0, 0), max", diff, 0.0, 1e-12)

# running estimate for the figure
ns = torch.unique(torch.logspace(1, math.log10(n_mc), 60).long())
run_mean = log_ratio.cumsum(0)[ns - 1] / ns
run_se = torch.stack([log_ratio[:n].std() / math.sqrt(n) for n in ns.tolist()])

mus = torch.linspace(-3, 3, 241, dtype=F64)
sigmas = torch.logspace(-1.5, 0.7, 221, dtype=F64)
M, S = torch.meshgrid(mus, sigmas, indexing="xy")
kl_map = standard_normal_kl(M, 2 * S.log())
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
cs = ax1.contourf(mus, sigmas, kl_map, levels=[0, 0.1, 0.25, 0.5, 1, 2, 3, 4.5], cmap="viridis", extend="max")
ax1.contour(mus, sigmas, kl_map, levels=[0.1, 0.5, 1, 2], colors="w", linewidths=0.5)
ax1.plot(0, 1, "r*", ms=12, label="minimum: q = prior")
ax1.set_yscale("log")
ax1.set_xlabel("mu")
ax1.set_ylabel("sigma (log scale)")
ax1.set_title("KL( N(mu, sigma^2) || N(0, 1) ) in nats")
ax1.legend(loc="lower left", fontsize=8)
fig.colorbar(cs, ax=ax1)
ax2.plot(ns, run_mean, label="Monte Carlo mean of log q(z) - log p(z)")
ax2.fill_between(ns, run_mean - 2 * run_se, run_mean + 2 * run_se, alpha=0.3, label="+- 2 standard errors")
ax2.axhline(kl_closed, color="k", ls="--", label=f"closed form {kl_closed:.3f}")
ax2.set_xscale("log")
ax2.set_xlabel("number of samples z ~ q")
ax2.set_ylabel("KL estimate (nats)")
ax2.set_title(f"{J}-dimensional Gaussians: the estimate converges")
ax2.set_ylim(kl_closed - 2.5, kl_closed + 2.5)
ax2.legend(fontsize=8)
tut.save(fig, "kl.png")

# %% [markdown]
# ## 2. The reparameterization trick: why gradients flow
# The reconstruction term E_q[f(z)] (with f(z) = log p(x | z)) depends on the encoder's
# outputs (mu, sigma) only through the distribution that z is drawn from. A sampled number
# carries no gradient: `Normal(mu, sigma).sample()` is a leaf, detached from mu.
#
# Kingma & Welling (section 2.4), and independently Rezende, Mohamed & Wierstra 2014, write the
# sample as a deterministic, differentiable function of the parameters and parameter-free noise:
#
# $$z = \mu + \sigma \odot \epsilon,\quad \epsilon \sim N(0, I) \quad\Rightarrow\quad
#   \nabla_\mu \mathbb{E}_q[f(z)] = \mathbb{E}_\epsilon[\nabla_z f(\mu + \sigma\epsilon)].$$
#
# Now backpropagation runs through z into mu and sigma (`vaegen.model.reparameterize`). The
# older alternative, the score-function (likelihood-ratio, REINFORCE; Williams 1992) estimator
#
# $$\nabla_\mu \mathbb{E}_q[f(z)] = \mathbb{E}_q[f(z)\,\nabla_\mu \log q(z)],$$
#
# needs no derivative of f, but it multiplies the *value* of f (hundreds of nats for an image)
# by a random sign-changing factor, so its variance is far larger. Both are unbiased; below
# they are compared on one-sample gradients.

# %%
step(2, "reparameterization: gradients flow through z = mu + sigma * eps")
mu = torch.tensor([1.0], dtype=F64, requires_grad=True)
logvar = torch.tensor([2 * math.log(0.5)], dtype=F64, requires_grad=True)
z_sampled = torch.distributions.Normal(mu, (0.5 * logvar).exp()).sample()
z_reparam = reparameterize(mu, logvar)
print(f"    Normal(mu, sigma).sample(): requires_grad={z_sampled.requires_grad}  (gradient stops here)")
print(
    f"    reparameterize(mu, logvar): requires_grad={z_reparam.requires_grad},"
    f" grad_fn={type(z_reparam.grad_fn).__name__}"
)
claim(
    "only the reparameterized sample is connected to mu",
    z_reparam.requires_grad and not z_sampled.requires_grad,
)


def per_sample_grads(f, mu, logvar, eps):
    """One-sample gradients of E_q[f(z)] w.r.t. mu, by both estimators: ([n, J], [n, J]).

    Every sample gets its own copy of mu, so that autograd returns per-sample gradients.
    """
    mu_a = mu.detach().expand(eps.shape).clone().requires_grad_()
    f(reparameterize(mu_a, logvar.detach(), eps)).sum().backward()  # pathwise
    mu_b = mu.detach().expand(eps.shape).clone().requires_grad_()
    z = reparameterize(mu_b, logvar.detach(), eps).detach()  # a plain sample, no graph
    surrogate = f(z).detach() * normal_log_prob(z, mu_b, logvar.detach()).sum(-1)
    surrogate.sum().backward()  # score function: f(z) * d/dmu log q(z)
    return mu_a.grad, mu_b.grad


# (a) one dimension, f(z) = z^2: E f = mu^2 + sigma^2, so d/dmu E f = 2 mu = 2 exactly.
n = tut.size(100_000, 10_000)
eps1 = torch.randn(n, 1, generator=g, dtype=F64)
path1, score1 = per_sample_grads(lambda z: (z**2).sum(-1), mu, logvar, eps1)
for name, gr in (("pathwise", path1), ("score function", score1)):
    m, sd = gr.mean().item(), gr.std().item()
    print(f"    f(z) = z^2, {name:>14}: mean {m:.4f} +- {sd / math.sqrt(n):.4f}, per-sample std {sd:.3f}")
    claim(f"{name} estimator is unbiased: {m:.4f} vs exact 2 * mu = 2", abs(m - 2.0) < 5 * sd / math.sqrt(n))
check("pathwise per-sample std (2 sigma)", path1.std(), 1.0, 0.03, "exact")

# (b) the real situation: 20 latent dimensions, f(z) = log p(x | z) of an (untrained) VAE decoder.
x_train, _ = tut.mnist(train=True)
vae = VAE(VAEConfig()).double()
x_img = to_unit(x_train[:1]).reshape(1, -1).double()
with torch.no_grad():
    mu20, logvar20 = vae.encode(x_img)
mu20, logvar20 = mu20[0], logvar20[0]


def log_px_given_z(z):
    return bernoulli_log_prob(x_img.expand(z.shape[0], -1), vae.decode(z)).sum(-1)


n_vae = tut.size(20_000, 2_000)
eps20 = torch.randn(n_vae, J, generator=g, dtype=F64)
path20, score20 = per_sample_grads(log_px_given_z, mu20, logvar20, eps20)
with torch.no_grad():  # a baseline b ~ E f from independent samples keeps the estimator unbiased
    b = log_px_given_z(reparameterize(mu20, logvar20, torch.randn(1000, J, generator=g, dtype=F64))).mean()
    f_vals = log_px_given_z(reparameterize(mu20, logvar20, eps20))
score20_b = score20 * ((f_vals - b) / f_vals)[:, None]  # (f - b) * grad log q, reusing grad log q
var = {
    name: gr.var(0).sum().item()
    for name, gr in (
        ("pathwise", path20),
        ("score function", score20),
        ("score function - baseline", score20_b),
    )
}
print(
    f"    f(z) = log p(x | z), {J} latents, mean f = {f_vals.mean():.1f} nats; per-sample gradient variance:"
)
for name, v in var.items():
    print(f"      {name:>26}: {v:12.4g}  ({v / var['pathwise']:.0f} x pathwise)")
claim(
    "the pathwise gradient has by far the smallest variance",
    var["pathwise"] * 10 < min(var["score function"], var["score function - baseline"]),
)
zscore = ((score20_b.mean(0) - path20.mean(0)) / (score20_b.std(0) / math.sqrt(n_vae))).abs().max().item()
claim(f"both estimate the same gradient (largest gap {zscore:.1f} standard errors over {J} dims)", zscore < 5)

# error of an average of k one-sample gradients, against the pathwise mean over all samples
truth = path20.mean(0)
ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256) if n_vae // k >= 8]
rms = {name: [] for name in var}
for k in ks:
    for name, gr in (
        ("pathwise", path20),
        ("score function", score20),
        ("score function - baseline", score20_b),
    ):
        groups = gr[: n_vae // k * k].reshape(-1, k, J).mean(1)
        rms[name].append((groups - truth).pow(2).sum(-1).mean().sqrt().item())

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
bins = torch.linspace(-6, 10, 161)
ax1.hist(path1[:, 0], bins=bins, density=True, alpha=0.6, label=f"pathwise 2z (std {path1.std():.2f})")
ax1.hist(score1[:, 0], bins=bins, density=True, alpha=0.6, label=f"score function (std {score1.std():.2f})")
ax1.axvline(2.0, color="k", ls="--", label="true gradient 2")
ax1.set_xlabel("one-sample estimate of d/dmu E[z^2] (tails beyond -6..10 not drawn)")
ax1.set_ylabel("density")
ax1.set_title("z ~ N(1, 0.5^2), f(z) = z^2")
ax1.legend(fontsize=8)
for name, ys in rms.items():
    ax2.loglog(ks, ys, "o-", label=name)
ax2.set_xlabel("samples averaged")
ax2.set_ylabel("RMS error of the gradient estimate")
ax2.set_title(f"gradient of E log p(x|z) w.r.t. mu ({J} latents)")
ax2.legend(fontsize=8)
ax2.grid(alpha=0.3, which="both")
tut.save(fig, "gradient_estimators.png")

# %% [markdown]
# ## 3. Pixels as Bernoulli variables
# The decoder outputs one logit l_j per pixel, p_j = sigmoid(l_j), and scores the image with
#
# $$\log p(x \mid z) = \sum_{j=1}^{784} x_j \log p_j + (1 - x_j) \log (1 - p_j)$$
#
# (Kingma & Welling, Appendix C.1), computed stably from the logits as minus the binary cross
# entropy. For binary pixels this is an honest log-probability. MNIST's grey edge pixels are
# used as soft targets x_j in (0, 1); then the term is maximised at p_j = x_j, where it equals
# minus the binary entropy H(x_j) = -x_j log x_j - (1 - x_j) log(1 - x_j). So even a perfect
# decoder cannot reach 0: the grey pixels set a floor of sum_j H(x_j) nats per image. (For
# grey values the density is not normalised; Loaiza-Ganem & Cunningham 2019 fix this with the
# continuous Bernoulli. We keep the standard choice so our numbers compare with the literature.)
#
# Three reference decoders bracket what tutorial 03's VAE will reach:
# a coin flip per pixel (p = 1/2: 784 log 2 = 543.4 nats), one fixed image of per-pixel
# training means (no latent at all), and the entropy floor.

# %%
step(3, "Bernoulli likelihood of pixels")
logits = torch.randn(1000, 784, generator=g, dtype=F64) * 3
x_bin = (torch.rand(1000, 784, generator=g, dtype=F64) < 0.3).to(F64)
ours = bernoulli_log_prob(x_bin, logits)
ref = torch.distributions.Bernoulli(logits=logits).log_prob(x_bin)
check(
    "binary pixels: bernoulli_log_prob - torch.distributions.Bernoulli, max",
    (ours - ref).abs().max(),
    0,
    1e-12,
)
total = (
    bernoulli_log_prob(torch.ones_like(logits), logits).exp()
    + bernoulli_log_prob(torch.zeros_like(logits), logits).exp()
)
check("P(x=1) + P(x=0), worst pixel", (total - 1).abs().max() + 1, 1.0, 1e-12)

x_test, _ = tut.mnist(train=False)
xt = to_unit(x_test[: tut.size(10_000, 500)]).reshape(-1, 784).double()
entropy = torch.special.entr(xt) + torch.special.entr(1 - xt)  # H(x_j) per pixel, nats
best = bernoulli_log_prob(xt, torch.logit(xt, eps=1e-12))  # the decoder p_j = x_j
check(
    "perfect decoder log p(x|z) + sum_j H(x_j), max over images",
    (best.sum(-1) + entropy.sum(-1)).abs().max(),
    0.0,
    1e-6,
)
mean_img = to_unit(x_train).reshape(-1, 784).double().mean(0).clamp(1e-3, 1 - 1e-3)
nll = {
    "coin flip, p = 1/2": -bernoulli_log_prob(xt, torch.zeros_like(xt)).sum(-1).mean().item(),
    "mean image (no latent)": -bernoulli_log_prob(xt, torch.logit(mean_img).expand_as(xt))
    .sum(-1)
    .mean()
    .item(),
    "entropy floor, p = x": entropy.sum(-1).mean().item(),
}
print("    test-set -log p(x) per image under three fixed decoders:")
for name, v in nll.items():
    print(f"      {name:>24}: {v:7.1f} nats = {nats_to_bits_per_dim(v, 784):.3f} bits/dim")
check("coin-flip decoder", nll["coin flip, p = 1/2"], 784 * math.log(2), 1e-6, "784 log 2")
claim(
    "floor < mean image < coin flip",
    nll["entropy floor, p = x"] < nll["mean image (no latent)"] < nll["coin flip, p = 1/2"],
)

i = 0
per_pixel_nll = -bernoulli_log_prob(xt[i], torch.logit(mean_img))
fig, axes = plt.subplots(1, 4, figsize=(13, 3.3))
panels = (
    (xt[i], "a test digit x (in [0, 1])", "gray", (0, 1)),
    (mean_img, "mean-image decoder p_j", "gray", (0, 1)),
    (per_pixel_nll, f"-log p(x_j) under it: {per_pixel_nll.sum():.0f} nats", "magma", (0, None)),
    (entropy[i], f"floor H(x_j): {entropy[i].sum():.0f} nats", "magma", (0, None)),
)
for ax, (img, title, cmap, (lo, hi)) in zip(axes, panels, strict=True):
    im = ax.imshow(img.reshape(28, 28), cmap=cmap, vmin=lo, vmax=hi)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.colorbar(im, ax=ax, fraction=0.046)
tut.save(fig, "bernoulli_pixels.png")

# %% [markdown]
# ## 4. The pieces assembled
# `vaegen.elbo.elbo_terms` returns, per image, -ELBO = reconstruction NLL + KL, with one
# reparameterized sample. With a fixed eps we can recompute both terms from the pieces above.
# An untrained decoder outputs logits near 0, i.e. p close to 1/2: its reconstruction term sits
# near the coin-flip value, the starting point of training in tutorial 03.

# %%
step(4, "the one-sample ELBO from the pieces, on an untrained VAE")
x4 = xt[:64]
eps4 = torch.randn(64, vae.config.latent_dim, generator=g, dtype=F64)
with torch.no_grad():
    terms = elbo_terms(vae, x4, eps=eps4)
    m4, lv4 = vae.encode(x4)
    recon = -bernoulli_log_prob(x4, vae.decode(reparameterize(m4, lv4, eps4))).sum(-1)
    kl = standard_normal_kl(m4, lv4).sum(-1)
print(
    f"    untrained VAE, mean over 64 images: -ELBO {terms.neg_elbo.mean():.1f} ="
    f" reconstruction {terms.recon_nll.mean():.1f} + KL {terms.kl.mean():.2f} nats"
)
check("reconstruction term vs Bernoulli sum, max", (terms.recon_nll - recon).abs().max(), 0, 1e-9)
check("KL term vs closed-form KL, max", (terms.kl - kl).abs().max(), 0, 1e-9)
check(
    "-ELBO - (reconstruction + KL), max", (terms.neg_elbo - terms.recon_nll - terms.kl).abs().max(), 0, 1e-9
)
print("\ndone: tutorial 03 trains this model and follows both terms.")

# %% [markdown]
# ## Exercises
# 1. Set q equal to p in step 1 (`mu_q = mu_p`, `logvar_q = logvar_p`): the closed form gives
#    exactly 0. How far from 0 is the Monte Carlo estimate with 1,000 and with 100,000 samples?
#    Its error should shrink about 10-fold (1 / sqrt(n)).
# 2. In step 2, draw ten times more samples for both gradient estimators and check that the
#    spread of each falls by about sqrt(10); which one needs fewer samples for the same spread?
# 3. For a grey pixel x = 0.5, find the logit that maximises `bernoulli_log_prob(x, logit)` by
#    evaluating it on `torch.linspace(-5, 5, 101)`: is the best value a probability of 1?
