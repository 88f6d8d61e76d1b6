"""UNet3D, the multi-class soft-Dice loss and the per-class Dice metrics.

References the code did not compute: parameter counts from the closed form
of each layer; flax's own `ConvTranspose` and `max_pool` for the up-sampling
and pooling layers; float64 NumPy loops written here from the equations for
the loss and the Dice metrics; a hand-computed tiny case; XLA's native
convolutions in float64 (`jax.enable_x64`) for the model's outputs and
gradients under vmap over per-client parameters with `fm.convs_as_matmuls`
and with the planes convolution (`conv="planes"`); a float64 NumPy loop over
the 27 offsets for `conv3d_same`'s value, input and kernel gradients; the
im2col rewrite of nn.Conv for a FedAvg round with the planes path. The
two-round FedAvg run is a smoke test (it runs, and the objective goes down),
not an equation test.
"""

from __future__ import annotations

import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_med as fm
from fedjax_med.core import conv as conv_lib
from fedjax_med.losses.segmentation import softmax_dice
from fedjax_med.metrics.segmentation import multiclass_dice, volume_dice_scores
from fedjax_med.models.unet import num_params
from fedjax_med.models.unet3d import UNet3D, UpConv3D, max_pool_2x2x2

# ---------------------------------------------------------------- the model


def _closed_form_params(features, c_in, num_classes, convs_per_block=2, group_norm=False):
  """3x3x3 conv: 27 C_in C_out + C_out; 2x2x2 up: 8 C_in C_out + C_out; head: F0 C + C."""
  conv = lambda ci, co: 27 * ci * co + co + (2 * co if group_norm else 0)

  def block(ci, co):
    return conv(ci, co) + sum(conv(co, co) for _ in range(convs_per_block - 1))

  total, ci = 0, c_in
  for f in features[:-1]:
    total += block(ci, f)
    ci = f
  total += block(ci, features[-1])
  below = features[-1]
  for f in reversed(features[:-1]):
    total += 8 * below * f + f + block(2 * f, f)
    below = f
  return total + features[0] * num_classes + num_classes


@pytest.mark.parametrize("features", [(8, 16, 32), (16, 32, 64), (4,), (4, 8)])
def test_output_shape_and_parameter_count(features):
  model = UNet3D(features=features, num_classes=3)
  x = jnp.ones((2, 8, 12, 4, 1))
  params = jax.eval_shape(model.init, jax.random.key(0), x)  # shapes only, no compile
  assert jax.eval_shape(model.apply, params, x).shape == (2, 8, 12, 4, 3)
  assert num_params(params) == _closed_form_params(features, 1, 3)
  gn = UNet3D(features=features, norm="group")
  assert num_params(jax.eval_shape(gn.init, jax.random.key(0), x)) == _closed_form_params(
      features, 1, 3, group_norm=True)


def test_docstring_parameter_counts():
  assert _closed_form_params((8, 16, 32), 1, 3) == 85_035
  assert _closed_form_params((16, 32, 64), 1, 3) == 339_283
  for text in ("85,035", "339,283"):
    assert text in fm.models.unet3d.__doc__


def test_input_checks():
  model = UNet3D()
  with pytest.raises(ValueError, match="multiples of 4"):
    model.init(jax.random.key(0), jnp.ones((1, 8, 6, 8, 1)))
  with pytest.raises(ValueError, match=r"\[B, X, Y, Z, C\]"):
    model.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))
  with pytest.raises(ValueError, match="norm must be"):
    UNet3D(norm="batch").init(jax.random.key(0), jnp.ones((1, 8, 8, 8, 1)))
  with pytest.raises(ValueError, match="divisible"):
    UNet3D(features=(6, 8), norm="group").init(jax.random.key(0), jnp.ones((1, 8, 8, 8, 1)))
  assert fm.models.UNet3D is UNet3D


