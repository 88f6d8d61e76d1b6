"""Tidy result records, results.json, the strategy x site table, and the report.

Every experiment writes a list of records

    {"dataset", "strategy", "seed", "site", "split", "metric", "value"}

with `site` one of the site names, "mean" (unweighted mean over sites, as
FLamby reports) or "pooled" (all rows together). `save_records` adds to every
record it writes where the number came from (PROVENANCE_FIELDS, `provenance()`):

    {"fedjax_med_version", "jax_version", "jaxlib_version", "git_commit", "device", "cpu"}

The device and the CPU are there because a trained model depends on them, not only
on the code and the seed: XLA compiles for the host's vector instructions, and a
different instruction set (AVX2 vs AVX-512, FMA or not) rounds differently, which a
long non-convex training run amplifies (experiments/README.md measures it).

Files written before version 0.2 lack those fields; `load_records` and the
tables read them all the same.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import defaultdict
from typing import Any, Iterable, Sequence

import numpy as np

RECORD_FIELDS = ("dataset", "strategy", "seed", "site", "split", "metric", "value")
# Fields a record may carry beside RECORD_FIELDS: the neighbouring relation of an
# epsilon record ("add_or_remove_one" / "replace_one"), without which an epsilon
# has no meaning.
# Where a record came from, added by `save_records` (see `provenance`); optional,
# so that files written before version 0.2 still load.
PROVENANCE_FIELDS = ("fedjax_med_version", "jax_version", "jaxlib_version", "git_commit",
                     "device", "cpu")
# The provenance fields that name the machine (see `save_records`).
MACHINE_FIELDS = ("device", "cpu")
# /proc/cpuinfo flags that change how XLA:CPU's compiled kernels round (widest first).
CPU_ISA_FLAGS = ("avx512f", "avx2", "fma", "avx", "sse4_2", "asimd", "sve")
OPTIONAL_FIELDS = ("neighboring_relation",) + PROVENANCE_FIELDS


def _git_commit(package_dir: str) -> str | None:
  """HEAD of the git checkout that holds `package_dir`, "-dirty" when its work
  tree has changes; None when that folder's parent is not the top of a git
  work tree (e.g. an installed wheel inside some other repository) or git
  fails. Never raises."""
  root = os.path.dirname(os.path.abspath(package_dir))
  env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}

  def git(*args):
    out = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                         timeout=30, env=env, stdin=subprocess.DEVNULL)
    return out.stdout.strip() if out.returncode == 0 else None

  try:
    top = git("rev-parse", "--show-toplevel")
    if top is None or os.path.realpath(top) != os.path.realpath(root):
      return None
    head = git("rev-parse", "--verify", "HEAD")
    if not head:
      return None
    status = git("status", "--porcelain")
    # A status git cannot give counts as changed: the work tree may differ from HEAD.
    return head if status == "" else head + "-dirty"
  except (OSError, subprocess.SubprocessError, ValueError):
    return None


def _cpu() -> str | None:
  """'<model name> [<ISA flags>]' of this machine's CPU from /proc/cpuinfo (Linux), e.g.
  "AMD EPYC [avx2 fma avx sse4_2]"; `platform.processor()` elsewhere; None when neither
  says. Never raises."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      info = f.read()
  except OSError:
    import platform  # pylint: disable=import-outside-toplevel
    return platform.processor() or None
  fields = {}
  for line in info.splitlines():
    key, sep, value = line.partition(":")
    if sep and key.strip() not in fields:          # the first CPU's entry
      fields[key.strip()] = value.strip()
  model = fields.get("model name") or fields.get("Model") or fields.get("CPU part")
  flags = set((fields.get("flags") or fields.get("Features") or "").split())
  isa = [flag for flag in CPU_ISA_FLAGS if flag in flags]
  if model is None and not isa:
    return None
  return f"{model or 'unknown CPU'} [{' '.join(isa)}]"


