"""fedjax_med.deploy: the same round cut into a server half and one node per site.

References, none computed by the deployment code:
* a float64 NumPy loop of SCAFFOLD (option II, full-batch local steps) on the four
  heart-disease hospitals;
* the simulator's `fm.run_rounds` (vmapped, one jit), itself checked against
  NumPy references in the algorithm tests: the deployed run must give its global
  parameters to float32 tolerance for FedAvg, FedProx, SCAFFOLD, FedAdam, Ditto
  and DP-FedAvg;
* failures: the simulator's own rule for an offline site (its rows masked out
  for the round: `with_availability`'s model), applied by hand to the data.
Flower itself: tests/test_deploy_flower.py.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_med as fm
from fedjax_med.aggregators import robust
from fedjax_med.deploy import wire
from conftest import tiered  # noqa: E402

sys.path.insert(0, "experiments/heart_disease_flower")
import heart_disease_task as app  # noqa: E402  (the example app's task, no flwr)

RUN_KEY = jax.random.PRNGKey(7)


@pytest.fixture(scope="module")
def heart():
  train, _ = fm.datasets.heart_disease()
  return train


def _leaves(tree):
  return [np.asarray(a, np.float64) for a in jax.tree_util.tree_leaves(tree)]


def _max_diff(a, b):
  return max(float(np.max(np.abs(x - y))) for x, y in zip(_leaves(a), _leaves(b)))


def _task(algo, train, **kw):
  params = app._init_params()
  return fm.deploy.DeployTask(algo, lambda: params, lambda k: train.subset([k]),
                              train.num_sites, train.names, **kw)


# ----------------------------------------------------------------------------- the six

# `make test`: FedAvg, SCAFFOLD (state on the nodes) and DP-FedAvg; `make test-all`: all.
@pytest.mark.parametrize("name", tiered(app.ALGORITHMS, {"fedavg", "scaffold", "dp_fedavg"}))
def test_deployed_run_equals_simulated_run(name, heart):
  task = app.make_task({"algorithm": name})
  sim, sim_history = fm.run_rounds(task.algorithm, fm.deploy.initial_state(task), heart, 3,
                                   RUN_KEY, progress=False)
  dep, history, federation, events = fm.deploy.run_federation(
      task, fm.deploy.InProcessTransport(task), 3, RUN_KEY)
  assert events == []
  assert federation.names == app.SITES
  assert [n.num_examples for n in federation.nodes] == [199, 172, 30, 85]
  # float32 tolerance: a node runs its client update alone, the simulator vmapped.
  assert _max_diff(sim.params, dep.params) <= 1e-6
  assert _max_diff(sim.params, app._init_params()) > 1e-3      # it did train
  np.testing.assert_allclose(history["train_loss"], sim_history["train_loss"], rtol=1e-5)
  assert history["online"].all()


def test_bytes_on_the_wire_are_the_arrays_sent(heart):
  """FedAvg on logistic regression: 13 + 1 float32 parameters each way, plus the
  round counter and the 2 x uint32 key down, n_k / steps / loss up."""
  task = app.make_task({"algorithm": "fedavg"})
  _, history, _, _ = fm.deploy.run_federation(task, fm.deploy.InProcessTransport(task), 1,
                                              RUN_KEY)
  assert history["downlink_bytes"].tolist() == [[14 * 4 + 4 + 8] * 4]
  assert history["uplink_bytes"].tolist() == [[14 * 4 + 3 * 4] * 4]


def _numpy_scaffold(sites, lr, steps, rounds, params):
  """SCAFFOLD option II in float64, full-batch local steps, p_k = q_k = n_k / n."""
  w = np.concatenate([np.asarray(params["params"]["linear"]["kernel"], np.float64).ravel(),
                      np.asarray(params["params"]["linear"]["bias"], np.float64)])
  n = np.array([len(y) for _, y in sites], np.float64)
  p = n / n.sum()
  c = np.zeros_like(w)
  ck = [np.zeros_like(w) for _ in sites]

  def grad(v, x, y):
    z = x @ v[:-1] + v[-1]
    s = 1 / (1 + np.exp(-z))
    r = (s - y) / len(y)
    return np.concatenate([x.T @ r, [r.sum()]])

  for _ in range(rounds):
    deltas, dcs = [], []
    for k, (x, y) in enumerate(sites):
      v = w.copy()
      for _ in range(steps):
        v = v - lr * (grad(v, x, y) - ck[k] + c)
      new_ck = ck[k] - c + (w - v) / (steps * lr)
      deltas.append(w - v)
      dcs.append(new_ck - ck[k])
      ck[k] = new_ck
    w = w - sum(pk * d for pk, d in zip(p, deltas))
    c = c + sum(pk * d for pk, d in zip(p, dcs))
  return w


def test_deployed_scaffold_matches_a_float64_numpy_loop(heart):
  model = fm.models.LogisticRegression()
  loss_fn = fm.losses.sigmoid_binary_cross_entropy(model.apply)
  algo = fm.algorithms.scaffold(loss_fn, client_learning_rate=0.1, local_steps=3,
                                batch_size=199, shuffle=False)
  task = _task(algo, heart)
  dep, _, _, _ = fm.deploy.run_federation(task, fm.deploy.InProcessTransport(task), 4,
                                          RUN_KEY)
  sites = [(x.astype(np.float64), y.astype(np.float64).ravel()) for x, y in heart.sites()]
  want = _numpy_scaffold(sites, 0.1, 3, 4, app._init_params())
  got = np.concatenate([np.asarray(dep.params["params"]["linear"]["kernel"]).ravel(),
                        np.asarray(dep.params["params"]["linear"]["bias"])])
  assert np.max(np.abs(got - want)) < 2e-5
  assert np.max(np.abs(want - _numpy_scaffold(sites, 0.1, 3, 3, app._init_params()))) > 1e-3


# ----------------------------------------------------------------------------- failures

def _offline_reference(algo, params, train, rounds, offline_site, offline_round):
  """The simulator's availability rule by hand: the offline site's rows masked out."""
  state = algo.init(params, num_sites=train.num_sites)
  mask = np.asarray(train.mask).copy()
  mask[offline_site] = False
  dropped = train.replace(x=jnp.where(jnp.asarray(mask)[..., None], train.x, 0),
                          mask=jnp.asarray(mask), y=jnp.where(jnp.asarray(mask), train.y, 0))
  for r in range(rounds):
    data = dropped if r == offline_round else train
    state, _ = algo.round(state, data, jax.random.fold_in(RUN_KEY, r))
  return state


@pytest.mark.parametrize("name", ["fedavg", "scaffold"])
def test_node_dying_mid_round_counts_as_offline(name, heart):
  task = app.make_task({"algorithm": name})
  transport = fm.deploy.InProcessTransport(task, offline={(1, 2)})
  dep, history, _, events = fm.deploy.run_federation(task, transport, 3, RUN_KEY)
  assert [(e["round"], e["site"], e["event"]) for e in events] == [(1, 2, "offline")]
  assert history["online"].tolist() == [[True] * 4, [True, True, False, True], [True] * 4]
  assert history["uplink_bytes"][1, 2] == 0
  want = _offline_reference(task.algorithm, task.init_params(), heart, 3, 2, 1)
  assert _max_diff(want.params, dep.params) <= 1e-6
  full, _ = fm.run_rounds(task.algorithm, fm.deploy.initial_state(task), heart, 3, RUN_KEY,
                          progress=False)
  assert _max_diff(full.params, dep.params) > 1e-6     # the drop did change the model


def test_round_with_no_reply_changes_nothing_but_the_counter(heart):
  task = app.make_task({"algorithm": "fedadam"})
  transport = fm.deploy.InProcessTransport(task, offline={(0, k) for k in range(4)})
  dep, history, _, events = fm.deploy.run_federation(task, transport, 1, RUN_KEY)
  assert len(events) == 4
  assert _max_diff(dep.params, task.init_params()) == 0.0
  assert _max_diff(dep.server_opt_state, fm.deploy.initial_state(task).server_opt_state) == 0
  assert int(dep.round) == 1 and not history["online"].any()


def _nan_update(reply):
  return {k: (np.full_like(v, np.nan) if k == "update/0" else v) for k, v in reply.items()}


def test_nan_update_stops_a_plain_mean_naming_the_node(heart):
  task = app.make_task({"algorithm": "fedavg"})
  transport = fm.deploy.InProcessTransport(task, corrupt={(1, 3): _nan_update})
  with pytest.raises(fm.deploy.DeploymentError, match=r"node 3 \(site 3\).*non-finite"):
    fm.deploy.run_federation(task, transport, 3, RUN_KEY)


def test_nan_update_is_dropped_under_a_robust_aggregator(heart):
  model = fm.models.LogisticRegression()
  loss_fn = fm.losses.sigmoid_binary_cross_entropy(model.apply)
  algo = fm.algorithms.fedavg(
      loss_fn, client_optimizer=optax.sgd(1e-2), local_steps=5, batch_size=4,
      aggregator=fm.aggregators.chain(robust.reject_nonfinite(), robust.trimmed_mean(0.25)))
  task = _task(algo, heart)
  transport = fm.deploy.InProcessTransport(task, corrupt={(1, 3): _nan_update})
  dep, history, _, events = fm.deploy.run_federation(task, transport, 3, RUN_KEY)
  assert [(e["round"], e["site"], e["event"]) for e in events] == [(1, 3, "rejected")]
  assert "node 3 (site 3)" in events[0]["why"] and "non-finite" in events[0]["why"]
  assert np.all(np.isfinite(_leaves(dep.params)[0]))
  want = _offline_reference(algo, task.init_params(), heart, 3, 3, 1)
  assert _max_diff(want.params, dep.params) <= 1e-6


def test_malformed_update_is_rejected_naming_shapes(heart):
  task = app.make_task({"algorithm": "fedprox"})
  bad = lambda reply: {**reply, "update/0": np.zeros((2,), np.float32)}
  transport = fm.deploy.InProcessTransport(task, corrupt={(0, 1): bad})
  with pytest.raises(fm.deploy.DeploymentError, match=r"node 1 \(site 1\) sent 'update/0' as"
                     r" float32\[2\], expected float32\[1\]"):
    fm.deploy.run_federation(task, transport, 1, RUN_KEY)
  dropped = fm.deploy.run_federation(task, fm.deploy.InProcessTransport(
      task, corrupt={(0, 1): bad}), 1, RUN_KEY, invalid_updates="drop")
  assert dropped[1]["online"].tolist() == [[True, False, True, True]]


# ----------------------------------------------------------------------------- census, options

def _report(site, n=10, x_shape="13"):
  return {"site": site, "num_examples": n, "x_shape": x_shape, "x_dtype": "float32",
          "y_shape": "", "y_dtype": "int32"}


def test_census_errors_name_the_nodes():
  make = fm.deploy.make_federation
  with pytest.raises(fm.deploy.DeploymentError, match="nodes a and b both say they hold site 0"):
    make({"a": _report(0), "b": _report(0)}, 2)
  with pytest.raises(fm.deploy.DeploymentError, match=r"no node holds site\(s\) \[1\]"):
    make({"a": _report(0)}, 2)
  with pytest.raises(fm.deploy.DeploymentError, match="node b says it holds site 5"):
    make({"a": _report(0), "b": _report(5)}, 2)
  with pytest.raises(fm.deploy.DeploymentError, match=r"node b \(site 1\) holds rows x float32\[12\]"):
    make({"a": _report(0), "b": _report(1, x_shape="12")}, 2)
  fed = make({"b": _report(1, 3), "a": _report(0, 5)}, 2)
  assert [n.node for n in fed.nodes] == ["a", "b"] and fed.max_examples == 5
  np.testing.assert_array_equal(fed.census.num_examples, [5, 3])


def test_rounds_of_another_shape_are_refused(heart):
  model = fm.models.LogisticRegression()
  loss_fn = fm.losses.sigmoid_binary_cross_entropy(model.apply)
  cyclic = fm.algorithms.cyclic(loss_fn, client_optimizer=optax.sgd(0.1), local_steps=1,
                                batch_size=4)
  with pytest.raises(ValueError, match="cyclic has no synchronous kit round"):
    _task(cyclic, heart)
  with pytest.raises(fm.OptionError, match="invalid_updates"):
    task = app.make_task({})
    fm.deploy.DeployedRound(task.algorithm, None, invalid_updates="ignore")


def test_wire_round_trip_and_checks():
  tree = {"a": jnp.arange(6.0).reshape(2, 3), "b": (jnp.int32(3), jnp.ones((1,), jnp.bool_))}
  arrays = wire.flatten("p", tree)
  assert sorted(arrays) == ["p/0", "p/1", "p/2"]
  back = wire.unflatten("p", arrays, tree)
  for x, y in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(back)):
    assert x.dtype == y.dtype and np.array_equal(x, y)
  assert wire.payload_nbytes(arrays) == 6 * 4 + 4 + 1
  with pytest.raises(wire.MalformedMessage, match="sent 2 arrays for 'p', expected 3"):
    wire.unflatten("p", {k: arrays[k] for k in ("p/0", "p/1")}, tree)
  with pytest.raises(wire.MalformedMessage, match=r"'p/0' as float64\[2, 3\]"):
    wire.unflatten("p", {**arrays, "p/0": np.zeros((2, 3))}, tree)
  assert wire.nonfinite_names({"x": np.array([1.0, np.inf]), "y": np.array([1, 2])}) == ["x"]


def test_heart_disease_site_selector():
  train, test = fm.datasets.heart_disease()
  for k, name in enumerate(app.SITES):
    one_train, one_test = fm.datasets.heart_disease(site=name)
    assert one_train.num_sites == 1 and one_train.names == (name,)
    for full, one in ((train, one_train), (test, one_test)):
      x, y = full.site(k)
      ox, oy = one.site(0)
      np.testing.assert_array_equal(ox, x)
      np.testing.assert_array_equal(oy, y)
    assert int(fm.datasets.heart_disease(site=k)[0].site_ids[0]) == k
  with pytest.raises(ValueError, match="site must be 0-3"):
    fm.datasets.heart_disease(site=4)
  with pytest.raises(ValueError, match="site must be 0-3"):
    fm.datasets.heart_disease(site="mayo")
  with pytest.raises(fm.OptionError, match="needs standardize='site' or 'none'"):
    fm.datasets.heart_disease(standardize="pooled", site=0)


def test_private_seed_changes_the_draws_but_not_the_protocol(heart):
  """A node's secret seed folds into its key: the run still works, but its batches
  (and any noise it adds) are no longer the ones the server's key implies."""
  task = app.make_task({"algorithm": "fedavg"})
  plain = fm.deploy.InProcessTransport(task)
  private = fm.deploy.InProcessTransport(task)
  for worker in private.workers.values():
    worker.private_seed = 12345
  a = fm.deploy.run_federation(task, plain, 2, RUN_KEY)[0]
  b = fm.deploy.run_federation(task, private, 2, RUN_KEY)[0]
  assert _max_diff(a.params, b.params) > 1e-6
  assert np.all(np.isfinite(_leaves(b.params)[0]))


