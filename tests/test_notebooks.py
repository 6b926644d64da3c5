"""Notebooks under notebooks/ run top to bottom in small mode (DSV3_NOTEBOOK_SMALL=1) and are committed clean.

Each runs in a kernel of this very Python (`python -m ipykernel_launcher`), declared by a kernel spec written to
a temporary JUPYTER_PATH, so no kernel needs to be installed beforehand.
"""

import json
import sys
from pathlib import Path

import jax
import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
KERNEL = "dsv3-jax-test"


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A kernel spec for sys.executable on JUPYTER_PATH, and the small settings in the kernel's environment."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python ({sys.executable})", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("DSV3_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("DSV3_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("XLA_FLAGS", raising=False)     # one CPU device, as a user has
    monkeypatch.delenv("DSV3_MODEL_PATH", raising=False)
    # the two runs of the routing notebook compile the same step: share executables through the persistent
    # cache of the test session (conftest.py)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir)
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    return tmp_path


def test_there_are_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {"routing_explorer.ipynb", "mla_and_yarn.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs_and_starts_by_installing(path):
    nb = nbformat.read(path, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    dirty = [i for i, cell in enumerate(code) if cell.outputs or cell.execution_count is not None]
    assert not dirty, f"{path.name}: code cells {dirty} have outputs; clear them before committing"
    assert "pip install" in code[0].source and "import dsv3_jax" in code[0].source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, kernel_env):
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=300, resources={"metadata": {"path": str(kernel_env)}})
    client.execute()   # raises CellExecutionError naming the cell when one fails
