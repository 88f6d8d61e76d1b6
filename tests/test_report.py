"""fm.report: the accuracy-bytes-time-epsilon table, history files, and figures."""

import json
import os

import numpy as np
import pytest

import fedjax_med as fm
from fedjax_med import report


def _records():
  out = []
  for seed, (acc_a, acc_b) in enumerate([(0.7, 0.6), (0.8, 0.6)]):
    out += report.records_from_report("toy", "A", seed, "test",
                                      {"s1": {"accuracy": acc_a}, "mean": {"accuracy": acc_a}})
    out += report.records_from_report("toy", "B", seed, "test",
                                      {"s1": {"accuracy": acc_b}, "mean": {"accuracy": acc_b}})
    out += report.run_records("toy", "A", seed, {"bytes_total": 1000, "bytes_up_total": 400,
                                                 "wall_time_s": 2.0, "time_to_target": 10.0})
    out += report.run_records("toy", "B", seed, {"bytes_total": 250, "bytes_up_total": 100,
                                                 "wall_time_s": 4.0, "epsilon": 1.5,
                                                 "time_to_target": 5.0 if seed == 0 else None},
                                      neighboring_relation="replace_one")
  return out


def test_run_records_keep_the_record_schema(tmp_path):
  records = _records()
  assert all(set(r) == set(report.RECORD_FIELDS) | ({"neighboring_relation"}
                                                    if r["metric"] == "epsilon" else set())
             for r in records)
  path = report.save_records(records, str(tmp_path))
  # Written records are the given ones plus the provenance fields
  # (tests/test_provenance.py checks their values).
  loaded = report.load_records(path)
  assert [{k: v for k, v in r.items() if k not in report.PROVENANCE_FIELDS}
          for r in loaded] == records
  assert all(set(report.PROVENANCE_FIELDS) <= set(r) for r in loaded)
  run = [r for r in records if r["metric"] == "bytes_total"]
  assert {(r["site"], r["split"]) for r in run} == {(report.RUN_SITE, report.RUN_SPLIT)}


def test_strategy_table_by_hand():
  table = report.strategy_table(_records(), reference="A")
  lines = table.splitlines()
  assert lines[0] == ("| strategy | accuracy (mean, test) | bytes_up_total | bytes_total |"
                      " wall_time_s | time_to_target | epsilon | up vs A | bytes vs A |")
  # A: accuracy 0.7, 0.8 -> 0.750 ± 0.071 (sample std); B: 0.6, 0.6.
  assert lines[2] == ("| A | 0.750 ± 0.071 | 400 B | 1 kB | 2 | 10 | n/a | 1.000 | 1.000 |")
  assert lines[3] == ("| B | 0.600 ± 0.000 | 100 B | 250 B | 4 | 5 (1/2 seeds) | 1.5 |"
                      " 0.250 | 0.250 |")


def test_strategy_table_columns_follow_the_records():
  plain = [r for r in _records() if r["metric"] == "accuracy"]
  assert report.strategy_table(plain).splitlines()[0] == (
      "| strategy | accuracy (mean, test) |")
  assert report.headline_metric(plain) == "accuracy"
  survival = [dict(r, metric="c_index") for r in plain]
  assert report.headline_metric(survival) == "c_index"
  with pytest.raises(ValueError, match="pass dataset="):
    report.strategy_table(plain + [dict(r, dataset="other") for r in plain])


def test_summary_table_behaviour_is_unchanged():
  records = [r for r in _records() if r["metric"] == "accuracy"]
  assert report.summary_table(records, "accuracy") == (
      "| accuracy (test) | s1 | mean |\n|---|---|---|\n"
      "| A | 0.750 ± 0.071 | 0.750 ± 0.071 |\n| B | 0.600 ± 0.000 | 0.600 ± 0.000 |")


