"""The FLamby benchmark (Ogier du Terrail et al., NeurIPS 2022) on Fed-Heart-Disease and Fed-TCGA-BRCA.

    python experiments/flamby_benchmark.py --dataset heart_disease,tcga_brca \\
        --seeds 42,43,44,45,46 --out results/flamby
    python experiments/flamby_benchmark.py --smoke --out /tmp/flamby      # seconds

Every strategy FLamby reports, with FLamby's protocol (see experiments/README.md
for the source of each value): Local 0..K-1 (each scored on every site's test
set), Pooled, FedAvg, FedProx, SCAFFOLD, Cyclic, FedAdam, FedYogi, FedAdagrad;
plus our extras FedAvgFineTuning, FedNova, Ditto and FedPer (personalised
methods are scored site by site, each site's model on its own test set).
The 5 seeds of each strategy run as one compiled call (`fm.run_seeds`).

Reported, as FLamby's paper: per strategy and seed, the metric on each site's
test set and their unweighted mean over sites; mean +- std (ddof 1) over seeds.
table.md also lists the site mean of every seed, with mean +- std (ddof 1) and
median [min, max] over seeds, beside FLamby's published per-seed values
(FLAMBY_SITE_MEAN, from FLamby's result CSVs): a mean over 5 seeds can hide one
collapsed seed (FLamby's TCGA-BRCA FedAvg: four seeds near 0.81, one at 0.41).
"pooled" is FLamby's "Pooled Test" (all test rows; for heart disease with the
pooled train statistics, as FLamby's pooled test set). Outputs in --out:
results.json (tidy records), table.md, <dataset>.png (bar plot with error bars).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
import optax

import fedjax_med as fm

DATASETS = ("heart_disease", "tcga_brca")


@dataclasses.dataclass(frozen=True)
class Protocol:
  """One dataset's FLamby protocol (flamby/datasets/fed_*/common.py, config_*.json)."""
  dataset: str
  metric: str                 # "accuracy" or "c_index"
  batch_size: int             # BATCH_SIZE
  baseline_lr: float          # LR (Adam) for Pooled and Local i
  baseline_epochs: int        # NUM_EPOCHS_POOLED
  pooled_train_size: int      # the constant in get_nb_max_rounds
  num_sites: int
  num_updates: int = 100      # fed_benchmark.py: run_num_updates = [100]
  fedavg_lr: float = 0.0
  fedprox_lr: float = 0.0
  fedprox_mu: float = 0.0
  scaffold_lr: float = 0.0
  scaffold_server_lr: float = 1.0
  cyclic_lr: float = 0.0
  fedadam: tuple[float, float] = (0.0, 0.0)      # (client lr, server lr)
  fedyogi: tuple[float, float] = (0.0, 0.0)
  fedadagrad: tuple[float, float] = (0.0, 0.0)
  fedopt_betas_tau: tuple[float, float, float] = (0.9, 0.999, 1e-8)
  finetune: tuple[float, int] = (0.0, 0)         # (lr, steps), our extra
  nova_epochs: int = 1                           # our extra: FedNova's local epochs
  ditto_lam: float = 0.1                         # our extra

  @property
  def rounds(self) -> int:
    """FLamby's get_nb_max_rounds(num_updates)."""
    return ((self.pooled_train_size // self.num_sites // self.batch_size)
            * self.baseline_epochs // self.num_updates)


HEART = Protocol(
    dataset="heart_disease", metric="accuracy", batch_size=4, baseline_lr=1e-3,
    baseline_epochs=50, pooled_train_size=486, num_sites=4,
    fedavg_lr=1e-3, fedprox_lr=1e-3, fedprox_mu=0.01, scaffold_lr=1e-3,
    scaffold_server_lr=1.0, cyclic_lr=1e-2, fedadam=(1e-2, 1e-2),
    fedyogi=(3.162e-3, 1e-2), fedadagrad=(3.162e-3, 0.316228),
    finetune=(0.00316227, 100),   # flamby/personalization_example (heart)
    nova_epochs=3)                # 3 local epochs: 24..150 steps, mean ~92 (~100)
TCGA = Protocol(
    dataset="tcga_brca", metric="c_index", batch_size=8, baseline_lr=0.1,
    baseline_epochs=30, pooled_train_size=866, num_sites=6,
    fedavg_lr=0.1, fedprox_lr=0.1, fedprox_mu=0.1, scaffold_lr=1e-2,
    scaffold_server_lr=1.0, cyclic_lr=1e-2, fedadam=(1e-2, 0.1), fedyogi=(1e-2, 0.1),
    fedadagrad=(1e-2, 1.0), finetune=(0.1, 3),
    nova_epochs=5)                # 5 local epochs: 25..155 steps, mean ~93
PROTOCOLS = {"heart_disease": HEART, "tcga_brca": TCGA}

# FLamby's published results, per seed: the unweighted mean of the metric over the client
# test sets ("Pooled Test" rows left out, as flamby/results/plot_results.py does), 6
# decimals. Source: github.com/owkin/FLamby at edacf54 (2024-06-19),
# flamby/results/results_benchmark_fed_heart_disease/heart_seed4[2-6].csv and
# flamby/results/results_benchmark_fed_tcga_brca/tcga_seed4[2-6].csv (methods "Pooled
# Training", "Local i", "<Strategy>100"); computed from those files, not retyped.
FLAMBY_SEEDS = (42, 43, 44, 45, 46)
FLAMBY_SITE_MEAN = {
    "heart_disease": {
        "pooled": (0.739142, 0.734334, 0.736738, 0.734334, 0.731930),
        "local_0": (0.709436, 0.732678, 0.693811, 0.748303, 0.726374),
        "local_1": (0.628480, 0.630933, 0.633288, 0.648962, 0.602087),
        "local_2": (0.626787, 0.610116, 0.496351, 0.585895, 0.515716),
        "local_3": (0.674655, 0.606697, 0.655242, 0.585174, 0.661434),
        "fedavg": (0.691492, 0.719848, 0.642743, 0.694287, 0.676468),
        "fedprox": (0.691492, 0.719848, 0.642743, 0.694287, 0.676468),
        "scaffold": (0.689088, 0.719848, 0.642743, 0.691883, 0.676468),
        "cyclic": (0.723971, 0.729464, 0.675097, 0.752768, 0.708688),
        "fedadam": (0.721162, 0.711484, 0.746130, 0.732210, 0.716710),
        "fedyogi": (0.723971, 0.719443, 0.751343, 0.735019, 0.727073),
        "fedadagrad": (0.723971, 0.719443, 0.751343, 0.735019, 0.727073),
    },
    "tcga_brca": {
        "pooled": (0.779762, 0.740797, 0.617348, 0.697019, 0.544810),
        "local_0": (0.775394, 0.679090, 0.705430, 0.729675, 0.751631),
        "local_1": (0.760422, 0.691919, 0.747026, 0.754662, 0.794034),
        "local_2": (0.524049, 0.466062, 0.481128, 0.524306, 0.492763),
        "local_3": (0.621609, 0.649358, 0.770328, 0.629017, 0.610596),
        "local_4": (0.735029, 0.757165, 0.687950, 0.691127, 0.689328),
        "local_5": (0.685979, 0.692850, 0.694788, 0.702023, 0.680963),
        "fedavg": (0.811661, 0.408145, 0.814844, 0.820290, 0.804733),
        "fedprox": (0.798743, 0.429584, 0.807501, 0.828282, 0.781054),
        "scaffold": (0.689913, 0.710344, 0.657750, 0.731682, 0.644767),
        "cyclic": (0.698463, 0.673617, 0.674422, 0.585796, 0.658864),
        "fedadam": (0.807315, 0.776870, 0.840797, 0.836208, 0.814580),
        "fedyogi": (0.807315, 0.776870, 0.840797, 0.836208, 0.814580),
        "fedadagrad": (0.819511, 0.816264, 0.808789, 0.808953, 0.811050),
    },
}


@dataclasses.dataclass
class Task:
  """Data, model and evaluation of one dataset."""
  train: fm.FederatedData
  test: fm.FederatedData
  pooled_train: fm.FederatedData      # one site, FLamby's pooled training set
  pooled_test: fm.FederatedData       # one site, FLamby's "Pooled Test"
  model: Any
  loss_fn: Callable
  report: Callable                    # (apply, params, data, per_site) -> report


def make_task(protocol: Protocol) -> Task:
  model = fm.models.LogisticRegression(torch_init=True)   # FLamby's nn.Linear init
  if protocol.dataset == "heart_disease":
    train, test = fm.datasets.heart_disease(standardize="site")
    pooled_train, pooled_test = fm.datasets.heart_disease(standardize="pooled")
    return Task(train, test, pooled_train.pooled(), pooled_test.pooled(), model,
                fm.losses.sigmoid_binary_cross_entropy(model.apply),
                fm.evaluation.binary_report)
  train, test = fm.datasets.tcga_brca()
  return Task(train, test, train.pooled(), test.pooled(), model,
              fm.losses.cox_loss(model.apply, ties="flamby"), fm.evaluation.survival_report)


def strategies(p: Protocol, loss_fn) -> dict[str, tuple[Any, bool, bool]]:
  """name -> (algorithm, needs num_sites at init, personalised)."""
  b1, b2, tau = p.fedopt_betas_tau
  steps = dict(local_steps=p.num_updates, batch_size=p.batch_size)
  sgd = optax.sgd
  out = {
      "fedavg": (fm.algorithms.fedavg(loss_fn, client_optimizer=sgd(p.fedavg_lr), **steps),
                 False, False),
      "fedprox": (fm.algorithms.fedprox(loss_fn, mu=p.fedprox_mu,
                                        client_optimizer=sgd(p.fedprox_lr), **steps),
                  False, False),
      "scaffold": (fm.algorithms.scaffold(loss_fn, client_learning_rate=p.scaffold_lr,
                                          server_optimizer=sgd(p.scaffold_server_lr),
                                          **steps), True, False),
      "cyclic": (fm.algorithms.cyclic(loss_fn, client_optimizer=sgd(p.cyclic_lr), **steps),
                 False, False),
  }
  for name in ("fedadam", "fedyogi", "fedadagrad"):
    client_lr, server_lr = getattr(p, name)
    out[name] = (getattr(fm.algorithms, name)(
        loss_fn, client_optimizer=sgd(client_lr), server_learning_rate=server_lr, beta1=b1,
        beta2=b2, tau=tau, **steps), False, False)
  ft_lr, ft_steps = p.finetune
  out["fedavg_finetune"] = (fm.algorithms.fedavg_finetune(
      loss_fn, client_optimizer=sgd(p.fedavg_lr), finetune_steps=ft_steps,
      finetune_optimizer=sgd(ft_lr), **steps), False, True)
  epochs = dict(local_epochs=p.nova_epochs, batch_size=p.batch_size)
  out["fednova"] = (fm.algorithms.fednova(loss_fn, client_optimizer=sgd(p.fedavg_lr), **epochs),
                    False, False)
  out["fedavg_epochs"] = (fm.algorithms.fedavg(loss_fn, client_optimizer=sgd(p.fedavg_lr),
                                               **epochs), False, False)
  out["ditto"] = (fm.algorithms.ditto(loss_fn, lam=p.ditto_lam,
                                      client_optimizer=sgd(p.fedavg_lr), **steps), True, True)
  out["fedper"] = (fm.algorithms.fedper(loss_fn, personal=("bias",),
                                        client_optimizer=sgd(p.fedavg_lr), **steps), True, True)
  return out


def _records(protocol, strategy, seed, report):
  return fm.report.records_from_report(protocol.dataset, strategy, seed, "test", report)


def _evaluate(task: Task, params, *, per_site=False):
  """FLamby's evaluation: each site's test set, and the pooled test set."""
  report = task.report(task.model.apply, params, task.test, per_site)
  if per_site:
    return report  # pooled = every site's rows, each scored by its own model
  report["pooled"] = task.report(task.model.apply, params, task.pooled_test)["pooled"]
  return report


def run_dataset(protocol: Protocol, seeds, rounds: int, baseline_epochs: int,
                num_updates: int, progress: bool = True) -> list[dict]:
  protocol = dataclasses.replace(protocol, num_updates=num_updates,
                                 baseline_epochs=baseline_epochs)
  task = make_task(protocol)
  k = task.train.num_sites
  run_keys = np.stack([jax.random.PRNGKey(s) for s in seeds])
  init_params = [task.model.init(jax.random.PRNGKey(10_000 + s), task.train.x[0, :1])
                 for s in seeds]
  records: list[dict] = []

  def log(name, start):
    if progress:
      print(f"  {protocol.dataset} {name}: {time.perf_counter() - start:.1f} s", flush=True)

  # Pooled and Local i: Adam, full epochs (one round = one epoch), seeds vmapped.
  baseline = fm.algorithms.local_only(task.loss_fn, optimizer=optax.adam(protocol.baseline_lr),
                                      local_epochs=1, batch_size=protocol.batch_size)
  start = time.perf_counter()
  states, _ = fm.run_seeds(baseline, fm.stack_states([baseline.init(p, 1) for p in init_params]),
                           task.pooled_train, baseline_epochs, run_keys)
  for i, seed in enumerate(seeds):
    params = fm.evaluation.unstack(fm.evaluation.unstack(states.client_states["params"], i), 0)
    records += _records(protocol, "pooled", seed, _evaluate(task, params))
  log("pooled", start)
  start = time.perf_counter()
  states, _ = fm.run_seeds(baseline, fm.stack_states([baseline.init(p, k) for p in init_params]),
                           task.train, baseline_epochs, run_keys)
  for i, seed in enumerate(seeds):
    site_models = fm.evaluation.unstack(states.client_states["params"], i)
    for site in range(k):
      records += _records(protocol, f"local_{site}", seed,
                          _evaluate(task, fm.evaluation.unstack(site_models, site)))
  log("local", start)

  for name, (algo, needs_k, personalised) in strategies(protocol, task.loss_fn).items():
    start = time.perf_counter()
    init = [algo.init(p, k) if needs_k else algo.init(p) for p in init_params]
    states, _ = fm.run_seeds(algo, fm.stack_states(init), task.train, rounds, run_keys)
    for i, seed in enumerate(seeds):
      state = jax.tree_util.tree_map(lambda a: a[i], states)
      if personalised:
        key = jax.random.fold_in(run_keys[i], rounds)
        models = algo.personalize(state, task.train, key)
        report = _evaluate(task, models, per_site=True)
      else:
        report = _evaluate(task, state.params)
      records += _records(protocol, name, seed, report)
    log(name, start)
  return records


ORDER = ("pooled", "local_0", "local_1", "local_2", "local_3", "local_4", "local_5",
         "fedavg", "fedprox", "scaffold", "cyclic", "fedadam", "fedyogi", "fedadagrad",
         "fedavg_finetune", "fednova", "fedavg_epochs", "ditto", "fedper")


def summary(records: list[dict], dataset: str, metric: str) -> str:
  rs = [r for r in records if r["dataset"] == dataset]
  sites = [s for s in dict.fromkeys(r["site"] for r in rs) if s not in ("mean", "pooled")]
  strategies = [s for s in ORDER if any(r["strategy"] == s for r in rs)]
  return fm.report.summary_table(rs, metric, "test", ["mean", "pooled"] + sites, strategies)


def site_mean_values(records: list[dict], dataset: str, metric: str
                     ) -> dict[str, dict[int, float]]:
  """{strategy: {seed: site-mean `metric`}} from the tidy records (site "mean")."""
  out: dict[str, dict[int, float]] = {}
  for r in records:
    if (r["dataset"] == dataset and r["site"] == "mean" and r["metric"] == metric
        and r["value"] is not None):
      out.setdefault(r["strategy"], {})[int(r["seed"])] = float(r["value"])
  return {s: dict(sorted(out[s].items())) for s in ORDER if s in out}


def _spread(values) -> str:
  """"mean ± std (ddof 1) | median [min, max]" of per-seed values."""
  v = np.asarray(values, np.float64)
  std = f"{v.std(ddof=1):.3f}" if v.size > 1 else "-"
  return (f"{v.mean():.3f} ± {std} | {np.median(v):.3f} [{v.min():.3f}, {v.max():.3f}]")


def seed_table(records: list[dict], dataset: str, metric: str) -> str:
  """Markdown: per strategy, the site-mean `metric` of every seed, then mean ± std
  (ddof 1) and median [min, max] over seeds, ours and FLamby's (FLAMBY_SITE_MEAN)."""
  ours = site_mean_values(records, dataset, metric)
  flamby = FLAMBY_SITE_MEAN.get(dataset, {})
  seeds = sorted({seed for v in ours.values() for seed in v})
  lines = [f"Site-mean {metric} per seed (ours: seeds {', '.join(map(str, seeds))};"
           f" FLamby: seeds {', '.join(map(str, FLAMBY_SEEDS))}); std over seeds with ddof 1.",
           "",
           "| strategy | ours per seed | ours mean ± std | ours median [min, max]"
           " | FLamby per seed | FLamby mean ± std | FLamby median [min, max] |",
           "|---|---|---|---|---|---|---|"]
  for name, by_seed in ours.items():
    per_seed = " ".join(f"{by_seed[s]:.3f}" if s in by_seed else "-" for s in seeds)
    ref = flamby.get(name)
    ref_cells = (f"{' '.join(f'{x:.3f}' for x in ref)} | {_spread(ref)}" if ref
                 else "- | - | -")
    lines.append(f"| {name} | {per_seed} | {_spread(list(by_seed.values()))} | {ref_cells} |")
  return "\n".join(lines)


def site_mean_bars(records: list[dict], dataset: str, metric: str):
  """(strategies, means, stds): site-mean `metric`, mean and std (ddof 1) over seeds."""
  values = site_mean_values(records, dataset, metric)
  names = list(values)
  arrays = [np.array(list(values[s].values())) for s in names]
  means = [v.mean() if v.size else np.nan for v in arrays]
  stds = [v.std(ddof=1) if v.size > 1 else 0.0 for v in arrays]
  return names, means, stds


def bar_plot(records: list[dict], dataset: str, metric: str, path: str) -> None:
  """Bar plot of `site_mean_bars` with error bars, saved as PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names, means, stds = site_mean_bars(records, dataset, metric)
  fig, ax = plt.subplots(figsize=(10, 4))
  colors = ["tab:gray" if n == "pooled" else "tab:olive" if n.startswith("local")
            else "tab:blue" for n in names]
  ax.bar(range(len(names)), means, yerr=stds, capsize=3, color=colors)
  ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
  ax.set_ylabel(f"{metric} (mean over sites)")
  ax.set_title(f"FLamby benchmark, {dataset} (mean ± std over seeds)")
  lo = np.nanmin(np.array(means) - np.array(stds))
  ax.set_ylim(max(0.0, lo - 0.05), 1.0)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dataset", default="heart_disease,tcga_brca",
                      help="comma-separated: heart_disease, tcga_brca")
  parser.add_argument("--seeds", default="42,43,44,45,46")
  parser.add_argument("--out", default="results/flamby")
  parser.add_argument("--smoke", action="store_true",
                      help="2 rounds of 5 updates, 2 baseline epochs, 2 seeds")
  parser.add_argument("--quiet", action="store_true")
  args = parser.parse_args(argv)
  datasets = [d.strip() for d in args.dataset.split(",") if d.strip()]
  for d in datasets:
    if d not in DATASETS:
      parser.error(f"unknown dataset {d!r}; choose from {DATASETS}")
  seeds = list(fm.training.loop.parse_seeds(args.seeds))
  if args.smoke:
    seeds = seeds[:2]
  os.makedirs(args.out, exist_ok=True)
  start = time.perf_counter()
  records, texts = [], []
  for d in datasets:
    p = PROTOCOLS[d]
    rounds = 2 if args.smoke else p.rounds
    epochs = 2 if args.smoke else p.baseline_epochs
    updates = 5 if args.smoke else p.num_updates
    t0 = time.perf_counter()
    records += run_dataset(p, seeds, rounds, epochs, updates, progress=not args.quiet)
    texts.append(f"## {d}: {p.metric}, {rounds} rounds x {updates} local updates,"
                 f" baselines {epochs} epochs; seeds {seeds}"
                 f" ({time.perf_counter() - t0:.0f} s)\n\n" + summary(records, d, p.metric)
                 + "\n\n" + seed_table(records, d, p.metric))
    bar_plot(records, d, p.metric, os.path.join(args.out, f"{d}.png"))
  elapsed = time.perf_counter() - start
  fm.report.save_records(records, args.out)
  text = "\n\n".join(texts) + f"\n\nTotal {elapsed:.0f} s, jax {jax.__version__} on {jax.default_backend()}.\n"
  fm.training.loop.write_table(args.out, text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
