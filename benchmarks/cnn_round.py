"""W4: one FedAvg round of pfl-research's cross-device CIFAR10 benchmark, CNN under the round.

The workload (pfl-research, `benchmarks/image_classification/configs/baseline.yaml`
and `benchmarks/model/pytorch/cnn.py`, as read for issue 18): 1,000 users x 50
synthetic images 32 x 32 x 3 (CIFAR's shape), cohort 50, local batch 10, one
local epoch (5 SGD steps, lr 0.1), server SGD lr 1.0, and pfl's `simple_cnn`:

    Conv 3->32 3x3 VALID, ReLU, Conv 32->64 3x3 VALID, ReLU, MaxPool 2,
    Dense 12544->128, ReLU, Dense 128->10          (1,626,442 parameters)

Rows (each in its own process, so peak RSS is per row; the same synthetic data,
median wall time of `--repeats` rounds after one warm-up round):

  fedjax_med nn.Conv     `fm.algorithms.fedavg(cohort_size=50)` on the CNN written with
                         `flax.linen.Conv`, as a user writes it (the round computes its
                         convolutions as matmuls on CPU: `fm.convs_as_matmuls`)
  fedjax_med patch CNN   the same round on the CNN written by hand as
                         `conv_general_dilated_patches` @ kernel (VALID)
  fedjax_med native conv the nn.Conv CNN with `fm.keep_native_convs` (XLA's own
                         convolutions under vmap: the slow path the rewrite removes);
                         `--native` only (minutes per round)
  per-client jit         the 50 cohort clients one after another, each a jitted 5-step
                         local training of the nn.Conv CNN rewritten as matmuls
  compute floor          one model, 5 SGD steps on batches of 500 rows (the 50
                         clients' batches side by side), rewritten as matmuls

With `--peers`, the issue's peers, each a script in `benchmarks/peers/` run in its own
subprocess in the same invocation, on the same data (numpy default_rng(0)), the same
`--repeats` after one warm-up round, with PyTorch's `simple_cnn` (pfl's, without its
two Dropout layers, so that it computes the flax rows' function; the scripts'
`--dropout` keeps them) and `torch.set_num_threads(--peer-threads)`:

  pfl-research           pfl 0.6 (PyTorch backend) as its CIFAR10 benchmark runs:
                         `FederatedAveraging`, `SimulatedBackend`, `PyTorchModel` with
                         a central `torch.optim.SGD(lr=1.0)`, 50 users per iteration,
                         one process (`peers/pfl_w4.py`)
  Flower simulation      flwr 1.42's `run_simulation` on Ray: a `ServerApp` running
                         `FedAvg` (50 of 1,000 supernodes per round), a `ClientApp`
                         training 1 epoch; a round is timed from its start to its end
                         inside the strategy (Ray's start-up falls in the warm-up
                         round); its peak RSS is the sum over the process tree (driver,
                         Ray's helpers, the client actors' workers) (`peers/flower_w4.py`)

They need `pfl[pytorch]`, `flwr[simulation]` and torch, in this interpreter or in the
ones `--pfl-python` / `--flower-python` name; a peer whose interpreter cannot import
them is skipped with the reason printed. `peers/check_equal.py` checks that fedjax_med,
a plain PyTorch loop and pfl compute the same round.

    python benchmarks/cnn_round.py [--repeats 3] [--native] [--json out.json]
        [--peers [--pfl-python PY] [--flower-python PY] [--peer-threads 1]]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

NUM_USERS, IMAGES, COHORT, BATCH, LR = 1000, 50, 50, 10, 0.1
ROWS = ("fedjax_med nn.Conv", "fedjax_med patch CNN", "per-client jit", "compute floor")


def _models():
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  class SimpleCNN(nn.Module):
    """pfl-research's simple_cnn with flax.linen.Conv (VALID)."""

    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(32, (3, 3), padding="VALID")(x))
      x = nn.relu(nn.Conv(64, (3, 3), padding="VALID")(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
      x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
      return nn.Dense(10)(x)

  class PatchConvValid(nn.Module):
    """A 3x3 VALID convolution written by hand: patches @ kernel."""
    features: int

    @nn.compact
    def __call__(self, x):
      c = x.shape[-1]
      kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, c, self.features))
      bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
      patches = jax.lax.conv_general_dilated_patches(
          x, (3, 3), (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
      matrix = jnp.transpose(kernel, (2, 0, 1, 3)).reshape(c * 9, self.features)
      return patches @ matrix + bias

  class SimpleCNNPatch(nn.Module):
    """The same network with hand-written patch convolutions."""

    @nn.compact
    def __call__(self, x):
      x = nn.relu(PatchConvValid(32)(x))
      x = nn.relu(PatchConvValid(64)(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
      x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
      return nn.Dense(10)(x)

  return SimpleCNN(), SimpleCNNPatch()


def _setup(model_name: str):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  import fedjax_med as fm  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  x = rng.normal(size=(NUM_USERS, IMAGES, 32, 32, 3)).astype(np.float32)
  y = rng.integers(0, 10, size=(NUM_USERS, IMAGES)).astype(np.int32)
  data = fm.FederatedData(x=jnp.asarray(x), y=jnp.asarray(y),
                          mask=jnp.ones((NUM_USERS, IMAGES), bool))
  user_cnn, patch_cnn = _models()
  model = patch_cnn if model_name == "patch" else user_cnn
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))

  def loss(p, xb, yb):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, xb), yb)

  if model_name == "native":
    loss = fm.keep_native_convs(loss)
  return fm, jax, jnp, optax, data, loss, params


