"""Remote monitoring: Parkinson's telemonitoring across 42 patients' home devices.

    python experiments/telemonitoring.py                     # defaults below, ~3 min on 2 cores
    python experiments/telemonitoring.py --target motor_UPDRS --seeds 0
    python experiments/telemonitoring.py --smoke             # seconds, for tests

Data: `fedjax_med.data.telemonitoring.parkinsons_telemonitoring`, one client per
patient (K = 42), time split per patient (earliest whole days holding >= 70%
of the recordings train, later days test; 4235 / 1640 rows), the 16 voice
measures standardised with each device's own training statistics. Target:
motor_UPDRS and total_UPDRS (UPDRS points), two separate runs.

Model: regression MLP 16 -> 32 (ReLU) -> 1 (`fm.models.MLP`), squared error.
Every trained strategy uses Adam (lr 1e-2, batch 16) and 100 passes over
each client's data (one round = one local epoch; Adam is re-initialised each
round on the clients of federated methods and persists in local/pooled
training), from the same initial model within a seed:

  global_mean       floor: predict the global training mean (no model)
  patient_mean      floor: predict each patient's own training mean
  local             each device trains alone on its patient
  pooled            one model on all training rows pooled
  fedavg            FedAvg, n_k weighting
  fedavg_avail80    FedAvg where each device is online in a round with
                    probability 0.8 (`with_availability`, seeded)
  fedavg_finetune   FedAvg, then 50 local Adam steps per device
  fedper            FedPer, shared hidden layer, personal output layer
  ditto             Ditto, lambda = 0.1

The floors are constant models scored by the same evaluation code
(`fedjax_med.training.evaluation_tasks.regression_report`). Metric: MAE and RMSE on
each patient's test days, their unweighted mean over patients (site "mean")
and over all test rows ("pooled"; SOURCE.md's floor figures are of this
kind), and per seed the share of patients on whom a strategy has a lower MAE
than the patient's local model ("beats_local") and than the patient's own
training mean ("beats_patient_mean"). Outputs in --out: results.json (tidy
records), table.md, telemonitoring_<target>.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np
import optax

import fedjax_med as fm
from fedjax_med import evaluation_tasks as et
from fedjax_med.algorithms.availability import with_availability
from fedjax_med.data.telemonitoring import TARGETS, parkinsons_telemonitoring

ORDER = ("global_mean", "patient_mean", "local", "pooled", "fedavg", "fedavg_avail80",
         "fedavg_finetune", "fedper", "ditto")
PERSONALISED = ("fedavg_finetune", "fedper", "ditto")


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters (one setting for every strategy, not tuned per strategy)."""
  seeds: tuple[int, ...] = (0, 1, 2)
  targets: tuple[str, ...] = TARGETS
  hidden: tuple[int, ...] = (32,)
  batch_size: int = 16
  learning_rate: float = 1e-2      # Adam, every strategy
  rounds: int = 100                # rounds x 1 local epoch; local/pooled epochs
  finetune_steps: int = 50
  ditto_lam: float = 0.1
  availability: float = 0.8

  @classmethod
  def smoke(cls) -> "Config":
    return cls(seeds=(0,), targets=("motor_UPDRS",), hidden=(8,), rounds=2,
               finetune_steps=2)


def dataset_name(target: str) -> str:
  return f"telemonitoring_{target}"


def strategies(config: Config, loss_fn):
  """name -> (algorithm, needs num_sites at init)."""
  adam = optax.adam(config.learning_rate)
  common = dict(client_optimizer=adam, local_epochs=1, batch_size=config.batch_size)
  fedavg = fm.algorithms.fedavg(loss_fn, **common)
  return {
      "fedavg": (fedavg, False),
      "fedavg_avail80": (with_availability(fedavg, config.availability), False),
      "fedavg_finetune": (fm.algorithms.fedavg_finetune(
          loss_fn, finetune_steps=config.finetune_steps, **common), False),
      "fedper": (fm.algorithms.fedper(loss_fn, personal=("output",), **common), True),
      "ditto": (fm.algorithms.ditto(loss_fn, lam=config.ditto_lam, **common), True),
  }


