"""fedjax_med.core.prng and the test harness's two threefry workarounds (flat draws,
JAX's unrolled lowering on CPU): the values JAX and flax draw themselves, bit for bit
(the references are jax.random and flax.linen.initializers on the full shape, computed
without any of the workarounds)."""

import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _flat_threefry
import _unrolled_threefry
from conftest import tiered
from fedjax_med.core import prng

# Ranks 0-6 and an empty array. Each shape costs one compile of JAX's own (slow)
# multi-dimensional draw, so the high ranks are few.
SHAPES = [(), (7,), (4, 6), (2, 3, 5), (4, 2, 4, 9, 8), (2, 1, 2, 3, 1, 2), (3, 0, 2)]


def _tree_np(tree):
  return jax.tree_util.tree_map(np.asarray, tree)


def _unpatched(fn):
  """fn() computed with JAX's own threefry draw and lowering (the harness patches taken
  out), as NumPy."""
  with _flat_threefry.uninstalled(), _unrolled_threefry.uninstalled():
    return _tree_np(fn())


def _draws(normal, uniform, key, shape):
  """The draws compared, in one program: normal float32 and bfloat16 (as bits), a
  uniform on [-0.5, 2), and normal under vmap over 3 keys."""
  keys = jax.random.split(key, 3)
  return {"normal": normal(key, shape, jnp.float32),
          "bf16": jax.lax.bitcast_convert_type(normal(key, shape, jnp.bfloat16), jnp.uint16),
          "uniform": uniform(key, shape, jnp.float32, -0.5, 2.0),
          "vmap": jax.vmap(lambda k: normal(k, shape, jnp.float32))(keys)}


# Ranks 5 and 6 (slow compiles of JAX's own draw) in the slow tier; `make test` checks
# rank 5 through lecun_normal below.
@pytest.mark.parametrize("shape", tiered(SHAPES, [s for s in SHAPES if len(s) < 4], unpack=False),
                         ids=str)
def test_prng_normal_and_uniform_equal_jax_random_bit_for_bit(shape):
  key = jax.random.key(11)
  ref = _unpatched(lambda: jax.jit(
      lambda k: _draws(jax.random.normal, jax.random.uniform, k, shape))(key))
  got = _tree_np(jax.jit(lambda k: _draws(prng.normal, prng.uniform, k, shape))(key))
  for name in ref:
    assert got[name].dtype == ref[name].dtype and got[name].shape == ref[name].shape, name
    np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
  assert got["normal"].shape == shape and got["vmap"].shape == (3, *shape)


def test_prng_uniform_rejects_array_bounds():
  with pytest.raises(ValueError, match="minval and maxval must be scalars"):
    prng.uniform(jax.random.key(0), (2, 3), jnp.float32, jnp.zeros(3), 1.0)


@pytest.mark.parametrize("shape", [(5, 3), (3, 3, 4, 6), (3, 3, 3, 8, 16), (1, 7, 2)],
                         ids=str)
def test_prng_lecun_normal_equals_flax_initializer(shape):
  key = jax.random.key(5)
  ref = _unpatched(lambda: nn.initializers.lecun_normal()(key, shape, jnp.float32))
  got = np.asarray(prng.lecun_normal()(key, shape, jnp.float32))
  np.testing.assert_array_equal(got, ref)
  # The scale is LeCun's: truncated N(0, 1/fan_in) on [-2, 2] std units,
  # fan_in = C_in x receptive field. A loose statistical check on the larger kernel.
  if math.prod(shape) >= 3000:
    fan_in = math.prod(shape[:-1])
    assert abs(got.std() * math.sqrt(fan_in) - 1.0) < 0.05
    assert np.abs(got).max() <= 2.0 / 0.87962566103423978 / math.sqrt(fan_in) + 1e-6


def test_prng_lecun_normal_rejects_a_vector():
  with pytest.raises(ValueError, match=">= 2 axes"):
    prng.lecun_normal()(jax.random.key(0), (5,))


@pytest.mark.parametrize("model_name", ["unet3d", "unet", "cnn"])
def test_models_initialise_as_with_flax_lecun_normal(model_name, monkeypatch):
  """The models' parameters equal those drawn by flax's own lecun_normal on the full
  kernel shapes (the models' `prng` swapped for flax's initializers): the parameters
  are those of before the models drew flat. (The reference's draws go through the
  harness patch, which test_harness_flat_threefry_equals_jax_own_draw checks against
  JAX's own function; taking it out here would cost a slow compile per kernel.)"""
  import types  # pylint: disable=import-outside-toplevel
  from fedjax_med.models import cnn, conv3d, unet, unet3d  # pylint: disable=import-outside-toplevel
  model, x = {
      "unet3d": (unet3d.UNet3D(num_classes=3, features=(2, 4), conv="planes"),
                 jnp.zeros((1, 8, 8, 8, 1))),
      "unet": (unet.UNet(features=(2, 4)), jnp.zeros((1, 8, 8, 3))),
      "cnn": (cnn.CNN(), jnp.zeros((1, 28, 28, 1))),
  }[model_name]
  got = jax.jit(model.init)(jax.random.key(0), x)
  flax_init = types.SimpleNamespace(lecun_normal=nn.initializers.lecun_normal)
  for module in (cnn, conv3d, unet, unet3d):
    monkeypatch.setattr(module, "prng", flax_init)
  ref = _tree_np(jax.jit(model.init)(jax.random.key(0), x))
  leaves = jax.tree_util.tree_leaves_with_path(got)
  assert len(leaves) == len(jax.tree_util.tree_leaves(ref)) >= 4
  assert any(np.asarray(a).ndim >= 4 for _, a in leaves)
  for (path, a), b in zip(leaves, jax.tree_util.tree_leaves(ref)):
    np.testing.assert_array_equal(np.asarray(a), b, err_msg=jax.tree_util.keystr(path))


