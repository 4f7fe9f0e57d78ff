"""The example notebooks run top to bottom in a fresh Jupyter kernel, and what they show is ours:
no third-party warnings, log lines or notices between the results, neither in a fresh run nor in
the outputs stored in the repository (what readers see on GitHub)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

EXAMPLES = sorted((Path(__file__).parents[1] / "docs" / "examples").glob("*.ipynb"))
# what third-party libraries print when they are not kept quiet: warnings, log records, notices
NOISE = ("Warning", "WARN", "INFO", "DEBUG", "Token authentication", "Traceback", "ipywidgets")


def _shown_text(nb) -> list[str]:
    """Every stream and plain-text result of the notebook's code cells."""
    out = []
    for cell in nb.cells:
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            out.append(output.get("text") or output.get("data", {}).get("text/plain", ""))
    return out


def _noise(nb) -> list[str]:
    return [text for text in _shown_text(nb) if any(marker in text for marker in NOISE)]


def test_there_are_example_notebooks():
    assert EXAMPLES, "docs/examples/ holds no notebook"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_stored_outputs_are_clean(path: Path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), f"{path.name} is stored unexecuted"
    assert not _noise(nb), f"{path.name} stores third-party noise: {_noise(nb)}"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_notebook_runs_cleanly(path: Path, tmp_path: Path):
    nb = nbformat.read(path, as_version=4)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # the kernel starts its own Ray
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)  # raises CellExecutionError naming the failing cell
    assert not _noise(nb), f"{path.name} shows third-party noise: {_noise(nb)}"
    shown = "\n".join(_shown_text(nb))
    assert "embedded" in shown and "recall@10" in shown