def provenance() -> dict[str, str | None]:
  """Where results come from: the code and library versions, and the commit.

  Returns:
    {"fedjax_med_version": fedjax_med.__version__ (the imported package's own,
                            not pip's metadata, which an editable install can
                            leave stale),
     "jax_version":        jax.__version__,
     "jaxlib_version":     jaxlib.__version__,
     "git_commit":         `git rev-parse HEAD` of the checkout fedjax_med is
                            imported from (the folder above the package), with
                            "-dirty" appended when `git status --porcelain`
                            lists any change (untracked files included); None
                            when it is not imported from a git checkout or git
                            is missing,
     "device":             "<platform>: <device kind>" of jax's first device, e.g.
                            "cpu: cpu" or "gpu: NVIDIA H100 80GB HBM3",
     "cpu":                the host CPU's model and the vector-instruction flags
                            XLA compiles for, e.g. "AMD EPYC [avx2 fma avx sse4_2]"}
  Never raises: a value it cannot find is None.
  """
  package = sys.modules.get((__package__ or "fedjax_med").split(".")[0])
  out = {"fedjax_med_version": getattr(package, "__version__", None)}
  try:
    import jax
    out["jax_version"] = jax.__version__
  except ImportError:
    out["jax_version"] = None
  try:
    device = jax.devices()[0]
    out["device"] = f"{device.platform}: {device.device_kind}"
  except Exception:  # pylint: disable=broad-except  (no backend, or jax missing)
    out["device"] = None
  out["cpu"] = _cpu()
  try:
    import jaxlib
    out["jaxlib_version"] = getattr(jaxlib, "__version__", None)
  except ImportError:
    out["jaxlib_version"] = None
  package_file = getattr(package, "__file__", None)
  out["git_commit"] = _git_commit(os.path.dirname(package_file)) if package_file else None
  return out


def records_from_report(dataset: str, strategy: str, seed: int, split: str,
                        report: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
  """Flattens `{site: {metric: value}}` into tidy records."""
  out = []
  for site, values in report.items():
    for metric, value in values.items():
      out.append({"dataset": dataset, "strategy": strategy, "seed": int(seed),
                  "site": site, "split": split, "metric": metric,
                  "value": None if value is None or not math.isfinite(value)
                  else float(value)})
  return out


def save_records(records: Sequence[dict[str, Any]], out_dir: str,
                 filename: str = "results.json",
                 stamp: dict[str, str | None] | None = None) -> str:
  """Writes records as a JSON list, each with its provenance; returns the path.

  `stamp` is a `provenance()` taken when the run started: a long run saves its records
  at the end, and a commit made in between would otherwise be recorded as the code that
  computed them. None: `provenance()` now.

  Every record needs RECORD_FIELDS and may carry OPTIONAL_FIELDS (an epsilon
  record needs its "neighboring_relation"). The written records also carry
  PROVENANCE_FIELDS from `stamp` (default `provenance()`, computed once per call); a record that
  already has a provenance field keeps its own value (records merged from an
  earlier run stay attributed to it), and gets None for a machine field it lacks
  (MACHINE_FIELDS: this machine did not compute it). The caller's records are not changed.
  """
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, filename)
  for r in records:
    missing = set(RECORD_FIELDS) - set(r)
    extra = set(r) - set(RECORD_FIELDS) - set(OPTIONAL_FIELDS)
    if missing or extra:
      raise ValueError(f"save_records: record {r} must have the fields {RECORD_FIELDS}"
                       f" (optionally {OPTIONAL_FIELDS}); missing {sorted(missing)},"
                       f" unknown {sorted(extra)}")
    if r["metric"] == "epsilon" and "neighboring_relation" not in r:
      raise ValueError(f"save_records: epsilon record {r} has no neighboring_relation;"
                       " an epsilon means nothing without it")
  if stamp is None:
    stamp = provenance()
  elif set(stamp) != set(PROVENANCE_FIELDS):
    raise ValueError(f"save_records: stamp must have exactly the fields {PROVENANCE_FIELDS}"
                     f" (a provenance()); missing {sorted(set(PROVENANCE_FIELDS) - set(stamp))},"
                     f" unknown {sorted(set(stamp) - set(PROVENANCE_FIELDS))}")
  # The machine fields describe where a number was computed: a record stamped by an
  # earlier run (it carries some provenance) did not record them, so they stay unknown.
  earlier = {k: None for k in MACHINE_FIELDS}
  records = [{**r, **{k: earlier.get(k, v) if any(f in r for f in PROVENANCE_FIELDS) else v
                      for k, v in stamp.items() if k not in r}} for r in records]
  with open(path, "w") as f:
    json.dump(records, f, indent=1)
  return path


def load_records(path: str) -> list[dict[str, Any]]:
  """The records of a results.json, as written (with or without provenance fields)."""
  with open(path) as f:
    return json.load(f)


