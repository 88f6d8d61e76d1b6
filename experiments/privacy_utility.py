"""Privacy-utility trade-off on Fed-Heart-Disease: accuracy against epsilon.

    python experiments/privacy_utility.py                         # defaults below
    python experiments/privacy_utility.py --seeds 0,1 --out /tmp/pu
    python experiments/privacy_utility.py --smoke --out /tmp/pu   # seconds, for tests
    python experiments/privacy_utility.py --cost                  # + cost of SecAgg / HE

Two levels of differential privacy, each at several noise levels calibrated
to target epsilons (delta = 1e-5) with dp-accounting, plus sigma = 0
(epsilon = inf, clipping still on):

  patient_level   DP-SGD inside each site (fm.algorithms.dp_sgd_fedavg):
                  Poisson sampling with expected batch b per site (q_k = b / n_k),
                  per-example clipping C, Gaussian noise sigma C per step.
                  sigma is calibrated so that the *largest* per-site epsilon (the
                  smallest site, Switzerland, q = b / 30) meets the target; every
                  other site's epsilon_k is smaller and is reported too.
  site_level      DP-FedAvg (fm.algorithms.dp_fedavg): each hospital's update
                  clipped to C, N(0, (sigma C)^2) on the sum, divided by K = 4,
                  every site every round; one epsilon for every site under
                  replace-one-site neighbours (K = 4 public; the sum moves by up
                  to 2C, so each round is Gaussian(sigma / 2)): sigma is
                  calibrated on exactly the event `SiteLevelAccountant` reports.

Every sigma is rounded up to the nearest float32 (the precision of the traced
noise multiplier the round applies), so the accounted sigma is the applied one
and epsilon stays <= the target. The epsilons are recomputed after training
from what ran: the steps each site took (patient level) and the noise
multiplier of every round from the round metrics (site level).

The seeds and noise levels of each level run as one compiled call
(`fm.run_seeds` over states that differ only in their traced sigma).

Outputs in --out: results.json (tidy records; strategy "<level>(eps=<target>)"
or "<level>(eps=inf)"; metrics accuracy and auc per site/mean/pooled on train
and test, `epsilon` per site (+ "max") on split "train", `noise_multiplier`
on site "all"; an infinite epsilon is stored as null; every epsilon record has
one more field, `neighboring_relation`: "add_or_remove_one" (one patient,
patient level) or "replace_one" (one site, site level)), table.md and
privacy_utility.png (site-mean test accuracy against epsilon, mean +- std over
seeds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import jax
import numpy as np
import optax

import fedjax_med as fm
from fedjax_med import privacy

DATASET = "heart_disease"
LEVELS = ("patient_level", "site_level")
# The neighbouring relation of each level's epsilon: the relation its accountant
# reports (PatientLevelAccountant: one patient added or removed; SiteLevelAccountant's
# default for every site every round: one site replaced).
RELATIONS = {"patient_level": privacy.accounting.ADD_OR_REMOVE_ONE,
             "site_level": privacy.accounting.REPLACE_ONE}


@dataclasses.dataclass(frozen=True)
class Config:
  seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
  delta: float = 1e-5
  epsilons: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0, 5.0, 8.0)
  # patient level: DP-SGD
  patient_rounds: int = 30
  patient_local_steps: int = 5
  patient_expected_batch: float = 8.0
  patient_clip: float = 1.0
  patient_lr: float = 0.1
  # site level: DP-FedAvg
  site_rounds: int = 3
  site_local_epochs: int = 5
  site_batch: int = 4
  site_clip: float = 1.0
  site_lr: float = 0.05
  accountant: str = "rdp"

  @classmethod
  def smoke(cls) -> "Config":
    return cls(seeds=(0,), epsilons=(3.0,), patient_rounds=2, patient_local_steps=2,
               site_rounds=2, site_local_epochs=1)


def strategy_name(level: str, target: float) -> str:
  return f"{level}(eps={'inf' if math.isinf(target) else f'{target:g}'})"


def _float32_up(sigma: float) -> float:
  """The smallest float32 >= sigma (the traced noise multiplier is float32;
  rounding it down would add less noise than accounted)."""
  s32 = np.float32(sigma)
  if float(s32) < sigma:
    s32 = np.nextafter(s32, np.float32(np.inf))
  return float(s32)


def _site_accountant(config: Config) -> privacy.SiteLevelAccountant:
  """The site-level accountant of the experiment's DP-FedAvg (every site, every round)."""
  return privacy.SiteLevelAccountant(config.delta, accountant=config.accountant,
                                     neighboring_relation=RELATIONS["site_level"])


