"""Test-harness workaround for slow XLA:CPU compiles of high-rank threefry draws.

With `jax_threefry_partitionable` on (JAX's default), the bits JAX draws for an
array of shape S are threefry2x32(key, flat index) laid out row-major, so drawing
prod(S) bits flat and reshaping gives the same bits. XLA's CPU compiler is slow on
the multi-dimensional form: compiling `jax.random.normal` of shape [4, 2, 4, 9, 8]
takes 4.8 s, the same 576 values drawn flat 0.3 s (jax 0.10.2, 2-core AVX2 CPU).
The tests draw many such arrays (data [K, N, D], flax kernels [3, 3, C, F]), each
a separate compile. `install()` makes JAX's partitionable threefry draw flat and
reshape in the test processes: the same values (tests/test_prng.py checks the
patched function against JAX's own for ranks 0-6 and bit widths 8-64), about 2x
less time on the convolution test files (320 s -> 154 s on test_conv_rewrite +
test_unet3d). fedjax_med itself does not patch JAX; its own high-rank draws use
`fedjax_med.core.prng`, which draws flat through JAX's public API.

It touches a private JAX function, so it is guarded: if that function is gone (a
newer JAX), nothing is patched and the suite only runs slower. Set
FEDJAX_MED_TEST_FLAT_THREEFRY=0 to run the tests on JAX's unpatched draws. Python
processes that the tests start install it too (tests/_subprocess_site/sitecustomize.py).
"""

from __future__ import annotations

import contextlib
import math
import os

import jax
from jax import lax

ENV = "FEDJAX_MED_TEST_FLAT_THREEFRY"
ORIGINAL = None     # JAX's own function, kept for tests/test_prng.py


def target():
  """JAX's module that holds the partitionable threefry bits, or None."""
  try:
    from jax._src.random import threefry2x32  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  if not callable(getattr(threefry2x32, "_threefry_random_bits_partitionable", None)):
    return None
  return threefry2x32


def flat(original):
  """The draw of `original` at shape (prod(S),), reshaped to S (S of >= 2 static axes)."""

  def random_bits(key, bit_width, shape):
    shape = tuple(shape)
    if len(shape) < 2 or not all(isinstance(d, int) for d in shape):
      return original(key, bit_width, shape)
    return lax.reshape(original(key, bit_width, (math.prod(shape),)), shape)

  random_bits.flat_threefry = True
  return random_bits


def install() -> bool:
  """Patches JAX's partitionable threefry bits in this process; True if patched."""
  global ORIGINAL
  module = target()
  if os.environ.get(ENV, "1") == "0" or module is None:
    return False
  current = module._threefry_random_bits_partitionable  # pylint: disable=protected-access
  if getattr(current, "flat_threefry", False):
    return True
  ORIGINAL = current
  module._threefry_random_bits_partitionable = flat(current)  # pylint: disable=protected-access
  return True


@contextlib.contextmanager
def uninstalled():
  """Inside the block, JAX's own (unpatched) function draws, and nothing compiled under
  the patch is reused (JAX's caches are cleared on entry and exit)."""
  module = target()
  if ORIGINAL is None or module is None:
    yield
    return
  current = module._threefry_random_bits_partitionable  # pylint: disable=protected-access
  module._threefry_random_bits_partitionable = ORIGINAL  # pylint: disable=protected-access
  jax.clear_caches()
  try:
    yield
  finally:
    module._threefry_random_bits_partitionable = current  # pylint: disable=protected-access
    jax.clear_caches()
