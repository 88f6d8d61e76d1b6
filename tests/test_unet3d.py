"""UNet3D, the multi-class soft-Dice loss and the per-class Dice metrics.

References the code did not compute: parameter counts from the closed form
of each layer; flax's own `ConvTranspose` and `max_pool` for the up-sampling
and pooling layers; float64 NumPy loops written here from the equations for
the loss and the Dice metrics; a hand-computed tiny case. The convolution
paths are tested in tests/test_unet3d_conv.py. The two-round FedAvg run is a
smoke test (it runs, and the objective goes down), not an equation test.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_med as fm
from fedjax_med.losses.segmentation import softmax_dice
from fedjax_med.metrics.segmentation import multiclass_dice, volume_dice_scores
from fedjax_med.models.unet import num_params
from fedjax_med.models.unet3d import UNet3D, UpConv3D, max_pool_2x2x2

from conftest import multiclass_volume_sites

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


@pytest.mark.slow
def test_fedavg_two_rounds_on_two_sites_lowers_the_objective():
  data = multiclass_volume_sites()
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
