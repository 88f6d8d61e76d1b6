"""Communication and time: compressed FedAvg, and synchronous FedAvg vs FedBuff with a straggler.

    python experiments/communication.py                         # defaults below
    python experiments/communication.py --dataset heart_disease --seeds 0 --out /tmp/c
    python experiments/communication.py --smoke --out /tmp/c    # seconds, for tests
    python experiments/communication.py --audit /tmp/c/audit.jsonl   # + round log

Datasets (FLamby's models): Fed-Heart-Disease (logistic regression 13 -> 1,
BCE, test accuracy) and Fed-TCGA-BRCA (linear Cox 39 -> 1, C-index).

Strategies (same initial model and keys within a seed):
  fedavg       FedAvg, float32 uplink: the reference (bytes counted by the same link)
  qsgd8        8-bit QSGD uplink (Alistarh et al. 2017)
  qsgd4        4-bit QSGD uplink
  rot_uniform4 randomised Hadamard + 4-bit stochastic uniform (Suresh et al. 2017)
  sign_ef      1-bit scaled sign + error feedback (EF-signSGD, Karimireddy et al. 2019)
  top1_ef      top-1% + error feedback (Stich et al. 2018)
  qsgd8_down8  8-bit QSGD up, 8-bit uniform down (downlink compression)
  fedbuff      FedBuff (Nguyen et al. 2022), float32, buffer M = K - 1,
               staleness weight 1/sqrt(1 + s)

Simulated clock (every strategy): site k runs speed_k local steps per time
unit with speed_k = its steps per local epoch, so a job (one local epoch)
takes one time unit at every site; the straggler site is `straggler_factor`
(10) times slower. A synchronous round (all FedAvg variants) waits for the
straggler: 10 units. FedBuff never waits. Communication time is not
simulated (bytes are reported separately).

Outputs in --out:
  results.json  tidy records (RECORD_FIELDS): the test metric per site, "mean"
                and "pooled"; run-level costs at site "all", split "train":
                bytes_up_total, bytes_down_total, bytes_total, wall_time_s
                (training rounds only, compilation excluded), sim_time,
                time_to_target (simulated time when the site-mean test metric
                first reached the dataset's target; None if never)
  history.json  per-round series (HISTORY_FIELDS = RECORD_FIELDS + round):
                test metric (site "mean"), cumulative bytes_total,
                bytes_up_total, sim_time, wall_time_s, train_loss (site "all")
  table.md      the accuracy-bytes-time table per dataset and the per-site table
  metric_vs_bytes.png, metric_vs_time.png (and curves.png, sites.png,
  metric_vs_wall_time.png) from fedjax_med.training.report.write_report
  --audit PATH  one tamper-evident JSONL round log for every run
                (fedjax_med.training.audit; verify with fm.audit.verify(PATH)); the chain's
                head is kept in PATH.head, and an existing log is never
                overwritten (choose a new PATH for a new run)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
import optax

import fedjax_med as fm
from fedjax_med import audit as audit_lib
from fedjax_med import compression
from fedjax_med.algorithms.fedbuff import fedbuff, site_speeds, synchronous_time

DATASETS = ("heart_disease", "tcga_brca")
STRATEGIES = ("fedavg", "qsgd8", "qsgd4", "rot_uniform4", "sign_ef", "top1_ef",
              "qsgd8_down8", "fedbuff")


@dataclasses.dataclass(frozen=True)
class Protocol:
  """One dataset's training protocol."""
  dataset: str
  metric: str              # headline test metric
  target: float            # site-mean test metric defining time_to_target
  batch_size: int
  client_lr: float
  rounds: int              # synchronous rounds
  fedbuff_rounds: int      # FedBuff server steps


# Client learning rates small enough that the test metric climbs over several
# rounds (at 0.05 heart disease is at its plateau after one round, and a time to
# target would measure nothing); targets sit just below FedAvg's plateau.
HEART = Protocol("heart_disease", "accuracy", target=0.70, batch_size=4, client_lr=0.003,
                 rounds=50, fedbuff_rounds=200)
