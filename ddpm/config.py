"""The DDPM's configuration, and the model and process built from it.

`DDPMConfig` is the one place a hyperparameter of the diffusion model lives: each field is a flag
of `python -m ddpm.train` (common.config), a key of the run's config.json and of its checkpoint.
`build_model` turns it into (eps model, GaussianDiffusion), the eps model a UNet that predicts v
wrapped in `VPrediction` (the default) or, with `--prediction eps`, the UNet itself; `load_model`
does the same from a run's checkpoint. Train, sample, evaluate and bench all build through these two.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from common.checkpoint import load_checkpoint
from common.cli import (
    at_least_two,
    finite_float,
    image_counts,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    unit_float,
)
from common.config import from_dict, nested, option
from common.data import DATA_DIR_HELP
from ddpm.diffusion import GaussianDiffusion
from ddpm.schedule import SCHEDULES, make_betas
from ddpm.unet import UNet, UNetConfig


@dataclass(frozen=True)
class DDPMConfig:
    """Every setting of a DDPM run: the recipe, the process, the UNet and where it all goes."""

    out: str = option("results/ddpm", "run directory (config, checkpoint, curves, samples)", resume="flag")
    epochs: int = option(6, "passes over the 60k training images", positive_int, resume="extend")
    minutes: float = option(
        30.0, "wall-clock budget: the lr anneals by epochs or by time, whichever runs out first (0: none)",
        nonneg_float, resume="extend",
    )  # fmt: skip
    max_steps: int | None = option(None, "stop after N optimizer steps", positive_int, resume="flag")
    batch_size: int = option(64, "images per optimizer step (per process under torchrun)", positive_int)
    lr: float = option(2e-3, "peak AdamW learning rate", positive_float)
    warmup_steps: int = option(
        200, "linear warm-up, then cosine decay to 0 over --epochs (or --minutes, if shorter)", nonneg_int
    )
    grad_clip: float = option(1.0, "max gradient norm (0: off)", nonneg_float)
    ema_decay: float = option(
        0.999, "decay of the weights' moving average (sampled from); the warm-up's lower decay "
        "(1+n)/(10+n) rules until step (10d-1)/(1-d), 8,991 for 0.999 (common.ema)", unit_float,
    )  # fmt: skip
    p_uncond: float = option(0.1, "probability of dropping the label (classifier-free guidance)", unit_float)
    snr_gamma: float = option(
        5.0,
        "weight each step's loss by min(SNR, gamma) / SNR (Min-SNR); 0: unweighted L_simple",
        nonneg_float,
    )
    prediction: str = option(
        "v", "what the UNet outputs: v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (converted to eps, so "
        "the loss, its Min-SNR weight and the samplers are unchanged; --snr-gamma 0 is then the eps error, "
        "not the plain v error), or eps itself (Ho et al. 2020)", choices=("v", "eps"),
    )  # fmt: skip
    noise_levels: str = option(
        "lognormal", "how training draws t: lognormal (ln sigma_t ~ N(--p-mean, --p-std^2), sigma_t^2 = "
        "(1 - alpha_bar_t) / alpha_bar_t, Karras et al. 2022; the loss weights unchanged) or uniform "
        "(Ho et al. 2020)", choices=("lognormal", "uniform"),
    )  # fmt: skip
    # Centred above Karras et al.'s -1.2 (theirs samples images down to sigma 0.002): here half the
    # steps fall at sigma in (1, 5.4], where the digit's identity is decided (and most of the
    # guided steps lie), and 1 % below sigma 0.1, where `ddpm.sample`'s default sampler never goes.
    p_mean: float = option(0.4, "mean of ln sigma_t with --noise-levels lognormal", finite_float)
    p_std: float = option(1.2, "std of ln sigma_t with --noise-levels lognormal", positive_float)
    schedule: str = option("cosine", "noise schedule beta_t", choices=tuple(SCHEDULES))
    timesteps: int = option(1000, "T, diffusion steps", at_least_two)
    seed: int = option(0, "seeds the initial weights, the data order and the noise")
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps", resume="flag")
    compile: bool = option(False, "torch.compile the UNet (helps on GPU)", resume="flag")
    data_dir: str | None = option(None, DATA_DIR_HELP, str, resume="flag")
    log_every: int = option(50, "steps per loss.csv row", positive_int, resume="flag")
    sample_every: int = option(
        0, "steps between sample grids (0: at each epoch end)", nonneg_int, resume="flag"
    )
    snapshots: tuple[int, ...] = option(
        (), "also save the weights once this many training images have been seen, comma-separated "
        "(e.g. 60000,120000,190000), to OUT/snapshots/ for ddpm.curve", image_counts, resume="extend",
    )  # fmt: skip
    unet: UNetConfig = nested(UNetConfig)

    @classmethod
    def from_dict(cls, d: dict) -> DDPMConfig:
        """The config a checkpoint or config.json recorded; runs from before a field existed
        trained as it then did (cosine schedule, eps prediction, uniform t)."""
        missing = {"schedule": "cosine", "prediction": "eps", "noise_levels": "uniform"}
        return from_dict(cls, d, missing=missing)


class VPrediction(torch.nn.Module):
    """eps_theta(x_t, t, y) from a UNet that predicts the velocity v (Salimans & Ho 2022, sec. 4),
    converted by `GaussianDiffusion.eps_from_v`. Every caller still sees an eps model.

    The eps loss of the converted output is the v loss, reweighted: eps - eps_hat =
    sqrt(alpha_bar) (v - v_hat), and alpha_bar = SNR / (SNR + 1), so Min-SNR's eps weight
    min(SNR, gamma) / SNR times alpha_bar is the v weight min(SNR, gamma) / (SNR + 1) of Hang et
    al. 2023. Only what the network outputs changes. Its weights are the UNet's, under `unet.`.
    """

    def __init__(self, unet: UNet, diffusion: GaussianDiffusion) -> None:
        super().__init__()
        self.unet, self.diffusion, self.null_label = unet, diffusion, unet.null_label

    def forward(self, xt: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self.diffusion.eps_from_v(xt, t, self.unet(xt, t, y))


def build_model(cfg: DDPMConfig) -> tuple[UNet | VPrediction, GaussianDiffusion]:
    """The eps model (a UNet, on the CPU, fresh weights from the global RNG) and the diffusion
    process of `cfg`."""
    diffusion = GaussianDiffusion(make_betas(cfg.schedule, cfg.timesteps))
    unet = UNet(cfg.unet)
    return (VPrediction(unet, diffusion) if cfg.prediction == "v" else unet), diffusion


def load_model(
    run: str | Path, device: torch.device, use_ema: bool = True
) -> tuple[UNet | VPrediction, GaussianDiffusion, dict]:
    """The eps model (EMA weights by default, eval mode, on `device`), its diffusion and the checkpoint
    of a run directory or checkpoint file of `ddpm.train`."""
    ckpt = load_checkpoint(run, "ddpm", map_location=device)
    model, diffusion = build_model(DDPMConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["ema" if use_ema else "model"])
    return model.to(device).eval(), diffusion, ckpt
