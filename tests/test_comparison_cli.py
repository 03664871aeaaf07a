"""The commands that set the VAE beside the DDPM, end to end on a tiny synthetic MNIST: the bound in
bits/dim of each, the binarized VAE benchmark, completion and interpolation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from fake_mnist import write_fake_mnist

from common.data import binarize, load_mnist, to_unit
from common.judge import JudgeConfig, train_classifier
from ddpm import likelihood as ddpm_likelihood
from ddpm import train as ddpm_train
from vaegen import evaluate as vae_evaluate
from vaegen import train as vae_train
from vaegen.elbo import evaluate_bounds
from vaegen.sample import load_vae
from vaegen.train import TEST_BINARIZATION_SEED

DDPM_TINY = ["--base-channels", "8", "--channel-mult", "1,2,2", "--blocks-per-level", "0,1,1",
             "--mid-blocks", "1", "--dropout", "0", "--timesteps", "50", "--batch-size", "32",
             "--log-every", "2", "--warmup-steps", "2", "--device", "cpu", "--epochs", "1"]  # fmt: skip
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
    full = ddpm_likelihood.main(["--run", str(ddpm_run), "--n", "4", "--strata", "49", "--condition", "label",
                                 "--out", str(tmp_path / "b.json"), "--data-dir", data_dir])  # fmt: skip
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
