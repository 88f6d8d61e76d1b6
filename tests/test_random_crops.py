"""Random crops of volumes (`with_random_crops`): where a crop may start, what it holds,
and that the round trains on exactly those crops."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import fedjax_med as fm
from fedjax_med.algorithms.segmentation import (CROP_STREAM, crop_starts, random_crop_data,
                                                with_random_crops)

NUM_DRAWS = 3000


def _box(shape, lo, hi):
  valid = np.zeros(shape, np.float32)
  valid[tuple(slice(a, b) for a, b in zip(lo, hi))] = 1.0
  return valid


def _draws(valid, crop, n=NUM_DRAWS):
  keys = jax.random.split(jax.random.PRNGKey(0), n)
  return np.asarray(jax.vmap(lambda k: crop_starts(k, jnp.asarray(valid), crop))(keys))


def test_starts_are_uniform_over_the_admissible_origins():
  """valid box [1, 5) x [2, 4) x [0, 7) in an 8 x 6 x 7 volume, crop 2 x 2 x 3: the
  admissible origins are {1, 2, 3} x {2} x {0, ..., 4} (15 of them, enumerated here by
  hand from the rule lo <= s <= hi - c). Chi-square goodness of fit at level 1e-6: a
  wrong range fails with certainty (a count of 0 or an origin outside the set), a
  non-uniform draw (e.g. a missing +1 on the upper bound) shifts 1/15 of the mass."""
  valid = _box((8, 6, 7), (1, 2, 0), (5, 4, 7))
  starts = _draws(valid, (2, 2, 3))
  admissible = set(itertools.product([1, 2, 3], [2], range(5)))
  seen = [tuple(s) for s in starts]
  assert set(seen) == admissible
  counts = np.array([seen.count(a) for a in sorted(admissible)])
  assert stats.chisquare(counts).pvalue > 1e-6


def test_a_box_smaller_than_the_crop_starts_at_its_corner_inside_the_volume():
  valid = _box((8, 8), (3, 6), (5, 8))          # 2 x 2 valid box in the bottom-right corner
  starts = _draws(valid, (4, 4), n=50)
  # axis 0: lo = 3, hi - c = 1 < lo -> 3; axis 1: lo = 6 clipped to S - c = 4.
  assert (starts == np.array([3, 4])).all()
  # No valid voxel at all: the whole axis is the box, origins uniform on [0, S - c].
  starts = _draws(np.zeros((6, 6), np.float32), (4, 4), n=600)
  assert set(map(tuple, starts)) == set(itertools.product(range(3), range(3)))


def _volumes(seed=0):
  rng = np.random.default_rng(seed)
  k, n, shape = 2, 3, (8, 12, 8)
  x = rng.normal(size=(k, n) + shape + (1,)).astype(np.float32)
  classes = rng.integers(0, 3, size=(k, n) + shape).astype(np.float32)
  valid = np.zeros((k, n) + shape, np.float32)
  for s, i in itertools.product(range(k), range(n)):
    ends = rng.integers([5, 7, 5], [9, 13, 9])
    valid[s, i, :ends[0], :ends[1], :ends[2]] = 1.0
  y = np.stack([classes, valid], -1)
  mask = np.array([[True, True, True], [True, True, False]])
  return fm.FederatedData(x=jnp.asarray(x), y=jnp.asarray(y), mask=jnp.asarray(mask))


def test_crops_hold_the_voxels_at_their_origin():
  data = _volumes()
  key = jax.random.PRNGKey(7)
  crop = (4, 8, 4)
  out = random_crop_data(data, key, crop)
  x, y = np.asarray(data.x), np.asarray(data.y)
  assert out.x.shape == (2, 3) + crop + (1,) and out.y.shape == (2, 3) + crop + (2,)
  np.testing.assert_array_equal(np.asarray(out.mask), np.asarray(data.mask))
  for k, i in itertools.product(range(2), range(3)):
    volume_key = jax.random.fold_in(jax.random.fold_in(key, k), i)
    s = np.asarray(crop_starts(volume_key, jnp.asarray(y[k, i, ..., 1]), crop))
    window = tuple(slice(a, a + c) for a, c in zip(s, crop))
    np.testing.assert_array_equal(np.asarray(out.x[k, i]), x[k, i][window])
    np.testing.assert_array_equal(np.asarray(out.y[k, i]), y[k, i][window])
    # The crop lies inside the valid box wherever the box is at least the crop's size.
    ends = y[k, i, ..., 1].nonzero()
    for d, c in enumerate(crop):
      hi = ends[d].max() + 1
      assert s[d] >= 0 and s[d] + c <= y.shape[2 + d]
      if hi >= c:
        assert s[d] + c <= hi


@pytest.mark.slow
def test_the_round_trains_on_the_crops_of_its_key():
  """with_random_crops(fedavg).round(state, volumes, key) is fedavg's round on the crops
  drawn with fold_in(key, CROP_STREAM) (composition, bit for bit)."""
  data = _volumes(1)
  model = fm.models.UNet3D(features=(2, 4), num_classes=3)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 8, 4, 1)))
  from fedjax_med.losses.segmentation import softmax_dice
  loss = softmax_dice(model.apply, num_classes=3)
  base = fm.algorithms.fedavg(loss, client_optimizer=optax.sgd(0.1), batch_size=2,
                              local_epochs=1)
  algo = with_random_crops(base, crop_shape=(4, 8, 4))
  key = jax.random.PRNGKey(3)
  got, got_metrics = algo.round(algo.init(params), data, key)
  crops = random_crop_data(data, jax.random.fold_in(key, CROP_STREAM), (4, 8, 4))
  want, want_metrics = base.round(base.init(params), crops, key)
  for a, b in zip(jax.tree_util.tree_leaves(got.params), jax.tree_util.tree_leaves(want.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(got_metrics["train_loss"]),
                                np.asarray(want_metrics["train_loss"]))


def test_bad_crop_options_are_named():
  data = _volumes()
  base = fm.algorithms.fedavg(lambda p, x, y: jnp.zeros(x.shape[0]),
                              client_optimizer=optax.sgd(0.1), batch_size=2)
  with pytest.raises(fm.OptionError, match="crop_shape"):
    with_random_crops(base, crop_shape=4)
  with pytest.raises(fm.OptionError, match="crop_shape"):
    with_random_crops(base, crop_shape=(4, 0, 4))
  algo = with_random_crops(base, crop_shape=(4, 16, 4))
  with pytest.raises(ValueError, match="crop_shape"):
    algo.round(algo.init({"w": jnp.zeros(())}), data, jax.random.PRNGKey(0))
