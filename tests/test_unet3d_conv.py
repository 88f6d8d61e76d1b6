"""UNet3D's convolution paths under vmap over per-client parameters.

References the code did not compute: XLA's native convolutions in float64
(`jax.enable_x64`) for the model's outputs and gradients with
`fm.convs_as_matmuls` and with the planes convolution (`conv="planes"`); a
float64 NumPy loop over the 27 offsets for `conv3d_same`'s value, input and
kernel gradients; the im2col rewrite of nn.Conv for a FedAvg round with the
planes path. (Split from tests/test_unet3d.py so that pytest-xdist can run the
two halves side by side.)
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_med as fm
from fedjax_med.core import conv as conv_lib
from fedjax_med.losses.segmentation import softmax_dice
from fedjax_med.models.unet3d import UNet3D

from conftest import count_convs, multiclass_volume_sites


# ---------------------------------------------------------------- the conv path


def _cast(tree, dtype):
  return jax.tree_util.tree_map(
      lambda a: jnp.asarray(np.asarray(a).astype(dtype) if np.issubdtype(np.asarray(a).dtype,
                                                                         np.floating) else a),
      tree)


def _close(got, ref, rtol):
  for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref), strict=True):
    r = np.asarray(r, np.float64)
    # assert_allclose counts NaN == NaN as equal: a NaN reference would let a NaN pass.
    assert np.isfinite(r).all(), "the reference itself is not finite"
    scale = max(1.0, float(np.abs(r).max()))
    np.testing.assert_allclose(np.asarray(g, np.float64), r, rtol=rtol, atol=rtol * scale)


def _outputs_and_grads(apply, ct):
  def fn(p, x):
    loss = lambda p, x: jnp.sum(jnp.tanh(apply(p, x)) * ct)
    return apply(p, x), jax.value_and_grad(loss, argnums=(0, 1))(p, x)
  return fn


@functools.lru_cache(maxsize=None)
def _native_float64_reference(norm):
  """(params, x, ct, per-client outputs and gradients) of UNet3D((4, 8), norm,
  conv="native") for 3 clients, XLA's native 3D convolutions in float64, one client
  at a time (shared by the rewrite's and the planes path's tests: one compile)."""
  k = 3
  model = UNet3D(features=(4, 8), norm=norm, conv="native")
  x = jax.random.normal(jax.random.key(7), (k, 2, 4, 6, 4, 1))
  params = jax.vmap(lambda key: model.init(key, x[0]))(jax.random.split(jax.random.key(8), k))
  # Non-zero biases, so that a bias mix-up would show.
  params = jax.tree_util.tree_map(
      lambda a: a + 0.05 * jax.random.normal(jax.random.key(10), a.shape), params)
  ct = jax.random.normal(jax.random.key(9), (2, 4, 6, 4, 3))
  with jax.enable_x64(True):
    p64, x64, ct64 = _cast((params, x, ct), np.float64)
    one_client = jax.jit(_outputs_and_grads(model.apply, ct64))
    ref = [one_client(jax.tree_util.tree_map(lambda a, i=i: a[i], p64), x64[i])
           for i in range(k)]
    ref = jax.tree_util.tree_map(lambda *a: np.stack([np.asarray(b) for b in a]), *ref)
  return params, x, ct, ref


@pytest.mark.parametrize("norm", ["none", "group"])
@pytest.mark.slow
def test_convs_as_matmuls_under_vmap_matches_native_float64(norm):
  """Per-client UNet3D parameters under vmap, rewritten (`fm.convs_as_matmuls`, no conv
  left), against XLA's native 3D convolutions in float64, one client at a time:
  outputs and gradients (w.r.t. parameters and input). Elementwise
  |got - ref| <= rtol (|ref| + max(1, max|ref|)), rtol 1e-10 for the rewrite in
  float64 (both norms), 1e-5 for the rewrite in float32 (norm="none").

  The reference runs the clients in a loop, not under vmap: on XLA:CPU (jaxlib
  0.10.2) the jitted vmap of the NATIVE gradient of this model with GroupNorm was
  measured wrong (errors of order 1 in the first level's kernel gradients; the
  per-client loop, the op-by-op vmap, finite differences and the rewrite agree),
  which is one more reason the round rewrites these convolutions on CPU.
  """
  model = UNet3D(features=(4, 8), norm=norm, conv="native")
  params, x, ct, ref = _native_float64_reference(norm)
  fast = lambda ct: jax.vmap(_outputs_and_grads(fm.convs_as_matmuls(model.apply), ct))
  assert count_convs(jax.make_jaxpr(_outputs_and_grads(model.apply, ct))(
      jax.tree_util.tree_map(lambda a: a[0], params), x[0])) > 0
  assert count_convs(jax.make_jaxpr(fast(ct))(params, x)) == 0
  with jax.enable_x64(True):
    p64, x64, ct64 = _cast((params, x, ct), np.float64)
    _close(jax.jit(fast(ct64))(p64, x64), ref, rtol=1e-10)
  if norm == "none":  # float32, as the round runs (one more compile: once is enough)
    _close(jax.jit(fast(ct))(params, x), ref, rtol=1e-5)
  # The round's rule selects exactly the 3x3x3 convolutions (the per-client kernels).
  one = jax.tree_util.tree_map(lambda a: a[0], params)
  closed = jax.make_jaxpr(lambda p, x: jnp.sum(model.apply(p, x)))(one, x[0])
  leaves = jax.tree_util.tree_leaves((one, x[0]))
  assert len(conv_lib.argument_kernel_convs(closed, [True] * len(leaves))) == 6


# ---------------------------------------------------------------- the planes convolution


def _numpy_conv3d(x, k, g):
  """y, dx, dk of the 3x3x3 SAME convolution in float64, a loop over the 27 offsets:
  y[p] = sum_w x_pad[p + w] @ k[w]; dx_pad[p + w] += g[p] @ k[w]^T; dk[w] = sum_p
  x_pad[p + w]^T g[p]."""
  x, k, g = (np.asarray(a, np.float64) for a in (x, k, g))
  b, nx, ny, nz, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
  y = np.zeros((b, nx, ny, nz, k.shape[-1]))
  dxp, dk = np.zeros_like(xp), np.zeros_like(k)
  for d, e, f in itertools.product(range(3), repeat=3):
    window = (slice(None), slice(d, d + nx), slice(e, e + ny), slice(f, f + nz))
    y += xp[window] @ k[d, e, f]
    dxp[window] += g @ k[d, e, f].T
    dk[d, e, f] = np.einsum("bxyzi,bxyzo->io", xp[window], g)
  return y, dxp[:, 1:-1, 1:-1, 1:-1], dk


@pytest.mark.parametrize("c_in,c_out", [(1, 3), (2, 2), (2, 5), (5, 2)])
def test_conv3d_same_matches_numpy_under_vmap_in_a_scan(c_in, c_out):
  """conv3d_same's value, dx and dk against the float64 NumPy loop, in float64 (error
  <= 1e-12 of the largest entry), for the branches C_in = 1, C_in = C_out (in-stack
  forward, out-stack dx), C_in < C_out and C_in > C_out, on odd sizes 5 x 3 x 7, as the
  round runs them: jax.vmap over 2 clients of a lax.scan over 2 steps, with per-client
  kernels (lax.map) and with one shared kernel (clients folded into the batch)."""
  from fedjax_med.models.conv3d import conv3d_same
  rng = np.random.default_rng(c_in * 10 + c_out)
  clients, steps, shape = 2, 2, (2, 5, 3, 7)
  x = rng.normal(size=(clients, steps) + shape + (c_in,))
  g = rng.normal(size=(clients, steps) + shape + (c_out,))
  k = rng.normal(size=(clients, 3, 3, 3, c_in, c_out))

  def client(kernel, xs, gs):
    def step(carry, xg):
      y, vjp = jax.vjp(conv3d_same, xg[0], kernel)
      return carry, (y, *vjp(xg[1]))
    return jax.lax.scan(step, 0, (xs, gs))[1]

  both = jax.jit(lambda k, x, g: (jax.vmap(client)(k, x, g),
                                  jax.vmap(client, in_axes=(None, 0, 0))(k[0], x, g)))
  with jax.enable_x64(True):
    per_client, shared = both(*(jnp.asarray(a) for a in (k, x, g)))
  for c, t in itertools.product(range(clients), range(steps)):
    for got, kernel in ((per_client, k[c]), (shared, k[0])):
      for a, r in zip((got[0][c, t], got[1][c, t], got[2][c, t]),
                      _numpy_conv3d(x[c, t], kernel, g[c, t]), strict=True):
        np.testing.assert_allclose(np.asarray(a), r, rtol=0, atol=1e-12 * np.abs(r).max())


def test_conv3d_same_shape_errors():
  from fedjax_med.models.conv3d import conv3d_same
  with pytest.raises(ValueError, match=r"\[3, 3, 3, C_in, C_out\]"):
    conv3d_same(jnp.zeros((1, 4, 4, 4, 2)), jnp.zeros((3, 3, 3, 3, 4)))
  with pytest.raises(ValueError, match="kernel"):
    conv3d_same(jnp.zeros((1, 4, 4, 4, 2)), jnp.zeros((5, 5, 5, 2, 4)))
  with pytest.raises(ValueError, match="x"):
    conv3d_same(jnp.zeros((4, 4, 4, 2)), jnp.zeros((3, 3, 3, 2, 4)))


def test_unet3d_conv_option():
  x = jnp.ones((1, 4, 4, 4, 1))
  with pytest.raises(ValueError, match=r"conv must be one of \('auto', 'planes', 'native'\)"):
    UNet3D(conv="fft").init(jax.random.key(0), x)
  # The same parameters (names, shapes, initial values) for both paths.
  planes = UNet3D(features=(2, 4), conv="planes").init(jax.random.key(1), x)
  native = UNet3D(features=(2, 4), conv="native").init(jax.random.key(1), x)
  assert jax.tree_util.tree_structure(planes) == jax.tree_util.tree_structure(native)
  for a, b in zip(jax.tree_util.tree_leaves(planes), jax.tree_util.tree_leaves(native)):
    assert a.dtype == b.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)


def test_unet3d_conv_auto_follows_the_backend(monkeypatch):
  assert UNet3D(conv="planes").conv_path() == "planes"
  assert UNet3D(conv="native").conv_path() == "native"
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert UNet3D().conv_path() == "planes"
  for backend in ("gpu", "tpu"):
    monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
    assert UNet3D().conv_path() == "native"


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["none", "group"])
def test_planes_unet3d_under_vmap_matches_native_float64(norm):
  """UNet3D(conv="planes") on the parameters of UNet3D(conv="native"), under jax.vmap over
  3 clients' parameters, against the native model in float64 one client at a time
  (`_native_float64_reference`): outputs and gradients (parameters and input). Every
  branch of conv3d_same occurs (1 -> 4, 4 -> 4, 4 -> 8, 8 -> 8, 8 -> 4 channels).
  Elementwise |got - ref| <= rtol (|ref| + max(1, max|ref|)) with rtol 1e-10 in
  float64 (measured 1.5e-15 / 1.2e-14 for norm none / group) and in float32 1e-5 /
  5e-5 (measured 3.5e-7 / 5.5e-6; the native model in float32 itself: 5.6e-7 / 8.5e-6)."""
  params, x, ct, ref = _native_float64_reference(norm)
  model = UNet3D(features=(4, 8), norm=norm, conv="planes")
  planes = lambda ct: jax.vmap(_outputs_and_grads(model.apply, ct))
  closed = jax.make_jaxpr(lambda p, x: jnp.sum(model.apply(p, x)))(
      jax.tree_util.tree_map(lambda a: a[0], params), x[0])
  assert conv_lib.argument_kernel_convs(closed, [True] * len(jax.tree_util.tree_leaves(
      (params, x)))) == set()  # the round's rewrite leaves the planes path alone
  with jax.enable_x64(True):
    p64, x64, ct64 = _cast((params, x, ct), np.float64)
    _close(jax.jit(planes(ct64))(p64, x64), ref, rtol=1e-10)
  _close(jax.jit(planes(ct))(params, x), ref, rtol=1e-5 if norm == "none" else 5e-5)


@pytest.mark.slow
def test_fedavg_round_planes_equals_native():
  """One FedAvg round (2 sites of 2 and 3 volumes, batch 2, SGD, one local epoch: a
  vmap over sites of a lax.scan over local steps, one of them a padded no-op) of
  UNet3D(conv="planes") equals
  the round of UNet3D(conv="native") (which the round computes with the im2col rewrite)
  from the same parameters: |got - ref| <= 1e-5 (|ref| + max(1, max|ref|)) per leaf
  (measured 5e-8), and the same train_loss to rtol 1e-5 (measured 6e-8)."""
  data = multiclass_volume_sites(n=2)
  results = []
  for conv in ("planes", "native"):
    model = UNet3D(features=(2, 4), conv=conv)
    params = UNet3D(features=(2, 4), conv="native").init(jax.random.key(11), data.x[0, :1])
    loss = softmax_dice(model.apply, num_classes=3)
    algorithm = fm.algorithms.fedavg(loss, client_optimizer=optax.sgd(0.5), batch_size=2,
                                     local_epochs=1)
    state, metrics = algorithm.round(algorithm.init(params), data, jax.random.key(12))
    results.append((state.params, metrics["train_loss"]))
  (got, got_loss), (ref, ref_loss) = results
  _close(got, ref, rtol=1e-5)
  np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5)
  assert not all(np.array_equal(a, b) for a, b in zip(
      jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(
          UNet3D(features=(2, 4)).init(jax.random.key(11), data.x[0, :1]))))
