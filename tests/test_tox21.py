"""Tox21: the table and its labels, scaffold partners, the RDKit features and their cache.

Partition tests run without RDKit on synthetic scaffolds; tests of the real
features use `pytest.importorskip("rdkit")` and a temporary cache folder.
"""

import inspect
import os
import sys
import warnings
from collections import Counter

import numpy as np
import pytest

import fedjax_med as fm
from fedjax_med.data import tox21 as tox21_lib
from fedjax_med.data.tox21 import (ACYCLIC, ASSAYS, BENZENE, load_table, scaffold_partition,
                                   split_labels, tox21)

from conftest import import_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "drug_discovery.py")
# Lines of the 8 SMILES RDKit 2026.09 cannot parse (SOURCE.md).
UNPARSEABLE_LINES = (1324, 2292, 2299, 3560, 4567, 4651, 5540, 6725)


def synthetic_scaffolds(seed=0):
  """Skewed groups like Tox21's: two giants (acyclic, benzene) and a long tail."""
  rng = np.random.default_rng(seed)
  scaffolds = [ACYCLIC] * 230 + [BENZENE] * 190
  for j in range(150):
    scaffolds += [f"ring{j}"] * int(rng.integers(1, 12))
  rng.shuffle(scaffolds)
  return scaffolds


def check_partition(scaffolds, part, num_sites, exclusive_common):
  scaffolds = np.asarray(scaffolds)
  n = scaffolds.size
  # Every molecule in exactly one partner and one split; sizes add up.
  assert part.partner.shape == (n,) and part.is_test.shape == (n,)
  assert part.partner.min() >= 0 and part.partner.max() < num_sites
  sizes = np.bincount(part.partner, minlength=num_sites)
  assert sizes.sum() == n and (sizes > 0).all()
  # No scaffold in two partners (the common ones only when exclusive).
  for s in set(scaffolds.tolist()):
    if not exclusive_common and s in (ACYCLIC, BENZENE):
      continue
    assert np.unique(part.partner[scaffolds == s]).size == 1, s
  # Scaffold-disjoint train/test inside every partner split by scaffold.
  for p in range(num_sites):
    rows = part.partner == p
    train = set(scaffolds[rows & ~part.is_test].tolist())
    test = set(scaffolds[rows & part.is_test].tolist())
    if p in part.random_split_partners:
      assert len(set(scaffolds[rows].tolist())) == 1
    else:
      assert train and test and not train & test


@pytest.mark.parametrize("split", ["scaffold", "dirichlet"])
@pytest.mark.parametrize("common", ["spread", "exclusive"])
def test_partition_properties(split, common):
  scaffolds = synthetic_scaffolds()
  part = scaffold_partition(scaffolds, 6, split, alpha=0.5, common_scaffolds=common, seed=1)
  check_partition(scaffolds, part, 6, exclusive_common=(common == "exclusive"))
  again = scaffold_partition(scaffolds, 6, split, alpha=0.5, common_scaffolds=common, seed=1)
  np.testing.assert_array_equal(part.partner, again.partner)
  np.testing.assert_array_equal(part.is_test, again.is_test)
  other = scaffold_partition(scaffolds, 6, split, alpha=0.5, common_scaffolds=common, seed=2)
  assert not np.array_equal(part.partner, other.partner)


def test_spread_balances_partners_and_giants():
  scaffolds = np.asarray(synthetic_scaffolds())
  part = scaffold_partition(scaffolds, 5, "scaffold", common_scaffolds="spread", seed=0)
  sizes = np.bincount(part.partner)
  assert sizes.max() - sizes.min() <= 12          # greedy: within one group's size
  for giant in (ACYCLIC, BENZENE):
    counts = np.bincount(part.partner[scaffolds == giant], minlength=5)
    assert counts.max() - counts.min() <= 1       # dealt round-robin
  # The scaffold rule keeps test near the target share.
  for p in range(5):
    share = part.is_test[part.partner == p].mean()
    assert 0.1 < share <= 0.3


