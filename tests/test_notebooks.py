"""The executed notebooks in docs/tutorials/ hold their tutorial scripts' code, so they cannot drift.

A notebook is written by `tutorials/notebooks.py` from its script; when a script's code changes,
this test fails until the notebook is rebuilt (and so re-run, with fresh outputs).
"""

from pathlib import Path

import jupytext
import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "tutorials").glob("[0-9][0-9]_*.py"))


def code_cells(notebook) -> list[str]:
    return [cell.source for cell in notebook.cells if cell.cell_type == "code"]


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_each_executed_notebook_holds_its_scripts_code(script):
    path = REPO / "docs" / "tutorials" / f"{script.stem}.ipynb"
    assert path.is_file(), f"no {path.name}: run `uv run --group notebooks python tutorials/notebooks.py`"
    committed = nbformat.read(path, as_version=4)
    assert code_cells(committed) == code_cells(jupytext.read(script)), (
        f"{path.name} is stale: rebuild it with `uv run --group notebooks python tutorials/notebooks.py "
        f"{script.name[:2]}`"
    )
    executed = [cell for cell in committed.cells if cell.cell_type == "code"]
    assert all(cell.get("outputs") for cell in executed[1:]), f"{path.name} was not executed"


def test_a_notebook_matches_its_script_until_the_script_changes(tmp_path):
    # The round trip the builder makes (script -> notebook file) keeps the code exactly, and a
    # one-character change to the script is then a mismatch.
    script = SCRIPTS[0]
    notebook = tmp_path / f"{script.stem}.ipynb"
    jupytext.write(jupytext.read(script), notebook, fmt="ipynb")
    assert code_cells(nbformat.read(notebook, as_version=4)) == code_cells(jupytext.read(script))
    changed = tmp_path / script.name
    changed.write_text(script.read_text().replace("step(1,", "step(11,", 1))
    assert code_cells(nbformat.read(notebook, as_version=4)) != code_cells(jupytext.read(changed))
