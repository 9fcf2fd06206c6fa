"""The notebooks run top to bottom (each ends with assertions on its results); a failing cell fails the test.
The kernel is this interpreter (a kernel spec written for the test), whatever kernels the machine has."""
import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_every_notebook_is_here():
    assert [p.stem for p in NOTEBOOKS] == ["capacity_plan", "policy_sweep", "quickstart"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    spec = tmp_path / "jupyter" / "kernels" / "servesim-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f",
                                                           "{connection_file}"],
                                                  "display_name": "servesim test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("SERVESIM_NOTEBOOK_OUT", str(out))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="servesim-test", resources={"metadata": {"path": str(out)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    assert any(p.is_dir() for p in out.iterdir())            # it wrote its runs where it was told
