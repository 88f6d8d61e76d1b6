"""The bundled Fed-TCGA-BRCA loader follows FLamby's dataset.py exactly."""

import csv
import hashlib
import math
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_med as fm
from fedjax_med.data import tcga_brca as tb

SHA256 = {  # from SOURCE.md
    "brca.csv": "07cb53423f7d579d33cfdbf2cba57b2aee75318b85866c68ce39a75b1f1ba020",
    "centers.csv": "d610df2dae0203ea229c9579747ed3eb8d28e137c5378f55acc6fe6b4632bb1d",
    "train_test_split.csv":
        "1249c6543a4060ff0fdaf8510fc37017755836db6c9fc5e6af96057c36510990",
}
TRAIN_SIZES = [248, 156, 164, 129, 129, 40]
TEST_SIZES = [63, 40, 42, 33, 33, 11]
TRAIN_EVENTS = [45, 35, 14, 16, 7, 2]
TEST_EVENTS = [14, 4, 8, 3, 2, 1]


def _root():
  return resources.files("fedjax_med.data").joinpath("files", "tcga_brca")


def _rows(name):
  with _root().joinpath(name).open(newline="") as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def splits():
  return fm.datasets.tcga_brca()


def test_bundled_files_are_intact():
  source = _root().joinpath("SOURCE.md").read_text()
  for name, digest in SHA256.items():
    assert hashlib.sha256(_root().joinpath(name).read_bytes()).hexdigest() == digest
    assert digest in source
  assert "TCGA" in source and "gdc.cancer.gov" in source


def test_counts_and_shapes(splits):
  train, test = splits
  for data in splits:
    assert data.site_names == ("northeast", "south", "west", "midwest", "europe",
                               "canada") == tb.SITES
    assert data.feature_shape == (39,) == (len(tb.FEATURE_NAMES),)
    assert data.label_type == "real"
    assert data.x.dtype == jnp.float32 and data.y.dtype == jnp.float32
  np.testing.assert_array_equal(train.num_examples, TRAIN_SIZES)
  np.testing.assert_array_equal(test.num_examples, TEST_SIZES)
  assert train.y.shape == (6, 248, 2) and test.y.shape == (6, 63, 2)
  assert sum(TRAIN_SIZES) == 866 and sum(TEST_SIZES) == 222


def test_labels_and_features(splits):
  for data, events in zip(splits, (TRAIN_EVENTS, TEST_EVENTS)):
    assert [int(y[:, 0].sum()) for _, y in data.sites()] == events
    x = np.concatenate([x for x, _ in data.sites()])
    y = np.concatenate([y for _, y in data.sites()])
    assert np.isfinite(x).all() and np.isfinite(y).all()
    assert set(np.unique(y[:, 0])) == {0.0, 1.0}
    assert (y[:, 1] >= 0).all()
    # Unscaled, as FLamby: age in years, 38 one-hot indicators in {0, 1}.
    assert set(np.unique(x[:, 1:])) == {0.0, 1.0}
    assert x[:, 0].max() == 90.0 and x[:, 0].min() >= 26.0
  pooled = np.concatenate([y for d in splits for _, y in d.sites()])
  assert pooled[:, 0].sum() == 151 and pooled[:, 1].max() == 8605.0


def test_feature_names_follow_the_file():
  with _root().joinpath("brca.csv").open(newline="") as f:
    header = next(csv.reader(f))
  assert tuple(header[1:40]) == tb.FEATURE_NAMES
  assert header[40:] == ["E", "T"]


def test_matches_flamby_selection(splits):
  """FLamby: df2[df2["pid"].isin(pids with fold2 == f"{train|test}_{k}")]."""
  brca = _rows("brca.csv")
  fold2 = {}
  for row in _rows("train_test_split.csv"):
    fold2.setdefault(row["fold2"], set()).add(row["pid"])
  columns = list(brca[0])
  for part, data in zip(("train", "test"), splits):
    for k in range(6):
      chosen = [r for r in brca if r["pid"] in fold2[f"{part}_{k}"]]   # file order
      x = np.array([[float(r[c]) for c in columns[1:40]] for r in chosen], np.float32)
      y = np.array([[float(r["E"]), float(r["T"])] for r in chosen], np.float32)
      got_x, got_y = data.site(k)
      np.testing.assert_array_equal(got_x, x)
      np.testing.assert_array_equal(got_y, y)


