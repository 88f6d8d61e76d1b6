"""Seconds per FedAvg round: fedjax_med's vmapped round vs a per-client jitted loop.

    python benchmarks/round_speed.py            # heart disease + synthetic K = 10, 100
    python benchmarks/round_speed.py --quick    # heart disease + K = 10

Workloads:
  W1  Fed-Heart-Disease, K = 4, logistic regression, batch 4, 1 local epoch.
  W2  K synthetic clients x 64 rows x 32 features, MLP 32-64-2, batch 16,
      1 local epoch.
Rows:
  vmapped     fedjax_med.algorithms.fedavg: one jit, all clients vmapped.
  per-client  the same local update jitted once and called in a Python loop
              over clients, models averaged with n_k weights on the device.
Each is timed after warm-up: median of --repeats rounds (min and max shown).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_med as fm
from fedjax_med.core.local import client_keys, local_training
from fedjax_med.core.objective import loss_and_grad


def _time(fn, repeats):
  fn()  # warm-up (compile)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), min(times), max(times)


def _workload_heart():
  train, _ = fm.datasets.heart_disease()
  model = fm.models.LogisticRegression()
  params = model.init(jax.random.PRNGKey(0), train.x[0, :1])
  return "W1 heart disease K=4", train, model, params, 4


def _workload_synthetic(k):
  rng = np.random.default_rng(0)
  sites = [(rng.normal(size=(64, 32)).astype(np.float32),
            rng.integers(0, 2, size=64).astype(np.int32)) for _ in range(k)]
  data = fm.FederatedData.from_sites(sites)
  model = fm.models.MLP(hidden=(64,), num_outputs=2)
  params = model.init(jax.random.PRNGKey(0), data.x[0, :1])
  return f"W2 synthetic K={k}", data, model, params, 16


def bench(name, data, model, params, batch, repeats):
  multiclass = model.num_outputs > 1 if hasattr(model, "num_outputs") else False
  loss_fn = (fm.losses.softmax_cross_entropy(model.apply) if multiclass
             else fm.losses.sigmoid_binary_cross_entropy(model.apply))
  opt = optax.sgd(0.05)
  algo = fm.algorithms.fedavg(loss_fn, client_optimizer=opt, local_epochs=1,
                              batch_size=batch)
  state = algo.init(params)
  key = jax.random.PRNGKey(1)

  def vmapped():
    jax.block_until_ready(algo.round(state, data, key)[0].params)

  schedule = fm.LocalSchedule(batch_size=batch, epochs=1)
  grad_fn = loss_and_grad(loss_fn)

  @jax.jit
  def one_client(p, x, y, m, k):
    return local_training(grad_fn, opt, schedule, p, opt.init(p), x, y, m, k).params

  keys = client_keys(key, data.site_ids)
  weights = data.num_examples / jnp.sum(data.num_examples)

  def per_client():
    acc = None
    for k in range(data.num_sites):
      local = one_client(params, data.x[k], data.y[k], data.mask[k], keys[k])
      term = jax.tree_util.tree_map(lambda a: weights[k] * a, local)
      acc = term if acc is None else jax.tree_util.tree_map(jnp.add, acc, term)
    jax.block_until_ready(acc)

  rows = []
  for label, fn in (("vmapped", vmapped), ("per-client", per_client)):
    med, lo, hi = _time(fn, repeats)
    rows.append({"workload": name, "method": label, "median_s": med, "min_s": lo,
                 "max_s": hi})
  base = rows[0]["median_s"]
  for r in rows:
    r["ratio_to_vmapped"] = r["median_s"] / base
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--json", type=str, default=None)
  args = parser.parse_args(argv)
  workloads = [_workload_heart(), _workload_synthetic(10)]
  if not args.quick:
    workloads.append(_workload_synthetic(100))
  rows = []
  for w in workloads:
    rows += bench(*w, repeats=args.repeats)
  print(f"jax {jax.__version__} on {jax.default_backend()} ({platform.processor() or platform.machine()})")
  print(f"| workload | method | s/round (median) | min | max | x vmapped |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['workload']} | {r['method']} | {r['median_s']:.5f} | {r['min_s']:.5f} |"
          f" {r['max_s']:.5f} | {r['ratio_to_vmapped']:.2f} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