def _history():
  rows = []
  for seed in (0, 1):
    for strategy, speed in (("A", 1.0), ("B", 2.0)):
      acc = 0.5 + 0.05 * np.arange(1, 6) * speed + 0.01 * seed
      rows += report.history_records("toy", strategy, seed, {"accuracy": acc},
                                     site="mean", split="test")
      rows += report.history_records("toy", strategy, seed, {
          "bytes_total": np.cumsum([100] * 5) / speed, "sim_time": np.arange(1, 6) * 10.0,
          "wall_time_s": np.arange(1, 6) * 0.1})
  return rows


def test_history_round_trip_and_series_mean(tmp_path):
  rows = _history()
  assert all(set(r) == set(report.HISTORY_FIELDS) for r in rows)
  path = report.save_history(rows, str(tmp_path))
  loaded = report.load_history(path)
  assert loaded == rows
  rounds, mean, std = report.series_mean(loaded, "toy", "A", "accuracy", "mean", "test")
  np.testing.assert_array_equal(rounds, [1, 2, 3, 4, 5])
  np.testing.assert_allclose(mean, 0.5 + 0.05 * np.arange(1, 6) + 0.005)
  np.testing.assert_allclose(std, np.std([0.0, 0.01], ddof=1))
  with pytest.raises(ValueError, match="fields"):
    report.save_history([{"metric": "x"}], str(tmp_path))


def test_load_history_reads_the_older_format(tmp_path):
  path = tmp_path / "history.json"
  path.write_text(json.dumps({"fedavg": {"0": [0.7, 0.6]},
                              "local": {"0": [[1.0, 3.0], [0.5, 0.5]]}}))
  rows = report.load_history(str(path))
  by = {(r["strategy"], r["round"]): r["value"] for r in rows}
  assert by == {("fedavg", 1): 0.7, ("fedavg", 2): 0.6, ("local", 1): 2.0, ("local", 2): 0.5}
  assert {r["metric"] for r in rows} == {"train_loss"}


def _is_png(path):
  with open(path, "rb") as f:
    return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_write_report_writes_the_table_and_figures(tmp_path):
  report.save_records(_records(), str(tmp_path))
  report.save_history(_history(), str(tmp_path))
  written = report.write_report(str(tmp_path / "results.json"), reference="A")
  assert set(written) == {"report.md", "sites.png", "curves.png", "metric_vs_bytes.png",
                          "metric_vs_time.png", "metric_vs_wall_time.png"}
  for name, path in written.items():
    assert os.path.exists(path)
    if name.endswith(".png"):
      assert _is_png(path)
  with open(written["report.md"]) as f:
    text = f.read()
  assert "## toy" in text and "| B | 0.600 ± 0.000" in text


def test_write_report_without_history_and_legacy_curves(tmp_path):
  report.save_records([r for r in _records() if r["metric"] == "accuracy"], str(tmp_path))
  written = report.write_report(str(tmp_path / "results.json"))
  assert set(written) == {"report.md", "sites.png"}
  (tmp_path / "history.json").write_text(json.dumps({"A": {"0": [0.7, 0.6, 0.5]}}))
  history = report.load_history(str(tmp_path / "history.json"))
  path = report.plot_curves(history, "train_loss", str(tmp_path / "loss.png"), site="all",
                            split="train")
  assert path and _is_png(path)


def test_cli_main(tmp_path, capsys):
  report.save_records(_records(), str(tmp_path))
  assert report.main([str(tmp_path / "results.json"), "--reference", "A"]) == 0
  assert "bytes vs A" in capsys.readouterr().out


def test_an_epsilon_never_travels_without_its_neighbouring_relation(tmp_path):
  with pytest.raises(ValueError, match="neighboring_relation"):
    report.run_records("toy", "A", 0, {"epsilon": 1.0})
  bare = report.records_from_report("toy", "A", 0, "train", {"all": {"epsilon": 1.0}})
  with pytest.raises(ValueError, match="no neighboring_relation"):
    report.save_records(bare, str(tmp_path))
  with pytest.raises(ValueError, match="unknown"):
    report.save_records([{**bare[0], "neighboring_relation": "x", "colour": 1}], str(tmp_path))