def test_up_conv_and_pooling_match_flax():
  x = jax.random.normal(jax.random.key(1), (2, 3, 4, 5, 6))
  up = UpConv3D(4)
  params = up.init(jax.random.key(2), x)
  kernel, bias = params["params"]["kernel"], params["params"]["bias"] + 0.3
  ref = nn.ConvTranspose(4, (2, 2, 2), strides=(2, 2, 2), padding="VALID").apply(
      {"params": {"kernel": jnp.flip(kernel, (0, 1, 2)), "bias": bias}}, x)
  got = jax.jit(up.apply)({"params": {"kernel": kernel, "bias": bias}}, x)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  x = jax.random.normal(jax.random.key(3), (2, 4, 6, 8, 3))
  np.testing.assert_array_equal(jax.jit(max_pool_2x2x2)(x),
                                nn.max_pool(x, (2, 2, 2), strides=(2, 2, 2)))


# ---------------------------------------------------------------- the loss


def _numpy_softmax_dice(logits, y, *, dice_weight=1.0, smooth=1.0, include_background=False):
  """f_i = CE_i + lambda (1 - mean_c Dice_ic), voxel by voxel in float64."""
  logits = np.asarray(logits, np.float64)
  y = np.asarray(y, np.float64)
  if y.ndim == logits.ndim:
    target, valid = y[..., 0], y[..., 1]
  else:
    target, valid = y, np.ones(y.shape)
  num_classes = logits.shape[-1]
  classes = range(0 if include_background else 1, num_classes)
  out = []
  for i in range(logits.shape[0]):
    ce, count = 0.0, 0.0
    pt, ps, ts = [0.0] * num_classes, [0.0] * num_classes, [0.0] * num_classes
    for j in np.ndindex(*logits.shape[1:-1]):
      if valid[i][j] == 0:
        continue
      z = logits[i][j]
      m = max(z)
      log_norm = m + math.log(sum(math.exp(zc - m) for zc in z))
      t = int(round(target[i][j]))
      ce -= z[t] - log_norm
      count += 1
      for c in range(num_classes):
        p = math.exp(z[c] - log_norm)
        ps[c] += p
        ts[c] += float(t == c)
        pt[c] += p * float(t == c)
    dice = [(2 * pt[c] + smooth) / (ps[c] + ts[c] + smooth) for c in classes]
    out.append(ce / max(count, 1.0) + dice_weight * (1.0 - sum(dice) / len(dice)))
  return np.array(out)


def _labels(rng, shape, num_classes=3, valid_share=0.7):
  target = rng.integers(0, num_classes, shape).astype(np.float32)
  valid = (rng.uniform(size=shape) < valid_share).astype(np.float32)
  return np.stack([target, valid], -1)


IDENTITY = lambda params, x: x * params  # the "model" outputs x (times 1.0): logits = x


@pytest.mark.parametrize("kwargs", [{}, dict(include_background=True, dice_weight=0.5,
                                             smooth=0.1), dict(dice_weight=0.0)])
def test_softmax_dice_matches_a_numpy_loop(kwargs):
  rng = np.random.default_rng(0)
  logits = (2 * rng.normal(size=(3, 4, 5, 3, 3))).astype(np.float32)
  y = _labels(rng, (3, 4, 5, 3))
  y[1, ..., 1] = 0.0  # an example without any valid voxel: CE 0, every Dice s/s = 1
  y[2, ..., 0] = np.where(y[2, ..., 0] == 2, 1, y[2, ..., 0])  # class 2 absent
  loss = softmax_dice(IDENTITY, num_classes=3, **kwargs)
  got = jax.jit(loss)(1.0, logits, y)
  ref = _numpy_softmax_dice(logits, y, **kwargs)
  assert got.shape == (3,)
  np.testing.assert_allclose(got, ref, rtol=2e-6, atol=2e-6)
  np.testing.assert_allclose(got[1], 0.0, atol=1e-7)
  assert loss.label_type == "multiclass"


def test_softmax_dice_class_only_labels_mean_every_voxel_valid():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 4, 4, 4, 3)).astype(np.float32)
  target = rng.integers(0, 3, (2, 4, 4, 4)).astype(np.float32)
  loss = softmax_dice(IDENTITY, num_classes=3)
  np.testing.assert_allclose(loss(1.0, logits, target), _numpy_softmax_dice(logits, target),
                             rtol=2e-6)
  np.testing.assert_allclose(loss(1.0, logits, target[..., None]),
                             _numpy_softmax_dice(logits, target), rtol=2e-6)


