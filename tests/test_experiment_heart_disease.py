"""experiments/heart_disease.py end to end (--smoke): records, table, determinism."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fedjax_med as fm
from fedjax_med.data import heart_disease as hd

from conftest import import_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "heart_disease.py")


def _load_script():
  return import_experiment(SCRIPT, "heart_disease_experiment")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("hd")
  # This process compiles afresh (the suite's persistent compilation cache off), so that
  # the run in the test process (which may load cached programs) is compared with a run
  # of independently compiled programs.
  env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "false"}
  proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--no-progress", "--out",
                         str(out)], capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr
  return out, proc.stdout


def test_writes_tidy_records(smoke_run):
  out, stdout = smoke_run
  records = fm.report.load_records(os.path.join(out, "results.json"))
  assert records and all(
      set(r) == set(fm.report.RECORD_FIELDS) | set(fm.report.PROVENANCE_FIELDS)
      for r in records)
  strategies = {r["strategy"] for r in records}
  # FedSGD and FedAvg under both standardisations, the matched pooled baseline, local.
  assert {"fedsgd_global", "fedavg_global", "fedsgd_site", "fedavg_site",
          "fedavg_uniform_site", "local", "pooled",
          "local_0", "local_1", "local_2", "local_3"} <= strategies
  sites = {r["site"] for r in records}
  assert sites == {"cleveland", "hungarian", "switzerland", "va", "mean", "pooled"}
  assert {r["metric"] for r in records} == {"accuracy", "auc"}
  assert {r["split"] for r in records} == {"train", "test"}
  assert all(r["dataset"] == "heart_disease" for r in records)
  # "mean" is the unweighted mean over the four sites.
  by = {(r["strategy"], r["site"], r["split"], r["metric"]): r["value"] for r in records}
  sites4 = ["cleveland", "hungarian", "switzerland", "va"]
  for strategy in ("fedavg_global", "fedavg_site"):
    mean = sum(by[(strategy, s, "test", "accuracy")] for s in sites4) / 4
    assert by[(strategy, "mean", "test", "accuracy")] == pytest.approx(mean, abs=1e-12)
  assert "| fedavg_global |" in stdout and "| fedavg_site |" in stdout and "± " in stdout
  assert os.path.exists(os.path.join(out, "table.md"))


def test_standardisations_match_numpy():
  # "global": the pooled raw train rows' mean and std (ddof = 1), as NumPy computes them
  # in float64, applied to every site's train and test rows (pooled training and the
  # *_global runs); "site": each site's own train statistics (FLamby's protocol).
  data = _load_script().standardisations()
  raw = hd.load_raw()
  pooled = np.concatenate([raw[s]["train"][0] for s in hd.SITES])
  mean, std = pooled.mean(0), pooled.std(0, ddof=1)
  for k, name in enumerate(hd.SITES):
    own = raw[name]["train"][0]
    own_std = own.std(0, ddof=1)
    for i, split in enumerate(("train", "test")):
      x = raw[name][split][0]
      # float32 storage: <= 2^-24 relative on values below ~10 in magnitude.
      np.testing.assert_allclose(data["global"][i].site(k)[0], (x - mean) / std,
                                 rtol=1e-6, atol=1e-6)
      np.testing.assert_allclose(data["site"][i].site(k)[0],
                                 (x - own.mean(0)) / (own_std + 1e-9), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_same_seed_is_bit_identical_across_processes(smoke_run, tmp_path):
  out, _ = smoke_run
  module = _load_script()
  module.main(["--smoke", "--no-progress", "--out", str(tmp_path)])
  with open(os.path.join(out, "results.json")) as f:
    first = json.load(f)
  with open(os.path.join(tmp_path, "results.json")) as f:
    second = json.load(f)
  assert first == second
  with open(os.path.join(out, "history.json")) as f:
    h1 = json.load(f)
  with open(os.path.join(tmp_path, "history.json")) as f:
    h2 = json.load(f)
  assert h1 == h2


@pytest.mark.slow
def test_different_seed_differs(smoke_run, tmp_path):
  out, _ = smoke_run
  module = _load_script()
  module.main(["--smoke", "--no-progress", "--seeds", "1", "--out", str(tmp_path)])
  with open(os.path.join(out, "history.json")) as f:
    h1 = json.load(f)
  with open(os.path.join(tmp_path, "history.json")) as f:
    h2 = json.load(f)
  loss = lambda h, seed: [r["value"] for r in h if r["strategy"] == "fedavg_global"
                          and r["seed"] == seed and r["metric"] == "train_loss"]
  assert loss(h1, 0) and loss(h1, 0) != loss(h2, 1)


def test_plots_flag_writes_the_report(tmp_path):
  module = _load_script()
  module.main(["--smoke", "--no-progress", "--plots", "--out", str(tmp_path)])
  for name in ("report.md", "sites.png", "train_loss.png"):
    assert os.path.getsize(os.path.join(tmp_path, name)) > 100
  history = fm.report.load_history(os.path.join(tmp_path, "history.json"))
  assert {r["strategy"] for r in history} >= {"fedavg_global", "fedsgd_global", "fedavg_site",
                                              "fedsgd_site", "local", "pooled"}
