"""Two-process data-parallel training on CPU (gloo), as torchrun would run it."""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from fake_mnist import write_fake_mnist

from common.checkpoint import load_checkpoint, read_csv
from ddpm import train as ddpm_train
from ddpm.config import DDPMConfig
from vaegen import train as vae_train

TINY = ["--base-channels", "8", "--channel-mult", "1,2,2", "--blocks-per-level", "0,1,1",
        "--mid-blocks", "1", "--timesteps", "50", "--batch-size", "16", "--log-every", "1",
        "--warmup-steps", "2", "--device", "cpu"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_torchrun_rank(rank: int, world: int, port: int) -> None:
    """The environment torchrun gives each of its processes."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)


def _rank(rank: int, world: int, port: int, argv: list[str], weights_dir: str) -> None:
    """One ddpm.train rank: the environment torchrun would set, then the ordinary entry point."""
    as_torchrun_rank(rank, world, port)
    model = ddpm_train.main(argv)
    torch.save(model.state_dict(), os.path.join(weights_dir, f"rank{rank}.pt"))


def _vae_rank(rank: int, world: int, port: int, argv: list[str], weights_dir: str) -> None:
    """One vaegen.train rank. Its main() returns metrics, not the model, so the model is
    caught as it is built, and each rank saves its own final weights."""
    as_torchrun_rank(rank, world, port)
    captured = {}
    original = vae_train.VAE

    class Captured(original):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            captured["model"] = self

    vae_train.VAE = Captured
    try:
        vae_train.main(argv)
    finally:
        vae_train.VAE = original
    torch.save(captured["model"].state_dict(), os.path.join(weights_dir, f"vae_rank{rank}.pt"))


def spawn_two_ranks(root: Path, target, flags: list[str]) -> tuple[Path, Path, str]:
    """Run `target` as ranks 0 and 1 on a tiny synthetic MNIST; (root, run dir, data dir)."""
    data = str(write_fake_mnist(root / "mnist", n_train=256, n_test=32))
    out = root / "run"
    argv = ["--out", str(out), "--data-dir", data, *flags]
    mp.spawn(target, args=(2, free_port(), argv, str(root)), nprocs=2, join=True)
    return root, out, data


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    flags = [*TINY, "--epochs", "2", "--max-steps", "6"]
    return spawn_two_ranks(tmp_path_factory.mktemp("ddp"), _rank, flags)


def assert_ranks_hold_identical_weights(root: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Both ranks' saved weights are equal; returns rank 0's state dict."""
    a, b = torch.load(root / f"{prefix}rank0.pt"), torch.load(root / f"{prefix}rank1.pt")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    return a


def test_both_ranks_end_with_identical_weights(two_rank_run):
    assert_ranks_hold_identical_weights(two_rank_run[0], "")


def test_a_binding_budget_gives_both_ranks_the_same_lr_and_last_step(tmp_path):
    """Rank 0's clock decides the lr (and the stop) on both: their weights stay equal."""
    flags = [*TINY, "--epochs", "1000", "--minutes", "0.1"]  # 6 s: far fewer steps than 1000 epochs
    root, out, _ = spawn_two_ranks(tmp_path, _rank, flags)
    assert_ranks_hold_identical_weights(root, "")
    assert 0 < load_checkpoint(out, "ddpm")["step"] < 1000 * 8
    lrs = [float(r["lr"]) for r in read_csv(out / "loss.csv")]
    assert lrs[-1] < 0.5 * DDPMConfig.lr  # annealed by the budget, not by the steps


def test_run_dir_is_written_once_by_rank_zero(two_rank_run):
    _, out, _ = two_rank_run
    ckpt = load_checkpoint(out, "ddpm")
    assert ckpt["step"] == 6 and ckpt["world_size"] == 2
    steps = [int(r["step"]) for r in read_csv(out / "loss.csv")]
    assert steps == list(range(1, 7))  # one row per step, not one per rank
    assert ckpt["images_in_epoch"] == 6 * 2 * 16  # global batch = per-rank batch x world size


def test_two_rank_run_resumes_with_one_rank(two_rank_run):
    _, out, data = two_rank_run
    ddpm_train.main(["--out", str(out), "--data-dir", data, *TINY, "--epochs", "2", "--resume",
                     "--max-steps", "15"])
    ckpt = load_checkpoint(out, "ddpm")
    # 2 ranks x 16 = 32 images per step, 6 steps: 192 images into epoch 1; with 1 rank (16 per
    # step, 16 steps per epoch) that is step 12, and 3 more steps make 15.
    assert ckpt["world_size"] == 1 and ckpt["step"] == 15


# ----------------------------------------------------------------------------- vaegen.train
VAE_TINY = ["--batch-size", "16", "--device", "cpu", "--latent-dim", "4"]


@pytest.fixture(scope="module")
def two_rank_vae(tmp_path_factory):
    # 256 images / (2 ranks x 16) = 8 steps per epoch: one full epoch, then 3 steps into the next
    flags = [*VAE_TINY, "--epochs", "3", "--max-steps", "11"]
    return spawn_two_ranks(tmp_path_factory.mktemp("ddp_vae"), _vae_rank, flags)


def test_vae_ranks_end_with_identical_weights_and_one_run_dir(two_rank_vae):
    root, out, _ = two_rank_vae
    rank0 = assert_ranks_hold_identical_weights(root, "vae_")
    ckpt = load_checkpoint(out, "vae")
    assert ckpt["world_size"] == 2 and ckpt["step"] == 11 and ckpt["epoch"] == 1
    for name, value in ckpt["model"].items():  # the checkpoint holds the unwrapped model
        assert torch.equal(value, rank0[name]), name
    assert [int(r["epoch"]) for r in read_csv(out / "loss.csv")] == [1, 2]  # one row per epoch, not per rank
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["epoch_001.png", "epoch_002.png"]


def test_vae_two_rank_run_resumes_with_one_rank(two_rank_vae):
    _, out, data = two_rank_vae
    vae_train.main(["--out", str(out), "--data-dir", data, *VAE_TINY, "--epochs", "3", "--resume"])
    ckpt = load_checkpoint(out, "vae")
    # 3 steps x 32 images = 96 images into epoch 2; with one rank (16 per step, 16 steps per
    # epoch) that is step 16 + 6, and the run ends after epoch 3 at step 48.
    assert ckpt["world_size"] == 1 and ckpt["epoch"] == 3 and ckpt["step"] == 48
    assert [int(r["epoch"]) for r in read_csv(out / "loss.csv")] == [1, 2, 3]
