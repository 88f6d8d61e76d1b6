"""Local-only and pooled baselines == independent per-site training loops."""

import math

import jax
import numpy as np
import optax
import pytest

import fedjax_med as fm
from conftest import bce_loss, init_params, make_sites


def test_local_only_matches_independent_adam_loops(sites, data):
  params = init_params()
  opt = optax.adam(0.05)
  algo = fm.algorithms.local_only(bce_loss, optimizer=opt, local_epochs=1, batch_size=2,
                                  shuffle=False)
  state = algo.init(params, data.num_sites)
  for r in range(3):   # optimizer state persists across rounds
    state, _ = algo.round(state, data, jax.random.PRNGKey(r))
  grad = jax.grad(lambda p, x, y: bce_loss(p, x, y).mean())
  for k, (x, y) in enumerate(sites):
    p, s = params, opt.init(params)
    for _ in range(3):
      for j in range(math.ceil(len(y) / 2)):
        rows = slice(2 * j, 2 * j + 2)
        u, s = opt.update(grad(p, x[rows], y[rows]), s, p)
        p = optax.apply_updates(p, u)
    got = fm.evaluation.unstack(state.client_states["params"], k)
    np.testing.assert_allclose(got["w"], p["w"], rtol=1e-5, atol=1e-6)


def test_pooled_is_local_only_on_one_site(sites, data):
  pooled = data.pooled()
  algo = fm.algorithms.local_only(bce_loss, optimizer=optax.sgd(0.1), local_epochs=2,
                                  batch_size=4)
  state, metrics = algo.round(algo.init(init_params(), 1), pooled, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(metrics["client_steps"], [2 * math.ceil(15 / 4)])


def test_local_only_state_size_mismatch(data):
  algo = fm.algorithms.local_only(bce_loss, optimizer=optax.sgd(0.1), batch_size=2)
  with pytest.raises(ValueError, match="built for 2 sites but data has 3"):
    algo.round(algo.init(init_params(), 2), data, jax.random.PRNGKey(0))
