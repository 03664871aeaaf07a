"""A small UNet that predicts the noise eps in x_t (Ho et al. 2020, section 3 and Appendix B).

Shapes: x [B, 1, 28, 28], t long [B], y long [B] -> eps_pred [B, 1, 28, 28].

Layout (defaults): 28x28 -> 14x14 -> 7x7 and back, with skip connections. A convolution's
cost is ~ channels^2 x pixels, so doubling channels while halving the side keeps each level's
cost equal; we spend few blocks at 28x28, where MNIST has little structure per pixel, and more
at 14x14 and 7x7, where strokes and digit shape live. Self-attention runs only at 7x7 (49
tokens), where it is cheap and lets every position see the whole digit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from torch import nn

from common.cli import int_tuple, nonneg_int, positive_int, unit_float
from common.config import from_dict, option
from ddpm.embeddings import ConditionEmbedding


@dataclass(frozen=True)
class UNetConfig:
    """The UNet's shape; every field is a flag of `ddpm.train` (group "UNetConfig")."""

    # Defaults chosen by measurement on 2 CPU cores (docs/experiments.md, "The UNet"): 16/48/96
    # channels at 28/14/7, no blocks at 28x28, 0.17 GFLOP and 1.2M parameters per image.
    base_channels: int = option(16, "channels at 28x28; level i has base x channel_mult[i]", positive_int)
    channel_mult: tuple[int, ...] = option((1, 3, 6), "channels per level over the base, e.g. 1,4,8",
                                           int_tuple)  # fmt: skip
    blocks_per_level: tuple[int, ...] = option(
        (0, 1, 1), "residual blocks on the way down, per level (one more on the way up)", int_tuple
    )
    mid_blocks: int = option(1, "residual blocks at the bottom (7x7), between down and up paths", nonneg_int)
    attention_levels: tuple[int, ...] = option(
        (2,), "level indices with self-attention (2 = 7x7; empty: none)", int_tuple
    )
    num_heads: int = option(4, "attention heads", positive_int)
    # Short CPU runs see each image only a few times: no need to regularise by default.
    dropout: float = option(0.0, "dropout before each block's second convolution", unit_float)
    adaptive_norm: bool = option(
        True, "AdaGN: (t, y) scale and shift each block's second norm instead of adding to it"
    )
    image_size: int = option(28, "image side", cli=False)
    in_channels: int = option(1, "image channels", cli=False)
    num_classes: int = option(10, "digit classes; the null label is num_classes", cli=False)

    def __post_init__(self) -> None:
        if len(self.channel_mult) != len(self.blocks_per_level):
            raise ValueError("--channel-mult and --blocks-per-level need one value per level")
        if any(not 0 <= i < len(self.channel_mult) for i in self.attention_levels):
            raise ValueError(f"--attention-levels must name levels 0..{len(self.channel_mult) - 1}")
        widths = [self.base_channels * self.channel_mult[i] for i in self.attention_levels]
        if any(c % self.num_heads for c in widths):
            raise ValueError(f"--num-heads {self.num_heads} must divide the attention widths {widths}")

    @property
    def emb_dim(self) -> int:
        """Width of the (t, y) embedding every residual block reads."""
        return 4 * self.base_channels

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        """The config saved in a checkpoint. Runs from before `adaptive_norm` existed were trained
        without it."""
        return from_dict(cls, d, missing={"adaptive_norm": False})


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (Wu & He 2018) with a faster path for CPU inference on channels-last input.

    y = (x - mean_g) / sqrt(var_g + eps) * weight + bias, with mean_g and var_g over the H x W
    positions and C / G channels of each group. PyTorch's CPU kernel is several times slower on
    channels-last (NHWC) tensors than on NCHW ones at this UNet's sizes, and
    sampling spends its time without autograd on NHWC tensors. There we instead sum x and x^2
    over the positions of the [B, H*W, C] view (two strided reductions), pool the sums into each
    group's mean and variance (var = E[x^2] - mean^2), and apply the normalisation as one
    per-channel scale and shift. With autograd on (training) the native kernel runs: its
    backward is faster than autograd through these ops. (docs/experiments.md, "Speed", has the
    measurements behind keeping this path.)
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            torch.is_grad_enabled()
            or x.device.type != "cpu"
            or x.dim() != 4
            or not x.is_contiguous(memory_format=torch.channels_last)
        ):
            return super().forward(x)
        B, C, H, W = x.shape
        G, per_group = self.num_groups, C // self.num_groups
        xv = rearrange(x, "b c h w -> b (h w) c")  # a view: NHWC memory is already this order
        n = H * W * per_group
        mean = reduce(xv.sum(1), "b (g k) -> b g", "sum", g=G) / n  # [B, G]
        var = reduce((xv * xv).sum(1), "b (g k) -> b g", "sum", g=G) / n - mean * mean
        rstd = torch.rsqrt(var.clamp(min=0.0) + self.eps)
        scale = repeat(rstd, "b g -> b (g k)", k=per_group) * self.weight  # [B, C]
        shift = self.bias - repeat(mean, "b g -> b (g k)", k=per_group) * scale
        return torch.addcmul(shift[:, :, None, None], x, scale[:, :, None, None])  # stays NHWC


