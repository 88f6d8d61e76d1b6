"""The package layout is the architecture: every import runs down the layers.

Reads the source of every module (the `ast` of each file, so imports inside
functions count too) and checks each `fedjax_med.<package>` it imports
against the layer order in the README ("Layers") and fedjax_med/__init__.py: a package may
import itself and the layers below it, never one above it, and models /
losses / metrics (one layer) do not import each other. The moved modules of
version 0.1 must still resolve to the very same module objects.
"""

import ast
import importlib
import pathlib

import pytest

import fedjax_med as fm

PACKAGE_DIR = pathlib.Path(fm.__file__).parent

# Bottom to top. Packages in one tuple share a layer and may not import each other.
LAYERS = (("core",), ("models", "losses", "metrics"), ("aggregators",), ("data",),
          ("privacy",), ("algorithms",), ("training",), ("deploy",))
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _modules():
  return sorted(p for p in PACKAGE_DIR.rglob("*.py") if p != PACKAGE_DIR / "__init__.py")


def _imported_packages(path: pathlib.Path):
  """(line, top-level fedjax_med package) for every fedjax_med import in the file."""
  tree = ast.parse(path.read_text(), filename=str(path))
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        parts = alias.name.split(".")
        if parts[0] == "fedjax_med":
          yield node.lineno, parts[1] if len(parts) > 1 else None
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      parts = node.module.split(".")
      if parts[0] != "fedjax_med":
        continue
      if len(parts) > 1:
        yield node.lineno, parts[1]
      else:  # from fedjax_med import x: x is the package
        for alias in node.names:
          yield node.lineno, alias.name


def test_every_module_lives_in_a_layer_package():
  loose = [p.name for p in PACKAGE_DIR.glob("*.py") if p.name != "__init__.py"]
  assert loose == [], f"modules outside the layer packages: {loose}"
  packages = {p.parent.relative_to(PACKAGE_DIR).parts[0] for p in _modules()}
  assert packages <= set(RANK), f"packages with no layer: {sorted(packages - set(RANK))}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE_DIR)))
def test_imports_run_down_the_layers(path):
  own = path.relative_to(PACKAGE_DIR).parts[0]
  bad = []
  for line, target in _imported_packages(path):
    if target is None or target not in RANK:
      bad.append((line, f"fedjax_med.{target} (the top-level package or no layer)"))
    elif target != own and RANK[target] >= RANK[own]:
      bad.append((line, f"fedjax_med.{target} (layer {RANK[target]}) from {own}"
                        f" (layer {RANK[own]})"))
  assert not bad, f"{path.relative_to(PACKAGE_DIR)} imports upwards or sideways: {bad}"


def test_the_checker_sees_an_upward_import(tmp_path):
  """The scan would catch a violation (imports inside functions included)."""
  bad = tmp_path / "mod.py"
  bad.write_text("def f():\n  from fedjax_med.training import loop\n"
                 "from fedjax_med import algorithms\n")
  assert sorted(t for _, t in _imported_packages(bad)) == ["algorithms", "training"]


@pytest.mark.parametrize("old, new", sorted(fm.MOVED_MODULES.items()))
def test_version_0_1_module_names_are_the_same_modules(old, new):
  assert importlib.import_module(old) is importlib.import_module(new)


def test_version_0_1_attribute_names_still_work():
  assert fm.datasets is fm.data.datasets
  assert fm.robust is fm.aggregators.robust
  assert fm.compression is fm.aggregators.compression
  assert fm.checkpoint is fm.training.checkpoint
  assert fm.experiment is fm.training.loop and fm.segmentation is fm.algorithms.segmentation
  assert fm.audit is fm.training.audit and fm.report is fm.training.report
  assert fm.privacy.dp_fedavg is fm.algorithms.dp_fedavg
  assert fm.privacy.dp_sgd_fedavg is fm.algorithms.dp_sgd_fedavg
  from fedjax_med.compression.qsgd import qsgd_levels  # pylint: disable=import-outside-toplevel
  assert qsgd_levels is importlib.import_module(
      "fedjax_med.aggregators.compression.qsgd").qsgd_levels