def _noise_levels(config: Config, level: str, num_examples: np.ndarray) -> list[tuple[float, float]]:
  """[(target epsilon, sigma)] calibrated with dp-accounting, plus (inf, 0).

  Patient level: T = rounds x local steps Poisson-sampled Gaussian steps at the
  largest q_k (add/remove one patient). Site level: `site_rounds` rounds under
  the relation and participation of `_site_accountant` (replace one site,
  every site every round: Gaussian(sigma / 2) per round).
  """
  out = []
  for target in config.epsilons:
    if level == "patient_level":
      q_max = float(privacy.sampling_rates(
          num_examples, expected_batch_size=config.patient_expected_batch).max())
      sigma = privacy.calibrate_noise_multiplier(
          target, config.delta, num_steps=config.patient_rounds * config.patient_local_steps,
          sampling_rate=q_max, accountant=config.accountant, tol=1e-3)
    else:
      acct = _site_accountant(config)
      sigma = privacy.calibrate_noise_multiplier(
          target, config.delta, num_steps=config.site_rounds,
          sampling_rate=acct.sampling_rate, num_sites=acct.num_sites,
          cohort_size=acct.cohort_size, neighboring_relation=acct.neighboring_relation,
          accountant=acct.accountant, tol=1e-3)
    out.append((target, _float32_up(sigma)))
  out.append((math.inf, 0.0))
  return out


def _algorithm(config: Config, level: str, loss_fn, train):
  if level == "patient_level":
    return fm.algorithms.dp_sgd_fedavg(
        loss_fn, max_examples=train.max_examples, clip_norm=config.patient_clip,
        noise_multiplier=1.0, expected_batch_size=config.patient_expected_batch,
        client_optimizer=optax.sgd(config.patient_lr),
        local_steps=config.patient_local_steps), config.patient_rounds
  return fm.algorithms.dp_fedavg(
      loss_fn, clip_norm=config.site_clip, noise_multiplier=1.0, num_sites=train.num_sites,
      client_optimizer=optax.sgd(config.site_lr), local_epochs=config.site_local_epochs,
      batch_size=config.site_batch), config.site_rounds


def _with_sigma(level: str, state, sigma: float):
  if level == "patient_level":
    return fm.set_hyperparams(state, noise_multiplier=sigma)
  return fm.set_hyperparams(state, aggregator={"noise_multiplier": sigma})


def _site_epsilons(config: Config, level: str, sigma: float, train,
                   history: dict) -> tuple[np.ndarray, str]:
  """(epsilon_k `[K]`, neighbouring relation) from dp-accounting for what ran.

  Patient level: the steps each site actually took (`client_steps`, [R, K]).
  Site level: one round per entry of the round metric `dp_noise_multiplier`
  ([R], the float32 sigma each round applied), fed to the accountant.
  """
  if level == "patient_level":
    acct = privacy.PatientLevelAccountant(
        np.asarray(train.num_examples), config.delta,
        expected_batch_size=config.patient_expected_batch, accountant=config.accountant)
    for k, steps in enumerate(np.asarray(history["client_steps"]).sum(axis=0)):
      acct.add_steps(k, sigma, int(steps))
    relation = acct.neighboring_relation
    eps = acct.epsilons()
  else:
    acct = _site_accountant(config)
    sigmas = np.asarray(history["dp_noise_multiplier"], np.float64).reshape(-1)
    if sigmas.shape[0] != config.site_rounds or not np.all(sigmas == np.float32(sigma)):
      raise RuntimeError(f"privacy_utility: the rounds applied noise multipliers {sigmas},"
                         f" not {config.site_rounds} rounds of sigma {sigma}")
    for s in sigmas:
      acct.add_rounds(float(s))
    report = acct.report()
    relation = report["neighboring_relation"]
    eps = np.full(train.num_sites, report["epsilon"])
  if relation != RELATIONS[level]:
    raise RuntimeError(f"privacy_utility: {level} accountant reports relation {relation!r},"
                       f" expected {RELATIONS[level]!r}")
  return eps, relation


