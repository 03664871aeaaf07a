"""common.checkpoint: run-dir guard, atomic save, one-line load errors, small run files."""

from __future__ import annotations

import os
import random
from fractions import Fraction

import pytest
import torch

from common import checkpoint as ck
from common.checkpoint import (
    CHECKPOINT,
    append_csv,
    load_checkpoint,
    prepare_run_dir,
    read_csv,
    save_checkpoint,
    truncate_csv,
    write_json,
)
from common.cli import UserError
from common.runtime import rng_state, set_rng_state

# ---------------------------------------------------------------- run-dir guard


def test_new_and_empty_dirs_are_accepted(tmp_path):
    out = prepare_run_dir(tmp_path / "a" / "b")
    assert out.is_dir() and list(out.iterdir()) == []
    (tmp_path / "empty").mkdir()
    assert prepare_run_dir(tmp_path / "empty").is_dir()


def test_non_empty_dir_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(UserError, match="not empty") as info:
        prepare_run_dir(out)
    assert "--resume" in str(info.value) and "--overwrite" in str(info.value)
    assert (out / "config.json").read_text() == "{}"


def test_path_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        prepare_run_dir(f)
    with pytest.raises(UserError):
        prepare_run_dir(f, overwrite=True)
    assert f.read_text() == "x"


def test_resume_needs_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError, match="--resume"):
        prepare_run_dir(out, resume=True)  # absent
    out.mkdir()
    (out / "loss.csv").write_text("step\n1\n")
    with pytest.raises(UserError, match=CHECKPOINT):
        prepare_run_dir(out, resume=True)  # a run dir, but no checkpoint
    save_checkpoint(out / CHECKPOINT, {"kind": "vae"})
    assert prepare_run_dir(out, resume=True) == out
    assert sorted(p.name for p in out.iterdir()) == [CHECKPOINT, "loss.csv"]  # kept as is


def test_overwrite_clears_a_run_dir(tmp_path):
    out = tmp_path / "run"
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "s.png").write_bytes(b"png")
    (out / "loss.csv").write_text("step\n1\n")
    assert prepare_run_dir(out, overwrite=True) == out
    assert out.is_dir() and list(out.iterdir()) == []


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path):
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="does not look like a run directory"):
        prepare_run_dir(out, overwrite=True)
    assert (out / "thesis.tex").read_text() == "precious"


def test_resume_and_overwrite_together_are_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    save_checkpoint(out / CHECKPOINT, {"kind": "vae"})
    with pytest.raises(UserError, match="contradict"):
        prepare_run_dir(out, resume=True, overwrite=True)
    assert (out / CHECKPOINT).is_file()


# ---------------------------------------------------------------- save / load


def _state(kind: str = "vae", seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(8, 4)).pow(2).mean().backward()
    opt.step()
    return {
        "kind": kind,
        "step": 17,
        "config": {"lr": 1e-3, "name": "x", "dims": [1, 2]},
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": rng_state(),
    }


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


def test_round_trip_with_weights_only(tmp_path):
    state = _state()
    path = tmp_path / CHECKPOINT
    save_checkpoint(path, state)
    loaded = load_checkpoint(tmp_path, "vae")  # a run directory resolves to its checkpoint
    _assert_same(state, loaded)
    _assert_same(state, load_checkpoint(path, "vae"))  # so does the file itself
    # nothing in a checkpoint needs pickle: plain torch.load with weights_only=True reads it
    _assert_same(state, torch.load(path, weights_only=True))


def test_saved_rng_state_restores_the_random_streams(tmp_path):
    random.seed(1)
    torch.manual_seed(1)
    save_checkpoint(tmp_path / CHECKPOINT, {"kind": "ddpm", "rng": rng_state()})
    expected = (torch.randn(4), random.random())
    torch.manual_seed(999)
    random.seed(999)
    set_rng_state(load_checkpoint(tmp_path, "ddpm")["rng"])
    got = (torch.randn(4), random.random())
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]


def _only_checkpoint_left(directory):
    return sorted(p.name for p in directory.iterdir()) == [CHECKPOINT]


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch, exc):
    path = tmp_path / CHECKPOINT
    old = _state(seed=0)
    save_checkpoint(path, old)

    real_save = torch.save

    def broken_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.seek(0)
        f.truncate(50)  # half-written file, then the crash
        raise exc

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(type(exc)):
        save_checkpoint(path, _state(seed=1))
    monkeypatch.undo()

    _assert_same(old, load_checkpoint(path, "vae"))
    assert _only_checkpoint_left(tmp_path)  # no temp file left behind


