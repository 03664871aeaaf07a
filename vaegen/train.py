"""Train the VAE (or the class-conditional VAE) on MNIST by maximising the ELBO.

    uv run python -m vaegen.train --out results/vae
    uv run python -m vaegen.train --out results/cvae --conditional

Each optimizer step is `train_step`: Kingma & Welling 2013, Algorithm 1, with the SGVB
estimator of eq. 10 (one sample per image); the loss is the negative ELBO in nats per image.
The learning rate warms up, then decays on a cosine to 0 (`--schedule constant` is the original
project's recipe). After every epoch the run directory gets a row in loss.csv (train and test
negative ELBO), samples/epoch_NNN.png and an atomic checkpoint.pt; at the end loss.png and
config.json. --resume continues a run with its own settings (exactly, with one process before
and after).

Under `torchrun --nproc_per_node=N` it trains data-parallel (DistributedDataParallel; see
common.distributed): each rank takes its slice of every global batch of N x --batch-size
images, and only rank 0 evaluates, logs and writes files. How the default recipe was chosen is
in docs/experiments.md ("The VAE").
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from common import distributed
from common.checkpoint import (
    CHECKPOINT,
    append_csv,
    load_checkpoint,
    read_csv,
    save_checkpoint,
    truncate_csv,
    write_json,
)
from common.cli import ArgumentParser, positive_float, positive_int, unit_float, user_errors
from common.config import from_args, from_dict, given_fields, nested, option, resume_config
from common.data import DATA_DIR_HELP, binarize, load_mnist, to_unit
from common.distributions import nats_to_bits_per_dim
from common.runtime import count_params, seed_everything, versions
from common.training import Loop, lr_factor, open_run_dir, set_lr, trainer_parser
from common.viz import plot_curves, save_digit_grid, save_grid
from vaegen.elbo import elbo_terms, evaluate_bounds
from vaegen.model import VAE, VAEConfig

SAMPLE_SEED = 1234  # fixed latents for the per-epoch sample grids (watch one set of z evolve)
TEST_BINARIZATION_SEED = 0  # --binarize: the test set is drawn once, the same for every run


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a VAE run; each field is a flag of `python -m vaegen.train`."""

    out: str = option("results/vae", "run directory", resume="flag")
    # A large batch keeps the matrix multiplies busy on 2 CPU cores, and the higher peak rate of
    # the cosine schedule makes up for the fewer steps.
    epochs: int = option(35, "passes over the 60k training images", positive_int, resume="extend")
    max_steps: int | None = option(
        None, "stop after N optimizer steps (smoke test)", positive_int, resume="flag"
    )
    batch_size: int = option(768, "images per optimizer step", positive_int)
    lr: float = option(1.2e-2, "Adam learning rate (cosine: peak)", positive_float)
    schedule: str = option(
        "cosine", "learning rate over training: linear warm-up then cosine decay to 0, or constant "
        "(the original project's recipe)", choices=("cosine", "constant"),
    )  # fmt: skip
    warmup: float = option(0.02, "warm-up length as a fraction of all steps (cosine)", unit_float)
    init: str = option(
        "data-bias", "data-bias: decoder output bias = logit(mean training pixel); torch: PyTorch's "
        "default only", choices=("data-bias", "torch"),
    )  # fmt: skip
    binarize: bool = option(
        False, "dynamically binarized MNIST, the VAE papers' benchmark: a fresh Bernoulli draw of each "
        "training image per batch, the test set drawn once (fixed seed); Bernoulli decoder only",
    )
    seed: int = option(0, "seeds init, data order and noise")
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps", resume="flag")
    data_dir: str | None = option(None, DATA_DIR_HELP, str, resume="flag")
    model: VAEConfig = nested(VAEConfig)

    def __post_init__(self) -> None:
        if self.binarize and self.model.decoder != "bernoulli":
            raise ValueError("--binarize needs --decoder bernoulli: binary pixels have no 256 levels")

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """The config a checkpoint recorded; older runs kept the training settings under 'train'."""
        return from_dict(cls, {**d.get("train", {}), **d})


