"""Completion, the task both models meet on: given part of a test digit, fill in the rest.

Each model's command (`vaegen.complete`, `ddpm.complete`) supplies one function,
`complete(x uint8 [B, 28, 28], observed bool [B, 28, 28], generator) -> uint8 [B, 28, 28]`, and
`run_completion` does the rest the same way for both: the same first --n test digits and the same
masks (`make_masks`: the top half, the left half, or a random 50 % of the pixels, drawn once
for the whole test set with a fixed seed), --draws completions of each, the observed pixels
checked to be kept bit for bit, and the scores (`completion_metrics`):

  accuracy     the judge's label of the completion equals the true digit (the model had to infer it)
  masked_mse   mean squared error against the true digit on the missing pixels, in [0, 1] units
  diversity    root-mean-square distance between two completions of one digit on the missing pixels

It writes the completions in the samples format (labels: the true digits), a figure and the
scores as JSON, and returns the scores.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from common.checkpoint import write_json
from common.cli import ArgumentParser, UserError, positive_int
from common.data import DATA_DIR_HELP, load_mnist
from common.judge import Judge, judge_summary, load_judge
from common.samples import save_samples
from common.viz import save_grid

MASKS = ("top", "left", "random")
MASK_SEED = 2022  # the random masks: one draw for the whole test set, the same for every model
Completer = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


def make_masks(kind: str, n: int, size: int = 28) -> torch.Tensor:
    """Which pixels are observed, bool [n, size, size] (True = known): the top half, the left half, or
    each pixel with probability 1/2 (MASK_SEED; mask i is the same whatever n)."""
    if kind in ("top", "left"):
        mask = torch.zeros(size, size, dtype=torch.bool)
        half = mask[: size // 2] if kind == "top" else mask[:, : size // 2]
        half.fill_(True)
        return mask.expand(n, size, size).clone()
    if kind == "random":
        g = torch.Generator().manual_seed(MASK_SEED)  # drawn for the whole test set: mask i is fixed
        return (torch.rand(max(n, 10_000), size, size, generator=g) < 0.5)[:n].clone()
    raise UserError(f"unknown mask {kind!r} (use {', '.join(MASKS)})")


def completion_metrics(
    completions: torch.Tensor, truth: torch.Tensor, labels: torch.Tensor, observed: torch.Tensor, judge: Judge
) -> dict[str, Any]:
    """Scores of completions uint8 [N, D, 28, 28] (D draws each) of digits truth uint8 [N, 28, 28]
    with labels [N] and observed masks bool [N, 28, 28]; see the module docstring."""
    n, draws = completions.shape[:2]
    logits, _ = judge.outputs(completions.reshape(n * draws, 28, 28))
    correct = (logits.argmax(1).view(n, draws) == labels[:, None]).float()
    x, x_true = completions.float() / 255.0, truth.float()[:, None] / 255.0
    missing = (~observed)[:, None].float()  # [N, 1, 28, 28]
    per_pixel = missing.sum() * draws
    same = completions == truth[:, None]
    out: dict[str, Any] = {
        "n": n,
        "draws": draws,
        "accuracy": correct.mean().item(),
        "masked_mse": (((x - x_true) ** 2) * missing).sum().item() / per_pixel.item(),
        "observed_kept": bool(same[observed[:, None].expand_as(same)].all()),
        "missing_fraction": missing.mean().item(),
    }
    if draws > 1:
        sq = (((x[:, 0] - x[:, 1]) ** 2) * missing[:, 0]).sum((1, 2)) / missing[:, 0].sum((1, 2))
        out["diversity"] = sq.sqrt().mean().item()
    return out


def completion_figure(
    truth: torch.Tensor, observed: torch.Tensor, completions: torch.Tensor, path: Path, rows: int = 10
) -> None:
    """One row per digit: the truth, what the model saw (missing pixels mid-grey), then each draw."""
    shown = torch.where(observed[:rows], truth[:rows], torch.full_like(truth[:rows], 128))
    cells = torch.cat([truth[:rows, None], shown[:, None], completions[:rows]], dim=1)
    save_grid(cells.reshape(-1, 28, 28), path, nrow=cells.shape[1], scale=2)


def completion_parser(prog: str, description: str, default_run: str) -> ArgumentParser:
    """The flags both completion commands share; each adds its model's own."""
    p = ArgumentParser(prog=prog, description=description)
    p.add_argument("--run", default=default_run, help="run directory of the model's trainer")
    p.add_argument("--mask", choices=MASKS, default="top", help="which pixels are observed")
    p.add_argument("--n", type=positive_int, default=1000, help="test digits to complete (the first N)")
    p.add_argument("--draws", type=positive_int, default=2, help="completions of each digit (2+: diversity)")
    p.add_argument("--batch-size", type=positive_int, default=100, help="digits per batch")
    p.add_argument("--out", default=None, help="samples file (.npz); default <run>/completion_<mask>.npz")
    p.add_argument(
        "--classifier", default=None, help="judge directory (default results/classifier; trained if absent)"
    )
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    p.add_argument("--seed", type=int, default=0, help="seeds the completions' randomness")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    return p


def run_completion(
    a: Any, run: Path, complete: Completer, method: dict[str, Any], command: str
) -> dict[str, Any]:
    """Complete the first --n test digits under --mask, --draws times each, with `complete`; write
    <out>.npz (+ .png), <out>_figure.png and <out>.json; return the scores."""
    out = Path(a.out) if a.out else run / f"completion_{a.mask}.npz"
    if out.suffix != ".npz":
        raise UserError(f"--out {out}: the samples file must end in .npz")
    x_test, y_test = load_mnist(train=False, data_dir=a.data_dir)
    n = min(a.n, len(x_test))
    truth, labels, observed = x_test[:n, 0], y_test[:n], make_masks(a.mask, n)
    judge = load_judge(a.classifier, a.data_dir)
    g = torch.Generator().manual_seed(a.seed)
    started = time.perf_counter()
    batches = []
    for start in tqdm(range(0, n, a.batch_size), desc=f"completing ({a.mask})"):
        xb, mb = truth[start : start + a.batch_size], observed[start : start + a.batch_size]
        batches.append(torch.stack([complete(xb, mb, g).cpu() for _ in range(a.draws)], dim=1))
    completions = torch.cat(batches)  # [n, draws, 28, 28]
    seconds = time.perf_counter() - started
    scores = completion_metrics(completions, truth, labels, observed, judge)
    if not scores["observed_kept"]:
        raise RuntimeError("a completion changed an observed pixel")  # a bug, not a user error
    save_samples(out, completions.reshape(-1, 28, 28), labels.repeat_interleave(a.draws))
    completion_figure(truth, observed, completions, out.with_name(out.stem + "_figure.png"))
    report = {
        "mask": a.mask,
        "method": method,
        "run": str(run),
        "command": command,
        "seconds": seconds,
        "seconds_per_100": seconds * 100 / (n * a.draws),
        "samples_file": out.name,
        **scores,
        "judge": judge_summary(judge),
    }
    write_json(out.with_suffix(".json"), report)
    print(
        f"{a.mask}: accuracy {scores['accuracy']:.3f}, masked MSE {scores['masked_mse']:.4f}, diversity "
        f"{scores.get('diversity', float('nan')):.3f} ({n} digits x {a.draws}, {seconds:.0f} s); wrote {out}",
        file=sys.stderr,
    )
    return report