def test_failed_replace_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT
    save_checkpoint(path, {"kind": "vae", "step": 1})

    def broken_replace(src, dst):
        raise OSError("cross-device link")

    monkeypatch.setattr(ck.os, "replace", broken_replace)
    with pytest.raises(OSError):
        save_checkpoint(path, {"kind": "vae", "step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path, "vae")["step"] == 1
    assert _only_checkpoint_left(tmp_path)


def test_save_replaces_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / CHECKPOINT
    for step in range(3):
        save_checkpoint(path, {"kind": "ddpm", "step": step})
    assert load_checkpoint(path, "ddpm")["step"] == 2
    assert _only_checkpoint_left(tmp_path)


def _user_error(run, kind="vae") -> str:
    with pytest.raises(UserError) as info:
        load_checkpoint(run, kind)
    msg = str(info.value)
    assert msg and "\n" not in msg, f"not one line: {msg!r}"
    return msg


def test_wrong_kind_is_a_one_line_user_error(tmp_path):
    save_checkpoint(tmp_path / CHECKPOINT, _state(kind="vae"))
    msg = _user_error(tmp_path, kind="ddpm")
    assert "'vae'" in msg and "'ddpm'" in msg


def test_missing_paths_are_one_line_user_errors(tmp_path):
    assert "does not exist" in _user_error(tmp_path / "nope.pt")
    assert "has no checkpoint.pt" in _user_error(tmp_path)  # a directory without one


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda p, good: p.write_bytes(good[: len(good) // 2]), id="truncated"),
        pytest.param(lambda p, good: p.write_bytes(good[:10]), id="truncated-header"),
        pytest.param(lambda p, good: p.write_bytes(b""), id="empty"),
        pytest.param(lambda p, good: p.write_bytes(random.Random(0).randbytes(4096)), id="random-bytes"),
        pytest.param(lambda p, good: p.write_text("step,loss\n1,2\n"), id="text"),
        pytest.param(lambda p, good: torch.save([1, 2, 3], p), id="list"),
        pytest.param(lambda p, good: torch.save(torch.zeros(3), p), id="tensor"),
        pytest.param(lambda p, good: torch.save({"model": {}}, p), id="dict-without-kind"),
        pytest.param(lambda p, good: torch.save({"kind": "vae", "x": Fraction(1, 3)}, p), id="needs-pickle"),
    ],
)
def test_corrupt_or_foreign_files_are_one_line_user_errors(tmp_path, make):
    good_path = tmp_path / "good.pt"
    save_checkpoint(good_path, _state())
    bad = tmp_path / CHECKPOINT
    make(bad, good_path.read_bytes())
    msg = _user_error(bad)
    assert str(bad) in msg


# ---------------------------------------------------------------- small run files


def test_write_json_is_atomic_and_readable(tmp_path):
    import json

    path = tmp_path / "config.json"
    write_json(path, {"a": 1, "path": tmp_path})  # non-JSON values are stringified
    write_json(path, {"a": 2, "path": tmp_path})
    assert json.loads(path.read_text()) == {"a": 2, "path": str(tmp_path)}
    assert os.listdir(tmp_path) == ["config.json"]


def test_csv_append_read_truncate(tmp_path):
    path = tmp_path / "loss.csv"
    for step in range(1, 6):
        append_csv(path, {"step": step, "loss_nats": 1.0 / step})
    assert path.read_text().splitlines()[0] == "step,loss_nats"
    rows = read_csv(path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[3]["loss_nats"] == pytest.approx(0.25)
    truncate_csv(path, "step", 3)  # resuming from the step-3 checkpoint
    assert [r["step"] for r in read_csv(path)] == [1, 2, 3]
    append_csv(path, {"step": 4, "loss_nats": 0.0})
    assert [r["step"] for r in read_csv(path)] == [1, 2, 3, 4]
    truncate_csv(tmp_path / "absent.csv", "step", 1)  # nothing to do, no error
    assert not (tmp_path / "absent.csv").exists()
