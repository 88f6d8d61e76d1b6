"""Shared helpers: a tiny linear-logistic model with a NumPy float64 twin.

The JAX side is what fedjax_med runs; the NumPy side is an independent
reference written from the equations (BCE gradient of a linear model), so
tests compare two implementations, not one with itself.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import math
import os
import shutil
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_med as fm

import _flat_threefry  # pylint: disable=g-bad-import-order
import _unrolled_threefry  # pylint: disable=g-bad-import-order

jax.config.update("jax_enable_x64", False)

# One persistent compilation cache for the whole run: the xdist workers and the
# experiments the tests start as subprocesses inherit it through the environment.
# Many tests compile the same programs (a FedAvg round of the same model, an
# experiment run twice in two processes); a hit loads the executable XLA compiled
# before, so results are those of a fresh compile, only the compile time is saved.
# A JAX_COMPILATION_CACHE_DIR the user set is used as it is (and kept).
_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_OWN_CACHE = "FEDJAX_MED_TEST_OWNS_JAX_CACHE"


def pytest_configure(config):
  """Runs first in the main process (before xdist starts its workers), then in each
  worker, which finds the directory in its environment."""
  del config
  if not os.environ.get(_CACHE_ENV):
    os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="fedjax_med_test_jax_cache_")
    os.environ[_OWN_CACHE] = os.environ[_CACHE_ENV]
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                    int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))
  # High-rank threefry draws compile slowly on XLA:CPU; draw them flat (the same
  # values, checked in tests/test_prng.py). See tests/_flat_threefry.py.
  _flat_threefry.install()
  # JAX's CPU lowering of the threefry hash is a rolled loop that XLA:CPU compiles
  # slowly; use JAX's unrolled lowering (the same bits, checked in tests/test_prng.py).
  # See tests/_unrolled_threefry.py.
  _unrolled_threefry.install()
  # JAX, fedjax_med and what they import are loaded by now: move their objects out of
  # the garbage collector's reach (gc.freeze), so that its full collections, frequent
  # while JAX traces, walk only what the tests create. These objects live for the
  # whole run anyway. FEDJAX_MED_TEST_GC_FREEZE=0 turns it off.
  if os.environ.get("FEDJAX_MED_TEST_GC_FREEZE", "1") != "0":
    gc.collect()
    gc.freeze()


_SUBPROCESS_SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_subprocess_site")


@pytest.fixture(autouse=True, scope="session")
def _harness_in_started_processes():
  """Python processes that the tests start get the same threefry workarounds, through
  tests/_subprocess_site/sitecustomize.py on their PYTHONPATH (set here, in the
  process that runs the tests, after xdist has started its workers)."""
  if os.environ.get("FEDJAX_MED_TEST_SUBPROCESS_HARNESS", "1") == "0":
    yield
    return
  before = os.environ.get("PYTHONPATH")
  os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_SUBPROCESS_SITE, before]))
  yield
  if before is None:
    os.environ.pop("PYTHONPATH", None)
  else:
    os.environ["PYTHONPATH"] = before


def pytest_unconfigure(config):
  """The main process removes the cache it made (workers leave it alone)."""
  own = os.environ.get(_OWN_CACHE)
  if own and not hasattr(config, "workerinput"):
    shutil.rmtree(own, ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Frees every compiled program after each test file.

  Each XLA:CPU executable keeps its own memory mappings; a pytest-xdist worker
  that runs thirty files keeps thousands of executables alive through JAX's
  caches and reaches the kernel's vm.max_map_count (65,530 maps: we measured
  31,000 in a worker halfway through the suite), after which LLVM's next
  mmap fails and the compile segfaults. Tests inside a file still share
  their compiled rounds (count_compilations checks rely on that).
  """
  yield
  jax.clear_caches()
  gc.collect()


