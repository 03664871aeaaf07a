"""Two-process data-parallel training on CPU (gloo), as torchrun would run it."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from common.checkpoint import load_checkpoint, read_csv
from common.data import write_fake_mnist
from ddpm import train as ddpm_train

TINY = ["--base-channels", "8", "--channel-mult", "1,2,2", "--blocks-per-level", "0,1,1",
        "--mid-blocks", "1", "--timesteps", "50", "--batch-size", "16", "--log-every", "1",
        "--warmup-steps", "2", "--device", "cpu"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, argv: list[str], weights_dir: str) -> None:
    """One rank: the environment torchrun would set, then the ordinary entry point."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    model = ddpm_train.main(argv)
    torch.save(model.state_dict(), os.path.join(weights_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    data = str(write_fake_mnist(root / "mnist", n_train=256, n_test=32))
    out = root / "run"
    argv = ["--out", str(out), "--data-dir", data, *TINY, "--epochs", "2", "--max-steps", "6"]
    mp.spawn(_rank, args=(2, free_port(), argv, str(root)), nprocs=2, join=True)
    return root, out, data


def test_both_ranks_end_with_identical_weights(two_rank_run):
    root, _, _ = two_rank_run
    a, b = torch.load(root / "rank0.pt"), torch.load(root / "rank1.pt")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


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
