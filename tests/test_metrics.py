"""Accuracy and ROC-AUC against brute-force definitions."""

import numpy as np
import pytest

import fedjax_med as fm


def brute_force_auc(y, s):
  pos, neg = s[y == 1], s[y == 0]
  wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
  return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pairwise_definition_with_ties(seed):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 2, size=40)
  s = np.round(rng.uniform(size=40), 1)  # many ties
  assert fm.metrics.roc_auc(y, s) == pytest.approx(brute_force_auc(y, s), abs=1e-12)


def test_auc_edge_cases():
  assert fm.metrics.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
  assert fm.metrics.roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
  assert fm.metrics.roc_auc([0, 1], [0.5, 0.5]) == 0.5
  assert np.isnan(fm.metrics.roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))


def test_accuracy():
  assert fm.metrics.accuracy([1, 0, 1, 0], [0.9, 0.4, 0.3, 0.6]) == 0.5
  assert fm.metrics.accuracy([1], [0.5]) == 0.0  # strictly greater than 0.5, as FLamby
  with pytest.raises(ValueError, match="labels"):
    fm.metrics.accuracy([2, 0], [0.1, 0.2])
  with pytest.raises(ValueError, match="NaN"):
    fm.metrics.roc_auc([1, 0], [np.nan, 0.2])


def test_binary_report_mean_and_pooled():
  import jax.numpy as jnp
  apply_fn = lambda p, x: x[:, 0] * p
  data = fm.FederatedData.from_sites(
      [(np.array([[1.0], [-1.0], [2.0]]), np.array([1.0, 0.0, 0.0])),
       (np.array([[3.0], [-2.0]]), np.array([1.0, 1.0]))], ["a", "b"])
  report = fm.evaluation.binary_report(apply_fn, jnp.float32(1.0), data)
  assert report["a"]["accuracy"] == pytest.approx(2 / 3)
  assert report["b"]["accuracy"] == pytest.approx(1 / 2)
  assert report["mean"]["accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
  assert report["pooled"]["accuracy"] == pytest.approx(3 / 5)
  assert np.isnan(report["b"]["auc"])             # one class only
  assert report["mean"]["auc"] == report["a"]["auc"]  # mean over defined sites
