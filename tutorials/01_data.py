# %% [markdown]
# # 01 The data: MNIST as both models see it
#
# MNIST (LeCun, Bottou, Bengio & Haffner 1998) is 70,000 greyscale digits, 28 x 28 pixels,
# split 60,000 for training and 10,000 for testing. Before modelling a distribution it pays to
# look at it: how the labels are spread, what a typical digit looks like, and what values the
# pixels take. The last question decides the likelihood each model uses.
#
# `common.data.load_mnist` returns a whole split as one `uint8` tensor `[N, 1, 28, 28]` plus
# `int64` labels `[N]`; training loops slice batches out of it. It looks for the raw IDX files
# under `--data-dir`, then `$MNIST_DIR`, then `./data`.
#
# Run: `uv run python tutorials/01_data.py [--out DIR] [--quick] [--data-dir DIR]`.

# %%
import matplotlib.pyplot as plt
import torch
from _common import check, claim, setup, step

from common.data import signed_to_uint8, to_signed, to_unit, unit_to_uint8
from common.viz import save_digit_grid

tut = setup("01_data", "MNIST: labels, a sample grid, pixel statistics, the [0,1] and [-1,1] conventions")

# %% [markdown]
# ## 1. Load both splits
# Everything below is a tensor operation on these four objects; nothing is cached on disk.

# %%
step(1, "load the training and test splits")
x_train, y_train = tut.mnist(train=True)
x_test, y_test = tut.mnist(train=False)
print(
    f"    train images {tuple(x_train.shape)} {x_train.dtype}, labels {tuple(y_train.shape)} {y_train.dtype}"
)
print(f"    test  images {tuple(x_test.shape)} {x_test.dtype}")
claim(
    f"pixels are integers in 0..255: min {int(x_train.min())}, max {int(x_train.max())}",
    x_train.dtype == torch.uint8 and int(x_train.max()) <= 255,
)
if not tut.synthetic:
    claim("60,000 training and 10,000 test digits", (len(x_train), len(x_test)) == (60_000, 10_000))

# %% [markdown]
# ## 2. How the labels are spread
# A class-conditional model learns p(x | y) for each digit y; if one digit were rare, its
# samples would be worse. MNIST is close to balanced: the commonest digit (1) has about 24%
# more examples than the rarest (5), which matters little.

# %%
step(2, "class distribution (bar chart)")
train_counts = torch.bincount(y_train, minlength=10)
test_counts = torch.bincount(y_test, minlength=10)
print("    digit:      " + " ".join(f"{d:>5d}" for d in range(10)))
print("    train count:" + " ".join(f"{int(c):>5d}" for c in train_counts))
print("    test count: " + " ".join(f"{int(c):>5d}" for c in test_counts))
ratio = (train_counts.max() / train_counts.min()).item()
print(
    f"    commonest / rarest (train): digit {int(train_counts.argmax())} / digit {int(train_counts.argmin())}"
    f" = {ratio:.3f}"
)
if not tut.synthetic:
    check("train count of digit 1", train_counts[1], 6742, 0, "documented")
    check("train count of digit 5", train_counts[5], 5421, 0, "documented")

fig, ax = plt.subplots(figsize=(7, 3.5))
digits = torch.arange(10)
ax.bar(digits - 0.2, train_counts / len(y_train) * 100, width=0.4, label=f"train (n={len(y_train):,})")
ax.bar(digits + 0.2, test_counts / len(y_test) * 100, width=0.4, label=f"test (n={len(y_test):,})")
ax.axhline(10, color="k", lw=0.8, ls="--", label="uniform (10%)")
ax.set_xticks(range(10))
ax.set_xlabel("digit")
ax.set_ylabel("share of the split (%)")
ax.set_title("MNIST class distribution")
ax.legend(loc="lower right", fontsize=8)
ax.set_ylim(0, 13)
tut.save(fig, "class_distribution.png")

