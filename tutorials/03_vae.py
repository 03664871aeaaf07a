# %% [markdown]
# # 03 Training a VAE: two terms pulling against each other
#
# Tutorial 02 checked the pieces of the evidence lower bound one at a time. Here they are put
# together and trained: the MLP VAE of Kingma & Welling 2013 (`vaegen.model`, 784-400-20, their
# Appendix C) fitted by stochastic gradient ascent on the one-sample ELBO
# (`vaegen.elbo.elbo_terms`: their Algorithm 1 with estimator B, eq. 10), in nats per image:
#
# $$-\mathcal{L}(x) = \underbrace{\mathbb{E}_{q(z|x)}[-\log p(x|z)]}_{\text{reconstruction}}
#   + \underbrace{\mathrm{KL}(q(z|x)\,\|\,N(0, I))}_{\text{KL}} .$$
#
# Following the two terms separately shows what training does. The reconstruction term rewards
# codes z that tell the decoder much about the image; the KL term charges for each nat of that
# information. Then we look at what the trained model does: samples from the prior,
# reconstructions, a walk along a line between two codes and, with a 2-D latent space, a map of
# where each digit lives.
#
# The loop below is the one in `vaegen.train` (Adam, warm-up then cosine learning rate, shuffled
# index batches) without its run directory, checkpoints and logging, so that every step can be
# read here. For a full run use `uv run python -m vaegen.train --out results/vae`.
#
# Run: `uv run python tutorials/03_vae.py [--out DIR] [--quick] [--data-dir DIR]` (about a minute
# and a half on a laptop CPU).

# %%
import math
import time

import matplotlib.pyplot as plt
import torch
from _common import check, claim, setup, step

from common import viz
from common.data import batch_indices, to_unit
from common.distributions import standard_normal_kl
from common.runtime import count_params
from common.training import lr_factor, set_lr
from vaegen.elbo import elbo_terms, evaluate_bounds, reconstruction_nll
from vaegen.model import VAE, VAEConfig, reparameterize
from vaegen.sample import generate, interpolation_strip, latent_manifold

tut = setup("03_vae", "train a VAE: the two ELBO terms, samples, reconstructions, interpolation, a 2-D map")


