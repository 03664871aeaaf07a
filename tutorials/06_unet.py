# %% [markdown]
# # 06 The noise predictor: a small conditional UNet
#
# Tutorial 05 sampled with an oracle eps*(x_t, t). For MNIST no oracle exists, so a network
# eps_theta(x_t, t, y) learns it: image in, image-shaped noise estimate out. Ho et al. 2020
# (Appendix B) use a UNet (Ronneberger, Fischer & Brox 2015) in the style of PixelCNN++:
# residual blocks at falling then rising resolutions, skip connections between the two paths,
# self-attention at the coarsest resolution, and the step t fed to every block through an
# embedding. Ours (`ddpm/unet.py`) adds the digit label y the same way, with one extra "null"
# label for classifier-free guidance (Ho & Salimans 2022).
#
# This tutorial opens it up: the embeddings of t and y, the tensor shapes block by block
# (forward hooks), one attention map computed from the attention block's own queries and keys,
# and where the parameters and the FLOPs are (torch.utils.flop_counter).
#
# Run: `uv run python tutorials/06_unet.py [--out DIR] [--quick] [--data-dir DIR]`. If a trained
# run exists, in `results/ddpm/` (`python -m ddpm.train`) or where tutorial 07 writes its run
# (`results/tutorials/07_train_and_sample/run/`), its weights are used; otherwise a freshly
# initialised network.

# %%
import math

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from _common import REPO, check, claim, setup, step
from einops import rearrange
from matplotlib.colors import PowerNorm
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from common.data import to_signed
from common.runtime import count_params
from ddpm.config import load_model
from ddpm.diffusion import GaussianDiffusion
from ddpm.embeddings import ConditionEmbedding, timestep_embedding
from ddpm.schedule import cosine_betas
from ddpm.unet import Attention, ResBlock, UNet, UNetConfig

tut = setup("06_unet", "embeddings, shapes, an attention map, parameters and FLOPs of the UNet")
torch.set_grad_enabled(False)  # inspection only

# A trained run, if there is one: `python -m ddpm.train`'s, or the one tutorial 07 trains.
RUNS = (REPO / "results" / "ddpm", REPO / "results" / "tutorials" / "07_train_and_sample" / "run")
run = next((r for r in RUNS if (r / "checkpoint.pt").is_file()), None)
if run is not None:
    model, _, _ = load_model(run, torch.device("cpu"))
    model = getattr(model, "unet", model)  # a v-predicting run wraps its UNet (ddpm.config.VPrediction)
    print(f"    using the trained weights in {run}")
else:
    model = UNet(UNetConfig()).eval()
    print(f"    using a freshly initialised UNet (no checkpoint.pt in {' or '.join(map(str, RUNS))})")
cfg = model.config
print(f"    config: {cfg}")

# %% [markdown]
# ## 1. Telling the network which step it is at
# One network serves all T = 1000 steps, so it must be told t. The integer is first spread
# over a vector of sines and cosines at geometrically spaced frequencies (the position
# encoding of Vaswani et al. 2017, section 3.5):
#
# $$e(t)_i = \sin(t \omega_i),\quad e(t)_{i + d/2} = \cos(t \omega_i),\qquad \omega_i = 10000^{-2i/d} .$$
#
# Like the hands of a clock running at many speeds, the fast columns separate neighbouring
# steps and the slow ones tell early from late; every pair sin^2 + cos^2 = 1, so all vectors
# have the same length sqrt(d/2). A small MLP then maps e(t) to the embedding width (4 x base).

# %%
step(1, "the sinusoidal timestep embedding")
d = cfg.base_channels
ts = torch.arange(1000)
emb = timestep_embedding(ts, d)
print(f"    timestep_embedding(t [1000], {d}) -> {tuple(emb.shape)}")
check(
    "norm of every e(t): max deviation from sqrt(d/2)",
    (emb.norm(dim=1) - math.sqrt(d / 2)).abs().max(),
    0,
    1e-4,
)
dist = torch.cdist(emb, emb) + torch.eye(1000) * 1e9
claim(f"all 1000 steps get different vectors (closest pair {dist.min():.3f} apart)", dist.min() > 1e-3)
cos_sim = F.normalize(emb, dim=1) @ F.normalize(emb, dim=1).T

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
im = ax1.imshow(emb.T, aspect="auto", cmap="RdBu", interpolation="nearest")
ax1.set_xlabel("step t (0-based)")
ax1.set_ylabel("embedding column (sin | cos)")
ax1.set_title(f"e(t), d = {d}: fast columns at the top of each half")
fig.colorbar(im, ax=ax1)
im = ax2.imshow(cos_sim, cmap="viridis")
ax2.set_xlabel("step t")
ax2.set_ylabel("step t'")
ax2.set_title("cosine similarity of e(t) and e(t'): near steps look alike")
fig.colorbar(im, ax=ax2)
tut.save(fig, "timestep_embedding.png")