def test_deployed_run_writes_the_simulated_runs_audit_log_and_outputs(heart, tmp_path):
  """The audit log of a deployed run hashes the same models as the simulated run's
  (FedProx is bitwise equal in this configuration): the per-round model and
  aggregate hashes agree line by line, and both chains verify."""
  task = app.make_task({"algorithm": "fedprox"})
  logs = {}
  for kind in ("sim", "dep"):
    path = str(tmp_path / f"{kind}.jsonl")
    audit = fm.audit.AuditLog(path)
    if kind == "sim":
      fm.run_rounds(task.algorithm, fm.deploy.initial_state(task), heart, 2, RUN_KEY,
                    progress=False, audit=audit, audit_run="r")
    else:
      fm.deploy.run_federation(task, fm.deploy.InProcessTransport(task), 2, RUN_KEY,
                               audit=audit, out_dir=str(tmp_path / "out"))
    assert fm.audit.verify(path) == 2
    logs[kind] = fm.audit.read_lines(path)
  for a, b in zip(logs["sim"], logs["dep"]):
    for key in ("model_sha256", "aggregate_sha256", "cohort", "hyperparameters"):
      assert a[key] == b[key]
  out = tmp_path / "out"
  assert sorted(p.name for p in out.iterdir()) == ["events.json", "history.json", "params.npz",
                                                  "results.json"]


