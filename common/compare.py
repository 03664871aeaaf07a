"""Side-by-side report of evaluated runs: `python -m common.compare results/vae results/cvae results/ddpm`.

Reads only what each run's evaluate command left in its directory (metrics.json,
samples.npz, loss.csv) and writes into --out:

    report.md       the table (every model; the DDPM at each sampler setting), likelihoods, figures
    grid_<run>.png  samples, one row per digit (requested digit; the judge's label if unlabelled)
    curves.png      training curves from each loss.csv
    steps.png       MNIST-FD / floor and conditional accuracy against sampling steps
    frontier.png    the guidance frontier: FD / floor against accuracy, one curve per sampler and steps
    nearest.png     samples beside their nearest training images (pixel L2), the memorisation check

The nearest-neighbour figure needs the MNIST training images (--data-dir); the judge is only
used, if it exists, to sort unlabelled samples into rows. Nothing here imports a model package:
a sampler setting is known by what metrics.json records of it (its label, method, steps, w).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from common.cli import ArgumentParser, UserError, user_errors
from common.figures import plot_frontier, plot_nearest, plot_training_curves, plot_vs_steps
from common.metrics import GOAL, NUM_CLASSES
from common.samples import load_samples
from common.viz import save_digit_grid, save_grid


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


def legacy_method(s: dict[str, Any]) -> str:
    """A setting's method as metrics.json from before it was recorded can tell it (its name
    stands in for its label)."""
    parts = [s.get("sampler", s["name"]).upper()]
    parts += ["Karras spacing"] if s.get("spacing") == "karras" else []
    parts += [f"to sigma {s['sigma_min']:g}"] if s.get("sigma_min") else []
    if s.get("guidance_interval"):
        parts.append("guided in sigma ({:g}, {:g}]".format(*s["guidance_interval"]))
    return ", ".join(parts)


def settings_of(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per sampler setting, each with `name`, `label`, `method`, `steps`, `guidance`, `n`,
    `seconds_per_100` and `metrics`: the DDPM's sweep, or the single setting of a VAE."""
    if metrics.get("settings"):
        return [{"label": s["name"], "method": legacy_method(s), **s} for s in metrics["settings"]]
    s = metrics.get("sampling", {})
    return [
        {
            "name": "decoder",
            "label": "decoder (1 pass)",
            "method": "decoder",
            "steps": s.get("steps", 1),
            "guidance": None,
            "n": metrics["samples"]["n"],
            "seconds_per_100": s.get("seconds_per_100"),
            "metrics": metrics["samples"],
        }
    ]


def judge_labels(images: torch.Tensor, classifier: str | Path | None) -> torch.Tensor | None:
    """The judge's labels for unlabelled samples, if a trained judge exists (never trains one)."""
    from common.judge import CLASSIFIER, DEFAULT_DIR, Judge

    directory = Path(classifier) if classifier else DEFAULT_DIR
    if not (directory / CLASSIFIER).is_file():
        return None
    return Judge(directory).outputs(images)[0].argmax(1)


def save_run_grid(images: torch.Tensor, labels: torch.Tensor | None, path: Path, per_digit: int = 10) -> str:
    """Row per digit (requested labels, or the judge's); a plain 10 x 10 grid if neither exists.
    Pixels are drawn 2 x 2, so that the grid reads at its native size in report.md."""
    if labels is None:
        save_grid(images[:100], path, nrow=10, scale=2)
        return "first 100 samples"
    save_digit_grid(images, labels, path, per_digit=per_digit, scale=2)
    return "one row per digit"


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
        name = f"**{label}**" if best else label
        setting = f"**{s['label']}** (best)" if best else s["label"]
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
            "The VAE's Bernoulli decoder scores grey levels as soft targets (neither a distribution "
            "over 256 levels nor a density of grey levels), so its bits/dim do not compare with the "
            "DDPM's discretised variational bound.",
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
    plot_vs_steps([(label_of(m), settings_of(m)) for m in runs], out / "steps.png")
    figures["steps.png"] = "MNIST-FD / floor and conditional accuracy against sampling steps"
    swept = [m for m in runs if m.get("settings")]
    # Settings of different runs (models) get their run's name, so no curve mixes two models.
    sweep = [{**s, "run": label_of(m)} if len(swept) > 1 else s for m in swept for s in settings_of(m)]
    if sweep:
        plot_frontier(sweep, out / "frontier.png", GOAL)
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