def summary_table(records: Iterable[dict[str, Any]], metric: str, split: str = "test",
                  sites: Sequence[str] | None = None,
                  strategies: Sequence[str] | None = None, digits: int = 3) -> str:
  """Markdown table: strategies x sites, "mean +- std" over seeds.

  std is the sample standard deviation over seeds (ddof = 1; 0 for one seed).
  Undefined values (e.g. AUC on a one-class site) are skipped; a cell with
  none left shows "n/a".
  """
  values = defaultdict(list)
  seen_sites, seen_strategies = [], []
  for r in records:
    if r["metric"] != metric or r["split"] != split:
      continue
    if r["strategy"] not in seen_strategies:
      seen_strategies.append(r["strategy"])
    if r["site"] not in seen_sites:
      seen_sites.append(r["site"])
    if r["value"] is not None:
      values[(r["strategy"], r["site"])].append(r["value"])
  sites = list(sites or seen_sites)
  strategies = list(strategies or seen_strategies)
  lines = [f"| {metric} ({split}) | " + " | ".join(sites) + " |",
           "|---|" + "---|" * len(sites)]
  for strategy in strategies:
    cells = []
    for site in sites:
      v = np.asarray(values.get((strategy, site), []), dtype=np.float64)
      if v.size == 0:
        cells.append("n/a")
      else:
        std = v.std(ddof=1) if v.size > 1 else 0.0
        cells.append(f"{v.mean():.{digits}f} ± {std:.{digits}f}")
    lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


__all__ = ["RECORD_FIELDS", "OPTIONAL_FIELDS", "PROVENANCE_FIELDS", "provenance",
           "records_from_report", "save_records", "load_records", "summary_table"]


# ---------------------------------------------------------------------------
# The accuracy-bytes-time-privacy report (issue 7) and standard figures
# (issue 5, item 6).
#
# Run-level numbers live in results.json as ordinary tidy records with
# site "all" and split "train" (the cost of training, not a site's score):
#
#   bytes_up_total, bytes_down_total, bytes_total   bytes over the whole run
#   bytes_reference_total                           the same run uncompressed (float32)
#   wall_time_s      real seconds of the training rounds (compilation excluded)
#   sim_time         simulated time at the end of the run (fedbuff's clock)
#   time_to_target   simulated time when the headline metric first reached the
#                    target (None when it never did)
#   epsilon          privacy spent (when a DP mechanism reports it)
#
# Per-round series go to a sibling history.json: a list of the same records
# plus a "round" field (HISTORY_FIELDS), e.g. the test metric at site "mean"
# after each round, and the cumulative cost series (bytes_total, sim_time,
# wall_time_s at site "all"). results.json keeps RECORD_FIELDS, plus
# PROVENANCE_FIELDS (and "neighboring_relation" on epsilon records).
# `load_history` also reads the older {strategy: {seed: [train loss per
# round]}} history files of experiments/heart_disease.py.
# ---------------------------------------------------------------------------

RUN_SITE = "all"
RUN_SPLIT = "train"
COST_METRICS = ("bytes_up_total", "bytes_down_total", "bytes_total", "wall_time_s",
                "sim_time", "time_to_target", "epsilon")
HEADLINE_METRICS = ("accuracy", "c_index", "dice", "auc", "mae")
HISTORY_FIELDS = RECORD_FIELDS + ("round",)
_BYTE_METRICS = ("bytes_up_total", "bytes_down_total", "bytes_total", "bytes_reference_total")


def run_records(dataset: str, strategy: str, seed: int, values: dict[str, Any],
                neighboring_relation: str | None = None) -> list[dict[str, Any]]:
  """Run-level numbers (bytes, times, epsilon) as records at site "all", split "train".

  An "epsilon" value needs its `neighboring_relation` (e.g. the accountant's
  `report()["neighboring_relation"]`); it is stored on the epsilon record.
  """
  records = records_from_report(dataset, strategy, seed, RUN_SPLIT, {RUN_SITE: values})
  if "epsilon" in values:
    if neighboring_relation is None:
      raise ValueError("run_records: an epsilon needs its neighboring_relation"
                       " ('add_or_remove_one' or 'replace_one')")
    for r in records:
      if r["metric"] == "epsilon":
        r["neighboring_relation"] = neighboring_relation
  return records


