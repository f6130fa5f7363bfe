"""Runs every notebook in ``notebooks/`` top to bottom in a fresh kernel.

A notebook passes when no cell raises. Run times show in pytest's ``--durations``
report (set in ``pyproject.toml``); they are not asserted, since these machines are
shared and noisy. The committed notebooks keep their outputs so they render on GitHub;
this test executes a copy and writes nothing back.
"""

from __future__ import annotations

import os
import pathlib

import pytest

# jupyter_core warns about its config paths unless told which convention to use; warnings
# are errors in this test suite.
os.environ.setdefault("JUPYTER_PLATFORM_DIRS", "1")

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks() -> None:
    assert len(NOTEBOOKS) >= 4, NOTEBOOKS


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: pathlib.Path, tmp_path: pathlib.Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,  # per cell: a guard against a hang, not a speed target
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors, errors
