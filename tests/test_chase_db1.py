"""CHASE_DB1 loader: files, split by whole children, labels, FOV, cache, errors."""

import hashlib
import inspect
import os
import warnings

import numpy as np
import pytest

from fedjax_med.core.options import OptionError
from fedjax_med.data import chase_db1 as cdb

FILES = os.path.join(os.path.dirname(cdb.__file__), "files", "chase_db1")


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
  """Decoded arrays are cached in a temporary folder, not the user's cache."""
  old = os.environ.get("FEDJAX_MED_CACHE")
  os.environ["FEDJAX_MED_CACHE"] = str(tmp_path_factory.mktemp("chase_cache"))
  yield
  if old is None:
    del os.environ["FEDJAX_MED_CACHE"]
  else:
    os.environ["FEDJAX_MED_CACHE"] = old


@pytest.fixture(scope="module")
def raw():
  return cdb.load_raw()


@pytest.fixture(scope="module")
def split():
  return cdb.chase_db1()


def test_bundled_files_match_sha256sums():
  with open(os.path.join(FILES, "SHA256SUMS")) as f:
    lines = [line.split("  ") for line in f.read().splitlines() if line.strip()]
  assert len(lines) == 84   # 28 images + 2 x 28 labels
  folders = {}
  for digest, path in lines:
    with open(os.path.join(FILES, path), "rb") as f:
      data = f.read()
    folders[path.split("/")[0]] = folders.get(path.split("/")[0], 0) + 1
    assert hashlib.sha256(data).hexdigest() == digest, path
  assert folders == {"images": 28, "1st_label": 28, "2nd_label": 28}
  assert os.path.exists(os.path.join(FILES, "SOURCE.md"))


def test_raw_arrays(raw):
  assert raw.images.shape == (28, 960, 999, 3) and raw.images.dtype == np.uint8
  assert raw.labels.shape == (2, 28, 960, 999)
  assert set(np.unique(raw.labels).tolist()) == {0, 1}
  assert raw.ids == cdb.IMAGE_IDS and len(set(raw.ids)) == 28
  # Vessel share of the 1st observer, whole image: 0.051-0.085 (SOURCE.md).
  share = raw.labels[0].mean(axis=(1, 2))
  assert share.min() == pytest.approx(0.051, abs=5e-4)
  assert share.max() == pytest.approx(0.085, abs=5e-4)
  assert share.mean() == pytest.approx(0.069, abs=5e-4)


def test_loader_shapes_labels_and_rows(split, raw):
  train, test = split
  assert train.num_sites == 5 and test.num_sites == 4
  assert int(train.num_examples.sum()) + int(test.num_examples.sum()) == 28
  assert np.asarray(train.num_examples).tolist() == [4] * 5
  for data in (train, test):
    assert data.x.shape[2:] == (960, 999, 3) and data.y.shape[2:] == (960, 999, 2)
    assert data.label_type == "binary"
    x, y, mask = np.asarray(data.x), np.asarray(data.y), np.asarray(data.mask)
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert set(np.unique(y[mask]).tolist()) == {0.0, 1.0}
  # Every row is the image, 1st-observer label and FOV of its image id.
  train_ids, test_ids = cdb.site_image_ids()
  for data, ids in ((train, train_ids), (test, test_ids)):
    x, y = np.asarray(data.x), np.asarray(data.y)
    for k, site_ids in enumerate(ids):
      for i, image_id in enumerate(site_ids):
        j = raw.index(image_id)
        np.testing.assert_allclose(x[k, i], raw.images[j] / 255.0, atol=1e-7)
        np.testing.assert_array_equal(y[k, i, ..., 0], raw.labels[0, j])
        np.testing.assert_array_equal(y[k, i, ..., 1], raw.fov[j])
  assert test.site_names == ("child_11", "child_12", "child_13", "child_14")


