"""Train the class-conditional DDPM: `python -m ddpm.train --help`.

Each optimizer step is `train_step`: Algorithm 1 of Ho et al. 2020, with the label dropped to
the null class with probability p_uncond (Ho & Salimans 2022, Algorithm 1) and each t's squared
error weighted by min(SNR_t, gamma) / SNR_t (Min-SNR, Hang et al. 2023; --snr-gamma 0 gives the
plain L_simple of Ho et al. eq. 14), then an update of the weights' moving average (EMA), which
is what `ddpm.sample` draws with. The learning rate warms up, then decays on a cosine to 0 by
whichever runs out first: the --epochs or the --minutes budget (30 by default), so a slow
machine ends on time with an annealed model. Checkpoints are written at each epoch's end, when
the budget or --max-steps runs out, and on Ctrl-C / SIGTERM; --resume continues (exactly, when
the budget does not bind, e.g. with --minutes 0). Under `torchrun` it trains data-parallel.
--snapshots also keeps the weights at chosen image counts (for `ddpm.curve`). The UNet predicts
v, converted to eps (`ddpm.config.VPrediction`; --prediction eps: eps itself), and t is drawn so
that ln sigma_t is normal (`ddpm.schedule.lognormal_t_probs`; --noise-levels uniform: Ho et al.).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel

from common import distributed
from common.checkpoint import append_csv, load_checkpoint, read_csv, save_checkpoint, truncate_csv, write_json
from common.cli import ArgumentParser, user_errors
from common.config import from_args, given_fields, resume_config
from common.data import load_mnist, signed_to_uint8, to_signed
from common.ema import make_ema
from common.runtime import count_params, seed_everything, versions
from common.tensor import randn
from common.training import Loop, lr_factor, open_run_dir, set_lr, trainer_parser
from common.viz import plot_curves, save_digit_grid
from ddpm.config import DDPMConfig, build_model
from ddpm.diffusion import GaussianDiffusion
from ddpm.samplers import SamplerSpec, sample
from ddpm.schedule import lognormal_t_probs
from ddpm.unet import UNet

# The grids drawn during training: comparable over a run (fixed seed), not the best sampler.
GRID_SPEC = SamplerSpec("ddim", 50, "uniform", sigma_min=None, guidance=1.0, guidance_interval=None)


@dataclass
class TrainState:
    """What a training step updates. `net` is `model` as the step calls it (wrapped by DDP to
    average gradients across ranks, or compiled); `ema` averages `model`'s weights."""

    model: UNet
    net: torch.nn.Module
    ema: AveragedModel
    opt: torch.optim.Optimizer
    diffusion: GaussianDiffusion
    t_probs: torch.Tensor | None = None  # P(t) [T] for the training steps (`training_t_probs`); None: uniform


def training_t_probs(
    cfg: DDPMConfig, diffusion: GaussianDiffusion, device: torch.device
) -> torch.Tensor | None:
    """P(t) [T] on `device` that `train_step` draws t from (--noise-levels lognormal), or None: uniform t."""
    if cfg.noise_levels == "uniform":
        return None
    if cfg.noise_levels == "lognormal":
        return lognormal_t_probs(diffusion.sigma, cfg.p_mean, cfg.p_std).to(device)
    raise ValueError(f"unknown noise_levels {cfg.noise_levels!r} (use 'lognormal' or 'uniform')")


def train_step(
    s: TrainState,
    x0: torch.Tensor,
    y: torch.Tensor,
    lr: float,
    p_uncond: float,
    snr_gamma: float,
    grad_clip: float,
) -> torch.Tensor:
    """One optimizer step on images x0 [B, 1, 28, 28] in [-1, 1] with labels y long [B]; returns the
    loss, detached. Ho et al. 2020, Algorithm 1, with Ho & Salimans 2022's label drop."""
    drop = torch.rand(y.shape, device=y.device) < p_uncond  # the null label: learn p(x) as well as p(x|y)
    y = torch.where(drop, torch.full_like(y, s.model.null_label), y)
    if s.t_probs is None:
        t = torch.randint(0, s.diffusion.T, (len(x0),), device=x0.device)  # t ~ Uniform({1, ..., T})
    else:  # ln sigma_t ~ N(P_mean, P_std^2), --noise-levels lognormal
        t = torch.multinomial(s.t_probs, len(x0), replacement=True)
    eps = torch.randn_like(x0)  # eps ~ N(0, I)
    xt = s.diffusion.q_sample(x0, t, eps)  # sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps
    with torch.autocast(x0.device.type, torch.bfloat16, enabled=x0.device.type == "cuda"):
        loss = s.diffusion.eps_loss(s.net(xt, t, y), eps, t, snr_gamma).mean()  # || eps - eps_theta ||^2
    s.opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(s.model.parameters(), grad_clip)
    set_lr(s.opt, lr)
    s.opt.step()
    s.ema.update_parameters(s.model)
    return loss.detach()