def test_exclusive_gives_single_scaffold_partners_a_random_split():
  # Giants larger than a partner's share, as in Tox21 (1775 and 1474 vs ~763).
  scaffolds = np.asarray([ACYCLIC] * 600 + [BENZENE] * 500 + [
      s for s in synthetic_scaffolds() if s not in (ACYCLIC, BENZENE)])
  part = scaffold_partition(scaffolds, 6, "scaffold", common_scaffolds="exclusive", seed=0)
  giants = {int(part.partner[scaffolds == ACYCLIC][0]), int(part.partner[scaffolds == BENZENE][0])}
  assert set(part.random_split_partners) == giants
  for p in giants:
    rows = part.partner == p
    assert part.is_test[rows].sum() == round(0.2 * rows.sum())


def test_dirichlet_small_alpha_is_more_skewed():
  scaffolds = synthetic_scaffolds()
  cv = []
  for alpha in (0.1, 100.0):
    spreads = []
    for seed in range(5):
      sizes = np.bincount(scaffold_partition(scaffolds, 6, "dirichlet", alpha=alpha,
                                             seed=seed).partner, minlength=6)
      spreads.append(sizes.std() / sizes.mean())
    cv.append(np.mean(spreads))
  assert cv[0] > 2 * cv[1]


def test_bad_input():
  scaffolds = synthetic_scaffolds()
  n_ring = len(set(scaffolds)) - 2
  for bad in (0, -1, 1.5, True):
    with pytest.raises(fm.OptionError, match="num_sites must be"):
      scaffold_partition(scaffolds, bad)
  with pytest.raises(fm.OptionError,
                     match=rf"num_sites={n_ring + 1} > number of scaffolds other.*\({n_ring}\)"):
    scaffold_partition(scaffolds, n_ring + 1)
  scaffold_partition(scaffolds, n_ring)                 # the largest allowed
  with pytest.raises(fm.OptionError, match=r"distinct scaffolds \(152\)"):
    scaffold_partition(scaffolds, 153, common_scaffolds="exclusive")
  for alpha in (0.0, -1.0, float("nan"), "x"):
    with pytest.raises(fm.OptionError, match="alpha"):
      scaffold_partition(scaffolds, 4, "dirichlet", alpha=alpha)
  with pytest.raises(fm.OptionError, match="split"):
    scaffold_partition(scaffolds, 4, "random")
  with pytest.raises(fm.OptionError, match="common_scaffolds"):
    scaffold_partition(scaffolds, 4, common_scaffolds="shared")
  with pytest.raises(fm.OptionError, match="test_fraction"):
    scaffold_partition(scaffolds, 4, test_fraction=1.0)
  # The loader checks options before touching RDKit or the cache.
  with pytest.raises(fm.OptionError, match="num_sites must be"):
    tox21(0, cache_dir=False)
  with pytest.raises(fm.OptionError, match="alpha"):
    tox21(4, "dirichlet", alpha=0, cache_dir=False)


def test_num_partners_is_a_deprecated_name_of_num_sites():
  # scaffold_partition: the 0.1 keyword warns at the caller's line, naming
  # num_sites, and deals the molecules exactly as num_sites does.
  scaffolds = synthetic_scaffolds()
  with warnings.catch_warnings():
    warnings.simplefilter("error")                      # num_sites itself never warns
    new = scaffold_partition(scaffolds, num_sites=5, split="dirichlet", seed=3)
  with pytest.warns(DeprecationWarning, match=r"num_partners= is deprecated, use num_sites=") \
      as record:
    old = scaffold_partition(scaffolds, num_partners=5, split="dirichlet", seed=3)
  assert [w.filename for w in record] == [__file__]
  assert old.partner.max() == 4
  np.testing.assert_array_equal(old.partner, new.partner)
  np.testing.assert_array_equal(old.is_test, new.is_test)
  assert old.random_split_partners == new.random_split_partners
  # Both names is an error (OptionError is a ValueError and a TypeError), for
  # tox21 before it touches RDKit or the cache.
  for call in (lambda: scaffold_partition(scaffolds, 5, num_partners=5),
               lambda: scaffold_partition(scaffolds, num_sites=5, num_partners=5),
               lambda: tox21(8, num_partners=8, cache_dir=False),
               lambda: tox21(num_sites=4, num_partners=8, cache_dir=False)):
    with pytest.raises(TypeError, match="give num_sites only; num_partners is its"):
      call()
  with pytest.warns(DeprecationWarning), pytest.raises(fm.OptionError, match="num_sites must"):
    tox21(num_partners=0, cache_dir=False)
  for fn in (tox21, scaffold_partition):
    params = inspect.signature(fn).parameters
    assert "num_sites" in params and "num_partners" not in params