def test_softmax_dice_option_and_shape_errors():
  with pytest.raises(ValueError, match="num_classes"):
    softmax_dice(IDENTITY, num_classes=1)
  with pytest.raises(ValueError, match="dice_weight"):
    softmax_dice(IDENTITY, num_classes=3, dice_weight=-1)
  loss = softmax_dice(IDENTITY, num_classes=3)
  with pytest.raises(ValueError, match="logits"):
    loss(1.0, jnp.zeros((2, 4, 4, 4, 2)), jnp.zeros((2, 4, 4, 4, 2)))
  with pytest.raises(ValueError, match="y must be"):
    loss(1.0, jnp.zeros((2, 4, 4, 4, 3)), jnp.zeros((2, 4, 4, 5, 2)))


def _scramble_padding(rng, logits, y):
  """Arbitrary logits (NaN, inf, large) and classes in the padded voxels only."""
  pad = y[..., 1] == 0
  logits, y = logits.copy(), y.copy()
  junk = rng.normal(size=logits.shape).astype(np.float32) * 1e3
  junk.reshape(-1)[::7] = np.nan
  junk.reshape(-1)[3::11] = np.inf
  logits[pad] = junk[pad]
  y[..., 0][pad] = rng.integers(0, 9, size=int(pad.sum()))
  return logits, y


def test_padded_voxels_change_neither_the_loss_nor_its_gradient():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(3, 4, 4, 4, 3)).astype(np.float32)
  y = _labels(rng, (3, 4, 4, 4))
  logits2, y2 = _scramble_padding(rng, logits, y)
  assert not np.array_equal(logits, logits2, equal_nan=True)
  loss = softmax_dice(IDENTITY, num_classes=3)
  value_and_grad = jax.jit(jax.value_and_grad(lambda z, y: jnp.sum(loss(1.0, z, y))))
  v1, g1 = value_and_grad(logits, y)
  v2, g2 = value_and_grad(logits2, y2)
  np.testing.assert_array_equal(v1, v2)
  np.testing.assert_array_equal(g1, g2)
  assert np.all(np.asarray(g1)[y[..., 1] == 0] == 0) and np.isfinite(g1).all()


def test_loss_gradient_through_the_model_is_finite():
  model = UNet3D(features=(4, 8))
  x = jax.random.normal(jax.random.key(4), (2, 8, 8, 8, 1))
  y = _labels(np.random.default_rng(3), (2, 8, 8, 8))
  params = model.init(jax.random.key(5), x)
  loss = softmax_dice(model.apply, num_classes=3)
  value, grads = jax.jit(jax.value_and_grad(lambda p: jnp.mean(loss(p, x, y))))(params)
  leaves = jax.tree_util.tree_leaves(grads)
  assert np.isfinite(value) and all(np.isfinite(g).all() for g in leaves)
  assert all(np.abs(g).max() > 0 for g in leaves)


# ---------------------------------------------------------------- the metrics


def test_multiclass_dice_by_hand():
  pred = np.array([[0, 1, 1, 2, 2, 0], [0, 0, 0, 0, 0, 2]])
  target = np.array([[0, 1, 2, 2, 0, 0], [0, 0, 0, 0, 0, 0]])
  valid = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
  got = multiclass_dice(pred, target, valid, 3)
  # case 0: class 1 P={1,2} T={1}: 2*1/3; class 2 P={3,4} T={2,3}: 2*1/4.
  # case 1: both classes empty in the valid region (the 2 is padding): 1.0 by definition.
  np.testing.assert_array_equal(got, [[2 / 3, 0.5], [1.0, 1.0]])
  assert got.dtype == np.float64
  np.testing.assert_array_equal(multiclass_dice(pred, target, None, 3)[1], [1.0, 0.0])
  with pytest.raises(ValueError, match="inside the valid region"):
    multiclass_dice(pred, target + 3 * (1 - valid), None, 3)
  np.testing.assert_array_equal(multiclass_dice(pred, target + 3 * (1 - valid), valid, 3), got)


def _numpy_dice_loop(pred, target, valid, num_classes):
  out = np.zeros((pred.shape[0], num_classes - 1))
  for n in range(pred.shape[0]):
    for c in range(1, num_classes):
      both = p_count = t_count = 0
      for j in np.ndindex(*pred.shape[1:]):
        if valid[n][j]:
          both += pred[n][j] == c and target[n][j] == c
          p_count += pred[n][j] == c
          t_count += target[n][j] == c
      out[n, c - 1] = 1.0 if p_count + t_count == 0 else 2.0 * both / (p_count + t_count)
  return out


