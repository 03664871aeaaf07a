"""The redesigned engine reproduces what the old one computed (tests/fixtures/engine.pt).

The fixture was written at commit b9b068b by that commit's tests/fixtures/make_engine_fixture.py
(`git show b9b068b:tests/fixtures/make_engine_fixture.py`), when the samplers ran a table of
per-step coefficients and the training step was inline in `ddpm.train.train`: a tiny old-format
checkpoint, the float x0 each sampler setting drew from it with a fixed seed, and one training
step's updated weights. The code that runs now (the
loops of `ddpm.samplers`, `ddpm.train.train_step`) must give the same numbers to float
tolerance, so the redesign changed how the engine reads, not what it computes.
"""

from pathlib import Path

import pytest
import torch

from common.checkpoint import save_checkpoint
from common.ema import make_ema
from common.tensor import randn
from ddpm.config import load_model
from ddpm.samplers import SamplerSpec, sample
from ddpm.train import TrainState, train_step

FIXTURE = torch.load(Path(__file__).parent / "fixtures" / "engine.pt", weights_only=True)


@pytest.fixture(scope="module")
def old_run(tmp_path_factory):
    """The fixture's checkpoint, written as a run directory (an old-format one: no schedule name)."""
    run = tmp_path_factory.mktemp("old_run")
    save_checkpoint(run / "checkpoint.pt", FIXTURE["checkpoint"])
    return run


def test_old_checkpoint_loads_with_its_schedule(old_run):
    model, diffusion, ckpt = load_model(old_run, torch.device("cpu"))
    assert "schedule" not in ckpt["config"]  # saved before the schedule was recorded: cosine
    assert diffusion.T == 100 and model.config.base_channels == 4
    for name, value in model.state_dict().items():
        assert torch.equal(value, ckpt["ema"][name])


@pytest.mark.parametrize("setting", FIXTURE["samples"], ids=lambda s: f"{s['sampler']}{s['steps']}")
def test_each_sampler_draws_the_same_x0(old_run, setting):
    model, diffusion, _ = load_model(old_run, torch.device("cpu"))
    keys = ("sampler", "steps", "spacing", "eta", "guidance", "guidance_interval", "sigma_min", "clip")
    spec = SamplerSpec(**{k: setting[k] for k in keys})
    g = torch.Generator().manual_seed(7)
    y = FIXTURE["labels"]
    x = sample(diffusion, model, spec, randn((len(y), 1, 28, 28), g, "cpu", torch.float32), y, g)
    old = setting["x0"]
    scale = old.abs().max().item()  # unclipped runs reach |x| ~ 1e3: compare relative to that
    assert (x - old).abs().max().item() <= 1e-4 * max(1.0, scale), spec.name


def test_train_step_gives_the_same_weights(old_run):
    fx = FIXTURE["train_step"]
    model, diffusion, ckpt = load_model(old_run, torch.device("cpu"), use_ema=False)
    ema = make_ema(model, fx["ema_decay"], warmup=True)
    ema.module.load_state_dict(ckpt["ema"])
    ema.n_averaged.fill_(fx["ema_n_averaged"])
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=0.0)
    state = TrainState(model, model, ema, opt, diffusion)
    torch.manual_seed(fx["seed"])
    model.train()
    loss = train_step(state, fx["x0"], fx["y"], fx["lr"], fx["p_uncond"], fx["snr_gamma"], fx["grad_clip"])
    assert loss.item() == pytest.approx(fx["loss"], rel=1e-5)
    for after, module in (("model_after", model), ("ema_after", ema.module)):
        for name, value in module.state_dict().items():
            assert torch.allclose(value, fx[after][name], rtol=1e-5, atol=1e-6), (after, name)
