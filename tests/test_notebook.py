"""The training notebook: committed without outputs, and executed end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from .conftest import ROOT

NOTEBOOK = ROOT / "examples" / "training_example.ipynb"


def test_notebook_is_committed_without_outputs():
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    code = [cell for cell in nb["cells"] if cell["cell_type"] == "code"]
    assert code, "the notebook has no code cells"
    for i, cell in enumerate(code):
        assert cell.get("outputs") == [], f"code cell {i} has outputs: clear them before committing"
        assert cell.get("execution_count") is None, f"code cell {i} has an execution count"


@pytest.mark.slow
def test_notebook_runs_end_to_end(tmp_path, monkeypatch):
    """Every cell runs (the last one asserts the prediction's shape), in a folder of its own."""
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("ipykernel")
    pytest.importorskip("torch")
    import zarr

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the kernel's tempfile.mkdtemp() lands here
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(cwd)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:  # names the cell and its traceback
        pytest.fail(f"a notebook cell raised:\n{err}")
    errors = [out for cell in nb.cells if cell.cell_type == "code"
              for out in cell.outputs if out.output_type == "error"]
    assert not errors, errors
    text = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for out in cell.outputs if out.output_type == "stream")
    assert "steps; loss" in text and "mean ink probability" in text, text

    # what it wrote: a temporary folder with the synthetic segment and a prediction of its shape
    (work,) = tmp_path.glob("vesuvius-notebook-*")
    labels = np.asarray(Image.open(work / "segment" / "inklabels.png"))
    prediction = zarr.open_array(work / "prediction.zarr", mode="r")
    assert prediction.shape == labels.shape
    values = prediction[:]
    assert np.isfinite(values).all() and values.max() > 0
    assert (work / "inknet.pt").is_file() and (work / "prediction.png").is_file()
    assert list(cwd.iterdir()) == []  # nothing written where it was started
