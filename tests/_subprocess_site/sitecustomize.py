"""Start-up hook of the Python processes that the tests start.

tests/conftest.py puts this folder first on PYTHONPATH for the processes the tests
start (experiment smoke runs, notebook kernels, multi-device runs), so they compile
with the harness's two threefry workarounds as the test processes do
(tests/_flat_threefry.py, tests/_unrolled_threefry.py: the same bits, checked in
tests/test_prng.py, and faster XLA:CPU compiles). Outside the tests this folder is
never on the path, and fedjax_med itself patches nothing.
FEDJAX_MED_TEST_SUBPROCESS_HARNESS=0 (set before pytest starts) leaves the
processes the tests start unpatched.
"""

import importlib.util
import os
import sys

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
  """tests/<name>.py as the module `name` (the one conftest would import)."""
  if name in sys.modules:
    return sys.modules[name]
  spec = importlib.util.spec_from_file_location(name, os.path.join(_TESTS, name + ".py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


try:
  _load("_flat_threefry").install()
  _load("_unrolled_threefry").install()
except Exception as error:  # pylint: disable=broad-except
  # A start-up hook must never stop the process: run unpatched (only slower).
  print(f"tests/_subprocess_site/sitecustomize.py: harness not installed: {error!r}",
        file=sys.stderr)
