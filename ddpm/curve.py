"""Quality against training images: `python -m ddpm.curve --runs RUN [RUN ...]`.

A run trained with `ddpm.train --snapshots 60000,120000,190000` keeps its weights at those image
counts in RUN/snapshots/. This command scores each snapshot and the run's final checkpoint with one
sampler setting (`ddpm.sample`'s default unless the sampler flags say otherwise): N samples, N/10
per digit, MNIST-FD against its floor at the same N and the conditional accuracy (common.score).
Each run's scores go to RUN/curve.json, where they are kept: a point already scored with the same
setting, N, seed, batch, weights and judge is not drawn again. The figure (--out, redrawn from
the points each time) has FD / floor and accuracy against images seen, one line per run, with
the thresholds of `common.metrics.EFFICIENCY_GOAL`, which holds at N = 5000.

Images, not minutes, are the x axis: a user's time to a quality is the images it needs divided
by their machine's training images per second (`python -m ddpm.bench`). A snapshot taken mid-run
is the model at that point of the run, with its learning rate not yet annealed; only the final
checkpoint is the end of a schedule.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch

import common.viz  # noqa: F401  (selects the Agg backend)
from common.checkpoint import CHECKPOINT, existing_run_dir, write_json
from common.cli import ArgumentParser, UserError, positive_int, user_errors
from common.config import add_flags, from_args
from common.data import DATA_DIR_HELP
from common.judge import load_judge
from common.metrics import EFFICIENCY_GOAL
from common.reference import FLOOR_DRAWS
from common.runtime import pick_device
from common.score import score
from ddpm.config import load_model
from ddpm.evaluate import training_summary
from ddpm.sample import generate, requested_labels, spec_for
from ddpm.samplers import SamplerSpec

KEPT = ("n", "fd", "fd_ratio", "fd_floor", "fd_floor_std", "accuracy", "precision", "recall")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m ddpm.curve", description=__doc__)
    p.add_argument("--runs", nargs="+", default=["results/ddpm"], help="run directories of ddpm.train")
    p.add_argument("--n", type=positive_int, default=5000, help="samples per point (n/10 per digit)")
    add_flags(p, SamplerSpec)
    p.add_argument("--batch-size", type=positive_int, default=500, help="digits per sampling batch")
    p.add_argument("--raw-weights", action="store_true", help="score the raw weights, not the EMA")
    p.add_argument("--seed", type=int, default=0, help="seeds the samples' noise")
    p.add_argument("--out", default=None, help="figure (default: quality_vs_images.png in the first run)")
    p.add_argument(
        "--classifier", default=None, help="judge directory (default results/classifier; trained if absent)"
    )
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    return p


def checkpoints(run: Path) -> list[Path]:
    """The run's snapshots in the order they were taken, then its final checkpoint (if any)."""
    files = sorted((run / "snapshots").glob("images_*.pt"), key=lambda f: int(f.stem.split("_")[1]))
    return files + ([run / CHECKPOINT] if (run / CHECKPOINT).is_file() else [])


@torch.no_grad()
def score_point(path: Path, spec: SamplerSpec, a: Any, judge: Any, kept: list[dict]) -> dict[str, Any]:
    """One point of the curve: --n samples drawn from the checkpoint file `path` with `spec` and
    scored, or the point in `kept` (curve.json) that did exactly that already."""
    model, diffusion, ckpt = load_model(path, pick_device(a.device), use_ema=not a.raw_weights)
    spec = spec_for(spec, diffusion)
    train = training_summary(ckpt)
    point: dict[str, Any] = {
        "file": path.name if path.parent.name != "snapshots" else f"snapshots/{path.name}",
        "step": train["steps"],
        "images": int(ckpt.get("images") or train["images_seen"]),  # a snapshot records its own count
        "train_seconds": ckpt.get("seconds"),
        "spec": asdict(spec),
        "label": spec.label,
        "n": a.n,
        "seed": a.seed,
        "batch_size": a.batch_size,
        "weights": "raw" if a.raw_weights else "ema",
        "judge": judge.file_hash,
        "floor_draws": FLOOR_DRAWS,
    }
    point = json.loads(json.dumps(point))  # as curve.json holds it (tuples become lists)
    old = next((p for p in kept if {k: p.get(k) for k in point} == point), None)  # all of the above alike
    if old is not None:
        return old
    y = requested_labels(a.n, None, None)
    started = time.perf_counter()
    images = generate(model, diffusion, spec, y, a.seed, a.batch_size)
    point["sample_seconds"] = time.perf_counter() - started
    metrics = score(images, y, judge, seed=a.seed)
    point["metrics"] = {k: metrics[k] for k in KEPT}
    point["meets_efficiency_goal"] = EFFICIENCY_GOAL.met(metrics, spec.steps)
    return point


