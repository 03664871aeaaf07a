"""Train the class-conditional DDPM: `python -m ddpm.train --help`.

One optimizer step: draw t ~ U{0..T-1} and eps ~ N(0, I), form x_t = q_sample(x0, t, eps),
regress eps_model(x_t, t, y) onto eps (Ho et al. 2020, Algorithm 1), with the label replaced
by the null class with probability p_uncond (Ho & Salimans 2022, Algorithm 1); each t's squared
error is weighted by min(SNR_t, gamma) / SNR_t (Min-SNR, Hang et al. 2023; --snr-gamma 0 gives
the unweighted L_simple of Ho et al. eq. 14). Weights are
averaged (EMA) for sampling. The learning rate warms up, then decays on a cosine to 0 by
whichever runs out first: the --epochs or the --minutes budget (30 by default), so a slow
machine ends on time with a fully annealed model. Checkpoints are written at each epoch end,
when the budget or --max-steps runs out, and on Ctrl-C / SIGTERM; --resume continues (exactly,
when the budget does not bind, e.g. with --minutes 0).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from common import distributed
from common.checkpoint import (
    append_csv,
    load_checkpoint,
    prepare_run_dir,
    read_csv,
    save_checkpoint,
    truncate_csv,
    write_json,
)
from common.cli import (
    ArgumentParser,
    UserError,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    unit_float,
    user_errors,
)
from common.data import batch_indices, load_mnist, signed_to_uint8, to_signed
from common.ema import make_ema
from common.runtime import count_params, rng_state, seed_everything, set_rng_state, versions
from common.viz import plot_curves, save_digit_grid
from ddpm.diffusion import GaussianDiffusion
from ddpm.schedule import cosine_betas
from ddpm.unet import UNet, UNetConfig


@dataclass
class TrainConfig:
    out: str = "results/ddpm"
    # 6 epochs (360k images) take ~24 minutes at 250 img/s; a slower CPU stops at the budget,
    # annealed (README, "How long the default run takes").
    epochs: int = 6
    minutes: float = 30.0  # wall-clock budget; 0 = none
    max_steps: int | None = None
    batch_size: int = 64
    lr: float = 4e-3
    warmup_steps: int = 200
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    p_uncond: float = 0.1
    snr_gamma: float = 5.0  # Min-SNR loss weighting (Hang et al. 2023); 0 = plain L_simple
    timesteps: int = 1000
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    data_dir: str | None = None
    log_every: int = 50
    sample_every: int = 0  # steps between sample grids; 0 = at each epoch end only
    unet: UNetConfig = field(default_factory=UNetConfig)


def int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip() != "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> ArgumentParser:
    d, u = TrainConfig(), UNetConfig()
    p = ArgumentParser(prog="python -m ddpm.train", description=__doc__)
    p.add_argument("--out", default=d.out, help="run directory (config, checkpoint, curves, samples)")
    p.add_argument(
        "--epochs", type=positive_int, default=d.epochs, help="passes over the 60k training images"
    )
    p.add_argument(
        "--minutes",
        type=nonneg_float,
        default=d.minutes,
        help="wall-clock budget: the LR anneals by epochs or by time, whichever runs out first (0: none)",
    )
    p.add_argument("--max-steps", type=positive_int, default=None, help="stop after N optimizer steps")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size)
    p.add_argument("--lr", type=positive_float, default=d.lr, help="peak AdamW learning rate")
    p.add_argument(
        "--warmup-steps",
        type=nonneg_int,
        default=d.warmup_steps,
        help="linear warm-up, then cosine decay to 0 over --epochs (or --minutes, if shorter)",
    )
    p.add_argument("--grad-clip", type=nonneg_float, default=d.grad_clip, help="max grad norm (0 = off)")
    p.add_argument("--ema-decay", type=unit_float, default=d.ema_decay)
    p.add_argument(
        "--p-uncond",
        type=unit_float,
        default=d.p_uncond,
        help="probability of dropping the label (classifier-free guidance)",
    )
    p.add_argument(
        "--snr-gamma",
        type=nonneg_float,
        default=d.snr_gamma,
        help="weight each step's loss by min(SNR, gamma) / SNR (Min-SNR); 0: unweighted L_simple",
    )
    p.add_argument("--timesteps", type=positive_int, default=d.timesteps, help="T, diffusion steps")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (helps on GPU)")
    p.add_argument("--data-dir", default=None, help="MNIST root (else $MNIST_DIR, else ./data)")
    p.add_argument("--log-every", type=positive_int, default=d.log_every, help="steps per loss.csv row")
    p.add_argument(
        "--sample-every",
        type=nonneg_int,
        default=d.sample_every,
        help="steps between sample grids (0: at each epoch end)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    g = p.add_argument_group("UNet")
    g.add_argument("--base-channels", type=positive_int, default=u.base_channels)
    g.add_argument("--channel-mult", type=int_tuple, default=u.channel_mult, help="per level, e.g. 1,4,8")
    g.add_argument("--blocks-per-level", type=int_tuple, default=u.blocks_per_level, help="e.g. 0,1,1")
    g.add_argument("--mid-blocks", type=nonneg_int, default=u.mid_blocks)
    g.add_argument("--attention-levels", type=int_tuple, default=u.attention_levels, help="e.g. 2")
    g.add_argument("--dropout", type=unit_float, default=u.dropout)
    g.add_argument(
        "--adaptive-norm",
        action=argparse.BooleanOptionalAction,
        default=u.adaptive_norm,
        help="AdaGN: (t, y) scale and shift each block's second norm instead of adding to it",
    )
    return p


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    unet = UNetConfig(
        base_channels=a.base_channels,
        channel_mult=a.channel_mult,
        blocks_per_level=a.blocks_per_level,
        mid_blocks=a.mid_blocks,
        attention_levels=a.attention_levels,
        dropout=a.dropout,
        adaptive_norm=a.adaptive_norm,
    )
    if len(unet.channel_mult) != len(unet.blocks_per_level):
        raise UserError("--channel-mult and --blocks-per-level need one value per level")
    keys = TrainConfig.__dataclass_fields__.keys() - {"unet"}
    return TrainConfig(**{k: getattr(a, k) for k in keys}, unet=unet)


def lr_factor(step: int, warmup: int, total: int, time_frac: float = 0.0) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine decay 0.5 (1 + cos(pi p)) to 0.

    p = (step - warmup) / (n - warmup), where n, the schedule's length, is the smaller of
    `total` and the steps a wall-clock budget will allow at the pace so far (step / time_frac,
    time_frac being the share of the budget used). A run that fits its budget follows the plain
    step schedule exactly; a run cut by its budget decays as if it had been planned that long,
    and ends at lr 0 instead of being stopped at a high rate.
    """
    if step < warmup:
        return (step + 1) / warmup
    if time_frac > 0:
        total = min(total, step / time_frac)
    progress = min(1.0, (step - warmup) / max(1.0, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def sample_grid(
    diffusion: GaussianDiffusion, model: torch.nn.Module, path: Path, device: torch.device
) -> None:
    """10 x 10 grid, one row per digit, DDIM 50 steps, from a fixed seed (comparable over training)."""
    y = torch.arange(10, device=device).repeat_interleave(10)
    g = torch.Generator(device=device).manual_seed(1234)
    x = diffusion.sample(model, y, sampler="ddim", steps=50, guidance=1.0, generator=g, progress=False)
    save_digit_grid(signed_to_uint8(x).cpu(), y.cpu(), path, per_digit=10)


class StopSignal:
    """Turns Ctrl-C and SIGTERM into a flag the loop checks, so we always end on a checkpoint."""

    def __init__(self) -> None:
        self.received: str | None = None

    def __enter__(self) -> StopSignal:
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum: int, frame: object) -> None:
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc: object) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)


