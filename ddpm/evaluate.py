"""Measure a trained DDPM: `python -m ddpm.evaluate --run results/ddpm`.

Writes <run>/metrics.json (and prints it), <run>/samples.npz (the best setting's samples),
<run>/sweep/<setting>.npz (every setting's samples) and <run>/frontier.png:
- the sweep: classifier-free guidance w in --guidance x samplers in --samplers (DDPM
  ancestral with all T steps, DDIM with 50, 20, 10 steps), the other sampler flags shared by
  every setting; per setting N samples, N/10 per digit (the full-length DDPM sampler gets
  --n-ddpm, fewer, as it costs T network passes), scored by the judge (common.score): MNIST-FD
  with its floor at the same N, conditional accuracy, precision and recall (also per digit),
  memorisation distances; and the wall time to draw 100 digits (median over the batches of 100);
- the best setting, by the rule in BEST_RULE, and the guidance frontier (FD against accuracy);
- the variational bound -log p(x0 | y) <= L_T + sum L_{t-1} + L_0 (Ho et al. 2020, eq. 5) in
  bits per dimension on the first --vlb-n test images, split into prior, KL terms, decoder
  (`ddpm.likelihood`, which also gives the unconditional bound);
- training wall time, images seen, parameter count (from the checkpoint).

The protocol (docs/results.md): settings are screened at N = 1000, and a number a decision or
a claim rests on is measured at --n 5000 (about 2 minutes per 10-step setting on 2 cores), each
FD beside its floor at the same N (the mean and std of 5 draws of N training images).

A full default sweep is long on 2 CPU cores (about 20 x 1000 DDIM samples plus 5 x 100
DDPM-1000 samples): restrict it with --guidance, --samplers, --n and --n-ddpm.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from dataclasses import asdict
from typing import Any

import torch

from common.checkpoint import existing_run_dir, write_json
from common.cli import ArgumentParser, nonneg_float, nonneg_int, positive_int, user_errors
from common.config import add_flags, from_args
from common.data import DATA_DIR_HELP
from common.figures import plot_frontier
from common.judge import judge_summary, load_judge
from common.metrics import GOAL
from common.runtime import count_params, pick_device
from common.samples import save_samples
from common.score import score
from ddpm.config import load_model
from ddpm.diffusion import GaussianDiffusion
from ddpm.likelihood import test_bound
from ddpm.sample import generate, requested_labels, spec_for
from ddpm.samplers import SAMPLERS, SamplerSpec
from ddpm.unet import UNet

BEST_RULE = (
    f"fewest steps among settings that meet the goal ({GOAL}; ties: lowest FD); if none, lowest "
    f"FD among settings with accuracy >= {GOAL.accuracy:.0%}; if none, highest accuracy"
)
# The settings' shared flags: plain ones unless asked (each sampler's own steps, to t = 0, unguided).
PLAIN = SamplerSpec("ddim", 50, "uniform", sigma_min=None, guidance=0.0, guidance_interval=None)


def guidance_list(text: str) -> list[float]:
    """`0,0.5,1` -> [0.0, 0.5, 1.0], each >= 0."""
    values = [nonneg_float(v.strip()) for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated guidance weights, got {text!r}")
    return values


def sampler_list(text: str) -> list[tuple[str, int | None]]:
    """`ddpm,ddim50,dpm2m10` -> [('ddpm', None), ('ddim', 50), ('dpm2m', 10)]; None = all T steps."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        m = re.fullmatch(rf"({'|'.join(SAMPLERS)})(\d*)", part)
        if not m or (m.group(2) and int(m.group(2)) < 1):
            raise argparse.ArgumentTypeError(f"expected samplers like ddpm, ddim50, dpm2m20, got {part!r}")
        out.append((m.group(1), int(m.group(2)) if m.group(2) else None))
    if not out:
        raise argparse.ArgumentTypeError(f"expected samplers like ddpm,ddim50,ddim10, got {text!r}")
    return out


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m ddpm.evaluate", description=__doc__)
    p.add_argument("--run", default="results/ddpm", help="run directory of ddpm.train")
    p.add_argument(
        "--guidance",
        dest="guidances",
        type=guidance_list,
        default=guidance_list("0,0.5,1,2,3"),
        help="classifier-free guidance weights w, comma-separated",
    )
    p.add_argument(
        "--samplers",
        type=sampler_list,
        default=sampler_list("ddpm,ddim50,ddim20,ddim10"),
        help="ddpm (ancestral, all T steps) or ddpmS / ddimS / dpm2mS (DPM-Solver++(2M)) with S "
        "steps, comma-separated",
    )
    p.add_argument(
        "--n", type=positive_int, default=1000,
        help="samples per setting (n/10 per digit): 1000 screens settings, results are stated at 5000",
    )  # fmt: skip
    p.add_argument(
        "--n-ddpm",
        type=positive_int,
        default=100,
        help="samples per setting for the ancestral sampler with all T steps",
    )
    p.add_argument("--vlb-n", type=nonneg_int, default=1000, help="test images for the VLB (0: skip)")
    p.add_argument(
        "--vlb-strata", type=nonneg_int, default=50,
        help="sampled steps per image for the VLB's sum over t (0: all T steps); ddpm.likelihood",
    )
    add_flags(p, SamplerSpec, defaults=PLAIN, exclude=("sampler", "steps", "guidance"))
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=100,
        help="digits per sampling batch (the timing is per batch of 100)",
    )
    p.add_argument(
        "--classifier", default=None, help="judge directory (default results/classifier; trained if absent)"
    )
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    p.add_argument("--raw-weights", action="store_true", help="evaluate the raw weights, not the EMA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    return p


def training_summary(ckpt: dict) -> dict[str, Any]:
    """Wall time, optimizer steps and images seen (steps x batch x processes), from the checkpoint."""
    world = int(ckpt.get("world_size", 1))
    batch = int(ckpt["config"]["batch_size"]) * world
    return {
        "seconds": float(ckpt.get("seconds", float("nan"))),
        "steps": int(ckpt["step"]),
        "epochs": int(ckpt.get("epoch", 0)),
        "batch_size": batch,
        "world_size": world,
        "images_seen": int(ckpt["step"]) * batch,
    }


def pick_best(settings: list[dict[str, Any]]) -> str:
    """Name of the best setting by BEST_RULE."""

    def acc(s: dict) -> float:
        return s["metrics"].get("accuracy") or 0.0

    def ratio(s: dict) -> float:
        r = s["metrics"].get("fd_ratio")
        return float("inf") if r is None else r

    goal = [s for s in settings if GOAL.met(s["metrics"], s["steps"])]
    if goal:
        return min(goal, key=lambda s: (s["steps"], ratio(s)))["name"]
    accurate = [s for s in settings if acc(s) >= GOAL.accuracy]
    if accurate:
        return min(accurate, key=ratio)["name"]
    return max(settings, key=lambda s: (acc(s), -ratio(s), -s["steps"]))["name"]


def best_of(settings: list[dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """What metrics.json says of the sweep: the best setting (BEST_RULE) and its scores, the goal
    and which settings meet it, and every setting."""
    best = next(s for s in settings if s["name"] == pick_best(settings))
    return {
        "best": best["name"],
        "best_rule": BEST_RULE,
        "goal": str(GOAL),
        "goal_met_by": [s["name"] for s in settings if GOAL.met(s["metrics"], s["steps"])],
        "sampling": {
            "method": best["label"],
            "steps": best["steps"],
            "seconds_per_100": best["seconds_per_100"],
            "n": best["n"],
            "device": str(device),
            "threads": torch.get_num_threads(),
        },
        "samples_file": "samples.npz",
        "samples": best["metrics"],
        "settings": settings,
    }


def sweep(a: argparse.Namespace, diffusion: GaussianDiffusion) -> list[SamplerSpec]:
    """The settings to measure: --samplers x --guidance, the other sampler flags shared, each fitted
    to the model (all T steps: to t = 0, unspaced), without repeats."""
    specs: list[SamplerSpec] = []
    for sampler, steps in a.samplers:
        for w in a.guidances:
            asked = from_args(SamplerSpec, a, sampler=sampler, steps=steps or diffusion.T, guidance=w)
            spec = spec_for(asked, diffusion)
            if spec not in specs:
                specs.append(spec)
    return specs


def measure(
    model: UNet, diffusion: GaussianDiffusion, spec: SamplerSpec, n: int, a: argparse.Namespace, judge: Any
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """Draw n samples (n/10 per digit, in batches of --batch-size) with `spec`, time and score them.
    Returns (the setting's metrics.json entry, images, labels)."""
    y = requested_labels(n, None, None)
    batches, times = [], []
    for b, yb in enumerate(y.split(a.batch_size)):
        t0 = time.perf_counter()
        batches.append(generate(model, diffusion, spec, yb, a.seed * 100_003 + b, a.batch_size))
        times.append((time.perf_counter() - t0) * 100 / len(yb))
    images = torch.cat(batches)
    setting = {
        "name": spec.name,
        "label": spec.label,
        "method": spec.method,
        "steps": spec.steps,
        "guidance": spec.guidance,
        "passes": spec.passes(diffusion),
        "spec": asdict(spec),
        "n": n,
        "seconds_per_100": sorted(times)[len(times) // 2],
        "seconds_total": sum(t * len(yb) / 100 for t, yb in zip(times, y.split(a.batch_size), strict=True)),
        "batch_size": a.batch_size,
        "samples_file": f"sweep/{spec.name}.npz",
        "metrics": score(images, y, judge),
    }
    return setting, images, y


@user_errors
def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = build_parser().parse_args(argv)
    run, device = existing_run_dir(a.run), pick_device(a.device)
    model, diffusion, ckpt = load_model(run, device, use_ema=not a.raw_weights)
    specs = sweep(a, diffusion)
    judge = load_judge(a.classifier, a.data_dir)
    started = time.perf_counter()
    likelihood = likelihood_bound(model, diffusion, a) if a.vlb_n else None

    settings: list[dict[str, Any]] = []
    images_of: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    (run / "sweep").mkdir(exist_ok=True)
    for i, spec in enumerate(specs):
        n = a.n_ddpm if spec.sampler == "ddpm" and spec.steps == diffusion.T else a.n
        setting, images, y = measure(model, diffusion, spec, n, a, judge)
        save_samples(run / setting["samples_file"], images, y)
        settings.append(setting)
        images_of[spec.name] = (images, y)
        m = setting["metrics"]
        print(
            f"[{i + 1}/{len(specs)}] {spec.name}: N {n}, FD {m['fd']:.2f} ({m['fd_ratio'] or math.nan:.2f}x "
            f"floor), accuracy {m['accuracy'] or math.nan:.4f}, precision {m['precision']:.3f}, recall "
            f"{m['recall']:.3f}, {setting['seconds_per_100']:.2f} s / 100 digits",
            file=sys.stderr,
            flush=True,
        )

    save_samples(run / "samples.npz", *images_of[pick_best(settings)])
    plot_frontier(settings, run / "frontier.png", GOAL, title=f"{run.name}: guidance frontier")
    metrics = {
        "model": "ddpm",
        "run": str(run),
        "command": "python -m ddpm.evaluate " + " ".join(sys.argv[1:] if argv is None else argv),
        "conditional": True,
        "weights": "raw" if a.raw_weights else "ema",
        "params": count_params(model),
        "T": diffusion.T,
        "train": training_summary(ckpt),
        "likelihood": likelihood,
        **best_of(settings, device),
        "judge": judge_summary(judge),
        "curve": {"x": "step", "y": ["loss"], "ylabel": "training loss", "logy": True},
        "eval_seconds": time.perf_counter() - started,
    }
    write_json(run / "metrics.json", metrics)
    print((run / "metrics.json").read_text())
    return metrics


def likelihood_bound(model: UNet, diffusion: GaussianDiffusion, a: argparse.Namespace) -> dict[str, Any]:
    """`ddpm.likelihood.test_bound` on the first --vlb-n test images, given their true labels."""
    bound = test_bound(model, diffusion, a.vlb_n, "label", a.vlb_strata, a.seed, a.data_dir)
    print(
        f"VLB {bound['bits_per_dim']:.4f} bits/dim on {bound['test_n']} test images "
        f"({bound['seconds']:.0f} s)",
        file=sys.stderr,
        flush=True,
    )
    return bound


if __name__ == "__main__":
    main()
