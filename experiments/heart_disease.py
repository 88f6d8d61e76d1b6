"""FedSGD and FedAvg against local-only and pooled training on four hospitals.

Fed-Heart-Disease (FLamby): Cleveland, Hungary, Switzerland, Long Beach VA;
FLamby's baseline model (logistic regression 13 -> 1, BCE) with batch 4.

    python experiments/heart_disease.py                      # defaults below
    python experiments/heart_disease.py --rounds 30 --seeds 0,1,2 --out /tmp/hd
    python experiments/heart_disease.py --smoke              # seconds, for tests

Two standardisations of the 13 features (`standardisations()`):
  global  the mean and std (ddof = 1) of all train rows, computed by the
          federation from per-site sums (`fm.datasets.federated_standardize`);
          identical to pooled standardisation.
  site    each site its own train statistics (FLamby's protocol for federated
          and local runs).

Strategies (every one trained from the same initial model within a seed):
  fedsgd_global, fedsgd_site    full-batch gradient per site, n_k-weighted,
                                server SGD
  fedavg_global, fedavg_site    client SGD, 1 local epoch per round, n_k/n weighting
  fedavg_uniform_site           same, plain (unweighted) average of client models
  local           each site trains alone (Adam, FLamby's Local i protocol, site
                  standardisation); every site scored with its own model
  local_i         site i's local model scored on every site's test set
  pooled          one model on all train rows pooled (Adam, FLamby's Pooled
                  protocol), on the global standardisation: the same inputs as
                  the *_global runs

Comparisons: fed*_global vs pooled is the cost of federation (same inputs);
fed*_site vs fed*_global is the preprocessing effect (per-site vs global
standardisation); local vs pooled is the value of pooling data at all.

Outputs in --out: results.json (tidy records: dataset, strategy, seed, site,
split, metric, value; site "mean" = unweighted mean over sites, "pooled" = all
test rows), table.md (the printed tables) and history.json (train loss per
round, as `fm.report` history records); --plots adds report.md and figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import optax

import fedjax_med as fm

DATASET = "heart_disease"


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters; FLamby's values where FLamby fixes them."""
  seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
  batch_size: int = 4                 # FLamby BATCH_SIZE
  rounds: int = 50                    # FedAvg rounds (1 local epoch each)
  fedavg_client_lr: float = 0.05      # client SGD
  fedsgd_rounds: int = 200            # one full-batch gradient step per round
  fedsgd_server_lr: float = 1.0       # server SGD on the n_k-weighted gradient
  baseline_lr: float = 1e-3           # Adam, FLamby LR for Local i and Pooled
  baseline_epochs: int = 50           # FLamby NUM_EPOCHS_POOLED

  @classmethod
  def smoke(cls) -> "Config":
    return cls(seeds=(0,), rounds=3, fedsgd_rounds=3, baseline_epochs=2)


def _evaluate(records, apply_fn, strategy, seed, params, splits, per_site_params=False):
  reports = {}
  for split, data in splits.items():
    report = fm.evaluation.binary_report(apply_fn, params, data, per_site_params)
    records += fm.report.records_from_report(DATASET, strategy, seed, split, report)
    reports[split] = report
  return reports


def standardisations() -> dict[str, tuple[fm.FederatedData, fm.FederatedData]]:
  """{"global": (train, test), "site": (train, test)}, see the module docstring."""
  return {"global": fm.datasets.heart_disease(standardize="federated"),
          "site": fm.datasets.heart_disease(standardize="site")}


