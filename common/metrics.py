"""Sample-quality metrics as plain functions over tensors, and the project's quality goal.

Features [N, F] are the judge classifier's penultimate activations (`common.judge`); `common.score`
applies every function here to one set of samples.

- MNIST-FD: the Frechet distance (Heusel et al. 2017) between Gaussians fitted to two feature
  sets. It depends on N (the estimate is biased upwards for small N), so it is always reported
  with N and next to its floor: the same number for N real *training* images against the test set.
- conditional accuracy: the fraction of samples the judge labels as the requested digit.
- class histogram of the judge's labels and its entropy in bits (log2 10 = 3.32 is uniform):
  mode coverage for unconditional samples.
- precision and recall with k-nearest-neighbour manifolds (Kynkaenniemi et al. 2019, k = 3).
- memorisation: the pixel-space distance from each sample to its nearest training image,
  against the same distance for test images (a copying model has samples much closer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

NUM_CLASSES = 10


@dataclass(frozen=True)
class QualityGoal:
    """The bar this project holds samples to: a sampler setting of at most `max_steps` steps whose
    samples the judge labels as the requested digit at least `accuracy` of the time, with MNIST-FD
    at most `fd_ratio` times its floor at the same N."""

    accuracy: float = 0.99
    fd_ratio: float = 1.5
    max_steps: int = 20
    n: int | None = None  # the fewest samples the FD ratio counts at (None: any N)

    def met(self, metrics: dict[str, Any], steps: int) -> bool:
        """Whether a setting of `steps` steps whose scores are `metrics` (`common.score.score`) meets it."""
        ratio = metrics.get("fd_ratio")
        return (
            steps <= self.max_steps
            and (self.n is None or metrics.get("n", 0) >= self.n)
            and (metrics.get("accuracy") or 0.0) >= self.accuracy
            and ratio is not None
            and ratio <= self.fd_ratio
        )

    def __str__(self) -> str:
        at = f" at N >= {self.n}" if self.n else ""
        fd = f"MNIST-FD <= {self.fd_ratio}x floor{at}"
        return f"<= {self.max_steps} steps, accuracy >= {self.accuracy:.0%}, {fd}"


GOAL = QualityGoal()
# What a 30-minute default DDPM run should reach (docs/results.md, "Quality against training images"):
# judged at N = 5000, where the FD's small-sample bias no longer flatters a model.
EFFICIENCY_GOAL = QualityGoal(accuracy=0.99, fd_ratio=2.0, max_steps=10, n=5000)


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


def memorization(
    images_unit: torch.Tensor, train_pixels: torch.Tensor, test_nn_distance: torch.Tensor
) -> dict[str, float]:
    """Pixel-space L2 distance ([0, 1] pixels, 784 dims) from each sample images_unit [N, 784] to its
    nearest training image (train_pixels [M, 784]), against the same distance for the test images
    (test_nn_distance [Nt], never seen in training).

    A model that copies its training set has samples much closer than test images are:
    ratio = median_sample / median_test well below 1, and many samples below the test
    images' 1st percentile (near copies).
    """
    d, _ = nearest_neighbours(images_unit, train_pixels)
    test = test_nn_distance
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