def _save_records(records: list[dict], out_dir: str) -> str:
  """results.json through `fm.report.save_records` (which requires
  `neighboring_relation` on every epsilon record), after checking the relation is known."""
  for r in records:
    if r["metric"] == "epsilon" and r["neighboring_relation"] not in privacy.accounting.RELATIONS:
      raise ValueError(f"privacy_utility: record {r} has an unknown neighbouring relation")
  return fm.report.save_records(records, out_dir)


def run(config: Config, out_dir: str, log=print) -> list[dict]:
  train, test = fm.datasets.heart_disease(standardize="site")
  model = fm.models.LogisticRegression()
  loss_fn = fm.losses.sigmoid_binary_cross_entropy(model.apply)
  names = train.names
  records: list[dict] = []
  for level in LEVELS:
    start = time.perf_counter()
    levels = _noise_levels(config, level, np.asarray(train.num_examples))
    log(f"{level}: sigma for eps {[t for t, _ in levels]} = "
        f"{[round(s, 3) for _, s in levels]} ({time.perf_counter() - start:.1f} s)")
    algo, rounds = _algorithm(config, level, loss_fn, train)
    states, keys, index = [], [], []
    for seed in config.seeds:
      init_key, train_key = jax.random.split(jax.random.PRNGKey(seed))
      params0 = model.init(init_key, train.x[0, :1])
      for target, sigma in levels:
        states.append(_with_sigma(level, algo.init(params0), sigma))
        keys.append(train_key)
        index.append((seed, target, sigma))
    final, history = fm.run_seeds(algo, fm.stack_states(states), train, rounds,
                                  jax.numpy.stack(keys))
    for i, (seed, target, sigma) in enumerate(index):
      params = fm.evaluation.unstack(final.params, i)
      strategy = strategy_name(level, target)
      finite = all(np.isfinite(np.asarray(l)).all() for l in jax.tree_util.tree_leaves(params))
      for split, data in (("train", train), ("test", test)):
        if finite:
          report = fm.evaluation.binary_report(model.apply, params, data)
        else:  # a diverged model is recorded as missing, not silently scored
          report = {s: {"accuracy": float("nan"), "auc": float("nan")}
                    for s in list(names) + ["mean", "pooled"]}
        records += fm.report.records_from_report(DATASET, strategy, seed, split, report)
      eps, relation = _site_epsilons(config, level, sigma, train,
                                     jax.tree_util.tree_map(lambda a: a[i], history))
      eps_report = {name: {"epsilon": float(e)} for name, e in zip(names, eps)}
      eps_report["max"] = {"epsilon": float(np.max(eps))}
      # epsilon = inf (sigma = 0) is stored as null, like every non-finite value
      records += [{**r, "neighboring_relation": relation} for r in
                  fm.report.records_from_report(DATASET, strategy, seed, "train", eps_report)]
      records.append({"dataset": DATASET, "strategy": strategy, "seed": int(seed),
                      "site": "all", "split": "train", "metric": "noise_multiplier",
                      "value": float(sigma)})
    log(f"{level}: {len(index)} runs x {rounds} rounds in {time.perf_counter() - start:.1f} s")
  _save_records(records, out_dir)
  return records


