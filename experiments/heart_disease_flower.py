"""From simulation to deployment: the same algorithms on Flower, with the same numbers.

For each algorithm (FedAvg, FedProx, SCAFFOLD, FedAdam, Ditto, DP-FedAvg with
site-level noise added at the server) on Fed-Heart-Disease (4 hospitals, one
per node), runs `--rounds` rounds from the same initial model and run key

  simulator    fm.run_rounds: the K sites vmapped in one jit-compiled round;
  in-process   fedjax_med.deploy with every node in this process;
  flower-sim   the example app on Flower's simulation runtime (Ray);
  processes    the example app (experiments/heart_disease_flower) with `flwr run`
               on a SuperLink and 4 SuperNodes started as local processes
               (loopback, insecure: a demo of the deployment engine);
  secagg       flower-sim with Flower's SecAgg+ (algorithms whose aggregation
               is a weighted sum),

and reports the largest difference of the final global parameters from the
simulator's, the wall time per round, and the bytes on the wire per round
(array payload, both directions, all nodes).

    python experiments/heart_disease_flower.py                  # all runtimes, 3 rounds
    python experiments/heart_disease_flower.py --runtimes simulator,in-process --rounds 5
    python experiments/heart_disease_flower.py --kill-node       # + a SuperNode dies

Outputs in --out: results.json (one record per algorithm and runtime) and table.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np

import fedjax_med as fm

APP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "heart_disease_flower")
sys.path.insert(0, APP_DIR)
import heart_disease_task as app  # noqa: E402

RUNTIMES = ("simulator", "in-process", "flower-sim", "processes", "secagg")
SECAGG_OK = ("fedavg", "fedprox", "fedadam", "ditto")


def _leaves(tree):
  return [np.asarray(a, np.float64) for a in jax.tree_util.tree_leaves(tree)]


def _max_diff(a, b) -> float:
  return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def _simulator(name, rounds, seed):
  task = app.make_task({"algorithm": name})
  train, _ = fm.datasets.heart_disease()
  algo, state = task.algorithm, fm.deploy.initial_state(task)
  key = jax.random.PRNGKey(seed)
  jax.block_until_ready(algo.round(state, train, key))      # compile
  t = time.perf_counter()
  state, _ = fm.run_rounds(algo, state, train, rounds, key, progress=False,
                           donate_state=False)   # the round compiled above
  jax.block_until_ready(state)
  return _leaves(state.params), (time.perf_counter() - t) / rounds, None


def _bytes(history) -> int:
  return int(np.sum(history["uplink_bytes"][0]) + np.sum(history["downlink_bytes"][0]))


def _in_process(name, rounds, seed):
  task = app.make_task({"algorithm": name})
  t = time.perf_counter()
  state, history, _, _ = fm.deploy.run_federation(task, fm.deploy.InProcessTransport(task),
                                                  rounds, jax.random.PRNGKey(seed))
  return _leaves(state.params), (time.perf_counter() - t) / rounds, _bytes(history)


def _flower_sim(name, rounds, seed, secure=False):
  from flwr.simulation import run_simulation  # pylint: disable=import-outside-toplevel
  from fedjax_med.deploy import flower, secagg  # pylint: disable=import-outside-toplevel
  out = {}
  make = lambda rc: app.make_task({"algorithm": name})
  server = flower.server_app(make, num_rounds=rounds, seed=seed,
                             on_done=lambda *r: out.setdefault("run", r),
                             secure_aggregation=secagg.SecAggPlus() if secure else None)
  client = flower.client_app(make, secure_aggregation=secure)
  run_simulation(server, client, num_supernodes=4,
                 backend_config={"client_resources": {"num_cpus": 1},
                                 "init_args": {"num_cpus": 2, "include_dashboard": False}})
  state, history, _, _ = out["run"]
  per_round = float(np.mean(history["client_seconds"] + history["server_seconds"]))
  return _leaves(state.params), per_round, None if secure else _bytes(history)


def _processes(federation, name, rounds, seed, work):
  out = os.path.join(work, f"out_{name}")
  federation.run(APP_DIR, {"algorithm": name, "num-rounds": rounds, "seed": seed,
                           "out-dir": out, "timeout": 120.0}, timeout=900)
  params = np.load(os.path.join(out, "params.npz"))
  history = json.load(open(os.path.join(out, "history.json")))["metrics"]
  per_round = float(np.mean(np.add(history["client_seconds"], history["server_seconds"])))
  leaves = [params[f"leaf_{i}"].astype(np.float64) for i in range(len(params.files))]
  return leaves, per_round, int(np.sum(history["uplink_bytes"][0])
                                + np.sum(history["downlink_bytes"][0]))


def _kill_node_demo(work, rounds, seed) -> dict:
  """SuperNode 2 (site 2) is killed once it has answered the census: every round
  then waits `timeout` (20 s) for it, logs it offline and goes on with the other
  three hospitals."""
  import threading  # pylint: disable=import-outside-toplevel
  from fedjax_med.deploy import launch  # pylint: disable=import-outside-toplevel
  out = os.path.join(work, "out_kill")
  cache = {"JAX_COMPILATION_CACHE_DIR": os.path.join(work, "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  with launch.local_federation(4, os.path.join(work, "flower_kill"), env=cache) as fed:
    victim = fed.processes[3]            # processes: SuperLink, SuperNode 0, 1, 2, 3

    def kill_after_first_round():
      path = os.path.join(work, "flower_kill", "superlink.log")
      while True:
        time.sleep(0.5)
        text = open(path).read() if os.path.exists(path) else ""
        if text.count("Push replies from node_id") >= 8:   # the census replies
          os.killpg(victim.pid, 9)
          return

    threading.Thread(target=kill_after_first_round, daemon=True).start()
    fed.run(APP_DIR, {"algorithm": "fedavg", "num-rounds": rounds, "seed": seed,
                      "out-dir": out, "timeout": 20.0}, timeout=900)
  history = json.load(open(os.path.join(out, "history.json")))["metrics"]
  events = json.load(open(os.path.join(out, "events.json")))
  return {"online": history["online"], "events": events}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--algorithms", default=",".join(app.ALGORITHMS))
  parser.add_argument("--runtimes", default=",".join(RUNTIMES))
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--seed", type=int, default=7)
  parser.add_argument("--kill-node", action="store_true")
  parser.add_argument("--out", default="results/heart_disease_flower")
  args = parser.parse_args(argv)
  algorithms = [a for a in args.algorithms.split(",") if a]
  runtimes = [r for r in args.runtimes.split(",") if r]
  for r in runtimes:
    if r not in RUNTIMES:
      parser.error(f"unknown runtime {r!r}; choose from {RUNTIMES}")
  os.makedirs(args.out, exist_ok=True)
  work = tempfile.mkdtemp(prefix="fedjax_med_flower_")
  records = []
  federation_ctx = None
  if "processes" in runtimes:
    from fedjax_med.deploy import launch  # pylint: disable=import-outside-toplevel
    federation_ctx = launch.local_federation(
        4, os.path.join(work, "flower"),
        env={"JAX_COMPILATION_CACHE_DIR": os.path.join(work, "jax_cache"),
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
    federation = federation_ctx.__enter__()
  try:
    for name in algorithms:
      reference, sim_round, _ = _simulator(name, args.rounds, args.seed)
      for runtime in runtimes:
        if runtime == "secagg" and name not in SECAGG_OK:
          continue
        t = time.perf_counter()
        if runtime == "simulator":
          leaves, per_round, nbytes = reference, sim_round, None
        elif runtime == "in-process":
          leaves, per_round, nbytes = _in_process(name, args.rounds, args.seed)
        elif runtime == "flower-sim":
          leaves, per_round, nbytes = _flower_sim(name, args.rounds, args.seed)
        elif runtime == "secagg":
          leaves, per_round, nbytes = _flower_sim(name, args.rounds, args.seed, secure=True)
        else:
          leaves, per_round, nbytes = _processes(federation, name, args.rounds, args.seed,
                                                 work)
        records.append({"algorithm": name, "runtime": runtime, "rounds": args.rounds,
                        "max_abs_diff": _max_diff(leaves, reference),
                        "seconds_per_round": per_round,
                        "run_seconds": time.perf_counter() - t,
                        "bytes_per_round": nbytes})
        print(json.dumps(records[-1]), flush=True)
  finally:
    if federation_ctx is not None:
      federation_ctx.__exit__(None, None, None)
  kill = _kill_node_demo(work, args.rounds, args.seed) if args.kill_node else None
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump({"records": records, "kill_node": kill}, f, indent=1)
  lines = ["| algorithm | runtime | max abs diff vs simulator | s / round | bytes / round |",
           "|---|---|---|---|---|"]
  for r in records:
    nbytes = "" if r["bytes_per_round"] is None else str(r["bytes_per_round"])
    lines.append(f"| {r['algorithm']} | {r['runtime']} | {r['max_abs_diff']:.2g} |"
                 f" {r['seconds_per_round']:.3g} | {nbytes} |")
  table = "\n".join(lines) + "\n"
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(table)
  print(table)
  if kill:
    print("kill-node demo: online per round", kill["online"], "events", kill["events"])
  return 0


if __name__ == "__main__":
  sys.exit(main())