def history_records(dataset: str, strategy: str, seed: int, series: dict[str, Any],
                    site: str = RUN_SITE, split: str = RUN_SPLIT,
                    rounds: Sequence[int] | None = None) -> list[dict[str, Any]]:
  """Per-round series `{metric: [value per round]}` as history records.

  Round i of a series gets `rounds[i]` (default i + 1: the value after i + 1
  rounds).
  """
  out = []
  for metric, values in series.items():
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    idx = list(rounds) if rounds is not None else list(range(1, len(values) + 1))
    for r, v in zip(idx, values):
      out.append({"dataset": dataset, "strategy": strategy, "seed": int(seed), "site": site,
                  "split": split, "metric": metric, "round": int(r),
                  "value": float(v) if math.isfinite(v) else None})
  return out


def save_history(rows: Sequence[dict[str, Any]], out_dir: str,
                 filename: str = "history.json") -> str:
  """Writes history records (RECORD_FIELDS + "round") as a JSON list; returns the path."""
  os.makedirs(out_dir, exist_ok=True)
  for r in rows:
    if tuple(sorted(r)) != tuple(sorted(HISTORY_FIELDS)):
      raise ValueError(f"save_history: record {r} does not have the fields {HISTORY_FIELDS}")
  path = os.path.join(out_dir, filename)
  with open(path, "w") as f:
    json.dump(list(rows), f)
  return path


def load_history(path: str) -> list[dict[str, Any]]:
  """History records from a history.json (either format; see above).

  The older format `{strategy: {seed: [v_1, ..., v_R]}}` (train loss per
  round; per-site lists are averaged over sites) becomes records with
  dataset "", site "all", split "train", metric "train_loss".
  """
  with open(path) as f:
    data = json.load(f)
  if isinstance(data, list):
    return data
  rows = []
  if isinstance(data, dict):
    for strategy, seeds in data.items():
      if not isinstance(seeds, dict):
        continue
      for seed, values in seeds.items():
        try:
          seed = int(seed)
        except ValueError:
          continue
        series = [float(np.nanmean(v)) if isinstance(v, list) else v for v in values]
        rows += history_records("", strategy, seed, {"train_loss": series})
  return rows


def headline_metric(records: Iterable[dict[str, Any]], dataset: str | None = None) -> str:
  """The metric a table leads with: accuracy, else c_index, dice, auc, mae, else the first."""
  seen = []
  for r in records:
    if dataset is not None and r["dataset"] != dataset:
      continue
    if r["metric"] not in seen and r["metric"] not in COST_METRICS:
      seen.append(r["metric"])
  for m in HEADLINE_METRICS:
    if m in seen:
      return m
  if not seen:
    where = "" if dataset is None else f" for dataset {dataset!r}"
    raise ValueError(f"headline_metric: no metric records{where}")
  return seen[0]


def _datasets(records) -> list[str]:
  return list(dict.fromkeys(r["dataset"] for r in records))


def _per_seed(records, dataset, metric, site, split) -> dict[str, dict[int, float | None]]:
  """strategy -> seed -> value."""
  out: dict[str, dict[int, float | None]] = {}
  for r in records:
    if (r["dataset"] == dataset and r["metric"] == metric and r["site"] == site
        and r["split"] == split):
      out.setdefault(r["strategy"], {})[r["seed"]] = r["value"]
  return out


def _run_values(records, dataset, metric) -> dict[str, dict[int, float | None]]:
  """Run-level metric: site "all" preferred, else "mean", else "pooled", any split."""
  found: dict[str, dict[int, tuple[int, float | None]]] = {}
  priority = {RUN_SITE: 0, "mean": 1, "pooled": 2}
  for r in records:
    if r["dataset"] != dataset or r["metric"] != metric:
      continue
    rank = priority.get(r["site"], 3)
    cell = found.setdefault(r["strategy"], {})
    if r["seed"] not in cell or rank < cell[r["seed"]][0]:
      cell[r["seed"]] = (rank, r["value"])
  return {s: {seed: v for seed, (_, v) in cell.items()} for s, cell in found.items()}


def _format_bytes(v: float) -> str:
  for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if abs(v) >= scale:
      return f"{v / scale:.3g} {unit}"
  return f"{v:.0f} B"