def train_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor | None, lr: float) -> torch.Tensor:  # fmt: skip
    """One step of Kingma & Welling 2013, Algorithm 1, on x [B, 784] in [0, 1] (labels y [B] for the
    conditional VAE): draw eps, take the gradient of the SGVB estimate -L~ (eq. 10), update.
    Returns the loss (negative ELBO, nats per image), detached."""
    loss = elbo_terms(net, x, y).neg_elbo.mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    set_lr(optimizer, lr)
    optimizer.step()
    return loss.detach()


def build_parser() -> ArgumentParser:
    return trainer_parser("python -m vaegen.train", __doc__, TrainConfig)


@user_errors
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train; returns the last epoch's metrics (nats per image; empty on ranks other than 0)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg, flags = from_args(TrainConfig, args), given_fields(parser, TrainConfig, argv)
    d = distributed.setup(cfg.device)
    try:
        command = "python -m vaegen.train " + " ".join(sys.argv[1:] if argv is None else argv)
        return train(cfg, d, args.resume, args.overwrite, command, flags)
    finally:
        distributed.cleanup(d)


def train(
    cfg: TrainConfig,
    d: distributed.Dist,
    resume: bool,
    overwrite: bool,
    command: str,
    flags: frozenset = frozenset(),
) -> dict[str, Any]:
    """The training loop; `d` says which rank of how many this process is (1 without torchrun).
    `flags`: the fields the command line set, which a resumed run takes or refuses (`resume_config`)."""
    out = open_run_dir(cfg.out, d, resume, overwrite)
    ckpt = load_checkpoint(out, "vae", map_location=d.device) if resume else None
    cfg = resume_config(TrainConfig.from_dict(ckpt["config"]), cfg, flags) if ckpt else cfg
    # The whole data set lives in memory as float [N, 784]; batches are index slices.
    x_train, y_train = load_mnist(train=True, data_dir=cfg.data_dir, image_size=cfg.model.image_size)
    x_test, y_test = load_mnist(train=False, data_dir=cfg.data_dir, image_size=cfg.model.image_size)
    x_train, x_test = (to_unit(x).reshape(len(x), -1).to(d.device) for x in (x_train, x_test))
    x_test = test_images(x_test, cfg)
    y_train, y_test = (y.to(d.device) if cfg.model.conditional else None for y in (y_train, y_test))
    loop = Loop(len(x_train), cfg.batch_size, cfg.epochs, d, cfg.seed, max_steps=cfg.max_steps)
    seed_everything(cfg.seed)  # the same initial weights on every rank
    model = VAE(cfg.model).to(d.device)
    if cfg.init == "data-bias":
        model.init_output_bias(x_train.mean(0), x_train.std(0))
    # fused: one kernel for the whole update, not one per tensor (docs/experiments.md, "The VAE")
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=d.device.type in ("cpu", "cuda"))
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        loop.resume(ckpt)
        if d.is_main:
            truncate_csv(out / "loss.csv", "epoch", loop.epoch)  # drop rows logged after that checkpoint
    loop.seed_ranks()
    info = run_info(model, loop, command)
    if d.is_main:
        write_json(out / "config.json", {**asdict(cfg), "run": info})
        shape = f"{cfg.model.data_dim}-{cfg.model.hidden}-{cfg.model.latent_dim}"
        kind = " conditional" if cfg.model.conditional else ""
        print(f"VAE {shape}{kind}: {info['params']:,} parameters, {loop.steps_per_epoch} steps/epoch, "
              f"device {d.device} x {d.world_size}, out {out}")  # fmt: skip
    net = DistributedDataParallel(model) if d.enabled else model  # averages gradients across ranks
    warmup_steps = min(round(cfg.warmup * loop.total_steps), loop.total_steps - 1)  # leave room to decay
    cosine = cfg.schedule == "cosine"
    metrics: dict[str, Any] = {}
    with loop:
        while loop.running:
            started, loss_sum, n = time.perf_counter(), torch.zeros((), device=d.device), 0
            for idx in loop.batches():
                lr = cfg.lr * lr_factor(loop.step, warmup_steps, loop.total_steps) if cosine else cfg.lr
                y = None if y_train is None else y_train[idx]
                x = binarize(x_train[idx]) if cfg.binarize else x_train[idx]
                loss_sum += train_step(net, optimizer, x, y, lr)
                n += 1
            train_loss = distributed.mean_across(d, loss_sum / max(n, 1)).item()
            if d.is_main:
                test = evaluate_bounds(model, x_test, y_test)
                seconds = time.perf_counter() - started
                metrics = end_epoch(out, model, optimizer, loop, cfg, train_loss, test, seconds)
    if d.is_main:
        write_loss_plot(out)
        final = {"epoch": loop.epoch, "step": loop.step, **metrics}
        write_json(out / "config.json", {**asdict(cfg), "run": {**info, "final": final}})
    return metrics


