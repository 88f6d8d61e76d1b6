"""BreastMNIST tumour classification over simulated hospitals: FedAvg, FedProx, SCAFFOLD, local, pooled.

BreastMNIST (MedMNIST v2; breast ultrasound, 28 x 28; y = 1 malignant, 0
normal/benign) split over K simulated hospitals by Dirichlet(alpha) label
skew (`fm.datasets.breastmnist`; the official test split is divided so each
site's test set follows its own train label mix). Model: `CNN` (two 3 x 3
conv layers 8/16 + dense 32, 26k parameters), BCE on one logit.

    python experiments/breastmnist.py                       # defaults below
    python experiments/breastmnist.py --seeds 0,1 --rounds 20 --out /tmp/bm
    python experiments/breastmnist.py --smoke               # seconds, for tests

Strategies (within a seed every one starts from the same initial model, and
all use plain SGD with the same learning rate and batch size, and the same
number of passes over the data: rounds x local_epochs):
  fedavg    client SGD, local_epochs per round, n_k/n weighting
  fedprox   the same with the proximal term mu/2 ||w - w_global||^2
  scaffold  SCAFFOLD option II control variates, same client SGD
  local     each site trains alone; each site scored with its own model
  pooled    one model on all training images pooled (centralised)
The seeds of each strategy run as one compiled call (`fm.run_seeds`); the
partition is fixed (--partition-seed), the seeds change the initial model
and the data order.

Outputs in --out: results.json (tidy records: dataset, strategy, seed, site,
split, metric, value; site "mean" = unweighted mean over the sites where
the metric is defined, "pooled" = all test images, i.e. the official
MedMNIST test set), table.md (the printed tables) and history.json (train
loss per round).
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
from fedjax_med.data.breastmnist import breastmnist
from fedjax_med.models.cnn import CNN

DATASET = "breastmnist"
ORDER = ("fedavg", "fedprox", "scaffold", "local", "pooled")


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters (chosen for a few minutes on 2 CPU cores; unchanged on GPU)."""
  seeds: tuple[int, ...] = (0, 1, 2)
  num_sites: int = 5
  alpha: float = 0.5                  # Dirichlet label skew
  partition_seed: int = 0             # one fixed split for every training seed
  min_size: int = 10                  # training images per site at least
  rounds: int = 30
  local_epochs: int = 1
  batch_size: int = 16
  client_lr: float = 0.1              # SGD, every strategy
  fedprox_mu: float = 0.1
  features: tuple[int, ...] = (8, 16)
  hidden: int = 32

  @property
  def baseline_epochs(self) -> int:
    """Local and pooled training: as many passes as the federated runs make."""
    return self.rounds * self.local_epochs

  @classmethod
  def smoke(cls) -> "Config":
    return cls(seeds=(0, 1), rounds=2, features=(4,), hidden=8)


def _records(strategy, seed, report, split):
  return fm.report.records_from_report(DATASET, strategy, seed, split, report)


def run(config: Config, out_dir: str, progress: bool = True) -> list[dict]:
  train, test = breastmnist(config.num_sites, "dirichlet", config.alpha,
                            config.partition_seed, min_size=config.min_size)
  model = CNN(features=config.features, hidden=config.hidden)
  loss_fn = fm.losses.sigmoid_binary_cross_entropy(model.apply)
  k = train.num_sites
  seeds = list(config.seeds)
  run_keys = np.stack([jax.random.PRNGKey(s) for s in seeds])
  init = jax.jit(model.init)
  init_params = [init(jax.random.fold_in(jax.random.PRNGKey(s), 10_000), train.x[0, :1])
                 for s in seeds]
  schedule = dict(local_epochs=config.local_epochs, batch_size=config.batch_size)
  sgd = optax.sgd(config.client_lr)
  federated = {
      "fedavg": (fm.algorithms.fedavg(loss_fn, client_optimizer=sgd, **schedule), False),
      "fedprox": (fm.algorithms.fedprox(loss_fn, mu=config.fedprox_mu,
                                        client_optimizer=sgd, **schedule), False),
      "scaffold": (fm.algorithms.scaffold(loss_fn, client_learning_rate=config.client_lr,
                                          **schedule), True),
  }
  baseline = fm.algorithms.local_only(loss_fn, optimizer=sgd, local_epochs=1,
                                      batch_size=config.batch_size)
  splits = {"train": train, "test": test}
  records: list[dict] = []
  history: dict[str, dict[str, list[float]]] = {}

  def log(name, start):
    if progress:
      print(f"  {name}: {time.perf_counter() - start:.1f} s", flush=True)

  for name, (algo, needs_k) in federated.items():
    start = time.perf_counter()
    states = fm.stack_states([algo.init(p, k) if needs_k else algo.init(p)
                              for p in init_params])
    states, hist = fm.run_seeds(algo, states, train, config.rounds, run_keys)
    for i, seed in enumerate(seeds):
      params = fm.evaluation.unstack(states.params, i)
      for split, data in splits.items():
        records += _records(name, seed, fm.evaluation.binary_report(
            model.apply, params, data), split)
      history.setdefault(name, {})[str(seed)] = np.asarray(hist["train_loss"][i]).tolist()
    log(name, start)

  # Local: every site alone, scored with its own model on its own test set.
  start = time.perf_counter()
  states = fm.stack_states([baseline.init(p, k) for p in init_params])
  states, hist = fm.run_seeds(baseline, states, train, config.baseline_epochs, run_keys)
  for i, seed in enumerate(seeds):
    site_models = fm.evaluation.unstack(states.client_states["params"], i)
    for split, data in splits.items():
      records += _records("local", seed, fm.evaluation.binary_report(
          model.apply, site_models, data, per_site_params=True), split)
    history.setdefault("local", {})[str(seed)] = np.asarray(
        hist["client_train_loss"][i]).mean(axis=1).tolist()
  log("local", start)

  # Pooled: one model on all training images (K = 1), scored on every site.
  start = time.perf_counter()
  pooled_train = train.pooled()
  states = fm.stack_states([baseline.init(p, 1) for p in init_params])
  states, hist = fm.run_seeds(baseline, states, pooled_train, config.baseline_epochs,
                              run_keys)
  for i, seed in enumerate(seeds):
    params = fm.evaluation.unstack(fm.evaluation.unstack(states.client_states["params"], i),
                                   0)
    for split, data in splits.items():
      records += _records("pooled", seed, fm.evaluation.binary_report(
          model.apply, params, data), split)
    history.setdefault("pooled", {})[str(seed)] = np.asarray(
        hist["client_train_loss"][i][:, 0]).tolist()
  log("pooled", start)

  os.makedirs(out_dir, exist_ok=True)
  fm.report.save_records(records, out_dir)
  with open(os.path.join(out_dir, "history.json"), "w") as f:
    json.dump(history, f)
  return records


