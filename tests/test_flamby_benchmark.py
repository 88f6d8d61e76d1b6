"""experiments/flamby_benchmark.py --smoke: every strategy, both datasets, tidy outputs."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest

import fedjax_med as fm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "flamby_benchmark.py")
STRATEGIES = {"pooled", "fedavg", "fedprox", "scaffold", "cyclic", "fedadam", "fedyogi",
              "fedadagrad", "fedavg_finetune", "fednova", "fedavg_epochs", "ditto", "fedper"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("flamby")
  proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--quiet", "--out", str(out)],
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out, proc.stdout


def test_records_cover_every_strategy_and_site(smoke):
  out, stdout = smoke
  records = fm.report.load_records(os.path.join(out, "results.json"))
  assert all(set(r) == set(fm.report.RECORD_FIELDS) for r in records)
  for dataset, k, metric in (("heart_disease", 4, "accuracy"), ("tcga_brca", 6, "c_index")):
    rs = [r for r in records if r["dataset"] == dataset]
    strategies = {r["strategy"] for r in rs}
    assert STRATEGIES | {f"local_{i}" for i in range(k)} == strategies
    assert {r["seed"] for r in rs} == {42, 43}
    assert len({r["site"] for r in rs}) == k + 2        # sites + mean + pooled
    assert metric in {r["metric"] for r in rs}
    # "mean" is the unweighted mean over the sites where the metric is defined.
    for strategy in ("fedavg", "ditto"):
      by_site = {r["site"]: r["value"] for r in rs if r["strategy"] == strategy
                 and r["seed"] == 42 and r["metric"] == metric}
      values = [v for s, v in by_site.items() if s not in ("mean", "pooled") and v is not None]
      assert by_site["mean"] == pytest.approx(np.mean(values), abs=1e-12)
    assert os.path.getsize(os.path.join(out, f"{dataset}.png")) > 1000
  table = open(os.path.join(out, "table.md")).read()
  assert "| fedyogi |" in table and "c_index (test)" in table and "± " in stdout


def test_protocol_values_are_flambys():
  import importlib.util
  spec = importlib.util.spec_from_file_location("flamby_benchmark", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  assert module.HEART.rounds == 15 and module.TCGA.rounds == 5
  assert module.HEART.fedadagrad == (3.162e-3, 0.316228)
  assert module.TCGA.fedprox_mu == 0.1 and module.HEART.fedprox_mu == 0.01
  assert math.isclose(module.TCGA.baseline_lr, 0.1) and module.HEART.batch_size == 4


def test_bars_are_the_site_mean_of_the_main_metric(smoke):
  import importlib.util
  out, _ = smoke
  spec = importlib.util.spec_from_file_location("flamby_benchmark_bars", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  records = fm.report.load_records(os.path.join(out, "results.json"))
  names, means, _ = module.site_mean_bars(records, "heart_disease", "accuracy")
  fedavg = [r["value"] for r in records if r["dataset"] == "heart_disease"
            and r["strategy"] == "fedavg" and r["site"] == "mean" and r["metric"] == "accuracy"]
  assert means[names.index("fedavg")] == pytest.approx(np.mean(fedavg))
