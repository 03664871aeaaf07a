"""common.tensor, common.runtime, common.cli and common.config's flags."""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from common import cli
from common.cli import UserError, user_errors
from common.config import add_flags, given_fields, nested, option, resume_config
from common.runtime import count_params, pick_device, rng_state, seed_everything, set_rng_state, versions
from common.tensor import extract, mean_flat, sum_flat

# ---------------------------------------------------------------- tensor helpers


def test_extract_gathers_per_example_and_broadcasts():
    a = torch.arange(10, dtype=torch.float64) * 1.5
    t = torch.tensor([3, 0, 9, 3])
    out = extract(a, t, (4, 1, 28, 28))
    assert out.shape == (4, 1, 1, 1) and out.dtype == torch.float64
    assert out.flatten().tolist() == [4.5, 0.0, 13.5, 4.5]
    x = torch.ones(4, 1, 28, 28, dtype=torch.float64)
    assert torch.equal((out * x)[:, 0, 5, 7], a[t])
    assert extract(a, t, (4, 16)).shape == (4, 1)
    assert extract(a, t, (4,)).shape == (4,)


def test_mean_and_sum_flat_reduce_all_but_the_batch():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float64).reshape(2, 3, 4, 5)
    assert sum_flat(x).shape == (2,) and mean_flat(x).shape == (2,)
    assert sum_flat(x).tolist() == [x[0].sum().item(), x[1].sum().item()]
    assert mean_flat(x).tolist() == [x[0].mean().item(), x[1].mean().item()]
    assert sum_flat(torch.ones(3, 7)).tolist() == [7.0, 7.0, 7.0]
    # works on non-contiguous input too
    xt = x.transpose(1, 3)
    torch.testing.assert_close(sum_flat(xt), sum_flat(x))


# ---------------------------------------------------------------- runtime


def test_pick_device_cpu_and_auto(monkeypatch):
    assert pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda")  # cuda first


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "", "CPU0"])
def test_pick_device_rejects_unknown_names(name):
    with pytest.raises(UserError, match="unknown device"):
        pick_device(name)


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "mps"])
def test_pick_device_rejects_unavailable_devices(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UserError, match="not available"):
        pick_device(name)


def test_seed_everything_makes_every_rng_repeatable():
    def draw():
        return torch.randn(5), random.random(), np.random.rand(3)

    seed_everything(1234)
    a = draw()
    seed_everything(1234)
    b = draw()
    seed_everything(1235)
    c = draw()
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and np.array_equal(a[2], b[2])
    assert not torch.equal(a[0], c[0]) and a[1] != c[1] and not np.array_equal(a[2], c[2])
    seed_everything(2**40)  # large seeds are fine for numpy too
    assert np.isfinite(np.random.rand())


def test_rng_state_round_trip():
    seed_everything(7)
    state = rng_state()
    first = (torch.rand(3), random.random())
    torch.rand(100)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), first[0]) and random.random() == first[1]


def test_count_params_counts_trainable_only():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 5))
    assert count_params(model) == (3 * 2 + 2) + (2 * 5 + 5)
    model[0].requires_grad_(False)
    assert count_params(model) == 2 * 5 + 5


def test_versions_reports_the_libraries():
    v = versions()
    assert v["torch"] == torch.__version__ and v["numpy"] == np.__version__
    assert v["cpu_threads"] >= 1


# ---------------------------------------------------------------- cli


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tool")
    p.add_argument("--n", type=cli.positive_int)
    p.add_argument("--k", type=cli.nonneg_int)
    p.add_argument("--lr", type=cli.positive_float)
    p.add_argument("--wd", type=cli.nonneg_float)
    p.add_argument("--p", type=cli.unit_float)
    p.add_argument("--digit", type=cli.digit)
    p.add_argument("--mean", type=cli.finite_float)
    p.add_argument("--labels", type=cli.digit_list)
    return p


def test_cli_types_accept_good_values():
    args = _parser().parse_args(
        ["--n", "3", "--k", "0", "--lr", "2e-4", "--wd", "0", "--p", "1", "--digit", "9",
         "--labels", "0, 3,9", "--mean", "-1.2"]
    )
    assert (args.n, args.k, args.lr, args.wd, args.p, args.digit) == (3, 0, 2e-4, 0.0, 1.0, 9)
    assert args.labels == [0, 3, 9] and args.mean == -1.2


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--n", "0"), ("--n", "-2"), ("--n", "1.5"), ("--n", "ten"),
        ("--k", "-1"),
        ("--lr", "0"), ("--lr", "-1e-3"), ("--lr", "abc"), ("--lr", "nan"), ("--lr", "inf"),
        ("--wd", "-0.1"), ("--wd", "nan"), ("--wd", "inf"),
        ("--p", "1.5"), ("--p", "-0.01"), ("--p", "nan"),
        ("--digit", "10"), ("--digit", "-1"),
        ("--labels", "1,2,10"), ("--labels", "1,x"),
        ("--mean", "nan"), ("--mean", "inf"), ("--mean", "-inf"), ("--mean", "x"),
    ],
)
def test_cli_types_reject_bad_values_with_exit_2(capsys, flag, value):
    with pytest.raises(SystemExit) as info:
        _parser().parse_args([flag, value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "expected" in err


def test_user_errors_exit_2_with_one_line(capsys):
    @user_errors
    def main(argv=None):
        """doc kept"""
        if argv == ["bad"]:
            raise UserError("no such thing: x")
        return 0

    assert main(["ok"]) == 0 and main.__doc__ == "doc kept"
    with pytest.raises(SystemExit) as info:
        main(["bad"])
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "error: no such thing: x\n"


def test_user_errors_leaves_bugs_alone():
    @user_errors
    def main():
        raise ValueError("a bug, with its traceback")

    with pytest.raises(ValueError):
        main()


# ---------------------------------------------------------------- config flags and --resume


@dataclass(frozen=True)
class _Inner:
    width: int = option(16, "a nested field")


@dataclass(frozen=True)
class _Config:
    lr: float = option(4e-3, "a kept field")
    epochs: int = option(6, "an extended field", resume="extend")
    compile: bool = option(False, "a boolean flag", resume="flag")
    inner: _Inner = nested(_Inner)


def test_given_fields_reads_the_command_line_not_the_values():
    parser = argparse.ArgumentParser()
    add_flags(parser, _Config)
    parser.add_argument("--resume", action="store_true")
    argv = ["--lr", "4e-3", "--no-compile", "--width", "16", "--resume"]  # each at its default
    assert given_fields(parser, _Config, argv) == {"lr", "compile", "width"}
    assert given_fields(parser, _Config, ["--epochs", "2"]) == {"epochs"}
    assert given_fields(parser, _Config, []) == frozenset()


def test_resume_config_follows_the_flags_given():
    saved = _Config(lr=1e-3, epochs=2, inner=_Inner(width=8))
    # given at the default value, an 'extend' field still extends; not given, it stays
    assert resume_config(saved, _Config(), frozenset({"epochs"})).epochs == 6
    assert resume_config(saved, _Config(), frozenset()) == saved
    # a 'keep' field given at the default value is refused, nested ones too
    for flags, name in ((frozenset({"lr"}), "--lr 0.001"), (frozenset({"width"}), "--width 8")):
        with pytest.raises(UserError, match=name):
            resume_config(saved, _Config(), flags)
    assert resume_config(saved, _Config(lr=1e-3), frozenset({"lr"})) == saved  # the same value: fine