def run(config: Config, out_dir: str, progress: bool = True) -> list[dict]:
  data = standardisations()
  train = data["site"][0]
  pooled_train_one_site = data["global"][0].pooled()
  model = fm.models.LogisticRegression()
  loss_fn = fm.losses.sigmoid_binary_cross_entropy(model.apply)
  num_sites = train.num_sites

  fedsgd = (fm.algorithms.fedsgd(loss_fn, server_optimizer=optax.sgd(config.fedsgd_server_lr)),
            config.fedsgd_rounds)
  fedavg = (fm.algorithms.fedavg(
      loss_fn, client_optimizer=optax.sgd(config.fedavg_client_lr), local_epochs=1,
      batch_size=config.batch_size, weighting="num_examples"), config.rounds)
  fedavg_uniform = (fm.algorithms.fedavg(
      loss_fn, client_optimizer=optax.sgd(config.fedavg_client_lr), local_epochs=1,
      batch_size=config.batch_size, weighting="uniform"), config.rounds)
  # strategy -> (algorithm, rounds, standardisation)
  algorithms = {
      "fedsgd_global": fedsgd + ("global",),
      "fedavg_global": fedavg + ("global",),
      "fedsgd_site": fedsgd + ("site",),
      "fedavg_site": fedavg + ("site",),
      "fedavg_uniform_site": fedavg_uniform + ("site",),
  }
  baseline = fm.algorithms.local_only(
      loss_fn, optimizer=optax.adam(config.baseline_lr), local_epochs=1,
      batch_size=config.batch_size)

  records: list[dict] = []
  history: list[dict] = []
  splits = {name: {"train": tr, "test": te} for name, (tr, te) in data.items()}
  for seed in config.seeds:
    run_key = jax.random.PRNGKey(seed)
    init_key, train_key = jax.random.split(run_key)
    params0 = model.init(init_key, train.x[0, :1])
    for strategy, (algo, rounds, standardisation) in algorithms.items():
      state, hist = fm.run_rounds(algo, algo.init(params0), data[standardisation][0], rounds,
                                  train_key, progress=progress, desc=f"seed {seed} {strategy}")
      history += fm.report.history_records(DATASET, strategy, seed,
                                           {"train_loss": hist["train_loss"]})
      _evaluate(records, model.apply, strategy, seed, state.params, splits[standardisation])

    # Local i: each site alone; "local" scores every site with its own model.
    state, hist = fm.run_rounds(baseline, baseline.init(params0, num_sites), train,
                                config.baseline_epochs, train_key, progress=progress,
                                desc=f"seed {seed} local")
    history += fm.report.history_records(
        DATASET, "local", seed, {"train_loss": hist["client_train_loss"].mean(axis=1)})
    site_models = state.client_states["params"]
    _evaluate(records, model.apply, "local", seed, site_models, splits["site"],
              per_site_params=True)
    for i in range(num_sites):
      _evaluate(records, model.apply, f"local_{i}", seed,
                fm.evaluation.unstack(site_models, i), splits["site"])

    # Pooled: all train rows as one site, global (= pooled) standardisation.
    state, hist = fm.run_rounds(baseline, baseline.init(params0, 1),
                                pooled_train_one_site, config.baseline_epochs, train_key,
                                progress=progress, desc=f"seed {seed} pooled")
    history += fm.report.history_records(DATASET, "pooled", seed,
                                         {"train_loss": hist["client_train_loss"][:, 0]})
    _evaluate(records, model.apply, "pooled", seed,
              fm.evaluation.unstack(state.client_states["params"], 0), splits["global"])

  os.makedirs(out_dir, exist_ok=True)
  fm.report.save_records(records, out_dir)
  fm.report.save_history(history, out_dir)
  return records


def tables(records: list[dict], site_names) -> str:
  sites = list(site_names) + ["mean", "pooled"]
  order = ["pooled", "fedsgd_global", "fedavg_global", "fedsgd_site", "fedavg_site",
           "fedavg_uniform_site", "local"] + [
      f"local_{i}" for i in range(len(site_names))]
  return "\n\n".join(fm.report.summary_table(records, metric, "test", sites, order)
                     for metric in ("accuracy", "auc"))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, help="FedAvg rounds (default 50)")
  parser.add_argument("--seeds", type=str, help="comma-separated seeds (default 0,1,2,3,4)")
  parser.add_argument("--smoke", action="store_true", help="tiny run for tests")
  parser.add_argument("--out", type=str, default="results/heart_disease",
                      help="output directory")
  parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
  parser.add_argument("--plots", action="store_true",
                      help="also write report.md and figures (fm.report.write_report)")
  args = parser.parse_args(argv)

  config = Config.smoke() if args.smoke else Config()
  config = fm.training.loop.with_overrides(config, rounds=args.rounds, seeds=args.seeds)
  start = time.perf_counter()
  records = run(config, args.out, progress=not args.no_progress)
  elapsed = time.perf_counter() - start
  site_names = fm.datasets.heart_disease()[0].names
  text = tables(records, site_names)
  header = (f"Fed-Heart-Disease, test set, mean ± std over seeds {list(config.seeds)};"
            f" site 'mean' = unweighted mean over the 4 sites, 'pooled' = all test rows.\n"
            f"_global: global standardisation from per-site sums (= pooled's); _site: each"
            f" site its own (FLamby). fed*_global vs pooled: cost of federation;"
            f" fed*_site vs fed*_global: preprocessing effect.\n"
            f"{json.dumps(dataclasses.asdict(config))}\n")
  fm.training.loop.write_table(args.out, header + "\n" + text + "\n")
  print(header)
  print(text)
  print(f"\nwrote {os.path.join(args.out, 'results.json')} ({len(records)} records)"
        f" in {elapsed:.1f} s")
  if args.plots:
    written = fm.report.write_report(os.path.join(args.out, "results.json"))
    print("figures:", ", ".join(sorted(os.path.basename(p) for p in written.values())))
  return 0


if __name__ == "__main__":
  sys.exit(main())
