"""Test-harness workaround: JAX's unrolled threefry lowering on XLA:CPU.

JAX lowers its threefry2x32 hash (every `fold_in`, `split` and random draw) in two
ways: on CPU as a `fori_loop` of 5 iterations of 4 rounds ("rolled"), elsewhere
(GPU, TPU) as the 20 rounds written out ("unrolled"). Both compute the same uint32
arithmetic, so they give the same bits. XLA:CPU (jax 0.10.2) compiles the rolled form
slowly: each draw becomes a while loop of several kernels that it cannot fuse with the
code around it, and a FedAvg round draws many keys (client keys, pass keys, row
orders, step keys). One FedAvg round of logistic regression compiles in 1.2 s
with the unrolled form against 2.6 s with the rolled one (2-core AVX2 CPU;
benchmarks/threefry_lowering.py).

`install()` registers JAX's own unrolled lowering for CPU in the test processes.
tests/test_prng.py checks that draws under it equal JAX's rolled CPU lowering bit
for bit (fold_in, split, bits, uniform, normal, permutations, under vmap and scan)
and that the patch is in effect. fedjax_med itself does not patch JAX: users get
JAX's own lowering; benchmarks/README.md gives the compile times of both.
DP-SGD's rounds compile faster under JAX's own lowering, so a test (or a test file,
through `pytestmark`) marked `jax_cpu_threefry_lowering` runs on it (`use`, called
by a fixture in tests/conftest.py). Python processes that the tests start install it
too (tests/_subprocess_site/sitecustomize.py).

It touches private JAX names, so it is guarded: if they are gone (a newer JAX),
nothing is patched and the suite only runs slower. Set
FEDJAX_MED_TEST_UNROLLED_THREEFRY=0 to run the tests on JAX's CPU lowering.
"""

from __future__ import annotations

import contextlib
import os

import jax

ENV = "FEDJAX_MED_TEST_UNROLLED_THREEFRY"
INSTALLED = False


def _names():
  """(mlir, threefry2x32 module) if JAX still has the names used here, else None."""
  try:
    from jax._src.interpreters import mlir  # pylint: disable=import-outside-toplevel
    from jax._src.random import threefry2x32  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  needed = ("threefry2x32_p", "_threefry2x32_lowering_rule", "_threefry2x32_cpu_lowering_rule")
  if not all(hasattr(threefry2x32, name) for name in needed):
    return None
  if not callable(getattr(mlir, "register_lowering", None)):
    return None
  return mlir, threefry2x32


def _register(unrolled: bool) -> None:
  mlir, module = _names()
  rule = (module._threefry2x32_lowering_rule if unrolled  # pylint: disable=protected-access
          else module._threefry2x32_cpu_lowering_rule)  # pylint: disable=protected-access
  mlir.register_lowering(module.threefry2x32_p, rule, platform="cpu")


def install() -> bool:
  """Registers the unrolled lowering for CPU in this process; True if registered."""
  global INSTALLED, _IN_USE
  if os.environ.get(ENV, "1") == "0" or _names() is None:
    return False
  _register(unrolled=True)
  INSTALLED = _IN_USE = True
  return True


_IN_USE = False     # whether the unrolled lowering is registered right now


def use(unrolled: bool) -> None:
  """Registers the unrolled lowering (True) or JAX's own CPU lowering (False) for what
  is compiled next, if the harness installed it. A switch clears JAX's caches, so
  nothing compiled under the other lowering is reused; asking for the lowering in use
  changes nothing (programs compiled under it stay cached)."""
  global _IN_USE
  if not INSTALLED or unrolled == _IN_USE:
    return
  _register(unrolled=unrolled)
  _IN_USE = unrolled
  jax.clear_caches()


@contextlib.contextmanager
def uninstalled():
  """Inside the block JAX's own CPU (rolled) lowering is used, and nothing compiled
  under the patch is reused (`use` clears JAX's caches on each switch)."""
  if not INSTALLED:
    yield
    return
  before = _IN_USE
  use(unrolled=False)   # clears JAX's caches if it switches
  try:
    yield
  finally:
    use(unrolled=before)
