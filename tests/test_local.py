"""Local training pieces: permutations and the batch schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_med as fm
from fedjax_med.core import local


@pytest.mark.parametrize("n", [1, 7, 64, local.RANK_MAX_ROWS, local.RANK_MAX_ROWS + 5])
def test_sort_permutation_equals_stable_argsort(n):
  rng = np.random.default_rng(n)
  for _ in range(5):
    keys = rng.integers(0, 4, size=n).astype(np.float32)   # many ties
    np.testing.assert_array_equal(local.sort_permutation(jnp.asarray(keys)),
                                  np.argsort(keys, kind="stable"))
    keys = rng.uniform(size=n).astype(np.float32)
    np.testing.assert_array_equal(local.sort_permutation(jnp.asarray(keys)),
                                  np.argsort(keys, kind="stable"))


def test_epoch_permutation_real_rows_first_and_padding_invariant():
  key = jax.random.PRNGKey(3)
  mask = jnp.arange(12) < 7
  perm = np.asarray(fm.epoch_permutation(key, mask))
  assert sorted(perm[:7].tolist()) == list(range(7))
  assert sorted(perm[7:].tolist()) == list(range(7, 12))
  longer = np.asarray(fm.epoch_permutation(key, jnp.arange(300) < 7))  # argsort branch
  np.testing.assert_array_equal(longer[:7], perm[:7])
  np.testing.assert_array_equal(np.asarray(fm.epoch_permutation(key, mask, shuffle=False))[:7],
                                np.arange(7))