def tile(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """Images [N, 784] or [N, 28, 28] in [0, 1] -> one [H, W] grid for imshow (white gutters)."""
    return viz.tile(images.reshape(-1, 1, 28, 28).float(), nrow)[0]


def show(ax, images: torch.Tensor, nrow: int, title: str) -> None:
    ax.imshow(tile(images, nrow), cmap="gray", vmin=0, vmax=1)
    ax.set_title(title, fontsize=9)
    ax.axis("off")


# %% [markdown]
# ## 1. Data and model
# The VAE reads pixels in [0, 1] as the probabilities of Bernoulli variables (tutorial 01), one
# row of 784 per image. The encoder maps x to (mu, log sigma^2) of q(z|x) through one hidden
# layer of 400 ReLU units; the decoder maps z back to 784 logits through another. Before
# training, the decoder's logits are small, so it predicts p close to 1/2 for every pixel, and
# its reconstruction term sits near the coin-flip value 784 log 2 = 543 nats of tutorial 02.

# %%
step(1, "the data in [0, 1], the model, and its bound before training")
x_train_u8, y_train = tut.mnist(train=True)
x_test_u8, y_test = tut.mnist(train=False)
n_train = tut.size(len(x_train_u8), 3000)  # --quick trains on a slice
x_train = to_unit(x_train_u8[:n_train]).reshape(-1, 784)  # [N, 784], the Bernoulli targets
y_train = y_train[:n_train]
x_test = to_unit(x_test_u8).reshape(-1, 784)
print(f"    training on {len(x_train):,} images, evaluating on {len(x_test):,} test images")

config = VAEConfig()  # 784 -> 400 -> 20 -> 400 -> 784
model = VAE(config)
D, H, J = config.data_dim, config.hidden, config.latent_dim
check(
    "parameters",
    count_params(model),
    (D + 1) * H + 2 * (H + 1) * J + (J + 1) * H + (H + 1) * D,
    0,
    "(784+1)400 + 2(400+1)20 + (20+1)400 + (400+1)784",
)
before = evaluate_bounds(model, x_test)
print(
    f"    untrained, test set: -ELBO {before['neg_elbo']:.1f} = reconstruction {before['recon_nll']:.1f}"
    f" + KL {before['kl']:.2f} nats per image"
)
check("untrained reconstruction term", before["recon_nll"], 784 * math.log(2), 60, "coin flip 784 log 2")

# %% [markdown]
# ## 2. Training, and the two terms
# One optimizer step: a batch of 64 images, one reparameterized z per image, the mean -ELBO
# as the loss, and backpropagation through z into the encoder (tutorial 02, step 2). We log the
# two terms on the training batches, and evaluate both on the test set after each epoch (with
# fixed noise, so that epochs compare fairly).
#
# Watch the two curves. The reconstruction term falls from the coin-flip 543 nats to about 100
# within the first epoch; a good part of that needs no code at all (the mean image alone scores
# about 206 nats, step 4). The KL starts near zero and *rises*: the encoder begins to spend nats
# on codes that tell digits apart, because each nat of KL buys more than a nat of
# reconstruction. Training settles where the last nat of KL buys exactly one nat of
# reconstruction, here at about 25 nats of KL.
#
# How is the KL spent? Per latent dimension, KL_j = 1/2 (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2),
# averaged over the test set. A dimension that the decoder ignores has no reason to deviate from
# the prior: its q(z_j | x) = N(0, 1) for every x, it costs nothing, and it carries nothing.
# Burda et al. 2015 (section 5.2) call a dimension *active* when its posterior mean varies
# across the data, Var_x(mu_j) > 0.01; their MNIST VAEs with 50 dimensions used only about 20.
# Ours, with 20, uses all of them after ten epochs, but unequally: some carry four times the
# information of others.

# %%
step(2, "train with Adam on the one-sample -ELBO; follow reconstruction and KL")


def train(model: VAE, epochs: int, batch_size: int = tut.size(64, 32), lr: float = 1e-3, log_every: int = 50):
    """Maximise the ELBO as vaegen.train does; returns the training log and the test log.

    train log: rows (epoch as a float, mean reconstruction, mean KL) over each `log_every` steps;
    test log: rows (epoch, evaluate_bounds dict), from epoch 0 (untrained) on.
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = len(x_train) // batch_size
    total = epochs * steps_per_epoch
    train_log, test_log = [], [(0, evaluate_bounds(model, x_test))]
    window = torch.zeros(2)
    n_steps = 0
    for epoch in range(epochs):
        model.train()
        for idx in batch_indices(len(x_train), batch_size, seed=0, epoch=epoch):
            terms = elbo_terms(model, x_train[idx])  # one z ~ q(z|x) per image
            loss = terms.neg_elbo.mean()  # nats per image
            opt.zero_grad(set_to_none=True)
            loss.backward()
            set_lr(opt, lr * lr_factor(n_steps, round(0.02 * total), total))  # warm-up, then cosine to 0
            opt.step()
            window += torch.stack([terms.recon_nll.mean(), terms.kl.mean()]).detach()
            n_steps += 1
            if n_steps % log_every == 0:
                train_log.append((n_steps / steps_per_epoch, *(window / log_every).tolist()))
                window.zero_()
        test_log.append((epoch + 1, evaluate_bounds(model, x_test)))
    model.eval()
    return train_log, test_log


epochs = tut.size(10, 8)
start = time.perf_counter()
train_log, test_log = train(model, epochs, log_every=tut.size(50, 5))
seconds = time.perf_counter() - start
after = test_log[-1][1]
print(f"    {epochs} epochs in {seconds:.0f} s")
print("    epoch   test -ELBO   reconstruction      KL   (nats per image)")
for epoch, b in test_log:
    print(f"    {epoch:5d}   {b['neg_elbo']:10.2f}   {b['recon_nll']:14.2f}   {b['kl']:5.2f}")
last_train = train_log[-1][1] + train_log[-1][2]
print(
    f"    last logged training batches: -ELBO {last_train:.2f}; test {after['neg_elbo']:.2f}"
    f" ({after['neg_elbo'] / (784 * math.log(2)):.4f} bits/dim)"
)
claim(
    f"the reconstruction term fell ({before['recon_nll']:.0f} -> {after['recon_nll']:.1f} nats) while the KL"
    f" rose ({before['kl']:.2f} -> {after['kl']:.2f})",
    after["recon_nll"] < before["recon_nll"] and after["kl"] > before["kl"],
)
if not tut.quick and not tut.synthetic:
    claim(
        f"test -ELBO below 110 nats after {epochs} epochs ({after['neg_elbo']:.2f})", after["neg_elbo"] < 110
    )
    check("test -ELBO minus the last training batches (no overfitting yet)", after["neg_elbo"], last_train, 3)

with torch.no_grad():
    mu_t, logvar_t = model.encode(x_test)
kl_dim = standard_normal_kl(mu_t, logvar_t).mean(0)  # [J], nats
active = mu_t.var(0) > 0.01
check("sum of the per-dimension KL vs the test KL", kl_dim.sum(), after["kl"], 1e-3 * after["kl"])
print(
    f"    active dimensions (Var_x mu_j > 0.01): {int(active.sum())} of {J};"
    f" they hold {kl_dim[active].sum() / kl_dim.sum():.1%} of the KL"
)
if (~active).any() and not tut.quick:
    claim(
        f"every inactive dimension costs almost nothing: at most {kl_dim[~active].max():.3f} nats",
        kl_dim[~active].max() < 0.05,
    )

fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
ep_train = [r[0] for r in train_log]
ep_test = [e for e, _ in test_log]
panels = (
    (axes[0], "recon_nll", 1, "reconstruction E_q[-log p(x|z)]"),
    (axes[1], "kl", 2, "KL(q(z|x) || N(0, I))"),
)
for ax, key, col, name in panels:
    ax.plot(ep_train, [r[col] for r in train_log], lw=0.8, label="training batches")
    ax.plot(ep_test, [b[key] for _, b in test_log], "o-", label="test set, per epoch")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per image")
    ax.set_title(name, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
axes[0].set_yscale("log")
axes[0].set_yticks([80, 100, 150, 200, 300, 400, 543], ["80", "100", "150", "200", "300", "400", "543"])
axes[0].minorticks_off()
order = kl_dim.argsort(descending=True)
axes[2].bar(range(J), kl_dim[order], color=["tab:blue" if a else "tab:gray" for a in active[order]])
axes[2].set_xticks(range(J), [str(int(j)) for j in order], fontsize=7)
axes[2].set_xlabel("latent dimension j (sorted)")
axes[2].set_ylabel("nats per image")
axes[2].set_title(
    f"test KL per dimension: {int(active.sum())} active (blue), {int((~active).sum())} inactive (grey)",
    fontsize=10,
)
tut.save(fig, "elbo_terms.png")

# %% [markdown]
# ## 3. Samples
# To generate, draw z from the prior N(0, I) and decode (Kingma & Welling, section 2.1). The
# decoder gives 784 Bernoulli probabilities; like the paper we show those *means*, the image
# the model expects, rather than a random binary draw from them (right), which looks speckled
# wherever p is between 0 and 1. The means are smoother than real digits: a Gaussian code
# passed through a decoder trained on a pixelwise likelihood averages over the strokes it is
# unsure about, so edges come out grey. We count the grey pixels (0.1 < p < 0.9) of each.

# %%
step(3, "samples: z ~ N(0, I) through the decoder (vaegen.sample.generate)")
g = torch.Generator().manual_seed(1)
means = to_unit(generate(model, 64, None, g))  # decoder means, uint8 -> [0, 1], [64, 28, 28]
draws = torch.bernoulli(means, generator=g)  # one binary image from each p(x|z)
real = x_test[:64]
grey = {name: ((x > 0.1) & (x < 0.9)).float().mean().item() for name, x in (("data", real), ("means", means))}
print(
    f"    mean pixel value: samples {means.mean():.4f}, test digits {x_test.mean():.4f};"
    f" grey pixels: samples {grey['means']:.1%}, test digits {grey['data']:.1%}"
)
if not tut.quick:
    check("mean pixel value of the samples", means.mean(), x_test.mean(), 0.03, "of the test digits")
    claim("the decoder means are blurrier (more grey pixels) than real digits", grey["means"] > grey["data"])

fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
show(axes[0], real, 8, "test digits")
show(axes[1], means, 8, "VAE samples: decoder means sigmoid(logits), z ~ N(0, I)")
show(axes[2], draws, 8, "a Bernoulli draw from each of those p(x|z)")
tut.save(fig, "samples.png")

# %% [markdown]
# ## 4. Reconstructions
# Encode a test digit, decode its posterior mean mu(x): the result shows what the 20 numbers
# of the code kept. Decoding other draws z ~ q(z|x) instead gives nearly the same image: the
# posterior is narrow compared with the prior (sigma << 1 in the active dimensions).
#
# How much does the code say about *this* image? Score the image under the decoder given its
# own code, given the code of another test image, and under the best code-free model, the mean
# image (tutorial 02). Another image's code is worse than no code at all: it confidently
# describes a different digit.

# %%
step(4, "reconstructions, and what the code knows about its image")
with torch.no_grad():
    nll_own = reconstruction_nll(x_test, model.decode(mu_t))
    nll_other = reconstruction_nll(x_test, model.decode(mu_t.roll(1, dims=0)))
    mean_img = x_train.mean(0).clamp(1e-3, 1 - 1e-3)
    nll_mean = reconstruction_nll(x_test, torch.logit(mean_img).expand_as(x_test))
    sigma = (0.5 * logvar_t[:, active if active.any() else slice(None)]).exp()
print(
    f"    -log p(x | z), mean over the test set: own code mu(x) {nll_own.mean():.1f},"
    f" mean image (no code) {nll_mean.mean():.1f}, another image's code {nll_other.mean():.1f} nats"
)
print(f"    posterior std in the active dimensions: median {sigma.median():.3f} (prior: 1)")
if not tut.quick:
    claim(
        "its own code explains an image far better than no code, and no code better than a wrong one",
        nll_own.mean() < nll_mean.mean() < nll_other.mean(),
    )

idx = torch.cat([(y_test == d).nonzero()[:2, 0] for d in range(10)])  # two of each digit
with torch.no_grad():
    rec_mu = torch.sigmoid(model.decode(mu_t[idx]))
    z_q = reparameterize(mu_t[idx], logvar_t[idx], torch.randn(len(idx), J, generator=g))
    rec_z = torch.sigmoid(model.decode(z_q))
fig, ax = plt.subplots(figsize=(12, 2.4))
ax.imshow(tile(torch.cat([x_test[idx], rec_mu, rec_z]), len(idx)), cmap="gray", vmin=0, vmax=1)
ax.set_yticks([15, 45, 75], ["test digit x", "decode(mu(x))", "decode(z ~ q(z|x))"], fontsize=8)
ax.set_xticks([])
ax.set_title("reconstructions: one row each, two test digits per class", fontsize=10)
tut.save(fig, "reconstructions.png")

# %% [markdown]
# ## 5. Walking between two codes
# `vaegen.sample.interpolation_strip` decodes evenly spaced points on the line from mu(x_a) to
# mu(x_b). In latent space every point on the way decodes to one digit-like shape: strokes bend,
# join and open up as one digit turns into the other. The same walk in pixel space,
# (1 - t) x_a + t x_b, is a cross-fade: two faint digits on top of each other.
#
# A number for "one digit or two faint ones": the share of pixels that are more than half on
# (p > 0.5), at the midpoint t = 1/2 relative to the two ends. A cross-fade halves every stroke
# that the two digits do not share, so at its midpoint only their overlap stays solid, about
# half the ink of the ends. The latent midpoint is one digit drawn with full strokes, and
# keeps most of it on average (a thin digit such as a 1 on the way can keep less).

# %%
step(5, "latent interpolation (vaegen.sample.interpolation_strip) against a pixel cross-fade")
pairs = [(3, 8), (1, 7), (4, 9), (0, 6), (2, 5)]  # digit pairs to walk between
first = {d: int((y_test == d).nonzero()[0, 0]) for d in range(10)}
n_points = 9
strips, fades = [], []
t_line = torch.linspace(0, 1, n_points)[:, None]
for a, b in pairs:
    xa, xb = x_test[first[a]], x_test[first[b]]
    strips.append(interpolation_strip(model, xa, xb, y_test[first[a]], y_test[first[b]], n_points))
    fades.append(torch.cat([xa[None], (1 - t_line) * xa + t_line * xb, xb[None]]).reshape(-1, 28, 28))


def solid_ink_kept(path: torch.Tensor) -> float:
    """Share of pixels > 0.5 at the midpoint over the mean share at the two ends of the walk.

    path: [n_points + 2, 28, 28] = x_a, the n_points walk (t = 0 .. 1), x_b; the walk's own ends
    are compared, so decoded midpoints are measured against decoded ends.
    """
    solid = (path[1:-1] > 0.5).float().mean(dim=(1, 2))
    return (solid[len(solid) // 2] / (0.5 * (solid[0] + solid[-1]))).item()


kept_latent = torch.tensor([solid_ink_kept(s) for s in strips])
kept_fade = torch.tensor([solid_ink_kept(f) for f in fades])
print("    solid ink (p > 0.5) at t = 1/2, relative to the ends:")
for (a, b), kl_, kf in zip(pairs, kept_latent, kept_fade, strict=True):
    print(f"      {a} -> {b}: latent walk {kl_:.2f}, cross-fade {kf:.2f}")
if not tut.quick:
    claim(
        f"on average the latent midpoints keep {kept_latent.mean():.2f} of the ends' solid ink,"
        f" the cross-fades {kept_fade.mean():.2f}",
        kept_latent.mean() > kept_fade.mean() + 0.2 and kept_fade.mean() < 0.65,
    )

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.62 * len(pairs) + 0.7))
for ax, paths, title in (
    (ax1, strips, "in latent space: x_a, decode((1-t) mu_a + t mu_b), x_b"),
    (ax2, fades, "in pixel space: x_a, (1-t) x_a + t x_b, x_b"),
):
    ax.imshow(tile(torch.cat(paths), n_points + 2), cmap="gray", vmin=0, vmax=1)
    ax.set_yticks([16 + 30 * k for k in range(len(pairs))], [f"{a} -> {b}" for a, b in pairs], fontsize=8)
    ax.set_xticks([])
    ax.set_title(title, fontsize=10)
tut.save(fig, "interpolation.png")

# %% [markdown]
# ## 6. A 2-D latent space, coloured by digit
# With latent_dim = 2 the codes can be drawn directly. We train a second VAE, identical but for
# J = 2, and plot the posterior means mu(x) of the test digits, coloured by their label, which
# the model never saw. Digits of one class gather in one region: the encoder has found the
# classes without being told, because images of one class look alike and the reconstruction
# term rewards giving similar images similar codes. The KL term keeps the cloud centred on the
# origin at about the prior's scale (if the codes of all digits together were distributed
# exactly as the prior, their second moment Cov(mu) + E[sigma^2] would be the identity). A
# 5-nearest-neighbour classifier on the 2-D codes measures how well the classes separate.
#
# Right: the decoder over a 20 x 20 grid of z, spaced evenly in probability under the prior
# (the normal quantiles of 0.05 .. 0.95, as in Kingma & Welling's Figure 4;
# `vaegen.sample.latent_manifold`). It covers the dashed square on the left, and each digit
# morphs smoothly into its neighbours. Being able to draw the code has a price: two numbers
# cannot describe a digit as well as twenty, so the 2-D model's bound is clearly worse.

# %%
step(6, "a VAE with latent_dim = 2: the map of the test digits and the decoded plane")
model2 = VAE(VAEConfig(latent_dim=2))
start = time.perf_counter()
_, test_log2 = train(model2, epochs, log_every=tut.size(50, 5))
after2 = test_log2[-1][1]
print(
    f"    {epochs} epochs in {time.perf_counter() - start:.0f} s; test -ELBO {after2['neg_elbo']:.2f}"
    f" = reconstruction {after2['recon_nll']:.2f} + KL {after2['kl']:.2f} nats"
    f" (20-D model: {after['neg_elbo']:.2f})"
)
with torch.no_grad():
    mu2, logvar2 = model2.encode(x_test)
    mu2_train, _ = model2.encode(x_train[:10_000])
knn = torch.cdist(mu2, mu2_train).topk(5, largest=False).indices  # [N_test, 5]
votes = y_train[:10_000][knn].mode(dim=1).values
accuracy = (votes == y_test).float().mean().item()
second_moment = torch.cov(mu2.T) + logvar2.exp().mean(0).diag()  # Cov of the aggregate posterior
print(
    f"    5-NN on the 2-D codes: test accuracy {accuracy:.1%} (chance 10%);"
    f" codes: mean ({mu2[:, 0].mean():.2f}, {mu2[:, 1].mean():.2f}),"
    f" Cov(mu) + E[sigma^2] = [[{second_moment[0, 0]:.2f}, {second_moment[0, 1]:.2f}],"
    f" [{second_moment[1, 0]:.2f}, {second_moment[1, 1]:.2f}]]"
)
if not tut.quick:
    claim("2 latent dimensions give a worse bound than 20", after2["neg_elbo"] > after["neg_elbo"])
    claim(f"the classes separate in 2-D: 5-NN accuracy {accuracy:.1%} > 50%", accuracy > 0.5)

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 6.4), gridspec_kw={"wspace": 0.3})
pts = ax1.scatter(*mu2.T, c=y_test, cmap="tab10", s=3, alpha=0.6, vmin=-0.5, vmax=9.5)
size = 20
coords = torch.special.ndtri(torch.linspace(0.05, 0.95, size))  # the grid of latent_manifold
edge = coords[-1].item()
ax1.plot([-edge, edge, edge, -edge, -edge], [-edge, -edge, edge, edge, -edge], "k--", lw=0.8)
ax1.set_xlim(-4, 4)
ax1.set_ylim(-4, 4)
ax1.set_aspect("equal")
ax1.set_xlabel("z_1")
ax1.set_ylabel("z_2")
ax1.set_title(f"posterior means of {len(mu2):,} test digits (5-NN accuracy {accuracy:.0%})", fontsize=10)
fig.colorbar(pts, ax=ax1, ticks=range(10), fraction=0.046, pad=0.02, label="digit")
ax2.imshow(tile(latent_manifold(model2, None, size=size), size), cmap="gray", vmin=0, vmax=1)
ticks = [0, 5, 10, 14, 19]  # cells spaced evenly in probability, so unevenly in z
ax2.set_xticks([16 + 30 * k for k in ticks], [f"{coords[k]:.2f}" for k in ticks])
ax2.set_yticks([16 + 30 * k for k in ticks], [f"{coords.flip(0)[k]:.2f}" for k in ticks])
ax2.set_xlabel("z_1 (cells at the normal quantiles 0.05 .. 0.95)")
ax2.set_ylabel("z_2")
ax2.set_title("decoder means over the dashed square", fontsize=10)
tut.save(fig, "latent_2d.png")
print("\ndone: tutorials 04-07 turn to the diffusion model; 08 compares it with this VAE.")

# %% [markdown]
# ## Exercises
# 1. Train with `VAEConfig(latent_dim=5)` through `train` of step 2 and compare its final
#    reconstruction and KL terms with the 20-dimensional model's: which term moves, and why?
# 2. Skip `model.init_output_bias` in step 1 and compare the -ELBO after the first epoch.
# 3. Run the project's command, `uv run python -m vaegen.train --epochs 5 --out results/vae_e5
#    --data-dir DIR`, and compare its test -ELBO at epoch 5 (`loss.csv`) with step 2's curve.