def tables(records: list[dict], site_names) -> str:
  strategies = []
  for r in records:
    if r["strategy"] not in strategies:
      strategies.append(r["strategy"])
  acc = fm.report.summary_table(records, "accuracy", "test",
                                list(site_names) + ["mean", "pooled"], strategies)
  eps = fm.report.summary_table(records, "epsilon", "train", list(site_names) + ["max"],
                                strategies, digits=2)
  sig = fm.report.summary_table(records, "noise_multiplier", "train", ["all"], strategies)
  relations = sorted({(r["strategy"].split("(")[0], r["neighboring_relation"])
                      for r in records if r["metric"] == "epsilon"})
  note = ("(epsilon = n/a: sigma = 0, epsilon = inf; neighbouring relation: "
          + ", ".join(f"{level} {rel}" for level, rel in relations) + ")")
  return acc + "\n\n" + eps + "\n\n" + note + "\n\n" + sig


def curve(records: list[dict], level: str):
  """[(epsilon used on the x axis, mean acc, std acc, target)] for one level."""
  by_strategy: dict[str, dict] = {}
  for r in records:
    if not r["strategy"].startswith(level + "("):
      continue
    d = by_strategy.setdefault(r["strategy"], {"acc": {}, "eps": {}})
    if r["metric"] == "accuracy" and r["split"] == "test" and r["site"] == "mean":
      d["acc"][r["seed"]] = r["value"]
    if r["metric"] == "epsilon" and r["site"] == "max":
      d["eps"][r["seed"]] = math.inf if r["value"] is None else r["value"]
  points = []
  for strategy, d in by_strategy.items():
    acc = np.array([v for v in d["acc"].values() if v is not None], np.float64)
    eps = max(d["eps"].values())
    target = strategy[len(level) + len("(eps="):-1]
    points.append((eps, acc.mean() if acc.size else math.nan,
                   acc.std(ddof=1) if acc.size > 1 else 0.0, target))
  return sorted(points, key=lambda p: p[0])


