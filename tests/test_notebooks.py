"""The Colab notebooks (colab/*.ipynb) executed end to end with SMOKE=1 on CPU: every cell must run without an
error (nbclient, the venv's python3 kernel, the repository root as working directory)."""

import os

import nbclient
import nbformat
import pytest

from test_cli import ENV, ROOT

NOTEBOOKS = sorted(name for name in os.listdir(os.path.join(ROOT, "colab")) if name.endswith(".ipynb"))


def test_there_are_the_three_notebooks():
  assert NOTEBOOKS == ["distillation_calibration.ipynb", "kd_calibration.ipynb", "quickstart.ipynb"]


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_with_smoke_settings(name, tmp_path, monkeypatch):
  # The kernel inherits this environment: SMOKE, and the test session's XLA cache and fast-compile flags.
  for key, value in {**ENV, "SMOKE": "1"}.items():
    monkeypatch.setenv(key, value)
  with open(os.path.join(ROOT, "colab", name)) as f:
    notebook = nbformat.read(f, as_version=4)
  # The runs go to a fresh directory: the notebook's relative runs/ paths resolve under tmp_path/runs.
  os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError, naming the cell, when a cell fails
  outputs = "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                    for output in cell.get("outputs", []))
  assert "'smoke': True" in outputs
