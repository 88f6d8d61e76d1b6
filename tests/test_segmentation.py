"""Segmentation: Dice and pixel metrics, BCE + soft-Dice loss, the U-Net and its
convolution, the patch sampler, rounds on patches, tiled inference, the experiment."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_med as fm
from fedjax_med.core.objective import is_batch_loss
from fedjax_med.losses.segmentation import bce_dice
from fedjax_med.metrics.classification import roc_auc
from fedjax_med.metrics.segmentation import (dice, pixel_accuracy, pixel_roc_auc,
                                             segmentation_scores)
from fedjax_med.models.unet import UNet, conv2d_same, num_params
from fedjax_med.algorithms.segmentation import (crop, patch_data, predict_tiled, sample_corners,
                                     sample_patches, tile_windows, with_patches)

from conftest import import_experiment


# -- metrics -------------------------------------------------------------------

def test_dice_hand_computed():
  pred = np.array([[1, 1, 0], [0, 1, 0]])
  target = np.array([[1, 0, 0], [0, 1, 1]])
  # |P & T| = 2, |P| = 3, |T| = 3 -> 4 / 6.
  assert dice(pred, target) == pytest.approx(4 / 6, abs=1e-12)
  # Inside the first two columns: |P & T| = 2, |P| = 3, |T| = 2 -> 4 / 5.
  region = np.array([[1, 1, 0], [1, 1, 0]], bool)
  assert dice(pred, target, region) == pytest.approx(0.8, abs=1e-12)
  assert dice(pred.astype(bool), target * 1.0) == pytest.approx(4 / 6, abs=1e-12)
  assert math.isnan(dice(np.zeros((2, 2)), np.zeros((2, 2))))
  assert dice(np.ones(3), np.zeros(3)) == 0.0
  # Accuracy: 4 of 6 pixels agree; inside the region 3 of 4.
  assert pixel_accuracy(pred, target) == pytest.approx(4 / 6)
  assert pixel_accuracy(pred, target, region) == pytest.approx(3 / 4)
  with pytest.raises(ValueError, match="binary"):
    dice(np.array([0, 2]), np.array([0, 1]))
  with pytest.raises(ValueError, match="shape"):
    dice(np.zeros(3), np.zeros(4))
  with pytest.raises(ValueError, match="mask"):
    dice(np.zeros(3), np.zeros(3), np.zeros(4))


def pairwise_auc(target, scores):
  """P(s_pos > s_neg) + 0.5 P(s_pos = s_neg) over all positive-negative pairs."""
  pos, neg = scores[target], scores[~target]
  diff = pos[:, None] - neg[None, :]
  return (np.sum(diff > 0) + 0.5 * np.sum(diff == 0)) / diff.size


def test_pixel_roc_auc_equals_pairwise_reference():
  rng = np.random.default_rng(0)
  for n in (7, 200, 3000):
    scores = np.round(rng.normal(size=n), 1)           # many ties
    target = rng.uniform(size=n) < 0.3
    region = rng.uniform(size=n) < 0.8
    assert pixel_roc_auc(scores, target) == pytest.approx(pairwise_auc(target, scores),
                                                          abs=1e-12)
    assert pixel_roc_auc(scores, target, region) == pytest.approx(
        pairwise_auc(target[region], scores[region]), abs=1e-12)
  # Images: [H, W] scores and masks.
  scores = np.round(rng.uniform(size=(30, 40)), 2)
  target = rng.uniform(size=(30, 40)) < 0.2
  region = np.zeros((30, 40), bool)
  region[5:25, 3:30] = True
  assert pixel_roc_auc(scores, target, region) == pytest.approx(
      pairwise_auc(target[region], scores[region]), abs=1e-12)
  assert math.isnan(pixel_roc_auc(np.arange(3.0), np.zeros(3)))
  scores = rng.uniform(size=(6, 5)).astype(np.float32)
  target = rng.uniform(size=(6, 5)) < 0.4
  out = segmentation_scores(scores, target, threshold=0.5)
  assert out["dice"] == dice(scores > 0.5, target)
  assert out["auc"] == pytest.approx(roc_auc(target.ravel(), scores.ravel()), abs=1e-12)


def test_second_observer_dice_equals_numpy_and_source():
  from fedjax_med.data.chase_db1 import TEST_CHILDREN, TRAIN_CHILDREN, load_raw
  raw = load_raw()
  first, second = raw.labels[0].astype(np.int64), raw.labels[1].astype(np.int64)
  per_image = []
  for i in range(28):
    # Independent NumPy: 2 sum(a b) / (sum a + sum b), whole image and in the FOV.
    a, b, f = first[i], second[i], raw.fov[i].astype(np.int64)
    reference = 2.0 * np.sum(a * b) / (np.sum(a) + np.sum(b))
    assert dice(second[i], first[i]) == pytest.approx(reference, abs=1e-12)
    inside = 2.0 * np.sum(a * b * f) / (np.sum(a * f) + np.sum(b * f))
    assert dice(second[i], first[i], raw.fov[i]) == pytest.approx(inside, abs=1e-12)
    per_image.append(reference)
  per_image = np.asarray(per_image)
  child = np.asarray([int(i[:2]) for i in raw.ids])
  # SOURCE.md (checked there with a second, independent PNG decoder).
  assert per_image.mean() == pytest.approx(0.7765, abs=1e-4)
  assert per_image[np.isin(child, TRAIN_CHILDREN)].mean() == pytest.approx(0.7681, abs=1e-4)
  assert per_image[np.isin(child, TEST_CHILDREN)].mean() == pytest.approx(0.7977, abs=1e-4)


# -- loss ----------------------------------------------------------------------

def identity_apply(params, x):
  """'Model' whose logits are x[..., 0] * w + b: [B, H, W, 1]."""
  return x[..., :1] * params["w"] + params["b"]


def np_bce_dice(z, t, v, lam, s):
  p = 1.0 / (1.0 + np.exp(-z))
  bce = np.logaddexp(0.0, z) - t * z
  return (np.sum(v * bce) / max(np.sum(v), 1.0)
          + lam * (1.0 - (2.0 * np.sum(v * p * t) + s) / (np.sum(v * p) + np.sum(v * t) + s)))


def test_bce_dice_per_example_and_batch_against_numpy():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 5, 6, 2)).astype(np.float32)
  t = (rng.uniform(size=(3, 5, 6)) < 0.3).astype(np.float32)
  v = (rng.uniform(size=(3, 5, 6)) < 0.7).astype(np.float32)
  y = np.stack([t, v], axis=-1)
  params = {"w": jnp.float32(1.3), "b": jnp.float32(-0.2)}
  z = x[..., 0].astype(np.float64) * 1.3 - 0.2
  per_example = bce_dice(identity_apply, dice_weight=0.7, smooth=1.0)
  got = np.asarray(per_example(params, x, y))
  want = [np_bce_dice(z[i], t[i], v[i], 0.7, 1.0) for i in range(3)]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert per_example.label_type == "binary"
  # Batch-level: one BCE mean and one Dice over the valid pixels of the real rows.
  batch = bce_dice(identity_apply, dice_weight=0.7, smooth=1.0, reduction="batch")
  assert is_batch_loss(batch)
  mask = np.array([True, False, True])
  got = float(batch(params, x, y, mask))
  want = np_bce_dice(z[mask], t[mask], v[mask], 0.7, 1.0)
  assert got == pytest.approx(want, rel=1e-5)
  # Pixels outside the validity mask change nothing.
  x2 = x.copy()
  x2[..., 0] = np.where(v > 0, x[..., 0], 50.0)
  np.testing.assert_allclose(per_example(params, x2, y), per_example(params, x, y),
                             rtol=1e-6)
  # Labels without a validity channel: every pixel counts.
  np.testing.assert_allclose(
      per_example(params, x, t),
      [np_bce_dice(z[i], t[i], np.ones_like(t[i]), 0.7, 1.0) for i in range(3)],
      rtol=1e-5)
  with pytest.raises(ValueError, match="reduction"):
    bce_dice(identity_apply, reduction="sum")
  with pytest.raises(ValueError, match="dice_weight"):
    bce_dice(identity_apply, dice_weight=-1)


# -- model ---------------------------------------------------------------------

def test_conv2d_same_and_its_gradients_equal_lax_conv():
  def reference(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (3, 2, 7, 9, 3))      # [K clients, B, H, W, C]
  k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 3, 5))

  def loss(conv):
    return lambda x, k: jnp.sum(jnp.sin(conv(x, k)))

  for args, axes in (((x, k), (0, 0)), ((x[0], k), (None, 0)), ((x, k[0]), (0, None))):
    ours = jax.jit(jax.vmap(jax.value_and_grad(loss(conv2d_same), (0, 1)), axes))(*args)
    theirs = jax.jit(jax.vmap(jax.value_and_grad(loss(reference), (0, 1)), axes))(*args)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(conv2d_same(x[0], k[0]), reference(x[0], k[0]), atol=1e-5)


def test_unet_shapes_size_and_errors():
  model = UNet()
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  assert num_params(params) == 29465
  assert num_params(jax.eval_shape(UNet(features=(16, 32, 64)).init, jax.random.PRNGKey(0),
                                   jnp.zeros((1, 16, 16, 3)))) == 117041
  assert jax.eval_shape(model.apply, params, jnp.zeros((2, 24, 20, 3))).shape == (2, 24, 20, 1)
  assert model.receptive_radius() == 23 and model.size_multiple() == 4
  with pytest.raises(ValueError, match="multiples of 4"):
    jax.eval_shape(model.apply, params, jnp.zeros((1, 18, 20, 3)))
  with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
    jax.eval_shape(model.apply, params, jnp.zeros((18, 20, 3)))
  # The receptive radius is tight: the gradient of one output pixel.
  grad = jax.jit(jax.grad(lambda x: model.apply(params, x)[0, 40, 41, 0]))(
      jnp.full((1, 96, 96, 3), 0.5))
  rows, cols = np.nonzero(np.abs(np.asarray(grad[0])).sum(-1))
  assert max(40 - rows.min(), rows.max() - 40, 41 - cols.min(), cols.max() - 41) == 23


# -- patches and rounds --------------------------------------------------------

def image_sites(sizes=(2, 1), h=20, w=24, seed=0):
  """Sites of random RGB images with (label, valid) per pixel; the valid
  region is a rectangle so that patch centres can be checked."""
  rng = np.random.default_rng(seed)
  sites = []
  for n in sizes:
    x = rng.uniform(size=(n, h, w, 3)).astype(np.float32)
    label = (x[..., 1] > 0.6).astype(np.float32)
    valid = np.zeros((n, h, w), np.float32)
    valid[:, 4:h - 3, 5:w - 6] = 1.0
    sites.append((x, np.stack([label, valid], axis=-1)))
  return sites


def test_patch_sampler_is_deterministic_inside_the_image_and_the_fov():
  (x, y), _ = image_sites()
  x, y = jnp.asarray(x[0]), jnp.asarray(y[0])
  key = jax.random.PRNGKey(3)
  sample = jax.jit(sample_patches, static_argnums=(3, 4))
  px, py, corners = sample(key, x, y, 64, 8)
  px2, py2, corners2 = sample(key, x, y, 64, 8)
  np.testing.assert_array_equal(corners, corners2)
  np.testing.assert_array_equal(px, px2)
  assert not np.array_equal(corners, sample(jax.random.PRNGKey(4), x, y, 64, 8)[2])
  corners = np.asarray(corners)
  assert corners.shape == (64, 2) and corners.dtype == np.int32
  assert (corners >= 0).all() and (corners[:, 0] <= 20 - 8).all() and (
      corners[:, 1] <= 24 - 8).all()
  for (r, c), patch_x, patch_y in zip(corners, np.asarray(px), np.asarray(py)):
    np.testing.assert_array_equal(patch_x, np.asarray(x)[r:r + 8, c:c + 8])
    np.testing.assert_array_equal(patch_y, np.asarray(y)[r:r + 8, c:c + 8])
  # Centres lie in the valid rectangle (rows 4..16, cols 5..17); an unclipped
  # corner is the centre minus 4.
  centre_r, centre_c = corners[:, 0] + 4, corners[:, 1] + 4
  unclipped = (corners[:, 0] < 12) & (corners[:, 1] < 16) & (corners > 0).all(1)
  assert unclipped.any()
  assert ((centre_r[unclipped] >= 4) & (centre_r[unclipped] < 17)).all()
  assert ((centre_c[unclipped] >= 5) & (centre_c[unclipped] < 18)).all()
  # Uniform over the valid pixels: every valid row is reached, no invalid one.
  corners_of = jax.jit(sample_corners, static_argnums=(2, 3))
  many = np.asarray(corners_of(key, y[..., 1], 4000, 1))
  assert set(many[:, 0].tolist()) == set(range(4, 17))
  assert set(many[:, 1].tolist()) == set(range(5, 18))
  # An empty valid mask: any pixel.
  anywhere = np.asarray(corners_of(key, jnp.zeros((20, 24)), 4000, 1))
  assert anywhere[:, 0].min() == 0 and anywhere[:, 0].max() == 19
  np.testing.assert_array_equal(crop(x, jnp.asarray([[1, 2]]), 3)[0], x[1:4, 2:5])


def test_patch_data_keys_follow_sites_and_padding_stays_masked():
  data = fm.FederatedData.from_sites(image_sites((2, 1, 3)), label_type="binary")
  key = jax.random.PRNGKey(5)
  patch_data_jit = jax.jit(patch_data, static_argnums=(2, 3))
  patches = patch_data_jit(data, key, 4, 8)
  assert patches.x.shape == (3, 12, 8, 8, 3) and patches.y.shape == (3, 12, 8, 8, 2)
  np.testing.assert_array_equal(patches.mask,
                                np.repeat(np.asarray(data.mask), 4, axis=1))
  # Site 2 alone (keeping its id) draws the same patches as inside all sites.
  alone = patch_data_jit(data.subset([2]), key, 4, 8)
  np.testing.assert_array_equal(alone.x[0], patches.x[2])
  swapped = patch_data_jit(data.subset([2, 0, 1]), key, 4, 8)
  np.testing.assert_array_equal(swapped.x[1, :8], patches.x[0, :8])


@pytest.mark.slow
def test_unet_through_algo_round_on_patches():
  data = fm.FederatedData.from_sites(image_sites((2, 1)), ["a", "b"], label_type="binary")
  model = UNet(features=(4, 8))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  loss_fn = bce_dice(model.apply)
  algo = with_patches(fm.algorithms.fedavg(loss_fn, client_optimizer=optax.adam(1e-2),
                                           local_epochs=1, batch_size=3),
                      patches_per_image=4, patch_size=8)
  state = algo.init(params)
  state, metrics = algo.round(state, data, jax.random.PRNGKey(1))
  assert jax.tree_util.tree_structure(state.params) == jax.tree_util.tree_structure(params)
  for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(params)):
    assert a.shape == b.shape
  np.testing.assert_array_equal(metrics["num_examples"], [8, 4])      # patches
  np.testing.assert_array_equal(metrics["client_steps"], [3, 2])      # ceil(n_k / 3)
  assert np.isfinite(float(metrics["train_loss"]))
  # Same key, same result (bit-identical). (round and pure_round are one function,
  # `_patched_round`, jitted or not: comparing them would compare it with itself.)
  again, _ = algo.round(algo.init(params), data, jax.random.PRNGKey(1))
  for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(again.params)):
    np.testing.assert_array_equal(a, b)
  # Local-only (per-site models with a leading K axis) and the run loop.
  local = with_patches(fm.algorithms.local_only(loss_fn, optimizer=optax.adam(1e-2),
                                                batch_size=4),
                       patches_per_image=4, patch_size=8)
  state, history = fm.run_rounds(local, local.init(params, 2), data, 2,
                                 jax.random.PRNGKey(2), progress=False)
  assert history["client_train_loss"].shape == (2, 2)
  kernel = state.client_states["params"]["params"]["logits"]["kernel"]
  assert kernel.shape == (2, 4, 1)
  with pytest.raises(ValueError, match="patch_size"):
    with_patches(local, patches_per_image=1, patch_size=32).round(
        local.init(params, 2), data, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="patches_per_image"):
    with_patches(local, patches_per_image=0, patch_size=8)


# -- tiled inference -----------------------------------------------------------

def test_tile_windows_partition_each_axis():
  for length, tile, margin in ((960, 544, 32), (1000, 256, 32), (68, 64, 24), (40, 64, 8)):
    windows = tile_windows(length, tile, margin)
    owned = np.zeros(length, int)
    for start, lo, hi in windows:
      owned[lo:hi] += 1
      assert start <= lo and hi <= start + min(tile, length)
      assert lo == 0 or lo - start >= margin
      assert hi == length or start + tile - hi >= margin
    np.testing.assert_array_equal(owned, 1)


def test_tiled_inference_equals_direct_inference():
  model = UNet(input_mean=(0.5, 0.4, 0.3), input_std=(0.2, 0.2, 0.1), output_bias=-1.0)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  images = jax.random.uniform(jax.random.PRNGKey(1), (2, 66, 90, 3))
  padded = jnp.pad(images, ((0, 0), (0, 2), (0, 2), (0, 0)))      # to multiples of 4
  direct = jax.jit(model.apply)(params, padded)[:, :66, :90, 0]
  tiled = predict_tiled(model.apply, params, images, tile=64, margin=24, tile_batch=3)
  assert tiled.shape == (2, 66, 90)
  np.testing.assert_allclose(tiled, direct, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      predict_tiled(model.apply, params, images[1], tile=64, margin=24, tile_batch=3),
      tiled[1], rtol=1e-6, atol=1e-6)
  # A margin below the receptive radius (23) is not exact: the test can fail.
  rough = predict_tiled(model.apply, params, images, tile=64, margin=4)
  assert np.abs(np.asarray(rough) - np.asarray(direct)).max() > 1e-4
  for bad in (dict(tile=62), dict(margin=32), dict(margin=-4), dict(tile_batch=0)):
    with pytest.raises(ValueError):
      predict_tiled(model.apply, params, images, **{"tile": 64, "margin": 24, **bad})


# -- experiment ----------------------------------------------------------------

def _retina_experiment():
  return import_experiment("retina_vessels.py", "retina_vessels_experiment")


def test_retina_vessels_smoke_fedavg(tmp_path):
  """The fast tier's smoke: FedAvg alone (the smoke with every strategy, below, is in
  the slow tier)."""
  module = _retina_experiment()
  out = tmp_path / "rv"
  assert module.main(["--smoke", "--out", str(out), "--no-progress",
                      "--strategies", "fedavg"]) == 0
  records = json.loads((out / "results.json").read_text())
  assert {r["strategy"] for r in records} == {"fedavg", "observer_2"}
  values = {(r["strategy"], r["site"], r["metric"]): r["value"] for r in records}
  assert values[("observer_2", "mean", "dice_image")] == pytest.approx(0.7977, abs=1e-4)
  dice = [v for (s, site, m), v in values.items() if s == "fedavg" and m == "dice"]
  assert len(dice) == 9 and all(0.0 <= v <= 1.0 for v in dice)   # 8 images + mean


@pytest.mark.slow
def test_retina_vessels_smoke(tmp_path):
  module = _retina_experiment()
  out = tmp_path / "rv"
  assert module.main(["--smoke", "--out", str(out), "--no-progress"]) == 0
  records = json.loads((out / "results.json").read_text())
  assert records and all(set(r) == {"dataset", "strategy", "seed", "site", "split",
                                    "metric", "value", "fedjax_med_version", "jax_version",
                                    "jaxlib_version", "git_commit", "device", "cpu"}
                             for r in records)
  strategies = {r["strategy"] for r in records}
  assert {"fedavg", "local", "pooled", "observer_2"} <= strategies
  sites = {r["site"] for r in records}
  assert sites == {"11L", "11R", "12L", "12R", "13L", "13R", "14L", "14R", "mean"}
  values = {(r["strategy"], r["site"], r["metric"]): r["value"] for r in records}
  # The human reference: whole-image Dice of the 2nd observer on children 11-14
  # is 0.7977 (SOURCE.md).
  assert values[("observer_2", "mean", "dice_image")] == pytest.approx(0.7977, abs=1e-4)
  for (strategy, site, metric), v in values.items():
    if metric in ("dice", "accuracy", "auc", "dice_image") and v is not None:
      assert 0.0 <= v <= 1.0
  table = (out / "table.md").read_text()
  assert "observer_2" in table and "dice" in table
  # The figure: fundus, two observers, FedAvg, one local model, pooled, side by side.
  from PIL import Image
  with Image.open(out / "predictions.png") as figure:
    assert figure.format == "PNG" and figure.width > 4 * figure.height
  # The trained models, saved for re-scoring: one file per strategy and seed, with the
  # U-Net's leaves; the local file holds both clinics' models on a leading axis.
  config = module.Config.smoke()
  template = module.UNet(features=config.features).init(
      jax.random.PRNGKey(0), jnp.zeros((1, config.patch_size, config.patch_size, 3)))
  for strategy, leading in (("fedavg", ()), ("pooled", ()), ("local", (2,))):
    like = jax.tree_util.tree_map(lambda a: np.zeros(leading + a.shape, a.dtype), template)
    loaded = fm.training.checkpoint.load_state_file(
        str(out / "params" / f"{strategy}_seed0.npz"), like)
    assert all(np.isfinite(a).all() for a in jax.tree_util.tree_leaves(loaded))
