"""The run plumbing both trainers share, written once: what happens around the optimizer steps.

- `Loop` walks epochs of shuffled batches and hands each process its slice of every global
  batch. It stops at the last epoch, at --max-steps, when the --minutes budget is spent (rank 0's
  clock decides for every rank) or on Ctrl-C / SIGTERM to any rank, always all ranks together and
  at a step's end, so the trainer ends on a checkpoint. It resumes a checkpoint at the same place
  in the same shuffled order, also with another number of processes, and seeds each rank's noise.
- `lr_factor`: linear warm-up, then cosine decay to 0 over the steps the epochs or the budget allow.
- `open_run_dir`: the run directory, checked and prepared by rank 0 only; `trainer_parser`: a
  trainer's command line.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from common import distributed
from common.checkpoint import prepare_run_dir
from common.cli import ArgumentParser, UserError
from common.config import add_flags
from common.data import batch_indices
from common.runtime import rng_state, set_rng_state


def lr_factor(step: int, warmup: int, total: float, time_frac: float = 0.0) -> float:
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


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def trainer_parser(prog: str, description: str, config: type) -> ArgumentParser:
    """A trainer's command line: one flag per field of its config dataclass, --resume, --overwrite."""
    p = ArgumentParser(prog=prog, description=description)
    add_flags(p, config)
    p.add_argument("--resume", action="store_true", help="continue the run in --out, with its settings")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    return p


def open_run_dir(out: str | Path, d: distributed.Dist, resume: bool, overwrite: bool) -> Path:
    """Rank 0 checks and prepares the run directory (`prepare_run_dir`); the others wait for it."""
    if d.is_main:
        prepare_run_dir(out, resume=resume, overwrite=overwrite)
    distributed.barrier(d)
    return Path(out)