# %% [markdown]
# ## 3. What the digits look like
# One row per digit. Note the variety inside a class (slant, stroke width, open or closed
# loops): that within-class variety is what a conditional generator still has to produce.
# The class means (right) show the average shape of each digit and how much ink each needs.

# %%
step(3, "a sample grid (one row per digit) and the mean image of each class")
per_digit = 12
save_digit_grid(x_train[: 100 * per_digit], y_train[: 100 * per_digit], tut.out / "samples.png", per_digit)
print(f"    figure: {tut.out / 'samples.png'}")

unit = to_unit(x_train)
means = torch.stack([unit[y_train == d].mean(0)[0] for d in range(10)])  # [10, 28, 28]
ink = means.mean(dim=(1, 2))
fig, axes = plt.subplots(1, 10, figsize=(12, 1.8))
for d, ax in enumerate(axes):
    ax.imshow(means[d], cmap="gray", vmin=0, vmax=1)
    ax.set_title(f"{d}: ink {ink[d]:.3f}", fontsize=8)
    ax.axis("off")
fig.suptitle("mean image per digit (title: mean pixel value in [0, 1])", fontsize=9)
tut.save(fig, "class_means.png")
print("    mean ink per digit: " + " ".join(f"{d}:{v:.3f}" for d, v in enumerate(ink.tolist())))
print(f"    least ink: digit {int(ink.argmin())}, most ink: digit {int(ink.argmax())}")

# %% [markdown]
# ## 4. Pixel statistics
# In [0, 1], the training pixels have mean 0.1307 and standard deviation 0.3081 (the two
# numbers every MNIST classifier normalises with). The histogram explains the large std for a
# small mean: four pixels in five are exactly 0 (background), a few percent sit at or just
# below 255 (the middle of a stroke), and the rest, spread thinly over the grey levels in
# between, are the anti-aliased edges of the strokes.
#
# That shape is why the VAE's decoder is a product of Bernoulli distributions, one per pixel
# (Kingma & Welling 2013, Appendix C.1): the data are almost binary, and the grey levels act as
# soft targets. The DDPM instead treats pixels as continuous values on a grid of 256 levels and
# scores them with a discretised Gaussian (Ho et al. 2020, section 3.3).

# %%
step(4, "pixel statistics in [0, 1]")
mean, std = unit.mean().item(), unit.std().item()
print(f"    mean {mean:.4f}, std {std:.4f} over {unit.numel():,} pixels")
if not tut.synthetic:
    check("pixel mean", mean, 0.1307, 5e-5, "documented")
    check("pixel std", std, 0.3081, 5e-5, "documented")
levels = torch.bincount(x_train.flatten(), minlength=256).double()
share = levels / levels.sum()
print(
    f"    exactly 0 (background): {share[0]:.1%}; 250..255 (stroke): {share[250:].sum():.1%};"
    f" 1..249 (edges): {share[1:250].sum():.1%}"
)
if not tut.synthetic:
    claim(f"more than half of all pixels are exactly 0 ({share[0]:.1%})", share[0] > 0.5)
per_pixel_mean = unit.mean(0)[0]
print(
    f"    per-position mean ranges from {per_pixel_mean.min():.3f} (borders) to {per_pixel_mean.max():.3f}"
    f" (centre); {int((per_pixel_mean == 0).sum())} of 784 positions are 0 in every training image"
)

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5), gridspec_kw={"width_ratios": [2.2, 1]})
ax1.bar(torch.arange(256), share, width=1.0, color="tab:blue")
ax1.set_yscale("log")
ax1.set_xlabel("pixel value (uint8)")
ax1.set_ylabel("share of all pixels (log scale)")
ax1.set_title(f"pixel values: {share[0]:.0%} are 0, {share[250:].sum():.1%} are 250..255")
im = ax2.imshow(per_pixel_mean, cmap="magma")
ax2.set_title("mean of each pixel position")
ax2.axis("off")
fig.colorbar(im, ax=ax2, fraction=0.046)
tut.save(fig, "pixel_statistics.png")

