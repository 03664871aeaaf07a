"""The UNet as an eps_model: shapes, conditioning, and that it can learn."""

import torch
from torch import nn

from ddpm.embeddings import ConditionEmbedding, timestep_embedding
from ddpm.unet import UNet, UNetConfig

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


def test_timestep_embedding_differs_between_steps():
    emb = timestep_embedding(torch.arange(1000), 32)
    assert emb.shape == (1000, 32)
    distances = torch.cdist(emb, emb) + torch.eye(1000) * 1e9
    assert distances.min() > 1e-3  # every pair of timesteps is told apart


def test_label_changes_output_and_null_label_works():
    torch.manual_seed(0)
    model = UNet(TINY).eval()
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
