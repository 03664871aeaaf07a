"""Speed of our UNet on this machine: `python -m ddpm.bench`.

Prints one JSON line per UNet: training images/s at batch 64 (`ddpm.train.train_step` with the
default recipe on random data: label drop, Min-SNR eps loss, backward, clipping, one AdamW step,
EMA update), ms per denoising forward pass at batch 100 (no grad), GFLOP per image forward
(torch.utils.flop_counter), and the wall time to draw 100 digits with `ddpm.sample`'s default
setting and how many model passes of batch 100 that takes. The original project's reference
script measures the same training and forward numbers for its UNet: run both in one command, so
they see the same machine load, and compare ratios (docs/experiments.md, "Speed").
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from common.cli import ArgumentParser, positive_int, user_errors
from common.ema import make_ema
from common.runtime import count_params, pick_device
from ddpm.config import DDPMConfig, build_model
from ddpm.sample import generate
from ddpm.samplers import SamplerSpec
from ddpm.train import TrainState, train_step, training_t_probs
from ddpm.unet import UNetConfig


def gflop_per_image(model: torch.nn.Module) -> float:
    """Forward FLOPs for one image (a multiply-add counts 2)."""
    x, t, y = torch.zeros(1, 1, 28, 28), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.cpu()(x, t, y)
    return counter.get_total_flops() / 1e9


# The configurations compared when the default was chosen (docs/experiments.md, "The UNet").
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


def median_seconds(work: Callable[[], object], repeats: int, device: torch.device) -> float:
    """The median wall time of `repeats` calls of `work` (on a noisy machine one call is not enough)."""
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        work()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(
    name: str, config: UNetConfig, batch: int, steps: int, repeats: int, device: torch.device
) -> dict:
    """Time one configuration: training steps, forward passes, 100 default digits; one JSON-able row."""
    torch.manual_seed(0)
    cfg = DDPMConfig(unet=config)
    model, diffusion = build_model(cfg)
    gflop = gflop_per_image(model)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    ema = make_ema(model, cfg.ema_decay, warmup=True)
    state = TrainState(model, model, ema, opt, diffusion, training_t_probs(cfg, diffusion, device))
    x = torch.rand(batch, 1, 28, 28, device=device) * 2 - 1
    y = torch.randint(0, 10, (batch,), device=device)
    for i in range(steps + 3):  # 3 warm-up steps
        if i == 3:
            sync(device)
            start = time.perf_counter()
        train_step(state, x, y, cfg.lr, cfg.p_uncond, cfg.snr_gamma, cfg.grad_clip)
    sync(device)
    train_img_per_s = batch * steps / (time.perf_counter() - start)

    model.eval()
    xb, yb = torch.randn(100, 1, 28, 28, device=device), torch.arange(100, device=device) % 10
    tb = torch.full((100,), 500, device=device)
    spec = SamplerSpec()  # what `ddpm.sample` draws with by default
    with torch.no_grad():
        model(xb, tb, yb)  # warm-up
        step_ms = 1000 * median_seconds(lambda: model(xb, tb, yb), 5, device)
        sample_100_s = median_seconds(lambda: generate(model, diffusion, spec, yb, seed=0), repeats, device)
    return {
        "model": name,
        "params": count_params(model),
        "gflop_per_image": round(gflop, 3),
        "threads": torch.get_num_threads(),
        "batch": batch,
        "device": str(device),
        "train_img_per_s": round(train_img_per_s, 1),
        "sample_ms_per_step": round(step_ms, 1),  # median of 5 passes
        "sample_100_digits_s": round(sample_100_s, 2),  # median of --repeats draws
        "sample_passes": spec.passes(diffusion),
        "sample_setting": spec.label,
    }


@user_errors
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m ddpm.bench", description=__doc__)
    p.add_argument("--batch", type=positive_int, default=64, help="training batch")
    p.add_argument("--steps", type=positive_int, default=10, help="timed training steps")
    p.add_argument("--repeats", type=positive_int, default=3, help="100-digit draws timed (median shown)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--candidates", action="store_true", help="one line per configuration we compared")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = pick_device(a.device)
    configs = CANDIDATES if a.candidates else {"ours (ddpm.unet.UNet, default UNetConfig)": UNetConfig()}
    for name, config in configs.items():
        print(json.dumps(measure(name, config, a.batch, a.steps, a.repeats, device)), flush=True)


if __name__ == "__main__":
    main()
