"""Every notebook in notebooks/ runs top to bottom (small settings) and draws its figures."""

from pathlib import Path

import nbclient
import nbformat
import pytest


NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
WITH_FIGURES = {"02_upcycle_and_heal.ipynb", "03_speed.ipynb", "04_routing_heatmap.ipynb"}


@pytest.mark.parametrize("name", sorted(path.name for path in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_runs_top_to_bottom(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    # Runs where a user would open it (relative paths); a failing cell raises CellExecutionError.
    client = nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    if name in WITH_FIGURES:
        assert any("image/png" in output.get("data", {}) for output in outputs), f"{name} drew no figure"