def _unstack(tree, i):
  return jax.tree_util.tree_map(lambda a: a[i], tree)


def run_target(config: Config, target: str, model, algos, baseline,
               progress: bool = True) -> tuple[list[dict], dict]:
  train, test = parkinsons_telemonitoring(target, "time")
  dataset = dataset_name(target)
  k = train.num_sites
  seeds = list(config.seeds)
  run_keys = np.stack([jax.random.PRNGKey(s) for s in seeds])
  init_params = [model.init(jax.random.PRNGKey(10_000 + s), train.x[0, :1]) for s in seeds]
  reports: dict[str, list[dict]] = {}
  timings: dict[str, float] = {}

  def timed(name, t0):
    timings[name] = time.perf_counter() - t0
    if progress:
      print(f"  {target} {name}: {timings[name]:.1f} s", flush=True)

  # The two floors, scored by the same code as every model.
  global_params, patient_params = et.mean_predictors(train)
  floor_global = et.regression_report(et.constant_apply, global_params, test)
  floor_patient = et.regression_report(et.constant_apply, patient_params, test, True)
  reports["global_mean"] = [floor_global] * len(seeds)
  reports["patient_mean"] = [floor_patient] * len(seeds)

  t0 = time.perf_counter()
  states, _ = fm.run_seeds(baseline, fm.stack_states([baseline.init(p, k) for p in init_params]),
                           train, config.rounds, run_keys)
  reports["local"] = [et.regression_report(model.apply,
                                           _unstack(states.client_states["params"], i),
                                           test, True) for i in range(len(seeds))]
  timed("local", t0)
  t0 = time.perf_counter()
  states, _ = fm.run_seeds(baseline, fm.stack_states([baseline.init(p, 1) for p in init_params]),
                           train.pooled(), config.rounds, run_keys)
  reports["pooled"] = [et.regression_report(
      model.apply, _unstack(_unstack(states.client_states["params"], i), 0), test)
      for i in range(len(seeds))]
  timed("pooled", t0)
  for name, (algo, needs_k) in algos.items():
    t0 = time.perf_counter()
    init = [algo.init(p, k) if needs_k else algo.init(p) for p in init_params]
    states, _ = fm.run_seeds(algo, fm.stack_states(init), train, config.rounds, run_keys)
    reports[name] = []
    for i in range(len(seeds)):
      state = _unstack(states, i)
      if name in PERSONALISED:
        models = algo.personalize(state, train, jax.random.fold_in(run_keys[i], config.rounds))
        reports[name].append(et.regression_report(model.apply, models, test, True))
      else:
        reports[name].append(et.regression_report(model.apply, state.params, test))
    timed(name, t0)

  records: list[dict] = []
  sites = list(test.names)
  for name, per_seed in reports.items():
    for seed, report, local, floor in zip(seeds, per_seed, reports["local"],
                                          [floor_patient] * len(seeds)):
      records += fm.report.records_from_report(dataset, name, seed, "test", report)
      for metric, reference in (("beats_local", local), ("beats_patient_mean", floor)):
        records.append({"dataset": dataset, "strategy": name, "seed": int(seed),
                        "site": "mean", "split": "test", "metric": metric,
                        "value": et.share_beating(report, reference, "mae", sites)})
  return records, timings


def summary(records: list[dict], dataset: str) -> str:
  """strategy x (MAE mean/pooled, RMSE mean/pooled, beats local, beats patient mean)."""
  columns = (("MAE mean", "mae", "mean"), ("MAE pooled", "mae", "pooled"),
             ("RMSE mean", "rmse", "mean"), ("RMSE pooled", "rmse", "pooled"),
             ("beats local", "beats_local", "mean"),
             ("beats patient mean", "beats_patient_mean", "mean"))
  rows = []
  for r in records:
    if r["dataset"] != dataset:
      continue
    for title, metric, site in columns:
      if r["metric"] == metric and r["site"] == site:
        rows.append(dict(r, site=title, metric="value"))
  strategies_ = [s for s in ORDER if any(r["strategy"] == s for r in rows)]
  return fm.report.summary_table(rows, "value", "test", [c[0] for c in columns], strategies_,
                                 digits=2)


