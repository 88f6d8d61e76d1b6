"""MSD Hippocampus loader: files, checksums, the SOURCE.md splits, padding, z-score, options.

Every expectation comes from the bundled files themselves read here with csv /
np.load (index.csv's columns, the npz arrays) or from a float64 NumPy
recomputation, never from the loader's own helpers.
"""

import csv
import glob
import hashlib
import os
import pathlib
import re
import shutil

import numpy as np
import pytest

import fedjax_med as fm
from fedjax_med.core.options import OptionError
from fedjax_med.data import msd_hippocampus as mh

FILES = os.path.join(os.path.dirname(mh.__file__), "files", "msd_hippocampus")
REPO = pathlib.Path(__file__).resolve().parent.parent


def _rows():
  with open(os.path.join(FILES, "index.csv"), newline="") as f:
    return {r["case"]: r for r in csv.DictReader(f)}


ROWS = _rows()


SHARDS = [f"hippocampus_260.part{i}.npz" for i in range(5)]


@pytest.fixture(scope="module")
def npz():
  """Every array of the five shards, read with np.load; each name in exactly one shard."""
  arrays = {}
  for shard in SHARDS:
    with np.load(os.path.join(FILES, shard)) as z:
      assert not set(z.files) & set(arrays), shard
      arrays.update({name: z[name] for name in z.files})
  assert len(arrays) == 2 * len(ROWS)
  return arrays


@pytest.fixture(scope="module")
def default():
  return mh.msd_hippocampus()


def _site_rows(data):
  """[(site k, row i)] of the real rows."""
  return [tuple(int(v) for v in kv) for kv in np.argwhere(np.asarray(data.mask))]


# -- files ----------------------------------------------------------------------------


def test_bundled_files_match_sha256sums_and_are_packaged():
  with open(os.path.join(FILES, "SHA256SUMS")) as f:
    lines = [line.split("  ") for line in f.read().splitlines() if line.strip()]
  assert sorted(name for _, name in lines) == SHARDS + ["index.csv"]
  for digest, name in lines:
    with open(os.path.join(FILES, name), "rb") as f:
      data = f.read()
    assert hashlib.sha256(data).hexdigest() == digest, name
    if name == "index.csv":
      assert len(data) == 64906                          # SOURCE.md's table
    else:
      assert len(data) < 5_000_000, name                 # why the source npz is sharded
  assert "CC BY-SA 4.0" in mh.source_text()
  # A non-editable install ships the shards, index.csv, SOURCE.md and SHA256SUMS (setuptools globs package-data).
  try:
    import tomllib
  except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")
  with open(REPO / "pyproject.toml", "rb") as f:
    patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["fedjax_med.data"]
  data_dir = os.path.dirname(mh.__file__)
  shipped = {os.path.relpath(p, FILES) for pattern in patterns
             for p in glob.glob(os.path.join(data_dir, pattern)) if p.startswith(FILES)}
  assert shipped == set(SHARDS) | {"index.csv", "SOURCE.md", "SHA256SUMS"}


