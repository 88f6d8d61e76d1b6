"""Toward the literature on retinal vessels (issue 16): patch augmentation, CHASE_DB1
preprocessing (green channel, CLAHE inside the FOV) and the threshold chosen on
training images, each against NumPy, hand computation or exact enumeration."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_med as fm
from fedjax_med.algorithms.segmentation import (AugmentSpec, augment_data, augment_patch,
                                                with_patches)
from fedjax_med.core.options import OptionError
from fedjax_med.data.chase_db1 import chase_db1, clahe, preprocess_image
from fedjax_med.losses.segmentation import bce_dice
from fedjax_med.metrics.segmentation import dice
from fedjax_med.models.unet import UNet

from conftest import import_experiment

GEOMETRIC = AugmentSpec()                                  # flips and rot90, no jitter


def _patch(p=6, channels=3, seed=0):
  """x [p, p, C] random in [0, 1]; y [p, p, 2] = (distinct ids, FOV disc)."""
  rng = np.random.default_rng(seed)
  x = rng.random((p, p, channels)).astype(np.float32)
  ids = np.arange(p * p, dtype=np.float32).reshape(p, p)
  r = np.hypot(*np.meshgrid(np.arange(p) - p / 2, np.arange(p) - p / 2, indexing="ij"))
  fov = (r < p / 2.2).astype(np.float32)
  return x, np.stack([ids, fov], axis=-1)


def _numpy_geometric(a, flip_h, flip_v, k):
  if flip_h:
    a = np.flip(a, 1)
  if flip_v:
    a = np.flip(a, 0)
  return np.rot90(a, k, axes=(0, 1))


# -- augmentation: geometric ----------------------------------------------------

def test_flips_and_rot90_are_the_numpy_permutations_of_x_and_y():
  x, y = _patch()
  fn = jax.jit(lambda key: augment_patch(key, jnp.asarray(x), jnp.asarray(y), GEOMETRIC))
  seen = set()
  for i in range(64):
    xa, ya, d = fn(jax.random.PRNGKey(i))
    f_h, f_v, k = bool(d["flip_h"]), bool(d["flip_v"]), int(d["k"])
    np.testing.assert_array_equal(np.asarray(xa), _numpy_geometric(x, f_h, f_v, k))
    np.testing.assert_array_equal(np.asarray(ya), _numpy_geometric(y, f_h, f_v, k))
    # Labels never change values: the ids are a permutation, the FOV keeps its count.
    np.testing.assert_array_equal(np.sort(np.asarray(ya[..., 0]).ravel()),
                                  np.arange(36, dtype=np.float32))
    assert set(np.unique(np.asarray(ya[..., 1]))) <= {0.0, 1.0}
    assert float(ya[..., 1].sum()) == float(y[..., 1].sum())
    seen.add(np.asarray(ya[..., 0]).tobytes())
  assert len(seen) == 8            # all 8 symmetries of the square occur in 64 draws


@pytest.mark.parametrize("field", ["flip_h", "flip_v", "rot90"])
def test_each_geometric_map_occurs_with_its_probability(field):
  """Counts of the map seen in augment_data's output (not its draws), n = 4000 rows.

  Acceptance |f - p| <= 4 sd (sd = sqrt(p (1 - p) / n): 0.0079 for p = 1/2, 0.0068 for
  p = 1/4), a false alarm per check of 6e-5. Power: a frequency off by 0.06 (a flip
  drawn with probability 0.44 or 0.56, a quarter turn with 0.19 or 0.31) lies > 3.5 sd
  outside the band and fails with probability > 0.999.
  """
  n, p = 4000, 4
  spec = AugmentSpec(flip_h=field == "flip_h", flip_v=field == "flip_v",
                     rot90=field == "rot90")
  ids = np.arange(p * p, dtype=np.float32).reshape(p, p, 1)
  x = np.broadcast_to(ids, (1, n, p, p, 1))
  y = np.concatenate([x, np.ones_like(x)], axis=-1)
  data = fm.FederatedData(jnp.asarray(x), jnp.asarray(y), jnp.ones((1, n), bool),
                          label_type="binary", validate=False)
  out = np.asarray(jax.jit(augment_data, static_argnums=2)(data, jax.random.PRNGKey(3),
                                                           spec).x[0, ..., 0])
  if field == "rot90":
    rotations = [np.rot90(ids[..., 0], k) for k in range(4)]
    which = np.array([[np.array_equal(o, r) for r in rotations] for o in out])
    assert np.all(which.sum(1) == 1)
    freq, prob = which.mean(0), 0.25
  else:
    flipped = np.flip(ids[..., 0], 1 if field == "flip_h" else 0)
    is_flipped = np.array([np.array_equal(o, flipped) for o in out])
    assert np.all(is_flipped | np.array([np.array_equal(o, ids[..., 0]) for o in out]))
    freq, prob = np.array([is_flipped.mean()]), 0.5
  sd = np.sqrt(prob * (1 - prob) / n)
  assert np.all(np.abs(freq - prob) <= 4 * sd), (field, freq)


# -- augmentation: photometric -------------------------------------------------

def test_photometric_maps_equal_the_numpy_formula_inside_the_fov():
  x, y = _patch(p=8, channels=3, seed=1)
  x[0, 0, 0] = 1.3                   # outside [0, 1]: clipped before gamma (in the FOV? no)
  x[4, 4, 1] = -0.2                  # inside the FOV: clipped
  spec = AugmentSpec(flip_h=False, flip_v=False, rot90=False, brightness=0.15,
                     contrast=0.3, gamma=0.4)
  fn = jax.jit(lambda key: augment_patch(key, jnp.asarray(x), jnp.asarray(y), spec))
  for i in range(20):
    xa, ya, d = fn(jax.random.PRNGKey(100 + i))
    g, c, b = float(d["gamma"]), float(d["contrast"]), float(d["brightness"])
    assert 1 / 1.4 - 1e-6 <= g <= 1.4 + 1e-6 and 0.7 <= c <= 1.3 and -0.15 <= b <= 0.15
    valid = y[..., 1] > 0
    z = np.clip(x.astype(np.float64), 0, 1) ** g
    m = z[valid].mean(axis=0)                                   # per channel, FOV only
    z = np.clip(m + c * (z - m) + b, 0, 1)
    expected = np.where(valid[..., None], z, x)
    np.testing.assert_allclose(np.asarray(xa), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(xa)[~valid], x[~valid])   # outside: untouched
    np.testing.assert_array_equal(np.asarray(ya), y)                   # labels: untouched
  # Switched off, a map is not drawn; all off: x passes exactly (no clip).
  xa, _, d = augment_patch(jax.random.PRNGKey(0), jnp.asarray(x), jnp.asarray(y),
                           AugmentSpec(False, False, False))
  np.testing.assert_array_equal(np.asarray(xa), x)
  assert float(d["gamma"]) == 1.0 and float(d["contrast"]) == 1.0 and float(d["brightness"]) == 0
  # The draws are uniform on their ranges: mean of u = log g near 0, of b near 0
  # (n = 2000, 5 sd bands: sd = range / sqrt(12 n)).
  keys = jax.random.split(jax.random.PRNGKey(7), 2000)
  draws = jax.vmap(lambda k: augment_patch(k, jnp.asarray(x), jnp.asarray(y), spec)[2])(keys)
  assert abs(float(np.log(draws["gamma"]).mean())) < 5 * 2 * np.log(1.4) / np.sqrt(12 * 2000)
  assert abs(float(draws["contrast"].mean()) - 1) < 5 * 0.6 / np.sqrt(12 * 2000)
  assert abs(float(draws["brightness"].mean())) < 5 * 0.3 / np.sqrt(12 * 2000)


@pytest.mark.slow
def test_augment_spec_and_with_patches_options():
  with pytest.raises(OptionError, match="contrast"):
    AugmentSpec(contrast=1.0)
  with pytest.raises(OptionError, match="gamma"):
    AugmentSpec(gamma=-0.1)
  model = UNet(features=(4, 8))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  algo = fm.algorithms.local_only(bce_dice(model.apply), optimizer=optax.sgd(0.0),
                                  batch_size=4)
  with pytest.raises(OptionError, match="AugmentSpec"):
    with_patches(algo, patches_per_image=2, patch_size=8, augment={"flip_h": True})
  rng = np.random.default_rng(0)
  x = rng.random((2, 3, 16, 16, 3)).astype(np.float32)
  y = np.stack([rng.random((2, 3, 16, 16)) < 0.2, np.ones((2, 3, 16, 16))], -1)
  data = fm.FederatedData(jnp.asarray(x), jnp.asarray(y, jnp.float32),
                          jnp.asarray([[True, True, True], [True, True, False]]),
                          label_type="binary")
  runs = {}
  for name, augment in (("none", None), ("geometric", GEOMETRIC)):
    patched = with_patches(algo, patches_per_image=2, patch_size=8, augment=augment)
    _, metrics = patched.round(patched.init(params, 2), data, jax.random.PRNGKey(4))
    runs[name] = np.asarray(metrics["client_train_loss"])
  # With lr 0 the loss is that of the round's patches: a dihedral map of a patch
  # changes the loss of a conv net (not equivariant), so the runs differ; padded
  # rows stay padded (the loss is finite, n_k in patches unchanged).
  assert np.all(np.isfinite(runs["geometric"]))
  assert not np.array_equal(runs["none"], runs["geometric"])


def test_augment_data_keys_follow_site_ids():
  x, y = _patch(p=4, channels=1)
  xs = np.broadcast_to(x, (3, 5, 4, 4, 1)).copy()
  ys = np.broadcast_to(y, (3, 5, 4, 4, 2)).copy()
  data = fm.FederatedData(jnp.asarray(xs), jnp.asarray(ys), jnp.ones((3, 5), bool),
                          label_type=None, validate=False)      # y[..., 0] holds ids
  run = jax.jit(augment_data, static_argnums=2)
  out = run(data, jax.random.PRNGKey(1), GEOMETRIC)
  alone = run(data.subset([2]), jax.random.PRNGKey(1), GEOMETRIC)
  np.testing.assert_array_equal(alone.y[0], out.y[2])
  np.testing.assert_array_equal(out.mask, data.mask)
  # Rows of one site get different draws (5 rows, 8 outcomes: not all equal).
  assert len({np.asarray(r).tobytes() for r in out.y[0, ..., 0]}) > 1


# -- preprocessing ---------------------------------------------------------------

def test_clahe_hand_computed():
  c = np.array([[0, 0, 1], [2, 2, 2]], np.uint8)
  # One tile, no clipping: the FOV's CDF, h = (2, 1, 3) over 6 pixels.
  np.testing.assert_allclose(clahe(c, grid=(1, 1), clip_limit=np.inf),
                             [[2 / 6, 2 / 6, 3 / 6], [1, 1, 1]], rtol=1e-6)
  # Clip level L = (256 / 6) * 6 / 256 = 1: excess (2-1) + (3-1) = 3, 3/256 per bin.
  e = 3 / 256
  np.testing.assert_allclose(
      clahe(c, grid=(1, 1), clip_limit=256 / 6),
      [[(1 + e) / 6, (1 + e) / 6, (2 + 2 * e) / 6], [(3 + 3 * e) / 6] * 3], rtol=1e-6)
  # Pixels outside the FOV neither count nor get a value.
  np.testing.assert_allclose(
      clahe(np.array([[5, 0, 7]], np.uint8), np.array([[True, False, True]]), grid=(1, 1),
            clip_limit=np.inf), [[0.5, 0.0, 1.0]], rtol=1e-6)
  # Two tiles [0, 2), [2, 4), centres 0.5 and 2.5: T0(0) = 1/2, T0(10) = 1;
  # T1(10) = 1/2, T1(20) = 1; columns 1 and 2 interpolate with weights 1/4, 3/4.
  np.testing.assert_allclose(
      clahe(np.array([[0, 10, 10, 20]], np.uint8), grid=(1, 2), clip_limit=np.inf),
      [[0.5, 0.75 * 1 + 0.25 * 0.5, 0.25 * 1 + 0.75 * 0.5, 1.0]], rtol=1e-6)
  with pytest.raises(ValueError, match="uint8"):
    clahe(np.zeros((3, 3)))


def test_preprocess_image_options():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
  fov = np.zeros((32, 40), bool)
  fov[4:28, 5:35] = True
  np.testing.assert_array_equal(preprocess_image(image, fov, None),
                                image.astype(np.float32) / np.float32(255))
  np.testing.assert_array_equal(preprocess_image(image, fov, "green"),
                                image[..., 1:2].astype(np.float32) / np.float32(255))
  green = preprocess_image(image, fov, "green_clahe")
  assert green.shape == (32, 40, 1) and np.all(green[~fov] == 0)
  assert np.all((green[fov] > 0) & (green[fov] <= 1))
  np.testing.assert_array_equal(green[..., 0], clahe(image[..., 1], fov))
  assert preprocess_image(image, fov, "clahe").shape == (32, 40, 3)
  with pytest.raises(OptionError, match="preprocess"):
    chase_db1(preprocess="blue")


# -- threshold chosen on training images ---------------------------------------------

def _experiment():
  return import_experiment("retina_vessels.py", "retina_vessels_experiment")


def test_train_threshold_is_the_argmax_of_pooled_dice():
  rv = _experiment()
  rng = np.random.default_rng(0)
  probs = [rng.random((12, 15)) for _ in range(3)]
  targets = [rng.random((12, 15)) < 0.3 + 0.4 * p for p in probs]
  fovs = [rng.random((12, 15)) < 0.8 for _ in range(3)]
  grid = rv.THRESHOLD_GRID
  # Reference: Dice of the pooled FOV pixels by fm's metric, threshold by threshold.
  flat = lambda arrays: np.concatenate([a[f] for a, f in zip(arrays, fovs)])
  reference = [dice(flat(probs) > t, flat(targets)) for t in grid]
  np.testing.assert_allclose(rv.dice_curve(probs, targets, fovs), reference, rtol=1e-12)
  best = int(np.argmax(reference))
  assert rv.train_threshold(probs, targets, fovs) == (grid[best], pytest.approx(reference[best]))
  # A separable toy case: negatives <= 0.19, positives >= 0.31: every t in
  # [0.19, 0.30] gives Dice 1, and the first of them is chosen.
  p = np.array([[0.05, 0.19, 0.31, 0.9]])
  t = np.array([[False, False, True, True]])
  assert rv.train_threshold([p], [t], [np.ones_like(t)]) == (0.19, 1.0)


# -- test-time dihedral averaging -----------------------------------------------------

def _position_dependent(xp):
  """A pixel map that is NOT equivariant (its output depends on where a pixel is),
  in NumPy or jax.numpy: [N, H, W, 2] -> [N, H, W]."""
  def f(x):
    h, w = x.shape[1:3]
    rows = xp.arange(h, dtype=xp.float32)[:, None]
    cols = xp.arange(w, dtype=xp.float32)[None, :]
    return x[..., 0] * (rows + 1.0) + x[..., 1] * xp.sqrt(cols + 2.0) + 0.01 * rows * cols
  return f


def test_dihedral_average_equals_a_numpy_loop_over_the_symmetries():
  from fedjax_med.algorithms.segmentation import dihedral_average
  x = np.random.default_rng(0).normal(size=(2, 5, 7, 2)).astype(np.float32)   # H != W
  f_np = _position_dependent(np)
  # Reference groups, written with np.rot90 / np.flip on axes (1, 2) (not the
  # library's flip-then-swap enumeration): each element g and its inverse.
  rot = lambda k: (lambda a: np.rot90(a, k, axes=(1, 2)))
  flip_w = lambda a: np.flip(a, axis=2)
  flip_h = lambda a: np.flip(a, axis=1)
  identity = lambda a: a
  groups = {
      1: [(identity, identity)],
      2: [(identity, identity), (flip_w, flip_w)],
      4: [(identity, identity), (flip_w, flip_w), (flip_h, flip_h), (rot(2), rot(2))],
      8: [(rot(k), rot(-k)) for k in range(4)]
         + [((lambda a, k=k: flip_w(rot(k)(a))), (lambda a, k=k: rot(-k)(flip_w(a))))
            for k in range(4)],
  }
  for transforms, group in groups.items():
    reference = np.mean([inverse(f_np(g(x.astype(np.float64)))) for g, inverse in group], 0)
    got = dihedral_average(_position_dependent(jnp), x, transforms=transforms)
    assert got.shape == (2, 5, 7)
    np.testing.assert_allclose(np.asarray(got), reference, rtol=1e-5, atol=1e-5)
  # Not a no-op: the 8-fold mean differs from the plain prediction by O(1).
  assert np.abs(np.asarray(dihedral_average(_position_dependent(jnp), x))
                - f_np(x)).max() > 0.5
  # An equivariant (pixel-wise) map is left unchanged by the averaging.
  pixelwise = lambda a: jnp.tanh(a[..., 0] - 2.0 * a[..., 1])
  np.testing.assert_allclose(np.asarray(dihedral_average(pixelwise, x)),
                             np.tanh(x[..., 0] - 2.0 * x[..., 1]), rtol=1e-6, atol=1e-6)


def test_dihedral_average_rejects_bad_options():
  from fedjax_med.algorithms.segmentation import dihedral_average
  x = np.zeros((1, 4, 6, 1), np.float32)
  for bad in (0, 3, 16, True):
    with pytest.raises(OptionError, match="transforms"):
      dihedral_average(lambda a: a[..., 0], x, transforms=bad)
  with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
    dihedral_average(lambda a: a[..., 0], x[0], transforms=2)
  # A prediction that loses the pixel grid is named, not broadcast.
  with pytest.raises(ValueError, match="keep"):
    dihedral_average(lambda a: a[:, :2, :, 0], x, transforms=2)


def test_retina_experiment_rejects_an_unknown_tta_before_loading(tmp_path):
  rv = _experiment()
  for bad in (3, 0, True):
    with pytest.raises(ValueError, match="tta"):
      rv.run(rv.dataclasses.replace(rv.Config.smoke(), tta=bad), str(tmp_path),
             progress=False)
