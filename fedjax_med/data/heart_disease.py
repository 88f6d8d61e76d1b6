"""Fed-Heart-Disease (FLamby): four real hospitals, bundled, offline.

Data: UCI Heart Disease, "processed" files of Cleveland, Hungary,
Switzerland and Long Beach VA (CC BY 4.0; Janosi, Steinbrunn, Pfisterer &
Detrano 1988, https://doi.org/10.24432/C52P4X). See `files/heart_disease/SOURCE.md`
for provenance, checksums and the attribution the authors ask for.

Preprocessing, exactly as FLamby's `fed_heart_disease/dataset.py`:
  1. drop columns slope, ca, thal (10, 11, 12), then every row with a `?`
     (303, 261, 46, 130 rows remain);
  2. label = 1 if num > 0 else 0;
  3. FLamby's per-site 66/34 train/test split, recorded in flamby_split.csv
     (train/test 199/104, 172/89, 30/16, 85/45);
  4. one-hot cp and restecg with the first level dropped -> 13 features:
     age, sex, trestbps, chol, fbs, thalach, exang, oldpeak,
     cp_2, cp_3, cp_4, restecg_1, restecg_2;
  5. standardise with the mean and unbiased std (ddof = 1) of the site's own
     train rows, x' = (x - mean) / (std + 1e-9); train and test rows of a
     site use that site's train statistics. `standardize="pooled"` uses the
     statistics of all train rows pooled instead (FLamby's pooled training).
     `standardize="federated"` computes those same global statistics the way
     a federation can, from per-site sums (`fedjax_med.data.standardize`,
     x' = (x - mean) / std, ddof = 1), so that federated and pooled training
     see the same inputs.
Rows keep their file order within each split.
"""

from __future__ import annotations

import csv
from importlib import resources

import numpy as np

from fedjax_med.core.federated_data import FederatedData
from fedjax_med.core.options import OptionError, check_choice
from fedjax_med.data.standardize import federated_standardize

SITES = ("cleveland", "hungarian", "switzerland", "va")
FEATURE_NAMES = ("age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak",
                 "cp_2", "cp_3", "cp_4", "restecg_1", "restecg_2")
NUM_FEATURES = len(FEATURE_NAMES)
STANDARDIZE = ("site", "pooled", "federated", "none")
_NUMERIC_COLUMNS = (0, 1, 3, 4, 5, 7, 8, 9)   # age sex trestbps chol fbs thalach exang oldpeak
_CP, _RESTECG, _NUM = 2, 6, 13
_DROPPED = (10, 11, 12)                        # slope, ca, thal


def _files():
  return resources.files("fedjax_med.data").joinpath("files", "heart_disease")


def _read_site(name: str) -> tuple[np.ndarray, np.ndarray]:
  """Rows kept after FLamby's filter: (1-based line numbers, float values [n, 14])."""
  text = _files().joinpath(f"processed.{name}.data").read_text()
  lines, rows = [], []
  for line_no, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    fields = line.strip().split(",")
    if len(fields) != 14:
      raise ValueError(f"heart_disease: {name} line {line_no} has {len(fields)} fields")
    kept = [f for i, f in enumerate(fields) if i not in _DROPPED]
    if "?" in kept:
      continue
    lines.append(line_no)
    rows.append([float(f) if f != "?" else np.nan for f in fields])
  return np.asarray(lines), np.asarray(rows, dtype=np.float64)


def _split() -> dict[str, dict[int, str]]:
  out: dict[str, dict[int, str]] = {name: {} for name in SITES}
  with _files().joinpath("flamby_split.csv").open() as f:
    for row in csv.DictReader(f):
      out[row["center_name"]][int(row["line"])] = row["set"]
  return out


def _features(values: np.ndarray) -> np.ndarray:
  """[n, 14] raw columns -> [n, 13] features (numeric + one-hot cp, restecg)."""
  cp = values[:, _CP]
  restecg = values[:, _RESTECG]
  one_hot = [cp == level for level in (2, 3, 4)] + [restecg == level for level in (1, 2)]
  return np.concatenate([values[:, _NUMERIC_COLUMNS],
                         np.stack(one_hot, axis=1).astype(np.float64)], axis=1)


def load_raw() -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
  """Unstandardised `{site: {"train": (x, y), "test": (x, y)}}`, float64."""
  split = _split()
  out = {}
  for name in SITES:
    lines, values = _read_site(name)
    sets = split[name]
    if set(sets) != set(lines.tolist()):
      raise ValueError(
          f"heart_disease: {name}: rows kept by the filter do not match"
          " flamby_split.csv; the bundled files are damaged")
    is_train = np.asarray([sets[int(line)] == "train" for line in lines])
    x = _features(values)
    y = (values[:, _NUM] > 0).astype(np.float64)
    out[name] = {"train": (x[is_train], y[is_train]), "test": (x[~is_train], y[~is_train])}
  return out


def _stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  return x.mean(axis=0), x.std(axis=0, ddof=1)


def heart_disease(standardize: str = "site", site: int | str | None = None
                  ) -> tuple[FederatedData, FederatedData]:
  """Fed-Heart-Disease as (train, test) FederatedData, K = 4, 13 features.

  Args:
    standardize: "site" (each site's own train statistics; FLamby's protocol
      for federated and local training), "pooled" (statistics of all train
      rows; FLamby's pooled training), "federated" (the same global train
      statistics computed from per-site sums by
      `fedjax_med.data.standardize.federated_standardize`) or "none".

  Returns:
    train, test: `x [4, N_max, 13]` float32, `y [4, N_max]` in {0, 1},
    site_names ("cleveland", "hungarian", "switzerland", "va").
    n_k train/test: 199/104, 172/89, 30/16, 85/45.
    With `site` (an index 0-3 or a name): that hospital only, K = 1 (what one
    node of a deployment loads, `fedjax_med.deploy`); its rows and numbers are
    those of the site in the K = 4 data. Needs standardize "site" or "none"
    (the others use the other hospitals' rows).
  """
  check_choice("heart_disease", "standardize", standardize, STANDARDIZE)
  if site is not None:
    if standardize not in ("site", "none"):
      raise OptionError(f"heart_disease: site= needs standardize='site' or 'none' (one"
                        f" hospital's own statistics), got standardize={standardize!r}")
    return tuple(d.single_site(site) for d in heart_disease(standardize))
  raw = load_raw()
  if standardize == "federated":
    _, train, test = federated_standardize(
        [raw[s]["train"][0] for s in SITES], [raw[s]["test"][0] for s in SITES],
        ddof=1, feature_names=FEATURE_NAMES)
    return tuple(FederatedData.from_sites(
        [(x, raw[name][split][1]) for x, name in zip(xs, SITES)], SITES, label_type="binary")
                 for xs, split in ((train, "train"), (test, "test")))
  if standardize == "pooled":
    pooled = _stats(np.concatenate([raw[s]["train"][0] for s in SITES]))
  splits = {"train": [], "test": []}
  for name in SITES:
    if standardize == "site":
      mean, std = _stats(raw[name]["train"][0])
    elif standardize == "pooled":
      mean, std = pooled
    for split in ("train", "test"):
      x, y = raw[name][split]
      if standardize != "none":
        x = (x - mean) / (std + 1e-9)
      splits[split].append((x, y))
  return tuple(FederatedData.from_sites(splits[s], SITES, label_type="binary")
               for s in ("train", "test"))


__all__ = ["heart_disease", "load_raw", "SITES", "FEATURE_NAMES", "NUM_FEATURES"]
