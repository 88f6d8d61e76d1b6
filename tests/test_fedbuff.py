"""FedBuff: == FedAvg with equal job durations and M = K, the event schedule and
staleness against a hand-worked timeline and a pure-Python simulator, staleness
weights against a NumPy reference, determinism, bytes, bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_med as fm
from conftest import bce_loss, init_params, make_sites, np_bce_grad, to_np
from fedjax_med import compression
from fedjax_med.algorithms.fedbuff import fedbuff, site_speeds, synchronous_time
from fedjax_med.core.options import OptionError


# One optimizer object shared by the tests below: algorithms built from the same
# pieces share one compiled round (the config is the jit cache key).
SGD = optax.sgd(0.2)
HAND = dict(client_optimizer=SGD, local_steps=1, batch_size=2, buffer_size=2)
HAND_SPEEDS = [1.0, 0.5, 1.0 / 3.0]
SGD_03 = optax.sgd(0.3)


def _hand_data():
  return fm.FederatedData.from_sites(make_sites([4, 4, 4]))


def _assert_params_equal(a, b):
  for name in ("w", "b"):
    np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]))


def test_equal_speeds_and_m_equals_k_is_fedavg_bit_for_bit(weighting="uniform"):
  data = fm.FederatedData.from_sites(make_sites([7, 3, 5, 4]))
  kwargs = dict(client_optimizer=optax.sgd(0.2), local_steps=3, batch_size=2,
                weighting=weighting)
  avg = fm.algorithms.fedavg(bce_loss, **kwargs)
  buff = fedbuff(bce_loss, buffer_size=4, **kwargs)
  a, b = avg.init(init_params()), buff.init(init_params(), 4)   # speeds default: all 1
  run_key = jax.random.PRNGKey(0)
  for r in range(4):
    key = jax.random.fold_in(run_key, r)
    a, _ = avg.round(a, data, key)
    b, m = buff.round(b, data, key)
    _assert_params_equal(a.params, b.params)
    np.testing.assert_array_equal(m["staleness"], [0, 0, 0, 0])
    np.testing.assert_array_equal(m["cohort"], [0, 1, 2, 3])
    assert float(m["sim_time"]) == 3.0 * (r + 1) and int(m["version"]) == r + 1


def test_speeds_proportional_to_work_make_epochs_synchronous():
  """Unequal n_k with local epochs: speed_k = steps_k gives every job 1 time unit."""
  sites = make_sites([9, 2, 5])
  data = fm.FederatedData.from_sites(sites)
  kwargs = dict(client_optimizer=optax.sgd(0.1), local_epochs=1, batch_size=2)
  avg = fm.algorithms.fedavg(bce_loss, **kwargs)
  buff = fedbuff(bce_loss, buffer_size=3, **kwargs)
  speeds = site_speeds([math.ceil(len(y) / 2) for _, y in sites])
  a, b = avg.init(init_params()), buff.init(init_params(), 3, speeds=speeds)
  for r in range(3):
    a, ma = avg.round(a, data, jax.random.PRNGKey(r))
    b, mb = buff.round(b, data, jax.random.PRNGKey(r))
    _assert_params_equal(a.params, b.params)
  assert float(mb["sim_time"]) == 3.0
  # The synchronous clock of FedAvg's history under the same speeds agrees.
  np.testing.assert_allclose(synchronous_time(np.stack([ma["client_steps"]] * 3), speeds),
                             [1.0, 2.0, 3.0])


def test_staleness_matches_hand_worked_schedule():
  """K = 3, M = 2, one local step per job, speeds (1, 1/2, 1/3): jobs take 1, 2, 3.

  t=0  all start from w0.
  t=1  site 0 arrives (s=0), buffer 1/2; site 0 restarts from w0.
  t=2  site 0 (s=0) fills the buffer -> flush [0, 0] -> w1 (round 0 ends at t=2);
       site 1 (from w0) arrives after the flush: s = 1, buffer 1/2.
       Sites 0, 1 restart from w1 (round 1 starts).
  t=3  site 0 (w1, s=0) -> flush [1, 0] stalenesses [1, 0] -> w2; site 2 (w0): s=2.
  t=4  site 0 (w2, s=0) -> flush [2, 0] stalenesses [2, 0] -> w3; site 1 (w1): s=2.
  t=5  site 0 (w3, s=0) -> flush [1, 0] stalenesses [2, 0] -> w4.
  t=6  sites 0 (w4), 1 (w3), 2 (w2) arrive: s = 0, 1 -> flush [0, 1]; site 2: s=3.
  """
  data = _hand_data()
  algo = fedbuff(bce_loss, **HAND)
  state = algo.init(init_params(), 3, speeds=HAND_SPEEDS)
  expected = [(2.0, [0, 0], [0, 0], [2, 1, 0]),
              (3.0, [1, 0], [1, 0], [1, 0, 1]),
              (4.0, [2, 0], [2, 0], [1, 1, 0]),
              (5.0, [1, 0], [2, 0], [1, 0, 0]),
              (6.0, [0, 1], [0, 1], [1, 1, 1])]
  for r, (t, cohort, staleness, arrivals) in enumerate(expected):
    state, m = algo.round(state, data, jax.random.PRNGKey(r))
    assert float(m["sim_time"]) == t
    np.testing.assert_array_equal(m["cohort"], cohort)
    np.testing.assert_array_equal(m["staleness"], staleness)
    np.testing.assert_array_equal(m["arrivals"], arrivals)
    assert int(m["flushes"]) == 1 and int(m["version"]) == r + 1


def reference_schedule(durations, buffer_size, rounds):
  """Pure-Python FedBuff event simulation (float32 clock, as the JAX round).

  Returns per round (clock, sites of the last flushed buffer, their staleness,
  arrivals per site).
  """
  k = len(durations)
  busy, finish, started = [False] * k, [np.float32(0)] * k, [0] * k
  clock, version, buffer, out = np.float32(0), 0, [], []
  for _ in range(rounds):
    flushed, arrivals = None, [0] * k
    while flushed is None:
      for s in range(k):
        if not busy[s]:
          busy[s], started[s], finish[s] = True, version, np.float32(clock + durations[s])
      clock = min(finish[s] for s in range(k) if busy[s])
      arriving = [s for s in range(k) if busy[s] and finish[s] == clock]
      for s in arriving:
        buffer.append((s, version - started[s]))
        arrivals[s] += 1
        if len(buffer) == buffer_size:
          flushed, buffer, version = buffer, [], version + 1
      for s in arriving:
        busy[s] = False
    out.append((float(clock), [s for s, _ in flushed], [st for _, st in flushed], arrivals))
  return out


def test_schedule_matches_pure_python_simulator():
  speeds = np.asarray([1.0, 0.75, 0.5, 0.3], np.float32)
  durations = [np.float32(1.0) / s for s in speeds]       # one local step per job
  data = fm.FederatedData.from_sites(make_sites([3, 3, 3, 3]))
  algo = fedbuff(bce_loss, client_optimizer=optax.sgd(0.2), local_steps=1, batch_size=2,
                 buffer_size=3)
  state = algo.init(init_params(), 4, speeds=speeds)
  for r, (t, cohort, staleness, arrivals) in enumerate(reference_schedule(durations, 3, 12)):
    state, m = algo.round(state, data, jax.random.PRNGKey(r))
    assert float(m["sim_time"]) == pytest.approx(t, rel=1e-6)
    np.testing.assert_array_equal(m["cohort"], cohort)
    np.testing.assert_array_equal(m["staleness"], staleness)
    np.testing.assert_array_equal(m["arrivals"], arrivals)


@pytest.mark.parametrize("exponent", [0.5, 0.0])
def test_staleness_weights_match_numpy_reference(exponent):
  """Full-batch, one-step jobs on the hand-worked schedule above:
  w1 = w0 - D0(w0);  w2 = w1 - (n1 g(1) D1(w0) + n0 D0(w1)) / (n1 + n0);
  w3 = w2 - (n2 g(2) D2(w0) + n0 D0(w2)) / (n2 + n0),  D_k(w) = lr grad F_k(w),
  g(s) = (1 + s)^-a."""
  sites = make_sites([5, 3, 4], seed=8)
  data = fm.FederatedData.from_sites(sites)
  lr = 0.3
  algo = fedbuff(bce_loss, client_optimizer=SGD_03, local_steps=1, batch_size=8,
                 buffer_size=2, shuffle=False, staleness_exponent=exponent)
  state = algo.init(init_params(), 3, speeds=[1.0, 0.5, 1.0 / 3.0])
  n = [len(y) for _, y in sites]

  def delta(k, w):
    gw, gb = np_bce_grad(w[0], w[1], sites[k][0].astype(np.float64),
                         sites[k][1].astype(np.float64))
    return np.concatenate([lr * gw, [lr * gb]])

  g = lambda s: (1.0 + s) ** -exponent
  w0 = np.concatenate([to_np(init_params())[0], [to_np(init_params())[1]]])
  split = lambda v: (v[:-1], v[-1])
  w1 = w0 - delta(0, split(w0))
  w2 = w1 - (n[1] * g(1) * delta(1, split(w0)) + n[0] * delta(0, split(w1))) / (n[1] + n[0])
  w3 = w2 - (n[2] * g(2) * delta(2, split(w0)) + n[0] * delta(0, split(w2))) / (n[2] + n[0])
  for r, want in enumerate([w1, w2, w3]):
    state, _ = algo.round(state, data, jax.random.PRNGKey(r))
    got = np.concatenate([np.asarray(state.params["w"]), [float(state.params["b"])]])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_deterministic_from_the_key_with_jitter():
  data = _hand_data()
  algo = fedbuff(bce_loss, jitter=0.3, **HAND)    # jitter is traced: same compiled round

  def run(seed):
    state = algo.init(init_params(), 3, speeds=HAND_SPEEDS)
    return fm.run_rounds(algo, state, data, 4, jax.random.PRNGKey(seed), progress=False)

  (s1, h1), (s2, h2), (_, h3) = run(0), run(0), run(1)
  _assert_params_equal(s1.params, s2.params)
  np.testing.assert_array_equal(h1["sim_time"], h2["sim_time"])
  assert not np.array_equal(h1["sim_time"], h3["sim_time"])


def test_run_seeds_vmaps_fedbuff_like_sequential_runs():
  data = _hand_data()
  algo = fedbuff(bce_loss, **HAND)
  state = algo.init(init_params(), 3, speeds=HAND_SPEEDS)
  keys = jnp.stack([jax.random.PRNGKey(0), jax.random.PRNGKey(1)])
  states, hist = fm.run_seeds(algo, fm.stack_states([state, state]), data, 3, keys)
  for i in range(2):
    ref, ref_hist = fm.run_rounds(algo, state, data, 3, keys[i], progress=False)
    np.testing.assert_allclose(states.params["w"][i], ref.params["w"], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(hist["sim_time"][i], ref_hist["sim_time"])
    np.testing.assert_array_equal(hist["staleness"][i], ref_hist["staleness"])


def test_bytes_per_job_and_uplink_link():
  data = _hand_data()
  plain = fedbuff(bce_loss, **HAND)
  linked = fedbuff(bce_loss, uplink=compression.uplink(compression.float32()), **HAND)
  qsgd = fedbuff(bce_loss, uplink=compression.uplink(compression.qsgd(8)), **HAND)
  a, b, c = (x.init(init_params(), 3, speeds=HAND_SPEEDS) for x in (plain, linked, qsgd))
  for r in range(3):
    key = jax.random.PRNGKey(r)
    a, ma = plain.round(a, data, key)
    b, mb = linked.round(b, data, key)
    c, mc = qsgd.round(c, data, key)
    _assert_params_equal(a.params, b.params)
    np.testing.assert_array_equal(ma["bytes_up"], 16 * np.asarray(ma["arrivals"]))
    np.testing.assert_array_equal(mb["bytes_up"], ma["bytes_up"])
    np.testing.assert_array_equal(mc["bytes_up"],
                                  ((3 + 4) + (1 + 4)) * np.asarray(mc["arrivals"]))
    if r == 0:
      # Round 0 (schedule of the hand-worked test): all three sites start and site 0
      # restarts once (4 downloads of 16 bytes); site 0 uploads twice, site 1 once.
      np.testing.assert_array_equal(ma["bytes_down"], [32, 16, 16])
      np.testing.assert_array_equal(ma["bytes_up"], [32, 16, 0])
      assert int(ma["bytes_down_total"]) == 64 and int(ma["bytes_up_total"]) == 48


def test_synchronous_time_by_hand():
  np.testing.assert_allclose(synchronous_time([[2, 4], [2, 0]], [1.0, 2.0]), [2.0, 4.0])
  np.testing.assert_allclose(
      synchronous_time([[3], [3]], [1.0, 0.5], cohort=[[0], [1]]), [3.0, 9.0])


def test_site_speeds():
  np.testing.assert_allclose(site_speeds([10, 20, 5], slowdown={1: 10}), [10, 2, 5])
  a = site_speeds([1, 1, 1], spread=0.5, key=jax.random.PRNGKey(0))
  b = site_speeds([1, 1, 1], spread=0.5, key=jax.random.PRNGKey(0))
  np.testing.assert_array_equal(a, b)
  assert len(set(a.tolist())) == 3


@pytest.mark.parametrize("make,match", [
    (lambda: fedbuff(bce_loss, client_optimizer=optax.sgd(0.1), buffer_size=0),
     "buffer_size must be an integer >= 1"),
    (lambda: fedbuff(bce_loss, client_optimizer=optax.sgd(0.1), buffer_size=-2),
     "buffer_size must be an integer >= 1"),
    (lambda: fedbuff(bce_loss, client_optimizer=optax.sgd(0.1), buffer_size=2,
                     staleness_exponent=-1.0), "staleness_exponent"),
    (lambda: fedbuff(bce_loss, client_optimizer=optax.sgd(0.1), buffer_size=2,
                     bufer=3), "did you mean 'buffer_size'"),
    (lambda: fedbuff(bce_loss, client_optimizer=optax.sgd(0.1), buffer_size=2).init(
        init_params(), 3, speeds=[1.0, -1.0, 2.0]), r"speeds\[1\] = -1.0 must be a finite"),
    (lambda: fedbuff(bce_loss, client_optimizer=optax.sgd(0.1), buffer_size=2).init(
        init_params(), 3, speeds=[1.0, 0.0, 2.0]), r"speeds\[1\]"),
    (lambda: fedbuff(bce_loss, client_optimizer=optax.sgd(0.1), buffer_size=2).init(
        init_params(), 3, speeds=[1.0, float("nan"), 2.0]), r"speeds\[1\]"),
    (lambda: fedbuff(bce_loss, client_optimizer=optax.sgd(0.1), buffer_size=2).init(
        init_params(), 3, speeds=[1.0, 2.0]), "one entry per site"),
    (lambda: site_speeds([1, 2], slowdown={0: -10}), r"slowdown\[0\]"),
    (lambda: site_speeds([1, 2], slowdown={5: 10}), "not a site index"),
])
def test_bad_input_raises_clear_errors(make, match):
  with pytest.raises(OptionError, match=match):
    make()


# ---------------------------------------------------------------------------
# State types, the kit's server step with a stateful optimizer, checkpoints.
# ---------------------------------------------------------------------------

from fedjax_med.algorithms.fedbuff import FedBuffClientState, FedBuffServerState  # noqa: E402


def test_state_types_have_the_documented_shapes():
  algo = fedbuff(bce_loss, **HAND)
  state = algo.init(init_params(), 3, speeds=HAND_SPEEDS)
  cs = state.client_states
  assert isinstance(cs, FedBuffClientState)
  assert cs.update["w"].shape == (3, 3) and cs.update["b"].shape == (3,)
  assert cs.version.shape == (3,) and cs.version.dtype == jnp.int32
  assert cs.finish.shape == (3,) and cs.busy.dtype == jnp.bool_
  server = state.algorithm_state
  assert isinstance(server, FedBuffServerState)
  assert server.slots["w"].shape == (2, 3) and server.slots["b"].shape == (2,)
  for field in ("slot_site", "slot_staleness", "slot_weight", "slot_loss"):
    assert getattr(server, field).shape == (2,), field
  np.testing.assert_array_equal(server.speeds, np.float32(HAND_SPEEDS))
  # After the hand-worked round 0 (module test above): sites 0, 1 arrived at t = 2,
  # site 2 still runs the job it started at version 0 and finishes at t = 3.
  state, _ = algo.round(state, _hand_data(), jax.random.PRNGKey(0))
  cs, server = state.client_states, state.algorithm_state
  np.testing.assert_array_equal(cs.busy, [False, False, True])
  assert float(cs.finish[2]) == 3.0 and int(cs.version[2]) == 0
  assert float(server.clock) == 2.0 and int(server.version) == 1
  assert int(server.count) == 1 and int(server.slot_site[0]) == 1     # site 1, stale by 1
  assert int(server.slot_staleness[0]) == 1


def test_server_momentum_matches_numpy_reference():
  """The flush is the kit's server step: optax.sgd(0.5, momentum=0.9) on Delta_bar.
  Full-batch one-step jobs, equal speeds, M = K = 2: every flush is the n-weighted
  mean of lr grad F_k(w_r); trace_r = D_r + 0.9 trace_{r-1}, w_{r+1} = w_r - 0.5 trace_r."""
  sites = make_sites([5, 3], seed=4)
  data = fm.FederatedData.from_sites(sites)
  lr, eta, beta = 0.3, 0.5, 0.9
  algo = fedbuff(bce_loss, client_optimizer=SGD_03, local_steps=1, batch_size=8,
                 buffer_size=2, shuffle=False, server_optimizer=optax.sgd(eta, momentum=beta))
  state = algo.init(init_params(), 2)
  n = np.asarray([len(y) for _, y in sites], np.float64)
  w, b = to_np(init_params())
  tw, tb = np.zeros_like(w), 0.0
  for r in range(4):
    dw, db = np.zeros_like(w), 0.0
    for k, (x, y) in enumerate(sites):
      gw, gb = np_bce_grad(w, b, x.astype(np.float64), y.astype(np.float64))
      dw, db = dw + n[k] / n.sum() * lr * gw, db + n[k] / n.sum() * lr * gb
    tw, tb = dw + beta * tw, db + beta * tb
    w, b = w - eta * tw, b - eta * tb
    state, m = algo.round(state, data, jax.random.PRNGKey(r))
    np.testing.assert_array_equal(m["staleness"], [0, 0])
    np.testing.assert_allclose(state.params["w"], w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.params["b"], b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_checkpointed_run_resumes_bit_identical(tmp_path):
  """run_rounds(checkpoint_dir=...) saves and restores the FedBuff state (NamedTuple
  client states, the buffer, the clock, the uplink and reducer states, server Adam):
  a run interrupted after round 2 and rerun ends as the uninterrupted run, bit for bit."""
  data = _hand_data()
  algo = fedbuff(bce_loss, client_optimizer=SGD, local_steps=1, batch_size=2, buffer_size=2,
                 jitter=0.2, server_optimizer=optax.adam(0.05),
                 uplink=compression.uplink(compression.qsgd(8)))
  init = lambda: algo.init(init_params(), 3, speeds=HAND_SPEEDS)  # noqa: E731
  key = jax.random.PRNGKey(21)
  want, want_history = fm.run_rounds(algo, init(), data, 5, key, progress=False)

  def stop_after_round_2(r, state, metrics):
    if r == 2:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    fm.run_rounds(algo, init(), data, 5, key, progress=False,
                  checkpoint_dir=tmp_path / "ckpt", callback=stop_after_round_2)
  restored = fm.checkpoint.restore(tmp_path / "ckpt", init())
  assert restored.round == 3 and isinstance(restored.state.client_states, FedBuffClientState)
  assert isinstance(restored.state.algorithm_state, FedBuffServerState)
  assert float(restored.state.algorithm_state.clock) == float(
      want_history["sim_time"][2])
  seen = []
  got, history = fm.run_rounds(algo, init(), data, 5, key, progress=False,
                               checkpoint_dir=tmp_path / "ckpt",
                               callback=lambda r, s, m: seen.append(r))
  assert seen == [3, 4]
  want_leaves, want_tree = jax.tree_util.tree_flatten(want)
  got_leaves, got_tree = jax.tree_util.tree_flatten(got)
  assert got_tree == want_tree
  for a, b in zip(got_leaves, want_leaves):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for name in want_history:
    np.testing.assert_array_equal(history[name], want_history[name], err_msg=name)