@pytest.fixture(autouse=True)
def _threefry_lowering(request):
  """A test marked `jax_cpu_threefry_lowering` (a whole file through `pytestmark`, or
  one parameter) runs on JAX's own (rolled) CPU lowering of threefry instead of the
  harness's unrolled one: XLA:CPU compiles DP-SGD's rounds about 2.6x slower with the
  unrolled form (tests/_unrolled_threefry.py). The lowering is switched only when it
  changes, so the tests of a file still share their compiled programs."""
  rolled = request.node.get_closest_marker("jax_cpu_threefry_lowering") is not None
  _unrolled_threefry.use(unrolled=not rolled)
  yield


def tiered(cases, fast, key=lambda case: case, unpack=True):
  """pytest.mark.parametrize values: the cases whose key(case) is in `fast` run in
  `make test`; the others are marked slow, for `make test-all` (the slow tier).
  A tuple case is unpacked into the parameters (several argnames) unless unpack=False
  (one argname whose values are tuples)."""
  keys = {key(c) for c in cases}
  assert set(fast) <= keys, f"fast cases {sorted(set(fast) - keys, key=str)} are not cases"
  return [c if key(c) in fast else pytest.param(
      *(c if unpack and isinstance(c, tuple) else (c,)), marks=pytest.mark.slow)
          for c in cases]


EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "experiments")


def import_experiment(script: str, module_name: str):
  """experiments/<script> (a file name there, or a path) imported as the module
  `module_name`, registered in sys.modules (the scripts' dataclasses look their
  module up)."""
  spec = importlib.util.spec_from_file_location(module_name, os.path.join(EXPERIMENTS, script))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def linear_apply(params, x):
  """logits [B] = x [B, D] @ w [D] + b."""
  return x @ params["w"] + params["b"]


def bce_loss(params, x, y):
  """Per-example BCE on logits, [B]."""
  z = linear_apply(params, x)
  return jnp.logaddexp(0.0, z) - y * z


bce_loss.label_type = "binary"


def np_sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def np_bce_grad(w, b, x, y):
  """Gradient of (1/m) sum_i BCE(x_i w + b, y_i) in float64."""
  r = np_sigmoid(x @ w + b) - y
  return x.T @ r / len(y), r.mean()


def np_bce_mean(w, b, x, y):
  z = x @ w + b
  return float(np.mean(np.logaddexp(0.0, z) - y * z))


def ref_order(client_key, epoch, mask_row, n_k, shuffle=True):
  """Row order of pass `epoch` for one client (fm.epoch_permutation's contract)."""
  if not shuffle:
    return np.arange(n_k)
  perm = np.asarray(fm.epoch_permutation(jax.random.fold_in(client_key, epoch),
                                         jnp.asarray(mask_row)))
  return perm[:n_k]


def ref_local_sgd(w, b, x, y, lr, batch, mask_row, client_key, *, epochs=None, steps=None,
                  shuffle=True, extra_grad=None):
  """One client's sequential SGD in float64: returns (w_k, b_k, steps_taken).

  extra_grad(w, b, w_now, b_now) -> (dw, db) is added to each batch gradient
  (a proximal term, a control-variate correction, ...).
  """
  n = len(y)
  w0, b0 = np.array(w, np.float64), float(b)
  w, b = w0.copy(), b0
  if n == 0:
    return w, b, 0
  per_epoch = math.ceil(n / batch)
  total = epochs * per_epoch if epochs is not None else steps
  for t in range(total):
    epoch, j = divmod(t, per_epoch)
    rows = ref_order(client_key, epoch, mask_row, n, shuffle)[j * batch:(j + 1) * batch]
    gw, gb = np_bce_grad(w, b, x[rows].astype(np.float64), y[rows].astype(np.float64))
    if extra_grad is not None:
      dw, db = extra_grad(w, b)
      gw, gb = gw + dw, gb + db
    w, b = w - lr * gw, b - lr * gb
  return w, b, total


