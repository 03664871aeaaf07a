"""Side-by-side report of evaluated runs: `python -m common.compare results/vae results/cvae results/ddpm`.

Reads only what each run's evaluate command left in its directory (metrics.json,
samples.npz, loss.csv) and writes into --out:

    report.md       the table (every model; the DDPM at each sampler setting), likelihoods, figures
    grid_<run>.png  samples, one row per digit (requested digit; the judge's label if unlabelled)
    curves.png      training curves from each loss.csv
    steps.png       MNIST-FD / floor and conditional accuracy against sampling steps
    frontier.png    the guidance frontier: FD / floor against accuracy, one curve per step count
    nearest.png     samples beside their nearest training images (pixel L2), the memorisation check

The nearest-neighbour figure needs the MNIST training images (--data-dir); the judge is only
used, if it exists, to sort unlabelled samples into rows. Nothing here imports a model package.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from common.checkpoint import read_csv  # noqa: E402
from common.cli import ArgumentParser, UserError, user_errors  # noqa: E402
from common.samples import load_samples  # noqa: E402
from common.viz import save_digit_grid, save_grid  # noqa: E402

NUM_CLASSES = 10


# ----------------------------------------------------------------------------- reading runs
def read_run(run: str | Path) -> dict[str, Any]:
    """metrics.json of an evaluated run (with its path under 'dir'); UserError if absent or foreign."""
    run = Path(run)
    path = run / "metrics.json"
    if not run.is_dir():
        raise UserError(f"{run} is not a run directory")
    if not path.is_file():
        raise UserError(
            f"{run} has no metrics.json; run its evaluate command first (e.g. python -m ddpm.evaluate)"
        )
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(metrics, dict) or "samples" not in metrics or "model" not in metrics:
        raise UserError(f"{path} was not written by an evaluate command (no 'model'/'samples')")
    metrics["dir"] = str(run)
    return metrics


def label_of(metrics: dict[str, Any]) -> str:
    """The run's name in tables and figures: its directory name."""
    return Path(metrics["dir"]).name


