"""Speed of our UNet on this machine: `python -m ddpm.bench`.

Prints one JSON line with the same measurements as ../shared/bench/reference_unet.py
(training images/s at batch 64: eps-MSE, backward, one Adam step, random data; ms per
denoising forward pass at batch 100, no grad), plus GFLOP per image forward
(torch.utils.flop_counter) and the wall time to draw 100 digits with the default sampler.
Run both in one command so they see the same machine load, and compare ratios:

    uv run python -m ddpm.bench; uv run --with diffusers python ../shared/bench/reference_unet.py
"""

from __future__ import annotations

import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from common.cli import ArgumentParser, positive_int, user_errors
from common.runtime import count_params, pick_device
from ddpm.diffusion import GaussianDiffusion
from ddpm.sample import (
    DEFAULT_GUIDANCE,
    DEFAULT_GUIDANCE_INTERVAL,
    DEFAULT_SAMPLER,
    DEFAULT_SIGMA_MIN,
    DEFAULT_SPACING,
    DEFAULT_STEPS,
    generate,
)
from ddpm.schedule import cosine_betas
from ddpm.unet import UNet, UNetConfig


def gflop_per_image(model: torch.nn.Module) -> float:
    """Forward FLOPs for one image (a multiply-add counts 2)."""
    x, t, y = torch.zeros(1, 1, 28, 28), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.cpu()(x, t, y)
    return counter.get_total_flops() / 1e9


# The configurations compared when the default was chosen (README, "Choosing the UNet").
CANDIDATES = {
    "default 16/48/96, blocks 0,1,1": UNetConfig(),
    "32/64/64, blocks 0,1,1": UNetConfig(base_channels=32, channel_mult=(1, 2, 2)),
    "32/64/96, blocks 0,1,1": UNetConfig(base_channels=32, channel_mult=(1, 2, 3)),
    "32/64/64, blocks 0,2,2": UNetConfig(
        base_channels=32, channel_mult=(1, 2, 2), blocks_per_level=(0, 2, 2)
    ),
    "32/64/64, blocks 1,2,2, mid 2 (reference-like)": UNetConfig(
        base_channels=32, channel_mult=(1, 2, 2), blocks_per_level=(1, 2, 2), mid_blocks=2
    ),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(name: str, config: UNetConfig, batch: int, steps: int, device: torch.device) -> dict:
    """Time one configuration the way the reference script does; returns one JSON-able row."""
    torch.manual_seed(0)
    model = UNet(config)
    gflop = gflop_per_image(model)
    model.to(device)
    diffusion = GaussianDiffusion(cosine_betas(1000))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.rand(batch, 1, 28, 28, device=device) * 2 - 1
    y = torch.randint(0, 10, (batch,), device=device)
    for i in range(steps + 3):  # 3 warm-up steps, as the reference does
        if i == 3:
            sync(device)
            start = time.perf_counter()
        loss = diffusion.loss(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sync(device)
    train_img_per_s = batch * steps / (time.perf_counter() - start)

    model.eval()
    xb, yb = torch.randn(100, 1, 28, 28, device=device), torch.arange(100, device=device) % 10
    tb = torch.full((100,), 500, device=device)
    with torch.no_grad():
        for i in range(6):
            if i == 1:
                sync(device)
                start = time.perf_counter()
            model(xb, tb, yb)
        sync(device)
        step_ms = (time.perf_counter() - start) / 5 * 1000
        start = time.perf_counter()
        generate(  # exactly what `ddpm.sample` runs by default, for 100 digits
            model, diffusion, yb, DEFAULT_SAMPLER, DEFAULT_STEPS, 0.0, DEFAULT_GUIDANCE, seed=0,
            progress=False, guidance_interval=DEFAULT_GUIDANCE_INTERVAL, spacing=DEFAULT_SPACING,
            sigma_min=DEFAULT_SIGMA_MIN,
        )  # fmt: skip
        sync(device)
        sample_100_s = time.perf_counter() - start
    return {
        "model": name,
        "params": count_params(model),
        "gflop_per_image": round(gflop, 3),
        "threads": torch.get_num_threads(),
        "batch": batch,
        "device": str(device),
        "train_img_per_s": round(train_img_per_s, 1),
        "sample_ms_per_step": round(step_ms, 1),
        "sample_100_digits_s": round(sample_100_s, 2),
        "sample_setting": f"{DEFAULT_SAMPLER} {DEFAULT_STEPS} {DEFAULT_SPACING} steps "
        f"to sigma {DEFAULT_SIGMA_MIN}, "
        f"guidance {DEFAULT_GUIDANCE} in sigma interval {DEFAULT_GUIDANCE_INTERVAL}",
    }


@user_errors
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m ddpm.bench", description=__doc__)
    p.add_argument("--batch", type=positive_int, default=64, help="training batch")
    p.add_argument("--steps", type=positive_int, default=10, help="timed training steps")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--candidates", action="store_true", help="one line per configuration we compared")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = pick_device(a.device)
    configs = CANDIDATES if a.candidates else {"ours (ddpm.unet.UNet, default UNetConfig)": UNetConfig()}
    for name, config in configs.items():
        print(json.dumps(measure(name, config, a.batch, a.steps, device)), flush=True)


if __name__ == "__main__":
    main()
