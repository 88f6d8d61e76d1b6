"""MSD Hippocampus: 3-class segmentation of 260 3D MRI crops, ONE real site.

Data: the 260 labelled training cases of the Medical Segmentation Decathlon
(MSD) Task04 Hippocampus, Vanderbilt University Medical Center, CC BY-SA 4.0.
A. L. Simpson et al. (2019), arXiv:1902.09063; M. Antonelli et al. (2022),
Nature Communications 13:4128. See `files/msd_hippocampus/SOURCE.md` for
provenance, licence, checksums and quirks. Each case is a T1-weighted MRI
crop around one hippocampus (31x40x24 to 43x59x47 voxels of 1 mm) with a
manual label: 0 background, 1 anterior hippocampus (head), 2 posterior
(body + tail).

The data come from ONE hospital: every site below is SIMULATED, and results
on these splits must say so. Cases are not subjects (195 people, about two
crops each, pairs unknown), so two crops of one person may fall on both
sides of any split.

Splits (`held_out_cases`, `site_case_ids`; the recipe of SOURCE.md):
  * test: 20 % of the cases of each `encoding_group`, drawn by
    `np.random.default_rng(seed)` (11 uint8 + 34 float_low + 7 float_high =
    52 cases); the other 208 cases train. One FederatedData with 3 test sites
    by encoding group ("test-uint8", "test-float_low", "test-float_high"), so
    evaluation per encoding group is a per-site metric and the pooled one is
    over all 52 cases;
  * split="iid": the 208 training cases, sorted, permuted by
    `default_rng(seed + 1)` and cut by `np.array_split` into `num_sites`
    sites "sim-iid-0", ...;
  * split="encoding" (num_sites = 5, a feature shift): "sim-uint8" (the
    uint8-stored training cases), "sim-float_low-0/1/2" (the float_low ones
    permuted by `default_rng(seed + 2)` and cut in three) and
    "sim-float_high". The shift is in how images are STORED (intensity scale
    and quantisation), not a scanner or hospital difference;
  * split="volume" (a size shift): the training cases sorted by hippocampus
    volume (anterior + posterior voxels, ties by case id) and cut into
    `num_sites` contiguous groups whose sizes differ by at most one (np.array_split),
    "sim-volume-0" (smallest hippocampi) to "sim-volume-{K-1}" (largest).
    It does not depend on the seed beyond the test draw.
  * own test cases (`own_test_case_ids`, for scoring personalised models): an
    encoding site owns the test cases of its encoding, a volume site those whose
    hippocampus volume falls in its band (cut halfway between neighbouring sites);
    iid sites own none.
With seed = 0, num_sites = 4, the test set and the iid sites are index.csv's
columns `suggested_split` and `sim_site_iid4`; with split="encoding" the
sites are `sim_site_encoding5`. Rows of a site are in case-id order.

Intensities: the images are stored in three encodings (`encoding_group`):
uint8 (55 cases, max 112-255), float32 "float_low" (172, max 853-5335) and
float32 "float_high" (33, max 3.6e5-1.7e6). normalize="zscore" (default)
normalises each volume on its own, over its own unpadded voxels v (`zscore`):

    lo, hi = percentile(v, 0.5), percentile(v, 99.5)     (np.percentile, linear)
    c      = clip(v, lo, hi)
    x      = (c - mean(c)) / std(c)                       (std with ddof = 0)

computed in float64, stored as float32 (a site can do this locally; no
statistics are shared). normalize="none" keeps the stored values (as
float32), whose scales differ by about three orders of magnitude between
encodings: use it to study the encoding shift.

FederatedData layout (`msd_hippocampus()`), each volume padded with zeros at
the end of every axis to `shape` = (X, Y, Z), default (48, 64, 48):
    x  [K, N_max, X, Y, Z, 1] float32   image; 0 in padding
    y  [K, N_max, X, Y, Z, 2] float32   y[..., 0] = class in {0, 1, 2}
                                        y[..., 1] = valid mask: 1 inside the
                                        original crop, 0 in padding
    mask [K, N_max] bool                one row = one whole case
label_type "multiclass" (both channels are non-negative integers). Keep the
padded voxels (valid = 0) out of losses and metrics. Memory: the default
train and test sets hold ~370 MB and ~180 MB (3 test sites padded to 34
rows) of float32 arrays; the decoded bundle (~82 MB) is kept for the process.

Checks: the npz shards (`hippocampus_260.part0-4.npz`, the source npz repacked
losslessly, 52 cases each) and `index.csv` are checked against
SHA256SUMS once per process (a ValueError names a damaged file), and every
case's shape, dtype and label values against index.csv.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import zipfile
from importlib import resources

import jax.numpy as jnp
import numpy as np

from fedjax_med.core.federated_data import FederatedData
from fedjax_med.core.options import OptionError, check_choice

# The source's hippocampus_260.npz (19 MB), repacked losslessly into 5 shards of 52
# cases each (case-id order) so that no bundled file exceeds 5 MB.
NPZ_SHARDS = tuple(f"hippocampus_260.part{i}.npz" for i in range(5))
INDEX = "index.csv"
NUM_CASES = 260
NUM_TRAIN = 208
CLASSES = ("background", "anterior", "posterior")
ENCODING_GROUPS = ("uint8", "float_low", "float_high")
SPLITS = ("iid", "encoding", "volume")
NORMALIZE = ("zscore", "none")
DEFAULT_SHAPE = (48, 64, 48)
TEST_FRACTION = 0.2
CLIP_PERCENTILES = (0.5, 99.5)
ENCODING_SITES = ("sim-uint8", "sim-float_low-0", "sim-float_low-1", "sim-float_low-2",
                  "sim-float_high")
TEST_SITES = tuple(f"test-{g}" for g in ENCODING_GROUPS)
_MEMORY: dict[str, "Raw"] = {}


@dataclasses.dataclass(frozen=True)
class Raw:
  """The bundle as stored, one entry per case in case-id order.

  cases: 3-digit ids ("001", ...); images: arrays `[x, y, z]` in their stored
  dtype (uint8 or float32); labels: uint8 `[x, y, z]` in {0, 1, 2};
  rows: index.csv's rows (dicts of strings), in the same order.
  """
  cases: tuple[str, ...]
  images: tuple[np.ndarray, ...]
  labels: tuple[np.ndarray, ...]
  rows: tuple[dict, ...]

  def index(self, case: str) -> int:
    return self.cases.index(case)

  @property
  def groups(self) -> dict[str, str]:
    """{case: encoding_group}."""
    return {r["case"]: r["encoding_group"] for r in self.rows}

  @property
  def shapes(self) -> dict[str, tuple[int, int, int]]:
    """{case: (shape_x, shape_y, shape_z)}."""
    return {c: tuple(im.shape) for c, im in zip(self.cases, self.images)}

  @property
  def hippocampus_voxels(self) -> dict[str, int]:
    """{case: anterior + posterior voxels}, from index.csv."""
    return {r["case"]: int(r["anterior_voxels"]) + int(r["posterior_voxels"])
            for r in self.rows}


def _files():
  return resources.files("fedjax_med.data").joinpath("files", "msd_hippocampus")


def _damaged(message: str) -> ValueError:
  return ValueError(f"msd_hippocampus: {message}; the bundled files are damaged")


def _checked_bytes(files, name: str, sums: dict[str, str]) -> bytes:
  if name not in sums:
    raise _damaged(f"SHA256SUMS has no entry for {name}")
  try:
    data = files.joinpath(name).read_bytes()
  except OSError as err:
    raise _damaged(f"{name} cannot be read ({err})") from None
  if hashlib.sha256(data).hexdigest() != sums[name]:
    raise _damaged(f"{name} does not match its sha256 in SHA256SUMS")
  return data


def _decode(files) -> Raw:
  sums = {}
  for line in files.joinpath("SHA256SUMS").read_text().splitlines():
    if line.strip():
      digest, _, name = line.strip().partition("  ")
      sums[name.strip()] = digest
  index = _checked_bytes(files, INDEX, sums).decode("utf-8")
  shards = [_checked_bytes(files, name, sums) for name in NPZ_SHARDS]
  rows = tuple(sorted(csv.DictReader(io.StringIO(index)), key=lambda r: r["case"]))
  cases = tuple(r["case"] for r in rows)
  if len(rows) != NUM_CASES or len(set(cases)) != NUM_CASES:
    raise _damaged(f"{INDEX} has {len(rows)} rows ({len(set(cases))} distinct cases),"
                   f" expected {NUM_CASES}")
  arrays = {}
  for name, data in zip(NPZ_SHARDS, shards):
    try:
      with np.load(io.BytesIO(data)) as z:
        arrays.update({key: z[key] for key in z.files})
    except (zipfile.BadZipFile, KeyError, EOFError, OSError, ValueError) as err:
      raise _damaged(f"{name} cannot be read ({err})") from None
  expected = {f"{kind}_{c}" for c in cases for kind in ("image", "label")}
  if set(arrays) != expected:
    raise _damaged(f"the npz shards hold arrays {sorted(set(arrays) ^ expected)[:4]}..."
                   f" that do not match {INDEX}")
  images, labels = [], []
  for r in rows:
    image, label = arrays[f"image_{r['case']}"], arrays[f"label_{r['case']}"]
    shape = tuple(int(r[f"shape_{a}"]) for a in "xyz")
    if image.shape != shape or label.shape != shape:
      raise _damaged(f"case {r['case']} has shapes {image.shape}, {label.shape};"
                     f" {INDEX} says {shape}")
    if image.dtype != np.dtype(r["image_dtype"]) or label.dtype != np.uint8:
      raise _damaged(f"case {r['case']} has dtypes {image.dtype}, {label.dtype}")
    if not np.isfinite(image).all() or label.max() > 2:
      raise _damaged(f"case {r['case']} has a non-finite image value or a label"
                     " outside {0, 1, 2}")
    image.setflags(write=False)
    label.setflags(write=False)
    images.append(image)
    labels.append(label)
  return Raw(cases, tuple(images), tuple(labels), rows)


def load_raw() -> Raw:
  """The 260 cases as stored (`Raw`), checked once per process.

  The first call checks the npz shards and `index.csv` against
  SHA256SUMS (ValueError naming the damaged file) and every case's shape,
  dtype and label values against index.csv; later calls return the same
  read-only arrays.
  """
  files = _files()
  key = str(files)
  if key not in _MEMORY:
    _MEMORY[key] = _decode(files)
  return _MEMORY[key]


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise OptionError(f"msd_hippocampus: {name} must be an integer, got {value!r}")
  if value < low or (high is not None and value > high):
    bound = f"in {low}..{high}" if high is not None else f">= {low}"
    raise OptionError(f"msd_hippocampus: {name} must be {bound}, got {value!r}")
  return int(value)


def held_out_cases(seed: int = 0) -> tuple[str, ...]:
  """The 52 test cases (sorted ids): 20 % of each encoding group, `default_rng(seed)`.

  For each group g in ENCODING_GROUPS, in that order, with one generator:
  `rng.permutation(sorted ids of g)[:round(0.2 n_g)]` (11, 34 and 7 cases).
  """
  seed = _check_int("seed", seed, 0)
  groups = load_raw().groups
  rng = np.random.default_rng(seed)
  test: set[str] = set()
  for g in ENCODING_GROUPS:
    ids = sorted(c for c in groups if groups[c] == g)
    test |= set(rng.permutation(ids)[:round(TEST_FRACTION * len(ids))].tolist())
  return tuple(sorted(test))


def _check_split(num_sites, split: str) -> int:
  check_choice("msd_hippocampus", "split", split, SPLITS)
  if split == "encoding":
    if (isinstance(num_sites, bool) or not isinstance(num_sites, (int, np.integer))
        or num_sites != len(ENCODING_SITES)):
      raise OptionError(
          f"msd_hippocampus: split='encoding' has exactly {len(ENCODING_SITES)} sites"
          f" {ENCODING_SITES}; got num_sites={num_sites!r}")
    return len(ENCODING_SITES)
  return _check_int("num_sites", num_sites, 1, NUM_TRAIN)


def site_names(num_sites: int = 4, split: str = "iid") -> tuple[str, ...]:
  """Names of the K simulated training sites of a split (see the module docstring)."""
  num_sites = _check_split(num_sites, split)
  if split == "encoding":
    return ENCODING_SITES
  return tuple(f"sim-{split}-{k}" for k in range(num_sites))


def site_case_ids(num_sites: int = 4, split: str = "iid", seed: int = 0
                  ) -> tuple[tuple[tuple[str, ...], ...], tuple[tuple[str, ...], ...]]:
  """Case ids of every row: (train `[K][n_k]`, test `[3][n_g]`), as `msd_hippocampus` orders them.

  Train sites follow `split` (module docstring); test sites are the held-out
  cases of each encoding group (ENCODING_GROUPS order). Rows are in case-id order.
  """
  num_sites = _check_split(num_sites, split)
  raw = load_raw()
  groups = raw.groups
  test = held_out_cases(seed)
  train = sorted(c for c in raw.cases if c not in set(test))
  if split == "iid":
    parts = np.array_split(np.random.default_rng(int(seed) + 1).permutation(train), num_sites)
  elif split == "encoding":
    low = sorted(c for c in train if groups[c] == "float_low")
    parts = ([c for c in train if groups[c] == "uint8"],
             *np.array_split(np.random.default_rng(int(seed) + 2).permutation(low), 3),
             [c for c in train if groups[c] == "float_high"])
  else:  # volume
    voxels = raw.hippocampus_voxels
    parts = np.array_split(np.asarray(sorted(train, key=lambda c: (voxels[c], c))),
                           num_sites)
  train_sites = tuple(tuple(sorted(str(c) for c in part)) for part in parts)
  test_sites = tuple(tuple(c for c in test if groups[c] == g) for g in ENCODING_GROUPS)
  return train_sites, test_sites


def own_test_case_ids(num_sites: int = 4, split: str = "volume", seed: int = 0
                      ) -> tuple[tuple[str, ...], ...]:
  """The held-out test cases that come from each training site's distribution, `[K][m_k]`.

  For scoring a site's own (personalised) model on test cases like its own, the usual
  protocol of personalised FL (e.g. Ditto, Li et al. 2021, reports each client's model on
  its own test data):
    * split="encoding": a site's own test cases are those stored in its encoding
      (sim-uint8 -> the 11 uint8 test cases; each of sim-float_low-0/1/2 -> the same 34
      float_low ones; sim-float_high -> the 7 float_high ones);
    * split="volume": site k owns the test cases whose hippocampus volume h (anterior +
      posterior voxels) falls in its band: b_{k-1} <= h < b_k with the cut
      b_k = (max h over site k + min h over site k+1) / 2 between neighbouring sites
      (b_0 = -inf, b_K = +inf), so every test case belongs to exactly one site;
    * split="iid": the sites are random draws of one population and own no test cases:
      raises OptionError.
  Rows are in case-id order. The test set is `held_out_cases(seed)`.
  """
  num_sites = _check_split(num_sites, split)
  if split == "iid":
    raise OptionError("msd_hippocampus: split='iid' sites are random draws of one"
                      " population and have no test cases of their own; use 'encoding'"
                      " or 'volume'")
  raw = load_raw()
  train_sites, test_sites = site_case_ids(num_sites, split, seed)
  test = sorted(c for site in test_sites for c in site)
  if split == "encoding":
    groups = raw.groups
    return tuple(tuple(c for c in test if groups[c] == groups[site[0]])
                 for site in train_sites)
  voxels = raw.hippocampus_voxels
  cuts = [(max(voxels[c] for c in low) + min(voxels[c] for c in high)) / 2
          for low, high in zip(train_sites, train_sites[1:])]
  band = {c: int(np.searchsorted(cuts, voxels[c], side="right")) for c in test}
  return tuple(tuple(c for c in test if band[c] == k) for k in range(num_sites))


def zscore(volume: np.ndarray) -> np.ndarray:
  """Per-volume robust z-score of `volume` (any shape, all of it real voxels).

      lo, hi = percentile(v, 0.5), percentile(v, 99.5)
      c = clip(v, lo, hi);   z = (c - mean(c)) / std(c)   (ddof = 0)

  in float64, returned as float32 (zeros where std(c) = 0, a constant volume).
  """
  v = np.asarray(volume, dtype=np.float64)
  lo, hi = np.percentile(v, CLIP_PERCENTILES)
  c = np.clip(v, lo, hi)
  std = c.std()
  if not std > 0:
    return np.zeros(v.shape, np.float32)
  return ((c - c.mean()) / std).astype(np.float32)


def _check_shape(shape, raw: Raw) -> tuple[int, int, int]:
  try:
    shape = tuple(shape)
  except TypeError:
    shape = None
  if (shape is None or len(shape) != 3
      or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1
             for s in shape)):
    raise OptionError(f"msd_hippocampus: shape must be 3 positive integers (X, Y, Z),"
                      f" got {shape!r}")
  shape = tuple(int(s) for s in shape)
  for case, case_shape in raw.shapes.items():
    if any(c > s for c, s in zip(case_shape, shape)):
      largest = tuple(max(s[a] for s in raw.shapes.values()) for a in range(3))
      raise OptionError(
          f"msd_hippocampus: shape {shape} is smaller than case {case} {case_shape};"
          f" every case fits in {largest} (the largest extent per axis)")
  return shape


def msd_hippocampus(num_sites: int = 4, split: str = "iid", seed: int = 0, *,
                    normalize: str = "zscore", shape=DEFAULT_SHAPE
                    ) -> tuple[FederatedData, FederatedData]:
  """MSD Hippocampus as (train, test) FederatedData; every site is SIMULATED.

  Args:
    num_sites: K, the number of simulated training sites: 1..208 for
      split="iid" and "volume"; exactly 5 for split="encoding".
    split: "iid" (random), "encoding" (feature shift: how images are stored)
      or "volume" (hippocampus size shift); see the module docstring.
    seed: draws the held-out test set (`default_rng(seed)`) and the random
      site assignments (`seed + 1` for iid, `seed + 2` for encoding).
    normalize: "zscore" (per volume, over its unpadded voxels, after
      clipping to its 0.5-99.5 percentiles) or "none" (stored values as
      float32; scales differ by ~3 orders of magnitude between encodings).
    shape: (X, Y, Z) every volume is zero-padded to, at the end of each
      axis; at least (43, 59, 47), the largest extent per axis.

  Returns:
    train: K sites (`site_names(num_sites, split)`), 208 cases in all.
    test: 3 sites "test-uint8", "test-float_low", "test-float_high" (52 cases).
    Both with x `[K, N_max, X, Y, Z, 1]` float32 and y `[K, N_max, X, Y, Z, 2]`
    float32 = (class in {0, 1, 2}, valid mask in {0, 1}); label_type
    "multiclass". `site_case_ids` gives every row's case id, `case_table` a
    per-case summary.

  Raises:
    OptionError (a ValueError) for an unknown split or normalize, a num_sites
    that the split does not allow, a negative or non-integer seed, or a
    shape that some case does not fit in (naming the case).
    ValueError when the bundled files are damaged.
  """
  num_sites = _check_split(num_sites, split)
  _check_int("seed", seed, 0)
  check_choice("msd_hippocampus", "normalize", normalize, NORMALIZE)
  raw = load_raw()
  shape = _check_shape(shape, raw)
  train_ids, test_ids = site_case_ids(num_sites, split, seed)
  train = _federated(raw, train_ids, site_names(num_sites, split), normalize, shape)
  test = _federated(raw, test_ids, TEST_SITES, normalize, shape)
  return train, test


def _federated(raw: Raw, sites, names, normalize: str, shape) -> FederatedData:
  """Stacks whole cases into padded sites (see `msd_hippocampus`).

  Built directly rather than through `FederatedData.from_sites`, which would
  copy the arrays several times: x is finite (checked at load; `zscore`
  gives finite values) and y holds {0, 1, 2} labels and a {0, 1} mask, so
  the checks `from_sites` makes hold by construction.
  """
  n_max = max(len(s) for s in sites)
  mask = np.zeros((len(sites), n_max), bool)
  rows = []                                      # (site, row, index in raw)
  for k, cases in enumerate(sites):
    for i, case in enumerate(cases):
      rows.append((k, i, raw.index(case)))
      mask[k, i] = True

  def stacked(channels, fill):
    # One host array at a time, handed to JAX and dropped: the peak holds one
    # host copy, not both x's and y's.
    out = np.zeros((len(sites), n_max, *shape, channels), np.float32)
    for k, i, j in rows:
      fill(out[(k, i) + tuple(slice(0, n) for n in raw.images[j].shape)], j)
    return jnp.asarray(out)

  def fill_x(box, j):
    image = raw.images[j]
    box[..., 0] = zscore(image) if normalize == "zscore" else image

  def fill_y(box, j):
    box[..., 0] = raw.labels[j]
    box[..., 1] = 1.0

  x = stacked(1, fill_x)
  y = stacked(2, fill_y)
  return FederatedData(x, y, jnp.asarray(mask), names, "multiclass", validate=False)


def case_table(num_sites: int = 4, split: str = "iid", seed: int = 0) -> list[dict]:
  """One dict per case (case-id order), for an experiment to print.

  Keys: "case" (3-digit id), "shape" ((x, y, z) of the crop), "encoding_group",
  "set" ("train" or "test"), "site" (its site's name, train or test), "row"
  (its row in that site), "hippocampus_voxels" (anterior + posterior).
  """
  raw = load_raw()
  train_ids, test_ids = site_case_ids(num_sites, split, seed)
  where = {}
  for kind, sites, names in (("train", train_ids, site_names(num_sites, split)),
                             ("test", test_ids, TEST_SITES)):
    for cases, name in zip(sites, names):
      for row, case in enumerate(cases):
        where[case] = (kind, name, row)
  groups, shapes, voxels = raw.groups, raw.shapes, raw.hippocampus_voxels
  return [{"case": c, "shape": shapes[c], "encoding_group": groups[c], "set": where[c][0],
           "site": where[c][1], "row": where[c][2], "hippocampus_voxels": voxels[c]}
          for c in raw.cases]


def source_text() -> str:
  """The bundled SOURCE.md: provenance, licence (CC BY-SA 4.0), citations, quirks."""
  return _files().joinpath("SOURCE.md").read_text()


__all__ = ["msd_hippocampus", "load_raw", "Raw", "held_out_cases", "site_case_ids",
           "site_names", "case_table", "zscore", "source_text", "CLASSES",
           "ENCODING_GROUPS", "SPLITS", "NORMALIZE", "DEFAULT_SHAPE", "ENCODING_SITES",
           "TEST_SITES", "NUM_CASES", "NUM_TRAIN"]