def run_curve(run: Path, spec: SamplerSpec, a: Any, judge: Any) -> list[dict[str, Any]]:
    """The run's points for this setting; curve.json keeps every point scored so far."""
    path = run / "curve.json"
    try:
        kept = json.loads(path.read_text())["points"] if path.is_file() else []
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{path} is not a curve.json of ddpm.curve; move it away to start afresh") from None
    points = []
    for file in checkpoints(run):
        point = score_point(file, spec, a, judge, kept)
        if point not in kept:
            kept.append(point)
            write_json(path, {"points": kept})
        points.append(point)
        m, goal = point["metrics"], " (meets EFFICIENCY_GOAL)" if point["meets_efficiency_goal"] else ""
        print(f"{run}/{point['file']}: {point['images']:,} images, N {m['n']}: FD {m['fd']:.3f} "
              f"({m['fd_ratio'] or math.nan:.2f}x floor {m['fd_floor']:.3f} +- {m['fd_floor_std']:.3f}), "
              f"accuracy {m['accuracy']:.4f}{goal}", flush=True)  # fmt: skip
    return points


def plot_curve(curves: list[tuple[str, list[dict[str, Any]]]], path: Path, title: str) -> None:
    """Two panels against training images: MNIST-FD / floor (log) and accuracy, a line per run."""
    goal = EFFICIENCY_GOAL
    fig, (ax_fd, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for label, points in curves:
        xs = [p["images"] / 1000 for p in points]
        ax_fd.plot(xs, [p["metrics"]["fd_ratio"] for p in points], marker="o", label=label)
        ax_acc.plot(xs, [100 * p["metrics"]["accuracy"] for p in points], marker="o", label=label)
    at = f" at N >= {goal.n}"
    ax_fd.axhline(goal.fd_ratio, color="grey", ls="--", lw=1, label=f"goal: <= {goal.fd_ratio:g}x floor{at}")
    ax_acc.axhline(100 * goal.accuracy, color="grey", ls="--", lw=1, label=f"goal: >= {goal.accuracy:.0%}")
    ax_fd.set_yscale("log")
    ax_fd.set_ylabel(f"MNIST-FD / floor (N = {curves[0][1][0]['n']})")
    ax_acc.set_ylabel("conditional accuracy (%)")
    for ax in (ax_fd, ax_acc):
        ax.set_xlabel("training images seen (thousands)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


@user_errors
def main(argv: list[str] | None = None) -> list[tuple[str, list[dict[str, Any]]]]:
    a = build_parser().parse_args(argv)
    runs = [existing_run_dir(r) for r in a.runs]
    for run in runs:
        if not checkpoints(run):
            raise UserError(f"--runs {run} has no checkpoint.pt and no snapshots/")
    out = Path(a.out) if a.out else runs[0] / "quality_vs_images.png"
    if out.suffix not in (".png", ".pdf", ".svg"):
        raise UserError(f"--out must end in .png, .pdf or .svg, got {out}")
    spec = from_args(SamplerSpec, a)
    pick_device(a.device)  # a bad --device stops here, before the judge is loaded (or trained)
    judge = load_judge(a.classifier, a.data_dir)
    curves = [(str(run), run_curve(run, spec, a, judge)) for run in runs]
    weights = "raw weights" if a.raw_weights else "EMA weights"
    plot_curve(curves, out, f"{curves[0][1][-1]['label']}, {weights}, sample seed {a.seed}")
    print(f"-> {out}")
    return curves


if __name__ == "__main__":
    main()
