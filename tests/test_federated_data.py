"""FederatedData: layout, padding, ids, and clear errors on bad input."""

import numpy as np
import pytest

import fedjax_med as fm
from conftest import make_sites


def test_from_sites_layout(sites):
  data = fm.FederatedData.from_sites(sites, ["a", "b", "c"])
  assert data.x.shape == (3, 7, 3) and data.y.shape == (3, 7) and data.mask.shape == (3, 7)
  np.testing.assert_array_equal(data.num_examples, [7, 3, 5])
  np.testing.assert_array_equal(data.site_ids, [0, 1, 2])
  assert data.mask.dtype == bool and data.x.dtype == np.float32
  for k, (x, y) in enumerate(sites):
    np.testing.assert_array_equal(data.x[k, :len(y)], x)
    np.testing.assert_array_equal(data.y[k, :len(y)], y)
    assert not np.asarray(data.x[k, len(y):]).any()  # padding is zeros
    xk, yk = data.site(k)
    np.testing.assert_array_equal(xk, x)
    np.testing.assert_array_equal(yk, y)
  assert data.names == ("a", "b", "c")


def test_pad_to_subset_pooled(data, sites):
  padded = data.pad_to(11)
  assert padded.max_examples == 11
  np.testing.assert_array_equal(padded.num_examples, data.num_examples)
  sub = data.subset([2, 0])
  assert sub.names == ("c", "a")
  np.testing.assert_array_equal(sub.site_ids, [2, 0])
  np.testing.assert_array_equal(sub.num_examples, [5, 7])
  pooled = data.pooled()
  assert pooled.num_sites == 1 and int(pooled.num_examples[0]) == 15
  np.testing.assert_array_equal(pooled.site(0)[1], np.concatenate([y for _, y in sites]))


def test_empty_site_allowed():
  sites = make_sites([4, 0, 2])
  data = fm.FederatedData.from_sites(sites)
  np.testing.assert_array_equal(data.num_examples, [4, 0, 2])


def test_pytree_roundtrip(data):
  import jax
  leaves, treedef = jax.tree_util.tree_flatten(data)
  assert len(leaves) == 4
  again = jax.tree_util.tree_unflatten(treedef, leaves)
  assert again.names == data.names


@pytest.mark.parametrize("case, match", [
    ("x_rank", r"site 1.*'x'.*rank 1"),
    ("y_rank", r"site 0.*'y'.*rank 0"),
    ("feature_shape", r"site 2.*'x'.*feature shape \(4,\)"),
    ("label_shape", r"site 1.*'y'.*label shape \(2,\)"),
    ("length", r"site 1.*'x' has 3 rows but field 'y' has 2"),
    ("nan_x", r"site 2.*'x'.*NaN"),
    ("inf_x", r"site 0.*'x'.*inf"),
    ("nan_y", r"site 1.*'y'.*NaN"),
    ("binary_labels", r"site 2.*'y'.*binary"),
    ("all_empty", r"every site is empty"),
    ("no_sites", r"no sites"),
    ("names", r"3 site_names for 2 sites"),
    ("ids", r"site_ids"),
    ("label_type", r"unknown label_type"),
])
def test_bad_input_names_site_and_field(case, match):
  sites = make_sites([4, 3, 5])
  kwargs = {}
  if case == "x_rank":
    sites[1] = (sites[1][0][:, 0], sites[1][1])
  elif case == "y_rank":
    sites[0] = (sites[0][0], np.float32(1.0))
  elif case == "feature_shape":
    sites[2] = (np.zeros((5, 4), np.float32), sites[2][1])
  elif case == "label_shape":
    sites = [(x, y[:, None]) for x, y in sites]
    sites[1] = (sites[1][0], np.zeros((3, 2), np.float32))
  elif case == "length":
    sites[1] = (sites[1][0], sites[1][1][:2])
  elif case == "nan_x":
    sites[2][0][3, 1] = np.nan
  elif case == "inf_x":
    sites[0][0][0, 0] = np.inf
  elif case == "nan_y":
    sites[1][1][0] = np.nan
  elif case == "binary_labels":
    sites[2][1][0] = 2.0
    kwargs["label_type"] = "binary"
  elif case == "all_empty":
    sites = [(np.zeros((0, 3)), np.zeros((0,))) for _ in range(3)]
  elif case == "no_sites":
    sites = []
  elif case == "names":
    sites = sites[:2]
    kwargs["site_names"] = ["a", "b", "c"]
  elif case == "ids":
    kwargs["site_ids"] = [0, 0, 1]
  elif case == "label_type":
    kwargs["label_type"] = "ordinal"
  with pytest.raises(ValueError, match=match):
    fm.FederatedData.from_sites(sites, **kwargs)


def test_direct_constructor_validates():
  x = np.zeros((2, 3, 1), np.float32)
  y = np.zeros((2, 3), np.float32)
  mask = np.ones((2, 3), bool)
  x[1, 2, 0] = np.nan
  with pytest.raises(ValueError, match=r"site 1.*'x'.*NaN"):
    fm.FederatedData(x, y, mask)
  with pytest.raises(ValueError, match=r"'mask'"):
    fm.FederatedData(np.zeros((2, 3, 1)), y, mask.astype(np.float32))
  with pytest.raises(ValueError, match=r"every site is empty"):
    fm.FederatedData(np.zeros((2, 3, 1)), y, np.zeros((2, 3), bool))


def test_binary_loss_rejects_bad_labels_at_round():
  """A binary loss refuses labels outside {0, 1} even if the data did not say."""
  import jax
  import optax
  from conftest import bce_loss, init_params
  sites = make_sites([4, 3])
  sites[1][1][2] = 3.0   # e.g. the raw UCI 'num' column
  data = fm.FederatedData.from_sites(sites)
  algo = fm.algorithms.fedavg(bce_loss, client_optimizer=optax.sgd(0.1), batch_size=2)
  with pytest.raises(ValueError, match=r"site 1.*'y'.*3\.0.*binary"):
    algo.round(algo.init(init_params()), data, jax.random.PRNGKey(0))