def resume_step(ckpt: dict, steps_per_epoch: int, global_batch: int) -> int:
    """The step to continue from: same epoch, same place in its shuffled order.

    With an unchanged world size this is the saved step. With another, the images already
    seen in the current epoch are skipped, rounded down to a whole new global batch.
    """
    return ckpt["epoch"] * steps_per_epoch + ckpt["images_in_epoch"] // global_batch


@user_errors
def main(argv: list[str] | None = None) -> UNet:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    d = distributed.setup(cfg.device)
    try:
        return train(cfg, d, resume=args.resume, overwrite=args.overwrite)
    finally:
        distributed.cleanup(d)


def train(cfg: TrainConfig, d: distributed.Dist, resume: bool = False, overwrite: bool = False) -> UNet:
    """The training loop; `d` says which rank of how many this process is (1 without torchrun).

    Returns the trained (raw, not EMA) model of this rank.
    """
    device, log = d.device, d.is_main
    images, labels = load_mnist(train=True, data_dir=cfg.data_dir)  # before touching --out
    out = Path(cfg.out)
    if log:
        prepare_run_dir(out, resume=resume, overwrite=overwrite)
    distributed.barrier(d)
    global_batch = cfg.batch_size * d.world_size  # each rank takes its own slice of every batch
    steps_per_epoch = len(images) // global_batch
    if steps_per_epoch == 0:
        raise UserError(f"global batch {global_batch} is larger than the {len(images)} training images")
    total_steps = cfg.epochs * steps_per_epoch

    seed_everything(cfg.seed)  # the same initial weights on every rank
    diffusion = GaussianDiffusion(cosine_betas(cfg.timesteps))
    model = UNet(cfg.unet).to(device)
    ema = make_ema(model, cfg.ema_decay, warmup=True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    step, seconds = 0, 0.0
    if resume:
        ckpt = load_checkpoint(out, "ddpm", map_location=device)
        if UNetConfig.from_dict(ckpt["config"]["unet"]) != cfg.unet:
            raise UserError(
                f"{out} was trained with another UNet ({ckpt['config']['unet']}); "
                "give --resume the same UNet flags"
            )
        model.load_state_dict(ckpt["model"])
        ema.module.load_state_dict(ckpt["ema"])
        ema.n_averaged.fill_(ckpt["step"])  # one EMA update per step so far (sets the warm-up decay)
        opt.load_state_dict(ckpt["optimizer"])
        step, seconds = resume_step(ckpt, steps_per_epoch, global_batch), ckpt["seconds"]
        if d.world_size == 1 == ckpt["world_size"]:
            set_rng_state(ckpt["rng"])  # one process: continue exactly as if never stopped
        if log:
            truncate_csv(out / "loss.csv", "step", ckpt["step"])
            print(f"resumed {out} at step {step} (epoch {step // steps_per_epoch + 1})")
    if d.enabled:  # each rank draws its own noise, timesteps and label drops
        torch.manual_seed(cfg.seed + 7919 * d.rank + step)
    if log:
        write_json(
            out / "config.json",
            {
                **asdict(cfg),
                "device": str(device),
                "world_size": d.world_size,
                "global_batch": global_batch,
                "params": count_params(model),
                "steps_per_epoch": steps_per_epoch,
                "versions": versions(),
            },
        )

    def checkpoint() -> None:
        if log:
            save_checkpoint(
                out / "checkpoint.pt",
                {
                    "kind": "ddpm",
                    "model": model.state_dict(),
                    "ema": ema.module.state_dict(),
                    "optimizer": opt.state_dict(),
                    "step": step,
                    "epoch": step // steps_per_epoch,
                    "images_in_epoch": step % steps_per_epoch * global_batch,
                    "world_size": d.world_size,
                    "seconds": seconds,
                    "rng": rng_state(),
                    "config": asdict(cfg),
                },
            )

    net = DistributedDataParallel(model) if d.enabled else model  # averages gradients across ranks
    net = torch.compile(net) if cfg.compile else net
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )
    loss_name = f"eps MSE, Min-SNR {cfg.snr_gamma:g} weighted" if cfg.snr_gamma else "eps MSE"
    stop_at = min(total_steps, cfg.max_steps or total_steps)
    budget = cfg.minutes * 60 if cfg.minutes else math.inf
    time_frac = seconds / budget  # share of the budget used; rank 0's clock, agreed every step
    if time_frac >= 1 and step < stop_at:
        raise UserError(
            f"{out} already used its {cfg.minutes:g}-minute budget ({seconds / 60:.1f} min); "
            "pass a larger --minutes (or 0) to train on"
        )
    if log:
        print(
            f"UNet {count_params(model) / 1e6:.2f}M params on {device} x {d.world_size}; global batch "
            f"{global_batch}, {steps_per_epoch} steps/epoch, training to step {stop_at} of {total_steps}"
            + (f" or {cfg.minutes:g} min, whichever comes first" if cfg.minutes else "")
        )

    reason = None  # why training stopped early, if it did
    run_start, window_loss, window_n, window_t = time.perf_counter(), 0.0, 0, time.perf_counter()
    started_seconds = seconds

    def clock() -> float:
        """Training seconds so far, this run's part included (rank 0's reading is the one used)."""
        return started_seconds + time.perf_counter() - run_start

    with StopSignal() as stop:
        while step < stop_at and reason is None:
            # The last epoch's checkpoint and grid took time: read the clock again before the lr.
            seconds = clock()
            time_frac = distributed.max_across(d, [seconds / budget if log else 0.0])[0]
            epoch = step // steps_per_epoch
            skip = step - epoch * steps_per_epoch  # resuming mid-epoch: same order, skip what was seen
            batches = list(batch_indices(len(images), global_batch, cfg.seed, epoch))[skip:]
            bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not log)
            for idx in bar:
                idx = idx[d.rank * cfg.batch_size : (d.rank + 1) * cfg.batch_size]
                model.train()
                x0 = to_signed(images[idx]).to(device)
                y = labels[idx].to(device)
                drop = torch.rand(y.shape, device=device) < cfg.p_uncond
                y = torch.where(drop, torch.full_like(y, model.null_label), y)
                with autocast:
                    loss = diffusion.loss(net, x0, y, snr_gamma=cfg.snr_gamma)
                loss_all = distributed.mean_across(d, loss).item()  # the same on every rank
                if not math.isfinite(loss_all):
                    raise UserError(
                        f"loss became {loss_all} at step {step}; stopped, the last good "
                        f"checkpoint in {out} is kept (try a lower --lr)"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                lr = cfg.lr * lr_factor(step, cfg.warmup_steps, total_steps, time_frac)
                for group in opt.param_groups:
                    group["lr"] = lr
                opt.step()
                ema.update_parameters(model)
                step += 1
                window_loss, window_n = window_loss + loss_all, window_n + 1
                seconds = clock()
                if step % cfg.log_every == 0 and log:
                    now = time.perf_counter()
                    rate = window_n * global_batch / (now - window_t)
                    row = {
                        "step": step,
                        "loss": window_loss / window_n,
                        "lr": lr,
                        "img_per_s": round(rate, 1),
                    }
                    append_csv(out / "loss.csv", row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{rate:.0f}")
                    window_loss, window_n, window_t = 0.0, 0, now
                if cfg.sample_every and step % cfg.sample_every == 0 and log:
                    sample_grid(diffusion, ema.module, out / "samples" / f"step_{step:06d}.png", device)
                # Rank 0 owns the clock (every rank must use the same lr); any rank may have been
                # signalled. All stop together.
                signalled, time_frac = distributed.max_across(
                    d, [float(bool(stop.received)), seconds / budget if log else 0.0]
                )
                if signalled:
                    reason = f"stopped by {stop.received or 'a signal to another rank'}"
                elif time_frac >= 1:
                    reason = f"--minutes {cfg.minutes:g} budget reached"
                elif step >= stop_at < total_steps:
                    reason = f"--max-steps {cfg.max_steps} reached"
                if reason or step >= stop_at:
                    break
            bar.close()
            checkpoint()
            if log and (step % steps_per_epoch == 0 or time_frac >= 1):  # the final model's grid too
                name = (
                    f"epoch_{step // steps_per_epoch:03d}"
                    if step % steps_per_epoch == 0
                    else f"step_{step:06d}"
                )
                sample_grid(diffusion, ema.module, out / "samples" / f"{name}.png", device)
            if log:
                print(
                    f"epoch {epoch + 1}: step {step}, {seconds / 60:.1f} min, "
                    f"last loss {loss_all:.4f} ({loss_name})",
                    flush=True,
                )

    if log:
        rows = read_csv(out / "loss.csv") if (out / "loss.csv").exists() else []
        if rows:
            plot_curves(
                [r["step"] for r in rows],
                {loss_name: [r["loss"] for r in rows]},
                out / "loss.png",
                "step",
                f"loss ({loss_name})",
                title="DDPM training loss",
                logy=True,
            )
        print(
            f"{reason or 'done'}: step {step}, {seconds / 60:.1f} min; checkpoint in {out / 'checkpoint.pt'}"
        )

    return model


if __name__ == "__main__":
    main()
