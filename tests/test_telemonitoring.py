"""Parkinson's telemonitoring loader, regression metrics, the two floors, the experiment."""

import os

import numpy as np
import pytest

import fedjax_med as fm
from fedjax_med import evaluation_tasks as et
from fedjax_med.data.telemonitoring import (NUM_PATIENTS, load_raw, load_split,
                                            parkinsons_telemonitoring)
from fedjax_med.metrics.regression import mae, rmse

from conftest import import_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "telemonitoring.py")


@pytest.fixture(scope="module")
def motor():
  return parkinsons_telemonitoring("motor_UPDRS")


@pytest.fixture(scope="module")
def split():
  return load_split("motor_UPDRS")


def test_sizes(motor):
  train, test = motor
  assert train.num_sites == test.num_sites == NUM_PATIENTS == 42
  n_train = int(np.asarray(train.num_examples).sum())
  n_test = int(np.asarray(test.num_examples).sum())
  assert (n_train, n_test) == (4235, 1640)
  assert n_train + n_test == 5875
  assert (np.asarray(test.num_examples) > 0).all()
  assert train.feature_shape == (16,)
  assert train.names[0] == "patient_01" and train.names[-1] == "patient_42"
  assert train.label_type == "real"


def test_time_split_keeps_days_whole_and_train_precedes_test(split):
  raw = load_raw()
  seen_rows = []
  for s, client in enumerate(split, start=1):
    tr, te = client["train"], client["test"]
    assert (raw["subject#"][tr["row"]] == s).all() and (raw["subject#"][te["row"]] == s).all()
    assert tr["test_time"].max() < te["test_time"].min()
    assert not set(np.floor(tr["test_time"])) & set(np.floor(te["test_time"]))
    n = tr["row"].size + te["row"].size
    assert tr["row"].size >= 0.7 * n
    # Minimal: without its last training day the train part would hold < 70%.
    last_day = np.floor(tr["test_time"]).max()
    assert (np.floor(tr["test_time"]) < last_day).sum() < 0.7 * n
    assert (np.diff(tr["test_time"]) >= 0).all() and (np.diff(te["test_time"]) >= 0).all()
    seen_rows += [tr["row"], te["row"]]
  rows = np.concatenate(seen_rows)
  assert np.array_equal(np.sort(rows), np.arange(5875))