TCGA = Protocol("tcga_brca", "c_index", target=0.70, batch_size=8, client_lr=0.003,
                rounds=50, fedbuff_rounds=200)
PROTOCOLS = {"heart_disease": HEART, "tcga_brca": TCGA}


@dataclasses.dataclass(frozen=True)
class Config:
  seeds: tuple[int, ...] = (0, 1, 2)
  datasets: tuple[str, ...] = DATASETS
  strategies: tuple[str, ...] = STRATEGIES
  straggler: int = 0              # site index made slower (0: the largest site)
  straggler_factor: float = 10.0
  staleness_exponent: float = 0.5
  rounds_scale: float = 1.0       # multiplies every protocol's round counts

  @classmethod
  def smoke(cls) -> "Config":
    """One seed, 3 synchronous rounds and 12 FedBuff steps, three strategies (every
    strategy compiles its own round: about 3 s of CPU each)."""
    return cls(seeds=(0,), strategies=("fedavg", "sign_ef", "fedbuff"), rounds_scale=0.06)


@dataclasses.dataclass
class Task:
  protocol: Protocol
  train: fm.FederatedData
  test: fm.FederatedData
  model: Any
  loss_fn: Callable
  report: Callable


def make_task(protocol: Protocol) -> Task:
  model = fm.models.LogisticRegression(torch_init=True)
  if protocol.dataset == "heart_disease":
    train, test = fm.datasets.heart_disease(standardize="site")
    return Task(protocol, train, test, model,
                fm.losses.sigmoid_binary_cross_entropy(model.apply),
                fm.evaluation.binary_report)
  train, test = fm.datasets.tcga_brca()
  return Task(protocol, train, test, model, fm.losses.cox_loss(model.apply, ties="flamby"),
              fm.evaluation.survival_report)


def compression_spec(strategy: str):
  """strategy -> (uplink compressor, downlink compressor or None)."""
  c = compression
  return {
      "fedavg": (c.float32(), None),
      "qsgd8": (c.qsgd(8), None),
      "qsgd4": (c.qsgd(4), None),
      "rot_uniform4": (c.rotated(c.uniform(4)), None),
      "sign_ef": (c.error_feedback(c.sign()), None),
      "top1_ef": (c.error_feedback(c.top_k(0.01)), None),
      "qsgd8_down8": (c.qsgd(8), c.uniform(8)),
  }[strategy]


def build(strategy: str, task: Task, config: Config, record_payloads: bool):
  p = task.protocol
  common = dict(client_optimizer=optax.sgd(p.client_lr), local_epochs=1,
                batch_size=p.batch_size)
  if strategy == "fedbuff":
    k = task.train.num_sites
    return fedbuff(task.loss_fn, buffer_size=max(k - 1, 1),
                   staleness_exponent=config.staleness_exponent, **common)
  up, down = compression_spec(strategy)
  comm = compression.communication(up, down, record_payloads=record_payloads)
  return fm.algorithms.fedavg(task.loss_fn, aggregator=comm.aggregator,
                              downlink=comm.downlink, **common)


def speeds_for(task: Task, config: Config) -> np.ndarray:
  """One time unit per local epoch at every site; the straggler 10x slower."""
  n = np.asarray(task.train.num_examples)
  steps = np.ceil(n / task.protocol.batch_size)
  return site_speeds(steps, slowdown={config.straggler: config.straggler_factor})


def _rounds(count: int, config: Config) -> int:
  return max(2, int(round(count * config.rounds_scale)))