def plot(records: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  import matplotlib.ticker  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(6.5, 4))
  colors = {"patient_level": "tab:blue", "site_level": "tab:red"}
  labels = {"patient_level": "patient-level DP-SGD (max site epsilon, add/remove a patient)",
            "site_level": "site-level DP-FedAvg (replace a site)"}
  for level in LEVELS:
    pts = curve(records, level)
    finite = [p for p in pts if math.isfinite(p[0])]
    inf = [p for p in pts if not math.isfinite(p[0])]
    if finite:
      x, y, e, _ = zip(*finite)
      ax.errorbar(x, y, yerr=e, marker="o", capsize=3, color=colors[level],
                  label=labels[level])
    for _, y, e, _ in inf:
      ax.axhline(y, color=colors[level], linestyle="--", linewidth=1,
                 label=f"{level.replace('_', '-')}, sigma = 0 (eps = inf): {y:.3f}")
  ax.set_xscale("log")
  ticks = sorted({p[0] for level in LEVELS for p in curve(records, level)
                  if math.isfinite(p[0])})
  if ticks:
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:.2g}" for t in ticks])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
  ax.set_xlabel("epsilon (delta = 1e-5)")
  ax.set_ylabel("test accuracy, mean over 4 sites")
  ax.set_title("Fed-Heart-Disease: privacy vs utility")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def aggregation_cost(rounds: int = 20, he_rounds: int = 3, key_bits: int = 2048,
                     threshold: int = 3, log=print) -> dict:
  """Seconds per FedAvg round on heart disease with plain, secure and Paillier aggregation.

  Same algorithm (client SGD 0.05, 1 local epoch, batch 4) and data; only the
  reducer differs. The first round (compilation, Paillier key generation) is
  excluded; `rounds` rounds (`he_rounds` for Paillier, seconds each) are timed
  after it. Also times the reducer alone
  on the 4 stacked updates (14 parameters), jit-compiled.
  """
  train, _ = fm.datasets.heart_disease()
  model = fm.models.LogisticRegression()
  loss_fn = fm.losses.sigmoid_binary_cross_entropy(model.apply)
  params = model.init(jax.random.PRNGKey(0), train.x[0, :1])
  reducers = {
      "plain weighted mean": fm.aggregators.weighted_mean(),
      f"secure aggregation (t={threshold})": privacy.secure_weighted_mean(threshold=threshold),
      f"Paillier HE ({key_bits}-bit)": privacy.paillier_weighted_mean(key_bits=key_bits),
  }
  updates = jax.tree_util.tree_map(
      lambda a: jax.numpy.stack([a * (k + 1) for k in range(train.num_sites)]), params)
  weights = train.num_examples.astype(jax.numpy.float32)
  context = fm.aggregators.full_context(train.num_examples)
  out = {}
  for name, reducer in reducers.items():
    n = he_rounds if name.startswith("Paillier") else rounds
    algo = fm.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.05), local_epochs=1,
                                batch_size=4, aggregator=reducer)
    state, _ = algo.round(algo.init(params), train, jax.random.PRNGKey(0))
    jax.block_until_ready(state.params)
    start = time.perf_counter()
    for r in range(n):
      state, _ = algo.round(state, train, jax.random.PRNGKey(r + 1))
    jax.block_until_ready(state.params)
    per_round = (time.perf_counter() - start) / n
    agg_fn = jax.jit(reducer.aggregate)
    jax.block_until_ready(agg_fn(updates, weights, (), jax.random.PRNGKey(0), context)[0])
    start = time.perf_counter()
    for r in range(n):
      res = agg_fn(updates, weights, (), jax.random.PRNGKey(r), context)
    jax.block_until_ready(res[0])
    per_agg = (time.perf_counter() - start) / n
    out[name] = {"seconds_per_round": per_round, "seconds_per_aggregation": per_agg}
  base = out["plain weighted mean"]
  for name, v in out.items():
    v["round_ratio"] = v["seconds_per_round"] / base["seconds_per_round"]
    v["aggregation_ratio"] = v["seconds_per_aggregation"] / base["seconds_per_aggregation"]
    log(f"{name:34s} {1e3 * v['seconds_per_round']:9.2f} ms/round (x{v['round_ratio']:.1f})"
        f"  aggregation alone {1e3 * v['seconds_per_aggregation']:9.3f} ms"
        f" (x{v['aggregation_ratio']:.0f})")
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seeds", type=str, help="comma-separated seeds (default 0,1,2,3,4)")
  parser.add_argument("--epsilons", type=str, help="comma-separated target epsilons")
  parser.add_argument("--accountant", choices=("rdp", "pld"), help="default rdp")
  parser.add_argument("--smoke", action="store_true", help="tiny run for tests")
  parser.add_argument("--out", type=str, default="results/privacy_utility")
  parser.add_argument("--cost", action="store_true",
                      help="also time a round with secure aggregation and Paillier HE"
                           " against plain aggregation (writes cost.json)")
  args = parser.parse_args(argv)
  if args.cost:
    os.makedirs(args.out, exist_ok=True)
    cost = aggregation_cost()
    with open(os.path.join(args.out, "cost.json"), "w") as f:
      json.dump(cost, f, indent=1)

  config = Config.smoke() if args.smoke else Config()
  config = fm.training.loop.with_overrides(config, seeds=args.seeds)
  if args.epsilons:
    config = dataclasses.replace(
        config, epsilons=tuple(float(s) for s in args.epsilons.split(",") if s.strip()))
  if args.accountant:
    config = dataclasses.replace(config, accountant=args.accountant)
  start = time.perf_counter()
  records = run(config, args.out)
  elapsed = time.perf_counter() - start
  names = fm.datasets.heart_disease()[0].names
  text = tables(records, names)
  header = (f"Fed-Heart-Disease, privacy vs utility; test accuracy mean ± std over seeds"
            f" {list(config.seeds)}; 'mean' = unweighted mean over the 4 sites.\n"
            f"{json.dumps(dataclasses.asdict(config))}\n")
  os.makedirs(args.out, exist_ok=True)
  fm.training.loop.write_table(args.out, header + "\n" + text + "\n")
  plot(records, os.path.join(args.out, "privacy_utility.png"))
  print(header)
  print(text)
  print(f"\nwrote {os.path.join(args.out, 'results.json')} ({len(records)} records) and"
        f" privacy_utility.png in {elapsed:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
