"""Behaviour of `ddpm.train` and `ddpm.sample` on a tiny synthetic MNIST."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_mnist import write_fake_mnist

from common.checkpoint import load_checkpoint, save_checkpoint
from common.ema import make_ema
from common.runtime import count_params
from common.training import lr_factor
from ddpm import bench as ddpm_bench
from ddpm import sample as ddpm_sample
from ddpm import train as ddpm_train
from ddpm.config import DDPMConfig, VPrediction, build_model, load_model
from ddpm.diffusion import GaussianDiffusion
from ddpm.samplers import SamplerSpec
from ddpm.train import TrainState, train_step
from ddpm.unet import UNet, UNetConfig

REPO = Path(__file__).resolve().parents[1]
TINY = [
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
]  # 256 images: 8 steps/epoch


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(write_fake_mnist(tmp_path_factory.mktemp("mnist"), n_train=256, n_test=64))


def train(out, data_dir, *extra):
    ddpm_train.main(["--out", str(out), "--data-dir", data_dir, *TINY, *extra])


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("runs") / "ddpm"
    train(out, data_dir, "--epochs", "1")
    return out


def test_train_writes_every_file(run):
    for name in ("config.json", "checkpoint.pt", "loss.csv", "loss.png", "samples/epoch_001.png"):
        assert (run / name).is_file(), name
    header = (run / "loss.csv").read_text().splitlines()[0]
    assert header == "step,loss,lr,img_per_s"
    ckpt = load_checkpoint(run, "ddpm")
    assert ckpt["step"] == 8 and ckpt["epoch"] == 1
    assert {"model", "ema", "optimizer", "rng", "config"} <= ckpt.keys()


def test_resume_gives_identical_weights(tmp_path, data_dir):
    straight, split = tmp_path / "straight", tmp_path / "split"
    # With the default 30-minute budget, which a run this small does not reach: it must then
    # leave the schedule, and so the weights, exactly as the steps alone would.
    train(straight, data_dir, "--epochs", "2")
    train(split, data_dir, "--epochs", "2", "--max-steps", "8")
    assert load_checkpoint(split, "ddpm")["step"] == 8
    train(split, data_dir, "--epochs", "2", "--resume")
    a, b = load_checkpoint(straight, "ddpm"), load_checkpoint(split, "ddpm")
    assert a["step"] == b["step"] == 16
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    steps = [int(line.split(",")[0]) for line in (split / "loss.csv").read_text().splitlines()[1:]]
    assert steps == sorted(set(steps))  # resuming does not duplicate rows


def test_a_short_chain_trains_and_draws_its_grid(tmp_path, data_dir):
    # T = 10 is shorter than the 50-step grids drawn during training: they take all 10 steps
    out = tmp_path / "short"
    train(out, data_dir, "--epochs", "1", "--timesteps", "10")
    assert (out / "samples" / "epoch_001.png").is_file()
    with pytest.raises(SystemExit) as e:
        train(tmp_path / "one", data_dir, "--timesteps", "1")
    assert e.value.code == 2


def test_a_v_prediction_run_trains_samples_and_keeps_its_parameterization(tmp_path, data_dir):
    out = tmp_path / "v"
    train(out, data_dir, "--epochs", "1", "--max-steps", "3")  # v is the default
    model, diffusion, ckpt = load_model(out, torch.device("cpu"))
    assert isinstance(model, VPrediction) and ckpt["config"]["prediction"] == "v"
    train(tmp_path / "eps", data_dir, "--epochs", "1", "--max-steps", "1", "--prediction", "eps")
    assert type(load_model(tmp_path / "eps", torch.device("cpu"))[0]) is UNet
    xt, t, y = torch.randn(4, 1, 28, 28), torch.randint(0, diffusion.T, (4,)), torch.arange(4)
    with torch.no_grad():  # what every sampler sees is eps, from the UNet's v
        assert torch.allclose(model(xt, t, y), diffusion.eps_from_v(xt, t, model.unet(xt, t, y)))
    sample(out, "--n", "10", "--steps", "3", "--out", str(tmp_path / "v.npz"))
    assert (tmp_path / "v.npz").is_file()
    train(out, data_dir, "--epochs", "1", "--resume", "--max-steps", "4")  # resumed as what it was
    assert isinstance(load_model(out, torch.device("cpu"))[0], VPrediction)


def test_resume_with_dropout_is_exact(tmp_path, data_dir):
    # Dropout draws from the global RNG in training; the sample grids (at each epoch's end, after
    # the checkpoint, and every 3 steps) run in eval mode from their own generator, so they must
    # not move it: a resumed run continues exactly.
    straight, split = tmp_path / "straight", tmp_path / "split"
    flags = ["--epochs", "2", "--dropout", "0.1", "--sample-every", "3"]
    train(straight, data_dir, *flags)
    train(split, data_dir, *flags, "--max-steps", "8")
    train(split, data_dir, *flags, "--resume")
    a, b = load_checkpoint(straight, "ddpm"), load_checkpoint(split, "ddpm")
    assert a["step"] == b["step"] == 16
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


def test_lr_schedule_shortens_to_what_the_budget_allows():
    f = lr_factor
    assert f(0, 10, 110) == pytest.approx(0.1) and f(9, 10, 110) == pytest.approx(1.0)
    assert f(10, 10, 110) == pytest.approx(1.0)  # no time used: the step schedule
    assert f(60, 10, 110) == pytest.approx(0.5)  # half the post-warm-up steps
    # 60 steps in 25 % of the budget: 240 would fit, more than 110, so the step schedule holds
    assert f(60, 10, 110, time_frac=0.25) == f(60, 10, 110)
    # 60 steps in 55 % of it: about 109 fit, so the schedule is that long
    assert f(60, 10, 110, time_frac=0.55) == pytest.approx(f(60, 10, 60 / 0.55))
    assert f(60, 10, 110, time_frac=0.55) < f(60, 10, 110)
    assert f(60, 10, 110, time_frac=1.0) == pytest.approx(0.0, abs=1e-12)  # budget spent: lr 0
    assert f(5, 10, 110, time_frac=0.9) == pytest.approx(0.6)  # warm-up is by steps only


def test_minutes_budget_anneals_the_lr_and_ends_on_a_checkpoint(tmp_path, data_dir, capsys, monkeypatch):
    out = tmp_path / "budget"
    # A simulated clock that moves 0.2 s each time it is read: the 12 s budget then lasts a few
    # dozen steps however busy the machine is.
    now = [0.0]

    def clock() -> float:
        now[0] += 0.2
        return now[0]

    monkeypatch.setattr(time, "perf_counter", clock)
    train(out, data_dir, "--epochs", "1000", "--minutes", "0.2", "--log-every", "1")
    printed = capsys.readouterr().out
    assert "--minutes 0.2 budget reached" in printed
    ckpt = load_checkpoint(out, "ddpm")
    assert 0 < ckpt["step"] < 8000 and ckpt["seconds"] >= 12.0
    assert (out / "samples" / f"step_{ckpt['step']:06d}.png").is_file()  # the final model's grid
    lrs = [float(line.split(",")[2]) for line in (out / "loss.csv").read_text().splitlines()[1:]]
    peak = DDPMConfig.lr
    # By steps alone the lr would still be ~peak (a few dozen of 8000 steps); by time it decays.
    assert lrs[-1] < 0.5 * peak
    assert lrs[-1] < lrs[len(lrs) // 2] < lrs[1]  # warm-up ended at row 2 (index 1)
    # The budget is the run's, not the session's: resuming a spent run asks for more minutes.
    with pytest.raises(SystemExit) as e:
        train(out, data_dir, "--epochs", "1000", "--minutes", "0.2", "--resume")
    assert e.value.code == 2 and "budget" in capsys.readouterr().err
    train(
        out, data_dir, "--epochs", "1000", "--minutes", "0", "--resume", "--max-steps", str(ckpt["step"] + 2)
    )
    assert load_checkpoint(out, "ddpm")["step"] == ckpt["step"] + 2


def test_resume_with_another_unet_is_refused(tmp_path, data_dir, capsys):
    out = tmp_path / "other"
    train(out, data_dir, "--epochs", "2", "--max-steps", "2")
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit) as e:
        train(out, data_dir, "--epochs", "2", "--resume", "--no-adaptive-norm")
    assert e.value.code == 2
    assert "--adaptive-norm" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before


def test_resume_counts_a_flag_given_at_its_default_value(tmp_path, data_dir, capsys):
    # --prediction v and --epochs 6 are the defaults, and given they are still given: a resumed eps
    # run refuses the first (it does not silently stay eps) and extends its 1 epoch to the second
    out = tmp_path / "eps"
    train(out, data_dir, "--epochs", "1", "--prediction", "eps")
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit) as e:
        train(out, data_dir, "--resume", "--prediction", "v")
    assert e.value.code == 2 and "--prediction eps" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before
    train(out, data_dir, "--resume", "--epochs", "6", "--max-steps", "10")
    ckpt = load_checkpoint(out, "ddpm")
    assert ckpt["step"] == 10 and ckpt["config"]["epochs"] == 6 and ckpt["config"]["prediction"] == "eps"


@pytest.mark.parametrize("counts", ["0,100", "200,100", "100,100", "1e5"])
def test_snapshot_counts_must_be_increasing_positive_integers(tmp_path, data_dir, capsys, counts):
    with pytest.raises(SystemExit) as e:
        train(tmp_path / "s", data_dir, "--snapshots", counts)
    assert e.value.code == 2 and "--snapshots" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_non_empty_out_is_refused(run, data_dir, capsys):
    before = (run / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit) as e:
        train(run, data_dir, "--epochs", "1")
    assert e.value.code == 2
    assert "not empty" in capsys.readouterr().err
    assert (run / "checkpoint.pt").read_bytes() == before


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, data_dir, monkeypatch, capsys):
    out = tmp_path / "nan"
    train(out, data_dir, "--epochs", "1")
    before = (out / "checkpoint.pt").read_bytes()
    nan_loss = lambda self, eps_pred, *a: eps_pred.mean((1, 2, 3)) * math.nan  # noqa: E731
    monkeypatch.setattr(GaussianDiffusion, "eps_loss", nan_loss)
    with pytest.raises(SystemExit) as e:
        train(out, data_dir, "--epochs", "2", "--resume")
    assert e.value.code == 2
    assert "loss became nan" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before


def test_sigterm_leaves_a_loadable_checkpoint_that_resumes(tmp_path, data_dir):
    out = tmp_path / "term"
    cmd = [
        sys.executable,
        "-m",
        "ddpm.train",
        "--out",
        str(out),
        "--data-dir",
        data_dir,
        *TINY,
        "--epochs",
        "1000",
        "--log-every",
        "1",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (out / "loss.csv").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "stopped by SIGTERM" in output
    step = load_checkpoint(out, "ddpm")["step"]
    assert 0 < step < 8000
    train(out, data_dir, "--epochs", "1000", "--resume", "--max-steps", str(step + 3))
    assert load_checkpoint(out, "ddpm")["step"] == step + 3


def sample(run, *extra):
    ddpm_sample.main(["--run", str(run), "--device", "cpu", *extra])


def test_sample_writes_the_shared_format(run, tmp_path):
    out = tmp_path / "s.npz"
    sample(run, "--n", "20", "--steps", "5", "--out", str(out), "--trajectory")
    with np.load(out) as f:
        assert f["images"].dtype == np.uint8 and f["images"].shape == (20, 28, 28)
        assert f["labels"].dtype == np.int64 and sorted(f["labels"].tolist()) == sorted(list(range(10)) * 2)
    assert out.with_suffix(".png").is_file()
    assert (tmp_path / "s_trajectory.png").is_file()
    sample(run, "--n", "6", "--labels", "4,2", "--steps", "5", "--out", str(tmp_path / "l.npz"))
    with np.load(tmp_path / "l.npz") as f:
        assert f["labels"].tolist() == [4, 2, 4, 2, 4, 2]


def test_sample_is_reproducible_and_uses_the_ema(run, tmp_path):
    sample(run, "--n", "10", "--steps", "5", "--out", str(tmp_path / "a.npz"))
    sample(run, "--n", "10", "--steps", "5", "--out", str(tmp_path / "b.npz"))
    assert np.array_equal(np.load(tmp_path / "a.npz")["images"], np.load(tmp_path / "b.npz")["images"])
    # guidance in an interval holding every step's noise level draws what plain guidance draws
    sample(run, "--n", "10", "--steps", "5", "--guidance-interval", "all", "--out", str(tmp_path / "p.npz"))
    sample(run, "--n", "10", "--steps", "5", "--guidance-interval", "0,1e9", "--out", str(tmp_path / "c.npz"))
    assert np.array_equal(np.load(tmp_path / "p.npz")["images"], np.load(tmp_path / "c.npz")["images"])
    # even spacing visits other steps than the default Karras spacing, from the same noise
    sample(run, "--n", "10", "--steps", "5", "--spacing", "uniform", "--out", str(tmp_path / "d.npz"))
    assert not np.array_equal(np.load(tmp_path / "a.npz")["images"], np.load(tmp_path / "d.npz")["images"])
    model, _, ckpt = load_model(run, torch.device("cpu"))
    for name, value in model.state_dict().items():  # checkpoint round trip: the EMA weights
        assert torch.equal(value, ckpt["ema"][name])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--digit", "11"], "a digit 0-9"),
        (["--steps", "0"], "an integer >= 1"),
        (["--steps", "51"], "more than the model's T = 50"),
        (["--guidance", "-1"], "a finite number >= 0"),
        (["--guidance", "inf"], "a finite number >= 0"),
        (["--eta", "1.5"], "a number in [0, 1]"),
        (["--n", "0"], "an integer >= 1"),
        (["--guidance-interval", "3,1"], "expected 0 <= LO < HI"),
        (["--guidance-interval", "1"], "expected LO,HI"),
        (["--spacing", "log"], "invalid choice"),
        (["--sigma-min", "-1"], "a finite number >= 0"),
        (["--steps", "45", "--sigma-min", "1"], "leaves fewer than 45 steps"),
    ],
)
def test_sample_bad_flags(run, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        sample(run, "--out", str(tmp_path / "x.npz"), *args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.npz").exists()


def test_sample_bad_runs(tmp_path, run, capsys):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "checkpoint.pt").write_bytes(os.urandom(1000))
    vae = tmp_path / "vae"
    vae.mkdir()
    save_checkpoint(vae / "checkpoint.pt", {"kind": "vae", "model": {}})
    existing = tmp_path / "exists.npz"
    existing.write_bytes(b"precious")
    cases = [
        (["--run", str(tmp_path / "missing")], "does not exist"),
        (["--run", str(tmp_path)], "has no checkpoint.pt"),
        (["--run", str(corrupt)], "not a readable checkpoint"),
        (["--run", str(vae)], "is a 'vae' checkpoint"),
        (["--run", str(run), "--out", str(existing)], "exists"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            ddpm_sample.main(["--device", "cpu", "--out", str(tmp_path / "o.npz"), *args])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert existing.read_bytes() == b"precious"


def test_bench_prints_one_json_line_for_the_default_unet(capsys):
    ddpm_bench.main(["--steps", "1", "--batch", "8"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    r = json.loads(lines[0])
    assert r["params"] == count_params(UNet(UNetConfig())) and r["batch"] == 8
    assert 0.05 < r["gflop_per_image"] < 1.0  # the default UNet costs 0.17 GFLOP per image
    assert r["train_img_per_s"] > 0 and r["sample_ms_per_step"] > 0 and r["sample_100_digits_s"] > 0
    assert r["sample_setting"] == SamplerSpec().label and r["sample_passes"] == 14  # 10 steps, 4 guided


def test_lognormal_noise_levels_train_at_the_drawn_steps(tmp_path, data_dir):
    """--noise-levels lognormal: the run records it, and `train_step` draws t from P(t) (here a
    point mass, so every t the UNet sees is that step); old configs without the field are uniform."""
    out = tmp_path / "ln"
    train(out, data_dir, "--epochs", "1", "--max-steps", "2", "--noise-levels", "lognormal", "--p-mean", "-1")
    cfg = DDPMConfig.from_dict(load_checkpoint(out, "ddpm")["config"])
    assert (cfg.noise_levels, cfg.p_mean, cfg.p_std) == ("lognormal", -1.0, 1.2)
    old = {k: v for k, v in asdict(cfg).items() if k != "noise_levels"}
    assert DDPMConfig.from_dict(old).noise_levels == "uniform"

    model, diffusion = build_model(DDPMConfig(unet=cfg.unet))
    seen = []
    model.register_forward_hook(lambda m, args, out: seen.append(args[1]))
    probs = torch.zeros(diffusion.T)
    probs[123] = 1.0
    opt = torch.optim.AdamW(model.parameters())
    state = TrainState(model, model, make_ema(model, 0.9), opt, diffusion, probs)
    train_step(state, torch.rand(8, 1, 28, 28) * 2 - 1, torch.arange(8), 1e-3, 0.1, 5.0, 1.0)
    assert torch.equal(seen[0], torch.full((8,), 123))
