"""The commands that set the VAE beside the DDPM, end to end on a tiny synthetic MNIST: the bound in
bits/dim of each, the binarized VAE benchmark, completion and interpolation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from fake_mnist import write_fake_mnist

from common.completion import make_masks
from common.data import binarize, load_mnist, to_unit
from common.judge import JudgeConfig, train_classifier
from common.samples import load_samples
from ddpm import complete as ddpm_complete
from ddpm import interpolate as ddpm_interpolate
from ddpm import likelihood as ddpm_likelihood
from ddpm import train as ddpm_train
from vaegen import complete as vae_complete
from vaegen import curve as vae_curve
from vaegen import evaluate as vae_evaluate
from vaegen import train as vae_train
from vaegen.elbo import evaluate_bounds
from vaegen.sample import load_vae
from vaegen.train import TEST_BINARIZATION_SEED

DDPM_TINY = [
    "--base-channels",
    "8",
    "--channel-mult",
    "1,2,2",
    "--blocks-per-level",
    "0,1,1",
    "--mid-blocks",
    "1",
    "--dropout",
    "0",
    "--timesteps",
    "50",
    "--batch-size",
    "32",
    "--log-every",
    "2",
    "--warmup-steps",
    "2",
    "--device",
    "cpu",
    "--epochs",
    "1",
]
TINY_JUDGE = JudgeConfig(channels=(4, 8), features=16, epochs=3, batch_size=32, augment=False)
VAE_TINY = ["--epochs", "2", "--batch-size", "64", "--device", "cpu", "--hidden", "32", "--latent-dim", "4"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(write_fake_mnist(tmp_path_factory.mktemp("mnist"), n_train=256, n_test=64))


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("judge")
    train_classifier(out, data_dir, TINY_JUDGE, log=lambda *a, **k: None)
    return str(out)


@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("runs") / "ddpm"
    ddpm_train.main(["--out", str(out), "--data-dir", data_dir, *DDPM_TINY])
    return out


@pytest.fixture(scope="module")
def vae_runs(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("runs")
    flags = {"logistic": ["--decoder", "logistic"], "binarized": ["--binarize"], "bernoulli": []}
    for name, extra in flags.items():
        vae_train.main(["--out", str(root / name), "--data-dir", data_dir, *extra, *VAE_TINY])
    return {name: root / name for name in flags}


def one_line_error(capsys, argv, main) -> str:
    """Run a CLI that must refuse `argv`: exit code 2 and a single line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ---- likelihood --------------------------------------------------------------------------------


def test_ddpm_likelihood_writes_the_bound_with_its_standard_error(ddpm_run, data_dir, tmp_path):
    out = ddpm_likelihood.main(["--run", str(ddpm_run), "--n", "12", "--strata", "5", "--data-dir", data_dir])
    saved = json.loads((ddpm_run / "likelihood.json").read_text())
    assert saved["bits_per_dim"] == pytest.approx(out["bits_per_dim"])
    parts = saved["prior_bits_per_dim"] + saved["terms_bits_per_dim"] + saved["decoder_bits_per_dim"]
    assert saved["bits_per_dim"] == pytest.approx(parts)
    assert saved["test_n"] == 12 and saved["strata"] == 5 and saved["passes_per_image"] == 6
    assert 0 < saved["bits_per_dim_stderr"] < saved["bits_per_dim"]
    assert "null label" in saved["of"]
    # every step (strata >= T - 1 is the full sum) and the conditional bound, written elsewhere
    full = ddpm_likelihood.main(
        [
            "--run",
            str(ddpm_run),
            "--n",
            "4",
            "--strata",
            "49",
            "--condition",
            "label",
            "--out",
            str(tmp_path / "b.json"),
            "--data-dir",
            data_dir,
        ]
    )
    assert full["strata"] is None and full["passes_per_image"] == 50 and "true labels" in full["of"]


def test_ddpm_likelihood_refuses_bad_input(ddpm_run, vae_runs, capsys, tmp_path):
    one_line_error(capsys, ["--run", str(ddpm_run), "--strata", "-1"], ddpm_likelihood.main)
    one_line_error(capsys, ["--run", str(ddpm_run), "--n", "0"], ddpm_likelihood.main)
    err = one_line_error(capsys, ["--run", str(vae_runs["logistic"])], ddpm_likelihood.main)
    assert "ddpm" in err.lower()
    one_line_error(capsys, ["--run", str(tmp_path / "nothing")], ddpm_likelihood.main)


