"""vaegen.evaluate, ddpm.evaluate and common.compare end to end on tiny runs trained on a tiny
synthetic MNIST, scored by a tiny judge trained here (never real MNIST, never a cached judge)."""

import ast
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_mnist import write_fake_mnist

from common import compare
from common.figures import frontier_curves
from common.judge import JudgeConfig, train_classifier
from ddpm import curve as ddpm_curve
from ddpm import evaluate as ddpm_evaluate
from ddpm import train as ddpm_train
from vaegen import evaluate as vae_evaluate
from vaegen import train as vae_train

REPO = Path(__file__).resolve().parents[1]
TINY_JUDGE = JudgeConfig(channels=(4, 8), features=16, epochs=3, batch_size=32, augment=False)
TINY_VAE = ["--epochs", "1", "--batch-size", "64", "--device", "cpu"]
TINY_DDPM = [
    "--base-channels", "8", "--channel-mult", "1,2,2", "--blocks-per-level", "0,1,1", "--mid-blocks", "1",
    "--dropout", "0", "--timesteps", "50", "--batch-size", "32", "--log-every", "2", "--warmup-steps", "2",
    "--device", "cpu", "--epochs", "1",
]  # fmt: skip

SAMPLE_KEYS = {
    "n", "fd", "fd_floor", "fd_floor_std", "fd_floor_n", "fd_ratio", "k", "precision", "recall",
    "precision_floor", "recall_floor", "class_histogram", "class_entropy_bits", "judge_confidence",
    "memorization",
}  # fmt: skip
CONDITIONAL_KEYS = {"accuracy", "accuracy_per_digit", "precision_per_digit", "recall_per_digit"}
TOP_KEYS = {"model", "run", "command", "conditional", "params", "train", "likelihood", "sampling",
            "samples_file", "samples", "judge", "curve", "eval_seconds"}  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(write_fake_mnist(tmp_path_factory.mktemp("mnist"), n_train=256, n_test=64))


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("judge")
    train_classifier(out, data_dir, TINY_JUDGE, log=lambda *a, **k: None)
    return str(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir, judge_dir):
    """Three tiny runs, each trained and evaluated: vae, cvae, ddpm."""
    root = tmp_path_factory.mktemp("runs")
    common = ["--classifier", judge_dir, "--data-dir", data_dir]
    vae_train.main(["--out", str(root / "vae"), "--data-dir", data_dir, *TINY_VAE])
    vae_train.main(["--out", str(root / "cvae"), "--data-dir", data_dir, "--conditional", *TINY_VAE])
    ddpm_train.main(["--out", str(root / "ddpm"), "--data-dir", data_dir, *TINY_DDPM])
    vae_evaluate.main(["--run", str(root / "vae"), "--n", "30", "--iwae-k", "10", "--device", "cpu", *common])
    vae_evaluate.main(
        ["--run", str(root / "cvae"), "--n", "50", "--iwae-k", "10", "--device", "cpu", *common]
    )
    ddpm_evaluate.main(
        ["--run", str(root / "ddpm"), "--guidance", "0,2", "--samplers", "ddpm,ddim5", "--n", "20",
         "--n-ddpm", "10", "--vlb-n", "4", "--batch-size", "10", "--device", "cpu", *common]
    )  # fmt: skip
    return root