# %% [markdown]
# ## 2. Telling the network which digit to draw
# The label y in 0..9 gets a learned vector E[y]; row 10 is the null label, used when the label
# is dropped (10% of training steps) and for the unconditional half of guidance. The two
# signals are simply added, emb(t, y) = MLP(e(t)) + E[y], and every residual block projects the
# sum to a per-channel scale and shift of its normalised features, (1 + s) GroupNorm(h) + b
# ("AdaGN", Dhariwal & Nichol 2021), so the label can also turn channels down, not only bias
# them. Because the sum is additive, the label's contribution, emb(t, y) - emb(t, null), is the
# same vector at every step.

# %%
step(2, "the class embedding and how it combines with t")
ce: ConditionEmbedding = model.embed
t4 = torch.tensor([0, 250, 500, 999])
e_y = ce(t4, torch.full((4,), 3))
e_null = ce(t4, torch.full((4,), ce.null_label))
print(
    f"    ConditionEmbedding(t [4], y [4]) -> {tuple(e_y.shape)}; null label = {ce.null_label},"
    f" table {tuple(ce.class_emb.weight.shape)}"
)
delta = e_y - e_null
check("emb(t, 3) - emb(t, null) across t: largest spread", (delta - delta[:1]).abs().max(), 0, 1e-5)
check(
    "that difference vs E[3] - E[null]",
    (delta[0] - ce.class_emb.weight[3] + ce.class_emb.weight[10]).abs().max(),
    0,
    1e-5,
)
claim("y = None means the null label", torch.equal(ce(t4, None), e_null))

# %% [markdown]
# ## 3. Shapes through the network
# A forward hook on each block records what goes in and what comes out. Read the table top to
# bottom: the stem lifts 1 channel to `base`; each level halves the side (stride-2 convolution)
# while widening the channels; the middle works at 7 x 7; on the way up, every block first
# concatenates the matching tensor from the way down (its input has more channels than the
# block before it put out) and transposed convolutions double the side back to 28 x 28.
# The head maps to 1 channel: eps_theta has the shape of x_t.

# %%
step(3, "tensor shapes, block by block (forward hooks)")
diff = GaussianDiffusion(cosine_betas(1000))
x_test, y_test = tut.mnist(train=False)
x0 = to_signed(x_test[:2])
t = torch.tensor([100, 100])
xt = diff.q_sample(x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)))


def is_unit(name: str, module: nn.Module) -> bool:
    """The blocks we report on: embedding, stem, residual and attention blocks, resamplers, head."""
    return (
        isinstance(module, (ResBlock, Attention, ConditionEmbedding))
        or name in ("stem", "head")
        or (name.split(".")[0] in ("downsample", "upsample") and name.count(".") == 1)
    )


units = {name: m for name, m in model.named_modules() if is_unit(name, m)}
calls = []  # (name, input shape, output shape) in the order the blocks run
hooks = [
    m.register_forward_hook(lambda m, inp, out, name=name: calls.append((name, inp[0].shape, out.shape)))
    for name, m in units.items()
]
eps_pred = model(xt, t, y_test[:2])
for h in hooks:
    h.remove()
print(f"    {'block':<16}{'type':<20}{'input':<19}output")
for name, shape_in, shape_out in calls:
    kind = type(units[name]).__name__
    print(f"    {name:<16}{kind:<20}{str(list(shape_in)):<19}{list(shape_out)}")
claim(f"eps_pred has the shape of x_t: {list(eps_pred.shape)}", eps_pred.shape == xt.shape)
ups = [(n, i, o) for n, i, o in calls if n.startswith("up.") and isinstance(units[n], ResBlock)]
claim(
    f"every up-path ResBlock takes a skip: input channels > output channels in {len(ups)} of {len(ups)}",
    all(i[1] > o[1] for _, i, o in ups),
)

body = [(n, i, o) for n, i, o in calls if n != "embed"]
colors = {
    "ResBlock": "tab:blue",
    "Attention": "tab:red",
    "Conv2d": "tab:green",
    "ConvTranspose2d": "tab:olive",
    "Sequential": "tab:purple",
}
fig, ax = plt.subplots(figsize=(13, 4.2))
xs = range(len(body))
ax.plot(xs, [o[-1] for _, _, o in body], color="lightgray", zorder=1)
for k, (name, _, o) in enumerate(body):
    kind = type(units[name]).__name__
    ax.scatter(k, o[-1], s=40 + 3 * o[1], color=colors.get(kind, "k"), zorder=2)
    above = k % 2 == 0  # alternate the labels above and below, so neighbours do not collide
    ax.annotate(
        f"{name}\n{o[1]} ch",
        (k, o[-1]),
        textcoords="offset points",
        xytext=(0, 14 if above else -16),
        ha="center",
        va="bottom" if above else "top",
        fontsize=7,
    )