def test_table_labels_match_source_md():
  smiles, labels, observed = load_table()
  assert len(smiles) == 7831 and labels.shape == observed.shape == (7831, 12)
  assert smiles[0] == "CCOc1ccc2nc(S(N)(=O)=O)sc2c1"
  # Row 0's labels 0,0,1,-,-,0,0,1,0,0,0,0 (DGL-LifeSci docstring, SOURCE.md).
  np.testing.assert_array_equal(observed[0], [1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1])
  np.testing.assert_array_equal(labels[0], [0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0])
  active = (labels * observed).sum(axis=0)
  missing = (1 - observed).sum(axis=0)
  assert active.tolist() == [309, 237, 768, 300, 793, 350, 186, 942, 264, 372, 918, 423]
  assert missing.tolist() == [566, 1073, 1282, 2010, 1638, 876, 1381, 1999, 759, 1364, 2021, 1057]
  assert np.isfinite(labels).all() and ((labels == 0) | (observed == 1)).all()


def test_missing_rdkit_is_a_clear_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "rdkit", None)
  with pytest.raises(ImportError, match=r"fedjax_med\[chem\]"):
    tox21(4, cache_dir=False, verbose=False)


# -- with RDKit ---------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  pytest.importorskip("rdkit")
  folder = tmp_path_factory.mktemp("tox21_cache")
  entry, _ = tox21_lib.load_features(str(folder))
  return str(folder), entry


def test_features_parse_count_and_scaffolds(cache):
  folder, entry = cache
  assert os.path.exists(tox21_lib.cache_path(folder))
  ok = entry["ok"]
  assert ok.sum() == 7823
  assert tuple(int(i) + 2 for i in np.flatnonzero(~ok)) == UNPARSEABLE_LINES
  counts = Counter(entry["scaffolds"].tolist())
  assert len(counts) == 2325
  assert counts[ACYCLIC] == 1775 and counts[BENZENE] == 1474
  fps = entry["fingerprints"]
  assert fps.shape == (7823, 2048) and set(np.unique(fps).tolist()) <= {0, 1}


def test_fingerprints_match_rdkit_directly(cache):
  from rdkit import Chem, DataStructs
  from rdkit.Chem import AllChem
  _, entry = cache
  smiles, _, _ = load_table()
  rows = np.flatnonzero(entry["ok"])
  for j in (0, 100, 5000):
    mol = Chem.MolFromSmiles(smiles[rows[j]])
    bv = AllChem.GetMorganFingerprintAsBitVect(mol, 2, nBits=2048)
    ref = np.zeros(2048, np.uint8)
    DataStructs.ConvertToNumpyArray(bv, ref)
    np.testing.assert_array_equal(entry["fingerprints"][j], ref)


def test_cache_is_read_without_recomputing(cache, monkeypatch):
  folder, entry = cache
  def fail(*args, **kwargs):
    raise AssertionError("featurize called although the cache exists")
  monkeypatch.setattr(tox21_lib, "featurize", fail)
  again, _ = tox21_lib.load_features(folder)
  np.testing.assert_array_equal(again["fingerprints"], entry["fingerprints"])
  np.testing.assert_array_equal(again["scaffolds"], entry["scaffolds"])


def test_unwritable_cache_falls_back_with_a_warning(cache, tmp_path, monkeypatch):
  blocker = tmp_path / "not_a_folder"
  blocker.write_text("x")
  with pytest.warns(UserWarning, match="could not write the feature cache"):
    entry, _ = tox21_lib.load_features(str(blocker / "sub"))
  assert entry["ok"].sum() == 7823


