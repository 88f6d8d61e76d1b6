"""The notebooks run top to bottom (so they never rot)."""

import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
# The imaging and privacy notebooks take 40-46 s each on a 2-core machine: the slow
# tier (`make test-all`). The quickstart and custom-algorithm ones run in `make test`.
SLOW_NOTEBOOKS = {"02_privacy.ipynb", "03_imaging.ipynb"}


@pytest.mark.parametrize("path", [
    pytest.param(p, marks=pytest.mark.slow) if os.path.basename(p) in SLOW_NOTEBOOKS else p
    for p in NOTEBOOKS], ids=os.path.basename)
def test_notebook_executes(path, tmp_path):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  nb = nbformat.read(path, as_version=4)
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
      "commit notebooks with outputs cleared (notebooks/src/build_notebooks.py)"
  env_backend = os.environ.get("MPLBACKEND")
  os.environ["MPLBACKEND"] = "Agg"
  try:
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
  finally:
    if env_backend is None:
      os.environ.pop("MPLBACKEND", None)
    else:
      os.environ["MPLBACKEND"] = env_backend


def test_notebooks_match_their_source():
  """The committed .ipynb files are exactly what build_notebooks.py generates."""
  import importlib.util
  nbformat = pytest.importorskip("nbformat")
  spec = importlib.util.spec_from_file_location(
      "build_notebooks", os.path.join(ROOT, "notebooks", "src", "build_notebooks.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  built = {name: module.notebook(cells) for name, cells in module.NOTEBOOKS.items()}
  assert sorted(built) == [os.path.basename(p) for p in NOTEBOOKS]
  for path in NOTEBOOKS:
    committed = nbformat.read(path, as_version=4)
    want = built[os.path.basename(path)]
    assert [(c.cell_type, c.source) for c in committed.cells] == [
        (c.cell_type, c.source) for c in want.cells], f"rebuild {path}"