def run_strategy(task: Task, strategy: str, seed: int, config: Config,
                 log: audit_lib.AuditLog | None):
  """Trains one strategy for one seed; returns (records, history rows, summary)."""
  p = task.protocol
  k = task.train.num_sites
  speeds = speeds_for(task, config)
  algo = build(strategy, task, config, record_payloads=log is not None)
  init_key, train_key = jax.random.split(jax.random.PRNGKey(seed))
  params0 = task.model.init(init_key, task.train.x[0, :1])
  if strategy == "fedbuff":
    state0 = algo.init(params0, k, speeds=speeds)
    rounds = _rounds(p.fedbuff_rounds, config)
  else:
    state0 = algo.init(params0, k)
    rounds = _rounds(p.rounds, config)
  # Untimed warm-up round: compiles the round so wall_time_s measures training only.
  jax.block_until_ready(algo.round(state0, task.train, jax.random.PRNGKey(0))[0].params)

  curve, wall = [], []
  clock = {"last": 0.0}
  audit_cb = None
  if log is not None:
    audit_cb = log.run_callback(
        run=f"{p.dataset}/{strategy}/seed{seed}", algorithm=strategy,
        hyperparameters={"client_lr": p.client_lr, "batch_size": p.batch_size,
                         "local_epochs": 1, "straggler": config.straggler,
                         "straggler_factor": config.straggler_factor,
                         "staleness_exponent": config.staleness_exponent},
        initial_state=state0, site_names=task.train.names)

  def callback(r, state, metrics):
    jax.block_until_ready(state.params)
    now = time.perf_counter()
    wall.append(now - clock["last"])
    report = task.report(task.model.apply, state.params, task.test)
    curve.append(report["mean"][p.metric])
    if audit_cb is not None:
      audit_cb(r, state, metrics)
    clock["last"] = time.perf_counter()

  clock["last"] = time.perf_counter()
  state, hist = fm.run_rounds(algo, state0, task.train, rounds, train_key, progress=False,
                              callback=callback)

  up = np.cumsum(np.asarray(hist["bytes_up_total"], np.int64))
  down = np.cumsum(np.asarray(hist["bytes_down_total"], np.int64))
  if strategy == "fedbuff":
    sim = np.asarray(hist["sim_time"], np.float64)
  else:
    sim = synchronous_time(hist["client_steps"], speeds, hist["cohort"])
  wall_cum = np.cumsum(wall)
  curve = np.asarray(curve, np.float64)
  reached = np.nonzero(curve >= p.target)[0]
  time_to_target = float(sim[reached[0]]) if reached.size else None

  report = task.report(task.model.apply, state.params, task.test)
  records = fm.report.records_from_report(p.dataset, strategy, seed, "test", report)
  summary = {"bytes_up_total": int(up[-1]), "bytes_down_total": int(down[-1]),
             "bytes_total": int(up[-1] + down[-1]), "wall_time_s": float(wall_cum[-1]),
             "sim_time": float(sim[-1]), "time_to_target": time_to_target}
  if strategy == "fedbuff":
    summary["staleness_mean"] = float(np.mean(hist["staleness"]))
  records += fm.report.run_records(p.dataset, strategy, seed, summary)
  history = fm.report.history_records(p.dataset, strategy, seed, {p.metric: curve},
                                      site="mean", split="test")
  history += fm.report.history_records(
      p.dataset, strategy, seed,
      {"bytes_total": up + down, "bytes_up_total": up, "sim_time": sim,
       "wall_time_s": wall_cum, "train_loss": hist["train_loss"]})
  summary[p.metric] = report["mean"][p.metric]
  return records, history, summary


def run(config: Config, out_dir: str, audit_path: str | None = None,
        progress: bool = True) -> tuple[list[dict], list[dict]]:
  log = audit_lib.AuditLog(audit_path) if audit_path else None
  records, history = [], []
  for name in config.datasets:
    task = make_task(PROTOCOLS[name])
    for strategy in config.strategies:
      for seed in config.seeds:
        start = time.perf_counter()
        recs, hist, summary = run_strategy(task, strategy, seed, config, log)
        records += recs
        history += hist
        if progress:
          print(f"  {name} {strategy} seed {seed}: {task.protocol.metric}"
                f" {summary[task.protocol.metric]:.3f}, {summary['bytes_total']} bytes,"
                f" sim time {summary['sim_time']:.0f}, to target"
                f" {_fmt(summary['time_to_target'])}, {time.perf_counter() - start:.1f} s",
                flush=True)
  os.makedirs(out_dir, exist_ok=True)
  fm.report.save_records(records, out_dir)
  fm.report.save_history(history, out_dir)
  return records, history