def end_epoch(
    out: Path,
    model: VAE,
    optimizer: torch.optim.Optimizer,
    loop: Loop,
    cfg: TrainConfig,
    train_loss: float,
    test: dict[str, float],
    seconds: float,
) -> dict[str, Any]:
    """After an epoch, or the part of one that a stop cut short: a loss.csv row with the train and
    test negative ELBO, the sample grid, a line on stdout and the checkpoint. Returns the row."""
    shown = loop.epoch if loop.epoch_done else loop.epoch + 1
    row = {
        "epoch": shown,
        "train_neg_elbo_nats": round(train_loss, 4),
        "test_neg_elbo_nats": round(test["neg_elbo"], 4),
        "test_kl_nats": round(test["kl"], 4),
        "seconds": round(seconds, 3),
    }
    append_csv(out / "loss.csv", row)
    save_epoch_samples(model, out / "samples" / f"epoch_{shown:03d}.png")
    bpd = nats_to_bits_per_dim(test["neg_elbo"], cfg.model.data_dim)
    print(
        f"epoch {shown}/{cfg.epochs}{'' if loop.epoch_done else ' (cut short)'}: train -ELBO "
        f"{train_loss:.2f} nats | test -ELBO {test['neg_elbo']:.2f} nats ({bpd:.4f} bits/dim), KL "
        f"{test['kl']:.2f} nats | {seconds:.2f} s",
        flush=True,
    )
    # `epoch` counts completed epochs only: a run cut short resumes mid-epoch (skipping the
    # batches it already took), so resuming reproduces an uninterrupted run.
    state = {"kind": "vae", "model": model.state_dict(), "optimizer": optimizer.state_dict()}
    save_checkpoint(out / CHECKPOINT, {**state, **loop.state(), "config": asdict(cfg)})
    return row


def test_images(x_test: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """The test set as the run is scored on: x_test [N, 784] in [0, 1], drawn once into {0, 1}
    with TEST_BINARIZATION_SEED for a --binarize run (so that every run and evaluation sees the
    same binary images)."""
    if not cfg.binarize:
        return x_test
    g = torch.Generator().manual_seed(TEST_BINARIZATION_SEED)
    return binarize(x_test.cpu(), g).to(x_test.device)


def run_info(model: VAE, loop: Loop, command: str) -> dict[str, Any]:
    """What config.json records beside the config: how and where the run trains."""
    return {
        "command": command,
        "device": str(loop.d.device),
        "world_size": loop.d.world_size,
        "global_batch": loop.global_batch,
        "params": count_params(model),
        "steps_per_epoch": loop.steps_per_epoch,
        "versions": versions(),
    }


def save_epoch_samples(model: VAE, path: Path) -> None:
    """Decoder mean images (`VAE.mean_image`) for 100 fixed z ~ N(0, I); one row per digit if conditional."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(SAMPLE_SEED)
    z = torch.randn(100, model.config.latent_dim, generator=g).to(device)
    y = torch.arange(10, device=device).repeat_interleave(10) if model.conditional else None
    was_training = model.training
    model.eval()
    with torch.no_grad():
        images = model.mean_image(model.decode(z, y)).reshape(-1, 1, 28, 28).cpu()
    model.train(was_training)
    if y is not None:
        save_digit_grid(images, y.cpu(), path, per_digit=10)
    else:
        save_grid(images, path, nrow=10)


def write_loss_plot(out: Path) -> None:
    """loss.png from loss.csv: train and test negative ELBO per epoch."""
    rows = read_csv(out / "loss.csv")
    if not rows:
        return
    plot_curves(
        [r["epoch"] for r in rows],
        {
            "train (running mean)": [r["train_neg_elbo_nats"] for r in rows],
            "test": [r["test_neg_elbo_nats"] for r in rows],
        },
        out / "loss.png",
        xlabel="epoch",
        ylabel="negative ELBO (nats per image)",
        title="VAE on MNIST",
    )


if __name__ == "__main__":
    main()
