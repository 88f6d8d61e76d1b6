"""experiments/communication.py end to end (--smoke --audit): records, exact bytes,
history, table, both figures and a verified audit log."""

import os
import subprocess
import sys

import numpy as np
import pytest

import fedjax_med as fm
from fedjax_med import audit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "communication.py")
ROUNDS, FEDBUFF_ROUNDS = 3, 12        # max(2, round(50 * 0.06)), round(200 * 0.06)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("comm")
  proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--no-progress", "--out", str(out),
                         "--audit", str(out / "audit.jsonl")],
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr
  return out, proc.stdout


@pytest.mark.slow
def test_records_keep_the_schema_and_hold_costs(smoke_run):
  out, stdout = smoke_run
  records = fm.report.load_records(os.path.join(out, "results.json"))
  assert records and all(
      set(r) == set(fm.report.RECORD_FIELDS) | set(fm.report.PROVENANCE_FIELDS)
      for r in records)
  assert {r["dataset"] for r in records} == {"heart_disease", "tcga_brca"}
  assert {r["strategy"] for r in records} == {"fedavg", "sign_ef", "fedbuff"}
  run = {(r["dataset"], r["strategy"], r["metric"]): r["value"] for r in records
         if r["site"] == fm.report.RUN_SITE}
  for dataset in ("heart_disease", "tcga_brca"):
    for strategy in ("fedavg", "sign_ef", "fedbuff"):
      for metric in ("bytes_up_total", "bytes_down_total", "bytes_total", "wall_time_s",
                     "sim_time", "time_to_target"):
        assert (dataset, strategy, metric) in run
  # Exact bytes: heart disease 13 + 1 float32 parameters (56 B), K = 4; TCGA 39 + 1
  # (160 B), K = 6. EF-sign: packed signs + a float32 scale per tensor.
  assert run[("heart_disease", "fedavg", "bytes_up_total")] == ROUNDS * 4 * 56
  assert run[("heart_disease", "fedavg", "bytes_down_total")] == ROUNDS * 4 * 56
  assert run[("heart_disease", "sign_ef", "bytes_up_total")] == ROUNDS * 4 * ((2 + 4) + (1 + 4))
  assert run[("tcga_brca", "fedavg", "bytes_up_total")] == ROUNDS * 6 * 160
  assert run[("tcga_brca", "sign_ef", "bytes_up_total")] == ROUNDS * 6 * ((5 + 4) + (1 + 4))
  # Synchronous rounds wait for the 10x straggler: 10 time units each.
  assert run[("heart_disease", "fedavg", "sim_time")] == pytest.approx(10 * ROUNDS, rel=1e-5)
  assert 0 < run[("heart_disease", "fedbuff", "sim_time")] <= FEDBUFF_ROUNDS
  metrics = {r["metric"] for r in records if r["dataset"] == "heart_disease"}
  assert {"accuracy", "auc"} <= metrics
  assert "c_index" in {r["metric"] for r in records if r["dataset"] == "tcga_brca"}
  assert "| fedavg |" in stdout and "bytes vs fedavg" in stdout


@pytest.mark.slow
def test_history_holds_cumulative_series(smoke_run):
  out, _ = smoke_run
  rows = fm.report.load_history(os.path.join(out, "history.json"))
  assert rows and all(set(r) == set(fm.report.HISTORY_FIELDS) for r in rows)
  rounds, up, _ = fm.report.series_mean(rows, "heart_disease", "fedavg", "bytes_up_total",
                                        "all", "train")
  np.testing.assert_array_equal(rounds, [1, 2, 3])
  np.testing.assert_array_equal(up, [224, 448, 672])
  rounds, acc, _ = fm.report.series_mean(rows, "heart_disease", "fedbuff", "accuracy",
                                         "mean", "test")
  assert len(rounds) == FEDBUFF_ROUNDS and np.all((acc >= 0) & (acc <= 1))


@pytest.mark.slow
def test_table_figures_and_audit_log(smoke_run):
  out, _ = smoke_run
  for name in ("table.md", "metric_vs_bytes.png", "metric_vs_time.png", "curves.png",
               "sites.png"):
    assert os.path.exists(os.path.join(out, name)), name
  path = os.path.join(out, "audit.jsonl")
  assert audit.verify(path) == 2 * (2 * ROUNDS + FEDBUFF_ROUNDS)
  entries = audit.read_lines(path)
  fedavg = [e for e in entries if e["run"] == "heart_disease/fedavg/seed0"]
  assert [e["round"] for e in fedavg] == [0, 1, 2]
  assert set(fedavg[0]["site_updates"]) == {"cleveland", "hungarian", "switzerland", "va"}