class Loop:
    """Epochs of shuffled batches for one rank, with the stop rules every trainer shares.

        with loop:                        # Ctrl-C / SIGTERM now end the loop at a step's end
            while loop.running:
                for idx in loop.batches():  # this epoch's: this rank's slice of each global batch
                    ...one optimizer step...
                ...checkpoint (loop.state()), per-epoch work...

    `step` counts optimizer steps, `seconds` training time (a resumed run's earlier time too),
    `time_frac` the share of the minutes budget used, as every rank agrees it; after the loop,
    `reason` says why it stopped early (None: all epochs done).
    """

    def __init__(
        self,
        n_images: int,
        batch_size: int,
        epochs: int,
        d: distributed.Dist,
        seed: int,
        minutes: float = 0.0,
        max_steps: int | None = None,
    ) -> None:
        self.n_images, self.batch_size, self.epochs, self.d, self.seed = n_images, batch_size, epochs, d, seed
        self.minutes, self.max_steps = minutes, max_steps
        self.global_batch = batch_size * d.world_size  # each rank takes its own slice of every batch
        self.steps_per_epoch = n_images // self.global_batch
        if self.steps_per_epoch == 0:
            raise UserError(f"global batch {self.global_batch} is larger than the {n_images} training images")
        self.total_steps = epochs * self.steps_per_epoch
        self.stop_at = min(self.total_steps, max_steps or self.total_steps)
        self.budget = minutes * 60 if minutes else math.inf
        self.step, self.seconds, self.time_frac = 0, 0.0, 0.0
        self.reason: str | None = None
        self.bar: tqdm | None = None
        self._signal: str | None = None

    @property
    def epoch(self) -> int:
        """Epochs completed (the epoch under way is epoch + 1)."""
        return self.step // self.steps_per_epoch

    @property
    def running(self) -> bool:
        return self.step < self.stop_at and self.reason is None

    @property
    def epoch_done(self) -> bool:
        """Whether the last step ended an epoch."""
        return self.step > 0 and self.step % self.steps_per_epoch == 0

    def resume(self, ckpt: dict[str, Any]) -> None:
        """Continue where a checkpoint of `state()` stopped: same epoch, same place in its shuffled
        order. With another number of processes the images already seen in the epoch are skipped,
        rounded down to a whole new global batch; with one process before and now, the RNG states
        are restored too, so the run continues exactly as if never stopped."""
        images_in_epoch = ckpt.get("images_in_epoch")
        if images_in_epoch is None:  # saved before checkpoints recorded it (the VAE's)
            old_batch = self.batch_size * ckpt.get("world_size", 1)
            images_in_epoch = (ckpt["step"] - ckpt["epoch"] * (self.n_images // old_batch)) * old_batch
        self.step = ckpt["epoch"] * self.steps_per_epoch + images_in_epoch // self.global_batch
        self.seconds = ckpt.get("seconds", 0.0)
        self.time_frac = self.seconds / self.budget
        if self.d.world_size == 1 == ckpt.get("world_size", 1):
            set_rng_state(ckpt["rng"])
        if self.time_frac >= 1 and self.step < self.stop_at:
            raise UserError(
                f"the run already used its {self.minutes:g}-minute budget ({self.seconds / 60:.1f} min); "
                "pass a larger --minutes (or 0) to train on"
            )

    def state(self) -> dict[str, Any]:
        """What a checkpoint records of the loop (for `resume`)."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "images_in_epoch": self.step % self.steps_per_epoch * self.global_batch,
            "world_size": self.d.world_size,
            "seconds": self.seconds,
            "rng": rng_state(),
        }

    def agree_loss(self, loss: torch.Tensor, on_stop: str) -> float:
        """The step's loss averaged over the ranks (the same number on each). A non-finite one stops
        the run: a UserError saying at which step, and `on_stop` (what is kept, what to try)."""
        value = distributed.mean_across(self.d, loss).item()
        if not math.isfinite(value):
            raise UserError(f"loss became {value} at step {self.step}; stopped, {on_stop}")
        return value

    def seed_ranks(self) -> None:
        """Under torchrun each rank draws its own noise (timesteps, label drops, latents)."""
        if self.d.enabled:
            torch.manual_seed(self.seed + 7919 * self.d.rank + self.step)

    def __enter__(self) -> Loop:
        self._previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self._started, self._seconds_before = time.perf_counter(), self.seconds
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signal = signal.Signals(signum).name

    def batches(self) -> Iterator[torch.Tensor]:
        """This rank's indices for each remaining batch of the current epoch, in the order fixed by
        (seed, epoch); after each step the ranks agree whether to stop, and the epoch ends early if so."""
        self._agree(decide=False)  # the last epoch's checkpoint and grid took time: read the clock again
        epoch, rank, bs = self.epoch, self.d.rank, self.batch_size
        skip = self.step - epoch * self.steps_per_epoch  # resuming mid-epoch: skip what was seen
        batches = list(batch_indices(self.n_images, self.global_batch, self.seed, epoch))[skip:]
        self.bar = tqdm(batches, desc=f"epoch {epoch + 1}/{self.epochs}", leave=False,
                        disable=not self.d.is_main)  # fmt: skip
        for idx in self.bar:
            yield idx[rank * bs : (rank + 1) * bs]
            self.step += 1
            self._agree()
            if not self.running:
                break
        self.bar.close()

    def _agree(self, decide: bool = True) -> None:
        """Read the clock and, after a step (`decide`), whether to stop. Rank 0 owns the clock (every
        rank must use the same lr); any rank may have been signalled."""
        self.seconds = self._seconds_before + time.perf_counter() - self._started
        mine = self.seconds / self.budget if self.d.is_main else 0.0
        signalled, self.time_frac = distributed.max_across(self.d, [float(bool(self._signal)), mine])
        if not decide:
            return
        if signalled:
            self.reason = f"stopped by {self._signal or 'a signal to another rank'}"
        elif self.time_frac >= 1:
            self.reason = f"--minutes {self.minutes:g} budget reached"
        elif self.step >= self.stop_at < self.total_steps:
            self.reason = f"--max-steps {self.max_steps} reached"