def _cell(values: list, metric: str, digits: int) -> str:
  """mean ± std over seeds (std omitted for cost metrics when 0)."""
  reached = [v for v in values if v is not None]
  if not reached:
    return "not reached" if metric == "time_to_target" and values else "n/a"
  v = np.asarray(reached, dtype=np.float64)
  mean, std = v.mean(), (v.std(ddof=1) if v.size > 1 else 0.0)
  if metric in _BYTE_METRICS:
    text = _format_bytes(mean) + (f" ± {_format_bytes(std)}" if std > 0 else "")
  elif metric in COST_METRICS:
    text = f"{mean:.{digits}g}" + (f" ± {std:.{digits}g}" if std > 0 else "")
  else:
    text = f"{mean:.{digits}f} ± {std:.{digits}f}"
  if metric == "time_to_target" and len(reached) < len(values):
    text += f" ({len(reached)}/{len(values)} seeds)"
  return text


def strategy_table(records: Sequence[dict[str, Any]], dataset: str | None = None,
                   metric: str | None = None, site: str = "mean", split: str = "test",
                   strategies: Sequence[str] | None = None, reference: str | None = None,
                   digits: int = 3) -> str:
  """Markdown: one row per strategy; the metric, then bytes, times and epsilon.

  Columns: `metric` at `site` / `split` (mean ± std over seeds), then every
  COST_METRICS entry some strategy has (mean ± std; time_to_target over the
  seeds that reached the target, with their count), then "up vs <reference>"
  and "bytes vs <reference>" (bytes_up_total and bytes_total over the
  reference strategy's, means over seeds) when `reference` is given.
  """
  if dataset is None:
    names = _datasets(records)
    if len(names) != 1:
      raise ValueError(f"strategy_table: records hold datasets {names}; pass dataset=")
    dataset = names[0]
  metric = metric or headline_metric(records, dataset)
  scores = _per_seed(records, dataset, metric, site, split)
  costs = {m: _run_values(records, dataset, m) for m in COST_METRICS}
  costs = {m: v for m, v in costs.items() if v}
  order = list(strategies) if strategies is not None else list(dict.fromkeys(
      [r["strategy"] for r in records if r["dataset"] == dataset
       and (r["strategy"] in scores or any(r["strategy"] in v for v in costs.values()))]))
  ratios = [m for m in ("bytes_up_total", "bytes_total")
            if reference is not None and m in costs and reference in costs[m]]
  header = [f"{metric} ({site}, {split})"] + list(costs)
  header += [f"{'up' if m == 'bytes_up_total' else 'bytes'} vs {reference}" for m in ratios]
  lines = ["| strategy | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]

  def mean_of(m, strategy):
    v = [x for x in costs[m].get(strategy, {}).values() if x is not None]
    return float(np.mean(v)) if v else float("nan")

  for strategy in order:
    cells = [_cell(list(scores.get(strategy, {}).values()), metric, digits)]
    for m, table in costs.items():
      cells.append(_cell(list(table.get(strategy, {}).values()), m, digits))
    for m in ratios:
      mine, ref = mean_of(m, strategy), mean_of(m, reference)
      cells.append(f"{mine / ref:.3f}" if math.isfinite(mine) and ref > 0 else "n/a")
    lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def series_mean(history: Sequence[dict[str, Any]], dataset: str, strategy: str, metric: str,
                site: str, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(rounds, mean over seeds, std over seeds) of one per-round series.

  Only rounds that every seed has are kept.
  """
  per_round: dict[int, list[float]] = defaultdict(list)
  seeds = set()
  for r in history:
    if (r["dataset"] == dataset and r["strategy"] == strategy and r["metric"] == metric
        and r["site"] == site and r["split"] == split and r["value"] is not None):
      per_round[r["round"]].append(r["value"])
      seeds.add(r["seed"])
  rounds = sorted(k for k, v in per_round.items() if len(v) == len(seeds))
  values = [np.asarray(per_round[k], np.float64) for k in rounds]
  return (np.asarray(rounds, np.int64),
          np.asarray([v.mean() for v in values]),
          np.asarray([v.std(ddof=1) if v.size > 1 else 0.0 for v in values]))


def _strategies(rows, dataset) -> list[str]:
  return list(dict.fromkeys(r["strategy"] for r in rows if r["dataset"] == dataset))


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _panels(plt, count: int, width: float = 6.0, height: float = 4.0):
  fig, axes = plt.subplots(1, count, figsize=(width * count, height), squeeze=False)
  return fig, list(axes[0])


def _save(plt, fig, path: str) -> str:
  """Lays out, writes `fig` as PNG at `path` (creating its folder), closes it."""
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot_metric_vs(history: Sequence[dict[str, Any]], x_metric: str, metric: str,
                   path: str, *, x_site: str = RUN_SITE, x_split: str = RUN_SPLIT,
                   site: str = "mean", split: str = "test",
                   datasets: Sequence[str] | None = None, log_x: bool = False,
                   x_label: str | None = None) -> str | None:
  """`metric` against another per-round series (cumulative bytes, time), one
  line per strategy (means over seeds), one panel per dataset; PNG.

  Strategies without both series are left out; returns None (no file) when
  no strategy has both.
  """
  datasets = list(datasets or _datasets(history))
  panels = []
  for d in datasets:
    lines = []
    for s in _strategies(history, d):
      rx, x, _ = series_mean(history, d, s, x_metric, x_site, x_split)
      ry, y, _ = series_mean(history, d, s, metric if isinstance(metric, str) else metric[d],
                             site, split)
      common = np.intersect1d(rx, ry)
      if common.size:
        lines.append((s, x[np.searchsorted(rx, common)], y[np.searchsorted(ry, common)]))
    if lines:
      panels.append((d, lines))
  if not panels:
    return None
  plt = _pyplot()
  fig, axes = _panels(plt, len(panels))
  for ax, (d, lines) in zip(axes, panels):
    for s, x, y in lines:
      ax.plot(x, y, marker=".", markersize=3, label=s)
    m = metric if isinstance(metric, str) else metric[d]
    ax.set_xlabel(x_label or x_metric)
    ax.set_ylabel(f"{m} ({site}, {split})")
    ax.set_title(d)
    if log_x:
      ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  return _save(plt, fig, path)


def plot_curves(history: Sequence[dict[str, Any]], metric, path: str, *,
                site: str = "mean", split: str = "test",
                datasets: Sequence[str] | None = None) -> str | None:
  """Per-round `metric` curves per strategy (mean ± std band over seeds); PNG."""
  datasets = list(datasets or _datasets(history))
  panels = []
  for d in datasets:
    m = metric if isinstance(metric, str) else metric[d]
    lines = [(s,) + series_mean(history, d, s, m, site, split) for s in _strategies(history, d)]
    lines = [line for line in lines if line[1].size]
    if lines:
      panels.append((d, m, lines))
  if not panels:
    return None
  plt = _pyplot()
  fig, axes = _panels(plt, len(panels))
  for ax, (d, m, lines) in zip(axes, panels):
    for s, rounds, mean, std in lines:
      ax.plot(rounds, mean, label=s)
      ax.fill_between(rounds, mean - std, mean + std, alpha=0.15)
    ax.set_xlabel("round")
    ax.set_ylabel(f"{m} ({site}, {split})")
    ax.set_title(d)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  return _save(plt, fig, path)


def plot_site_bars(records: Sequence[dict[str, Any]], metric, path: str, *,
                   split: str = "test", strategies: Sequence[str] | None = None,
                   datasets: Sequence[str] | None = None) -> str | None:
  """Per-site bars, one bar per strategy, error bars = std over seeds (ddof 1); PNG."""
  datasets = list(datasets or _datasets(records))
  panels = []
  for d in datasets:
    m = metric if isinstance(metric, str) else metric[d]
    rows = [r for r in records if r["dataset"] == d and r["metric"] == m
            and r["split"] == split and r["site"] != RUN_SITE]
    if rows:
      panels.append((d, m, rows))
  if not panels:
    return None
  plt = _pyplot()
  fig, axes = _panels(plt, len(panels), width=7.0)
  for ax, (d, m, rows) in zip(axes, panels):
    sites = list(dict.fromkeys(r["site"] for r in rows))
    names = list(strategies or dict.fromkeys(r["strategy"] for r in rows))
    width = 0.8 / max(len(names), 1)
    for i, s in enumerate(names):
      means, stds = [], []
      for site in sites:
        v = np.asarray([r["value"] for r in rows if r["strategy"] == s and r["site"] == site
                        and r["value"] is not None], np.float64)
        means.append(v.mean() if v.size else np.nan)
        stds.append(v.std(ddof=1) if v.size > 1 else 0.0)
      x = np.arange(len(sites)) + (i - (len(names) - 1) / 2) * width
      ax.bar(x, means, width, yerr=stds, capsize=2, label=s)
    ax.set_xticks(np.arange(len(sites)))
    ax.set_xticklabels(sites, rotation=30, ha="right")
    ax.set_ylabel(f"{m} ({split})")
    ax.set_title(d)
    ax.legend(fontsize=7)
  return _save(plt, fig, path)


def write_report(results_path: str, out_dir: str | None = None,
                 history_path: str | None = None, metric: str | None = None,
                 reference: str | None = None, site: str = "mean",
                 split: str = "test") -> dict[str, str]:
  """The table and the standard figures of any results.json.

  Writes, in `out_dir` (default: the results' folder):
    report.md                one `strategy_table` per dataset
    sites.png                per-site bars with error bars over seeds
  and, when a history.json is next to the results (or given) with the
  series they need:
    curves.png               per-round metric curves per strategy
    train_loss.png           per-round training loss per strategy
    metric_vs_bytes.png      metric vs cumulative bytes (up + down)
    metric_vs_time.png       metric vs simulated time
    metric_vs_wall_time.png  metric vs real training time

  Returns:
    {name: path} of the files written.
  """
  records = load_records(results_path)
  out_dir = out_dir or os.path.dirname(os.path.abspath(results_path))
  os.makedirs(out_dir, exist_ok=True)
  datasets = _datasets(records)
  metrics = {d: metric or headline_metric(records, d) for d in datasets}
  parts = []
  for d in datasets:
    parts.append(f"## {d}\n\n" + strategy_table(records, d, metrics[d], site, split,
                                                 reference=reference))
  written = {}
  path = os.path.join(out_dir, "report.md")
  with open(path, "w") as f:
    f.write("\n\n".join(parts) + "\n")
  written["report.md"] = path
  out = plot_site_bars(records, metrics, os.path.join(out_dir, "sites.png"), split=split)
  if out:
    written["sites.png"] = out
  if history_path is None:
    candidate = os.path.join(os.path.dirname(os.path.abspath(results_path)), "history.json")
    history_path = candidate if os.path.exists(candidate) else None
  if history_path is not None:
    history = load_history(history_path)
    for name, fn in (
        ("curves.png", lambda p: plot_curves(history, metrics, p, site=site, split=split)),
        ("train_loss.png", lambda p: plot_curves(history, "train_loss", p, site=RUN_SITE,
                                                 split=RUN_SPLIT)),
        ("metric_vs_bytes.png", lambda p: plot_metric_vs(
            history, "bytes_total", metrics, p, site=site, split=split, log_x=True,
            x_label="cumulative bytes (up + down)")),
        ("metric_vs_time.png", lambda p: plot_metric_vs(
            history, "sim_time", metrics, p, site=site, split=split,
            x_label="simulated time")),
        ("metric_vs_wall_time.png", lambda p: plot_metric_vs(
            history, "wall_time_s", metrics, p, site=site, split=split,
            x_label="training wall time (s)")),
    ):
      out = fn(os.path.join(out_dir, name))
      if out:
        written[name] = out
  return written


def main(argv=None) -> int:
  """`python -m fedjax_med.training.report results.json`: prints the table, writes the figures."""
  import argparse
  parser = argparse.ArgumentParser(
      description="Table and figures of an experiment's results.json")
  parser.add_argument("results", help="path to results.json")
  parser.add_argument("--history", help="history.json (default: next to results.json)")
  parser.add_argument("--out", help="output folder (default: the results' folder)")
  parser.add_argument("--metric", help="headline metric (default: accuracy, c_index, ...)")
  parser.add_argument("--reference", help="strategy whose bytes are the 1.0 of the ratio")
  args = parser.parse_args(argv)
  written = write_report(args.results, args.out, args.history, args.metric, args.reference)
  with open(written["report.md"]) as f:
    print(f.read())
  for name, path in written.items():
    print(f"wrote {path}")
  return 0


__all__ += ["RUN_SITE", "RUN_SPLIT", "COST_METRICS", "HEADLINE_METRICS", "HISTORY_FIELDS",
            "run_records", "history_records", "save_history", "load_history",
            "headline_metric", "strategy_table", "series_mean", "plot_metric_vs",
            "plot_curves", "plot_site_bars", "write_report", "main"]


if __name__ == "__main__":
  raise SystemExit(main())
