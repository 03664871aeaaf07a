"""vaegen.train and vaegen.sample end to end on a tiny synthetic MNIST (never the real one)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from fake_mnist import write_fake_mnist

from vaegen import sample, train

# 256 training images at batch 64: 4 optimizer steps per epoch
TINY = ["--epochs", "2", "--batch-size", "64", "--device", "cpu"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(write_fake_mnist(tmp_path_factory.mktemp("mnist"), n_train=256, n_test=64))


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("runs") / "vae"
    train.main(["--out", str(out), "--data-dir", data_dir, *TINY])
    return out


@pytest.fixture(scope="module")
def cvae_run(tmp_path_factory, data_dir):
    """A conditional VAE with a 2-D latent space (exercises the manifold figure too)."""
    out = tmp_path_factory.mktemp("runs") / "cvae"
    train.main(["--out", str(out), "--data-dir", data_dir, "--conditional", "--latent-dim", "2", *TINY])
    return out


def one_line_error(capsys, argv, main) -> str:
    """Run a CLI that must refuse `argv`: exit code 2 and a single line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def losses(run) -> list[dict[str, str]]:
    with (run / "loss.csv").open() as f:
        return list(csv.DictReader(f))


# ---- train ---------------------------------------------------------------------------------


def test_train_writes_every_file(vae_run):
    for name in ("config.json", "checkpoint.pt", "loss.csv", "loss.png",
                 "samples/epoch_001.png", "samples/epoch_002.png"):
        assert (vae_run / name).is_file(), name
    rows = losses(vae_run)
    assert list(rows[0]) == ["epoch", "train_neg_elbo_nats", "test_neg_elbo_nats", "test_kl_nats", "seconds"]
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(float(r["test_neg_elbo_nats"]) > 0 for r in rows)

    ckpt = torch.load(vae_run / "checkpoint.pt", weights_only=True)  # plain tensors and containers only
    assert ckpt["kind"] == "vae" and ckpt["epoch"] == 2 and ckpt["step"] == 8
    assert {"model", "optimizer", "rng", "config", "images_in_epoch", "world_size"} <= set(ckpt)
    assert ckpt["config"]["model"] == {
        "hidden": 400, "latent_dim": 20, "conditional": False, "decoder": "bernoulli", "image_size": 28,
        "num_classes": 10,
    }
    assert ckpt["config"]["batch_size"] == 64


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, data_dir, vae_run):
    reference = torch.load(vae_run / "checkpoint.pt", weights_only=True)
    for cut in (4, 6):  # at the end of epoch 1, and in the middle of epoch 2
        out = str(tmp_path / f"cut{cut}")
        train.main(["--out", out, "--data-dir", data_dir, *TINY, "--max-steps", str(cut)])
        assert torch.load(f"{out}/checkpoint.pt", weights_only=True)["step"] == cut
        train.main(["--out", out, "--data-dir", data_dir, "--resume", "--device", "cpu"])
        resumed = torch.load(f"{out}/checkpoint.pt", weights_only=True)
        assert resumed["step"] == 8 and resumed["epoch"] == 2
        for name, tensor in reference["model"].items():
            assert torch.equal(resumed["model"][name], tensor), (cut, name)
        # loss.csv: same epochs and numbers (the cut-short row was replaced)
        rows = losses(tmp_path / f"cut{cut}")
        assert [(r["epoch"], r["test_neg_elbo_nats"]) for r in rows] == [
            (r["epoch"], r["test_neg_elbo_nats"]) for r in losses(vae_run)
        ]


def test_overwrite_replaces_a_run(tmp_path, data_dir):
    out = str(tmp_path / "run")
    args = ["--out", out, "--data-dir", data_dir, "--epochs", "1", "--batch-size", "64", "--device", "cpu"]
    train.main([*args, "--max-steps", "1"])
    train.main([*args, "--overwrite", "--max-steps", "2"])
    assert torch.load(f"{out}/checkpoint.pt", weights_only=True)["step"] == 2