@pytest.mark.parametrize("num_sites,seed", [(5, 0), (3, 1), (10, 2), (1, 0), (4, 7)])
def test_children_are_never_split(num_sites, seed):
  groups = cdb.client_children(num_sites, seed)
  assert len(groups) == num_sites
  flat = [c for g in groups for c in g]
  assert sorted(flat) == list(range(1, 11))          # each training child once
  sizes = [len(g) for g in groups]
  assert max(sizes) - min(sizes) <= 1
  train_ids, test_ids = cdb.site_image_ids(num_sites, seed)
  child = lambda image_id: int(image_id[:2])
  train_children = [{child(i) for i in site} for site in train_ids]
  test_children = {child(i) for site in test_ids for i in site}
  assert test_children == {11, 12, 13, 14}
  for a in range(num_sites):
    assert not train_children[a] & test_children
    for b in range(a + 1, num_sites):
      assert not train_children[a] & train_children[b]
  # Both eyes of a child are in the same site.
  for site in train_ids + test_ids:
    for c in {child(i) for i in site}:
      assert f"{c:02d}L" in site and f"{c:02d}R" in site


def test_split_depends_on_seed():
  assert cdb.client_children(5, 0) != cdb.client_children(5, 1)
  assert cdb.client_children(5, 3) == cdb.client_children(5, 3)


def test_annotator_two_and_bad_options(raw):
  _, test = cdb.chase_db1(num_sites=10, annotator=2)
  np.testing.assert_array_equal(np.asarray(test.y[0, 1, ..., 0]),
                                raw.labels[1, raw.index("11R")])
  for bad in (0, 11, 2.5, True, "5"):
    with pytest.raises(OptionError, match="num_sites must be"):
      cdb.chase_db1(num_sites=bad)
  for bad in (0, 3, True, "1"):
    with pytest.raises(ValueError, match="annotator must be 1"):
      cdb.chase_db1(annotator=bad)
  with pytest.raises(ValueError, match="seed"):
    cdb.chase_db1(seed=0.5)


def test_num_clients_is_a_deprecated_name_of_num_sites():
  # The 0.1 keyword warns, naming num_sites, at the caller's line, and gives the
  # same arrays as num_sites (a K other than the default 5, so a dropped value shows).
  with warnings.catch_warnings():
    warnings.simplefilter("error")                      # num_sites itself never warns
    new_train, new_test = cdb.chase_db1(num_sites=3, seed=1)
    new_children = cdb.client_children(num_sites=3, seed=1)
    new_ids = cdb.site_image_ids(num_sites=3, seed=1)
  with pytest.warns(DeprecationWarning, match=r"num_clients= is deprecated, use num_sites=") \
      as record:
    old_train, old_test = cdb.chase_db1(num_clients=3, seed=1)
  assert [w.filename for w in record] == [__file__]
  assert old_train.num_sites == 3 and len(old_train.site_names) == 3
  for old, new in ((old_train, new_train), (old_test, new_test)):
    for field in ("x", "y", "mask", "num_examples"):
      np.testing.assert_array_equal(np.asarray(getattr(old, field)),
                                    np.asarray(getattr(new, field)))
    assert old.site_names == new.site_names and old.label_type == new.label_type
  with pytest.warns(DeprecationWarning, match="use num_sites="):
    assert cdb.client_children(num_clients=3, seed=1) == new_children
  with pytest.warns(DeprecationWarning, match="use num_sites="):
    assert cdb.site_image_ids(num_clients=3, seed=1) == new_ids
  # Both names is an error (OptionError is a ValueError and a TypeError).
  for call in (lambda: cdb.chase_db1(num_sites=3, num_clients=3),
               lambda: cdb.chase_db1(3, num_clients=3),
               lambda: cdb.client_children(3, num_clients=3),
               lambda: cdb.site_image_ids(num_sites=3, num_clients=3)):
    with pytest.raises(OptionError, match="give num_sites only; num_clients is its"):
      call()
  with pytest.raises(TypeError):
    cdb.chase_db1(num_sites=5, num_clients=5)
  # The bad-value errors through the old name also say num_sites.
  with pytest.warns(DeprecationWarning), pytest.raises(OptionError, match="num_sites must"):
    cdb.chase_db1(num_clients=11)
  assert list(inspect.signature(cdb.chase_db1).parameters)[0] == "num_sites"
  assert "num_clients" not in inspect.signature(cdb.chase_db1).parameters