def test_damaged_copy_raises_naming_the_file(monkeypatch, tmp_path):
  monkeypatch.setattr(mh, "_MEMORY", {})                # copies are not kept afterwards
  for name in ("hippocampus_260.part2.npz", "index.csv"):
    copy = tmp_path / name.split(".")[0]
    shutil.copytree(FILES, copy)
    os.chmod(copy / name, 0o644)
    data = bytearray((copy / name).read_bytes())
    data[len(data) // 2] ^= 0x01                        # one flipped bit
    (copy / name).write_bytes(bytes(data))
    monkeypatch.setattr(mh, "_files", lambda copy=copy: copy)
    with pytest.raises(ValueError, match=re.escape(name) + " does not match its sha256"):
      mh.load_raw()
    with pytest.raises(ValueError, match="damaged"):
      mh.msd_hippocampus()
  # An intact copy loads; the check runs once per process (the arrays are memoised).
  intact = tmp_path / "intact"
  shutil.copytree(FILES, intact)
  monkeypatch.setattr(mh, "_files", lambda: intact)
  assert mh.load_raw() is mh.load_raw()
  assert mh.load_raw().cases == tuple(sorted(ROWS))


def test_raw_arrays_match_the_npz_and_index(npz):
  raw = mh.load_raw()
  assert raw.cases == tuple(sorted(ROWS)) and len(raw.cases) == 260
  for case, image, label in zip(raw.cases, raw.images, raw.labels):
    np.testing.assert_array_equal(image, npz[f"image_{case}"])
    assert image.dtype == npz[f"image_{case}"].dtype
    np.testing.assert_array_equal(label, npz[f"label_{case}"])
  # index.csv's encoding_group is SOURCE.md's rule applied to the stored images.
  for case, r in ROWS.items():
    image = npz[f"image_{case}"]
    rule = ("uint8" if image.dtype == np.uint8 else
            "float_high" if image.max() >= 1e5 else "float_low")
    assert r["encoding_group"] == rule, case
  counts = {g: sum(r["encoding_group"] == g for r in ROWS.values())
            for g in mh.ENCODING_GROUPS}
  assert counts == {"uint8": 55, "float_low": 172, "float_high": 33}


# -- splits ---------------------------------------------------------------------------


def test_seed_0_reproduces_the_index_csv_columns():
  test_csv = sorted(c for c, r in ROWS.items() if r["suggested_split"] == "test")
  assert mh.held_out_cases(0) == tuple(test_csv) and len(test_csv) == 52
  train, test = mh.site_case_ids(4, "iid", 0)
  assert [sorted(s) for s in train] == [
      sorted(c for c, r in ROWS.items() if r["sim_site_iid4"] == str(k)) for k in range(4)]
  assert [sorted(s) for s in test] == [
      sorted(c for c in test_csv if ROWS[c]["encoding_group"] == g)
      for g in mh.ENCODING_GROUPS]
  train, _ = mh.site_case_ids(5, "encoding", 0)
  assert [sorted(s) for s in train] == [
      sorted(c for c, r in ROWS.items() if r["sim_site_encoding5"] == str(k))
      for k in range(5)]
  assert [len(s) for s in train] == [44, 46, 46, 46, 26]
  # Test cases belong to no site in the CSV.
  assert all(ROWS[c]["sim_site_iid4"] == ROWS[c]["sim_site_encoding5"] == "" for c in test_csv)


@pytest.mark.parametrize("num_sites,split,seed", [
    (4, "iid", 0), (1, "iid", 3), (7, "iid", 1), (5, "encoding", 2), (4, "volume", 0),
    (9, "volume", 5)])
def test_every_case_exactly_once(num_sites, split, seed):
  train, test = mh.site_case_ids(num_sites, split, seed)
  assert len(train) == num_sites and len(test) == 3
  flat = [c for s in train + test for c in s]
  assert sorted(flat) == sorted(ROWS)                  # coverage, no repeats
  assert sum(len(s) for s in test) == 52
  # Stratified: 11 / 34 / 7 test cases, each test site one encoding group.
  for g, site, n in zip(mh.ENCODING_GROUPS, test, (11, 34, 7)):
    assert len(site) == n and {ROWS[c]["encoding_group"] for c in site} == {g}
  sizes = [len(s) for s in train]
  if split != "encoding":
    assert max(sizes) - min(sizes) <= 1
  for site in train + test:
    assert list(site) == sorted(site)                  # rows in case-id order
  assert mh.held_out_cases(seed) == tuple(sorted(c for s in test for c in s))


def test_seed_changes_the_draws():
  assert mh.held_out_cases(0) != mh.held_out_cases(1)
  assert mh.held_out_cases(4) == mh.held_out_cases(4)
  assert mh.site_case_ids(4, "iid", 0)[0] != mh.site_case_ids(4, "iid", 1)[0]


def test_encoding_sites_hold_one_group_each():
  for seed in (0, 3):
    train, _ = mh.site_case_ids(5, "encoding", seed)
    groups = [{ROWS[c]["encoding_group"] for c in s} for s in train]
    assert groups == [{"uint8"}, {"float_low"}, {"float_low"}, {"float_low"}, {"float_high"}]
  assert mh.site_names(5, "encoding") == ("sim-uint8", "sim-float_low-0", "sim-float_low-1",
                                          "sim-float_low-2", "sim-float_high")


def test_volume_sites_are_contiguous_in_hippocampus_volume(npz):
  # Volume counted here from the label arrays (labels 1 and 2), not index.csv.
  volume = {c: int((npz[f"label_{c}"] > 0).sum()) for c in ROWS}
  assert all(volume[c] == int(r["anterior_voxels"]) + int(r["posterior_voxels"])
             for c, r in ROWS.items())
  for k in (3, 4, 10):
    train, _ = mh.site_case_ids(k, "volume", 0)
    for small, large in zip(train, train[1:]):
      assert max(volume[c] for c in small) <= min(volume[c] for c in large)
    assert mh.site_names(k, "volume") == tuple(f"sim-volume-{i}" for i in range(k))


def test_own_test_cases_follow_the_site_distribution():
  # Seed 0's test set is index.csv's `suggested_split`; the training sites come from
  # site_case_ids (tested above against index.csv).
  test = sorted(c for c, r in ROWS.items() if r["suggested_split"] == "test")
  volume = {c: int(r["anterior_voxels"]) + int(r["posterior_voxels"]) for c, r in ROWS.items()}
  by_group = {g: [c for c in test if ROWS[c]["encoding_group"] == g]
              for g in ("uint8", "float_low", "float_high")}
  assert [len(v) for v in by_group.values()] == [11, 34, 7]
  own = mh.own_test_case_ids(5, "encoding", 0)
  assert [list(o) for o in own] == [by_group["uint8"]] + [by_group["float_low"]] * 3 + [
      by_group["float_high"]]
  for k in (2, 4, 10):
    train, _ = mh.site_case_ids(k, "volume", 0)
    site_of = {c: j for j, site in enumerate(train) for c in site}
    own = mh.own_test_case_ids(k, "volume", 0)
    assert sorted(c for o in own for c in o) == test          # each test case once
    for case in test:
      # Independent rule: the site of the training case nearest in volume (a tie between
      # two sites goes to the larger-volume site), by brute force over the 208 cases.
      nearest = min(site_of, key=lambda c: (abs(volume[c] - volume[case]), -site_of[c]))
      assert case in own[site_of[nearest]], (k, case)
  with pytest.raises(OptionError, match="split='iid' sites .* no test cases of their own"):
    mh.own_test_case_ids(4, "iid", 0)


# -- arrays ---------------------------------------------------------------------------


def test_default_layout_padding_and_label_counts(default):
  train, test = default
  assert train.site_names == ("sim-iid-0", "sim-iid-1", "sim-iid-2", "sim-iid-3")
  assert test.site_names == ("test-uint8", "test-float_low", "test-float_high")
  assert np.asarray(train.num_examples).tolist() == [52] * 4
  assert np.asarray(test.num_examples).tolist() == [11, 34, 7]
  assert fm.datasets.msd_hippocampus is mh.msd_hippocampus
  ids = mh.site_case_ids()
  for data, sites in zip(default, ids):
    assert data.label_type == "multiclass"
    assert data.x.shape[2:] == (48, 64, 48, 1) and data.y.shape[2:] == (48, 64, 48, 2)
    assert str(data.x.dtype) == "float32" and str(data.y.dtype) == "float32"
    x, y, mask = np.asarray(data.x), np.asarray(data.y), np.asarray(data.mask)
    assert not x[~mask].any() and not y[~mask].any()   # padded rows are zero
    for k, i in _site_rows(data):
      r = ROWS[sites[k][i]]
      sx, sy, sz = (int(r[f"shape_{a}"]) for a in "xyz")
      valid = y[k, i, ..., 1]
      assert set(np.unique(valid).tolist()) <= {0.0, 1.0}
      assert valid.sum() == sx * sy * sz
      assert valid[:sx, :sy, :sz].all()              # the crop sits at the origin
      cls = y[k, i, ..., 0]
      assert set(np.unique(cls).tolist()) == {0.0, 1.0, 2.0}
      assert (cls == 1).sum() == int(r["anterior_voxels"])
      assert (cls == 2).sum() == int(r["posterior_voxels"])
      assert ((cls == 0) & (valid == 1)).sum() == int(r["background_voxels"])
      assert not x[k, i][valid == 0].any()           # padding is 0 in x


def _percentile(values, q):
  """np.percentile's default ("linear", Hyndman & Fan type 7), written out."""
  s = np.sort(values.ravel().astype(np.float64))
  rank = q / 100.0 * (s.size - 1)
  lo = int(np.floor(rank))
  hi = min(lo + 1, s.size - 1)
  return s[lo] + (rank - lo) * (s[hi] - s[lo])


def test_zscore_matches_a_float64_recomputation(default, npz):
  train, test = default
  ids = mh.site_case_ids()
  checked = set()
  for data, sites in zip(default, ids):
    x = np.asarray(data.x)
    for k, i in _site_rows(data):
      case = sites[k][i]
      group = ROWS[case]["encoding_group"]
      if group in checked and case not in ("001", "003"):
        continue
      checked.add(group)
      image = npz[f"image_{case}"].astype(np.float64)
      lo, hi = _percentile(image, 0.5), _percentile(image, 99.5)
      c = np.minimum(np.maximum(image, lo), hi)
      mean = c.sum() / c.size
      std = np.sqrt(((c - mean) ** 2).sum() / c.size)
      expected = (c - mean) / std
      got = x[k, i, :image.shape[0], :image.shape[1], :image.shape[2], 0]
      np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)
      assert abs(got.astype(np.float64).mean()) < 1e-5
      assert got.astype(np.float64).std() == pytest.approx(1.0, abs=1e-5)
  assert checked == set(mh.ENCODING_GROUPS)
  np.testing.assert_array_equal(mh.zscore(np.full((3, 4, 5), 7.0)), np.zeros((3, 4, 5)))


