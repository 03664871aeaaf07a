"""Score a set of samples with the judge: `python -m common.score SAMPLES.npz`.

`score` applies every metric of `common.metrics` to samples in the shared format (images uint8
[N, 28, 28], labels int64 [N] or None), against the judge's cached reference features
(`common.reference`): MNIST-FD and its floor at the same N, precision and recall against N test
images, the judge's class histogram, and with labels the conditional accuracy and the per-digit
numbers; the memorisation distances in pixel space.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from common.cli import ArgumentParser, UserError, positive_int, user_errors
from common.data import DATA_DIR_HELP, to_unit
from common.judge import DEFAULT_DIR, Judge, judge_summary, load_judge
from common.metrics import (
    NUM_CLASSES,
    accuracy,
    class_histogram,
    entropy_bits,
    frechet_distance,
    memorization,
    precision_recall,
    subset,
)
from common.reference import Reference, floor, reference
from common.samples import load_samples


def score(
    images: torch.Tensor, labels: torch.Tensor | None, judge: Judge, k: int = 3, seed: int = 0
) -> dict[str, Any]:
    """Every sample metric for images uint8 [N, 28, 28] (+ requested labels int64 [N] or None).

    Keys (floats unless noted; docs/reference.md, "What `metrics.json` holds"):
      n, fd, fd_floor, fd_floor_std, fd_floor_n, fd_ratio (= fd / fd_floor), k, precision, recall,
      precision_floor, recall_floor, class_histogram (10 ints, judge labels), class_entropy_bits,
      judge_confidence (mean max softmax), memorization {...}; with labels also accuracy,
      accuracy_per_digit, precision_per_digit, recall_per_digit (lists of 10, None where a
      digit has <= k samples).
    """
    if images.dim() == 4:
        images = images[:, 0]
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (28, 28):
        raise UserError(f"samples must be uint8 [N, 28, 28], got {images.dtype} {tuple(images.shape)}")
    n = len(images)
    if n <= k:
        raise UserError(f"need more than k = {k} samples to score, got {n}")
    if labels is not None:
        labels = labels.long().cpu()
        if len(labels) != n:
            raise UserError(f"{len(labels)} labels for {n} images")
        if labels.min() < 0 or labels.max() >= NUM_CLASSES:
            raise UserError("labels must be digits 0-9")
    ref = reference(judge)
    logits, feats = judge.outputs(images)
    predicted = logits.argmax(1)
    floor_n = floor(judge, n, k)
    fd = frechet_distance(feats, ref.test_features)
    real = ref.test_features[subset(len(ref.test_features), n, seed)]
    precision, recall = precision_recall(real, feats, k)
    hist = class_histogram(predicted)
    out: dict[str, Any] = {
        "n": n,
        "fd": fd,
        "fd_floor": floor_n["fd"],
        "fd_floor_std": floor_n["fd_std"],
        "fd_floor_n": floor_n["n"],
        "fd_ratio": fd / floor_n["fd"] if floor_n["fd"] > 0 else None,
        "k": k,
        "precision": precision,
        "recall": recall,
        "precision_floor": floor_n["precision"],
        "recall_floor": floor_n["recall"],
        "class_histogram": hist.tolist(),
        "class_entropy_bits": entropy_bits(hist),
        "judge_confidence": logits.softmax(1).max(1).values.mean().item(),
    }
    if labels is not None:
        out["accuracy"] = accuracy(predicted, labels)
        out.update(per_digit(predicted, feats, labels, ref, k, seed))
    out["memorization"] = memorization(
        to_unit(images).reshape(n, -1), ref.train_pixels, ref.test_nn_distance
    )
    return {key: (None if isinstance(v, float) and math.isnan(v) else v) for key, v in out.items()}


def per_digit(
    predicted: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor, ref: Reference, k: int, seed: int
) -> dict[str, list[float | None]]:
    """Accuracy, precision and recall per requested digit (None where a digit has <= k samples);
    each digit's samples against as many test images of that digit."""
    out: dict[str, list[float | None]] = {"accuracy_per_digit": [], "precision_per_digit": [],
                                          "recall_per_digit": []}  # fmt: skip
    for d in range(NUM_CLASSES):
        mine = labels == d
        out["accuracy_per_digit"].append(accuracy(predicted[mine], labels[mine]) if mine.any() else None)
        fake_d = feats[mine]
        pool = ref.test_features[ref.test_labels == d]
        real_d = pool[subset(len(pool), len(fake_d), seed + d)]
        p, r = precision_recall(real_d, fake_d, k) if min(len(fake_d), len(real_d)) > k else (None, None)
        out["precision_per_digit"].append(p)
        out["recall_per_digit"].append(r)
    return out


def score_file(path: str | Path, judge: Judge, k: int = 3) -> dict[str, Any]:
    """`score` on a samples file in the shared format (.npz)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise UserError(f"{path} is not a samples file: expected a .npz (images uint8 [N, 28, 28], labels)")
    if not path.is_file():
        raise UserError(f"samples file {path} does not exist")
    images, labels = load_samples(path)
    return {"samples": str(path), **score(images, labels, judge, k), "judge": judge_summary(judge)}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m common.score", description=__doc__)
    p.add_argument("samples", help="samples file (.npz: images uint8 [N, 28, 28], labels int64 [N])")
    p.add_argument("--classifier", default=str(DEFAULT_DIR), help="judge directory (trained if absent)")
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    p.add_argument("--k", type=positive_int, default=3, help="k of the k-NN manifolds")
    return p


@user_errors
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Print (and return) the metrics of a samples file as JSON."""
    a = build_parser().parse_args(argv)
    result = score_file(a.samples, load_judge(a.classifier, a.data_dir), a.k)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