ax.set_yscale("log", base=2)
ax.set_yticks([28, 14, 7], ["28 x 28", "14 x 14", "7 x 7"])
ax.set_ylim(5, 48)
ax.set_xticks([])
ax.set_xlabel("blocks in the order they run (marker size ~ output channels)")
ax.set_title("the U: resolution and channels of each block's output")
kinds = dict.fromkeys(type(units[n]).__name__ for n, _, _ in body)
ax.legend(
    handles=[plt.Line2D([], [], ls="", marker="o", color=colors.get(kd, "k"), label=kd) for kd in kinds],
    fontsize=8,
    loc="upper center",
    ncols=len(kinds),
)
tut.save(fig, "shapes.png")

# %% [markdown]
# ## 4. An attention map
# At 7 x 7 the feature map is 49 tokens of C channels. The attention block normalises them,
# maps each to a query, key and value (one 1 x 1 convolution, split into heads), and lets every
# token take a weighted average of all values (Vaswani et al. 2017, eq. 1):
#
# $$A = \mathrm{softmax}\!\left(\frac{Q K^\top}{\sqrt{d_{head}}}\right),\qquad \text{out} = A V .$$
#
# The block calls `F.scaled_dot_product_attention`, which never shows A; we recompute A from
# the block's own q and k (captured input, the block's own layers) and check it reproduces the
# block's computation exactly. Each row of A, reshaped to 7 x 7, is where one position looks.
# In a fresh network the maps are nearly uniform (row entropy close to log 49) and, since the
# block's output projection starts at zero, the block passes its input through unchanged: each
# block starts as the identity and training makes it matter. A trained network's maps
# (run tutorial 07 first) are sharper, with heads that look at different parts of the digit.

# %%
step(4, "an attention map from the block's queries and keys")
attn_names = [n for n, m in units.items() if isinstance(m, Attention)]
attn_name = next((n for n in attn_names if n.startswith("mid.")), attn_names[0])
attn: Attention = units[attn_name]
captured = {}
hooks = [
    attn.register_forward_hook(lambda m, inp, out: captured.update(x=inp[0])),
    attn.out.register_forward_hook(lambda m, inp, out: captured.update(mixed=inp[0])),
]
model(xt, t, y_test[:2])
for h in hooks:
    h.remove()
x_in = captured["x"]
side = x_in.shape[-1]
q, k, v = rearrange(
    attn.qkv(attn.norm(x_in)), "b (three heads d) h w -> three b heads (h w) d", three=3, heads=attn.num_heads
)
A = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # [B, heads, HW, HW]
ours = A @ v
check(
    "A V vs F.scaled_dot_product_attention(q, k, v), max",
    (ours - F.scaled_dot_product_attention(q, k, v)).abs().max(),
    0,
    1e-5,
)
mixed = rearrange(ours, "b heads (h w) d -> b (heads d) h w", h=side, w=side)
check(
    f"A V vs what {attn_name}'s output projection received, max",
    (mixed - captured["mixed"]).abs().max(),
    0,
    1e-5,
)
check("every row of A sums to", A.sum(-1).mean(), 1.0, 1e-5)
entropy = -(A * A.clamp(min=1e-12).log()).sum(-1).mean().item()
print(
    f"    {attn_name}: {attn.num_heads} heads over {side * side} tokens; mean row entropy {entropy:.3f} nats"
    f" (uniform: log {side * side} = {math.log(side * side):.3f})"
)