def test_normalize_none_keeps_the_stored_values(npz):
  train, test = mh.msd_hippocampus(5, "encoding", normalize="none")
  ids = mh.site_case_ids(5, "encoding")
  maxima = {}
  for data, sites in zip((train, test), ids):
    x = np.asarray(data.x)
    for k, i in _site_rows(data):
      case = sites[k][i]
      image = npz[f"image_{case}"]
      got = x[k, i, :image.shape[0], :image.shape[1], :image.shape[2], 0]
      np.testing.assert_array_equal(got, image.astype(np.float32))
      maxima.setdefault(data.site_names[k], []).append(float(image.max()))
  # The encoding shift: uint8 sites top out at 255, float_high ones above 1e5.
  assert max(maxima["sim-uint8"] + maxima["test-uint8"]) <= 255
  assert min(maxima["sim-float_high"] + maxima["test-float_high"]) >= 1e5
  assert max(maxima["sim-float_low-0"]) < 1e4


def test_custom_shape_pads_at_the_end():
  raw = mh.load_raw()
  data = mh._federated(raw, [("001", "003")], ["a"], "none", (43, 59, 47))
  y = np.asarray(data.y)
  for i, case in enumerate(("001", "003")):
    r = ROWS[case]
    sx, sy, sz = (int(r[f"shape_{a}"]) for a in "xyz")
    assert y[0, i, ..., 1].sum() == sx * sy * sz and y[0, i, :sx, :sy, :sz, 1].all()