@torch.no_grad()
def sample_grid(diffusion: GaussianDiffusion, model: torch.nn.Module, path: Path) -> None:
    """10 x 10 grid, one row per digit, from a fixed seed (comparable over training). The model
    runs in eval mode and its own generator draws the noise, so the training RNG is untouched."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    g = torch.Generator(device=device).manual_seed(1234)
    y = torch.arange(10, device=device).repeat_interleave(10)
    spec = replace(GRID_SPEC, steps=min(GRID_SPEC.steps, diffusion.T))  # a short T has fewer steps
    x = sample(diffusion, model, spec, randn((100, 1, 28, 28), g, device, torch.float32), y, g)
    model.train(was_training)
    save_digit_grid(signed_to_uint8(x).cpu(), y.cpu(), path, per_digit=10)


class LossLog:
    """loss.csv: a row every `every` steps with the window's mean loss, the lr and images/s."""

    def __init__(self, path: Path, every: int, global_batch: int) -> None:
        self.path, self.every, self.global_batch = path, every, global_batch
        self.total, self.n, self.since = 0.0, 0, time.perf_counter()

    def add(self, step: int, loss: float, lr: float, loop: Loop) -> None:
        self.total, self.n = self.total + loss, self.n + 1
        if step % self.every == 0:
            now = time.perf_counter()
            rate = self.n * self.global_batch / (now - self.since)
            row = {"step": step, "loss": self.total / self.n, "lr": lr, "img_per_s": round(rate, 1)}
            append_csv(self.path, row)
            loop.bar.set_postfix(loss=f"{self.total / self.n:.4f}", img_s=f"{rate:.0f}")
            self.total, self.n, self.since = 0.0, 0, now


def build_parser() -> ArgumentParser:
    return trainer_parser("python -m ddpm.train", __doc__, DDPMConfig)


@user_errors
def main(argv: list[str] | None = None) -> UNet:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg, flags = from_args(DDPMConfig, args), given_fields(parser, DDPMConfig, argv)
    d = distributed.setup(cfg.device)
    try:
        return train(cfg, d, resume=args.resume, overwrite=args.overwrite, flags=flags)
    finally:
        distributed.cleanup(d)