def test_regions_and_excluded_patients():
  region = {r["TSS Code"]: r["Region"] for r in _rows("centers.csv")}
  split = {r["pid"]: r["fold2"] for r in _rows("train_test_split.csv")}
  names = ("Northeast", "South", "West", "Midwest", "Europe", "Canada")
  excluded = []
  for row in _rows("brca.csv"):
    tss = row["pid"].split("-")[1]
    if row["pid"] not in split:
      excluded.append(row["pid"])
      assert region[tss] == "Other"
    else:
      assert region[tss] == names[int(split[row["pid"]].split("_")[1])]
  assert len(excluded) == 8
  assert {p.split("-")[1] for p in excluded} == {"JL", "5L", "PL"}


def test_damaged_files_raise(monkeypatch):
  regions = tb._read_regions()
  moved = dict(regions, BH="South")              # a Northeast TSS, 150 patients
  monkeypatch.setattr(tb, "_read_regions", lambda: moved)
  with pytest.raises(ValueError, match="TSS 'BH' is in region 'South'"):
    tb.tcga_brca()
  monkeypatch.setattr(tb, "_read_regions", lambda: regions)
  split = tb._read_split()
  dropped = dict(split)
  del dropped["TCGA-BH-A18U"]
  monkeypatch.setattr(tb, "_read_split", lambda: dropped)
  with pytest.raises(ValueError, match="missing from train_test_split.csv"):
    tb.tcga_brca()


# -- training and evaluation on the real data ----------------------------------------


def linear_risk(params, x):
  return x @ params["w"] + params["b"]


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=39) * 0.05, jnp.float32),
          "b": jnp.asarray(0.0, jnp.float32)}


def test_survival_report_matches_lifelines(splits):
  lifelines_utils = pytest.importorskip("lifelines.utils")
  _, test = splits
  params = _params()
  report = fm.evaluation.survival_report(linear_risk, params, test)
  assert set(report) == set(tb.SITES) | {"mean", "pooled"}
  values = []
  for k, name in enumerate(tb.SITES):
    x, y = test.site(k)
    risk = np.asarray(linear_risk(params, jnp.asarray(x)))
    want = lifelines_utils.concordance_index(y[:, 1], -risk, y[:, 0])
    assert report[name]["c_index"] == pytest.approx(want, rel=1e-12)
    values.append(want)
  assert report["mean"]["c_index"] == pytest.approx(np.mean(values), rel=1e-12)
  x, y = test.pooled().site(0)
  risk = np.asarray(linear_risk(params, jnp.asarray(x)))
  want = lifelines_utils.concordance_index(y[:, 1], -risk, y[:, 0])
  assert report["pooled"]["c_index"] == pytest.approx(want, rel=1e-12)


def test_survival_report_per_site_params(splits):
  _, test = splits
  models = [_params(k) for k in range(6)]
  stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *models)
  report = fm.evaluation.survival_report(linear_risk, stacked, test,
                                         per_site_params=True)
  for k, name in enumerate(tb.SITES):
    alone = fm.evaluation.survival_report(linear_risk, models[k], test)
    assert report[name]["c_index"] == alone[name]["c_index"]
  # A site without an admissible pair is NaN and left out of the mean.
  censored = test.replace(y=test.y.at[5, :, 0].set(0.0))
  report = fm.evaluation.survival_report(linear_risk, models[0], censored)
  assert math.isnan(report["canada"]["c_index"])
  assert report["mean"]["c_index"] == pytest.approx(
      np.mean([report[n]["c_index"] for n in tb.SITES[:5]]))


def test_fedavg_round_with_cox_loss(splits):
  train, test = splits
  loss_fn = fm.losses.cox_loss(linear_risk)
  params = _params()
  before = float(fm.weighted_objective(loss_fn, params, train))
  assert np.isfinite(before)
  algo = fm.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(1e-3),
                              local_epochs=1, batch_size=8)
  state = algo.init(params)
  for r in range(3):
    state, _ = algo.round(state, train, jax.random.PRNGKey(r))
  leaves = jax.tree_util.tree_leaves(state.params)
  assert all(np.isfinite(np.asarray(a)).all() for a in leaves)
  assert float(fm.weighted_objective(loss_fn, state.params, train)) < before
  report = fm.evaluation.survival_report(linear_risk, state.params, test)
  assert 0.0 <= report["mean"]["c_index"] <= 1.0
