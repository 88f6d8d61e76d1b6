"""Masked multi-task BCE, multi-task ROC-AUC and the core invariants under label masks.

References are NumPy float64 loops written here from the equations:
l_i = (1/T) sum_{t observed} BCE(z_it, y_it) for a linear model z = x W + b.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_med as fm
from fedjax_med.training.evaluation_tasks import multitask_report
from fedjax_med.losses.multitask import (masked_bce_terms, masked_multitask_bce,
                                         observed_fraction, observed_mean_bce)
from fedjax_med.metrics.classification import roc_auc
from fedjax_med.metrics.multitask import mean_roc_auc, per_task_roc_auc, split_observed

T = 4
D = 3
SGD = optax.sgd(0.2)   # one object: algorithms built from it share compiled rounds


def linear_apply(params, x):
  """logits [B, T] = x [B, D] @ W [D, T] + b [T]."""
  return x @ params["w"] + params["b"]


LOSS = masked_multitask_bce(linear_apply)


def init_params(seed=1):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=(D, T)) * 0.5, jnp.float32),
          "b": jnp.asarray(rng.normal(size=T) * 0.1, jnp.float32)}


def make_y(labels, observed):
  return np.stack([labels, observed], axis=-1).astype(np.float32)


def make_sites(sizes, seed=0, unobserved_task=None, site_without_task=None):
  """Sites with labels [n, T, 2]; about 30% of labels missing."""
  rng = np.random.default_rng(seed)
  sites = []
  for k, n in enumerate(sizes):
    x = rng.normal(loc=0.2 * k, size=(n, D)).astype(np.float32)
    labels = (rng.uniform(size=(n, T)) < 0.4).astype(np.float32)
    observed = (rng.uniform(size=(n, T)) < 0.7).astype(np.float32)
    if unobserved_task is not None:
      observed[:, unobserved_task] = 0
    if site_without_task is not None and site_without_task[0] == k:
      observed[:, site_without_task[1]] = 0
    labels = labels * observed          # missing labels stored as 0
    sites.append((x, make_y(labels, observed)))
  return sites


def np_bce(z, y):
  return np.logaddexp(0.0, z) - y * z


def np_loss_per_example(params, x, y):
  """(1/T) sum over observed tasks, float64 loop."""
  w = np.asarray(params["w"], np.float64)
  b = np.asarray(params["b"], np.float64)
  out = []
  for i in range(x.shape[0]):
    z = x[i].astype(np.float64) @ w + b
    total = 0.0
    for t in range(T):
      if y[i, t, 1] == 1:            # skip missing labels
        total += np_bce(z[t], float(y[i, t, 0]))
    out.append(total / T)
  return np.asarray(out)


def np_pooled_grad(params, sites):
  """Gradient of (1/(T n)) sum_{observed (i,t)} BCE over all rows of all sites."""
  w = np.asarray(params["w"], np.float64)
  b = np.asarray(params["b"], np.float64)
  gw, gb, n = np.zeros_like(w), np.zeros_like(b), 0
  for x, y in sites:
    x = x.astype(np.float64)
    r = (1.0 / (1.0 + np.exp(-(x @ w + b))) - y[..., 0]) * y[..., 1]
    gw += x.T @ r
    gb += r.sum(axis=0)
    n += x.shape[0]
  return gw / (T * n), gb / (T * n)


def test_per_example_loss_matches_numpy_reference_skipping_missing():
  x, y = make_sites([9])[0]
  params = init_params()
  loss_fn = LOSS
  got = np.asarray(loss_fn(params, jnp.asarray(x), jnp.asarray(y)))
  assert got.shape == (9,)
  np.testing.assert_allclose(got, np_loss_per_example(params, x, y), rtol=1e-5, atol=1e-6)
  # The plain average over observed labels.
  z = np.asarray(linear_apply(params, x), np.float64)
  obs = y[..., 1] == 1
  ref = np_bce(z, y[..., 0])[obs].mean()
  assert float(observed_mean_bce(linear_apply(params, x), jnp.asarray(y))) == pytest.approx(
      ref, rel=1e-5)
  assert loss_fn.label_type == "binary"


def test_missing_label_values_never_matter():
  x, y = make_sites([12])[0]
  params = init_params()
  loss_fn = LOSS
  y2 = y.copy()
  missing = y2[..., 1] == 0
  y2[..., 0][missing] = 1.0             # garbage where missing
  g = jax.grad(lambda p, yy: jnp.mean(loss_fn(p, x, yy)))
  np.testing.assert_array_equal(np.asarray(loss_fn(params, x, y)),
                                np.asarray(loss_fn(params, x, y2)))
  for a, b in zip(jax.tree_util.tree_leaves(g(params, y)), jax.tree_util.tree_leaves(g(params, y2))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_huge_logits_on_missing_labels_do_not_leak():
  logits = jnp.asarray([[1e4, -1e4, 0.0]], jnp.float32)
  y = jnp.asarray(make_y(np.array([[0.0, 1.0, 1.0]]), np.array([[0.0, 0.0, 1.0]])))
  terms, observed = masked_bce_terms(logits, y)
  assert np.isfinite(np.asarray(terms)).all()
  np.testing.assert_array_equal(np.asarray(terms)[0, :2], [0.0, 0.0])
  np.testing.assert_array_equal(np.asarray(observed), [[0.0, 0.0, 1.0]])


def test_fully_missing_task_contributes_zero_gradient():
  x, y = make_sites([10], unobserved_task=2)[0]
  params = init_params()
  loss_fn = LOSS
  grads = jax.grad(lambda p: jnp.mean(loss_fn(p, x, y)))(params)
  assert np.all(np.asarray(grads["w"])[:, 2] == 0.0)
  assert np.asarray(grads["b"])[2] == 0.0
  assert np.any(np.asarray(grads["w"])[:, [0, 1, 3]] != 0.0)


def test_task_missing_everywhere_leaves_its_head_unchanged_in_fedavg():
  sites = make_sites([7, 3, 5], unobserved_task=1)
  data = fm.FederatedData.from_sites(sites, label_type="binary")
  algo = fm.algorithms.fedavg(LOSS,
                              client_optimizer=SGD, local_epochs=2, batch_size=2)
  params = init_params()
  state, _ = algo.round(algo.init(params), data, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(np.asarray(state.params["w"])[:, 1],
                                np.asarray(params["w"])[:, 1])
  assert np.asarray(state.params["b"])[1] == np.asarray(params["b"])[1]
  assert not np.allclose(np.asarray(state.params["w"])[:, 0], np.asarray(params["w"])[:, 0])


def test_site_without_a_task_contributes_nothing_to_that_task():
  # Site 1 never observes task 3: the FedSGD gradient of task 3's head is the
  # other sites' observed terms only, normalised by T n (n = all rows).
  sites = make_sites([6, 4, 5], seed=3, site_without_task=(1, 3))
  data = fm.FederatedData.from_sites(sites, label_type="binary")
  params = init_params()
  loss_fn = LOSS
  algo = fm.algorithms.fedsgd(loss_fn, server_optimizer=optax.sgd(1.0))
  state, _ = algo.round(algo.init(params), data, jax.random.PRNGKey(0))
  gw, gb = np_pooled_grad(params, sites)
  np.testing.assert_allclose(np.asarray(params["w"]) - np.asarray(state.params["w"]), gw,
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(params["b"]) - np.asarray(state.params["b"]), gb,
                             rtol=1e-4, atol=1e-6)
  # Changing site 1's (unobserved) task-3 labels changes nothing.
  x1, y1 = sites[1]
  y1 = y1.copy()
  y1[:, 3, 0] = 1.0
  data2 = fm.FederatedData.from_sites([sites[0], (x1, y1), sites[2]], label_type="binary")
  state2, _ = algo.round(algo.init(params), data2, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(np.asarray(state.params["w"]), np.asarray(state2.params["w"]))


def test_weighted_objective_is_the_observed_label_average_times_a_constant():
  sites = make_sites([7, 3, 5], seed=5)
  data = fm.FederatedData.from_sites(sites, label_type="binary")
  params = init_params()
  loss_fn = LOSS
  F = float(fm.weighted_objective(loss_fn, params, data))
  per_row = np.concatenate([np_loss_per_example(params, x, y) for x, y in sites])
  assert F == pytest.approx(per_row.mean(), rel=1e-5)
  # = (N_obs / (T n)) x mean BCE over all observed labels.
  terms, count = 0.0, 0
  for x, y in sites:
    z = x.astype(np.float64) @ np.asarray(params["w"], np.float64) + np.asarray(params["b"])
    obs = y[..., 1] == 1
    terms += np_bce(z, y[..., 0])[obs].sum()
    count += obs.sum()
  n = sum(x.shape[0] for x, _ in sites)
  assert float(observed_fraction(data)) == pytest.approx(count / (T * n), rel=1e-6)
  assert F == pytest.approx(count / (T * n) * terms / count, rel=1e-5)


def test_padding_and_empty_sites_change_nothing_with_label_masks():
  sites = make_sites([7, 3, 5], seed=2)
  loss_fn = LOSS
  algo = fm.algorithms.fedavg(loss_fn, client_optimizer=SGD, local_epochs=2,
                              batch_size=3)
  params = init_params()
  key = jax.random.PRNGKey(4)
  data = fm.FederatedData.from_sites(sites, label_type="binary")
  base, _ = algo.round(algo.init(params), data, key)
  padded, _ = algo.round(algo.init(params), data.pad_to(11), key)
  empty = (np.zeros((0, D), np.float32), np.zeros((0, T, 2), np.float32))
  with_empty = fm.FederatedData.from_sites([sites[0], empty, sites[1], sites[2]],
                                           label_type="binary", site_ids=[0, 7, 1, 2])
  inserted, _ = algo.round(algo.init(params), with_empty, key)
  for other in (padded, inserted):
    for a, b in zip(jax.tree_util.tree_leaves(base.params), jax.tree_util.tree_leaves(other.params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_fedavg_weights_sites_by_rows_with_label_masks():
  # w = sum_k (n_k / n) w_k, with w_k each site's own local training from w.
  sites = make_sites([7, 3, 5], seed=6)
  loss_fn = LOSS
  algo = fm.algorithms.fedavg(loss_fn, client_optimizer=SGD, local_epochs=1,
                              batch_size=2)
  params = init_params()
  key = jax.random.PRNGKey(9)
  data = fm.FederatedData.from_sites(sites, label_type="binary")
  state, _ = algo.round(algo.init(params), data, key)
  n = np.array([7, 3, 5], np.float64)
  expected_w = 0.0
  for k in range(3):
    alone, _ = algo.round(algo.init(params), data.subset([k]), key)
    expected_w = expected_w + n[k] / n.sum() * np.asarray(alone.params["w"], np.float64)
  np.testing.assert_allclose(np.asarray(state.params["w"]), expected_w, rtol=1e-5, atol=1e-6)


def test_bad_label_shapes_and_values_raise():
  loss_fn = LOSS
  params = init_params()
  x = jnp.ones((2, D))
  with pytest.raises(ValueError, match=r"\[B, T, 2\]"):
    loss_fn(params, x, jnp.ones((2, T)))
  with pytest.raises(ValueError, match="logits"):
    masked_multitask_bce(lambda p, xx: jnp.ones((2,)))(params, x, jnp.ones((2, T, 2)))
  x0, y0 = make_sites([4])[0]
  y0[0, 0, 0] = 2.0
  with pytest.raises(ValueError, match="binary"):
    fm.FederatedData.from_sites([(x0, y0)], label_type="binary")


def test_per_task_auc_uses_observed_rows_only():
  labels = np.array([[1, 0], [0, 1], [1, 0], [0, 0], [1, 1]], np.float32)
  observed = np.array([[1, 1], [1, 1], [1, 0], [1, 1], [0, 0]], np.float32)
  scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.1, 5.0], [0.3, 0.2], [-9.0, -9.0]])
  auc = per_task_roc_auc(labels, observed, scores)
  # Task 0, observed rows 0..3: positives {0.9, 0.1}, negatives {0.2, 0.3}: 2 of 4 pairs.
  assert auc[0] == pytest.approx(0.5)
  assert auc[0] == pytest.approx(roc_auc([1, 0, 1, 0], [0.9, 0.2, 0.1, 0.3]))
  # Task 1, observed rows 0, 1, 3: positive 0.8 beats 0.1 and 0.2.
  assert auc[1] == pytest.approx(1.0)
  assert mean_roc_auc(labels, observed, scores) == pytest.approx(0.75)
  one_class = per_task_roc_auc(labels[:, :1], np.array([[1], [0], [1], [0], [1]]),
                               scores[:, :1])
  assert np.isnan(one_class[0])
  with pytest.raises(ValueError, match="shapes"):
    per_task_roc_auc(labels, observed[:, :1], scores)
  with pytest.raises(ValueError, match=r"\[n, T, 2\]"):
    split_observed(labels)


def test_multitask_report_means_and_pooled():
  sites = make_sites([30, 25], seed=8)
  data = fm.FederatedData.from_sites(sites, ["a", "b"], label_type="binary")
  params = init_params()
  report = multitask_report(linear_apply, params, data, task_names=["p", "q", "r", "s"])
  for name, (x, y) in zip(["a", "b"], sites):
    z = np.asarray(linear_apply(params, x))
    ref = per_task_roc_auc(y[..., 0], y[..., 1], z)
    assert report[name]["auc/q"] == pytest.approx(ref[1])
    assert report[name]["auc"] == pytest.approx(np.nanmean(ref))
  assert report["mean"]["auc"] == pytest.approx((report["a"]["auc"] + report["b"]["auc"]) / 2)
  x = np.concatenate([s[0] for s in sites])
  y = np.concatenate([s[1] for s in sites])
  ref = per_task_roc_auc(y[..., 0], y[..., 1], np.asarray(linear_apply(params, x)))
  assert report["pooled"]["auc"] == pytest.approx(np.nanmean(ref))
  # Per-site models: stacked params, model k scores site k.
  stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, a * 0.5]), params)
  per_site = multitask_report(linear_apply, stacked, data, per_site_params=True)
  half = jax.tree_util.tree_map(lambda a: a * 0.5, params)
  assert per_site["b"]["auc"] == pytest.approx(multitask_report(linear_apply, half, data)["b"]["auc"])
  with pytest.raises(ValueError, match="task_names"):
    multitask_report(linear_apply, params, data, task_names=["p"])
