"""experiments/hippocampus.py: a smoke run writes consistent records, table and figure."""

import json

import numpy as np
import pytest

from conftest import import_experiment


def _module():
  return import_experiment("hippocampus.py", "hippocampus_experiment")


def test_hippocampus_smoke_fedavg(tmp_path):
  """The fast tier's smoke: FedAvg alone on the IID split (the smoke with every
  strategy, below, is in the slow tier)."""
  out = tmp_path / "hc"
  assert _module().main(["--smoke", "--out", str(out), "--no-progress",
                         "--splits", "iid", "--strategies", "fedavg"]) == 0
  records = json.loads((out / "results.json").read_text())
  assert {r["strategy"] for r in records} == {"fedavg"}
  assert {r["dataset"] for r in records} == {"msd_hippocampus[iid]"}
  values = {(r["site"], r["metric"]): r["value"] for r in records}
  cases = sorted({site for site, _ in values if site.startswith("case-")})
  assert len(cases) == 2
  per_case = np.array([[values[(c, m)] for m in ("dice_anterior", "dice_posterior")]
                       for c in cases])
  assert ((0 <= per_case) & (per_case <= 1)).all()
  assert abs(values[("all", "dice_mean")] - per_case.mean()) < 1e-12
  assert "SIMULATED" in (out / "table.md").read_text()
  assert (out / "slices.png").stat().st_size > 1000


@pytest.mark.slow
def test_hippocampus_smoke(tmp_path):
  out = tmp_path / "hc"
  # --batch-size 3 (the smoke's default is 2) reaches the recorded config. The encoding
  # split (5 sites) runs the own-site scoring too.
  assert _module().main(["--smoke", "--out", str(out), "--no-progress",
                         "--batch-size", "3", "--splits", "encoding"]) == 0
  records = json.loads((out / "results.json").read_text())
  strategies = ("pooled", "fedavg", "fedprox", "finetune", "ditto", "fedper", "local")
  assert {r["strategy"] for r in records} == set(strategies)
  assert {r["dataset"] for r in records} == {"msd_hippocampus[encoding]"}
  assert {r["metric"] for r in records} == {"dice_anterior", "dice_posterior", "dice_mean"}
  values = {(r["strategy"], r["site"], r["metric"]): r["value"] for r in records}
  cases = sorted({r["site"] for r in records if r["site"].startswith("case-")})
  # --smoke scores the first 2 test cases, which are uint8-stored (the test set is
  # ordered by encoding group, then case id): index.csv's first uint8 test cases are
  # 070 and 123.
  assert cases == ["case-070", "case-123"]
  for strategy in strategies:
    per_case = np.array([[values[(strategy, c, m)] for m in ("dice_anterior", "dice_posterior")]
                         for c in cases])
    assert ((0 <= per_case) & (per_case <= 1)).all()
    # dice_mean = (anterior + posterior) / 2 per case; "all" = the mean over cases.
    for c, row in zip(cases, per_case):
      assert abs(values[(strategy, c, "dice_mean")] - row.mean()) < 1e-12
    assert abs(values[(strategy, "all", "dice_anterior")] - per_case[:, 0].mean()) < 1e-12
    assert (strategy, "test-float_low", "dice_mean") not in values   # no such case scored
    # Both scored cases are uint8: only sim-uint8 (site 0) has own test cases among them,
    # so own-site is that site's model (the global one for fedavg ...) on the two cases.
    own = {site for (s, site, _) in values if s == strategy and site.startswith("own-")}
    assert own == {"own-site", "own-sim-uint8"}
    assert values[(strategy, "own-site", "dice_mean")] == values[
        (strategy, "own-sim-uint8", "dice_mean")]
    if strategy in ("pooled", "fedavg", "fedprox"):
      assert abs(values[(strategy, "own-site", "dice_mean")]
                 - values[(strategy, "all", "dice_mean")]) < 1e-12
  table = (out / "table.md").read_text()
  assert "SIMULATED" in table and "ONLY the first 2 test cases" in table
  config = json.loads(table.splitlines()[1])
  assert config["batch_size"] == 3 and config["schedule"] == "smoke"
  # The table lists the strategies in STRATEGIES' order.
  rows = [line.split("|")[1].strip() for line in table.splitlines()
          if line.startswith("|") and line.split("|")[1].strip() in strategies]
  assert rows[:len(strategies)] == list(strategies)
  # Two rounds with the smoke's step decay: every strategy has a loss per round.
  history = json.loads((out / "history.json").read_text())["msd_hippocampus[encoding]"]
  assert {name: len(h["0"]) for name, h in history.items()} == {
      s: 2 for s in strategies if s not in ("pooled", "finetune")}
  assert (out / "slices.png").stat().st_size > 1000