def test_uplink_codec_runs_on_the_nodes_with_their_residuals(heart):
  """communication(error_feedback(top_k), ...): each node encodes its own update and
  keeps its error-feedback residual; only the payload crosses the network. The
  model equals the simulator's, and each node's residual equals the simulator's
  per-site residual (its aggregator state) after the run."""
  C = fm.aggregators.compression
  model = fm.models.LogisticRegression()
  loss_fn = fm.losses.sigmoid_binary_cross_entropy(model.apply)
  comm = C.communication(C.error_feedback(C.top_k(0.2)))
  algo = fm.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(1e-2), local_steps=5,
                              batch_size=4, aggregator=comm.aggregator)
  task = _task(algo, heart)
  sim, sim_history = fm.run_rounds(algo, algo.init(task.init_params(), num_sites=4), heart, 3,
                                   RUN_KEY, progress=False)
  transport = fm.deploy.InProcessTransport(task)
  dep, history, _, _ = fm.deploy.run_federation(task, transport, 3, RUN_KEY)
  assert _max_diff(sim.params, dep.params) <= 1e-6
  sim_residuals = jax.tree_util.tree_leaves(sim.aggregator_state[0])
  assert any(np.max(np.abs(r)) > 0 for r in sim_residuals)
  for k in range(4):
    node = {name: v for name, v in transport.stores[k].items() if name.startswith("codec/")}
    assert len(node) == len(sim_residuals)
    for i, r in enumerate(sim_residuals):
      np.testing.assert_allclose(node[f"codec/{i}"], np.asarray(r)[k], atol=1e-7)
  # top-20% of 14 float32 values: the simulator's payload bytes, plus 3 int32 values
  np.testing.assert_array_equal(history["uplink_bytes"], sim_history["bytes_up"] + 12)
  assert history["uplink_bytes"][0, 0] < 14 * 4


