"""Fed-TCGA-BRCA (FLamby): breast-cancer survival across six regions, bundled.

Data: TCGA-BRCA clinical data (1096 patients), as preprocessed and split by
FLamby (Ogier du Terrail et al. 2022; Andreux et al. 2020; Liu et al. 2018,
TCGA Pan-Cancer Clinical Data Resource). TCGA open-access data under the
GDC terms; see `files/tcga_brca/SOURCE.md` for provenance, checksums and the
attribution to give.

Task: survival analysis. Each patient has 39 clinical features x, an event
indicator E (1 = death observed, 0 = censored) and a time T in days (time of
death, or of the last follow-up when censored). The FLamby baseline is a
linear Cox model 39 -> 1 trained with the Cox partial likelihood
(`fedjax_med.losses.cox_loss`) and scored with Harrell's C-index
(`fedjax_med.metrics.c_index`, `fedjax_med.training.evaluation.survival_report`).

Preprocessing, exactly as FLamby's `fed_tcga_brca/dataset.py`:
  1. x = columns 1..39 of brca.csv in file order (age_at_index in years plus
     38 one-hot indicators), NOT scaled; y = (E, T), columns 40 and 41;
  2. a patient's site is the region of its tissue source site (TSS, the two
     characters after "TCGA-" in its barcode) in centers.csv: 0 northeast,
     1 south, 2 west, 3 midwest, 4 europe, 5 canada. The 8 patients from
     region "Other" are not in the split file and are dropped (1088 remain);
  3. FLamby's static split, column `fold2` of train_test_split.csv
     ("train_k" / "test_k"); train/test per site 248/63, 156/40, 164/42,
     129/33, 129/33, 40/11.
Rows keep their brca.csv order within each split (as FLamby's
`df[df["pid"].isin(pids)]`).
"""

from __future__ import annotations

import csv
from importlib import resources

import numpy as np

from fedjax_med.core.federated_data import FederatedData

SITES = ("northeast", "south", "west", "midwest", "europe", "canada")
FEATURE_NAMES = (
    "age_at_index", "ethnicity_not hispanic or latino", "ethnicity_not reported",
    "race_asian", "race_black or african american", "race_not reported", "race_white",
    "ajcc_pathologic_m_MX", "ajcc_pathologic_n_N0 (i-)", "ajcc_pathologic_n_N1",
    "ajcc_pathologic_n_N1a", "ajcc_pathologic_n_N2", "ajcc_pathologic_n_N2a",
    "ajcc_pathologic_stage_Stage IA", "ajcc_pathologic_stage_Stage IIA",
    "ajcc_pathologic_stage_Stage IIB", "ajcc_pathologic_stage_Stage IIIA",
    "ajcc_pathologic_stage_Stage IIIC", "ajcc_pathologic_t_T1c", "ajcc_pathologic_t_T2",
    "ajcc_pathologic_t_T3", "ajcc_staging_system_edition_5th",
    "ajcc_staging_system_edition_6th", "ajcc_staging_system_edition_7th",
    "icd_10_code_C50.9", "morphology_8500/3", "morphology_8520/3",
    "primary_diagnosis_Infiltrating duct carcinoma, NOS",
    "primary_diagnosis_Lobular carcinoma, NOS", "prior_malignancy_yes",
    "synchronous_malignancy_Not Reported", "treatment_or_therapy_not reported",
    "treatment_or_therapy_yes", "tumor_stage_stage i", "tumor_stage_stage ia",
    "tumor_stage_stage iia", "tumor_stage_stage iib", "tumor_stage_stage iiia",
    "tumor_stage_stage iiic")
NUM_FEATURES = len(FEATURE_NAMES)   # 39
_REGIONS = ("Northeast", "South", "West", "Midwest", "Europe", "Canada")  # centers.csv
_EXCLUDED_REGION = "Other"
_TARGET_NAMES = ("E", "T")


def _files():
  return resources.files("fedjax_med.data").joinpath("files", "tcga_brca")


def _damaged(message: str) -> ValueError:
  return ValueError(f"tcga_brca: {message}; the bundled files are damaged")


def _read_csv(name: str) -> tuple[list[str], list[list[str]]]:
  with _files().joinpath(name).open(newline="") as f:
    rows = list(csv.reader(f))
  if not rows:
    raise _damaged(f"{name} is empty")
  return rows[0], [r for r in rows[1:] if r]


def _read_brca() -> tuple[list[str], np.ndarray]:
  """(pids [1096], values [1096, 41] = 39 features, E, T), in file order."""
  header, rows = _read_csv("brca.csv")
  if tuple(header) != ("pid",) + FEATURE_NAMES + _TARGET_NAMES:
    raise _damaged(f"brca.csv has header {header[:2]}...{header[-2:]} with"
                   f" {len(header)} columns; expected pid, the 39 FEATURE_NAMES, E, T")
  pids, values = [], []
  for line_no, row in enumerate(rows, start=2):
    if len(row) != len(header):
      raise _damaged(f"brca.csv line {line_no} has {len(row)} fields, expected"
                     f" {len(header)}")
    try:
      values.append([float(v) for v in row[1:]])
    except ValueError as err:
      raise _damaged(f"brca.csv line {line_no}: {err}") from None
    pids.append(row[0])
  values = np.asarray(values, dtype=np.float64)
  if len(set(pids)) != len(pids):
    raise _damaged("brca.csv repeats a patient id")
  if not np.isfinite(values).all():
    raise _damaged("brca.csv holds a NaN or inf")
  event, time = values[:, -2], values[:, -1]
  if not np.isin(event, (0.0, 1.0)).all() or (time < 0).any():
    raise _damaged("brca.csv has an event outside {0, 1} or a negative time")
  return pids, values