def evaluate(run, data_dir, judge_dir, *extra) -> dict:
    argv = ["--run", str(run), "--n", "20", "--data-dir", data_dir, "--classifier", judge_dir]
    return vae_evaluate.main([*argv, "--device", "cpu", *extra])


def test_logistic_vae_reports_bits_per_dim_of_8bit_data(vae_runs, data_dir, judge_dir):
    run = vae_runs["logistic"]
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["model"]["decoder"] == "logistic"
    assert ckpt["model"]["dec_logits.bias"].shape == (2 * 784,)
    lik = evaluate(run, data_dir, judge_dir, "--iwae-k", "10")["likelihood"]
    assert lik["neg_iwae_nats"] <= lik["neg_elbo_nats"] + 1.0  # the tighter bound, up to MC noise
    assert lik["bits_per_dim"] == pytest.approx(lik["neg_iwae_nats"] / (784 * math.log(2)))
    assert "256 levels" in lik["note"] and "DDPM" in lik["note"]


def test_binarized_vae_is_scored_on_one_fixed_binary_draw_of_the_test_set(vae_runs, data_dir, judge_dir):
    run = vae_runs["binarized"]
    lik = evaluate(run, data_dir, judge_dir, "--iwae-k", "0")["likelihood"]
    assert "binarized" in lik["note"]
    x_test = to_unit(load_mnist(False, data_dir)[0]).reshape(64, -1)
    once = binarize(x_test, torch.Generator().manual_seed(TEST_BINARIZATION_SEED))
    assert set(once.unique().tolist()) == {0.0, 1.0}
    model = load_vae(run, torch.device("cpu"))
    # evaluate's noise: seed 0, one batch; the same bound on the binary draw, not on the grey images
    assert lik["neg_elbo_nats"] == pytest.approx(evaluate_bounds(model, once, None, seed=0)["neg_elbo"])
    assert lik["neg_elbo_nats"] != pytest.approx(evaluate_bounds(model, x_test, None, seed=0)["neg_elbo"])
    grey = evaluate(vae_runs["bernoulli"], data_dir, judge_dir, "--iwae-k", "0")["likelihood"]
    assert "soft targets" in grey["note"]


def test_vae_train_refuses_binarize_with_a_logistic_decoder(capsys, tmp_path, data_dir):
    argv = ["--out", str(tmp_path / "x"), "--data-dir", data_dir, "--binarize", "--decoder", "logistic"]
    err = one_line_error(capsys, argv, vae_train.main)
    assert "--binarize" in err
    assert not (tmp_path / "x").exists()


# ---- completion and interpolation -----------------------------------------------------------


def completion_files_keep_the_observed_pixels(report: dict, npz, data_dir, mask: str, draws: int) -> None:
    images, labels = load_samples(npz)
    n = report["n"]
    truth, y = (v[:n] for v in load_mnist(False, data_dir))
    observed = make_masks(mask, n)
    images = images.view(n, draws, 28, 28)
    assert torch.equal(labels, y.repeat_interleave(draws))
    assert torch.equal(
        images[observed[:, None].expand_as(images)],
        truth[:, 0, None].expand_as(images)[observed[:, None].expand_as(images)],
    )
    assert report["observed_kept"] and 0 <= report["accuracy"] <= 1 and report["masked_mse"] >= 0
    assert npz.with_suffix(".png").is_file() and npz.with_name(npz.stem + "_figure.png").is_file()


@pytest.mark.parametrize("mask", ["top", "random"])
def test_ddpm_completion_keeps_the_observed_pixels_bit_for_bit(ddpm_run, data_dir, judge_dir, mask):
    argv = [
        "--run",
        str(ddpm_run),
        "--mask",
        mask,
        "--n",
        "6",
        "--draws",
        "2",
        "--steps",
        "5",
        "--resample",
        "2",
        "--batch-size",
        "4",
        "--classifier",
        judge_dir,
        "--data-dir",
        data_dir,
    ]
    report = ddpm_complete.main([*argv, "--device", "cpu"])
    npz = ddpm_run / f"completion_{mask}.npz"
    assert json.loads(npz.with_suffix(".json").read_text())["method"]["passes_per_digit"] == 10
    completion_files_keep_the_observed_pixels(report, npz, data_dir, mask, 2)
    assert report["diversity"] > 0  # two draws of a random completion differ