def _fmt(value) -> str:
  return "never" if value is None else f"{value:.4g}"


def tables(records: list[dict], config: Config) -> str:
  parts = []
  for name in config.datasets:
    p = PROTOCOLS[name]
    rs = [r for r in records if r["dataset"] == name]
    strategies = [s for s in config.strategies if any(r["strategy"] == s for r in rs)]
    parts.append(f"### {name}: {p.metric} (site mean, test), costs per run;"
                 f" time_to_target = simulated time to site-mean {p.metric} >= {p.target}")
    parts.append(fm.report.strategy_table(rs, name, p.metric, strategies=strategies,
                                          reference="fedavg"))
    sites = [s for s in dict.fromkeys(r["site"] for r in rs if r["split"] == "test")]
    parts.append(fm.report.summary_table(rs, p.metric, "test", sites, strategies))
  return "\n\n".join(parts)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dataset", type=str, help="comma-separated: heart_disease,tcga_brca")
  parser.add_argument("--strategies", type=str, help=f"comma-separated subset of {STRATEGIES}")
  parser.add_argument("--seeds", type=str, help="comma-separated seeds (default 0,1,2)")
  parser.add_argument("--smoke", action="store_true", help="tiny run for tests")
  parser.add_argument("--out", type=str, default="results/communication",
                      help="output directory")
  parser.add_argument("--audit", type=str, default=None,
                      help="write a tamper-evident round log (JSONL) to this path")
  parser.add_argument("--no-plots", action="store_true", help="skip the figures")
  parser.add_argument("--no-progress", action="store_true", help="no per-run lines")
  args = parser.parse_args(argv)

  config = Config.smoke() if args.smoke else Config()
  config = fm.training.loop.with_overrides(config, seeds=args.seeds)
  if args.dataset:
    names = tuple(s.strip() for s in args.dataset.split(",") if s.strip())
    unknown = sorted(set(names) - set(DATASETS))
    if unknown:
      parser.error(f"unknown dataset(s) {unknown}; choose from {DATASETS}")
    config = dataclasses.replace(config, datasets=names)
  if args.strategies:
    names = tuple(s.strip() for s in args.strategies.split(",") if s.strip())
    unknown = sorted(set(names) - set(STRATEGIES))
    if unknown:
      parser.error(f"unknown strateg(ies) {unknown}; choose from {STRATEGIES}")
    config = dataclasses.replace(config, strategies=names)

  start = time.perf_counter()
  records, _ = run(config, args.out, args.audit, progress=not args.no_progress)
  elapsed = time.perf_counter() - start
  text = tables(records, config)
  header = (f"Communication and time, mean ± std over seeds {list(config.seeds)};"
            f" site {config.straggler} is {config.straggler_factor:g}x slower.\n"
            f"{json.dumps(dataclasses.asdict(config))}\n")
  fm.training.loop.write_table(args.out, header + "\n" + text + "\n")
  print(header)
  print(text)
  if not args.no_plots:
    written = fm.report.write_report(os.path.join(args.out, "results.json"), args.out,
                                     reference="fedavg")
    written.pop("report.md", None)
    print("figures: " + ", ".join(sorted(written)))
  if args.audit:
    print(f"audit log: {args.audit} ({audit_lib.verify(args.audit)} lines verified)")
  print(f"\nwrote {os.path.join(args.out, 'results.json')} ({len(records)} records)"
        f" in {elapsed:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
