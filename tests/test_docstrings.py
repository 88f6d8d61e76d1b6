"""Every public name is documented, and every algorithm names its paper.

Public names: `fm.__all__` and, recursively, the `__all__` of every fedjax_med
module reached from it (a package without `__all__`, such as `fm.core`, counts
its names that do not start with "_"): the core and the kit, models, losses,
metrics, aggregators (robust, compression, secure, homomorphic), data
(datasets, partition), privacy and its modules, algorithms, training and its
modules. Modules, classes and callables need a docstring of their own (the
signature that dataclasses and namedtuples write for a class without one does
not count); constants, tuples and dicts are exempt.

Every algorithm in `fm.algorithms.__all__` (the functions, not the modules)
names its paper in its own docstring or its module's: a year (19xx / 20xx) and
"et al." or a venue. NO_PAPER lists the baselines that have none.
"""

import dataclasses
import importlib
import inspect
import re
import types

import pytest

import fedjax_med as fm

# Algorithms that are not a published method, and why.
NO_PAPER = {
    "local_only": "the local-only / pooled reference of every table, no federated method",
    "with_availability": "a wrapper that simulates sites being offline, not a method",
}

YEAR = re.compile(r"\b(19|20)\d\d\b")
VENUE = re.compile(r"\bet al\.|\b(AISTATS|ICML|ICLR|NeurIPS|NIPS|MLSys|CCS|EUROCRYPT|JAMIA"
                   r"|arXiv|Datasets and Benchmarks)\b")


def _public_names():
  """[(module name, public name, object)] over the modules reached from fm.__all__."""
  seen, todo, out = set(), ["fedjax_med"], []
  while todo:
    name = todo.pop(0)
    if name in seen:
      continue
    seen.add(name)
    module = importlib.import_module(name)
    out.append((name, None, module))
    names = getattr(module, "__all__", None)
    if names is None:
      names = [n for n in vars(module) if not n.startswith("_")]
    for n in names:
      obj = getattr(module, n)
      if isinstance(obj, types.ModuleType):
        if obj.__name__.split(".")[0] == "fedjax_med":
          todo.append(obj.__name__)
      else:
        out.append((name, n, obj))
  return out


PUBLIC = _public_names()
MODULES = sorted({name for name, _, _ in PUBLIC})


def _auto_class_doc(cls) -> set[str]:
  """The docstrings Python writes for an undocumented dataclass or namedtuple."""
  auto = set()
  if dataclasses.is_dataclass(cls):
    try:
      auto.add(cls.__name__ + str(inspect.signature(cls)).replace(" -> None", ""))
    except (TypeError, ValueError):
      pass
  if isinstance(getattr(cls, "_fields", None), tuple):
    auto.add(f"{cls.__name__}({', '.join(cls._fields)})")
  return auto


def _own_doc(obj) -> str | None:
  """The object's own docstring, or None for an exempt object (a constant)."""
  if isinstance(obj, types.ModuleType):
    return obj.__doc__ or ""
  if inspect.isclass(obj):
    doc = obj.__dict__.get("__doc__") or ""
    return "" if doc in _auto_class_doc(obj) else doc
  if callable(obj):
    return getattr(obj, "__doc__", None) or ""
  return None


def test_the_walk_reaches_every_layer():
  for package in ("fedjax_med.core", "fedjax_med.core.kit", "fedjax_med.models",
                  "fedjax_med.losses", "fedjax_med.metrics", "fedjax_med.aggregators",
                  "fedjax_med.aggregators.robust", "fedjax_med.aggregators.compression",
                  "fedjax_med.aggregators.secure", "fedjax_med.aggregators.homomorphic",
                  "fedjax_med.data", "fedjax_med.data.datasets", "fedjax_med.data.partition",
                  "fedjax_med.privacy", "fedjax_med.privacy.accounting",
                  "fedjax_med.privacy.patient_level", "fedjax_med.privacy.site_level",
                  "fedjax_med.algorithms", "fedjax_med.training",
                  "fedjax_med.training.audit", "fedjax_med.training.checkpoint",
                  "fedjax_med.training.evaluation", "fedjax_med.training.evaluation_tasks",
                  "fedjax_med.training.loop", "fedjax_med.training.report",
                  "fedjax_med.training.sharding"):
    assert package in MODULES
  assert len(PUBLIC) > 300


def test_the_checker_sees_a_missing_docstring():
  @dataclasses.dataclass
  class Plain:
    a: int

  def bare():
    pass

  assert _own_doc(Plain) == "" and _own_doc(bare) == ""
  assert _own_doc(types.ModuleType("m")) == ""
  assert _own_doc((1, 2)) is None and _own_doc({"a": 1}) is None and _own_doc(3.0) is None
  assert _own_doc(fm.FederatedData).strip()


def test_every_public_name_has_a_docstring():
  missing = sorted({f"{module}.{name}" if name else module
                    for module, name, obj in PUBLIC
                    if (doc := _own_doc(obj)) is not None and not doc.strip()})
  assert not missing, f"public names without a docstring: {missing}"


ALGORITHMS = [n for n in fm.algorithms.__all__
              if not isinstance(getattr(fm.algorithms, n), types.ModuleType)]


def test_no_paper_list_names_algorithms():
  assert set(NO_PAPER) <= set(ALGORITHMS)


@pytest.mark.parametrize("name", sorted(set(ALGORITHMS) - set(NO_PAPER)))
def test_every_algorithm_names_its_paper(name):
  fn = getattr(fm.algorithms, name)
  text = (fn.__doc__ or "") + "\n" + (inspect.getmodule(fn).__doc__ or "")
  assert YEAR.search(text) and VENUE.search(text), (
      f"fm.algorithms.{name}: neither its docstring nor its module's names a paper"
      " (a year and 'et al.' or a venue)")