def test_fov_on_the_bundled_images(raw):
  stats = cdb.fov_stats()
  assert stats["fov_fraction"].min() > 0.6 and stats["fov_fraction"].max() < 0.72
  # Few 1st-observer vessel pixels fall outside the FOV (< 1.5% of them).
  assert (stats["vessels_outside_fov"] / stats["vessels"]).max() < 0.015
  for fov in raw.fov:
    assert fov[480, 500] and not fov[0, 0] and not fov[-1, -1]
    # Convex along rows and columns: no holes, one run per row and column.
    for m in (fov, fov.T):
      runs = np.diff(m.astype(np.int8), axis=1)
      assert ((runs == 1).sum(axis=1) <= 1).all() and ((runs == -1).sum(axis=1) <= 1).all()


def test_fov_mask_on_a_synthetic_disc():
  h, w = 41, 45
  rr, cc = np.mgrid[:h, :w]
  disc = (rr - 20) ** 2 + (cc - 22) ** 2 <= 15 ** 2
  image = np.zeros((h, w, 3), np.uint8)
  image[disc] = (120, 60, 20)
  image[20, 22] = 0          # a dark hole inside the disc
  image[2, 2] = 200          # a bright speck outside
  fov = cdb.fov_mask(image, threshold=20, erosion=0)
  expected = disc.copy()
  expected[2, 2] = True              # the hole is filled; the speck stays apart
  np.testing.assert_array_equal(fov, expected)
  eroded = cdb.fov_mask(image, threshold=20, erosion=2)
  # Reference: a pixel stays iff its whole 5 x 5 neighbourhood is in the disc.
  padded = np.pad(disc, 2)
  expected = np.ones_like(disc)
  for dr in range(5):
    for dc in range(5):
      expected &= padded[dr:dr + h, dc:dc + w]
  np.testing.assert_array_equal(eroded, expected)
  assert not eroded[2, 2]
  with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
    cdb.fov_mask(np.zeros((4, 4)))


def test_cache_roundtrip_damage_and_unwritable(monkeypatch, tmp_path, raw):
  monkeypatch.setenv("FEDJAX_MED_CACHE", str(tmp_path / "cache"))
  monkeypatch.setattr(cdb, "_MEMORY", {})
  first = cdb.load_raw()
  files = os.listdir(tmp_path / "cache")
  assert len(files) == 1 and files[0].endswith(".npz")
  monkeypatch.setattr(cdb, "_MEMORY", {})
  again = cdb.load_raw()                              # read back from the cache
  for a, b in ((first.images, again.images), (first.labels, again.labels),
               (first.fov, again.fov), (raw.fov, again.fov)):
    np.testing.assert_array_equal(a, b)
  # A damaged cache file is rebuilt.
  (tmp_path / "cache" / files[0]).write_bytes(b"not an npz")
  monkeypatch.setattr(cdb, "_MEMORY", {})
  np.testing.assert_array_equal(cdb.load_raw().labels, raw.labels)
  # An unwritable cache location (its parent is a file) falls back to memory.
  (tmp_path / "file").write_text("x")
  monkeypatch.setenv("FEDJAX_MED_CACHE", str(tmp_path / "file" / "cache"))
  monkeypatch.setattr(cdb, "_MEMORY", {})
  np.testing.assert_array_equal(cdb.load_raw().fov, raw.fov)
  assert cdb.load_raw() is cdb.load_raw()             # memoised in the process


def test_cache_dir_follows_environment(monkeypatch):
  monkeypatch.delenv("FEDJAX_MED_CACHE", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", "/some/where")
  assert cdb.cache_dir() == os.path.join("/some/where", "fedjax_med")
  monkeypatch.setenv("FEDJAX_MED_CACHE", "/else")
  assert cdb.cache_dir() == "/else"