def norm(channels: int) -> GroupNorm:
    """GroupNorm with up to 32 groups of at least 4 channels (groups must divide channels)."""
    return GroupNorm(math.gcd(channels, min(32, channels // 4)), channels)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, add the projected (t, y) embedding, then again with dropout.

    With `adaptive` the embedding instead scales and shifts the second normalised activation,
    AdaGN(h, emb) = (1 + s) GroupNorm(h) + b with [s, b] = Linear(emb) (Dhariwal & Nichol 2021,
    section 3), so the label and t can switch channels off as well as bias them.

    x [B, C_in, H, W], emb [B, E] -> [B, C_out, H, W] (a 1x1 conv matches channels on the skip).
    """

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float, adaptive: bool = False):
        super().__init__()
        self.adaptive = adaptive
        self.norm1 = norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out if adaptive else c_out)
        self.norm2 = norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb(emb)[:, :, None, None]  # [B, C_out (x2 if adaptive), 1, 1]
        if self.adaptive:
            scale, shift = e.chunk(2, dim=1)
            h = torch.addcmul(shift, self.norm2(h), 1 + scale)
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, residual: [B, C, H, W] -> same."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        q, k, v = rearrange(
            self.qkv(self.norm(x)),
            "b (three heads d) h w -> three b heads (h w) d",
            three=3,
            heads=self.num_heads,
        )
        a = F.scaled_dot_product_attention(q, k, v)  # [B, heads, HW, d]
        return x + self.out(rearrange(a, "b heads (h w) d -> b (heads d) h w", h=h, w=w))


class Level(nn.Module):
    """The blocks of one resolution: residual blocks, each optionally followed by attention."""

    def __init__(self, c_ins: list[int], c_out: int, cfg: UNetConfig, attn: bool):
        super().__init__()
        self.res = nn.ModuleList(
            ResBlock(c, c_out, cfg.emb_dim, cfg.dropout, cfg.adaptive_norm) for c in c_ins
        )
        self.attn = nn.ModuleList(Attention(c_out, cfg.num_heads) if attn else nn.Identity() for _ in c_ins)


class UNet(nn.Module):
    """eps_model(xt, t, y): the noise-prediction network of a class-conditional DDPM."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        cfg = self.config = config or UNetConfig()
        base = cfg.base_channels
        self.embed = ConditionEmbedding(base, cfg.emb_dim, cfg.num_classes)
        self.stem = nn.Conv2d(cfg.in_channels, base, 3, padding=1)

        chans = [base * m for m in cfg.channel_mult]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips = [base]  # channels of every tensor pushed onto the skip stack
        c = base
        for i, (c_out, n) in enumerate(zip(chans, cfg.blocks_per_level, strict=True)):
            attn = i in cfg.attention_levels
            c_ins = [c] + [c_out] * (n - 1) if n else []
            self.down.append(Level(c_ins, c_out, cfg, attn))
            skips += [c_out] * n
            c = c_out if n else c
            if i < len(chans) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)

        attn_mid = len(chans) - 1 in cfg.attention_levels
        self.mid = Level([c] * cfg.mid_blocks, c, cfg, attn_mid)

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(len(chans))):
            attn = i in cfg.attention_levels
            n = cfg.blocks_per_level[i] + 1  # one more block up: it also takes the downsample's skip
            c_ins = []
            for _ in range(n):
                c_ins.append(c + skips.pop())
                c = chans[i]
            self.up.append(Level(c_ins, chans[i], cfg, attn))
            if i > 0:  # a 2x2 transposed conv doubles the side and moves to the next level's width
                self.upsample.append(nn.ConvTranspose2d(c, chans[i - 1], 2, stride=2))
                c = chans[i - 1]
        self.head = nn.Sequential(norm(c), nn.SiLU(), nn.Conv2d(c, cfg.in_channels, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)
        # Channels-last (NHWC) weights and activations let oneDNN's CPU convolutions skip their
        # layout reorders (docs/experiments.md, "Speed").
        self.to(memory_format=torch.channels_last)

    @property
    def null_label(self) -> int:
        return self.embed.null_label

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embed(t, y)  # [B, 4 * base]
        h = self.stem(x).contiguous(memory_format=torch.channels_last)  # [B, base, H, W], NHWC
        skips = [h]
        for i, level in enumerate(self.down):
            for res, attn in zip(level.res, level.attn, strict=True):
                h = attn(res(h, emb))
                skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                skips.append(h)
        for res, attn in zip(self.mid.res, self.mid.attn, strict=True):
            h = attn(res(h, emb))
        for j, level in enumerate(self.up):
            for res, attn in zip(level.res, level.attn, strict=True):
                h = attn(res(torch.cat([h, skips.pop()], dim=1), emb))
            if j < len(self.upsample):
                h = self.upsample[j](h)
        return self.head(h)
