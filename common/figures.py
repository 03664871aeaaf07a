"""The comparison's figures, drawn from what each run's metrics.json records (matplotlib, Agg).

A sampler setting is read through four keys its evaluate command writes: `method` (the sampler
without its steps and guidance), `steps`, `guidance` (w, or None) and the scores in `metrics`.
So the frontier and the steps plot group settings into curves without knowing any sampler.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch

import common.viz  # noqa: F401  (selects the Agg backend, once: a notebook may have chosen its own)
from common.checkpoint import read_csv
from common.metrics import QualityGoal

MARKERS = "osDx^v<>"


def frontier_curves(settings: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The frontier's curves: scored settings grouped by method and steps (prefixed by the setting's
    'run', if it has one, so that two models never share a curve), each sorted by guidance w."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for s in settings:
        if s["metrics"].get("accuracy") is None or s["metrics"].get("fd_ratio") is None:
            continue
        name = f"{s['method']}, {s['steps']} steps"
        groups.setdefault(f"{s['run']}: {name}" if s.get("run") else name, []).append(s)
    return {name: sorted(g, key=lambda s: s["guidance"] or 0) for name, g in groups.items()}


def plot_frontier(
    settings: list[dict[str, Any]], path: str | Path, goal: QualityGoal, title: str = ""
) -> None:
    """FD / floor (log) against conditional accuracy; one curve per method and steps over guidance w."""
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for name, group in frontier_curves(settings).items():
        xs = [100 * s["metrics"]["accuracy"] for s in group]
        ys = [s["metrics"]["fd_ratio"] for s in group]
        n = sorted({s["n"] for s in group})
        (line,) = ax.plot(xs, ys, marker="o", label=f"{name} (N = {', '.join(map(str, n))})")
        for s, x, y in zip(group, xs, ys, strict=True):
            ax.annotate(f"w={s['guidance']:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7,
                        color=line.get_color())  # fmt: skip
    ax.axhline(1.0, color="grey", ls=":", lw=1)
    ax.axhline(goal.fd_ratio, color="grey", ls="--", lw=1, label=f"goal: FD <= {goal.fd_ratio:g} x floor")
    ax.axvline(100 * goal.accuracy, color="grey", ls="-.", lw=1,
               label=f"goal: accuracy >= {goal.accuracy:.0%}")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("conditional accuracy (%), judge classifier")
    ax.set_ylabel("MNIST-FD / floor (same N)")
    ax.set_title(title or "Guidance frontier (each point: one guidance w)")
    ax.grid(alpha=0.3, which="both")
    # Below the axes: curve names with a guidance interval are too long to sit over the data.
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def plot_vs_steps(runs: list[tuple[str, list[dict[str, Any]]]], path: str | Path) -> None:
    """Two panels against sampling steps (log): MNIST-FD / floor and conditional accuracy.

    runs: (label, settings) per run. One colour per run and guidance w, one marker per method,
    a line over each method's step counts; a one-pass model (a VAE) is a star at 1 step.
    """
    fig, (ax_fd, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10)  # one colour per series
    for label, settings in runs:
        methods = list(dict.fromkeys(s["method"] for s in settings))
        for w in sorted({s["guidance"] for s in settings}, key=lambda w: w or 0):
            color = next(colors)
            for m, method in enumerate(methods):
                group = sorted((s for s in settings if s["guidance"] == w and s["method"] == method),
                               key=lambda s: s["steps"])  # fmt: skip
                if not group:
                    continue
                one_pass = len(settings) == 1 and group[0]["steps"] == 1
                style = {"marker": "*", "ms": 12, "ls": ""} if one_pass else {"marker": MARKERS[m % 8]}
                name = label if one_pass else f"{label} {method} w={w:g}"
                for ax, key, scale in ((ax_fd, "fd_ratio", 1), (ax_acc, "accuracy", 100)):
                    points = [(s["steps"], scale * s["metrics"][key])
                              for s in group if s["metrics"].get(key) is not None]  # fmt: skip
                    if points:
                        ax.plot(*zip(*points, strict=True), color=color, label=name, **style)
    ax_fd.axhline(1.0, color="grey", ls=":", lw=1)
    ax_fd.set_yscale("log")
    ax_fd.set_ylabel("MNIST-FD / floor (same N)")
    ax_acc.set_ylabel("conditional accuracy (%)")
    for ax in (ax_fd, ax_acc):
        ax.set_xscale("log")
        ax.set_xlabel("sampling steps (network evaluations per image, x2 with guidance)")
        ax.grid(alpha=0.3, which="both")
    ax_fd.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def plot_training_curves(runs: list[dict[str, Any]], path: str | Path) -> bool:
    """One panel per run from its loss.csv, with the columns its metrics.json names (`curve`);
    runs are metrics.json dicts with their directory under 'dir'."""
    panels = []
    for m in runs:
        csv = Path(m["dir"]) / "loss.csv"
        curve = m.get("curve")
        if csv.is_file() and curve:
            rows = read_csv(csv)
            if rows:
                panels.append((m, curve, rows))
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), dpi=120, squeeze=False)
    for ax, (m, curve, rows) in zip(axes[0], panels, strict=True):
        x = [r[curve["x"]] for r in rows]
        for col in curve["y"]:
            if col in rows[0]:
                ax.plot(x, [r[col] for r in rows], marker="." if len(rows) < 50 else None, label=col)
        if curve.get("logy"):
            ax.set_yscale("log")
        ax.set_xlabel(curve["x"])
        ax.set_ylabel(curve.get("ylabel", ""))
        ax.set_title(Path(m["dir"]).name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_nearest(picks: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]], path: str | Path) -> None:
    """For each run: a row of samples over a row of their nearest training images.

    picks: (label, samples uint8 [10, 28, 28], neighbours uint8 [10, 28, 28], distances [10]).
    """
    cols = max(len(p[1]) for p in picks)
    fig, axes = plt.subplots(
        2 * len(picks), cols, figsize=(cols * 0.9, 2 * len(picks) * 1.0), dpi=120, squeeze=False
    )
    for r, (label, samples, neighbours, dists) in enumerate(picks):
        for c in range(cols):
            for row, imgs in ((2 * r, samples), (2 * r + 1, neighbours)):
                ax = axes[row][c]
                ax.set_xticks([])
                ax.set_yticks([])
                if c < len(imgs):
                    ax.imshow(imgs[c].numpy(), cmap="gray", vmin=0, vmax=255)
                    if row == 2 * r + 1:
                        ax.set_xlabel(f"{dists[c]:.1f}", fontsize=6)
        axes[2 * r][0].set_ylabel(f"{label}", fontsize=7)
        axes[2 * r + 1][0].set_ylabel("nearest\ntrain", fontsize=7)
    fig.suptitle(
        "samples (upper row), their nearest training image (pixel L2 distance below; in brackets the "
        "median distance of test images to theirs)",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


