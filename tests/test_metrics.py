"""common.metrics: Frechet distance against closed forms, accuracy, entropy, k-NN precision/recall;
the judge (common.judge) and the `score` CLI (common.score) on a tiny synthetic MNIST (no real
data, no pre-trained judge)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_mnist import write_fake_mnist

from common import judge as judge_cli
from common import score as score_cli
from common.data import load_mnist
from common.judge import JudgeConfig, load_judge, train_classifier
from common.metrics import (
    EFFICIENCY_GOAL,
    GOAL,
    accuracy,
    class_histogram,
    entropy_bits,
    frechet_distance,
    frechet_distance_from_stats,
    knn_radii,
    precision_recall,
    sqrtm_psd,
)
from common.samples import save_samples

TINY_JUDGE = JudgeConfig(channels=(4, 8), features=16, epochs=3, batch_size=32, augment=False)


def random_spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64)


# ----------------------------------------------------------------------------- Frechet distance
def test_sqrtm_psd_squares_back():
    a = random_spd(6, 0)
    s = sqrtm_psd(a)
    torch.testing.assert_close(s @ s, a)
    torch.testing.assert_close(s, s.T)


def test_fd_of_a_set_with_itself_is_zero():
    x = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance(x, x)) < 1e-8


def test_fd_is_symmetric():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(400, 6, generator=g), 2 * torch.randn(300, 6, generator=g) + 1
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)


def test_fd_1d_closed_form():
    # N(m1, s1^2) vs N(m2, s2^2): d^2 = (m1 - m2)^2 + (s1 - s2)^2
    mu1, mu2 = torch.tensor([0.5], dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64)
    c1, c2 = torch.tensor([[4.0]], dtype=torch.float64), torch.tensor([[0.25]], dtype=torch.float64)
    assert frechet_distance_from_stats(mu1, c1, mu2, c2) == pytest.approx(1.5**2 + (2 - 0.5) ** 2)


def test_fd_diagonal_closed_form():
    # commuting (diagonal) covariances: d^2 = ||mu1 - mu2||^2 + sum_i (sqrt(s1_i) - sqrt(s2_i))^2
    mu1, mu2 = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 2.0, 5.0])
    s1, s2 = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 9.0])
    expected = 1 + 0 + 4 + (1 + 1 + 0)
    assert frechet_distance_from_stats(mu1, torch.diag(s1), mu2, torch.diag(s2)) == pytest.approx(expected)


def test_fd_general_covariances_match_eigenvalue_oracle():
    # Tr((C1 C2)^{1/2}) = sum sqrt(eig(C1 C2)) (real, positive): an independent route
    c1, c2 = random_spd(5, 2), random_spd(5, 3)
    mu1, mu2 = torch.arange(5.0).double(), torch.ones(5).double()
    eig = torch.linalg.eigvals(c1 @ c2).real.clamp(min=0)
    expected = (mu1 - mu2).square().sum() + c1.trace() + c2.trace() - 2 * eig.sqrt().sum()
    assert frechet_distance_from_stats(mu1, c1, mu2, c2) == pytest.approx(float(expected), rel=1e-9)


def test_fd_of_gaussian_samples_approaches_closed_form():
    d, n = 4, 200_000
    g = torch.Generator().manual_seed(4)
    c1, c2 = random_spd(d, 5), random_spd(d, 6)
    mu1, mu2 = torch.zeros(d, dtype=torch.float64), torch.full((d,), 0.5, dtype=torch.float64)
    x1 = mu1 + torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(c1).T
    x2 = mu2 + torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(c2).T
    expected = frechet_distance_from_stats(mu1, c1, mu2, c2)
    assert frechet_distance(x1, x2) == pytest.approx(expected, rel=0.02)


# ----------------------------------------------------------------------------- simple metrics
def test_accuracy():
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert accuracy(y.clone(), y) == 1.0
    assert accuracy(torch.zeros_like(y), y) == pytest.approx(0.1)


def test_histogram_and_entropy():
    uniform = class_histogram(torch.arange(100) % 10)
    assert uniform.tolist() == [10] * 10
    assert entropy_bits(uniform) == pytest.approx(math.log2(10))
    assert entropy_bits(class_histogram(torch.full((50,), 3))) == 0.0
    assert entropy_bits(torch.tensor([5, 5, 0, 0, 0, 0, 0, 0, 0, 0])) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- precision / recall
def test_knn_radii_on_a_line():
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0]])
    torch.testing.assert_close(knn_radii(x, k=1), torch.tensor([1.0, 1.0, 2.0, 3.0]))
    torch.testing.assert_close(knn_radii(x, k=2), torch.tensor([3.0, 2.0, 3.0, 5.0]))


def test_precision_recall_identical_sets():
    x = torch.randn(200, 5, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x.clone(), k=3) == (1.0, 1.0)


def test_precision_recall_disjoint_far_sets():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(200, 5, generator=g), torch.randn(200, 5, generator=g) + 100.0
    assert precision_recall(real, fake, k=3) == (0.0, 0.0)


def test_mode_collapse_keeps_precision_and_loses_recall():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(1000, 2, generator=g)
    fake = 0.05 * torch.randn(1000, 2, generator=g)  # every sample near one mode of the real data
    p, r = precision_recall(real, fake, k=3)
    assert p > 0.95 and r < 0.2


# ----------------------------------------------------------------------------- judge and score
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(write_fake_mnist(tmp_path_factory.mktemp("mnist"), n_train=256, n_test=64))


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("judge")
    train_classifier(out, data_dir, TINY_JUDGE, log=lambda *a, **k: None)
    return str(out)


def test_trained_judge_is_cached_with_its_accuracy(judge_dir):
    info = json.loads((Path(judge_dir) / "classifier.json").read_text())
    assert 0.0 <= info["test_accuracy"] <= 1.0 and info["n_test"] == 64
    judge = load_judge(judge_dir, train=False)
    logits, feats = judge.outputs(torch.zeros(3, 28, 28, dtype=torch.uint8))
    assert logits.shape == (3, 10) and feats.shape == (3, 16)


def test_score_cli_on_the_shared_format(tmp_path, judge_dir, data_dir, capsys):
    images, labels = load_mnist(train=False, data_dir=data_dir)
    path = tmp_path / "samples.npz"
    save_samples(path, images[:40, 0], labels[:40])
    result = score_cli.main([str(path), "--classifier", judge_dir, "--data-dir", data_dir])
    printed = json.loads(capsys.readouterr().out)
    assert printed["n"] == result["n"] == 40
    for key in (
        "fd",
        "fd_floor",
        "fd_ratio",
        "precision",
        "recall",
        "class_histogram",
        "class_entropy_bits",
        "accuracy",
        "accuracy_per_digit",
        "precision_per_digit",
        "recall_per_digit",
        "memorization",
        "judge",
    ):
        assert key in printed, key
    assert sum(printed["class_histogram"]) == 40 and len(printed["accuracy_per_digit"]) == 10
    assert printed["fd"] >= 0 and printed["fd_floor"] > 0
    assert printed["memorization"]["sample_nn_median"] > 0  # test images are not training images
    # the cache holds the floor for this N; a second score reuses it
    assert (Path(judge_dir) / "reference.pt").is_file()
    again = score_cli.main([str(path), "--classifier", judge_dir, "--data-dir", data_dir])
    assert again["fd"] == pytest.approx(result["fd"]) and again["fd_floor"] == result["fd_floor"]


def test_score_unlabelled_samples(tmp_path, judge_dir, data_dir):
    images, _ = load_mnist(train=True, data_dir=data_dir)
    path = tmp_path / "unlabelled.npz"
    np.savez(path, images=images[:30, 0].numpy())
    result = score_cli.score_file(path, load_judge(judge_dir, data_dir, train=False))
    assert "accuracy" not in result and sum(result["class_histogram"]) == 30
    assert result["memorization"]["sample_nn_median"] < 0.05  # training images are their own neighbours


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "samples.png", "not a samples file"),
        (lambda d: d / "missing.npz", "does not exist"),
        (lambda d: (np.savez(d / "bad.npz", pixels=np.zeros(3)), d / "bad.npz")[1], "not a samples file"),
    ],
)
def test_score_bad_input_is_one_line_exit_2(tmp_path, judge_dir, data_dir, capsys, make, message):
    path = make(tmp_path)
    if path.suffix == ".png":
        path.write_bytes(b"png")
    with pytest.raises(SystemExit) as e:
        score_cli.main([str(path), "--classifier", judge_dir, "--data-dir", data_dir])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_classifier_of_the_wrong_kind_is_refused(tmp_path, capsys):
    torch.save({"kind": "vae", "model": {}}, tmp_path / "classifier.pt")
    with pytest.raises(SystemExit) as e:
        score_cli.main([str(tmp_path / "x.npz"), "--classifier", str(tmp_path)])
    assert e.value.code == 2 and "not a judge classifier" in capsys.readouterr().err


def test_train_classifier_refuses_to_overwrite(judge_dir, capsys):
    with pytest.raises(SystemExit) as e:
        judge_cli.main(["--out", judge_dir])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err


def test_goals_hold_at_their_n_steps_accuracy_and_ratio():
    good = {"n": 5000, "accuracy": 0.995, "fd_ratio": 1.4}
    assert GOAL.met(good, 20) and not GOAL.met(good, 21)
    assert GOAL.met({**good, "n": 100}, 20)  # GOAL holds at any N
    assert EFFICIENCY_GOAL.met({**good, "fd_ratio": 1.9}, 10) and not EFFICIENCY_GOAL.met(good, 11)
    assert not EFFICIENCY_GOAL.met({**good, "n": 1000}, 10)  # a ratio at N = 1000 flatters: not counted
    assert not EFFICIENCY_GOAL.met({**good, "accuracy": 0.989}, 10)
    assert not EFFICIENCY_GOAL.met({**good, "fd_ratio": 2.01}, 10)
    assert not EFFICIENCY_GOAL.met({**good, "fd_ratio": None}, 10)
    assert "N >= 5000" in str(EFFICIENCY_GOAL) and "N >=" not in str(GOAL)