def test_train_refuses_a_non_empty_out(capsys, tmp_path, data_dir):
    (tmp_path / "notes.txt").write_text("mine")
    err = one_line_error(capsys, ["--out", str(tmp_path), "--data-dir", data_dir], train.main)
    assert "not empty" in err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_train_refuses_bad_resume(capsys, tmp_path, data_dir, vae_run):
    argv = ["--out", str(tmp_path / "none"), "--resume", "--data-dir", data_dir]
    err = one_line_error(capsys, argv, train.main)
    assert "checkpoint" in err
    err = one_line_error(capsys, ["--out", str(vae_run), "--resume", "--lr", "0.01"], train.main)
    assert "--lr" in err


@pytest.mark.parametrize("flags", [["--epochs", "0"], ["--batch-size", "-3"], ["--lr", "nan"]])
def test_train_refuses_bad_flags(capsys, tmp_path, flags):
    one_line_error(capsys, ["--out", str(tmp_path / "x"), *flags], train.main)


# ---- sample --------------------------------------------------------------------------------


def test_sample_unconditional(tmp_path, vae_run, data_dir):
    out = tmp_path / "s.npz"
    sample.main(["--run", str(vae_run), "--n", "12", "--out", str(out), "--interpolate", "0,5",
                 "--data-dir", data_dir, "--device", "cpu"])
    with np.load(out) as f:
        assert set(f.files) == {"images"}
        assert f["images"].dtype == np.uint8 and f["images"].shape == (12, 28, 28)
    assert (tmp_path / "s.png").is_file() and (tmp_path / "s_interpolation.png").is_file()
    assert not (tmp_path / "s_manifold.png").exists()  # only for a 2-D latent space


def test_sample_conditional_labels_and_manifold(tmp_path, cvae_run):
    out = tmp_path / "c.npz"
    sample.main(["--run", str(cvae_run), "--n", "7", "--digit", "3", "--out", str(out), "--device", "cpu"])
    with np.load(out) as f:
        assert f["images"].shape == (7, 28, 28)
        assert f["labels"].dtype == np.int64 and (f["labels"] == 3).all()
    assert (tmp_path / "c_manifold.png").is_file()

    sample.main(["--run", str(cvae_run), "--n", "5", "--labels", "1,8", "--out", str(out), "--device", "cpu"])
    with np.load(out) as f:
        assert f["labels"].tolist() == [1, 8, 1, 8, 1]

    sample.main(["--run", str(cvae_run), "--n", "20", "--out", str(out), "--seed", "4", "--device", "cpu"])
    with np.load(out) as f:
        assert f["labels"].tolist() == list(range(10)) * 2  # default: every digit in turn
        first = f["images"].copy()
    sample.main(["--run", str(cvae_run), "--n", "20", "--out", str(out), "--seed", "4", "--device", "cpu"])
    with np.load(out) as f:
        assert np.array_equal(f["images"], first)  # same seed, same samples


def test_sample_default_out_is_in_the_run(vae_run):
    path = sample.main(["--run", str(vae_run), "--n", "3", "--device", "cpu"])
    assert path == vae_run / "samples.npz" and path.is_file()


def test_sample_refuses_bad_input(capsys, tmp_path, vae_run):
    out = ["--out", str(tmp_path / "s.npz")]
    assert "no checkpoint" in one_line_error(capsys, ["--run", str(tmp_path / "missing"), *out], sample.main)

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert "corrupt" in one_line_error(capsys, ["--run", str(corrupt), *out], sample.main)

    ddpm = tmp_path / "ddpm"
    ddpm.mkdir()
    torch.save({"kind": "ddpm", "model": {}}, ddpm / "checkpoint.pt")
    assert "'ddpm'" in one_line_error(capsys, ["--run", str(ddpm), *out], sample.main)

    assert "--digit" in one_line_error(capsys, ["--run", str(vae_run), "--digit", "11", *out], sample.main)
    assert "conditional" in one_line_error(capsys, ["--run", str(vae_run), "--digit", "3", *out], sample.main)
    assert "--n" in one_line_error(capsys, ["--run", str(vae_run), "--n", "0", *out], sample.main)
    assert not (tmp_path / "s.npz").exists()


def test_sample_refuses_bad_interpolation(capsys, tmp_path, vae_run, data_dir):
    argv = ["--run", str(vae_run), "--out", str(tmp_path / "s.npz"), "--data-dir", data_dir]
    assert "indices" in one_line_error(capsys, [*argv, "--interpolate", "5,100000"], sample.main)
    one_line_error(capsys, [*argv, "--interpolate", "5"], sample.main)
