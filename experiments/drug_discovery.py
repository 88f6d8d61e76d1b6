"""Drug discovery across pharma partners: Tox21, 12 toxicity assays, missing labels.

    python experiments/drug_discovery.py                       # defaults below, ~95 s on 2 cores
    python experiments/drug_discovery.py --seeds 0 --out /tmp/dd
    python experiments/drug_discovery.py --smoke               # seconds, for tests

Needs RDKit the first time (`pip install 'fedjax_med[chem]'`) to compute the
Morgan fingerprints (radius 2, 2048 bits); they are cached on disk after that.

Data: `fedjax_med.data.tox21.tox21`, 8 partners made from Bemis-Murcko scaffold
groups (no ring scaffold crosses partners; acyclic and benzene molecules
spread at random over partners, common_scaffolds="spread", partition seed 0),
scaffold-disjoint train/test split inside each partner. Labels carry their
mask (y [K, N_max, 12, 2]); the loss is the masked multi-task BCE
(`fedjax_med.losses.multitask.masked_multitask_bce`), missing labels count 0.

Model: multi-task MLP 2048 -> 128 (ReLU) -> 12 logits (`fm.models.MLP`).
Every strategy uses plain SGD at the same step size and batch size and the
same amount of local work (one federated round = one local epoch; local and
pooled training run as many epochs as FedAvg has rounds), from the same
initial model within a seed:

  fedavg    FedAvg, n_k weighting
  fedprox   FedProx, mu = 0.01
  scaffold  SCAFFOLD (option II control variates), same client lr
  local     each partner trains alone, scored on its own test split
  pooled    one model on all partners' training molecules
  fedavg_finetune  FedAvg, then `finetune_steps` local SGD steps per partner
            (personalised; each partner scored with its own model)
  fedper    FedPer: shared hidden layer, personal output layer (personalised)

Metric: ROC-AUC per assay on each partner's test split (observed labels
only), mean over the 12 assays ("auc"), then the unweighted mean over
partners (site "mean"); "pooled" = per-assay AUC over all partners' test
molecules together, mean over assays. Seeds run as one compiled call
(`fm.run_seeds`). Outputs in --out: results.json (tidy records), table.md,
drug_discovery.png (bar plot, mean +- std over seeds).
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
from fedjax_med import evaluation_tasks
from fedjax_med.data.tox21 import ASSAYS, tox21
from fedjax_med.losses.multitask import masked_multitask_bce

DATASET = "tox21"
ORDER = ("pooled", "local", "fedavg", "fedprox", "scaffold", "fedavg_finetune", "fedper")
PERSONALISED = ("fedavg_finetune", "fedper")


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters (chosen once on seed 0, not tuned per strategy)."""
  seeds: tuple[int, ...] = (0, 1, 2)
  num_partners: int = 8          # K = tox21's num_sites; name kept: table.md's header records it
  split: str = "scaffold"
  common_scaffolds: str = "spread"
  partition_seed: int = 0
  hidden: tuple[int, ...] = (128,)
  batch_size: int = 64
  learning_rate: float = 1.0     # client SGD (all strategies)
  rounds: int = 30               # federated rounds x 1 local epoch; local/pooled epochs
  fedprox_mu: float = 0.01
  finetune_steps: int = 20       # fedavg_finetune: local SGD steps after training

  @classmethod
  def smoke(cls) -> "Config":
    return cls(seeds=(0,), num_partners=4, hidden=(16,), rounds=2, finetune_steps=2)


def strategies(config: Config, loss_fn):
  """name -> (algorithm, needs num_sites at init)."""
  sgd = optax.sgd(config.learning_rate)
  common = dict(local_epochs=1, batch_size=config.batch_size)
  return {
      "fedavg": (fm.algorithms.fedavg(loss_fn, client_optimizer=sgd, **common), False),
      "fedprox": (fm.algorithms.fedprox(loss_fn, mu=config.fedprox_mu, client_optimizer=sgd,
                                        **common), False),
      "scaffold": (fm.algorithms.scaffold(loss_fn, client_learning_rate=config.learning_rate,
                                          **common), True),
      "fedavg_finetune": (fm.algorithms.fedavg_finetune(
          loss_fn, finetune_steps=config.finetune_steps, client_optimizer=sgd, **common),
          False),
      "fedper": (fm.algorithms.fedper(loss_fn, personal=("output",), client_optimizer=sgd,
                                      **common), True),
  }


def _unstack(tree, i):
  return jax.tree_util.tree_map(lambda a: a[i], tree)