def test_case_table():
  table = mh.case_table()
  assert [t["case"] for t in table] == sorted(ROWS)
  train, test = mh.site_case_ids()
  names = mh.site_names() + mh.TEST_SITES
  for t in table:
    r = ROWS[t["case"]]
    assert t["shape"] == tuple(int(r[f"shape_{a}"]) for a in "xyz")
    assert t["encoding_group"] == r["encoding_group"]
    assert t["set"] == r["suggested_split"]
    k = names.index(t["site"])
    assert (train + test)[k][t["row"]] == t["case"]
    assert t["site"] == (f"sim-iid-{r['sim_site_iid4']}" if t["set"] == "train"
                         else f"test-{r['encoding_group']}")


# -- options --------------------------------------------------------------------------


def test_option_errors():
  with pytest.raises(OptionError, match=r"split 'dirichlet'.*'iid', 'encoding', 'volume'"):
    mh.msd_hippocampus(split="dirichlet")
  with pytest.raises(OptionError, match=r"normalize 'minmax'.*'zscore', 'none'"):
    mh.msd_hippocampus(normalize="minmax")
  for bad in (4, 3, 6, True, 5.0):
    with pytest.raises(OptionError, match="split='encoding' has exactly 5 sites"):
      mh.msd_hippocampus(bad, split="encoding")
  for bad in (0, 209, 2.0, True, "4"):
    with pytest.raises(OptionError, match="num_sites must be"):
      mh.msd_hippocampus(num_sites=bad)
  for bad in (-1, 0.5, True):
    with pytest.raises(OptionError, match="seed must be"):
      mh.msd_hippocampus(seed=bad)
  largest_x = sorted(c for c, r in ROWS.items() if r["shape_x"] == "43")
  with pytest.raises(OptionError, match=rf"smaller than case ({'|'.join(largest_x)}) "
                                        r"\(43, \d+, \d+\).*\(43, 59, 47\)"):
    mh.msd_hippocampus(shape=(42, 64, 48))
  for bad in ((48, 64), (48, 64, 0), (48.0, 64, 48), 48):
    with pytest.raises(OptionError, match="shape must be 3 positive integers"):
      mh.msd_hippocampus(shape=bad)
  assert issubclass(OptionError, ValueError)
