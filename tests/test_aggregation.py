"""Aggregators: weights, the weighted mean, and chains of links."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_med as fm
from fedjax_med.core import aggregation as agg


def test_client_weights():
  n = jnp.array([5, 0, 3])
  np.testing.assert_array_equal(agg.client_weights(n, "num_examples"), [5, 0, 3])
  np.testing.assert_array_equal(agg.client_weights(n, "uniform"), [1, 0, 1])
  with pytest.raises(ValueError, match="unknown weighting"):
    agg.client_weights(n, "sqrt")


def test_weighted_mean_by_hand():
  updates = {"a": jnp.array([[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]])}
  weights = jnp.array([1.0, 3.0, 0.0])
  ctx = agg.full_context(jnp.array([1, 3, 0]))
  out, _, _ = agg.weighted_mean().aggregate(updates, weights, (), jax.random.PRNGKey(0), ctx)
  np.testing.assert_allclose(out["a"], [(1 + 9) / 4, (2 + 12) / 4])
  zero, _, _ = agg.weighted_mean().aggregate(updates, jnp.zeros(3), (),
                                             jax.random.PRNGKey(0), ctx)
  np.testing.assert_array_equal(zero["a"], [0.0, 0.0])


def test_chain_applies_links_in_order():
  double = fm.ClientTransform(
      init=lambda t, k=None: jnp.zeros(()),
      apply=lambda u, w, s, k, c: (jax.tree_util.tree_map(lambda a: 2 * a, u), w, s + 1,
                                   {"calls": s + 1, "sites": c.num_sites}))
  drop_last = fm.ClientTransform(
      init=lambda t, k=None: (),
      apply=lambda u, w, s, k, c: (u, w.at[-1].set(0.0), s, {}))
  chained = agg.chain(double, drop_last, agg.weighted_mean())
  state = chained.init({"a": jnp.zeros(2)})
  updates = {"a": jnp.array([[1.0, 1.0], [3.0, 3.0], [50.0, 50.0]])}
  out, state, metrics = chained.aggregate(updates, jnp.ones(3), state,
                                          jax.random.PRNGKey(0),
                                          agg.full_context(jnp.array([2, 2, 2])))
  np.testing.assert_allclose(out["a"], [4.0, 4.0])
  assert int(state[0]) == 1 and int(metrics["calls"]) == 1 and metrics["sites"] == 3


def test_chain_rejects_misplaced_links():
  with pytest.raises(ValueError, match="last link must be an Aggregator"):
    agg.chain(fm.ClientTransform(lambda t: (), lambda u, w, s, k, c: (u, w, s, {})))
  with pytest.raises(ValueError, match="link 0"):
    agg.chain(agg.weighted_mean(), agg.weighted_mean())