def test_multiclass_dice_matches_a_numpy_loop():
  rng = np.random.default_rng(4)
  pred = rng.integers(0, 4, (5, 6, 5, 4))
  target = rng.integers(0, 4, (5, 6, 5, 4))
  valid = rng.uniform(size=(5, 6, 5, 4)) < 0.6
  target[2][target[2] == 3] = 0
  pred[2][pred[2] == 3] = 1  # class 3 empty in case 2
  np.testing.assert_allclose(multiclass_dice(pred, target, valid, 4),
                             _numpy_dice_loop(pred, target, valid, 4), rtol=1e-15)


def test_volume_dice_scores_and_padding_invariance():
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(4, 4, 6, 4, 3)).astype(np.float32)
  y = _labels(rng, (4, 4, 6, 4))
  scores = volume_dice_scores(logits, y)
  d = _numpy_dice_loop(logits.argmax(-1), y[..., 0], y[..., 1], 3)
  assert set(scores) == {"dice_anterior", "dice_posterior", "dice_mean"}
  np.testing.assert_allclose(
      [scores["dice_anterior"], scores["dice_posterior"], scores["dice_mean"]],
      [d[:, 0].mean(), d[:, 1].mean(), d.mean()], rtol=1e-14)
  probs = np.asarray(jax.nn.softmax(logits, -1))
  assert volume_dice_scores(probs, y) == scores
  logits2, y2 = _scramble_padding(rng, logits, y)
  assert volume_dice_scores(logits2, y2) == scores
  with pytest.raises(ValueError, match="background"):
    volume_dice_scores(logits[..., :2], y)


# ---------------------------------------------------------------- federated


def _sites(num_sites=2, n=4, size=8, seed=0):
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


def test_fedavg_two_rounds_on_two_sites_lowers_the_objective():
  data = _sites()
  model = UNet3D(features=(4, 8))
  params = model.init(jax.random.key(6), data.x[0, :1])
  loss = softmax_dice(model.apply, num_classes=3)
  algorithm = fm.algorithms.fedavg(loss, client_optimizer=optax.adam(1e-2), batch_size=2,
                                   local_epochs=2)
  state = algorithm.init(params)
  objective = jax.jit(lambda p: fm.weighted_objective(loss, p, data))
  before = float(objective(state.params))
  for r in range(2):
    state, metrics = algorithm.round(state, data, jax.random.key(r))
    assert np.isfinite(metrics["train_loss"])
  after = float(objective(state.params))
  assert np.isfinite(after) and after < before


# ---------------------------------------------------------------- the conv path


def _count_convs(closed) -> int:
  jaxpr = getattr(closed, "jaxpr", closed)
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == "conv_general_dilated"
    n += sum(_count_convs(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
  return n


def _cast(tree, dtype):
  return jax.tree_util.tree_map(
      lambda a: jnp.asarray(np.asarray(a).astype(dtype) if np.issubdtype(np.asarray(a).dtype,
                                                                         np.floating) else a),
      tree)


def _close(got, ref, rtol):
  for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref), strict=True):
    r = np.asarray(r, np.float64)
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
  assert _count_convs(jax.make_jaxpr(_outputs_and_grads(model.apply, ct))(
      jax.tree_util.tree_map(lambda a: a[0], params), x[0])) > 0
  assert _count_convs(jax.make_jaxpr(fast(ct))(params, x)) == 0
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


def test_fedavg_round_planes_equals_native():
  """One FedAvg round (2 sites of 2 and 3 volumes, batch 2, SGD, one local epoch: a
  vmap over sites of a lax.scan over local steps, one of them a padded no-op) of
  UNet3D(conv="planes") equals
  the round of UNet3D(conv="native") (which the round computes with the im2col rewrite)
  from the same parameters: |got - ref| <= 1e-5 (|ref| + max(1, max|ref|)) per leaf
  (measured 5e-8), and the same train_loss to rtol 1e-5 (measured 6e-8)."""
  data = _sites(n=2)
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