def test_loader_scaffold_split(cache):
  folder, entry = cache
  with pytest.warns(tox21_lib.Tox21ParseWarning, match="could not parse 8 of 7831") as record:
    train, test, info = tox21(8, cache_dir=folder, verbose=False, return_info=True)
  assert [w.filename for w in record] == [__file__]     # the caller's line
  assert [line for line, _ in info.dropped] == list(UNPARSEABLE_LINES)
  n = int(np.asarray(train.num_examples).sum() + np.asarray(test.num_examples).sum())
  assert n == 7823
  check_partition(info.scaffolds, info.partition, 8, exclusive_common=False)
  assert train.x.shape[1:] == (train.max_examples, 2048)
  assert train.y.shape[2:] == (12, 2) and train.label_type == "binary"
  # Rows of the FederatedData are the molecules of info.partner_rows, in order.
  _, labels, observed = load_table()
  rows = np.flatnonzero(entry["ok"])
  position = {int(r): j for j, r in enumerate(rows)}
  for k, (x_k, y_k) in enumerate(test.sites()):
    r = info.partner_rows[k]["test"]
    lab, obs = split_labels(y_k)
    np.testing.assert_array_equal(lab, labels[r])
    np.testing.assert_array_equal(obs, observed[r])
    np.testing.assert_array_equal(x_k, entry["fingerprints"][[position[int(i)] for i in r]])
  summary = {s["partner"]: s for s in info.summary}
  assert all(0.15 < s["acyclic_share"] < 0.3 for s in summary.values())


def test_loader_num_partners_gives_the_same_federated_data(cache):
  folder, _ = cache
  kwargs = dict(split="dirichlet", alpha=0.5, cache_dir=folder, verbose=False, return_info=True)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", tox21_lib.Tox21ParseWarning)
    warnings.simplefilter("error", DeprecationWarning)   # num_sites itself never warns
    new = tox21(num_sites=5, **kwargs)
    with pytest.warns(DeprecationWarning, match="num_partners= is deprecated, use num_sites="):
      old = tox21(num_partners=5, **kwargs)
  assert old[0].num_sites == 5
  for a, b in zip(old[:2], new[:2]):
    for field in ("x", "y", "mask", "num_examples"):
      np.testing.assert_array_equal(np.asarray(getattr(a, field)), np.asarray(getattr(b, field)))
    assert a.site_names == b.site_names and a.label_type == b.label_type
  np.testing.assert_array_equal(old[2].partition.partner, new[2].partition.partner)
  assert old[2].summary == new[2].summary


def test_loader_exclusive_reproduces_the_skew(cache, capsys):
  folder, _ = cache
  train, test, info = tox21(8, common_scaffolds="exclusive", cache_dir=folder, verbose=True,
                            return_info=True)
  out = capsys.readouterr().out
  assert "could not parse 8 of 7831" in out and "acyclic" in out
  sizes = sorted((s["n"] for s in info.summary), reverse=True)
  assert sizes[:2] == [1775, 1474] and sum(sizes) == 7823
  shares = sorted(((s["acyclic_share"], s["benzene_share"]) for s in info.summary), reverse=True)
  assert shares[0] == (1.0, 0.0)
  assert len(info.partition.random_split_partners) == 2
  check_partition(info.scaffolds, info.partition, 8, exclusive_common=True)
  with pytest.raises(fm.OptionError, match=r"\(2323\)"):
    tox21(2324, cache_dir=folder, verbose=False)


@pytest.mark.slow
def test_drug_discovery_smoke(cache, tmp_path, monkeypatch):
  folder, _ = cache
  monkeypatch.setenv("FEDJAX_MED_CACHE", folder)
  module = import_experiment(SCRIPT, "drug_discovery_experiment")
  assert module.main(["--smoke", "--no-progress", "--out", str(tmp_path)]) == 0
  records = fm.report.load_records(os.path.join(tmp_path, "results.json"))
  assert {r["strategy"] for r in records} == set(module.ORDER)
  assert {"auc", "auc/NR-AR", "auc/SR-p53"} <= {r["metric"] for r in records}
  by = {(r["strategy"], r["site"], r["metric"]): r["value"] for r in records}
  partners = [f"partner_{k}" for k in range(4)]
  assert by[("fedavg", "mean", "auc")] == pytest.approx(
      np.nanmean([by[("fedavg", p, "auc")] for p in partners]), rel=1e-9)
  assert os.path.exists(os.path.join(tmp_path, "drug_discovery.png"))
  assert len(ASSAYS) == 12
