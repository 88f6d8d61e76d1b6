"""Tidy result records, results.json, and the strategy x site table.

Every experiment writes a list of records

    {"dataset", "strategy", "seed", "site", "split", "metric", "value"}

with `site` one of the site names, "mean" (unweighted mean over sites, as
FLamby reports) or "pooled" (all rows together).
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from typing import Any, Iterable, Sequence

import numpy as np

RECORD_FIELDS = ("dataset", "strategy", "seed", "site", "split", "metric", "value")


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
                 filename: str = "results.json") -> str:
  """Writes records as a JSON list; returns the path."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, filename)
  for r in records:
    if tuple(sorted(r)) != tuple(sorted(RECORD_FIELDS)):
      raise ValueError(f"save_records: record {r} does not have the fields {RECORD_FIELDS}")
  with open(path, "w") as f:
    json.dump(list(records), f, indent=1)
  return path


def load_records(path: str) -> list[dict[str, Any]]:
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


__all__ = ["RECORD_FIELDS", "records_from_report", "save_records", "load_records",
           "summary_table"]
