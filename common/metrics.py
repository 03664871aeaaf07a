"""Sample-quality metrics from a judge classifier: `python -m common.metrics --help`.

The judge is a small CNN trained on MNIST train (>= 99.3 % test accuracy), cached in
`results/classifier/` (`classifier.pt` + `classifier.json` with its measured test accuracy)
and trained on first use. Every metric is a plain function over tensors; `score` puts them
together for one set of samples in the shared format (images uint8 [N, 28, 28], labels
int64 [N] or None):

- MNIST-FD: the Frechet distance (Heusel et al. 2017) between Gaussians fitted to the judge's
  penultimate features of the samples and of the 10k test images. It depends on N (the
  estimate is biased upwards for small N), so it is always reported with N and next to its
  floor: the same number for N real *training* images against the test set.
- conditional accuracy: the fraction of samples the judge labels as the requested digit.
- class histogram of the judge's labels and its entropy in bits (log2 10 = 3.32 is uniform):
  mode coverage for unconditional samples.
- precision and recall with k-nearest-neighbour manifolds (Kynkaenniemi et al. 2019, k = 3)
  on the same features, against N test images; per digit for conditional samples.
- memorisation: the pixel-space distance from each sample to its nearest training image,
  against the same distance for test images (a copying model has samples much closer).

Test and train features, the test images' nearest-training-neighbour distances and the
floors for each N are cached in `<classifier dir>/reference.pt`, keyed by the classifier
file and the data, so scoring many sample sets costs one judge pass per set.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.checkpoint import save_checkpoint, write_json
from common.cli import ArgumentParser, UserError, positive_int, user_errors
from common.data import batch_indices, load_mnist, to_unit
from common.runtime import count_params, seed_everything, versions
from common.samples import load_samples

DEFAULT_DIR = Path("results/classifier")
CLASSIFIER = "classifier.pt"
INFO = "classifier.json"
REFERENCE = "reference.pt"
NUM_CLASSES = 10
FLOOR_DRAWS = 3  # the FD floor is the mean over this many draws of N training images


# ----------------------------------------------------------------------------- the judge
@dataclass
class JudgeConfig:
    """Architecture and training recipe of the judge CNN."""

    channels: tuple[int, int] = (16, 32)  # conv widths at 28x28 and at 14x14
    features: int = 128  # penultimate width: the feature space of MNIST-FD and precision/recall
    epochs: int = 5
    batch_size: int = 128
    lr: float = 3e-3  # peak of the one-cycle schedule (AdamW)
    weight_decay: float = 5e-4
    augment: bool = True  # small random affine maps (rotation, scale, shift) per training image
    seed: int = 0


class JudgeCNN(nn.Module):
    """Two stages of (conv3x3-BN-ReLU) x 2 + max-pool, then a 128-unit layer and the logits.

    x: float [B, 1, 28, 28] in [0, 1] -> logits [B, 10]; `features` gives the 128 ReLU
    activations before the last linear layer ([B, 128]), the space every distance here uses.
    """

    def __init__(self, config: JudgeConfig) -> None:
        super().__init__()
        c1, c2 = config.channels

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.body = nn.Sequential(
            *block(1, c1),
            *block(c1, c1),
            nn.MaxPool2d(2),  # 28 -> 14
            *block(c1, c2),
            *block(c2, c2),
            nn.MaxPool2d(2),  # 14 -> 7
            nn.Flatten(),
            nn.Linear(c2 * 49, config.features, bias=False),
            nn.BatchNorm1d(config.features),
            nn.ReLU(),
        )
        self.head = nn.Linear(config.features, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x - 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random affine map per image: rotation +-10 deg, scale 0.9..1.1, shift +-2 px.

    x: float [B, 1, 28, 28] -> same shape (bilinear resampling, zero padding).
    """
    B = x.shape[0]
    u = torch.rand(B, 4, generator=generator) * 2 - 1  # uniform in [-1, 1]
    angle, scale = u[:, 0] * math.radians(10), 1 + 0.1 * u[:, 1]
    shift = u[:, 2:] * (2 / 14)  # affine_grid coordinates span [-1, 1] over 28 px
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )  # [B, 2, 3]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@torch.no_grad()
def judge_outputs(
    model: JudgeCNN, images: torch.Tensor, batch_size: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """images uint8 [N, 28, 28] or [N, 1, 28, 28] -> (logits [N, 10], features [N, F]), float32."""
    if images.dim() == 3:
        images = images.unsqueeze(1)
    model.eval()
    logits, feats = [], []
    for start in range(0, len(images), batch_size):
        h = model.features(to_unit(images[start : start + batch_size]))
        feats.append(h)
        logits.append(model.head(h))
    if not feats:
        return torch.empty(0, NUM_CLASSES), torch.empty(0, model.head.in_features)
    return torch.cat(logits), torch.cat(feats)


def train_classifier(
    out_dir: str | Path = DEFAULT_DIR,
    data_dir: str | Path | None = None,
    config: JudgeConfig | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Train the judge on MNIST train, measure it on MNIST test, write classifier.pt/.json.

    Cross-entropy, AdamW with a one-cycle learning rate (warm-up then cosine decay), batch
    norm, and light affine augmentation; the data live in memory (common.data). Returns the
    info written to classifier.json.
    """
    config = config or JudgeConfig()
    out_dir = Path(out_dir)
    x_train, y_train = load_mnist(train=True, data_dir=data_dir)
    x_test, y_test = load_mnist(train=False, data_dir=data_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed)
    model = JudgeCNN(config)
    steps_per_epoch = max(1, len(x_train) // config.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.15
    )
    g = torch.Generator().manual_seed(config.seed)
    start = time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        total, n = 0.0, 0
        drop_last = len(x_train) >= config.batch_size
        for idx in list(batch_indices(len(x_train), config.batch_size, config.seed, epoch, drop_last))[
            :steps_per_epoch
        ]:
            x = to_unit(x_train[idx])
            if config.augment:
                x = augment(x, g)
            loss = F.cross_entropy(model(x), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, n = total + loss.item(), n + 1
        acc = accuracy(judge_outputs(model, x_test)[0].argmax(1), y_test)
        log(
            f"judge epoch {epoch + 1}/{config.epochs}: train loss {total / max(n, 1):.4f} "
            "(cross-entropy, nats), "
            f"test accuracy {acc:.4f}, {time.perf_counter() - start:.0f} s",
            flush=True,
        )
    seconds = time.perf_counter() - start
    acc = accuracy(judge_outputs(model, x_test)[0].argmax(1), y_test)
    save_checkpoint(
        out_dir / CLASSIFIER, {"kind": "judge", "model": model.state_dict(), "config": asdict(config)}
    )
    info = {
        "test_accuracy": acc,
        "test_errors": int(round((1 - acc) * len(x_test))),
        "n_train": len(x_train),
        "n_test": len(x_test),
        "train_seconds": round(seconds, 1),
        "params": count_params(model),
        "config": asdict(config),
        "data_dir": None if data_dir is None else str(data_dir),
        "versions": versions(),
        "command": "python -m common.metrics train-classifier",
    }
    write_json(out_dir / INFO, info)
    (out_dir / REFERENCE).unlink(missing_ok=True)  # features of the old judge are stale
    return info


# ----------------------------------------------------------------------------- metrics
def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [F] and unbiased covariance [F, F] (divisor N - 1) of features [N, F], in float64."""
    x = features.double()
    mu = x.mean(0)
    d = x - mu
    return mu, d.T @ d / max(x.shape[0] - 1, 1)


def sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix [F, F] via its eigendecomposition.

    a = V diag(lambda) V^T  =>  a^{1/2} = V diag(sqrt(max(lambda, 0))) V^T, in float64; the
    input is symmetrised first and round-off negatives are clipped to 0.
    """
    a = a.double()
    lam, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * lam.clamp(min=0).sqrt()) @ v.T


def frechet_distance_from_stats(
    mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor
) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mu1, cov1) and N(mu2, cov2):

        d^2 = ||mu1 - mu2||^2 + Tr(cov1) + Tr(cov2) - 2 Tr( (cov1^{1/2} cov2 cov1^{1/2})^{1/2} )

    (Dowson & Landau 1982; the FID of Heusel et al. 2017, eq. 6, on our judge's features).
    Tr((cov1 cov2)^{1/2}) is computed from the symmetric matrix cov1^{1/2} cov2 cov1^{1/2},
    which has the same eigenvalues as cov1 cov2, so both square roots are symmetric
    eigendecompositions in float64 (no complex parts, no iterative sqrtm). Shapes: mu [F],
    cov [F, F].
    """
    mu1, mu2, cov1, cov2 = (t.double() for t in (mu1, mu2, cov1, cov2))
    s1 = sqrtm_psd(cov1)
    m = s1 @ cov2 @ s1
    lam = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0)
    d2 = (mu1 - mu2).square().sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * lam.sqrt().sum()
    return max(float(d2), 0.0)


def frechet_distance(features1: torch.Tensor, features2: torch.Tensor) -> float:
    """MNIST-FD between two feature sets [N1, F] and [N2, F] (Gaussians fitted to each)."""
    return frechet_distance_from_stats(*gaussian_stats(features1), *gaussian_stats(features2))


def accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of predicted [N] equal to labels [N]: (1/N) sum_i [pred_i == y_i]."""
    if len(labels) == 0:
        return float("nan")
    return (predicted.cpu() == labels.cpu()).double().mean().item()


def class_histogram(predicted: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Counts of each class among predicted labels [N] -> long [num_classes]."""
    return torch.bincount(predicted.cpu().long(), minlength=num_classes)


def entropy_bits(counts: torch.Tensor) -> float:
    """Entropy of the empirical distribution p_c = n_c / N, in bits: H = -sum_c p_c log2 p_c.

    log2(10) = 3.32 bits for a perfectly balanced 10-class histogram; mode collapse lowers it.
    """
    p = counts.double() / counts.sum().clamp(min=1)
    p = p[p > 0]
    return max(0.0, float(-(p * p.log2()).sum()))  # max: no -0.0 for one class


def pairwise_distances(a: torch.Tensor, b: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Euclidean distances [N, M] between rows of a [N, D] and b [M, D] (float32, in chunks).

    ||a_i - b_j||^2 = ||a_i||^2 + ||b_j||^2 - 2 a_i . b_j, clipped at 0 before the square root.
    """
    a, b = a.float(), b.float()
    b2 = b.square().sum(1)
    out = []
    for start in range(0, len(a), chunk):
        ac = a[start : start + chunk]
        d2 = ac.square().sum(1, keepdim=True) + b2 - 2 * ac @ b.T
        out.append(d2.clamp(min=0).sqrt())
    return torch.cat(out) if out else torch.empty(0, len(b))


def nearest_neighbours(
    queries: torch.Tensor, bank: torch.Tensor, chunk: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query row [N, D], the distance to and index of its nearest bank row [M, D].

    Returns (distance float [N], index long [N]); memory is chunk x M floats at a time.
    """
    dists, idx = [], []
    for start in range(0, len(queries), chunk):
        d = pairwise_distances(queries[start : start + chunk], bank)
        m = d.min(1)
        dists.append(m.values)
        idx.append(m.indices)
    if not dists:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(dists), torch.cat(idx)


def knn_radii(features: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Distance from each point of features [N, F] to its k-th nearest *other* point -> [N].

    The radius of the hypersphere around each point in Kynkaenniemi et al. 2019, eq. 2
    (NN_k(phi', Phi)); column 0 of the sorted distances is the point itself.
    """
    if len(features) <= k:
        raise ValueError(f"k-NN radii need more than k = {k} points, got {len(features)}")
    d = pairwise_distances(features, features)
    return d.kthvalue(k + 1, dim=1).values


def manifold_coverage(query: torch.Tensor, support: torch.Tensor, k: int = 3) -> float:
    """Fraction of query points [Nq, F] inside the k-NN manifold of support [Ns, F].

    f(phi, Phi) = 1 if ||phi - phi'|| <= ||phi' - NN_k(phi', Phi)|| for some phi' in Phi
    (Kynkaenniemi et al. 2019, eq. 2); the fraction is (1/|Q|) sum_q f(q, Phi).
    """
    radii = knn_radii(support, k)
    inside = torch.zeros(len(query), dtype=torch.bool)
    for start in range(0, len(query), 1024):
        d = pairwise_distances(query[start : start + 1024], support)
        inside[start : start + 1024] = (d <= radii).any(1)
    return inside.double().mean().item()


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaenniemi et al. 2019, eq. 1 and 3):

        precision = (1/|Phi_g|) sum_{phi_g} f(phi_g, Phi_r)   (samples that look real)
        recall    = (1/|Phi_r|) sum_{phi_r} f(phi_r, Phi_g)   (real data the samples cover)

    real [Nr, F], fake [Ng, F] features (use Nr = Ng: the manifolds' sizes depend on N).
    Low recall with high precision is the number behind "mode collapse".
    """
    return manifold_coverage(fake, real, k), manifold_coverage(real, fake, k)


def subset(n_total: int, n: int, seed: int) -> torch.Tensor:
    """n indices out of range(n_total), without replacement, fixed by seed (all if n >= n_total)."""
    if n >= n_total:
        return torch.arange(n_total)
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n]


# ----------------------------------------------------------------------------- judge + cache
@dataclass
class Reference:
    """What every score compares against, computed once per (judge, data).

    test_features [Nt, F], test_labels [Nt], train_features [Ntr, F], train_labels [Ntr],
    test_nn_distance [Nt] (pixel L2, [0, 1] pixels, from each test image to its nearest
    training image), floors {str(N): {...}}; train_pixels [Ntr, 784] float [0, 1] (not cached).
    """

    test_features: torch.Tensor
    test_labels: torch.Tensor
    train_features: torch.Tensor
    train_labels: torch.Tensor
    test_nn_distance: torch.Tensor
    floors: dict[str, dict[str, Any]]
    train_pixels: torch.Tensor
    key: str


class Judge:
    """The judge classifier plus its cached reference features for one data set.

    `Judge(dir)` loads `<dir>/classifier.pt`; `reference()` loads or builds the cache.
    """

    def __init__(self, directory: str | Path, data_dir: str | Path | None = None) -> None:
        self.dir = Path(directory)
        self.data_dir = data_dir
        path = self.dir / CLASSIFIER
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise UserError(
                f"no judge classifier at {path}; run python -m common.metrics train-classifier"
            ) from None
        except Exception as e:
            raise UserError(f"{path} is not a readable classifier checkpoint: {str(e)[:200]}") from None
        if not isinstance(state, dict) or state.get("kind") != "judge":
            raise UserError(f"{path} is not a judge classifier checkpoint")
        cfg = dict(state["config"])
        cfg["channels"] = tuple(cfg["channels"])
        self.config = JudgeConfig(**cfg)
        self.model = JudgeCNN(self.config)
        self.model.load_state_dict(state["model"])
        self.model.eval()
        info_path = self.dir / INFO
        self.info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        self.file_hash = hashlib.sha1(path.read_bytes()).hexdigest()[:16]
        self._reference: Reference | None = None

    def outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images uint8 [N, 28, 28] -> (logits [N, 10], features [N, F])."""
        return judge_outputs(self.model, images)

    def reference(self) -> Reference:
        """Test/train features and NN distances: from `<dir>/reference.pt` if its key matches."""
        if self._reference is not None:
            return self._reference
        x_train, y_train = load_mnist(train=True, data_dir=self.data_dir)
        x_test, y_test = load_mnist(train=False, data_dir=self.data_dir)
        h = hashlib.sha1(self.file_hash.encode())
        for t in (x_train, y_train, x_test, y_test):
            h.update(t.numpy().tobytes())
        key = h.hexdigest()[:16]
        train_pixels = to_unit(x_train).reshape(len(x_train), -1)
        path = self.dir / REFERENCE
        cached = None
        if path.is_file():
            try:
                cached = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:
                cached = None
        if cached is not None and cached.get("key") == key:
            self._reference = Reference(**cached, train_pixels=train_pixels)
            return self._reference
        _, test_features = self.outputs(x_test)
        _, train_features = self.outputs(x_train)
        test_nn, _ = nearest_neighbours(to_unit(x_test).reshape(len(x_test), -1), train_pixels)
        self._reference = Reference(
            test_features, y_test, train_features, y_train, test_nn, {}, train_pixels, key
        )
        self._save_reference()
        return self._reference

    def _save_reference(self) -> None:
        r = self._reference
        assert r is not None
        state = {k: v for k, v in r.__dict__.items() if k != "train_pixels"}
        save_checkpoint(self.dir / REFERENCE, state)

    def floor(self, n: int, k: int = 3) -> dict[str, Any]:
        """The same metrics for n real training images: MNIST-FD vs test, precision/recall.

        FD: mean (and std) over FLOOR_DRAWS seeded draws of n training images against the
        full test set; precision/recall (k-NN) of the first draw against the n-image test
        subset that samples are compared with. Cached per n.
        """
        r = self.reference()
        name = f"{n}_k{k}"
        if name not in r.floors:
            n_real = min(n, len(r.train_features))
            fds = [
                frechet_distance(r.train_features[subset(len(r.train_features), n, seed)], r.test_features)
                for seed in range(FLOOR_DRAWS)
            ]
            first = r.train_features[subset(len(r.train_features), n, 0)]
            test_sub = r.test_features[subset(len(r.test_features), n, 0)]
            p, rc = (
                precision_recall(test_sub, first, k) if min(len(first), len(test_sub)) > k else (None, None)
            )
            mean = sum(fds) / len(fds)
            r.floors[name] = {
                "n": n_real,
                "fd": mean,
                "fd_std": (sum((f - mean) ** 2 for f in fds) / len(fds)) ** 0.5,
                "draws": FLOOR_DRAWS,
                "precision": p,
                "recall": rc,
            }
            self._save_reference()
        return r.floors[name]


def load_judge(
    classifier: str | Path | None = None, data_dir: str | Path | None = None, train: bool = True
) -> Judge:
    """The judge in `classifier` (a directory, or its classifier.pt; default results/classifier).

    If there is none and `train` is set, it is trained there first (a few minutes on 2 cores).
    """
    directory = Path(classifier) if classifier is not None else DEFAULT_DIR
    if directory.suffix == ".pt":
        directory = directory.parent
    if directory.exists() and not directory.is_dir():
        raise UserError(f"--classifier {directory} is not a directory")
    if not (directory / CLASSIFIER).is_file():
        if not train:
            raise UserError(
                f"no judge classifier in {directory}; run python -m common.metrics train-classifier"
            )
        print(f"no judge classifier in {directory}: training one now", file=sys.stderr, flush=True)
        train_classifier(directory, data_dir, log=lambda *a, **kw: print(*a, file=sys.stderr, **kw))
    return Judge(directory, data_dir)


def score(
    images: torch.Tensor, labels: torch.Tensor | None, judge: Judge, k: int = 3, seed: int = 0
) -> dict[str, Any]:
    """Every sample metric for images uint8 [N, 28, 28] (+ requested labels int64 [N] or None).

    Keys (floats unless noted; see the README's metrics table):
      n, fd, fd_floor, fd_floor_std, fd_ratio (= fd / fd_floor), k, precision, recall,
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
    ref = judge.reference()
    logits, feats = judge.outputs(images)
    predicted = logits.argmax(1)
    floor = judge.floor(n, k)
    fd = frechet_distance(feats, ref.test_features)
    real = ref.test_features[subset(len(ref.test_features), n, seed)]
    precision, recall = precision_recall(real, feats, k)
    hist = class_histogram(predicted)
    out: dict[str, Any] = {
        "n": n,
        "fd": fd,
        "fd_floor": floor["fd"],
        "fd_floor_std": floor["fd_std"],
        "fd_floor_n": floor["n"],
        "fd_ratio": fd / floor["fd"] if floor["fd"] > 0 else None,
        "k": k,
        "precision": precision,
        "recall": recall,
        "precision_floor": floor["precision"],
        "recall_floor": floor["recall"],
        "class_histogram": hist.tolist(),
        "class_entropy_bits": entropy_bits(hist),
        "judge_confidence": logits.softmax(1).max(1).values.mean().item(),
    }
    if labels is not None:
        out["accuracy"] = accuracy(predicted, labels)
        per_acc, per_p, per_r = [], [], []
        for d in range(NUM_CLASSES):
            mine = labels == d
            per_acc.append(accuracy(predicted[mine], labels[mine]) if mine.any() else None)
            fake_d = feats[mine]
            pool = ref.test_features[ref.test_labels == d]
            real_d = pool[subset(len(pool), len(fake_d), seed + d)]
            if min(len(fake_d), len(real_d)) > k:
                p, r = precision_recall(real_d, fake_d, k)
            else:
                p = r = None
            per_p.append(p)
            per_r.append(r)
        out["accuracy_per_digit"] = per_acc
        out["precision_per_digit"] = per_p
        out["recall_per_digit"] = per_r
    out["memorization"] = memorization(images, ref)
    return {key: (None if isinstance(v, float) and math.isnan(v) else v) for key, v in out.items()}


def memorization(images: torch.Tensor, ref: Reference) -> dict[str, float]:
    """Pixel-space L2 distance ([0, 1] pixels, 784 dims) from each sample to its nearest
    training image, against the same distance for the test images (never seen in training).

    A model that copies its training set has samples much closer than test images are:
    ratio = median_sample / median_test well below 1, and many samples below the test
    images' 1st percentile (near copies).
    """
    x = to_unit(images).reshape(len(images), -1)
    d, _ = nearest_neighbours(x, ref.train_pixels)
    test = ref.test_nn_distance
    p1 = torch.quantile(test, 0.01).item()
    return {
        "sample_nn_median": d.median().item(),
        "sample_nn_mean": d.mean().item(),
        "test_nn_median": test.median().item(),
        "test_nn_mean": test.mean().item(),
        "ratio": d.median().item() / max(test.median().item(), 1e-12),
        "test_nn_p01": p1,
        "frac_below_test_p01": (d < p1).double().mean().item(),
    }


def judge_summary(judge: Judge) -> dict[str, Any]:
    """What metrics.json records about the judge (its test accuracy, where it lives)."""
    return {
        "dir": str(judge.dir),
        "test_accuracy": judge.info.get("test_accuracy"),
        "params": count_params(judge.model),
        "features": judge.config.features,
    }


def score_file(path: str | Path, judge: Judge, k: int = 3) -> dict[str, Any]:
    """`score` on a samples file in the shared format (.npz)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise UserError(f"{path} is not a samples file: expected a .npz (images uint8 [N, 28, 28], labels)")
    if not path.is_file():
        raise UserError(f"samples file {path} does not exist")
    images, labels = load_samples(path)
    return {"samples": str(path), **score(images, labels, judge, k), "judge": judge_summary(judge)}


# ----------------------------------------------------------------------------- CLI
def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m common.metrics", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train-classifier", help="train the judge CNN and cache it")
    t.add_argument("--data-dir", default=None, help="MNIST root (else $MNIST_DIR, else ./data)")
    t.add_argument("--out", default=str(DEFAULT_DIR), help="classifier directory")
    t.add_argument("--epochs", type=positive_int, default=JudgeConfig.epochs)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--overwrite", action="store_true", help="replace an existing classifier")
    s = sub.add_parser("score", help="print the sample metrics of a samples .npz as JSON")
    s.add_argument("samples", help="samples file (.npz: images uint8 [N, 28, 28], labels int64 [N])")
    s.add_argument("--classifier", default=str(DEFAULT_DIR), help="judge directory (trained if absent)")
    s.add_argument("--data-dir", default=None, help="MNIST root (else $MNIST_DIR, else ./data)")
    s.add_argument("--k", type=positive_int, default=3, help="k of the k-NN manifolds")
    return p


@user_errors
def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = build_parser().parse_args(argv)
    if a.command == "train-classifier":
        out = Path(a.out)
        if (out / CLASSIFIER).exists() and not a.overwrite:
            raise UserError(f"{out / CLASSIFIER} exists; pass --overwrite to retrain it")
        info = train_classifier(out, a.data_dir, JudgeConfig(epochs=a.epochs, seed=a.seed))
        print(json.dumps({k: info[k] for k in ("test_accuracy", "test_errors", "train_seconds", "params")}))
        return info
    judge = load_judge(a.classifier, a.data_dir)
    result = score_file(a.samples, judge, a.k)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