def _round_row(model_name: str):
  fm, jax, _, optax, data, loss, params = _setup(model_name)
  algo = fm.algorithms.fedavg(loss, client_optimizer=optax.sgd(LR), batch_size=BATCH,
                              local_epochs=1, cohort_size=COHORT, shuffle=False)
  box = {"state": algo.init(params), "r": 0}
  key = jax.random.PRNGKey(1)

  def run():
    box["state"], _ = algo.round(box["state"], data, jax.random.fold_in(key, box["r"]))
    box["r"] += 1
    jax.block_until_ready(box["state"].params)

  return run


def _per_client_row():
  import numpy as np  # pylint: disable=import-outside-toplevel
  fm, jax, jnp, optax, data, loss, params = _setup("user")
  loss = fm.convs_as_matmuls(loss)
  opt = optax.sgd(LR)
  steps = IMAGES // BATCH

  @jax.jit
  def local(p, x, y):
    def step(carry, t):
      q, s = carry
      xb = jax.lax.dynamic_slice_in_dim(x, t * BATCH, BATCH)
      yb = jax.lax.dynamic_slice_in_dim(y, t * BATCH, BATCH)
      g = jax.grad(lambda w: jnp.mean(loss(w, xb, yb)))(q)
      u, s = opt.update(g, s, q)
      return (optax.apply_updates(q, u), s), None
    (q, _), _ = jax.lax.scan(step, (p, opt.init(p)), jnp.arange(steps))
    return jax.tree.map(lambda a, b: a - b, p, q)

  box = {"p": params, "r": 0}

  def run():
    cohort = np.random.default_rng(box["r"]).choice(NUM_USERS, COHORT, replace=False)
    total = jax.tree.map(jnp.zeros_like, box["p"])
    for k in cohort:
      delta = local(box["p"], data.x[k], data.y[k])
      total = jax.tree.map(lambda t, d: t + d / COHORT, total, delta)
    box["p"] = jax.tree.map(lambda p, t: p - t, box["p"], total)
    box["r"] += 1
    jax.block_until_ready(box["p"])

  return run


def _floor_row():
  fm, jax, jnp, optax, data, loss, params = _setup("user")
  loss = fm.convs_as_matmuls(loss)
  opt = optax.sgd(LR)
  steps = IMAGES // BATCH
  x = data.x[:COHORT].reshape(COHORT, steps, BATCH, 32, 32, 3).transpose(1, 0, 2, 3, 4, 5)
  x = x.reshape(steps, COHORT * BATCH, 32, 32, 3)
  y = data.y[:COHORT].reshape(COHORT, steps, BATCH).transpose(1, 0, 2).reshape(steps, -1)

  @jax.jit
  def train(p, x, y):
    def step(carry, batch):
      q, s = carry
      g = jax.grad(lambda w: jnp.mean(loss(w, *batch)))(q)
      u, s = opt.update(g, s, q)
      return (optax.apply_updates(q, u), s), None
    (q, _), _ = jax.lax.scan(step, (p, opt.init(p)), (x, y))
    return q

  box = {"p": params}

  def run():
    box["p"] = train(box["p"], x, y)
    jax.block_until_ready(box["p"])

  return run


