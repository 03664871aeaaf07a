"""common.data: IDX round trip, resize, batching, search order, missing-data errors."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
from fake_mnist import write_fake_mnist

from common import data
from common.cli import UserError, user_errors
from common.data import (
    RAW_FILES,
    batch_indices,
    candidate_dirs,
    find_mnist,
    load_mnist,
    signed_to_uint8,
    to_signed,
    to_unit,
    unit_to_uint8,
    write_idx,
)


@pytest.fixture(autouse=True)
def _no_mnist_env(monkeypatch, tmp_path):
    """Every test starts with $MNIST_DIR unset and an empty cwd (so ./data is absent)."""
    monkeypatch.delenv("MNIST_DIR", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)


@pytest.fixture
def offline(monkeypatch):
    """Make torchvision's MNIST download fail as it does without network, whatever the machine."""
    import torchvision.datasets.mnist as tv_mnist

    calls = []

    def fail(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError("network is unreachable (simulated)")

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", fail)
    return calls


def _random_split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
    images[0] = 0  # make sure both extremes are present
    images[1] = 255
    labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
    return images, labels


def _write_split_files(root: Path, train, test) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, (images, labels) in (("train", train), ("t10k", test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


# ---------------------------------------------------------------- IDX files and the loader


def test_write_idx_header_is_mnist_format(tmp_path):
    images = torch.arange(2 * 3 * 5, dtype=torch.uint8).reshape(2, 3, 5)
    write_idx(tmp_path / "x", images)
    raw = (tmp_path / "x").read_bytes()
    assert raw[:4] == bytes([0, 0, 0x08, 3])  # magic: uint8 data, 3 dims
    assert [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(3)] == [2, 3, 5]
    assert raw[16:] == bytes(range(30))


def test_loader_round_trips_pixels_and_labels_exactly(tmp_path):
    train, test = _random_split(37, seed=1), _random_split(11, seed=2)
    root = _write_split_files(tmp_path / "mnist", train, test)

    for is_train, (images, labels) in ((True, train), (False, test)):
        x, y = load_mnist(train=is_train, data_dir=root, download=False)
        assert x.dtype == torch.uint8 and x.shape == (len(images), 1, 28, 28)
        assert y.dtype == torch.int64 and y.shape == (len(labels),)
        assert torch.equal(x[:, 0], images)
        assert torch.equal(y, labels.long())


def test_write_fake_mnist_is_readable_and_label_coded(tmp_path):
    root = write_fake_mnist(tmp_path / "fake", n_train=30, n_test=12, seed=5)
    x, y = load_mnist(train=True, data_dir=root, download=False)
    xt, yt = load_mnist(train=False, data_dir=root, download=False)
    assert x.shape == (30, 1, 28, 28) and xt.shape == (12, 1, 28, 28)
    assert torch.equal(y, torch.arange(30) % 10) and torch.equal(yt, torch.arange(12) % 10)
    for img, label in zip(x[:, 0], y.tolist(), strict=True):  # the bright bar encodes the digit
        bar = (img[:, 6:22] == 255).all(dim=1).nonzero().flatten().tolist()
        assert bar == [4 + 2 * label, 5 + 2 * label]
    # same seed, same data; other seed, other noise
    again = write_fake_mnist(tmp_path / "again", n_train=30, n_test=12, seed=5)
    other = write_fake_mnist(tmp_path / "other", n_train=30, n_test=12, seed=6)
    assert torch.equal(load_mnist(True, again, download=False)[0], x)
    assert not torch.equal(load_mnist(True, other, download=False)[0], x)


def test_load_mnist_resizes(tmp_path):
    train = _random_split(6, seed=3)
    train[0][2] = 77  # a constant image stays constant through an antialiased resize
    root = _write_split_files(tmp_path / "mnist", train, _random_split(4, seed=4))

    full, _ = load_mnist(True, root, image_size=28, download=False)
    for size in (14, 32):
        x, y = load_mnist(True, root, image_size=size, download=False)
        assert x.dtype == torch.uint8 and x.shape == (6, 1, size, size)
        assert torch.equal(y, train[1].long())
        assert (x[0] == 0).all() and (x[1] == 255).all() and (x[2] == 77).all()
        # resizing preserves the mean brightness of each image (up to interpolation/rounding)
        assert torch.allclose(x.float().mean((1, 2, 3)), full.float().mean((1, 2, 3)), atol=3.0)
    assert torch.equal(full[:, 0], train[0])


def test_corrupt_mnist_files_are_a_user_error(tmp_path):
    root = _write_split_files(tmp_path / "mnist", _random_split(5, 0), _random_split(5, 1))
    img = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    img.write_bytes(img.read_bytes()[:100])  # truncated
    with pytest.raises(UserError, match="could not read MNIST"):
        load_mnist(True, root, download=False)


# ---------------------------------------------------------------- batching


def test_batch_indices_cover_each_index_once_per_epoch():
    n, bs = 103, 10
    batches = list(batch_indices(n, bs, seed=0, epoch=0, drop_last=False))
    assert [len(b) for b in batches] == [10] * 10 + [3]
    assert torch.equal(torch.cat(batches).sort().values, torch.arange(n))

    dropped = list(batch_indices(n, bs, seed=0, epoch=0, drop_last=True))
    assert [len(b) for b in dropped] == [10] * 10
    flat = torch.cat(dropped)
    assert len(flat.unique()) == 100 and flat.min() >= 0 and flat.max() < n
    # drop_last only drops the tail of the same permutation
    assert torch.equal(flat, torch.cat(batches)[:100])


def test_batch_indices_deterministic_per_seed_and_epoch():
    def order(seed, epoch):
        return torch.cat(list(batch_indices(500, 50, seed=seed, epoch=epoch)))

    assert torch.equal(order(3, 7), order(3, 7))
    assert not torch.equal(order(3, 7), order(3, 8))  # a new shuffle every epoch
    assert not torch.equal(order(3, 7), order(4, 7))  # and per seed
    assert not torch.equal(order(3, 0), torch.arange(500))  # actually shuffled


def test_batch_indices_do_not_touch_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    list(batch_indices(100, 10, seed=0, epoch=0))
    assert torch.equal(torch.rand(5), expected)


# ---------------------------------------------------------------- pixel conventions


def test_pixel_conversions_round_trip_all_levels():
    levels = torch.arange(256, dtype=torch.uint8)
    unit, signed = to_unit(levels), to_signed(levels)
    assert unit.min() == 0.0 and unit.max() == 1.0
    assert signed.min() == -1.0 and signed.max() == 1.0
    assert torch.equal(unit_to_uint8(unit), levels)
    assert torch.equal(signed_to_uint8(signed), levels)
    # out-of-range model outputs are clamped, not wrapped
    assert unit_to_uint8(torch.tensor([-0.5, 1.7])).tolist() == [0, 255]
    assert signed_to_uint8(torch.tensor([-3.0, 2.0])).tolist() == [0, 255]


# ---------------------------------------------------------------- where MNIST is found


def test_candidate_dirs_order(monkeypatch):
    assert candidate_dirs(None) == [Path("data")]
    monkeypatch.setenv("MNIST_DIR", "/env/mnist")
    assert candidate_dirs("/flag") == [Path("/flag")]  # a --data-dir is the only place looked in
    assert candidate_dirs(None) == [Path("/env/mnist"), Path("data")]
    monkeypatch.setenv("MNIST_DIR", "")  # empty means unset
    assert candidate_dirs(None) == [Path("data")]


def test_search_order_flag_else_env_then_cwd_data(monkeypatch, tmp_path):
    flag = write_fake_mnist(tmp_path / "flag", n_train=20, n_test=2)
    env = write_fake_mnist(tmp_path / "env", n_train=30, n_test=3)
    write_fake_mnist(Path.cwd() / "data", n_train=40, n_test=4)  # ./data in the test's cwd
    monkeypatch.setenv("MNIST_DIR", str(env))

    def n_train(data_dir):
        return len(load_mnist(True, data_dir, download=False)[1])

    assert n_train(flag) == 20  # --data-dir wins
    assert n_train(None) == 30  # then $MNIST_DIR
    with pytest.raises(UserError, match="empty"):  # a --data-dir without the files is an error,
        n_train(tmp_path / "empty")  # not $MNIST_DIR's or ./data's files
    monkeypatch.delenv("MNIST_DIR")
    assert n_train(None) == 40  # then ./data
    assert find_mnist(None, download=False) == Path("data")


def test_missing_data_names_searched_dirs_and_files(monkeypatch, tmp_path):
    monkeypatch.setenv("MNIST_DIR", str(tmp_path / "envdir"))
    partial = tmp_path / "flagdir"
    (partial / "MNIST" / "raw").mkdir(parents=True)
    (partial / "MNIST" / "raw" / RAW_FILES[0]).write_bytes(b"")  # 1 of 4 files is not enough
    with pytest.raises(UserError) as info:
        load_mnist(True, partial, download=False)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(partial / "MNIST" / "raw") in msg and str(tmp_path / "envdir") not in msg
    for name in RAW_FILES:
        assert name in msg
    assert "--data-dir" in msg and "MNIST_DIR" in msg
    with pytest.raises(UserError) as info:  # without --data-dir: $MNIST_DIR, then ./data
        load_mnist(True, None, download=False)
    for d in (tmp_path / "envdir", Path("data")):
        assert str(d / "MNIST" / "raw") in str(info.value)


def test_missing_data_with_download_fails_cleanly_offline(tmp_path, offline):
    target = tmp_path / "dl"
    with pytest.raises(UserError, match="download failed") as info:
        find_mnist(target, download=True)
    assert offline, "the download was attempted"
    assert "\n" not in str(info.value)
    for name in RAW_FILES:
        assert name in str(info.value)
    assert not data.has_mnist(target)


def test_user_errors_turns_missing_data_into_exit_2(capsys, tmp_path):
    @user_errors
    def main(argv=None):
        load_mnist(True, tmp_path / "nowhere", download=False)

    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: MNIST not found") and err.endswith("\n")
    assert err.count("\n") == 1  # one line, no traceback