def ref_ditto_round(w, b, personal, sites, mask, round_key, lr, personal_lr, lam,
                    personal_stream):
  """One Ditto round (Li et al. 2021, Alg. 1) in float64 with one local SGD epoch of
  batch 2 per site: the FedAvg step from (w, b) with `lr`, aggregated by n_k / n, and
  each personal model's step with `personal_lr` on F_k(v) + lam/2 ||v - w||^2 (its
  batches keyed fold_in(client_key, personal_stream)). Returns (w', b', personal')."""
  n = np.array([len(y) for _, y in sites], np.float64)
  new_w, new_b, new_personal = np.zeros_like(w), 0.0, []
  for k, (x, y) in enumerate(sites):
    ck = jax.random.fold_in(round_key, k)
    wk, bk, _ = ref_local_sgd(w, b, x, y, lr, 2, mask[k], ck, epochs=1)
    new_w, new_b = new_w + n[k] / n.sum() * wk, new_b + n[k] / n.sum() * bk
    prox = lambda v, c: (lam * (v - w), lam * (c - b))
    new_personal.append(ref_local_sgd(*personal[k], x, y, personal_lr, 2, mask[k],
                                      jax.random.fold_in(ck, personal_stream), epochs=1,
                                      extra_grad=prox)[:2])
  return new_w, new_b, new_personal


def make_sites(sizes, dim=3, seed=0):
  """Sites with unequal sizes and different label balance (non-IID)."""
  rng = np.random.default_rng(seed)
  sites = []
  for k, n in enumerate(sizes):
    x = rng.normal(loc=0.3 * k, size=(n, dim)).astype(np.float32)
    y = (rng.uniform(size=n) < 0.3 + 0.15 * k).astype(np.float32)
    sites.append((x, y))
  return sites


def init_params(dim=3, seed=1):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=dim) * 0.3, jnp.float32),
          "b": jnp.asarray(0.1, jnp.float32)}


def to_np(params):
  return np.asarray(params["w"], np.float64), float(params["b"])


@contextlib.contextmanager
def count_compilations():
  """Counts the XLA programs built inside the block (compiled, or loaded from the
  persistent compilation cache): `with ... as c: c[0]`."""
  counter = [0]

  def listener(event, duration, **kwargs):
    del duration, kwargs
    # A program XLA compiled, or one loaded from the persistent compilation cache
    # (which skips the backend compile; the suite turns that cache on above).
    if event in ("/jax/core/compile/backend_compile_duration",
                 "/jax/compilation_cache/cache_retrieval_time_sec"):
      counter[0] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield counter
  finally:
    unregister = getattr(jax.monitoring, "unregister_event_duration_listener", None)
    if unregister is not None:
      unregister(listener)
    else:  # older JAX: neutralise the listener instead
      counter.append("closed")
      listener.__code__ = (lambda event, duration, **kwargs: None).__code__


@pytest.fixture
def sites():
  return make_sites([7, 3, 5])


@pytest.fixture
def data(sites):
  return fm.FederatedData.from_sites(sites, ["a", "b", "c"], label_type="binary")


def multiclass_volume_sites(num_sites=2, n=4, size=8, seed=0):
  """Volumes whose class is a function of the voxel's intensity; last 2 z-slices padded."""
  rng = np.random.default_rng(seed)
  sites = []
  for k in range(num_sites):
    x = rng.normal(size=(n + k, size, size, size, 1)).astype(np.float32)
    target = np.where(x[..., 0] > 0.8, 1, np.where(x[..., 0] < -0.8, 2, 0)).astype(np.float32)
    valid = np.ones_like(target)
    valid[..., -2:] = 0
    x[..., -2:, :] = 0.0
    target[..., -2:] = 0
    sites.append((x, np.stack([target, valid], -1)))
  return fm.FederatedData.from_sites(sites, label_type="multiclass")


def count_convs(jaxpr) -> int:
  """conv_general_dilated equations in a (Closed)Jaxpr and all its sub-jaxprs."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == "conv_general_dilated"
    count += sum(count_convs(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
  return count
