"""run_rounds and run_seeds: the vmapped multi-seed run equals separate runs."""

import jax
import numpy as np
import pytest
import optax

import fedjax_med as fm
from fedjax_med.core.streams import PERSONAL_STREAM
from conftest import bce_loss, init_params, make_sites, ref_ditto_round, ref_local_sgd, to_np


def test_run_seeds_equals_sequential_runs(data):
  algo = fm.algorithms.fedavg(bce_loss, client_optimizer=optax.sgd(0.2), batch_size=2,
                              cohort_size=2)
  seeds = [0, 1, 2]
  params = [init_params(seed=10 + s) for s in seeds]
  keys = [jax.random.PRNGKey(s) for s in seeds]
  states, history = fm.run_seeds(algo, fm.stack_states([algo.init(p) for p in params]), data,
                                 4, np.stack(keys))
  assert history["train_loss"].shape == (3, 4)
  # The claim is an equivalence of two of the project's code paths (vmapped seeds
  # vs one run at a time); measured: bit-identical on CPU; the tolerance allows
  # for a backend that reorders float32 sums under vmap.
  for i, (p, k) in enumerate(zip(params, keys)):
    state, hist = fm.run_rounds(algo, algo.init(p), data, 4, k, progress=False)
    np.testing.assert_allclose(states.params["w"][i], state.params["w"], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(history["cohort"][i], hist["cohort"])
    np.testing.assert_allclose(history["train_loss"][i], hist["train_loss"], rtol=1e-6)


def reference_fedprox_run(params, sites, mask, run_key, rounds, lr, mu, batch):
  """Float64 FedProx (Li et al. 2020): local SGD on F_k(w) + mu/2 ||w - w_t||^2,
  w_{t+1} = sum_k (n_k / n) w_k; round r's key is fold_in(run_key, r)."""
  w, b = to_np(params)
  n = np.array([len(y) for _, y in sites], np.float64)
  for r in range(rounds):
    key = jax.random.fold_in(run_key, r)
    w0, b0 = w.copy(), b
    prox = lambda ww, bb: (mu * (ww - w0), mu * (bb - b0))
    locals_ = [ref_local_sgd(w0, b0, x, y, lr, batch, mask[k], jax.random.fold_in(key, k),
                             epochs=1, extra_grad=prox) for k, (x, y) in enumerate(sites)]
    w = sum(nk / n.sum() * wk for nk, (wk, _, _) in zip(n, locals_))
    b = sum(nk / n.sum() * bk for nk, (_, bk, _) in zip(n, locals_))
  return w, b


def test_run_seeds_sweeps_learning_rates(sites, data):
  """A vmapped sweep over traced (client learning rate, mu) == the float64
  FedProx loop run at each value."""
  opt = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
  algo = fm.algorithms.fedprox(bce_loss, mu=0.1, client_optimizer=opt, batch_size=2)
  params = init_params()
  base = algo.init(params)
  rates = [0.01, 0.1, 0.3]
  states = fm.stack_states([fm.set_hyperparams(base, client={"learning_rate": lr}, mu=lr)
                            for lr in rates])
  key = jax.random.PRNGKey(7)
  swept, _ = fm.run_seeds(algo, states, data, 3, np.stack([key] * 3))
  for i, lr in enumerate(rates):
    w, b = reference_fedprox_run(params, sites, np.asarray(data.mask), key, 3, lr, lr, 2)
    # measured max abs error 2.2e-8 (|w| < 1); tolerance ~4x above.
    np.testing.assert_allclose(swept.params["w"][i], w, rtol=0, atol=1e-7)
    np.testing.assert_allclose(swept.params["b"][i], b, rtol=0, atol=1e-7)


def test_experiment_script_helpers(tmp_path):
  import dataclasses

  @dataclasses.dataclass(frozen=True)
  class Config:
    seeds: tuple = (0,)
    rounds: int = 10
    alpha: float = 0.5

  assert fm.training.loop.parse_seeds("0, 1,2") == (0, 1, 2)
  for bad in ("", ",", "a,1"):
    with pytest.raises(ValueError, match="seeds"):
      fm.training.loop.parse_seeds(bad)
  config = fm.training.loop.with_overrides(Config(), seeds="3,4", rounds=None, alpha=0.1)
  assert config == Config(seeds=(3, 4), rounds=10, alpha=0.1)
  assert fm.training.loop.with_overrides(Config(), seeds="", rounds=5) == Config(rounds=5)
  assert fm.training.loop.with_overrides(Config(), seeds=(7,)) == Config(seeds=(7,))
  path = fm.training.loop.write_table(str(tmp_path / "out"), "| a |\n")
  assert path == str(tmp_path / "out" / "table.md") and open(path).read() == "| a |\n"


def test_one_run_loop_checkpoints_resumes_and_audits(tmp_path):
  """run_rounds(checkpoint_dir=...) interrupted after round 2 and rerun resumes at round 3
  and ends where an uninterrupted run ends (bit for bit: the claim is resumption, so the
  reference is the same loop without checkpoints); audit= logs one verified line a round."""
  sites = make_sites([5, 3, 4])
  data = fm.FederatedData.from_sites(sites)
  algo = fm.algorithms.fedavg(bce_loss, client_optimizer=optax.sgd(0.2), batch_size=2)
  key = jax.random.PRNGKey(4)
  want, want_history = fm.run_rounds(algo, algo.init(init_params()), data, 5, key,
                                     progress=False)

  def stop_after_round_2(r, state, metrics):
    if r == 2:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    fm.run_rounds(algo, algo.init(init_params()), data, 5, key, progress=False,
                  checkpoint_dir=tmp_path / "ckpt", callback=stop_after_round_2)
  assert fm.checkpoint.latest_round(tmp_path / "ckpt") == 3
  seen = []
  log = fm.audit.AuditLog(str(tmp_path / "audit.jsonl"))
  got, history = fm.run_rounds(algo, algo.init(init_params()), data, 5, key, progress=False,
                               checkpoint_dir=tmp_path / "ckpt", audit=log,
                               callback=lambda r, s, m: seen.append(r))
  assert seen == [3, 4]                      # resumed after the checkpoint of round 3
  np.testing.assert_array_equal(got.params["w"], want.params["w"])
  np.testing.assert_array_equal(history["train_loss"], want_history["train_loss"])
  assert fm.audit.verify(str(tmp_path / "audit.jsonl")) == 2
  with pytest.raises(ValueError, match="first_round must be 0"):
    fm.run_rounds(algo, algo.init(init_params()), data, 5, key, progress=False,
                  checkpoint_dir=tmp_path / "ckpt", first_round=1)


def test_run_rounds_donation_and_log_every_change_nothing(data):
  """Donated state buffers and periodic metric fetches are bookkeeping: the rounds
  are the same computation, so the results must be bit-identical to a plain loop of
  `algo.round` (the reference: rounds called one by one, nothing donated or fetched)."""
  algo = fm.algorithms.fedavg(bce_loss, client_optimizer=optax.sgd(0.2), batch_size=2,
                              cohort_size=2, server_optimizer=optax.adam(0.05))
  key = jax.random.PRNGKey(3)
  state0 = algo.init(init_params(seed=4))
  want, want_hist = state0, []
  for r in range(5):
    want, metrics = algo.round(want, data, jax.random.fold_in(key, r))
    want_hist.append(jax.device_get(metrics))
  runs = [({}, None),                                     # no callback: donated
           ({"donate_state": True, "log_every": 2}, []),   # donated despite a callback
           ({"log_every": 1}, []),                          # a callback: not donated
           ({"donate_state": False, "log_every": 5}, None)]
  for kwargs, kept in runs:
    callback = None if kept is None else (lambda r, s, m, kept=kept: kept.append(s.params["w"]))
    state, hist = fm.run_rounds(algo, state0, data, 5, key, progress=False, callback=callback,
                                **kwargs)
    for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(state)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for name in hist:
      np.testing.assert_array_equal(hist[name], np.stack([h[name] for h in want_hist]))
  # The caller's state is never donated: it is still readable after the runs.
  np.testing.assert_array_equal(np.asarray(state0.params["w"]),
                                np.asarray(init_params(seed=4)["w"]))
  # With donation the states a callback kept are deleted by the next round (documented);
  # by default a callback's states stay readable.
  donated, kept = runs[1][1], runs[2][1]
  assert all(w.is_deleted() for w in donated[:-1]) and not donated[-1].is_deleted()
  assert not any(w.is_deleted() for w in kept)


def test_run_rounds_rejects_bad_logging_options(data):
  algo = fm.algorithms.fedavg(bce_loss, client_optimizer=optax.sgd(0.2), batch_size=2)
  state = algo.init(init_params())
  with pytest.raises(fm.OptionError, match="log_every"):
    fm.run_rounds(algo, state, data, 2, jax.random.PRNGKey(0), log_every=0, progress=False)
  with pytest.raises(fm.OptionError, match="donate_state must be None, True or False"):
    fm.run_rounds(algo, state, data, 2, jax.random.PRNGKey(0), donate_state="yes",
                  progress=False)


def test_step_decay_segments_by_hand():
  seg = fm.training.loop.step_decay_segments
  assert seg(30, (2 / 3, 5 / 6), 0.3) == [(0, 20, 1.0), (20, 25, 0.3), (25, 30, 0.3**2)]
  assert seg(6, (0.5, 0.5), 0.5) == [(0, 3, 1.0), (3, 6, 0.5)]          # duplicates merge
  assert seg(5, (0.0, 1.0)) == [(0, 5, 1.0)]                            # no inner boundary
  assert seg(7, ()) == [(0, 7, 1.0)]


def test_run_rounds_step_decay_equals_float64_loop(sites, data):
  """FedAvg whose client SGD rate is 0.3 in rounds 0-2, 0.15 in 3-4, 0.075 in round 5
  (decay_at 1/2 and 5/6 of 6 rounds, x0.5) == a float64 loop with those rates, round r
  keyed fold_in(run_key, r) as in run_rounds."""
  opt = optax.inject_hyperparams(optax.sgd)(learning_rate=0.3)
  algo = fm.algorithms.fedavg(bce_loss, client_optimizer=opt, batch_size=2)
  params = init_params()
  key = jax.random.PRNGKey(3)
  state, hist = fm.training.loop.run_rounds_step_decay(
      algo, algo.init(params), data, 6, key, learning_rate=0.3, decay_at=(1 / 2, 5 / 6),
      decay=0.5, progress=False)
  w, b = to_np(params)
  n = np.array([len(y) for _, y in sites], np.float64)
  mask = np.asarray(data.mask)
  for r, lr in enumerate([0.3, 0.3, 0.3, 0.15, 0.15, 0.075]):
    round_key = jax.random.fold_in(key, r)
    locals_ = [ref_local_sgd(w, b, x, y, lr, 2, mask[k], jax.random.fold_in(round_key, k),
                             epochs=1) for k, (x, y) in enumerate(sites)]
    w = sum(nk / n.sum() * wk for nk, (wk, _, _) in zip(n, locals_))
    b = sum(nk / n.sum() * bk for nk, (_, bk, _) in zip(n, locals_))
  # float32 vs float64 over 6 rounds: measured max abs error 2.6e-8; the same run
  # without the decay differs from this reference by 0.07.
  np.testing.assert_allclose(state.params["w"], w, rtol=0, atol=2e-7)
  np.testing.assert_allclose(state.params["b"], b, rtol=0, atol=2e-7)
  assert hist["train_loss"].shape == (6,)
  assert float(state.client_hparams["learning_rate"]) == pytest.approx(0.075)
  with pytest.raises(fm.OptionError, match="first_round"):
    fm.training.loop.run_rounds_step_decay(algo, state, data, 2, key, learning_rate=0.3,
                                           first_round=1)
  plain = fm.algorithms.fedavg(bce_loss, client_optimizer=optax.sgd(0.3), batch_size=2)
  with pytest.raises(fm.OptionError, match="learning_rate"):
    fm.training.loop.run_rounds_step_decay(plain, plain.init(params), data, 4, key,
                                           learning_rate=0.3, decay_at=(0.5,), progress=False)


@pytest.mark.parametrize("also", [True, False])
def test_run_rounds_step_decay_decays_dittos_personal_rate(sites, data, also):
  """Ditto (lam 0.5), client SGD 0.3 and personal SGD 0.2, 4 rounds, decay x0.5 after
  round 2. With decay_also=("personal_learning_rate",) both rates step down
  (0.3, 0.3, 0.15, 0.15 and 0.2, 0.2, 0.1, 0.1); without it only the client's does.
  Checked against a float64 loop of Ditto's two local steps with those rates."""
  lam = 0.5
  inject = optax.inject_hyperparams(optax.sgd)
  algo = fm.algorithms.ditto(bce_loss, lam=lam, client_optimizer=inject(learning_rate=0.3),
                             personal_optimizer=inject(learning_rate=0.2), local_epochs=1,
                             batch_size=2)
  params = init_params()
  key = jax.random.PRNGKey(5)
  state, _ = fm.training.loop.run_rounds_step_decay(
      algo, algo.init(params, 3), data, 4, key, learning_rate=0.3, decay_at=(0.5,),
      decay=0.5, decay_also=("personal_learning_rate",) if also else (), progress=False)
  w, b = to_np(params)
  personal = [(w.copy(), b) for _ in sites]
  mask = np.asarray(data.mask)
  personal_rates = [0.2, 0.2, 0.1, 0.1] if also else [0.2] * 4
  for r, (lr, plr) in enumerate(zip([0.3, 0.3, 0.15, 0.15], personal_rates)):
    w, b, personal = ref_ditto_round(w, b, personal, sites, mask, jax.random.fold_in(key, r),
                                     lr, plr, lam, PERSONAL_STREAM)
  np.testing.assert_allclose(state.params["w"], w, rtol=1e-5, atol=1e-6)
  models = algo.personalize(state, data, jax.random.PRNGKey(0))
  for k in range(3):
    np.testing.assert_allclose(models["w"][k], personal[k][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(models["b"][k], personal[k][1], rtol=1e-5, atol=1e-6)
  assert float(state.hparams["personal_learning_rate"]) == pytest.approx(
      personal_rates[-1])
  with pytest.raises(fm.OptionError, match="decay_also.*not_a_rate"):
    fm.training.loop.run_rounds_step_decay(algo, state, data, 2, key, learning_rate=0.3,
                                           decay_at=(0.5,), decay_also=("not_a_rate",),
                                           progress=False)
  # Like the client rate, decay_also is only read when the rate changes: one segment
  # of a Ditto with a plain (untraced) personal optimizer runs.
  plain = fm.algorithms.ditto(bce_loss, lam=lam, client_optimizer=optax.sgd(0.3),
                              local_epochs=1, batch_size=2)
  fm.training.loop.run_rounds_step_decay(plain, plain.init(params, 3), data, 1, key,
                                         learning_rate=0.3,
                                         decay_also=("personal_learning_rate",),
                                         progress=False)
