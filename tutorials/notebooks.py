"""Write docs/tutorials/NN_name.ipynb: each tutorial executed as a notebook, with its outputs.

    uv run --group notebooks python tutorials/notebooks.py --data-dir DIR [NN ...]

Each tutorial (tutorials/NN_*.py, cells in jupytext's percent format) is read by jupytext, run
cell by cell in a Python kernel from the tutorials folder, as `python tutorials/NN_name.py` would
run it, on MNIST in DIR (handed to the kernel as $MNIST_DIR), and written with what it printed
and drew. Give tutorial numbers (e.g. `07 09`) to rebuild only those. tests/test_notebooks.py
checks that each notebook holds its script's code, so a changed script needs its notebook
rebuilt.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import jupytext
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "docs" / "tutorials"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("numbers", nargs="*", help="tutorials to rebuild, e.g. 07 09 (default: all)")
    p.add_argument("--data-dir", default=None, help="DIR holding MNIST/raw/ (if not given: $MNIST_DIR, "
                   "else the repository's data/)")  # fmt: skip
    a = p.parse_args()
    if a.data_dir:
        os.environ["MNIST_DIR"] = str(Path(a.data_dir).absolute())  # the kernel inherits it
    OUT.mkdir(parents=True, exist_ok=True)
    for script in sorted(HERE.glob("[0-9][0-9]_*.py")):
        if a.numbers and script.name[:2] not in a.numbers:
            continue
        notebook = jupytext.read(script)
        notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                           "language": "python"}  # fmt: skip
        start = time.perf_counter()
        client = NotebookClient(notebook, timeout=None, kernel_name="python3", record_timing=False,
                                resources={"metadata": {"path": str(HERE)}})  # fmt: skip
        client.execute()
        path = OUT / f"{script.stem}.ipynb"
        jupytext.write(notebook, path, fmt="ipynb")
        minutes = (time.perf_counter() - start) / 60
        size = path.stat().st_size / 1024
        print(f"{path.relative_to(HERE.parent)}: {minutes:.1f} min, {size:.0f} KiB", flush=True)


if __name__ == "__main__":
    main()