@pytest.mark.skipif(_flat_threefry.ORIGINAL is None, reason="harness patch not installed")
@pytest.mark.parametrize("bit_width", [8, 16, 32, 64])
def test_harness_flat_threefry_equals_jax_own_draw(bit_width):
  """The patched function against the function JAX ships, called directly."""
  patched = _flat_threefry.target()._threefry_random_bits_partitionable
  assert getattr(patched, "flat_threefry", False)
  with jax.enable_x64(bit_width == 64):
    key = jax.random.key_data(jax.random.key(3))
    # All widths on ranks 1-3 and an empty array; the 32-bit width (normal, uniform) on
    # ranks 5 and 6 too (each high-rank shape is a slow compile of JAX's own draw).
    for shape in SHAPES[1:4] + SHAPES[-1:] + (SHAPES[4:6] if bit_width == 32 else []):
      want = np.asarray(_flat_threefry.ORIGINAL(key, bit_width, shape))
      got = np.asarray(jax.jit(lambda k, shape=shape: patched(k, bit_width, shape))(key))
      assert got.shape == want.shape and got.dtype == want.dtype
      np.testing.assert_array_equal(got, want)


def _key_draws(key):
  """Every kind of threefry use in one program: key derivation, raw bits, floats, a
  permutation, fedjax_med's row order, under vmap and inside a scan."""
  from fedjax_med.core import local  # pylint: disable=import-outside-toplevel
  data = jax.random.key_data
  carry_bits = jax.lax.scan(
      lambda k, _: (jax.random.fold_in(k, 1), jax.random.bits(k, (2,))), key, None, length=4)
  return {"fold_in": data(jax.random.fold_in(key, 7)),
          "split": data(jax.random.split(key, 5)),
          "bits": jax.random.bits(key, (3, 5), jnp.uint32),
          "bits8": jax.random.bits(key, (9,), jnp.uint8),
          "uniform": jax.random.uniform(key, (11,)),
          "normal": jax.random.normal(key, (4, 6)),
          "permutation": jax.random.permutation(key, 9),
          "vmap_fold_in": data(jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(6))),
          "scan": carry_bits[1],
          "epoch_permutation": local.epoch_permutation(key, jnp.arange(8) < 6)}


# The tests of the unrolled-lowering patch need it installed, and a CPU (it is CPU's).
_ON_PATCHED_CPU = pytest.mark.skipif(
    not _unrolled_threefry.INSTALLED or jax.default_backend() != "cpu",
    reason="harness patch not installed, or not on CPU (the patch is CPU's)")


def _fold_in_has_a_loop() -> bool:
  """Whether fold_in lowers, right now, to JAX's own CPU form (a rolled while loop)."""
  return "while" in jax.jit(lambda k: jax.random.fold_in(k, 3)).lower(
      jax.random.key(0)).as_text()


@_ON_PATCHED_CPU
def test_harness_unrolled_threefry_equals_jax_cpu_lowering():
  """Draws compiled with JAX's unrolled threefry lowering (the harness's) equal those
  compiled with JAX's own CPU lowering (a rolled loop), bit for bit; and the patch is
  in effect: only JAX's own CPU lowering has a loop."""
  key = jax.random.key(42)
  got = _tree_np(jax.jit(_key_draws)(key))
  assert not _fold_in_has_a_loop()
  with _unrolled_threefry.uninstalled():
    want = _tree_np(jax.jit(_key_draws)(key))
    assert _fold_in_has_a_loop()
  assert set(got) == set(want)
  for name in want:
    assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  # The draws differ from one another (the comparison is not of constants).
  assert len(np.unique(got["bits"])) == 15 and len(np.unique(got["split"][:, 0])) == 5


@_ON_PATCHED_CPU
@pytest.mark.parametrize("marked", [
    pytest.param(True, marks=pytest.mark.jax_cpu_threefry_lowering, id="marked"),
    pytest.param(False, id="unmarked"),
    pytest.param(True, marks=pytest.mark.jax_cpu_threefry_lowering, id="marked-again"),
    pytest.param(False, id="unmarked-again")])
def test_harness_marker_selects_the_lowering(marked):
  """A test marked jax_cpu_threefry_lowering compiles on JAX's own CPU lowering, and
  the next unmarked one on the harness's again (conftest's `_threefry_lowering`)."""
  assert _fold_in_has_a_loop() == marked


@_ON_PATCHED_CPU
@pytest.mark.skipif(os.environ.get("FEDJAX_MED_TEST_SUBPROCESS_HARNESS") == "0",
                    reason="the harness is off for started processes")
def test_python_processes_the_tests_start_get_both_workarounds():
  """A Python process started by a test (as the experiment smoke runs and notebook
  kernels are) runs tests/_subprocess_site/sitecustomize.py: both patches are in."""
  code = ("import sys, jax\n"
          "text = jax.jit(lambda k: jax.random.fold_in(k, 3)).lower(jax.random.key(0)).as_text()\n"
          "from jax._src.random import threefry2x32 as t\n"
          "print(sys.modules['_unrolled_threefry'].INSTALLED, 'while' in text,\n"
          "      getattr(t._threefry_random_bits_partitionable, 'flat_threefry', False))\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split() == ["True", "False", "True"], proc.stdout + proc.stderr