def test_features_standardised_with_each_clients_own_train_statistics(motor, split):
  train, test = motor
  for k, ((x_tr, y_tr), (x_te, y_te)) in enumerate(zip(train.sites(), test.sites())):
    raw_tr, raw_te = split[k]["train"]["x"], split[k]["test"]["x"]
    np.testing.assert_allclose(x_tr.mean(axis=0), 0.0, atol=2e-5)
    np.testing.assert_allclose(x_tr.std(axis=0, ddof=1), 1.0, atol=1e-4)
    mean, std = raw_tr.mean(axis=0), raw_tr.std(axis=0, ddof=1)
    np.testing.assert_allclose(x_te, (raw_te - mean) / std, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(y_tr, split[k]["train"]["y"], rtol=1e-6)
    np.testing.assert_allclose(y_te, split[k]["test"]["y"], rtol=1e-6)


def test_all_features_constant_columns_are_centred_not_divided():
  train, test = parkinsons_telemonitoring("total_UPDRS", features="all")
  assert train.feature_shape == (19,)
  x0, _ = train.site(0)
  np.testing.assert_array_equal(x0[:, :2], 0.0)     # age and sex are constant per patient
  raw_train, _ = parkinsons_telemonitoring("total_UPDRS", standardize="none")
  assert np.asarray(raw_train.x).max() > 10         # HNR is ~20 dB unstandardised


@pytest.mark.parametrize("target,global_mae,patient_mae", [
    ("motor_UPDRS", 6.93, 2.96), ("total_UPDRS", 8.79, 3.67)])
def test_trivial_floors_reproduce_source_md(target, global_mae, patient_mae):
  train, test = parkinsons_telemonitoring(target)
  global_params, patient_params = et.mean_predictors(train)
  g = et.regression_report(et.constant_apply, global_params, test)
  p = et.regression_report(et.constant_apply, patient_params, test, per_site_params=True)
  # SOURCE.md's figures are over all 1640 test rows ("pooled").
  assert g["pooled"]["mae"] == pytest.approx(global_mae, abs=0.005)
  assert p["pooled"]["mae"] == pytest.approx(patient_mae, abs=0.005)
  # Independent NumPy reference for both, straight from the raw table.
  raw = load_raw()
  clients = load_split(target)
  y_train = np.concatenate([c["train"]["y"] for c in clients])
  errors_g, errors_p = [], []
  for c in clients:
    errors_g.append(np.abs(c["test"]["y"] - y_train.mean()))
    errors_p.append(np.abs(c["test"]["y"] - c["train"]["y"].mean()))
  assert g["pooled"]["mae"] == pytest.approx(np.concatenate(errors_g).mean(), rel=1e-5)
  assert p["pooled"]["mae"] == pytest.approx(np.concatenate(errors_p).mean(), rel=1e-5)
  assert p["mean"]["mae"] == pytest.approx(np.mean([e.mean() for e in errors_p]), rel=1e-5)
  assert raw[target].size == 5875


def test_regression_metrics_hand_computed():
  y, p = [1.0, 2.0, 4.0], [2.0, 2.0, 1.0]
  assert mae(y, p) == pytest.approx(4.0 / 3.0)
  assert rmse(y, p) == pytest.approx(np.sqrt(10.0 / 3.0))
  assert np.isnan(mae([], [])) and np.isnan(rmse([], []))
  with pytest.raises(ValueError, match="entries"):
    mae([1.0], [1.0, 2.0])
  with pytest.raises(ValueError, match="NaN"):
    rmse([1.0], [float("nan")])


def test_share_beating():
  a = {"s1": {"mae": 1.0}, "s2": {"mae": 3.0}, "s3": {"mae": float("nan")}}
  b = {"s1": {"mae": 2.0}, "s2": {"mae": 2.0}, "s3": {"mae": 1.0}}
  assert et.share_beating(a, b, "mae", ["s1", "s2", "s3"]) == pytest.approx(0.5)


def test_bad_input():
  with pytest.raises(fm.OptionError, match="target"):
    parkinsons_telemonitoring("updrs")
  with pytest.raises(fm.OptionError, match="split"):
    parkinsons_telemonitoring("motor_UPDRS", split="random")
  with pytest.raises(fm.OptionError, match="features"):
    parkinsons_telemonitoring("motor_UPDRS", features="jitter")
  with pytest.raises(fm.OptionError, match="standardize"):
    parkinsons_telemonitoring("motor_UPDRS", standardize="pooled")
  for bad in (0.0, 1.0, "most"):
    with pytest.raises(fm.OptionError, match="train_fraction"):
      parkinsons_telemonitoring("motor_UPDRS", train_fraction=bad)


def _load_script():
  return import_experiment(SCRIPT, "telemonitoring_experiment")


@pytest.mark.slow
def test_experiment_smoke(tmp_path):
  module = _load_script()
  assert module.main(["--smoke", "--no-progress", "--out", str(tmp_path)]) == 0
  records = fm.report.load_records(os.path.join(tmp_path, "results.json"))
  assert all(
      set(r) == set(fm.report.RECORD_FIELDS) | set(fm.report.PROVENANCE_FIELDS)
      for r in records)
  assert {r["strategy"] for r in records} == set(module.ORDER)
  by = {(r["strategy"], r["site"], r["metric"]): r["value"] for r in records}
  assert by[("patient_mean", "pooled", "mae")] == pytest.approx(2.96, abs=0.005)
  assert by[("global_mean", "pooled", "mae")] == pytest.approx(6.93, abs=0.005)
  patients = [f"patient_{s:02d}" for s in range(1, 43)]
  mean = np.mean([by[("fedavg", s, "mae")] for s in patients])
  assert by[("fedavg", "mean", "mae")] == pytest.approx(mean, rel=1e-9)
  assert 0.0 <= by[("fedper", "mean", "beats_local")] <= 1.0
  assert by[("local", "mean", "beats_local")] == 0.0
  assert os.path.exists(os.path.join(tmp_path, "table.md"))
  assert os.path.exists(os.path.join(tmp_path, "telemonitoring_motor_UPDRS.png"))