def test_vae_completion_keeps_the_observed_pixels_bit_for_bit(vae_runs, data_dir, judge_dir, tmp_path):
    out = tmp_path / "left.npz"
    argv = [
        "--run",
        str(vae_runs["logistic"]),
        "--mask",
        "left",
        "--n",
        "6",
        "--draws",
        "3",
        "--proposals",
        "50",
        "--out",
        str(out),
        "--classifier",
        judge_dir,
        "--data-dir",
        data_dir,
        "--device",
        "cpu",
    ]
    report = vae_complete.main(argv)
    completion_files_keep_the_observed_pixels(report, out, data_dir, "left", 3)


def test_completion_refuses_bad_input(ddpm_run, vae_runs, data_dir, capsys, tmp_path):
    one_line_error(capsys, ["--run", str(ddpm_run), "--mask", "bottom"], ddpm_complete.main)
    one_line_error(
        capsys, ["--run", str(ddpm_run), "--steps", "1", "--data-dir", data_dir], ddpm_complete.main
    )
    one_line_error(capsys, ["--run", str(ddpm_run), "--resample", "0"], ddpm_complete.main)
    one_line_error(capsys, ["--run", str(ddpm_run), "--out", str(tmp_path / "x.png")], ddpm_complete.main)
    err = one_line_error(capsys, ["--run", str(vae_runs["logistic"])], ddpm_complete.main)
    assert "ddpm" in err.lower()
    one_line_error(capsys, ["--run", str(ddpm_run), "--proposals", "0"], vae_complete.main)
    one_line_error(capsys, ["--run", str(ddpm_run)], vae_complete.main)  # a DDPM run is not a VAE


def test_ddpm_interpolation_writes_the_path_and_the_round_trip_error(ddpm_run, data_dir, tmp_path):
    out = tmp_path / "interp.png"
    argv = [
        "--run",
        str(ddpm_run),
        "--pair",
        "3,5",
        "--steps",
        "10",
        "--points",
        "4",
        "--recon-n",
        "8",
        "--out",
        str(out),
        "--data-dir",
        data_dir,
        "--device",
        "cpu",
    ]
    report = ddpm_interpolate.main(argv)
    assert out.is_file() and json.loads(out.with_suffix(".json").read_text())["recon_n"] == 8
    assert report["pair"] == [3, 5] and report["recon_mse"] > 0


def test_ddpm_interpolation_refuses_bad_input(ddpm_run, data_dir, capsys):
    one_line_error(capsys, ["--run", str(ddpm_run), "--pair", "3"], ddpm_interpolate.main)
    one_line_error(
        capsys, ["--run", str(ddpm_run), "--pair", "0,99999", "--data-dir", data_dir], ddpm_interpolate.main
    )
    one_line_error(capsys, ["--run", str(ddpm_run), "--steps", "51"], ddpm_interpolate.main)


def test_vae_curve_plots_evaluated_runs_and_refuses_unevaluated_ones(
    vae_runs, data_dir, judge_dir, tmp_path, capsys
):
    evaluate(vae_runs["binarized"], data_dir, judge_dir, "--iwae-k", "5")
    out = tmp_path / "curve.png"
    curves = vae_curve.main(["--runs", str(vae_runs["binarized"]), "--reference", "86.76", "--out", str(out)])
    assert out.read_bytes()[:4] == b"\x89PNG"
    (c,) = curves
    assert len(c["minutes"]) == 2 and c["minutes"][0] < c["minutes"][1] and c["iwae_k"] == 5
    fresh = tmp_path / "fresh"
    vae_train.main(["--out", str(fresh), "--data-dir", data_dir, *VAE_TINY])
    err = one_line_error(capsys, ["--runs", str(fresh)], vae_curve.main)
    assert "vaegen.evaluate" in err