def read(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def test_vae_metrics_json(runs):
    m = read(runs / "vae")
    assert TOP_KEYS <= m.keys() and m["model"] == "vae" and not m["conditional"]
    assert SAMPLE_KEYS <= m["samples"].keys() and m["samples"]["n"] == 30
    assert not CONDITIONAL_KEYS & m["samples"].keys()  # unconditional: histogram and entropy only
    lik = m["likelihood"]
    for key in (
        "neg_elbo_nats",
        "neg_elbo_bits_per_dim",
        "neg_iwae_nats",
        "neg_iwae_bits_per_dim",
        "kl_nats",
    ):
        assert np.isfinite(lik[key]), key
    assert lik["test_n"] == 64 and lik["iwae_k"] == 10
    assert lik["neg_iwae_bits_per_dim"] == pytest.approx(lik["neg_iwae_nats"] / (784 * np.log(2)))
    assert m["train"]["images_seen"] == 4 * 64 and m["train"]["seconds"] > 0
    assert m["sampling"]["seconds_per_100"] > 0 and m["params"] > 0
    with np.load(runs / "vae" / "samples.npz") as f:
        assert f["images"].shape == (30, 28, 28) and "labels" not in f


def test_cvae_metrics_json(runs):
    m = read(runs / "cvae")
    assert m["model"] == "cvae" and m["conditional"]
    assert (SAMPLE_KEYS | CONDITIONAL_KEYS) <= m["samples"].keys()
    assert len(m["samples"]["recall_per_digit"]) == 10 and 0 <= m["samples"]["accuracy"] <= 1
    with np.load(runs / "cvae" / "samples.npz") as f:
        assert np.bincount(f["labels"]).tolist() == [5] * 10


def test_ddpm_metrics_json(runs):
    m = read(runs / "ddpm")
    assert TOP_KEYS | {"settings", "best", "best_rule", "T", "goal_met_by"} <= m.keys()
    names = [s["name"] for s in m["settings"]]
    assert names == ["ddpm50_w0", "ddpm50_w2", "ddim5_w0", "ddim5_w2"]
    assert [s["n"] for s in m["settings"]] == [10, 10, 20, 20]  # full-length sampler: --n-ddpm
    for s in m["settings"]:
        assert (SAMPLE_KEYS | CONDITIONAL_KEYS) <= s["metrics"].keys()
        assert s["seconds_per_100"] > 0 and (runs / "ddpm" / s["samples_file"]).is_file()
    assert (
        m["best"] in names
        and m["samples"] == next(s for s in m["settings"] if s["name"] == m["best"])["metrics"]
    )
    lik = m["likelihood"]
    assert lik["test_n"] == 4
    total = lik["prior_bits_per_dim"] + lik["terms_bits_per_dim"] + lik["decoder_bits_per_dim"]
    assert lik["bits_per_dim"] == pytest.approx(total, rel=1e-6)
    assert m["train"]["images_seen"] == 8 * 32 and m["train"]["seconds"] > 0
    assert (runs / "ddpm" / "frontier.png").is_file() and (runs / "ddpm" / "samples.npz").is_file()


def test_sigma_min_ends_the_short_samplers_but_not_the_full_length_one(runs, judge_dir, data_dir, tmp_path):
    run = tmp_path / "ddpm"
    run.mkdir()
    for f in ("checkpoint.pt", "config.json"):
        shutil.copy(runs / "ddpm" / f, run / f)
    ddpm_evaluate.main(
        ["--run", str(run), "--guidance", "0", "--samplers", "ddpm,ddim5", "--sigma-min", "0.3", "--n", "10",
         "--n-ddpm", "10", "--vlb-n", "0", "--batch-size", "10", "--device", "cpu",
         "--classifier", str(judge_dir), "--data-dir", data_dir]
    )  # fmt: skip
    settings = read(run)["settings"]
    assert [(s["name"], s["spec"]["sigma_min"]) for s in settings] == [
        ("ddpm50_w0", None),
        ("ddim5_w0_smin0.3", 0.3),
    ]


def test_every_metrics_key_is_in_the_reference(runs):
    """Each key the evaluate commands write (any depth) is named in docs/reference.md as `key`."""

    def keys(obj, found):
        if isinstance(obj, dict):
            for key, value in obj.items():
                found.add(key)
                keys(value, found)
        elif isinstance(obj, list):
            for value in obj:
                keys(value, found)
        return found

    found = set()
    for name in ("vae", "cvae", "ddpm"):
        keys(read(runs / name), found)
    reference = (REPO / "docs" / "reference.md").read_text()
    missing = sorted(k for k in found if f"`{k}`" not in reference)
    assert not missing, f"metrics.json keys not documented in docs/reference.md: {missing}"


def test_compare_writes_report_and_figures(runs, data_dir, judge_dir, tmp_path):
    out = tmp_path / "compare"
    compare.main([str(runs / r) for r in ("vae", "cvae", "ddpm")]
                 + ["--out", str(out), "--data-dir", data_dir, "--classifier", judge_dir])  # fmt: skip
    report = (out / "report.md").read_text()
    for name in ("grid_vae.png", "grid_cvae.png", "grid_ddpm.png", "curves.png", "steps.png", "frontier.png",
                 "nearest.png"):  # fmt: skip
        assert (out / name).is_file(), name
        assert f"]({name})" in report, name
    assert "| MNIST-FD | floor |" in report
    labels = [f"{name}, {n} steps, w = {w}" for name, n in (("DDPM", 50), ("DDIM", 5)) for w in (0, 2)]
    for setting in (*labels, "decoder (1 pass)"):
        assert setting in report, setting
    assert "## Likelihood bounds" in report and "VLB" in report and "IWAE" in report


def test_compare_on_two_runs_without_data(runs, tmp_path, capsys):
    out = tmp_path / "two"
    compare.main(
        [str(runs / "vae"), str(runs / "ddpm"), "--out", str(out), "--data-dir", str(tmp_path / "none")]
    )
    assert (out / "report.md").is_file() and not (out / "nearest.png").exists()
    assert "nearest-neighbour figure skipped" in capsys.readouterr().err


def one_line_error(capsys, main, argv) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_input_is_one_line_exit_2(runs, tmp_path, capsys):
    assert "no metrics.json" in one_line_error(
        capsys, compare.main, [str(tmp_path), "--out", str(tmp_path / "o")]
    )
    assert "'vae' checkpoint" in one_line_error(capsys, ddpm_evaluate.main, ["--run", str(runs / "vae")])
    assert "'ddpm' checkpoint" in one_line_error(capsys, vae_evaluate.main, ["--run", str(runs / "ddpm")])
    assert "not a run directory" in one_line_error(capsys, vae_evaluate.main, ["--run", str(tmp_path / "no")])
    err = one_line_error(capsys, ddpm_evaluate.main, ["--run", str(runs / "ddpm"), "--samplers", "plms10"])
    assert "expected samplers" in err
    err = one_line_error(capsys, ddpm_evaluate.main, ["--run", str(runs / "ddpm"), "--samplers", "ddim100"])
    assert "T = 50" in err


def test_common_never_imports_a_model_package():
    for path in (REPO / "common").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] in ("vaegen", "ddpm") for n in names), path