img = x0[0, 0]
cell = 28 / side
queries = {"stroke": None, "background": (0, 0), "centre": (side // 2, side // 2)}
ink = F.avg_pool2d(img[None, None].clamp(min=-1) + 1, kernel_size=round(cell))[0, 0]  # ink per token
queries["stroke"] = divmod(int(ink.flatten().argmax()), side)
# one colour scale for every panel (square-root scaled, so small weights stay visible): uniform rows look flat
scale = PowerNorm(0.5, vmin=0, vmax=A[0].max().item())
fig, axes = plt.subplots(2, 4, figsize=(11, 5.6))
axes[0, 0].imshow(xt[0, 0], cmap="gray")
axes[0, 0].set_title(f"input x_t (t = {int(t[0]) + 1})", fontsize=9)
for ax, (label, (r, c)) in zip(axes[0, 1:], queries.items(), strict=True):
    a = A[0, :, r * side + c].mean(0).reshape(side, side)  # averaged over heads
    ax.imshow(img, cmap="gray")
    ax.imshow(a, cmap="magma", alpha=0.6, extent=(-0.5, 27.5, 27.5, -0.5), norm=scale)
    ax.plot((c + 0.5) * cell - 0.5, (r + 0.5) * cell - 0.5, "c*", ms=12)
    ax.set_title(f"{label} query (*)", fontsize=9)
r, c = queries["stroke"]
for h, ax in enumerate(axes[1, : attn.num_heads]):
    shown = ax.imshow(A[0, h, r * side + c].reshape(side, side), cmap="magma", norm=scale)
    ax.plot(c, r, "c*", ms=10)
    ax.set_title(f"head {h}, stroke query", fontsize=9)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
for ax in axes[1, attn.num_heads :]:
    ax.axis("off")
fig.colorbar(shown, ax=axes, fraction=0.02, label="attention weight")
fig.suptitle(
    f"attention weights of {attn_name} over {side} x {side} tokens (top: mean of {attn.num_heads} heads;"
    f" uniform = 1/{side * side})",
    fontsize=10,
)
tut.save(fig, "attention.png")

# %% [markdown]
# ## 5. Where the parameters and the FLOPs are
# `torch.utils.flop_counter.FlopCounterMode` counts the floating-point operations of matrix
# products and convolutions (2 per multiply-add) per module; normalisations and activations
# are not counted and cost little. A 3 x 3 convolution costs 2 * 9 * C_in * C_out * H * W, so a
# block's cost grows with channels squared times pixels: the same weights are 16 times dearer at
# 28 x 28 than at 7 x 7. Parameters, on the other hand, do not depend on resolution, so the
# wide blocks at 7 x 7 hold most of them.

# %%
step(5, "parameters and FLOPs per block")
x1 = xt[:1]
with FlopCounterMode(display=False) as counter:
    model(x1, t[:1], y_test[:1])
counts = counter.get_flop_counts()
total_flops = counter.get_total_flops()
order = [name for name, _, _ in calls]
params = {n: sum(p.numel() for p in units[n].parameters()) for n in order}
flops = {n: sum(counts.get(f"UNet.{n}", {}).values()) for n in order}
print(f"    {'block':<18}{'params':>10}{'share':>8}{'MFLOPs':>10}{'share':>8}")
for n in order:
    print(
        f"    {n:<18}{params[n]:>10,}{params[n] / count_params(model):>8.1%}"
        f"{flops[n] / 1e6:>10.2f}{flops[n] / total_flops:>8.1%}"
    )
print(
    f"    {'total':<18}{count_params(model):>10,}{'':>8}{total_flops / 1e6:>10.2f}"
    f"   = {total_flops / 1e9:.3f} GFLOPs per image"
)
check("sum over blocks vs count_params(model)", sum(params.values()), count_params(model), 0)
check("sum over blocks vs the counter's total FLOPs", sum(flops.values()), total_flops, 0)
stem = model.stem
want = 2 * 9 * stem.in_channels * stem.out_channels * 28 * 28
check("stem FLOPs from the counter", flops["stem"], want, 0, "2 * 9 * C_in * C_out * 28 * 28")

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 0.28 * len(order) + 1.2), sharey=True)
ypos = range(len(order))[::-1]
ax1.barh(ypos, [params[n] / 1e3 for n in order], color="tab:blue")
ax2.barh(ypos, [flops[n] / 1e6 for n in order], color="tab:orange")
ax1.set_yticks(list(ypos), order, fontsize=8)
ax1.set_xlabel("parameters (thousands)")
ax2.set_xlabel("MFLOPs per image")
ax1.set_title(f"{count_params(model) / 1e6:.2f} M parameters")
ax2.set_title(f"{total_flops / 1e9:.3f} GFLOPs per image (torch.utils.flop_counter)")
for ax in (ax1, ax2):
    ax.grid(axis="x", alpha=0.3)
tut.save(fig, "params_flops.png")
print("\ndone: tutorial 07 trains this network on MNIST and samples with it.")

# %% [markdown]
# ## Exercises
# 1. Predict the parameter count of `UNetConfig(base_channels=32)` from section 5 (a convolution's
#    parameters grow with channels squared), then check it with `count_params(UNet(...))`.
# 2. Remove attention (`UNetConfig(attention_levels=())`) and measure how much of the FLOPs and
#    parameters it held, with the same `FlopCounterMode` as section 5.
# 3. Time the configurations the project compared with `uv run python -m ddpm.bench --candidates`
#    and compare their ms per pass with their GFLOP per image: which layout uses the CPU best?

