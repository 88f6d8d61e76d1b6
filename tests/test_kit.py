"""The kit's own options (fm.kit), beyond what the algorithms built with it test."""

import jax
import numpy as np
import optax
import pytest

import fedjax_med as fm
from conftest import bce_loss, init_params, make_sites


@pytest.fixture(scope="module")
def data():
  return fm.FederatedData.from_sites(make_sites([5, 3, 4], seed=2))


def test_report_metrics_keeps_exactly_the_named_metrics(data):
  full = fm.kit.build_algorithm("fedavg_like", bce_loss, client_optimizer=optax.sgd(0.1),
                                batch_size=2)
  kept = fm.kit.build_algorithm("fedavg_like", bce_loss, client_optimizer=optax.sgd(0.1),
                                batch_size=2, report_metrics=("train_loss", "num_examples"))
  key = jax.random.PRNGKey(0)
  s_full, m_full = full.round(full.init(init_params()), data, key)
  s_kept, m_kept = kept.round(kept.init(init_params()), data, key)
  assert set(m_full) > {"train_loss", "num_examples", "update_norm", "cohort"}
  assert sorted(m_kept) == ["num_examples", "train_loss"]
  np.testing.assert_array_equal(m_kept["num_examples"], [5, 3, 4])
  jax.tree.map(np.testing.assert_array_equal, s_kept.params, s_full.params)


def test_report_metrics_naming_an_absent_metric_is_an_error(data):
  algo = fm.kit.build_algorithm("mine", bce_loss, client_optimizer=optax.sgd(0.1),
                                batch_size=2, report_metrics=("train_loss", "accuracy"))
  with pytest.raises(ValueError, match=r"mine: report_metrics names \['accuracy'\]"):
    algo.round(algo.init(init_params()), data, jax.random.PRNGKey(0))


def test_local_only_reports_its_per_site_metrics(data):
  algo = fm.algorithms.local_only(bce_loss, optimizer=optax.sgd(0.1), batch_size=2)
  _, metrics = algo.round(algo.init(init_params(), 3), data, jax.random.PRNGKey(1))
  assert sorted(metrics) == ["client_steps", "client_train_loss", "num_examples"]
  # 1 epoch of batches of 2: ceil(n_k / 2) steps per site.
  np.testing.assert_array_equal(metrics["client_steps"], [3, 2, 2])
