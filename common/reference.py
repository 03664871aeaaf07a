"""What samples are scored against, computed once per (judge, data) and cached.

The judge's features of the 60k training and 10k test images, the test images' pixel-space
distances to their nearest training image, and the MNIST-FD floor at each N live in
`<classifier dir>/reference.pt`, keyed by the classifier file and the data, so that scoring many
sample sets costs one judge pass per set.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from common.checkpoint import save_checkpoint
from common.data import load_mnist, to_unit
from common.judge import REFERENCE, Judge
from common.metrics import frechet_distance, nearest_neighbours, precision_recall, subset

FLOOR_DRAWS = 5  # the FD floor is the mean over this many draws of N training images


@dataclass
class Reference:
    """test_features [Nt, F], test_labels [Nt], train_features [Ntr, F], train_labels [Ntr],
    test_nn_distance [Nt] (pixel L2, [0, 1] pixels, from each test image to its nearest training
    image), floors {f"{N}_k{k}_draws{FLOOR_DRAWS}": {...}}; train_pixels [Ntr, 784] float [0, 1]
    (not cached)."""

    test_features: torch.Tensor
    test_labels: torch.Tensor
    train_features: torch.Tensor
    train_labels: torch.Tensor
    test_nn_distance: torch.Tensor
    floors: dict[str, dict[str, Any]]
    train_pixels: torch.Tensor
    key: str


def reference(judge: Judge) -> Reference:
    """The judge's Reference: kept on the judge, else read from `<dir>/reference.pt` if its key
    matches this judge and data, else computed (and saved)."""
    if judge.reference is not None:
        return judge.reference
    x_train, y_train = load_mnist(train=True, data_dir=judge.data_dir)
    x_test, y_test = load_mnist(train=False, data_dir=judge.data_dir)
    h = hashlib.sha1(judge.file_hash.encode())
    for t in (x_train, y_train, x_test, y_test):
        h.update(t.numpy().tobytes())
    key = h.hexdigest()[:16]
    train_pixels = to_unit(x_train).reshape(len(x_train), -1)
    path = judge.dir / REFERENCE
    cached = None
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            cached = None
    if cached is not None and cached.get("key") == key:
        judge.reference = Reference(**cached, train_pixels=train_pixels)
        return judge.reference
    _, test_features = judge.outputs(x_test)
    _, train_features = judge.outputs(x_train)
    test_nn, _ = nearest_neighbours(to_unit(x_test).reshape(len(x_test), -1), train_pixels)
    judge.reference = Reference(
        test_features, y_test, train_features, y_train, test_nn, {}, train_pixels, key
    )
    _save(judge)
    return judge.reference


def _save(judge: Judge) -> None:
    state = {k: v for k, v in judge.reference.__dict__.items() if k != "train_pixels"}
    save_checkpoint(judge.dir / REFERENCE, state)


def floor(judge: Judge, n: int, k: int = 3) -> dict[str, Any]:
    """The same metrics for n real training images: MNIST-FD vs test, precision/recall.

    FD: mean (and std) over FLOOR_DRAWS seeded draws of n training images against the
    full test set; precision/recall (k-NN) of the first draw against the n-image test
    subset that samples are compared with. Cached per n, k and FLOOR_DRAWS.
    """
    r = reference(judge)
    name = f"{n}_k{k}_draws{FLOOR_DRAWS}"
    if name not in r.floors:
        n_real = min(n, len(r.train_features))
        fds = [
            frechet_distance(r.train_features[subset(len(r.train_features), n, seed)], r.test_features)
            for seed in range(FLOOR_DRAWS)
        ]
        first = r.train_features[subset(len(r.train_features), n, 0)]
        test_sub = r.test_features[subset(len(r.test_features), n, 0)]
        p, rc = precision_recall(test_sub, first, k) if min(len(first), len(test_sub)) > k else (None, None)
        mean = sum(fds) / len(fds)
        r.floors[name] = {
            "n": n_real,
            "fd": mean,
            "fd_std": (sum((f - mean) ** 2 for f in fds) / len(fds)) ** 0.5,
            "draws": FLOOR_DRAWS,
            "precision": p,
            "recall": rc,
        }
        _save(judge)
    return r.floors[name]