def _read_regions() -> dict[str, str]:
  """TSS code -> region, from centers.csv."""
  header, rows = _read_csv("centers.csv")
  if header[0] != "TSS Code" or header[-1] != "Region":
    raise _damaged(f"centers.csv has header {header}")
  regions = {}
  for row in rows:
    if len(row) != len(header) or row[0] in regions:
      raise _damaged(f"centers.csv row {row} is malformed or repeated")
    regions[row[0]] = row[-1]
  return regions


def _read_split() -> dict[str, tuple[str, int]]:
  """pid -> ("train" | "test", center id), from `fold2` of train_test_split.csv."""
  header, rows = _read_csv("train_test_split.csv")
  if header != ["pid", "fold", "fold2"]:
    raise _damaged(f"train_test_split.csv has header {header}")
  split = {}
  for row in rows:
    if len(row) != 3:
      raise _damaged(f"train_test_split.csv row {row} does not have 3 fields")
    pid, fold, fold2 = row
    part, _, center = fold2.partition("_")
    if (part not in ("train", "test") or part != fold or not center.isdigit()
        or int(center) >= len(SITES) or pid in split):
      raise _damaged(f"train_test_split.csv row {row} is malformed or repeated")
    split[pid] = (part, int(center))
  return split


def _tss(pid: str) -> str:
  fields = pid.split("-")
  if len(fields) != 3 or fields[0] != "TCGA":
    raise _damaged(f"patient id {pid!r} is not a TCGA-<TSS>-<participant> barcode")
  return fields[1]


def load_raw() -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
  """`{site: {"train": (x [n, 39], y [n, 2] = (E, T)), "test": ...}}`, float64.

  Checks, for every patient, that the region of its TSS (centers.csv) is the
  region of its `fold2` center, and that exactly the patients of region
  "Other" are missing from the split; raises ValueError otherwise.
  """
  pids, values = _read_brca()
  regions = _read_regions()
  split = _read_split()
  unknown = set(split) - set(pids)
  if unknown:
    raise _damaged(f"train_test_split.csv names {len(unknown)} patients not in"
                   f" brca.csv (e.g. {sorted(unknown)[0]!r})")
  site_of, part_of = np.full(len(pids), -1), np.full(len(pids), "", dtype=object)
  for row, pid in enumerate(pids):
    tss = _tss(pid)
    if tss not in regions:
      raise _damaged(f"patient {pid}: TSS {tss!r} is not in centers.csv")
    region = regions[tss]
    if pid not in split:
      if region != _EXCLUDED_REGION:
        raise _damaged(f"patient {pid} (region {region!r}) is missing from"
                       " train_test_split.csv")
      continue
    part, center = split[pid]
    if region != _REGIONS[center]:
      raise _damaged(f"patient {pid}: TSS {tss!r} is in region {region!r} but"
                     f" fold2 puts it in center {center} ({_REGIONS[center]!r})")
    site_of[row], part_of[row] = center, part
  x, y = values[:, :NUM_FEATURES], values[:, NUM_FEATURES:]
  out = {}
  for center, name in enumerate(SITES):
    out[name] = {}
    for part in ("train", "test"):
      rows = (site_of == center) & (part_of == part)
      out[name][part] = (x[rows], y[rows])
  return out


def tcga_brca(site: int | str | None = None) -> tuple[FederatedData, FederatedData]:
  """Fed-TCGA-BRCA as (train, test) FederatedData, K = 6, 39 features.

  Returns:
    train, test: `x [6, N_max, 39]` float32 (unscaled, as FLamby),
    `y [6, N_max, 2]` with `y[..., 0]` = event E in {0, 1} and
    `y[..., 1]` = time T in days; label_type "real"; site_names
    ("northeast", "south", "west", "midwest", "europe", "canada") in
    FLamby's center order 0..5. n_k train/test: 248/63, 156/40, 164/42,
    129/33, 129/33, 40/11 (events 45/14, 35/4, 14/8, 16/3, 7/2, 2/1).
    With `site` (an index 0-5 or a name): that region only, K = 1 (what one
    node of a deployment loads, `fedjax_med.deploy`).
  """
  raw = load_raw()
  data = tuple(
      FederatedData.from_sites([raw[name][part] for name in SITES], SITES,
                               label_type="real")
      for part in ("train", "test"))
  return data if site is None else tuple(d.single_site(site) for d in data)


__all__ = ["tcga_brca", "load_raw", "SITES", "FEATURE_NAMES", "NUM_FEATURES"]