# %% [markdown]
# ## 5. Two pixel conventions
# The uint8 images are converted once, at the model's door, and only by `common.data`:
#
# * VAE: `to_unit`, x / 255 in [0, 1], read as Bernoulli probabilities.
# * DDPM: `to_signed`, x / 127.5 - 1 in [-1, 1], the range of the N(0, I) noise it is mixed
#   with, so that the reverse process works on consistently scaled inputs (Ho et al. 2020,
#   section 3.3). Not at unit variance, though: MNIST in [-1, 1] has mean -0.74 and standard
#   deviation 0.62 (checked below), so each pixel of x_t = sqrt(alpha_bar) x_0 +
#   sqrt(1 - alpha_bar) eps has variance 0.38 alpha_bar + (1 - alpha_bar), rising from the
#   data's 0.38 to the noise's 1 along the chain.
#
# One grey level is 1/255 wide in [0, 1] and 2/255 = 1/127.5 wide in [-1, 1]; that second
# number returns in tutorial 04, where it fixes the cosine schedule's offset s. Both maps are
# invertible on the 256 levels, so nothing is lost by converting.

# %%
step(5, "the [0, 1] and [-1, 1] conventions, and their round trips")
x = x_train[:512]
u, s = to_unit(x), to_signed(x)
print(f"    to_unit:   range [{u.min():.3f}, {u.max():.3f}], mean {u.mean():.4f}")
print(f"    to_signed: range [{s.min():.3f}, {s.max():.3f}], mean {s.mean():.4f}  (= 2 * unit mean - 1)")
check("signed mean", s.mean(), 2 * u.mean() - 1, 1e-5, "2 * unit mean - 1")
claim("unit_to_uint8(to_unit(x)) == x for every pixel", torch.equal(unit_to_uint8(u), x))
claim("signed_to_uint8(to_signed(x)) == x for every pixel", torch.equal(signed_to_uint8(s), x))
levels_signed = to_signed(torch.arange(256, dtype=torch.uint8))
check("one grey level in [-1, 1]", levels_signed[1] - levels_signed[0], 1 / 127.5, 1e-6, "1/127.5")
if not tut.synthetic:
    everything = to_signed(x_train)
    print(f"    all training pixels in [-1, 1]: mean {everything.mean():.3f}, std {everything.std():.3f}")
    claim("the DDPM's data are far from unit variance: std below 0.65", everything.std() < 0.65)

fig, axes = plt.subplots(1, 3, figsize=(10, 3))
for ax, img, title, (lo, hi) in zip(
    axes,
    (x[0, 0].float(), u[0, 0], s[0, 0]),
    ("uint8 (storage)", "to_unit: [0, 1] (VAE)", "to_signed: [-1, 1] (DDPM)"),
    ((0, 255), (0, 1), (-1, 1)),
    strict=True,
):
    im = ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.colorbar(im, ax=ax, fraction=0.046)
fig.suptitle(f"one training digit (label {int(y_train[0])}) in the three ranges", fontsize=10)
tut.save(fig, "conventions.png")

print("\ndone: the VAE tutorials (02, 03) use to_unit, the diffusion tutorials (04-09) use to_signed.")

# %% [markdown]
# ## Exercises
# 1. Which digit has the most ink? Compute the mean pixel value per class from `x_train` and
#    `y_train`; check your answer against the class means in the figure of step 3.
# 2. How "binary" is MNIST? Count the share of pixels that are 0 or 255 exactly; then with
#    values in [0, 10] or [245, 255]. Compare with the histogram of step 4.
# 3. Verify the variance of step 5: take 1000 training digits through `to_signed`, noise them
#    to alpha_bar = 0.5 (x_t = sqrt(0.5) x_0 + sqrt(0.5) eps), and compare the variance of all
#    the pixel values of x_t with 0.38 * 0.5 + 0.5.