def test_old_metrics_json_settings_keep_their_samplers_apart():
    # metrics.json written before settings recorded their method: what it did record still tells
    # an evenly spaced DPM2M 10 from a Karras-spaced one ending at sigma 0.1 with an interval
    old = {"name": "dpm2m10_w0.5", "sampler": "dpm2m", "steps": 10, "guidance": 0.5, "spacing": "uniform"}
    karras = {**old, "name": "dpm2m10_w0.5_karras_smin0.1", "spacing": "karras", "sigma_min": 0.1,
              "guidance_interval": [0.28, 5.42]}  # fmt: skip
    methods = [s["method"] for s in compare.settings_of({"settings": [old, karras]})]
    assert methods == ["DPM2M", "DPM2M, Karras spacing, to sigma 0.1, guided in sigma (0.28, 5.42]"]


def test_frontier_never_joins_two_models_in_one_curve():
    def setting(w, fd, run=None):
        scores = {"accuracy": 0.99, "fd_ratio": fd}
        s = {"method": "DPM-Solver++(2M)", "steps": 10, "guidance": w, "metrics": scores}
        return {**s, "run": run} if run else s

    one_model = frontier_curves([setting(1, 2.0), setting(0.5, 1.5)])
    assert list(one_model) == ["DPM-Solver++(2M), 10 steps"]
    assert [s["guidance"] for s in one_model["DPM-Solver++(2M), 10 steps"]] == [0.5, 1]  # sorted by w
    two_models = frontier_curves([setting(0.5, 1.5, "ddpm"), setting(0.5, 1.2, "ddpm_6ep")])
    assert sorted(two_models) == ["ddpm: DPM-Solver++(2M), 10 steps", "ddpm_6ep: DPM-Solver++(2M), 10 steps"]


def test_snapshots_are_the_weights_at_their_image_count_and_curve_scores_each_once(
    tmp_path, data_dir, judge_dir, monkeypatch, capsys
):
    run = tmp_path / "snap"
    # 256 images per epoch in batches of 32: 64 images are seen after step 2, 160 after step 5.
    fixed = ["--data-dir", data_dir, *TINY_DDPM, "--minutes", "0"]  # the lr by steps, not the clock
    ddpm_train.main(["--out", str(run), *fixed, "--snapshots", "64,160"])
    snap = torch.load(run / "snapshots" / "images_0000064.pt", weights_only=True)
    assert (snap["step"], snap["images"]) == (2, 64)
    # The same run stopped after 2 steps (--max-steps leaves the lr schedule as it is) has the
    # snapshot's weights, raw and EMA, exactly.
    ddpm_train.main(["--out", str(tmp_path / "two"), *fixed, "--max-steps", "2"])
    two = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    for key in ("model", "ema"):
        assert all(torch.equal(snap[key][k], two[key][k]) for k in two[key])

    args = ["--runs", str(run), "--n", "20", "--steps", "3", "--batch-size", "10", "--classifier", judge_dir,
            "--data-dir", data_dir, "--device", "cpu", "--out", str(tmp_path / "q.png")]  # fmt: skip
    (_, points), = ddpm_curve.main(args)
    assert [p["images"] for p in points] == [64, 160, 256]  # the two snapshots, then the final model
    assert [p["file"] for p in points] == ["snapshots/images_0000064.pt", "snapshots/images_0000160.pt",
                                           "checkpoint.pt"]  # fmt: skip
    assert all(p["metrics"]["n"] == 20 and 0 <= p["metrics"]["accuracy"] <= 1 for p in points)
    assert (tmp_path / "q.png").stat().st_size > 0

    # Scored points are read back from curve.json, not drawn again; another seed is new points.
    monkeypatch.setattr(ddpm_curve, "generate", lambda *a, **k: pytest.fail("drew samples again"))
    assert ddpm_curve.main(args)[0][1] == points
    monkeypatch.undo()
    ddpm_curve.main([*args, "--seed", "1"])
    assert len(json.loads((run / "curve.json").read_text())["points"]) == 6

    with pytest.raises(SystemExit) as e:
        ddpm_curve.main(["--runs", str(tmp_path)])  # a folder, but not a run
    assert e.value.code == 2 and "no checkpoint.pt" in capsys.readouterr().err
