"""Parkinson's telemonitoring: 42 patients' home devices, UPDRS regression, bundled.

Data: UCI "Parkinsons Telemonitoring" (Tsanas, Little, McSharry & Ramig,
IEEE TBME 57(4):884-893, 2010; Little et al., IEEE TBME 56(4):1015-1022,
2009; CC BY 4.0). 5875 voice recordings captured automatically in the homes
of 42 early-stage Parkinson's patients over six months, each with the
clinician's motor and total UPDRS linearly interpolated to the recording's
time. See `files/parkinsons_telemonitoring/SOURCE.md`.

Federation: one client per patient (its home device), K = 42, site names
"patient_01".."patient_42" (the file's `subject#`).

Split `"time"` (the only one; a random row split leaks because the target is
interpolated in time): for each patient, day = floor(test_time); its
distinct days in increasing order; train = the earliest days that together
hold at least `train_fraction` (0.7) of the patient's recordings, i.e. the
days up to the first one where the running count reaches 0.7 n_k; test = the
later days. A day's recordings (about 6) are never split. Every patient has
test rows; 4235 train / 1640 test rows in all. Within a split a patient's
rows are in time order (sorted by test_time, stable; the file itself is not
sorted by time within a patient).

Features (`features="voice"`, default): the 16 dysphonia measures, Jitter(%)
... PPE. `features="all"` adds age, sex and test_time. Each client
standardises with statistics of its OWN training rows (mean and unbiased
std, ddof = 1): x' = (x - mean_k) / std_k, applied to its train and test
rows; a column constant on a client's train rows (age and sex always are)
gets std 1, i.e. it is only centred (and becomes 0). So no statistic ever
crosses a device. `standardize="none"` keeps raw values.

Target: `target="motor_UPDRS"` or `"total_UPDRS"`, in UPDRS points, y `[K, N_max]`.
"""

from __future__ import annotations

import csv
import io
from importlib import resources

import numpy as np

from fedjax_med.core.federated_data import FederatedData
from fedjax_med.core.options import OptionError, check_choice

TARGETS = ("motor_UPDRS", "total_UPDRS")
SPLITS = ("time",)
FEATURE_SETS = ("voice", "all")
STANDARDIZE = ("client", "none")
VOICE_FEATURES = ("Jitter(%)", "Jitter(Abs)", "Jitter:RAP", "Jitter:PPQ5", "Jitter:DDP",
                  "Shimmer", "Shimmer(dB)", "Shimmer:APQ3", "Shimmer:APQ5", "Shimmer:APQ11",
                  "Shimmer:DDA", "NHR", "HNR", "RPDE", "DFA", "PPE")
COLUMNS = ("subject#", "age", "sex", "test_time", "motor_UPDRS", "total_UPDRS") + VOICE_FEATURES
NUM_PATIENTS = 42
NUM_ROWS = 5875


def load_raw() -> dict[str, np.ndarray]:
  """The bundled table as float64 columns `{name: [5875]}` in file order."""
  text = resources.files("fedjax_med.data").joinpath(
      "files", "parkinsons_telemonitoring", "parkinsons_updrs.data").read_text()
  reader = csv.reader(io.StringIO(text))
  header = tuple(next(reader))
  if header != COLUMNS:
    raise ValueError(f"parkinsons_telemonitoring: unexpected header {header}; the bundled"
                     " file is damaged")
  rows = [row for row in reader if row]
  values = np.asarray(rows, dtype=np.float64)
  if values.shape != (NUM_ROWS, len(COLUMNS)):
    raise ValueError(f"parkinsons_telemonitoring: read {values.shape}, expected"
                     f" {(NUM_ROWS, len(COLUMNS))}; the bundled file is damaged")
  return {name: values[:, j] for j, name in enumerate(COLUMNS)}


def time_split(subject: np.ndarray, test_time: np.ndarray,
               train_fraction: float = 0.7) -> np.ndarray:
  """bool `[n]`, True on training rows: each subject's earliest whole days
  holding at least `train_fraction` of its rows (day = floor(test_time))."""
  is_train = np.zeros(subject.shape[0], bool)
  day = np.floor(test_time)
  for s in np.unique(subject):
    rows = subject == s
    days, counts = np.unique(day[rows], return_counts=True)
    cumulative = np.cumsum(counts)
    last_train_day = days[int(np.argmax(cumulative >= train_fraction * rows.sum()))]
    is_train[rows] = day[rows] <= last_train_day
  return is_train


