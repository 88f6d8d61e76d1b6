"""Personalisation: FedAvg + fine-tuning, FedPer, Ditto against sequential references."""

import jax
import numpy as np
import optax
import pytest

import fedjax_med as fm
from fedjax_med.algorithms.ditto import PERSONAL_STREAM
from conftest import bce_loss, init_params, ref_ditto_round, ref_local_sgd, to_np


def test_finetune_round_is_fedavg_and_personalize_is_local_sgd(sites, data):
  params = init_params()
  common = dict(client_optimizer=optax.sgd(0.2), local_epochs=1, batch_size=2)
  ft = fm.algorithms.fedavg_finetune(bce_loss, finetune_steps=3, **common)
  avg = fm.algorithms.fedavg(bce_loss, **common)
  key = jax.random.PRNGKey(0)
  s_ft, _ = ft.round(ft.init(params), data, key)
  s_avg, _ = avg.round(avg.init(params), data, key)
  assert np.array_equal(np.asarray(s_ft.params["w"]), np.asarray(s_avg.params["w"]))
  pkey = jax.random.PRNGKey(99)
  personal = ft.personalize(s_ft, data, pkey)
  w, b = to_np(s_ft.params)
  mask = np.asarray(data.mask)
  for k, (x, y) in enumerate(sites):
    wk, bk, _ = ref_local_sgd(w, b, x, y, 0.2, 2, mask[k], jax.random.fold_in(pkey, k),
                              steps=3)
    np.testing.assert_allclose(personal["w"][k], wk, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(personal["b"][k], bk, rtol=2e-5, atol=2e-6)


def test_fedper_shares_the_body_and_keeps_personal_heads(sites, data):
  params = init_params()
  algo = fm.algorithms.fedper(bce_loss, personal=("b",), client_optimizer=optax.sgd(0.3),
                              local_epochs=1, batch_size=2)
  state = algo.init(params, 3)
  w, b = to_np(params)
  heads = [b, b, b]
  n = np.array([len(y) for _, y in sites], np.float64)
  mask = np.asarray(data.mask)
  for r in range(3):
    key = jax.random.PRNGKey(r)
    state, _ = algo.round(state, data, key)
    new_w = np.zeros_like(w)
    for k, (x, y) in enumerate(sites):
      wk, bk, _ = ref_local_sgd(w, heads[k], x, y, 0.3, 2, mask[k],
                                jax.random.fold_in(key, k), epochs=1)
      new_w += n[k] / n.sum() * wk
      heads[k] = bk
    w = new_w
  np.testing.assert_allclose(state.params["w"], w, rtol=1e-4, atol=1e-6)
  assert float(state.params["b"]) == pytest.approx(float(params["b"]))  # never aggregated
  models = algo.personalize(state, data, jax.random.PRNGKey(0))
  np.testing.assert_allclose(models["b"], heads, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(models["w"], np.broadcast_to(state.params["w"], (3, 3)))


def test_fedper_rejects_empty_or_total_split():
  algo = fm.algorithms.fedper(bce_loss, personal=("nothing",),
                              client_optimizer=optax.sgd(0.1))
  with pytest.raises(ValueError, match="matches no parameter"):
    algo.init(init_params(), 2)
  algo = fm.algorithms.fedper(bce_loss, personal=lambda path: True,
                              client_optimizer=optax.sgd(0.1))
  with pytest.raises(ValueError, match="nothing would be shared"):
    algo.init(init_params(), 2)


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_ditto_matches_reference(sites, data, lam):
  params = init_params()
  lr = 0.3
  algo = fm.algorithms.ditto(bce_loss, lam=lam, client_optimizer=optax.sgd(lr),
                             local_epochs=1, batch_size=2)
  state = algo.init(params, 3)
  w, b = to_np(params)
  personal = [(w.copy(), b) for _ in sites]
  mask = np.asarray(data.mask)
  for r in range(2):
    key = jax.random.PRNGKey(10 + r)
    state, _ = algo.round(state, data, key)
    w, b, personal = ref_ditto_round(w, b, personal, sites, mask, key, lr, lr, lam,
                                     PERSONAL_STREAM)
  np.testing.assert_allclose(state.params["w"], w, rtol=1e-4, atol=1e-6)
  models = algo.personalize(state, data, jax.random.PRNGKey(0))
  for k in range(3):
    np.testing.assert_allclose(models["w"][k], personal[k][0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["fedper", "ditto"])
def test_only_participants_change_personal_state(data, name):
  common = dict(client_optimizer=optax.sgd(0.3), batch_size=2, cohort_size=1)
  algo = (fm.algorithms.fedper(bce_loss, personal=("b",), **common) if name == "fedper"
          else fm.algorithms.ditto(bce_loss, lam=0.1, **common))
  state = algo.init(init_params(), 3)
  before = np.asarray(state.client_states["params"]["b"])
  state, metrics = algo.round(state, data, jax.random.PRNGKey(3))
  after = np.asarray(state.client_states["params"]["b"])
  chosen = int(metrics["cohort"][0])
  for k in range(3):
    if k == chosen:
      assert after[k] != before[k]
    else:
      assert after[k] == before[k]


def _injected_sgd(lr):
  return optax.inject_hyperparams(optax.sgd)(learning_rate=lr)


@pytest.mark.parametrize("name", ["ditto", "finetune"])
def test_second_optimizer_keeps_its_own_traced_rate(sites, data, name):
  """Issue 17 defect 1: with client lr 0.3 and personal / fine-tune lr 0.0 the
  personal models must not move (they moved by 0.43 / 0.41 before the fix), and
  a personal / fine-tune rate set on its own is the one that runs (checked
  against the float64 reference loop `ref_local_sgd`)."""
  params = init_params()
  if name == "ditto":
    algo = fm.algorithms.ditto(bce_loss, lam=0.0, client_optimizer=_injected_sgd(0.3),
                               personal_optimizer=_injected_sgd(0.0), local_epochs=1,
                               batch_size=2)
    state = algo.init(params, 3)
    prefix = "personal"
  else:
    algo = fm.algorithms.fedavg_finetune(bce_loss, client_optimizer=_injected_sgd(0.3),
                                         finetune_optimizer=_injected_sgd(0.0),
                                         finetune_steps=3, local_epochs=1, batch_size=2)
    state = algo.init(params)
    prefix = "finetune"
  key = jax.random.PRNGKey(3)
  start = state.params
  if name == "ditto":
    state, _ = algo.round(state, data, key)
  models = algo.personalize(state, data, key)
  for k in range(3):  # lr 0: every personal model stays where it started
    np.testing.assert_array_equal(models["w"][k], start["w"] if name == "ditto"
                                  else state.params["w"])
  # The client rate is the client's alone; the second optimizer's is set on its own.
  state = fm.set_hyperparams(state, client={"learning_rate": 0.7},
                             **{f"{prefix}_learning_rate": 0.2})
  np.testing.assert_allclose(state.client_hparams["learning_rate"], 0.7)
  w, b = to_np(state.params)
  mask = np.asarray(data.mask)
  if name == "ditto":
    v_w = np.asarray(state.client_states["params"]["w"], np.float64)
    v_b = np.asarray(state.client_states["params"]["b"], np.float64)
    key = jax.random.PRNGKey(4)
    state, _ = algo.round(state, data, key)
    models = algo.personalize(state, data, key)
    for k, (x, y) in enumerate(sites):
      ck = jax.random.fold_in(key, k)
      want = ref_local_sgd(v_w[k], v_b[k], x, y, 0.2, 2, mask[k],
                           jax.random.fold_in(ck, PERSONAL_STREAM), epochs=1)
      np.testing.assert_allclose(models["w"][k], want[0], rtol=1e-5, atol=1e-6)
  else:
    models = algo.personalize(state, data, key)
    for k, (x, y) in enumerate(sites):
      want = ref_local_sgd(w, b, x, y, 0.2, 2, mask[k], jax.random.fold_in(key, k), steps=3)
      np.testing.assert_allclose(models["w"][k], want[0], rtol=1e-5, atol=1e-6)