def worker(row: str, repeats: int) -> dict:
  make = {"fedjax_med nn.Conv": lambda: _round_row("user"),
          "fedjax_med patch CNN": lambda: _round_row("patch"),
          "fedjax_med native conv": lambda: _round_row("native"),
          "per-client jit": _per_client_row, "compute floor": _floor_row}[row]
  run = make()
  t0 = time.perf_counter()
  run()  # compile + first round
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
  return {"row": row, "median_s": statistics.median(times), "min_s": min(times),
          "max_s": max(times), "first_round_s": first, "peak_rss_mib": rss,
          "repeats": repeats}


PEERS = {"pfl-research": ("pfl_w4.py", ("pfl", "torch")),
         "Flower simulation": ("flower_w4.py", ("flwr", "ray", "torch"))}


def _peer_row(name: str, python: str, repeats: int, threads: int) -> dict | None:
  """Runs one peer script in `python`; its JSON line, or None (reason printed)."""
  script, modules = PEERS[name]
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers", script)
  env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
  try:
    probe = subprocess.run([python, "-c", "import " + ", ".join(modules)],
                           capture_output=True, text=True, check=False, env=env)
  except OSError as e:
    print(f"{name}: skipped ({python}: {e})", file=sys.stderr)
    return None
  if probe.returncode:
    reason = (probe.stderr.strip().splitlines() or ["import failed"])[-1]
    print(f"{name}: skipped ({python} cannot import {', '.join(modules)}: {reason};"
          " pass --pfl-python / --flower-python)", file=sys.stderr)
    return None
  out = subprocess.run([python, path, "--repeats", str(repeats), "--threads", str(threads)],
                       capture_output=True, text=True, check=False, env=env)
  if out.returncode:
    print(f"{name}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
    return None
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--native", action="store_true", help="also time XLA's native convs")
  parser.add_argument("--json", default=None)
  parser.add_argument("--peers", action="store_true",
                      help="also run the pfl-research and Flower rows (benchmarks/peers/)")
  parser.add_argument("--pfl-python", default=sys.executable,
                      help="interpreter with pfl[pytorch] and torch (default: this one)")
  parser.add_argument("--flower-python", default=sys.executable,
                      help="interpreter with flwr[simulation] and torch (default: this one)")
  parser.add_argument("--peer-threads", type=int, default=1,
                      help="torch.set_num_threads in the peers (Flower: per client actor)")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    print(json.dumps(worker(args.worker, args.repeats)))
    return 0
  rows = list(ROWS) + (["fedjax_med native conv"] if args.native else [])
  results = []
  for row in rows:
    out = subprocess.run([sys.executable, __file__, "--worker", row, "--repeats",
                          str(args.repeats)], capture_output=True, text=True, check=False,
                         env={**os.environ, "TQDM_DISABLE": "1"})
    if out.returncode:
      print(f"{row}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
      continue
    results.append(json.loads(out.stdout.strip().splitlines()[-1]))
  if args.peers:
    for name, python in (("pfl-research", args.pfl_python),
                         ("Flower simulation", args.flower_python)):
      result = _peer_row(name, python, args.repeats, args.peer_threads)
      if result is not None:
        results.append(result)
  floor = next((r["median_s"] for r in results if r["row"] == "compute floor"), None)
  print(f"W4: {NUM_USERS} users x {IMAGES} images 32x32x3, cohort {COHORT}, batch {BATCH},"
        f" 1 epoch; simple_cnn (1,626,442 parameters); {os.cpu_count()} CPU cores")
  print("| row | round (median s) | min-max s | first round (compile) s | x floor |"
        " peak RSS MiB |")
  print("|---|---|---|---|---|---|")
  for r in results:
    ratio = f"{r['median_s'] / floor:.2f}" if floor else "-"
    print(f"| {r['row']} | {r['median_s']:.2f} | {r['min_s']:.2f}-{r['max_s']:.2f} |"
          f" {r['first_round_s']:.1f} | {ratio} | {r['peak_rss_mib']:.0f} |")
  for r in results:
    if "versions" in r:
      extra = (f"; peak RSS summed over {r['tree_processes']} processes (PSS sum"
               f" {r['tree_pss_mib']:.0f} MiB, driver alone {r['driver_peak_rss_mib']:.0f}"
               " MiB)" if "tree_processes" in r else "")
      print(f"{r['row']}: torch threads {r['threads']}"
            + (f", {r['client_cpus']:g} CPU per client actor" if "client_cpus" in r else "")
            + f"; {', '.join(f'{k} {v}' for k, v in r['versions'].items())}{extra}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