def tables(records: list[dict], site_names) -> str:
  sites = ["mean", "pooled"] + list(site_names)
  strategies = [s for s in ORDER if any(r["strategy"] == s for r in records)]
  return "\n\n".join(fm.report.summary_table(records, metric, "test", sites, strategies)
                     for metric in ("accuracy", "auc"))


def site_summary(train, test) -> str:
  """Train/test images and malignant share per site (the split being compared)."""
  lines = ["| site | train n | train malignant | test n | test malignant |",
           "|---|---|---|---|---|"]
  for name, (_, y_tr), (_, y_te) in zip(train.names, train.sites(), test.sites()):
    lines.append(f"| {name} | {y_tr.size} | {y_tr.mean():.2f} | {y_te.size} |"
                 f" {y_te.mean() if y_te.size else float('nan'):.2f} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, help="federated rounds (default 30)")
  parser.add_argument("--seeds", type=str, help="comma-separated seeds (default 0,1,2)")
  parser.add_argument("--alpha", type=float, help="Dirichlet concentration (default 0.5)")
  parser.add_argument("--num-sites", type=int, help="simulated hospitals (default 5)")
  parser.add_argument("--partition-seed", type=int, help="seed of the split (default 0)")
  parser.add_argument("--smoke", action="store_true", help="tiny run for tests")
  parser.add_argument("--out", type=str, default="results/breastmnist",
                      help="output directory")
  parser.add_argument("--no-progress", action="store_true", help="print no timings")
  args = parser.parse_args(argv)

  config = Config.smoke() if args.smoke else Config()
  config = fm.training.loop.with_overrides(
      config, rounds=args.rounds, alpha=args.alpha, num_sites=args.num_sites,
      partition_seed=args.partition_seed, seeds=args.seeds)
  start = time.perf_counter()
  records = run(config, args.out, progress=not args.no_progress)
  elapsed = time.perf_counter() - start
  train, test = breastmnist(config.num_sites, "dirichlet", config.alpha,
                            config.partition_seed, min_size=config.min_size)
  text = tables(records, train.names)
  header = (f"BreastMNIST (malignant = 1), {config.num_sites} simulated hospitals,"
            f" Dirichlet alpha={config.alpha} (partition seed {config.partition_seed});"
            f" test set, mean ± std over seeds {list(config.seeds)}; site 'mean' ="
            f" unweighted mean over sites (AUC over sites with both classes), 'pooled' ="
            f" all {int(np.sum(test.num_examples))} test images.\n"
            f"{json.dumps(dataclasses.asdict(config))}\n"
            f"{elapsed:.0f} s, jax {jax.__version__} on {jax.default_backend()}\n")
  fm.training.loop.write_table(
      args.out, header + "\n" + site_summary(train, test) + "\n\n" + text + "\n")
  print(header)
  print(site_summary(train, test) + "\n")
  print(text)
  print(f"\nwrote {os.path.join(args.out, 'results.json')} ({len(records)} records)"
        f" in {elapsed:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
