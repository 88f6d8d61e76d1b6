"""Tox21 across pharma partners: 12 toxicity assays, missing labels, scaffold-split partners.

Data: the Tox21 Data Challenge 2014 table as packaged by MoleculeNet (7831
SMILES x 12 binary assays; US-government work, redistributed by MoleculeNet
and chemprop). See `files/tox21/SOURCE.md` for provenance, checksums and the
papers to cite (Tox21 Challenge; Wu et al. 2018, MoleculeNet; Mayr et al.
2016, DeepTox).

Pipeline of `tox21(...)`:

1. **Featurise** (needs RDKit, `pip install 'fedjax_med[chem]'`, only the
   first time): parse each SMILES with `Chem.MolFromSmiles`; a molecule RDKit
   cannot parse is dropped and *reported* (count, file lines and SMILES; with
   RDKit 2026.09 these are the 8 aluminium compounds written with a 6-valent
   `[AlH3]`, so 7823 molecules remain). For the others: the Morgan / ECFP4
   bit vector (radius 2, 2048 bits, `rdFingerprintGenerator`) and the
   Bemis-Murcko scaffold (`MurckoScaffoldSmiles`, no chirality; "" for
   acyclic molecules). The result is cached on disk (`cache_path`), so later
   loads need neither RDKit nor the 2 s of featurisation.
2. **Partners** (`scaffold_partition`): molecules are grouped by scaffold and
   the groups are dealt to `num_sites` = K pharma partners so that no
   scaffold crosses partners (MELLODDY / FedChem-style). Two "scaffolds" are
   giants: acyclic molecules (1775) and plain benzene (1474), 41% of the
   data. `common_scaffolds` says what to do with them:
     * "spread" (default): their molecules are dealt at random over the
       partners (a seeded permutation dealt round-robin for
       split="scaffold", i.i.d. draws from the partner proportions q for
       split="dirichlet"); every *other* scaffold stays partner-exclusive.
     * "exclusive": every scaffold, these two included, belongs to exactly
       one partner. With split="scaffold" and K = 8 this gives one
       all-acyclic and one all-benzene partner (the skew SOURCE.md measured).
   `split="scaffold"`: the exclusive groups, largest first (ties in a seeded
   random order), each go to the partner with the fewest molecules so far
   (greedy balancing). `split="dirichlet"`: partner proportions
   q ~ Dir(alpha 1_K); each partner first gets one exclusive group picked
   at random (so none is empty), every other group goes to partner
   k ~ Categorical(q). Small alpha gives very unequal partners.
3. **Train/test inside each partner** (scaffold-disjoint, DeepChem's
   `ScaffoldSplitter` rule): the partner's scaffold groups sorted by size
   (largest first, ties by scaffold string); the largest goes to train, each
   next group goes to train if train stays <= (1 - test_fraction) n_p,
   otherwise to test. So test molecules have scaffolds the partner never
   trained on. A partner whose molecules all share ONE scaffold (e.g. the
   all-acyclic partner of "exclusive") cannot be split that way; it gets a
   seeded random split of round(test_fraction n_p) test molecules (at least
   1 when n_p >= 2), listed in `info.random_split_partners` and printed.

Labels carry their mask. `y` has shape `[K, N_max, 12, 2]`:
`y[..., 0]` = label in {0, 1} (0 where missing), `y[..., 1]` = observed in
{0, 1} (1 = measured). There is never a NaN. `split_labels(y)` separates
them; `fedjax_med.losses.multitask.masked_multitask_bce` and
`fedjax_med.metrics.multitask` read this layout.

The seed (default 0) drives every random choice above through
`numpy.random.default_rng(seed)`, so the same call gives the same partners
on every machine.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import os
import tempfile
import warnings
from importlib import resources
from typing import Sequence

import numpy as np

from fedjax_med.core.federated_data import FederatedData
from fedjax_med.core.options import OptionError, check_choice
from fedjax_med.data._renamed import renamed_keyword

ASSAYS = ("NR-AR", "NR-AR-LBD", "NR-AhR", "NR-Aromatase", "NR-ER", "NR-ER-LBD",
          "NR-PPAR-gamma", "SR-ARE", "SR-ATAD5", "SR-HSE", "SR-MMP", "SR-p53")
NUM_TASKS = len(ASSAYS)
RADIUS = 2
NUM_BITS = 2048
ACYCLIC = ""             # Murcko scaffold of a molecule without rings
BENZENE = "c1ccccc1"
COMMON_SCAFFOLDS = (ACYCLIC, BENZENE)
SPLITS = ("scaffold", "dirichlet")
COMMON_MODES = ("spread", "exclusive")
CSV_SHA256 = "b58cc1f683e78e3c7a1bf7116e9aac0119804018d100f7b8cdb0857941c31aca"
_CACHE_VERSION = 1


class Tox21ParseWarning(UserWarning):
  """Some SMILES could not be parsed by RDKit and were dropped."""


# -- raw table ----------------------------------------------------------------


def _csv_bytes() -> bytes:
  return resources.files("fedjax_med.data").joinpath("files", "tox21", "tox21.csv").read_bytes()


def load_table() -> tuple[list[str], np.ndarray, np.ndarray]:
  """The bundled table: (smiles [7831], labels [7831, 12], observed [7831, 12]).

  labels/observed are float32 in {0, 1}; a missing label is (0, 0). Row i is
  file line i + 2 (line 1 is the header).
  """
  text = _csv_bytes().decode("utf-8")
  reader = csv.reader(io.StringIO(text))
  header = next(reader)
  if tuple(header) != ("smiles",) + ASSAYS:
    raise ValueError(f"tox21: unexpected header {header}; the bundled file is damaged")
  smiles, labels, observed = [], [], []
  for line_no, row in enumerate(reader, start=2):
    if len(row) != 1 + NUM_TASKS:
      raise ValueError(f"tox21: line {line_no} has {len(row)} fields, expected 13")
    smiles.append(row[0])
    lab, obs = [], []
    for assay, field in zip(ASSAYS, row[1:]):
      if field.strip() == "":
        lab.append(0.0)
        obs.append(0.0)
        continue
      value = float(field)
      if value not in (0.0, 1.0):
        raise ValueError(f"tox21: line {line_no} assay {assay} holds {field!r}")
      lab.append(value)
      obs.append(1.0)
    labels.append(lab)
    observed.append(obs)
  return (smiles, np.asarray(labels, np.float32), np.asarray(observed, np.float32))


def split_labels(y) -> tuple[np.ndarray, np.ndarray]:
  """`y [..., 12, 2]` -> (labels [..., 12], observed [..., 12]) (works on jax arrays too)."""
  if y.shape[-1] != 2:
    raise ValueError(f"split_labels: y must end in a (label, observed) axis of size 2,"
                     f" got shape {tuple(y.shape)}")
  return y[..., 0], y[..., 1]


# -- featurisation and its cache --------------------------------------------


def _import_rdkit():
  try:
    from rdkit import Chem, RDLogger, rdBase  # noqa: F401
    from rdkit.Chem import rdFingerprintGenerator  # noqa: F401
    from rdkit.Chem.Scaffolds import MurckoScaffold  # noqa: F401
  except ImportError as err:
    raise ImportError(
        "tox21: computing Morgan fingerprints and scaffolds needs RDKit, which is"
        " not installed. Install the optional extra: pip install 'fedjax_med[chem]'"
        " (or pip install rdkit). It is needed once: the features are then cached"
        " on disk (see fedjax_med.data.tox21.cache_path).") from err
  import rdkit
  return rdkit


def featurize(smiles: Sequence[str], radius: int = RADIUS, num_bits: int = NUM_BITS) -> dict:
  """Morgan bit vectors and Murcko scaffolds with RDKit (no cache).

  Returns a dict: `ok` bool [n] (parsed), `fingerprints` uint8 [n_ok, num_bits]
  in {0, 1}, `scaffolds` [n_ok] str, `rdkit_version`.
  """
  rdkit = _import_rdkit()
  from rdkit import Chem, DataStructs, RDLogger
  from rdkit.Chem import rdFingerprintGenerator
  from rdkit.Chem.Scaffolds import MurckoScaffold

  generator = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=num_bits)
  ok, fps, scaffolds = [], [], []
  RDLogger.DisableLog("rdApp.*")   # failures are reported by the caller, not on stderr
  try:
    for s in smiles:
      mol = Chem.MolFromSmiles(s)
      ok.append(mol is not None)
      if mol is None:
        continue
      if hasattr(generator, "GetFingerprintAsNumPy"):
        fp = np.asarray(generator.GetFingerprintAsNumPy(mol), np.uint8)
      else:  # pragma: no cover - older RDKit
        fp = np.zeros(num_bits, np.uint8)
        DataStructs.ConvertToNumpyArray(generator.GetFingerprint(mol), fp)
      fps.append(fp)
      scaffolds.append(MurckoScaffold.MurckoScaffoldSmiles(mol=mol, includeChirality=False))
  finally:
    RDLogger.EnableLog("rdApp.*")
  fps = np.stack(fps) if fps else np.zeros((0, num_bits), np.uint8)
  return {"ok": np.asarray(ok, bool), "fingerprints": fps,
          "scaffolds": np.asarray(scaffolds, dtype=str), "rdkit_version": rdkit.__version__}


def default_cache_dir() -> str:
  """`$FEDJAX_MED_CACHE`, else `$XDG_CACHE_HOME/fedjax_med`, else `~/.cache/fedjax_med`."""
  if os.environ.get("FEDJAX_MED_CACHE"):
    return os.environ["FEDJAX_MED_CACHE"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "fedjax_med")


def cache_path(cache_dir: str | None = None) -> str:
  """Where the featurised table is cached (keyed by the data's sha256 and radius/bits)."""
  digest = hashlib.sha256(_csv_bytes()).hexdigest()[:16]
  return os.path.join(cache_dir or default_cache_dir(),
                      f"tox21_morgan_r{RADIUS}_{NUM_BITS}_{digest}_v{_CACHE_VERSION}.npz")


def _read_cache(path: str, num_rows: int) -> dict | None:
  try:
    with np.load(path, allow_pickle=False) as z:
      ok = z["ok"].astype(bool)
      fps = np.unpackbits(z["fp_packed"], axis=1)[:, :NUM_BITS]
      entry = {"ok": ok, "fingerprints": fps, "scaffolds": z["scaffolds"].astype(str),
               "rdkit_version": str(z["rdkit_version"])}
  except (FileNotFoundError, NotADirectoryError):
    return None
  except Exception as err:  # damaged or foreign file: recompute
    warnings.warn(f"tox21: ignoring unreadable feature cache {path} ({err}); recomputing")
    return None
  if (ok.shape != (num_rows,) or fps.shape != (int(ok.sum()), NUM_BITS)
      or entry["scaffolds"].shape != (int(ok.sum()),)):
    warnings.warn(f"tox21: feature cache {path} does not match the data; recomputing")
    return None
  return entry


def _write_cache(path: str, entry: dict) -> bool:
  """Atomic write; False (with a warning) when the location is not writable."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
      np.savez_compressed(f, ok=entry["ok"], fp_packed=np.packbits(entry["fingerprints"], axis=1),
                          scaffolds=entry["scaffolds"],
                          rdkit_version=np.asarray(entry["rdkit_version"]))
    os.chmod(tmp, 0o644)   # mkstemp creates 0600; the cache is not secret
    os.replace(tmp, path)
    return True
  except OSError as err:
    warnings.warn(f"tox21: could not write the feature cache {path} ({err}); features"
                  " are kept in memory only. Set FEDJAX_MED_CACHE or cache_dir= to a"
                  " writable folder to avoid recomputing them.")
    return False


def load_features(cache_dir: str | None | bool = None) -> tuple[dict, list[str]]:
  """Featurised table, from the disk cache or computed (and cached) with RDKit.

  Args:
    cache_dir: folder of the cache (default `default_cache_dir()`); False
      disables the cache (always recompute, needs RDKit).

  Returns:
    (entry, smiles): entry as `featurize` returns it, smiles the 7831 SMILES.
  """
  smiles, _, _ = load_table()
  if cache_dir is False:
    return featurize(smiles), smiles
  path = cache_path(cache_dir or None)
  entry = _read_cache(path, len(smiles))
  if entry is None:
    entry = featurize(smiles)
    _write_cache(path, entry)
  return entry, smiles


# -- partners and splits ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Partition:
  """Which partner and split every molecule is in.

  partner: int64 [n], the molecule's partner 0..K-1.
  is_test: bool [n].
  random_split_partners: partners with a single scaffold, split at random.
  """
  partner: np.ndarray
  is_test: np.ndarray
  random_split_partners: tuple[int, ...]


def _check_options(num_sites, split, alpha, common_scaffolds, test_fraction):
  check_choice("tox21", "split", split, SPLITS)
  check_choice("tox21", "common_scaffolds", common_scaffolds, COMMON_MODES)
  if isinstance(num_sites, bool) or not isinstance(num_sites, (int, np.integer)):
    raise OptionError(f"tox21: num_sites must be an integer >= 1, got {num_sites!r}")
  if num_sites < 1:
    raise OptionError(f"tox21: num_sites must be >= 1, got {num_sites}")
  try:
    alpha = float(alpha)
  except (TypeError, ValueError):
    raise OptionError(f"tox21: alpha must be a number > 0, got {alpha!r}") from None
  if not (alpha > 0 and np.isfinite(alpha)):
    raise OptionError(f"tox21: alpha must be a finite number > 0, got {alpha!r}")
  try:
    test_fraction = float(test_fraction)
  except (TypeError, ValueError):
    raise OptionError(f"tox21: test_fraction must be in (0, 1), got {test_fraction!r}") from None
  if not 0.0 < test_fraction < 1.0:
    raise OptionError(f"tox21: test_fraction must be in (0, 1), got {test_fraction!r}")
  return int(num_sites), alpha, test_fraction


def _within_partner_split(rows, scaffolds, test_fraction, rng):
  """DeepChem's scaffold rule on one partner's rows; None when it has one scaffold."""
  groups: dict[str, list[int]] = {}
  for i in rows:
    groups.setdefault(scaffolds[i], []).append(i)
  if len(groups) < 2:
    return None
  ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
  cutoff = (1.0 - test_fraction) * len(rows)
  train: list[int] = []
  test: list[int] = []
  for j, (_, members) in enumerate(ordered):
    if j == 0 or len(train) + len(members) <= cutoff:
      train += members
    else:
      test += members
  return np.asarray(sorted(test), np.int64)


@renamed_keyword("num_partners", "num_sites")
def scaffold_partition(scaffolds: Sequence[str], num_sites: int = 8,
                       split: str = "scaffold", alpha: float = 1.0,
                       common_scaffolds: str = "spread", test_fraction: float = 0.2,
                       seed: int = 0) -> Partition:
  """Deals molecules to partners by scaffold and splits each partner train/test.

  Pure NumPy (no RDKit): the rules of the module docstring, steps 2 and 3.

  Args:
    scaffolds: n scaffold strings ("" = acyclic).
    num_sites: K >= 1 partners, at most the number of partner-exclusive
      scaffolds (all distinct scaffolds for "exclusive", those other than
      acyclic and benzene for "spread"). `num_partners=` is its deprecated
      earlier name (same result, a DeprecationWarning; removed in 0.3);
      giving both is an OptionError.
    split: "scaffold" (greedy balanced) or "dirichlet" (q ~ Dir(alpha 1_K)).
    alpha: Dirichlet concentration > 0 (checked for every split).
    common_scaffolds: "spread" or "exclusive".
    test_fraction: share of each partner's molecules aimed for its test split.
    seed: seed of `numpy.random.default_rng`.

  Raises:
    OptionError on a bad option, num_sites < 1 or > the number of scaffolds.
  """
  num_sites, alpha, test_fraction = _check_options(
      num_sites, split, alpha, common_scaffolds, test_fraction)
  scaffolds = [str(s) for s in scaffolds]
  n = len(scaffolds)
  rng = np.random.default_rng(seed)
  groups: dict[str, list[int]] = {}
  for i, s in enumerate(scaffolds):
    groups.setdefault(s, []).append(i)
  names = sorted(groups)
  spread = [s for s in names if common_scaffolds == "spread" and s in COMMON_SCAFFOLDS]
  exclusive = [s for s in names if s not in spread]
  if num_sites > len(exclusive):
    what = ("distinct scaffolds" if common_scaffolds == "exclusive" else
            "scaffolds other than acyclic and benzene (common_scaffolds='spread')")
    raise OptionError(
        f"tox21: num_sites={num_sites} > number of {what} ({len(exclusive)});"
        " every partner needs at least one scaffold of its own")
  k = num_sites
  partner = np.full(n, -1, np.int64)
  q = np.full(k, 1.0 / k) if split == "scaffold" else rng.dirichlet(np.full(k, alpha))

  # Common scaffolds spread over partners, molecule by molecule.
  for s in spread:
    members = np.asarray(groups[s], np.int64)
    if split == "scaffold":
      perm = rng.permutation(members)
      partner[perm] = np.arange(perm.size) % k
    else:
      partner[members] = rng.choice(k, size=members.size, p=q)

  # Partner-exclusive scaffolds, whole groups.
  if split == "scaffold":
    tie = rng.permutation(len(exclusive))
    order = sorted(range(len(exclusive)), key=lambda j: (-len(groups[exclusive[j]]), tie[j]))
    sizes = np.bincount(partner[partner >= 0], minlength=k).astype(np.int64)
    for j in order:
      target = int(np.argmin(sizes))
      members = groups[exclusive[j]]
      partner[members] = target
      sizes[target] += len(members)
  else:
    first = rng.choice(len(exclusive), size=k, replace=False)
    targets = rng.choice(k, size=len(exclusive), p=q)
    targets[first] = np.arange(k)
    for j, s in enumerate(exclusive):
      partner[groups[s]] = targets[j]

  is_test = np.zeros(n, bool)
  random_split = []
  for p in range(k):
    rows = np.flatnonzero(partner == p)
    test_rows = _within_partner_split(rows, scaffolds, test_fraction, rng)
    if test_rows is None:
      random_split.append(p)
      n_test = int(round(test_fraction * rows.size))
      if rows.size >= 2:
        n_test = min(max(n_test, 1), rows.size - 1)
      else:
        n_test = 0
      test_rows = rng.choice(rows, size=n_test, replace=False)
    is_test[test_rows] = True
  return Partition(partner, is_test, tuple(random_split))


# -- the loader -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tox21Info:
  """What `tox21(..., return_info=True)` also returns.

  rows: int64 [n_parsed], each parsed molecule's row in tox21.csv (file line - 2).
  scaffolds: [n_parsed] Murcko scaffolds; partition: the `Partition` of them.
  dropped: ((file line, SMILES), ...) of the molecules RDKit could not parse.
  partner_rows: per partner, {"train": rows, "test": rows} (csv rows, in the
    FederatedData order).
  summary: per partner, a dict of sizes and acyclic / benzene shares.
  rdkit_version: the RDKit that computed the features.
  """
  rows: np.ndarray
  scaffolds: np.ndarray
  partition: Partition
  dropped: tuple[tuple[int, str], ...]
  partner_rows: tuple[dict, ...]
  summary: tuple[dict, ...]
  rdkit_version: str


def _summary(scaffolds, part: Partition, num_sites):
  out = []
  for p in range(num_sites):
    rows = part.partner == p
    n = int(rows.sum())
    s = scaffolds[rows]
    out.append({
        "partner": f"partner_{p}", "n": n, "train": int((rows & ~part.is_test).sum()),
        "test": int((rows & part.is_test).sum()),
        "scaffolds": int(len(set(s.tolist()))),
        "acyclic_share": float(np.mean(s == ACYCLIC)) if n else float("nan"),
        "benzene_share": float(np.mean(s == BENZENE)) if n else float("nan"),
        "split": "random (one scaffold)" if p in part.random_split_partners else "scaffold"})
  return tuple(out)


def format_summary(summary: Sequence[dict]) -> str:
  """The partner table as text (what `tox21(verbose=True)` prints)."""
  lines = ["| partner | molecules | train | test | scaffolds | acyclic | benzene | split |",
           "|---|---|---|---|---|---|---|---|"]
  for r in summary:
    lines.append(f"| {r['partner']} | {r['n']} | {r['train']} | {r['test']} |"
                 f" {r['scaffolds']} | {r['acyclic_share']:.1%} | {r['benzene_share']:.1%} |"
                 f" {r['split']} |")
  return "\n".join(lines)


@renamed_keyword("num_partners", "num_sites")
def tox21(num_sites: int = 8, split: str = "scaffold", alpha: float = 1.0, *,
          common_scaffolds: str = "spread", test_fraction: float = 0.2, seed: int = 0,
          cache_dir: str | None | bool = None, verbose: bool = True,
          return_info: bool = False):
  """Tox21 as K pharma partners: (train, test) FederatedData [, Tox21Info].

  Args:
    num_sites: K >= 1 partners (at most the number of partner-exclusive
      scaffolds). `num_partners=` is its deprecated earlier name (same
      result, a DeprecationWarning; removed in 0.3); giving both is an
      OptionError.
    split: "scaffold" (balanced, greedy) or "dirichlet" (skewed sizes).
    alpha: Dirichlet concentration for split="dirichlet" (> 0).
    common_scaffolds: "spread" (default) or "exclusive", see module doc.
    test_fraction: share of each partner's molecules aimed for its test split.
    seed: seed of every random choice (default 0).
    cache_dir: feature cache folder (default `default_cache_dir()`), or False.
    verbose: print the dropped molecules and each partner's size and share
      of acyclic / benzene molecules. With verbose=False the dropped
      molecules are reported as a `Tox21ParseWarning` instead.
    return_info: also return a `Tox21Info`.

  Returns:
    train, test: `x [K, N_max, 2048]` float32 Morgan bits in {0, 1},
    `y [K, N_max, 12, 2]` = (label, observed), label_type "binary",
    site_names "partner_0".."partner_{K-1}". Molecules keep file order
    within each partner's split.

  Raises:
    OptionError for bad options; ImportError (naming the `chem` extra) when
    the features are not cached and RDKit is missing.
  """
  _check_options(num_sites, split, alpha, common_scaffolds, test_fraction)
  entry, smiles = load_features(cache_dir)
  _, labels, observed = load_table()
  ok = entry["ok"]
  rows = np.flatnonzero(ok)
  dropped = tuple((int(i) + 2, smiles[i]) for i in np.flatnonzero(~ok))
  if dropped:
    examples = "; ".join(f"line {line}: {s}" for line, s in dropped[:3])
    message = (f"tox21: RDKit {entry['rdkit_version']} could not parse {len(dropped)} of"
               f" {len(smiles)} SMILES; dropped them (e.g. {examples}). The full list is"
               " in Tox21Info.dropped (return_info=True).")
    if verbose:
      print(message)
    else:
      # stacklevel 3: the caller of tox21, past the renamed_keyword wrapper.
      warnings.warn(message, Tox21ParseWarning, stacklevel=3)
  scaffolds = entry["scaffolds"]
  part = scaffold_partition(scaffolds, num_sites, split, alpha, common_scaffolds,
                            test_fraction, seed)
  x_all = entry["fingerprints"].astype(np.float32)
  y_all = np.stack([labels[rows], observed[rows]], axis=-1)     # [n, 12, 2]
  names = [f"partner_{p}" for p in range(num_sites)]
  out = {"train": [], "test": []}
  partner_rows = []
  for p in range(num_sites):
    pr = {}
    for split_name, flag in (("train", False), ("test", True)):
      idx = np.flatnonzero((part.partner == p) & (part.is_test == flag))
      out[split_name].append((x_all[idx], y_all[idx]))
      pr[split_name] = rows[idx]
    partner_rows.append(pr)
  summary = _summary(scaffolds, part, num_sites)
  if verbose:
    print(f"tox21: {len(rows)} molecules, {num_sites} partners, split={split!r}"
          f"{f', alpha={alpha}' if split == 'dirichlet' else ''},"
          f" common_scaffolds={common_scaffolds!r}, seed={seed}")
    print(format_summary(summary))
  train, test = (FederatedData.from_sites(out[s], names, label_type="binary")
                 for s in ("train", "test"))
  if not return_info:
    return train, test
  info = Tox21Info(rows=rows, scaffolds=scaffolds, partition=part, dropped=dropped,
                   partner_rows=tuple(partner_rows), summary=summary,
                   rdkit_version=entry["rdkit_version"])
  return train, test, info


__all__ = ["tox21", "scaffold_partition", "Partition", "Tox21Info", "Tox21ParseWarning",
           "load_table", "load_features", "featurize", "split_labels", "cache_path",
           "default_cache_dir", "format_summary", "ASSAYS", "NUM_TASKS", "COMMON_SCAFFOLDS",
           "ACYCLIC", "BENZENE", "SPLITS", "COMMON_MODES"]