def _standardize(x_train, x_test):
  mean = x_train.mean(axis=0)
  std = x_train.std(axis=0, ddof=1) if x_train.shape[0] > 1 else np.zeros_like(mean)
  std = np.where(std > 0, std, 1.0)
  return (x_train - mean) / std, (x_test - mean) / std


def load_split(target: str = "motor_UPDRS", train_fraction: float = 0.7,
               features: str = "voice") -> list[dict[str, dict[str, np.ndarray]]]:
  """Unstandardised per-patient splits, patient 1..42 in order.

  Returns a list of 42 dicts `{"train": {...}, "test": {...}}`, each with
  "x" [n, D] raw features, "y" [n] target, "test_time" [n] and "row" [n]
  (row index in the file), in the FederatedData row order.
  """
  check_choice("parkinsons_telemonitoring", "target", target, TARGETS)
  check_choice("parkinsons_telemonitoring", "features", features, FEATURE_SETS)
  raw = load_raw()
  names = VOICE_FEATURES if features == "voice" else ("age", "sex", "test_time") + VOICE_FEATURES
  x = np.stack([raw[n] for n in names], axis=1)
  subject = raw["subject#"].astype(int)
  is_train = time_split(subject, raw["test_time"], train_fraction)
  out = []
  for s in range(1, NUM_PATIENTS + 1):
    client = {}
    for split, flag in (("train", True), ("test", False)):
      rows = np.flatnonzero((subject == s) & (is_train == flag))
      rows = rows[np.argsort(raw["test_time"][rows], kind="stable")]   # time order
      client[split] = {"x": x[rows], "y": raw[target][rows],
                       "test_time": raw["test_time"][rows], "row": rows}
    out.append(client)
  return out


def parkinsons_telemonitoring(target: str = "motor_UPDRS", split: str = "time", *,
                              train_fraction: float = 0.7, features: str = "voice",
                              standardize: str = "client"
                              ) -> tuple[FederatedData, FederatedData]:
  """Parkinson's telemonitoring as (train, test) FederatedData, K = 42 patients.

  Args:
    target: "motor_UPDRS" or "total_UPDRS".
    split: "time" (see module docstring).
    train_fraction: share of each patient's recordings the training days
      must reach, in (0, 1).
    features: "voice" (16 dysphonia measures) or "all" (+ age, sex, test_time).
    standardize: "client" (each client's own training statistics) or "none".

  Returns:
    train, test: `x [42, N_max, D]` float32, `y [42, N_max]` float32 UPDRS,
    label_type "real", site_names "patient_01".."patient_42". 4235 / 1640 rows.

  Raises:
    OptionError naming the option for an unknown target, split, feature set
    or standardisation, or a train_fraction outside (0, 1).
  """
  check_choice("parkinsons_telemonitoring", "target", target, TARGETS)
  check_choice("parkinsons_telemonitoring", "split", split, SPLITS)
  check_choice("parkinsons_telemonitoring", "features", features, FEATURE_SETS)
  check_choice("parkinsons_telemonitoring", "standardize", standardize, STANDARDIZE)
  try:
    fraction = float(train_fraction)
  except (TypeError, ValueError):
    fraction = float("nan")
  if not 0.0 < fraction < 1.0:
    raise OptionError(f"parkinsons_telemonitoring: train_fraction must be in (0, 1), got"
                      f" {train_fraction!r}")
  clients = load_split(target, fraction, features)
  sites = {"train": [], "test": []}
  for client in clients:
    x_train, x_test = client["train"]["x"], client["test"]["x"]
    if standardize == "client":
      x_train, x_test = _standardize(x_train, x_test)
    sites["train"].append((x_train, client["train"]["y"]))
    sites["test"].append((x_test, client["test"]["y"]))
  names = [f"patient_{s:02d}" for s in range(1, NUM_PATIENTS + 1)]
  return tuple(FederatedData.from_sites(sites[s], names, label_type="real")
               for s in ("train", "test"))


__all__ = ["parkinsons_telemonitoring", "load_raw", "load_split", "time_split", "TARGETS",
           "SPLITS", "FEATURE_SETS", "VOICE_FEATURES", "NUM_PATIENTS", "NUM_ROWS"]
