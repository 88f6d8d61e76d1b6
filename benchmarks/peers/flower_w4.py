"""W4 on Flower's simulation runtime (Ray): FedAvg, 50 of 1,000 clients per round.

The Flower app written the way Flower's PyTorch quickstart writes one (Message API,
flwr 1.2x+): a `ClientApp` whose `@train()` function loads the global `ArrayRecord`
into a fresh `simple_cnn`, runs one local epoch over its own 50 images (batches of
10 in stored order, `torch.optim.SGD(lr=0.1)`: 5 steps) and replies with its
weights and `num-examples`; a `ServerApp` running `flwr.serverapp.strategy.FedAvg`
(fraction_train 0.05 of 1,000 supernodes = 50 clients sampled per round, no federated
evaluation) whose n_k-weighted average of the client models is server SGD with lr 1.0.
`flwr.simulation.run_simulation` runs it on Ray: 1,000 virtual supernodes,
`--client-cpus` CPUs per client actor (2 cores / 1 = 2 actors at a time).

Data: `cnn_round.py`'s synthetic W4 data (numpy default_rng(0)), written once to a
temporary .npy file; a client maps it (`np.load(mmap_mode="r")`) and copies its
partition (`context.node_config["partition-id"]`), as Flower clients load their own
partition. Cohort sampling uses Python's `random`, seeded 0 in the ServerApp.

Timing: `strategy.start(..., evaluate_fn=stamp)`: Flower calls `evaluate_fn` before
round 1 and after every round, so round r = stamp(r) - stamp(r - 1), from the start of
round r (configure_train, sampling) to the end of round r (replies received,
aggregated). Round 1 is the warm-up: it also waits for Ray's start-up and its
actors' first imports; it is reported as `first_round_s`, not in `times`.

Memory: at the end of every round, the driver sums over its whole process tree
(this process, Ray's GCS server, raylet and other helpers, and the worker processes
hosting the client actors; `psutil` children, recursive): `peak_rss_mib` is the sum of
every process's VmHWM (its own peak RSS) at the end of the last round, before Ray
shuts down. RSS sums count shared pages (libtorch's code in each worker) once per
process; `tree_pss_mib` (proportional set size, shared pages split) is given too.

    python benchmarks/peers/flower_w4.py [--repeats 3] [--threads 1] [--client-cpus 1]

Prints one JSON line {"row", "times", "median_s", ..., "peak_rss_mib", "versions"}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402  pylint: disable=wrong-import-position


def make_apps(data_dir: str, *, threads: int, dropout: bool, num_rounds: int,
              num_users: int, cohort: int, record: dict):
  """The Flower ServerApp and ClientApp for W4; `record` receives stamps and memory."""
  # pylint: disable=import-outside-toplevel
  import numpy as np
  import torch
  from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
  from flwr.clientapp import ClientApp
  from flwr.serverapp import Grid, ServerApp
  from flwr.serverapp.strategy import FedAvg

  client_app = ClientApp()

  @client_app.train()
  def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(threads)
    k = int(context.node_config["partition-id"])
    x = torch.from_numpy(np.array(np.load(os.path.join(data_dir, "x.npy"), mmap_mode="r")[k]))
    y = torch.from_numpy(np.load(os.path.join(data_dir, "y.npy"))[k].astype(np.int64))
    model = C.simple_cnn(dropout=dropout)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=C.LR)
    losses = []
    for start in range(0, len(x), C.BATCH):  # one epoch, stored order
      opt.zero_grad()
      loss = model.loss(x[start:start + C.BATCH], y[start:start + C.BATCH])
      loss.backward()
      opt.step()
      losses.append(loss.item())
    content = RecordDict({
        "arrays": ArrayRecord(model.state_dict()),
        "metrics": MetricRecord({"train_loss": float(np.mean(losses)),
                                 "num-examples": len(x)})})
    return Message(content=content, reply_to=msg)

  server_app = ServerApp()

  @server_app.main()
  def main(grid: Grid, context: Context) -> None:
    del context
    random.seed(0)  # FedAvg samples its cohort with random.sample
    torch.manual_seed(0)
    strategy = FedAvg(fraction_train=cohort / num_users, fraction_evaluate=0.0,
                      min_train_nodes=cohort, min_available_nodes=num_users)

    def stamp(server_round: int, arrays):
      del arrays
      record["stamps"].append(time.perf_counter())
      if server_round > 0:
        record["memory"].append(C.tree_memory_mib())
      return None

    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(
        C.simple_cnn(dropout=dropout).state_dict()), num_rounds=num_rounds,
                            evaluate_fn=stamp)
    record["final"] = result.arrays

  return server_app, client_app


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--threads", type=int, default=1,
                      help="torch.set_num_threads in each client actor")
  parser.add_argument("--client-cpus", type=float, default=1.0,
                      help="Ray CPUs per client actor (actors at a time = cores / this)")
  parser.add_argument("--dropout", action="store_true",
                      help="keep pfl's Dropout layers (default: none, as the flax rows)")
  args = parser.parse_args(argv)
  os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

  import numpy as np  # pylint: disable=import-outside-toplevel
  from flwr.simulation import run_simulation  # pylint: disable=import-outside-toplevel

  data_dir = tempfile.mkdtemp(prefix="w4_flower_")
  try:
    x, y = C.synthetic_data()
    np.save(os.path.join(data_dir, "x.npy"), x)
    np.save(os.path.join(data_dir, "y.npy"), y)
    del x, y
    record = {"stamps": [], "memory": []}
    server_app, client_app = make_apps(
        data_dir, threads=args.threads, dropout=args.dropout, num_rounds=1 + args.repeats,
        num_users=C.NUM_USERS, cohort=C.COHORT, record=record)
    run_simulation(server_app=server_app, client_app=client_app,
                   num_supernodes=C.NUM_USERS,
                   backend_config={"client_resources": {"num_cpus": args.client_cpus,
                                                        "num_gpus": 0.0}})
  finally:
    shutil.rmtree(data_dir, ignore_errors=True)
  laps = list(np.diff(record["stamps"]))
  if len(laps) != 1 + args.repeats:
    print(f"flower: expected {1 + args.repeats} rounds, got {len(laps)}", file=sys.stderr)
    return 1
  first, times = laps[0], laps[1:]
  last = record["memory"][-1]
  row = "Flower simulation" + (" (dropout)" if args.dropout else "")
  print(json.dumps({
      "row": row, "times": times, "median_s": statistics.median(times),
      "min_s": min(times), "max_s": max(times), "first_round_s": first,
      "peak_rss_mib": last["hwm_sum_mib"], "driver_peak_rss_mib": C.peak_rss_mib(),
      "tree_processes": last["processes"], "tree_rss_mib": last["rss_sum_mib"],
      "tree_pss_mib": max(m["pss_sum_mib"] for m in record["memory"]),
      "repeats": args.repeats, "threads": args.threads, "client_cpus": args.client_cpus,
      "versions": C.versions("flwr", "ray", "torch", "numpy")}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
