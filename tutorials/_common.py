"""Plumbing shared by the numbered tutorials (not a tutorial itself).

Each tutorial begins with `tut = setup("NN_name", "one line on what it teaches")`, which
parses the flags every tutorial takes,

    --out DIR       where figures go (default: results/tutorials/NN_name/ in the repository)
    --quick         shrink every loop, for CI (seconds instead of a minute or two)
    --data-dir DIR  a folder holding MNIST/raw/ (default: $MNIST_DIR, else the repository's data/)
    --synthetic     use a tiny synthetic stand-in for MNIST (the tests' fake digits)

seeds every RNG, and returns a `Tutorial`. `tut.mnist()` loads MNIST (downloading it where the
commands would); without it a tutorial stops with the commands' one-line error, unless
--synthetic asks for the stand-in, on which every figure is meaningless. `step` prints a
numbered step, `check` and `claim` print the numbers behind a statement and stop the tutorial
if the statement is false, and `save` writes a figure. Unknown flags are ignored, so the same file
also runs as a notebook (Jupyter passes its own `-f kernel.json`).
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

import common.viz  # noqa: F401  (selects the Agg backend: figures are files)
from common.cli import UserError
from common.data import find_mnist, load_mnist
from common.runtime import seed_everything

REPO = Path(__file__).resolve().parent.parent

try:  # in a notebook, draw figures inline as well as saving them
    _ipython = get_ipython()  # type: ignore[name-defined]  # noqa: F821
    _ipython.run_line_magic("matplotlib", "inline")
    _ipython.run_line_magic("config", "InlineBackend.figure_formats = ['jpeg']")  # keeps notebooks small
    IN_NOTEBOOK = True
except NameError:
    IN_NOTEBOOK = False

import matplotlib.pyplot as plt  # noqa: E402

if IN_NOTEBOOK:
    plt.rcParams["figure.dpi"] = 72  # inline figures small enough to keep the notebooks light

@dataclass
class Tutorial:
    name: str
    out: Path
    quick: bool
    data_dir: str | None
    _root: Path | None = field(default=None, repr=False)
    synthetic: bool = False

    def size(self, full, quick):
        """`full` normally, `quick` under --quick (loop lengths, sample counts)."""
        return quick if self.quick else full

    def mnist(self, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(images uint8 [N, 1, 28, 28], labels long [N]) of MNIST, or of the --synthetic stand-in."""
        return load_mnist(train=train, data_dir=self.data_root(), download=False)

    def data_root(self) -> Path:
        """The torchvision root `mnist()` reads (MNIST, or the synthetic stand-in): the --data-dir
        to hand to a training command (`ddpm.train`, `vaegen.train`) so that it reads the same data."""
        if self._root is not None:
            return self._root
        if self.synthetic:
            sys.path.insert(0, str(REPO / "tests"))
            from fake_mnist import write_fake_mnist  # the tests' tiny synthetic digits

            tmp = tempfile.mkdtemp(prefix="fake-mnist-")
            atexit.register(shutil.rmtree, tmp, ignore_errors=True)
            self._root = write_fake_mnist(tmp)
            print("    --synthetic: a tiny stand-in for MNIST (noise plus a bar whose height encodes the\n"
                  "    digit). The code runs the same; every figure and number is meaningless.")  # fmt: skip
            return self._root
        # Without --data-dir or $MNIST_DIR, the repository's data/ folder, where the commands run from
        # the repository put MNIST (a notebook's working directory is tutorials/, not the repository).
        default = None if os.environ.get("MNIST_DIR") else REPO / "data"
        try:
            self._root = find_mnist(self.data_dir or default)
        except UserError as e:  # the commands' one-line error, and their exit code
            print(f"error: {e}; or pass --synthetic to run on a tiny stand-in", file=sys.stderr)
            raise SystemExit(2) from None
        print(f"    MNIST from {self._root / 'MNIST' / 'raw'}")
        return self._root

    def save(self, fig, filename: str) -> Path:
        """Write a matplotlib figure as PNG into the output folder (and show it in a notebook)."""
        path = self.out / filename
        fig.savefig(path, dpi=120, bbox_inches="tight")
        print(f"    figure: {path}")
        if IN_NOTEBOOK:
            plt.show()
        else:
            plt.close(fig)
        return path


def setup(name: str, description: str, argv: list[str] | None = None) -> Tutorial:
    parser = argparse.ArgumentParser(prog=f"{name}.py", description=description)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "tutorials" / name)
    parser.add_argument("--quick", action="store_true", help="shrink every loop (seconds, for CI)")
    parser.add_argument("--data-dir", default=None, help="DIR holding MNIST/raw/ (if not given: $MNIST_DIR, "
                        "else the repository's data/)")  # fmt: skip
    parser.add_argument("--synthetic", action="store_true", help="a tiny stand-in for MNIST (tests)")
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    seed_everything(0)
    print(f"{name}: {description}")
    print(f"    figures go to {args.out}{' (quick mode)' if args.quick else ''}")
    return Tutorial(name, args.out, args.quick, args.data_dir, synthetic=args.synthetic)


def step(n: int, text: str) -> None:
    print(f"\n[{n}] {text}")


def claim(text: str, ok: bool) -> None:
    """Print a statement with its numbers; a false one stops the tutorial (and fails its test)."""
    print(f"    {text}  [{'ok' if ok else 'FAILED'}]")
    if not ok:
        raise SystemExit(f"claim failed: {text}")


def check(label: str, got: float, want: float, tol: float, want_label: str = "expected") -> None:
    """claim that |got - want| <= tol, printed as 'label 3.412 vs expected 3.409'."""
    got, want = float(got), float(want)

    def fmt(v: float) -> str:
        return f"{int(v):,}" if v.is_integer() and abs(v) >= 1e4 else f"{v:.5g}"

    claim(f"{label} {fmt(got)} vs {want_label} {fmt(want)} (tolerance {tol:.2g})", abs(got - want) <= tol)
