"""experiments/privacy_utility.py end to end (--smoke): records, epsilons, plot."""

import os
import subprocess
import sys

import dp_accounting
import pytest

import fedjax_med as fm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "privacy_utility.py")
SITES = ("cleveland", "hungarian", "switzerland", "va")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("pu")
  proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--out", str(out)],
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr
  return out, proc.stdout


def test_records_plot_and_epsilons(smoke_run):
  out, stdout = smoke_run
  records = fm.report.load_records(os.path.join(out, "results.json"))
  assert records and all(set(r) == set(fm.report.RECORD_FIELDS) for r in records)
  assert {r["strategy"] for r in records} == {
      "patient_level(eps=3)", "patient_level(eps=inf)", "site_level(eps=3)",
      "site_level(eps=inf)"}
  assert {r["metric"] for r in records} == {"accuracy", "auc", "epsilon", "noise_multiplier"}
  assert os.path.getsize(os.path.join(out, "privacy_utility.png")) > 1000
  assert "accuracy (test)" in stdout
  by = {(r["strategy"], r["site"], r["metric"], r["split"]): r["value"] for r in records}
  # patient level: an epsilon per site, the smallest site (Switzerland) spends the target
  eps = {s: by[("patient_level(eps=3)", s, "epsilon", "train")] for s in SITES}
  assert eps["switzerland"] == pytest.approx(3.0, abs=0.01)
  assert eps["switzerland"] <= 3.0 + 1e-9
  assert eps["cleveland"] < eps["va"] < eps["switzerland"]
  assert by[("patient_level(eps=3)", "max", "epsilon", "train")] == max(eps.values())
  # reported epsilon = dp-accounting on the same event (2 rounds x 2 steps, q = 8 / n_k)
  sigma = by[("patient_level(eps=3)", "all", "noise_multiplier", "train")]
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(8 / 199, dp_accounting.GaussianDpEvent(sigma)), 4)
  direct = dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(1e-5)
  assert abs(eps["cleveland"] - direct) <= 1e-6
  # site level: one epsilon for every site; sigma = 0 is epsilon = inf (stored as null)
  assert {by[("site_level(eps=3)", s, "epsilon", "train")] for s in SITES} == {
      by[("site_level(eps=3)", "max", "epsilon", "train")]}
  assert by[("site_level(eps=inf)", "cleveland", "epsilon", "train")] is None
  assert by[("site_level(eps=inf)", "all", "noise_multiplier", "train")] == 0.0
  for strategy in ("patient_level(eps=3)", "site_level(eps=inf)"):
    acc = by[(strategy, "mean", "accuracy", "test")]
    assert acc == pytest.approx(sum(by[(strategy, s, "accuracy", "test")] for s in SITES) / 4)
