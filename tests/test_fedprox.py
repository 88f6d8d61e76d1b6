"""FedProx: mu = 0 is FedAvg bit for bit; the proximal term as the equation says."""

import jax
import numpy as np
import optax
import pytest

import fedjax_med as fm
from conftest import bce_loss, count_compilations, init_params, make_sites, np_bce_grad, ref_local_sgd, to_np


def _round(algo, params, data, key):
  return algo.round(algo.init(params), data, key)[0].params


@pytest.mark.parametrize("schedule", [dict(local_epochs=2), dict(local_steps=5)])
def test_mu_zero_is_fedavg_bit_for_bit(data, schedule):
  params = init_params()
  common = dict(client_optimizer=optax.sgd(0.3), batch_size=2, **schedule)
  avg = fm.algorithms.fedavg(bce_loss, **common)
  prox = fm.algorithms.fedprox(bce_loss, mu=0.0, **common)
  key = jax.random.PRNGKey(4)
  a, b = _round(avg, params, data, key), _round(prox, params, data, key)
  for name in ("w", "b"):
    assert np.array_equal(np.asarray(a[name]), np.asarray(b[name]))


def test_one_step_equals_fedavg_and_two_steps_add_the_analytic_term(sites, data):
  """Full batch, SGD lr: step 1 is FedAvg's (the prox gradient vanishes at w_global);
  step 2 adds -lr * mu * (w1 - w0) = lr^2 mu g_k(w0) per site."""
  params = init_params()
  lr, mu = 0.5, 0.7
  key = jax.random.PRNGKey(0)
  common = dict(client_optimizer=optax.sgd(lr), batch_size=16)
  for steps in (1, 2):
    avg = _round(fm.algorithms.fedavg(bce_loss, local_steps=steps, **common), params, data, key)
    prox = _round(fm.algorithms.fedprox(bce_loss, mu=mu, local_steps=steps, **common),
                  params, data, key)
    if steps == 1:
      np.testing.assert_array_equal(prox["w"], avg["w"])
      continue
    w0, b0 = to_np(params)
    n = np.array([len(y) for _, y in sites], np.float64)
    term_w = sum(nk / n.sum() * lr**2 * mu * np_bce_grad(w0, b0, x.astype(np.float64), y)[0]
                 for nk, (x, y) in zip(n, sites))
    # measured relative error 8.9e-7 (a float32 difference of two runs); 4x above.
    np.testing.assert_allclose(np.asarray(prox["w"], np.float64) - np.asarray(avg["w"]),
                               term_w, rtol=4e-6, atol=0)


def reference_fedprox_round(params, sites, mask, key, lr, mu, batch=2, epochs=2):
  """Float64 FedProx (Li et al. 2020, Alg. 2): local SGD on
  h_k(w) = F_k(w) + mu/2 ||w - w_t||^2, then w_{t+1} = sum_k (n_k / n) w_k."""
  w0, b0 = to_np(params)
  locals_, n = [], []
  for k, (x, y) in enumerate(sites):
    prox = lambda w, b: (mu * (w - w0), mu * (b - b0))
    wk, bk, _ = ref_local_sgd(w0, b0, x, y, lr, batch, mask[k], jax.random.fold_in(key, k),
                              epochs=epochs, extra_grad=prox)
    locals_.append((wk, bk))
    n.append(len(y))
  p = np.asarray(n) / sum(n)
  return (sum(pk * wk for pk, (wk, _) in zip(p, locals_)),
          sum(pk * bk for pk, (_, bk) in zip(p, locals_)))


# float32 vs float64, one round of 2 epochs: measured max abs error 4.8e-9
# (|w| < 1, mu = 0.3) and 1.4e-8 (mu = 0.5); tolerance ~4x above the larger.
ATOL = 6e-8


def test_fedprox_matches_sequential_reference(sites, data):
  params = init_params()
  lr, mu = 0.2, 0.3
  key = jax.random.PRNGKey(8)
  want_w, want_b = reference_fedprox_round(params, sites, np.asarray(data.mask), key, lr, mu)
  algo = fm.algorithms.fedprox(bce_loss, mu=mu, client_optimizer=optax.sgd(lr), local_epochs=2,
                               batch_size=2)
  got = _round(algo, params, data, key)
  np.testing.assert_allclose(got["w"], want_w, rtol=0, atol=ATOL)
  np.testing.assert_allclose(got["b"], want_b, rtol=0, atol=ATOL)


def test_mu_is_traced_and_validated(sites, data):
  """set_hyperparams(mu=0.5) runs the proximal objective with mu = 0.5 (checked
  against the float64 loop), without recompiling."""
  algo = fm.algorithms.fedprox(bce_loss, mu=0.1, client_optimizer=optax.sgd(0.2),
                               local_epochs=2, batch_size=2)
  params = init_params()
  state = algo.init(params)
  assert float(state.hparams["mu"]) == pytest.approx(0.1)
  key = jax.random.PRNGKey(8)
  algo.round(state, data, key)   # compile
  with count_compilations() as compiles:
    got = algo.round(fm.set_hyperparams(state, mu=0.5), data, key)[0].params
  assert compiles[0] == 0
  want_w, _ = reference_fedprox_round(params, sites, np.asarray(data.mask), key, 0.2, 0.5)
  np.testing.assert_allclose(got["w"], want_w, rtol=0, atol=ATOL)
  with pytest.raises(ValueError, match="mu must be a finite number >= 0"):
    fm.algorithms.fedprox(bce_loss, mu=-1.0, client_optimizer=optax.sgd(0.1))