def test_deployed_run_checkpoints_and_resumes_like_a_simulated_one(heart, tmp_path):
  """orbax checkpoints through fm.run_rounds: a deployed FedAdam run stopped after 2
  rounds and resumed to 4 ends where an uninterrupted 4-round run ends (the
  server state, FedAdam's moments included, is restored exactly)."""
  task = app.make_task({"algorithm": "fedadam"})
  whole = fm.deploy.run_federation(task, fm.deploy.InProcessTransport(task), 4, RUN_KEY)[0]
  ckpt = str(tmp_path / "ckpt")
  fm.deploy.run_federation(task, fm.deploy.InProcessTransport(task), 2, RUN_KEY,
                           checkpoint_dir=ckpt)
  resumed, history, _, _ = fm.deploy.run_federation(
      task, fm.deploy.InProcessTransport(task), 4, RUN_KEY, checkpoint_dir=ckpt)
  assert int(resumed.round) == 4 and len(history["online"]) == 4
  assert _max_diff(whole.params, resumed.params) == 0.0
  assert _max_diff(whole.server_opt_state, resumed.server_opt_state) == 0.0


def test_tcga_brca_site_selector():
  train, test = fm.datasets.tcga_brca()
  for k in range(6):
    one_train, one_test = fm.datasets.tcga_brca(site=train.names[k])
    assert one_train.num_sites == 1 and int(one_train.site_ids[0]) == k
    for full, one in ((train, one_train), (test, one_test)):
      np.testing.assert_array_equal(one.site(0)[0], full.site(k)[0])
      np.testing.assert_array_equal(one.site(0)[1], full.site(k)[1])
  with pytest.raises(ValueError, match="site must be 0-5"):
    fm.datasets.tcga_brca(site=6)


def test_auto_policy_drops_bad_updates_only_under_robust_links():
  from fedjax_med.deploy.server import is_robust
  C = fm.aggregators.compression
  assert is_robust(fm.aggregators.chain(robust.reject_nonfinite(), robust.trimmed_mean(0.25)))
  assert is_robust(robust.coordinate_median())
  assert is_robust(fm.aggregators.chain(C.uplink(C.qsgd(4)), robust.norm_bound(1.0),
                                        fm.core.aggregation.weighted_mean()))
  assert not is_robust(C.communication(C.qsgd(4)).aggregator)       # compression only
  assert not is_robust(fm.core.aggregation.weighted_mean())