def run(config: Config, progress: bool = True) -> tuple[list[dict], dict]:
  """Trains every strategy for every seed; returns (records, timings in s)."""
  start = time.perf_counter()
  train, test = tox21(num_sites=config.num_partners, split=config.split,
                      common_scaffolds=config.common_scaffolds, seed=config.partition_seed,
                      verbose=progress)
  timings = {"load": time.perf_counter() - start}
  k = train.num_sites
  model = fm.models.MLP(hidden=config.hidden, num_outputs=len(ASSAYS))
  loss_fn = masked_multitask_bce(model.apply)
  seeds = list(config.seeds)
  run_keys = np.stack([jax.random.PRNGKey(s) for s in seeds])
  init_params = [model.init(jax.random.PRNGKey(10_000 + s), train.x[0, :1]) for s in seeds]
  records: list[dict] = []

  def add(strategy, seed, params, per_site=False):
    report = evaluation_tasks.multitask_report(model.apply, params, test, per_site, ASSAYS)
    records.extend(fm.report.records_from_report(DATASET, strategy, seed, "test", report))

  def timed(name, t0):
    timings[name] = time.perf_counter() - t0
    if progress:
      print(f"  {name}: {timings[name]:.1f} s", flush=True)

  baseline = fm.algorithms.local_only(loss_fn, optimizer=optax.sgd(config.learning_rate),
                                      local_epochs=1, batch_size=config.batch_size)
  t0 = time.perf_counter()
  states, _ = fm.run_seeds(baseline, fm.stack_states([baseline.init(p, 1) for p in init_params]),
                           train.pooled(), config.rounds, run_keys)
  for i, seed in enumerate(seeds):
    add("pooled", seed, _unstack(_unstack(states.client_states["params"], i), 0))
  timed("pooled", t0)
  t0 = time.perf_counter()
  states, _ = fm.run_seeds(baseline, fm.stack_states([baseline.init(p, k) for p in init_params]),
                           train, config.rounds, run_keys)
  for i, seed in enumerate(seeds):
    add("local", seed, _unstack(states.client_states["params"], i), per_site=True)
  timed("local", t0)
  for name, (algo, needs_k) in strategies(config, loss_fn).items():
    t0 = time.perf_counter()
    init = [algo.init(p, k) if needs_k else algo.init(p) for p in init_params]
    states, _ = fm.run_seeds(algo, fm.stack_states(init), train, config.rounds, run_keys)
    for i, seed in enumerate(seeds):
      if name in PERSONALISED:
        state = _unstack(states, i)
        models = algo.personalize(state, train, jax.random.fold_in(run_keys[i], config.rounds))
        add(name, seed, models, per_site=True)
      else:
        add(name, seed, _unstack(states.params, i))
    timed(name, t0)
  return records, timings


def tables(records: list[dict], site_names) -> str:
  strategies_ = [s for s in ORDER if any(r["strategy"] == s for r in records)]
  main = fm.report.summary_table(records, "auc", "test", ["mean", "pooled"] + list(site_names),
                                 strategies_)
  # Per assay: the partner-mean AUC of each assay, assays as columns.
  per_assay = [dict(r, site=r["metric"].split("/", 1)[1], metric="auc (partner mean)")
               for r in records if r["site"] == "mean" and r["metric"].startswith("auc/")]
  assays = fm.report.summary_table(per_assay, "auc (partner mean)", "test", list(ASSAYS),
                                   strategies_, digits=2)
  return main + "\n\nPer assay (mean over partners):\n\n" + assays


def bar_plot(records: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = [s for s in ORDER if any(r["strategy"] == s for r in records)]
  fig, ax = plt.subplots(figsize=(7, 3.5))
  width = 0.38
  for j, site in enumerate(("mean", "pooled")):
    vals = [np.array([r["value"] for r in records if r["strategy"] == n and r["site"] == site
                      and r["metric"] == "auc" and r["value"] is not None]) for n in names]
    means = [v.mean() for v in vals]
    stds = [v.std(ddof=1) if v.size > 1 else 0.0 for v in vals]
    ax.bar(np.arange(len(names)) + (j - 0.5) * width, means, width, yerr=stds, capsize=3,
           label="partner mean" if site == "mean" else "pooled test")
  ax.set_xticks(range(len(names)), names)
  ax.set_ylabel("ROC-AUC (mean over 12 assays)")
  ax.set_ylim(0.5, 0.85)
  ax.set_title("Tox21 across pharma partners (mean ± std over seeds)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seeds", type=str, help="comma-separated seeds (default 0,1,2)")
  parser.add_argument("--rounds", type=int, help="federated rounds / baseline epochs (30)")
  parser.add_argument("--smoke", action="store_true", help="tiny run for tests")
  parser.add_argument("--out", type=str, default="results/drug_discovery")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  config = Config.smoke() if args.smoke else Config()
  config = fm.training.loop.with_overrides(config, seeds=args.seeds, rounds=args.rounds)
  start = time.perf_counter()
  records, timings = run(config, progress=not args.no_progress)
  elapsed = time.perf_counter() - start
  os.makedirs(args.out, exist_ok=True)
  fm.report.save_records(records, args.out)
  bar_plot(records, os.path.join(args.out, "drug_discovery.png"))
  site_names = [s for s in dict.fromkeys(r["site"] for r in records)
                if s not in ("mean", "pooled")]
  header = (f"Tox21 across {config.num_partners} pharma partners, test ROC-AUC (mean over"
            f" 12 assays), mean ± std over seeds {list(config.seeds)}; 'mean' = unweighted"
            f" mean over partners, 'pooled' = all partners' test molecules.\n"
            f"{json.dumps(dataclasses.asdict(config))}\n"
            f"Run time {elapsed:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}),"
            f" jax {jax.__version__} on {jax.default_backend()}.\n")
  text = header + "\n" + tables(records, site_names)
  fm.training.loop.write_table(args.out, text + "\n")
  print(text)
  print(f"\nwrote {os.path.join(args.out, 'results.json')} ({len(records)} records)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
