"""The bundled Fed-Heart-Disease loader follows FLamby's preprocessing."""

import hashlib
from importlib import resources

import numpy as np
import pytest

import fedjax_med as fm
from fedjax_med.data import heart_disease as hd

SHA256 = {  # from SOURCE.md
    "processed.cleveland.data": "a74b7efa387bc9d108d7d0115d831fe9b414b29ae7124f331b622b4efa0427c8",
    "processed.hungarian.data": "d1ad108f785768cd3d7e82dc522e6f5a61eea93cccfb3a46ee8076f73fc3d796",
    "processed.switzerland.data": "834a405ccf5b66ab4056bb77794adc8df0b7125186454c0a1d002d33c6c3b314",
    "processed.va.data": "e7c93d8d0d2acdadfa4c5e8de768e2191e7f618b952e29623f1f0d5949ff6b8f",
    "flamby_split.csv": "71e59bd8b718ffe6ad61870fb61b11c5cf728f3ef47879b3149c6443429bd4e3",
}


@pytest.fixture(scope="module")
def splits():
  return fm.datasets.heart_disease()


def test_bundled_files_are_intact():
  root = resources.files("fedjax_med.data").joinpath("files", "heart_disease")
  for name, digest in SHA256.items():
    assert hashlib.sha256(root.joinpath(name).read_bytes()).hexdigest() == digest
  assert "CC BY 4.0" in root.joinpath("SOURCE.md").read_text()


def test_counts_and_shapes(splits):
  train, test = splits
  assert train.site_names == ("cleveland", "hungarian", "switzerland", "va")
  np.testing.assert_array_equal(train.num_examples, [199, 172, 30, 85])
  np.testing.assert_array_equal(test.num_examples, [104, 89, 16, 45])
  assert train.feature_shape == (13,) and test.feature_shape == (13,)
  assert train.y.shape == (4, 199) and test.y.shape == (4, 104)
  for data in splits:
    x, y = np.asarray(data.x), np.asarray(data.y)
    assert np.isfinite(x).all() and np.isfinite(y).all()
    assert set(np.unique(y[np.asarray(data.mask)])) <= {0.0, 1.0}


def test_filter_and_labels_match_source():
  raw = hd.load_raw()
  kept = {s: len(raw[s]["train"][1]) + len(raw[s]["test"][1]) for s in hd.SITES}
  assert kept == {"cleveland": 303, "hungarian": 261, "switzerland": 46, "va": 130}
  # Switzerland: a single negative after the filter (SOURCE.md: 0.98 positive rate).
  sw = np.concatenate([raw["switzerland"]["train"][1], raw["switzerland"]["test"][1]])
  assert sw.sum() == 45
  # One-hot columns are 0/1 and at most one level is set per row.
  x = np.concatenate([raw[s][p][0] for s in hd.SITES for p in ("train", "test")])
  cp, restecg = x[:, 8:11], x[:, 11:13]
  assert set(np.unique(cp)) == {0.0, 1.0} and (cp.sum(1) <= 1).all()
  assert (restecg.sum(1) <= 1).all()


def test_site_standardisation(splits):
  train, test = splits
  raw = hd.load_raw()
  for k, name in enumerate(hd.SITES):
    x, _ = train.site(k)
    mean, std = x.mean(0), x.std(0, ddof=1)
    constant = raw[name]["train"][0].std(0, ddof=1) == 0
    np.testing.assert_allclose(mean, 0.0, atol=1e-5)
    np.testing.assert_allclose(std[~constant], 1.0, atol=1e-4)
    np.testing.assert_array_equal(x[:, constant], 0.0)  # e.g. Switzerland's chol
    # Test rows use the site's *train* statistics.
    raw_x = raw[name]["train"][0]
    want = (raw[name]["test"][0] - raw_x.mean(0)) / (raw_x.std(0, ddof=1) + 1e-9)
    np.testing.assert_allclose(test.site(k)[0], want, rtol=1e-5, atol=1e-5)
    if name == "switzerland":  # chol is always 0 there (unrecorded)
      assert constant[hd.FEATURE_NAMES.index("chol")]


def test_pooled_standardisation():
  train, test = fm.datasets.heart_disease(standardize="pooled")
  x = train.pooled().site(0)[0]
  np.testing.assert_allclose(x.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(x.std(0, ddof=1), 1.0, atol=1e-4)
  raw_train, _ = fm.datasets.heart_disease(standardize="none")
  assert np.asarray(raw_train.x).max() > 100  # cholesterol in mg/dl


def test_unknown_standardize():
  with pytest.raises(ValueError, match="standardize"):
    fm.datasets.heart_disease(standardize="global")


def test_federated_standardisation_is_the_pooled_train_statistics():
  # standardize="federated": the global train mean/std (ddof = 1) from per-site sums,
  # checked against NumPy float64 on the pooled raw train rows; test rows use them too.
  train, test = fm.datasets.heart_disease(standardize="federated")
  raw = hd.load_raw()
  pooled = np.concatenate([raw[s]["train"][0] for s in hd.SITES])
  mean, std = pooled.mean(0), pooled.std(0, ddof=1)
  for k, name in enumerate(hd.SITES):
    for data, split in ((train, "train"), (test, "test")):
      want = (raw[name][split][0] - mean) / std
      # float32 storage: 2^-24 relative on values up to ~7 in magnitude.
      np.testing.assert_allclose(data.site(k)[0], want, rtol=1e-6, atol=1e-6)
      np.testing.assert_array_equal(data.site(k)[1], raw[name][split][1])
  x = train.pooled().site(0)[0].astype(np.float64)
  np.testing.assert_allclose(x.std(0, ddof=1), 1.0, rtol=1e-6)