def train(
    cfg: DDPMConfig,
    d: distributed.Dist,
    resume: bool = False,
    overwrite: bool = False,
    flags: frozenset = frozenset(),
) -> UNet:
    """The training loop; `d` says which rank of how many this process is (1 without torchrun).
    `flags`: the fields the command line set, which a resumed run takes or refuses (`resume_config`).
    Returns this rank's trained (raw, not EMA) model."""
    images, labels = load_mnist(train=True, data_dir=cfg.data_dir)  # before touching --out
    out = open_run_dir(cfg.out, d, resume, overwrite)
    ckpt = load_checkpoint(out, "ddpm", map_location=d.device) if resume else None
    cfg = resume_config(DDPMConfig.from_dict(ckpt["config"]), cfg, flags) if ckpt else cfg
    loop = Loop(len(images), cfg.batch_size, cfg.epochs, d, cfg.seed, cfg.minutes, cfg.max_steps)
    seed_everything(cfg.seed)  # the same initial weights on every rank
    model, diffusion = build_model(cfg)
    model.to(d.device).train()
    ema = make_ema(model, cfg.ema_decay, warmup=True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    if ckpt:
        model.load_state_dict(ckpt["model"])
        ema.module.load_state_dict(ckpt["ema"])
        ema.n_averaged.fill_(ckpt["step"])  # one EMA update per step so far (sets the warm-up decay)
        opt.load_state_dict(ckpt["optimizer"])
        loop.resume(ckpt)
        if d.is_main:
            truncate_csv(out / "loss.csv", "step", ckpt["step"])
            print(f"resumed {out} at step {loop.step} (epoch {loop.epoch + 1})")
    loop.seed_ranks()
    net = DistributedDataParallel(model) if d.enabled else model  # averages gradients across ranks
    t_probs = training_t_probs(cfg, diffusion, d.device)
    state = TrainState(model, torch.compile(net) if cfg.compile else net, ema, opt, diffusion, t_probs)
    if d.is_main:
        write_json(out / "config.json", {**asdict(cfg), "run": announce(model, loop)})
    log = LossLog(out / "loss.csv", cfg.log_every, loop.global_batch)
    with loop:
        while loop.running:
            for idx in loop.batches():
                x0, y = to_signed(images[idx]).to(d.device), labels[idx].to(d.device)
                lr = cfg.lr * lr_factor(loop.step, cfg.warmup_steps, loop.total_steps, loop.time_frac)
                loss = train_step(state, x0, y, lr, cfg.p_uncond, cfg.snr_gamma, cfg.grad_clip)
                loss = loop.agree_loss(loss, f"the last good checkpoint in {out} is kept (try a lower --lr)")
                if d.is_main:
                    log.add(loop.step + 1, loss, lr, loop)
                if d.is_main and cfg.sample_every and (loop.step + 1) % cfg.sample_every == 0:
                    sample_grid(diffusion, ema.module, out / "samples" / f"step_{loop.step + 1:06d}.png")
                if d.is_main:
                    save_snapshots(out, state, loop, cfg)
            if d.is_main:
                end_epoch(out, state, loop, cfg, loss)
    if d.is_main:
        plot_loss(out, loss_label(cfg))
        print(f"{loop.reason or 'done'}: step {loop.step}, {loop.seconds / 60:.1f} min; "
              f"checkpoint in {out / 'checkpoint.pt'}")  # fmt: skip
    return model


def end_epoch(out: Path, s: TrainState, loop: Loop, cfg: DDPMConfig, loss: float) -> None:
    """At an epoch's end, or where training stops: the checkpoint, a sample grid (not after a stop
    by signal or --max-steps), and a line on stdout."""
    state = {**weights(s, cfg), "optimizer": s.opt.state_dict(), **loop.state()}
    save_checkpoint(out / "checkpoint.pt", state)
    if loop.epoch_done or loop.time_frac >= 1:  # the budget-cut final model's grid too
        name = f"epoch_{loop.epoch:03d}" if loop.epoch_done else f"step_{loop.step:06d}"
        sample_grid(s.diffusion, s.ema.module, out / "samples" / f"{name}.png")
    epoch = loop.epoch if loop.epoch_done else loop.epoch + 1
    print(f"epoch {epoch}: step {loop.step}, {loop.seconds / 60:.1f} min, last loss {loss:.4f} "
          f"({loss_label(cfg)})", flush=True)  # fmt: skip


def save_snapshots(out: Path, s: TrainState, loop: Loop, cfg: DDPMConfig) -> None:
    """After the step that takes the images seen past a count in --snapshots: the weights (EMA and
    raw) as OUT/snapshots/images_NNNNNNN.pt, a checkpoint file that ddpm.sample and ddpm.curve read."""
    before, after = loop.step * loop.global_batch, (loop.step + 1) * loop.global_batch
    for count in (c for c in cfg.snapshots if before < c <= after):
        (out / "snapshots").mkdir(exist_ok=True)
        save_checkpoint(out / "snapshots" / f"images_{count:07d}.pt", {
            **weights(s, cfg), "step": loop.step + 1, "images": after, "seconds": loop.seconds,
            "world_size": loop.d.world_size,
        })  # fmt: skip


def weights(s: TrainState, cfg: DDPMConfig) -> dict:
    """What every checkpoint file holds: its kind, the raw and EMA weights, and the config."""
    ema = s.ema.module.state_dict()
    return {"kind": "ddpm", "model": s.model.state_dict(), "ema": ema, "config": asdict(cfg)}


def loss_label(cfg: DDPMConfig) -> str:
    return f"eps MSE, Min-SNR {cfg.snr_gamma:g} weighted" if cfg.snr_gamma else "eps MSE"


def announce(model: UNet, loop: Loop) -> dict:
    """Print what is about to train; return what config.json records beside the config."""
    budget = f" or {loop.minutes:g} min, whichever comes first" if loop.minutes else ""
    print(f"UNet {count_params(model) / 1e6:.2f}M params on {loop.d.device} x {loop.d.world_size}; global "
          f"batch {loop.global_batch}, {loop.steps_per_epoch} steps/epoch, training to step {loop.stop_at} "
          f"of {loop.total_steps}{budget}")  # fmt: skip
    return {"device": str(loop.d.device), "world_size": loop.d.world_size, "global_batch": loop.global_batch,
            "params": count_params(model), "steps_per_epoch": loop.steps_per_epoch,
            "versions": versions()}  # fmt: skip


def plot_loss(out: Path, loss_name: str) -> None:
    """loss.png from loss.csv."""
    rows = read_csv(out / "loss.csv") if (out / "loss.csv").exists() else []
    if rows:
        plot_curves([r["step"] for r in rows], {loss_name: [r["loss"] for r in rows]}, out / "loss.png",
                    "step", f"loss ({loss_name})", title="DDPM training loss", logy=True)  # fmt: skip


if __name__ == "__main__":
    main()
