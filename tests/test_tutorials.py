"""Every tutorial runs end to end with --quick --synthetic and writes its figures.

Each one runs as a subprocess, the way a reader runs it, from an empty temporary working
directory, without $MNIST_DIR, on the tiny synthetic MNIST of `tests/fake_mnist.py`. A
tutorial's own checks (`claim`/`check` in tutorials/_common.py) stop it with a non-zero exit
status when a number is off, so a zero exit also means every printed claim held.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).resolve().parent.parent / "tutorials").glob("[0-9][0-9]_*.py"))


def test_tutorials_are_found():
    assert len(TUTORIALS) >= 5, TUTORIALS


@pytest.mark.parametrize("script", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs_quick_and_writes_figures(script: Path, tmp_path: Path):
    out = tmp_path / "figures"
    work = tmp_path / "cwd"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MNIST_DIR"}
    env["MPLBACKEND"] = "Agg"
    proc = subprocess.run(
        [sys.executable, str(script), "--quick", "--synthetic", "--out", str(out)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{script.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "FAILED" not in proc.stdout
    pngs = sorted(out.glob("*.png"))
    assert pngs, f"{script.name} wrote no PNG into {out}"
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000, png
    printed = {
        line.split("figure: ", 1)[1].strip() for line in proc.stdout.splitlines() if "figure: " in line
    }
    assert printed == {str(p) for p in pngs}, "every figure announced is written, and only those"
    assert not list(work.iterdir()), "nothing is written into the working directory"


def test_a_tutorial_without_mnist_stops_with_one_line(tmp_path):
    empty = tmp_path / "empty"
    proc = subprocess.run(
        [sys.executable, str(TUTORIALS[0]), "--quick", "--data-dir", str(empty), "--out", str(tmp_path)],
        env={**{k: v for k, v in os.environ.items() if k != "MNIST_DIR"}, "MPLBACKEND": "Agg"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and str(empty / "MNIST" / "raw") in err[0] and "--synthetic" in err[0]