def bar_plot(records: list[dict], dataset: str, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rs = [r for r in records if r["dataset"] == dataset and r["site"] == "mean"
        and r["metric"] == "mae"]
  names = [s for s in ORDER if any(r["strategy"] == s for r in rs)]
  vals = [np.array([r["value"] for r in rs if r["strategy"] == n]) for n in names]
  fig, ax = plt.subplots(figsize=(8, 3.5))
  colors = ["tab:gray" if n.endswith("_mean") else "tab:olive" if n in ("local", "pooled")
            else "tab:blue" for n in names]
  ax.bar(range(len(names)), [v.mean() for v in vals],
         yerr=[v.std(ddof=1) if v.size > 1 else 0.0 for v in vals], capsize=3, color=colors)
  ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
  ax.set_ylabel("test MAE, mean over patients")
  ax.set_title(f"{dataset} (mean ± std over seeds; lower is better)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(config: Config, progress: bool = True) -> tuple[list[dict], dict]:
  model = fm.models.MLP(hidden=config.hidden, num_outputs=1)
  loss_fn = fm.losses.mean_squared_error(model.apply)
  algos = strategies(config, loss_fn)   # built once: both targets share compiled rounds
  baseline = fm.algorithms.local_only(loss_fn, optimizer=optax.adam(config.learning_rate),
                                      local_epochs=1, batch_size=config.batch_size)
  records, timings = [], {}
  for target in config.targets:
    t0 = time.perf_counter()
    r, t = run_target(config, target, model, algos, baseline, progress)
    records += r
    timings[target] = time.perf_counter() - t0
    timings.update({f"{target}/{k}": v for k, v in t.items()})
  return records, timings


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seeds", type=str, help="comma-separated seeds (default 0,1,2)")
  parser.add_argument("--target", type=str, help="motor_UPDRS, total_UPDRS or both (default)")
  parser.add_argument("--rounds", type=int, help="rounds / epochs (default 100)")
  parser.add_argument("--smoke", action="store_true", help="tiny run for tests")
  parser.add_argument("--out", type=str, default="results/telemonitoring")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  config = Config.smoke() if args.smoke else Config()
  config = fm.training.loop.with_overrides(config, seeds=args.seeds, rounds=args.rounds)
  if args.target:
    targets = tuple(t.strip() for t in args.target.split(",") if t.strip())
    for t in targets:
      if t not in TARGETS:
        parser.error(f"unknown target {t!r}; choose from {TARGETS}")
    config = dataclasses.replace(config, targets=targets)
  start = time.perf_counter()
  records, timings = run(config, progress=not args.no_progress)
  elapsed = time.perf_counter() - start
  os.makedirs(args.out, exist_ok=True)
  fm.report.save_records(records, args.out)
  texts = [f"Parkinson's telemonitoring, 42 patients, time split; test MAE / RMSE in UPDRS"
           f" points, mean ± std over seeds {list(config.seeds)}; 'mean' = unweighted mean"
           f" over patients, 'pooled' = all test rows; 'beats ...' = share of patients with"
           f" a lower MAE than their local model / their own training mean.\n"
           f"{json.dumps(dataclasses.asdict(config))}\n"
           f"Run time {elapsed:.0f} s ({', '.join(f'{t} {timings[t]:.0f} s' for t in config.targets)}),"
           f" jax {jax.__version__} on {jax.default_backend()}."]
  for target in config.targets:
    texts.append(f"## {target}\n\n" + summary(records, dataset_name(target)))
    bar_plot(records, dataset_name(target), os.path.join(args.out, f"telemonitoring_{target}.png"))
  text = "\n\n".join(texts)
  fm.training.loop.write_table(args.out, text + "\n")
  print(text)
  print(f"\nwrote {os.path.join(args.out, 'results.json')} ({len(records)} records)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
