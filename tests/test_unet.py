"""The UNet as an eps_model: shapes, conditioning, and that it can learn."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddpm.embeddings import ConditionEmbedding, timestep_embedding
from ddpm.unet import GroupNorm, ResBlock, UNet, UNetConfig

TINY = UNetConfig(
    base_channels=8,
    channel_mult=(1, 2, 2),
    blocks_per_level=(0, 1, 1),
    mid_blocks=1,
    attention_levels=(2,),
    num_heads=2,
    dropout=0.0,
)


def randomize_zero_inits(model: nn.Module) -> None:
    """Blocks start as identities (zeroed last convs); give them weights so inputs matter."""
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        if torch.all(p == 0):
            p.data = torch.randn(p.shape, generator=g) * 0.1


def test_output_shape_equals_input_shape():
    for cfg in (TINY, UNetConfig()):
        model = UNet(cfg)
        x = torch.randn(3, 1, 28, 28)
        assert model(x, torch.tensor([0, 500, 999]), torch.tensor([1, 2, 10])).shape == x.shape


def test_timestep_embedding_is_the_sinusoid_of_vaswani_et_al():
    # Vaswani et al. 2017, section 3.5, as Ho et al. 2020 use it: with half = dim / 2 frequencies
    # w_i = 10000^(-i / half), emb[t] = [sin(t w_0), ..., sin(t w_{half-1}), cos(t w_0), ...].
    dim, ts = 10, [0, 1, 7, 500, 999]
    emb = timestep_embedding(torch.tensor(ts), dim)
    for row, t in enumerate(ts):
        for i in range(dim // 2):
            w = 10000.0 ** (-i / (dim // 2))
            assert emb[row, i].item() == pytest.approx(math.sin(t * w), abs=1e-4)
            assert emb[row, dim // 2 + i].item() == pytest.approx(math.cos(t * w), abs=1e-4)
    odd = timestep_embedding(torch.tensor(ts), dim + 1)
    assert torch.equal(odd[:, :dim], emb) and not odd[:, dim].any()  # an odd width pads a zero


def test_timestep_embedding_differs_between_steps():
    emb = timestep_embedding(torch.arange(1000), 32)
    assert emb.shape == (1000, 32)
    distances = torch.cdist(emb, emb) + torch.eye(1000) * 1e9
    assert distances.min() > 1e-3  # every pair of timesteps is told apart


@pytest.mark.parametrize("adaptive_norm", [False, True])
def test_label_changes_output_and_null_label_works(adaptive_norm):
    torch.manual_seed(0)
    model = UNet(dataclasses.replace(TINY, adaptive_norm=adaptive_norm)).eval()
    randomize_zero_inits(model)
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([300, 300])
    out_a = model(x, t, torch.tensor([3, 3]))
    out_b = model(x, t, torch.tensor([7, 7]))
    assert (out_a - out_b).abs().max() > 1e-4
    out_null = model(x, t, torch.full((2,), model.null_label))
    assert torch.equal(out_null, model(x, t, None))  # y=None means the null class
    assert (out_null - out_a).abs().max() > 1e-4


def test_condition_embedding_null_row_is_the_last():
    emb = ConditionEmbedding(8, 16, num_classes=10)
    assert emb.null_label == 10 and emb.class_emb.num_embeddings == 11


def test_tiny_unet_overfits_one_batch():
    torch.manual_seed(0)
    model = UNet(TINY)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, eps = torch.randn(8, 1, 28, 28), torch.randn(8, 1, 28, 28)
    t, y = torch.randint(0, 1000, (8,)), torch.arange(8)
    losses = []
    for _ in range(200):
        loss = ((model(xt, t, y) - eps) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10


def test_adaptive_norm_scales_and_shifts_the_second_norm():
    torch.manual_seed(0)
    block = ResBlock(4, 8, emb_dim=6, dropout=0.0, adaptive=True)
    randomize_zero_inits(block)
    nn.init.zeros_(block.emb.weight)  # the embedding's projection is then its bias: [s, b]
    block.emb.bias.data = torch.cat([torch.full((8,), 0.5), torch.full((8,), -0.2)])
    x, emb = torch.randn(2, 4, 7, 7), torch.randn(2, 6)
    h = block.conv1(F.silu(block.norm1(x)))
    expected = block.skip(x) + block.conv2(F.silu(1.5 * block.norm2(h) - 0.2))  # (1 + s) GN(h) + b
    assert torch.allclose(block(x, emb), expected, atol=1e-6)


@pytest.mark.parametrize("shape, groups", [((3, 16, 28, 28), 4), ((2, 48, 14, 14), 12), ((5, 96, 7, 7), 24)])
def test_group_norm_inference_path_matches_the_native_kernel(shape, groups):
    torch.manual_seed(0)
    gn = GroupNorm(groups, shape[1])
    gn.weight.data, gn.bias.data = torch.rand(shape[1]) + 0.5, torch.randn(shape[1])
    # Channel offsets several times the spread, as after a conv: E[x^2] - mean^2 must hold up.
    x = torch.randn(shape) * 2 + torch.randn(1, shape[1], 1, 1) * 5
    x = x.contiguous(memory_format=torch.channels_last)
    expected = F.group_norm(x.contiguous(), groups, gn.weight, gn.bias, gn.eps)
    with torch.no_grad():
        fast = gn(x)
    assert fast.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(fast, expected, atol=1e-4), (fast - expected).abs().max()
    assert torch.allclose(gn(x), expected, atol=1e-5)  # with autograd: the native kernel


def test_unet_gives_the_same_eps_with_and_without_autograd():
    torch.manual_seed(0)
    model = UNet(TINY).eval()
    randomize_zero_inits(model)
    x, t, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 9, 10])
    with torch.no_grad():
        fast = model(x, t, y)  # the GroupNorm inference path
    assert torch.allclose(fast, model(x, t, y), atol=1e-5)


def test_config_refuses_shapes_the_unet_cannot_build():
    with pytest.raises(ValueError, match="one value per level"):
        UNetConfig(channel_mult=(1, 2), blocks_per_level=(0, 1, 1))
    with pytest.raises(ValueError, match="attention-levels"):
        UNetConfig(attention_levels=(3,))
    with pytest.raises(ValueError, match="num-heads"):
        UNetConfig(num_heads=5)  # 96 channels at 7x7 do not split into 5 heads
    assert UNet(UNetConfig(num_heads=8)).config.num_heads == 8


def test_config_round_trips_and_old_runs_load_without_adaptive_norm():
    cfg = UNetConfig(channel_mult=(1, 2, 4), attention_levels=(1, 2))
    saved = json.loads(json.dumps(dataclasses.asdict(cfg)))  # as in a checkpoint: lists, not tuples
    assert UNetConfig.from_dict(saved) == cfg
    del saved["adaptive_norm"]  # a run from before the option: trained with additive conditioning
    old = UNetConfig.from_dict(saved)
    assert old.adaptive_norm is False
    mid_channels = old.base_channels * old.channel_mult[-1]
    assert UNet(old).mid.res[0].emb.out_features == mid_channels  # adds C, not scale and shift 2C
    assert UNet(cfg).mid.res[0].emb.out_features == 2 * mid_channels