def settings_of(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per sampler setting: the DDPM's sweep, or the single setting of a VAE."""
    if metrics.get("settings"):
        return metrics["settings"]
    s = metrics.get("sampling", {})
    return [
        {
            "name": "decoder",
            "sampler": "decoder",
            "steps": s.get("steps", 1),
            "guidance": None,
            "n": metrics["samples"]["n"],
            "seconds_per_100": s.get("seconds_per_100"),
            "metrics": metrics["samples"],
        }
    ]


def sampler_family(s: dict[str, Any]) -> str:
    """'DPM2M' for a sweep setting of ddpm.evaluate, 'DPM2M karras' with Karras step spacing."""
    return s["sampler"].upper() + (" karras" if s.get("spacing") == "karras" else "")


def sampler_label(s: dict[str, Any]) -> str:
    """The family and the step count, 'DPM2M karras 10', then the last step's noise level and
    the guidance interval if set: 'DPM2M karras 10 to sigma 0.1 guided in sigma (0.28, 5.42]'."""
    interval, sigma_min = s.get("guidance_interval"), s.get("sigma_min")
    end = f" to sigma {sigma_min:g}" if sigma_min else ""
    where = f" guided in sigma ({interval[0]:g}, {interval[1]:g}]" if interval else ""
    return f"{sampler_family(s)} {s['steps']}{end}{where}"


# ----------------------------------------------------------------------------- figures
def frontier_curves(settings: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The frontier's curves: scored settings grouped by sampler label (prefixed by the setting's
    'run', if it has one, so that two models never share a curve), each sorted by guidance w."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for s in settings:
        if s["metrics"].get("accuracy") is None or s["metrics"].get("fd_ratio") is None:
            continue
        name = f"{s['run']}: {sampler_label(s)}" if s.get("run") else sampler_label(s)
        groups.setdefault(name, []).append(s)
    return {name: sorted(g, key=lambda s: s["guidance"] or 0) for name, g in groups.items()}


def plot_frontier(settings: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """FD / floor (log) against conditional accuracy; one curve per sampler+steps over guidance w."""
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for name, group in frontier_curves(settings).items():
        xs = [100 * s["metrics"]["accuracy"] for s in group]
        ys = [s["metrics"]["fd_ratio"] for s in group]
        n = sorted({s["n"] for s in group})
        (line,) = ax.plot(xs, ys, marker="o", label=f"{name} steps (N = {', '.join(map(str, n))})")
        for s, x, y in zip(group, xs, ys, strict=True):
            ax.annotate(
                f"w={s['guidance']:g}",
                (x, y),
                textcoords="offset points",
                xytext=(3, 3),
                fontsize=7,
                color=line.get_color(),
            )
    ax.axhline(1.0, color="grey", ls=":", lw=1)
    ax.axhline(1.5, color="grey", ls="--", lw=1, label="goal: FD <= 1.5 x floor")
    ax.axvline(99.0, color="grey", ls="-.", lw=1, label="goal: accuracy >= 99 %")
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


def plot_vs_steps(runs: list[dict[str, Any]], path: str | Path) -> None:
    """Two panels against sampling steps (log): MNIST-FD / floor and conditional accuracy.

    Diffusion runs: one colour per guidance w, one line per sampler over its step counts
    (circles DDIM, squares DPM-Solver++(2M), dashed for Karras spacing), the ancestral DDPM
    sampler as crosses; one-pass models (the VAEs) as stars at 1 step.
    """
    fig, (ax_fd, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10)  # one colour per series
    for m in runs:
        label = label_of(m)
        settings = settings_of(m)
        if not m.get("settings"):
            s, color = settings[0], next(colors)
            ax_fd.plot([s["steps"]], [s["metrics"]["fd_ratio"]], marker="*", ms=12, ls="", color=color,
                       label=label)  # fmt: skip
            if s["metrics"].get("accuracy") is not None:
                ax_acc.plot([s["steps"]], [100 * s["metrics"]["accuracy"]], marker="*", ms=12, ls="",
                            color=color, label=label)  # fmt: skip
            continue
        for w in sorted({s["guidance"] for s in settings}):
            color = next(colors)
            families: dict[str, list[dict[str, Any]]] = {}
            for s in settings:
                if s["guidance"] == w:
                    families.setdefault(sampler_family(s), []).append(s)
            for family, group in families.items():
                group = sorted(group, key=lambda s: s["steps"])
                sampler, karras = group[0]["sampler"], family.endswith("karras")
                style = (
                    {"marker": "x", "ms": 9, "ls": ""}  # the ancestral sampler: one step count
                    if sampler == "ddpm"
                    else {"marker": "o" if sampler == "ddim" else "s", "ls": "--" if karras else "-"}
                )
                for ax, key, scale in ((ax_fd, "fd_ratio", 1), (ax_acc, "accuracy", 100)):
                    ax.plot(
                        [s["steps"] for s in group],
                        [scale * s["metrics"][key] for s in group],
                        color=color,
                        label=f"{label} {family} w={w:g}",
                        **style,
                    )
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
    """One panel per run from its loss.csv, with the columns its metrics.json names."""
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
        ax.set_title(label_of(m))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def judge_labels(images: torch.Tensor, classifier: str | Path | None) -> torch.Tensor | None:
    """The judge's labels for unlabelled samples, if a trained judge exists (never trains one)."""
    from common.metrics import CLASSIFIER, DEFAULT_DIR, Judge

    directory = Path(classifier) if classifier else DEFAULT_DIR
    if not (directory / CLASSIFIER).is_file():
        return None
    return Judge(directory).outputs(images)[0].argmax(1)


def save_run_grid(images: torch.Tensor, labels: torch.Tensor | None, path: Path, per_digit: int = 10) -> str:
    """Row per digit (requested labels, or the judge's); a plain 10 x 10 grid if neither exists."""
    if labels is None:
        save_grid(images[:100], path, nrow=10)
        return "first 100 samples"
    save_digit_grid(images, labels, path, per_digit=per_digit)
    return "one row per digit"


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


# ----------------------------------------------------------------------------- the report
def fmt(v: Any, spec: str = ".3f", scale: float = 1.0) -> str:
    """A number for a table cell; '-' for None or NaN."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v * scale, spec)


def cell(text: str) -> str:
    """Escape '|' so that text such as '-log p(x | y)' stays in one markdown table cell."""
    return str(text).replace("|", "\\|")


def table_rows(m: dict[str, Any]) -> list[str]:
    """Markdown rows of the main table for one run (one per sampler setting)."""
    label = label_of(m)
    lik = m.get("likelihood") or {}
    bpd = lik.get("bits_per_dim")
    lik_text = f"{fmt(bpd)} ({lik.get('bound', '')})" if bpd is not None else "-"
    train = m.get("train") or {}
    train_min = None if train.get("seconds") is None else train["seconds"] / 60
    rows = []
    for s in settings_of(m):
        sm = s["metrics"]
        best = m.get("best") == s.get("name") and m.get("settings")
        setting = (
            "decoder (1 pass)"
            if s["sampler"] == "decoder"
            else f"{sampler_label(s)}, w={s['guidance']:g}"
        )
        name = f"**{label}**" if best else label
        if best:
            setting = f"**{setting}** (best)"
        rows.append(
            "| "
            + " | ".join(
                [
                    name,
                    setting,
                    str(sm["n"]),
                    fmt(sm["fd"], ".2f"),
                    fmt(sm["fd_floor"], ".2f"),
                    fmt(sm.get("fd_ratio"), ".2f") + "x",
                    fmt(sm.get("accuracy"), ".1f", 100),
                    fmt(sm.get("precision"), ".3f"),
                    fmt(sm.get("recall"), ".3f"),
                    fmt(sm.get("class_entropy_bits"), ".2f"),
                    fmt((sm.get("memorization") or {}).get("ratio"), ".2f"),
                    lik_text,
                    fmt(s.get("seconds_per_100"), ".3g"),
                    fmt(train_min, ".1f"),
                    f"{train['images_seen']:,}" if train.get("images_seen") is not None else "-",
                    f"{m['params']:,}" if m.get("params") is not None else "-",
                ]
            )
            + " |"
        )
    return rows


def likelihood_rows(m: dict[str, Any]) -> list[str]:
    """Markdown rows of the likelihood table for one run."""
    lik = m.get("likelihood")
    if not lik:
        return []
    label = label_of(m)
    if "prior_bits_per_dim" in lik:  # diffusion VLB
        detail = (
            f"prior {fmt(lik['prior_bits_per_dim'], '.4f')}"
            f" + KL terms {fmt(lik['terms_bits_per_dim'], '.3f')}"
            f" + decoder {fmt(lik['decoder_bits_per_dim'], '.3f')}"
        )
        nats = "-"
    else:
        detail = (
            f"-ELBO {fmt(lik.get('neg_elbo_nats'), '.2f')} nats"
            f" = recon {fmt(lik.get('recon_nll_nats'), '.2f')}"
            f" + KL {fmt(lik.get('kl_nats'), '.2f')}"
        )
        nats = fmt(lik.get("neg_iwae_nats", lik.get("neg_elbo_nats")), ".2f")
    return [
        f"| {label} | {cell(lik.get('bound', ''))} of {cell(lik.get('of', ''))} "
        f"| {fmt(lik.get('bits_per_dim'), '.4f')} | {nats} | {detail} | {lik.get('test_n', '-')} |"
    ]


def write_report(runs: list[dict[str, Any]], out: Path, figures: dict[str, str], command: str) -> Path:
    judge = next((m.get("judge") for m in runs if m.get("judge")), {}) or {}
    lines = [
        "# MNIST: VAE and diffusion side by side",
        "",
        f"Made by `{command}` from each run's `metrics.json`, `samples.npz` and `loss.csv` "
        "(written by `python -m vaegen.evaluate` / `python -m ddpm.evaluate`).",
        "",
        f"Judge: a small CNN with test accuracy {fmt(judge.get('test_accuracy'), '.2f', 100)} % "
        f"(`{judge.get('dir', 'results/classifier')}`). **MNIST-FD**: Frechet distance between "
        "Gaussians fitted to its penultimate features of the N samples and of the 10k test images; "
        "**floor**: the same number for N real training images (compare only equal N). "
        "**accuracy**: samples the judge labels as the requested digit. **precision/recall**: k-NN "
        "manifolds (Kynkaenniemi et al. 2019, k = 3) against N test images. **entropy**: of the "
        "judge's class histogram, bits (3.32 = uniform). **NN ratio**: median pixel distance of "
        "samples to their nearest training image over the same for test images (well below 1: "
        "copying). Times are wall-clock seconds on the evaluating machine.",
        "",
        "## Samples, likelihood and cost",
        "",
        "| run | sampler | N | MNIST-FD | floor | FD/floor | accuracy % | precision | recall | entropy "
        "| NN ratio | bits/dim (bound) | s / 100 digits | train min | images seen | params |",
        "|" + "---|" * 16,
    ]
    for m in runs:
        lines += table_rows(m)
    lik = [r for m in runs for r in likelihood_rows(m)]
    if lik:
        lines += [
            "",
            "## Likelihood bounds on the test set",
            "",
            "| run | bound | bits/dim | nats/image | decomposition | test images |",
            "|---|---|---|---|---|---|",
            *lik,
            "",
            "The VAE's Bernoulli decoder scores grey levels as soft targets (a density, not a "
            "distribution over 256 levels), so its bits/dim do not compare with the DDPM's "
            "discretised variational bound.",
        ]
    for m in runs:
        best = m.get("best_rule")
        if best:
            lines += ["", f"**{label_of(m)} best setting**: `{m.get('best')}` ({best})."]
    if figures:
        lines += ["", "## Figures", ""]
        for name, caption in figures.items():
            lines += [f"**{caption}**", "", f"![{caption}]({name})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m common.compare", description=__doc__)
    p.add_argument("runs", nargs="+", help="evaluated run directories (metrics.json, samples.npz, loss.csv)")
    p.add_argument("--out", default="results/compare", help="directory for report.md and figures")
    p.add_argument("--data-dir", default=None, help="MNIST root for the nearest-neighbour figure")
    p.add_argument("--classifier", default=None, help="judge directory, to sort unlabelled samples into rows")
    return p


@user_errors
def main(argv: list[str] | None = None) -> Path:
    import sys

    a = build_parser().parse_args(argv)
    runs = [read_run(r) for r in a.runs]
    names = [label_of(m) for m in runs]
    if len(set(names)) != len(names):
        raise UserError(f"run directories must have different names, got {', '.join(names)}")
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, str] = {}
    samples: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for m in runs:
        path = Path(m["dir"]) / m.get("samples_file", "samples.npz")
        if not path.is_file():
            raise UserError(f"{m['dir']} has no {path.name}; rerun its evaluate command")
        images, labels = load_samples(path)
        by = "requested digit"
        if labels is None:
            labels = judge_labels(images, a.classifier)
            by = "judge's label"
        samples[m["dir"]] = (images, labels)
        how = save_run_grid(images, labels, out / f"grid_{label_of(m)}.png")
        figures[f"grid_{label_of(m)}.png"] = f"{label_of(m)}: samples, {how}" + (
            f" ({by})" if how == "one row per digit" else ""
        )
    if plot_training_curves(runs, out / "curves.png"):
        figures["curves.png"] = "training curves (from loss.csv)"
    plot_vs_steps(runs, out / "steps.png")
    figures["steps.png"] = "MNIST-FD / floor and conditional accuracy against sampling steps"
    swept = [m for m in runs if m.get("settings")]
    # Settings of different runs (models) get their run's name, so no curve mixes two models.
    sweep = [{**s, "run": label_of(m)} if len(swept) > 1 else s for m in swept for s in m["settings"]]
    if sweep:
        plot_frontier(sweep, out / "frontier.png")
        figures["frontier.png"] = (
            "guidance frontier: MNIST-FD / floor against accuracy, one curve per sampler"
        )
    try:
        picks = nearest_picks(runs, samples, a.data_dir)
    except UserError as e:
        print(f"nearest-neighbour figure skipped: {e}", file=sys.stderr)
    else:
        plot_nearest(picks, out / "nearest.png")
        figures["nearest.png"] = (
            "samples (one per digit) above their nearest training images, pixel L2 distance"
        )
    command = "python -m common.compare " + " ".join(sys.argv[1:] if argv is None else argv)
    report = write_report(runs, out, figures, command)
    print(f"wrote {report} and {len(figures)} figures to {out}")
    return report


def nearest_picks(
    runs: list[dict[str, Any]],
    samples: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
    data_dir: str | None,
) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One sample per digit (or the first 10) of each run and its nearest training image."""
    from common.data import load_mnist, to_unit
    from common.metrics import nearest_neighbours

    x_train, _ = load_mnist(train=True, data_dir=data_dir, download=False)
    bank = to_unit(x_train).reshape(len(x_train), -1)
    picks = []
    for m in runs:
        images, labels = samples[m["dir"]]
        idx = []  # the first sample of each digit, then the first others, up to 10
        if labels is not None:
            idx = [int((labels == d).nonzero()[0]) for d in range(NUM_CLASSES) if (labels == d).any()]
        idx += [i for i in range(len(images)) if i not in idx][: max(0, 10 - len(idx))]
        chosen = images[idx]
        d, nn_idx = nearest_neighbours(to_unit(chosen).reshape(len(chosen), -1), bank)
        test_median = (m["samples"].get("memorization") or {}).get("test_nn_median")
        name = label_of(m) + ("" if test_median is None else f"\n(test: {test_median:.1f})")
        picks.append((name, chosen, x_train[nn_idx, 0], d))
    return picks


if __name__ == "__main__":
    main()