def test_lr_segments_step_decay():
  module = _module()
  # --full: 30 rounds, x0.3 after 2/3 and 5/6 of them (written out by hand).
  segments = module.lr_segments(module.Config.full())
  assert [(a, b) for a, b, _ in segments] == [(0, 20), (20, 25), (25, 30)]
  assert np.allclose([f for _, _, f in segments], [1.0, 0.3, 0.09], rtol=0, atol=1e-15)
  # --full --rounds 6: boundaries round(4.0) = 4 and round(5.0) = 5.
  short = module.Config(rounds=6, lr_decay_at=(2 / 3, 5 / 6))
  assert [(a, b) for a, b, _ in module.lr_segments(short)] == [(0, 4), (4, 5), (5, 6)]
  # No decay (the short default): one segment at factor 1; boundaries at 0 or >= rounds drop.
  assert module.lr_segments(module.Config()) == [(0, 12, 1.0)]
  assert module.lr_segments(module.Config(rounds=2, lr_decay_at=(0.0, 1.0))) == [(0, 2, 1.0)]


def test_records_own_site_against_a_loop():
  module = _module()
  rng = np.random.default_rng(0)
  cases, groups = ["case-1", "case-2", "case-3", "case-4"], ["test-uint8"] * 4
  own = {"a": [0, 1], "b": [3], "c": []}          # site c has no own case: left out
  for models in (3, 1):
    per_model = rng.uniform(size=(models, 4, 3))
    records = module._records("d", "s", 0, cases, groups, per_model, own)
    values = {(r["site"], r["metric"]): r["value"] for r in records}
    expect = {}
    for k, (name, idx) in enumerate(own.items()):
      if idx:
        model = k if models > 1 else 0
        expect[name] = [sum(per_model[model, i, m] for i in idx) / len(idx) for m in range(3)]
    for m, metric in enumerate(module.METRICS):
      for name, value in expect.items():
        assert abs(values[(f"own-{name}", metric)] - value[m]) < 1e-12
      assert abs(values[("own-site", metric)] - (expect["a"][m] + expect["b"][m]) / 2) < 1e-12
      # "all" is the mean over models, then cases.
      assert abs(values[("all", metric)] - per_model[:, :, m].mean()) < 1e-12
    assert ("own-c", "dice_mean") not in values
  # Without `own` (the iid split) there is no own-site record.
  records = module._records("d", "s", 0, cases, groups, rng.uniform(size=(2, 4, 3)))
  assert not [r for r in records if r["site"].startswith("own")]


def test_own_test_indices():
  module = _module()
  from fedjax_med.data.msd_hippocampus import own_test_case_ids
  assert module.own_test_indices("iid", 0, ["case-070"]) is None
  cases = ["case-070", "case-003", "case-123"]       # 070, 123 uint8; 003 float_low
  own = module.own_test_indices("encoding", 0, cases)
  assert own == {"sim-uint8": [0, 2], "sim-float_low-0": [1], "sim-float_low-1": [1],
                 "sim-float_low-2": [1], "sim-float_high": []}
  volume = module.own_test_indices("volume", 0, cases)
  sites = own_test_case_ids(4, "volume", 0)
  assert list(volume) == [f"sim-volume-{k}" for k in range(4)]
  for k, idx in enumerate(volume.values()):
    assert [cases[i] for i in idx] == [c for c in cases if c[5:] in sites[k]]
