"""W5: cross-silo segmentation rounds: the CHASE_DB1 U-Net on 5 clinics, the 3D U-Net on
MSD Hippocampus sites.

Workloads (one FedAvg round = 1 local epoch on every site, n_k/n weighting, server SGD 1):

  W5a CHASE_DB1 retinal vessels: 5 clinics x 4 fundus images 960 x 999 (the bundled
      data), `fm.models.UNet(features)` (2D, 29,465 parameters by default), 32 random
      48 x 48 patches per image per round (128 per clinic), batch 8 (16 Adam steps per
      clinic), BCE + soft Dice: the configuration of `experiments/retina_vessels.py`.
  W5b MSD Hippocampus 3D: K sites x N volumes padded to 48 x 64 x 48 (synthetic values of
      the real shape, so the row does not depend on the loader), `fm.models.UNet3D`
      (85,035 parameters by default), batch 2, softmax CE + soft Dice over 3 classes.

Rows (each in its own process, so peak RSS is per row; median of `--repeats` rounds
after one warm-up round that includes compilation):

  fedjax_med          `algo.round`: one jit, all sites vmapped, a lax.scan over local
                      steps (W5a: `with_patches(fedavg)`, patch sampling inside the round)
  fedjax_med chunk=1  W5b only: the same round with `client_chunk_size=1` (sites one
                      after another inside the jit: the memory bound)
  per-client jit      the K sites one after another, each a jitted local training of its
                      own (already sampled) rows, the n_k/n average in Python
  compute floor       one model, the same number of sequential steps on batches of
                      K x B rows (every site's batch t side by side): the same FLOPs
                      without per-site parameters

    python benchmarks/segmentation_round.py [--workload w5a|w5b|all] [--repeats 3]
        [--features 8,16,32] [--sites 4] [--volumes 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import _harness  # benchmarks/_harness.py (no jax import)

ROWS = {"w5a": ("fedjax_med", "per-client jit", "compute floor"),
        "w5b": ("fedjax_med", "fedjax_med chunk=1", "per-client jit", "compute floor")}


_peak_rss_mib = _harness.peak_rss_mib   # VmHWM, else ru_maxrss


def _w5a(args):
  """(loss_fn, params, per-site rows of patches, the round's algorithm, its data)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  import fedjax_med as fm  # pylint: disable=import-outside-toplevel
  from fedjax_med.algorithms.segmentation import patch_data, with_patches  # pylint: disable=import-outside-toplevel
  from fedjax_med.losses.segmentation import bce_dice  # pylint: disable=import-outside-toplevel

  train, _ = fm.datasets.chase_db1(num_sites=5)
  model = fm.models.UNet(features=args.features)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 48, 48, 3)))
  loss = bce_dice(model.apply, dice_weight=1.0, reduction="batch")
  opt = optax.adam(3e-3)
  algo = with_patches(fm.algorithms.fedavg(loss, client_optimizer=opt, local_epochs=1,
                                           batch_size=8), patches_per_image=32, patch_size=48)
  rows = patch_data(train, jax.random.PRNGKey(1), 32, 48)
  return fm, loss, opt, params, algo, train, rows, 8


def _w5b(args):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  import fedjax_med as fm  # pylint: disable=import-outside-toplevel
  from fedjax_med.losses.segmentation import softmax_dice  # pylint: disable=import-outside-toplevel

  k, n, shape = args.sites, args.volumes, (48, 64, 48)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(k, n) + shape + (1,)).astype(np.float32)
  classes = rng.integers(0, 3, size=(k, n) + shape).astype(np.float32)
  valid = np.zeros((k, n) + shape, np.float32)
  valid[:, :, :36, :50, :36] = 1.0                   # a typical 36 x 50 x 36 crop
  y = np.stack([classes, valid], axis=-1)
  data = fm.FederatedData(x=jnp.asarray(x), y=jnp.asarray(y), mask=jnp.ones((k, n), bool))
  model = fm.models.UNet3D(features=args.features, num_classes=3)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + shape + (1,)))
  loss = softmax_dice(model.apply, num_classes=3)
  opt = optax.adam(1e-3)
  chunk = {"client_chunk_size": 1} if args.row == "fedjax_med chunk=1" else {}
  algo = fm.algorithms.fedavg(loss, client_optimizer=opt, local_epochs=1, batch_size=2,
                              shuffle=False, **chunk)
  return fm, loss, opt, params, algo, data, data, 2


def _runner(args):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  fm, loss, opt, params, algo, data, rows, batch = (_w5a if args.workload == "w5a"
                                                     else _w5b)(args)
  if args.row.startswith("fedjax_med"):
    box = {"state": algo.init(params), "r": 0}
    key = jax.random.PRNGKey(2)

    def run():
      box["state"], _ = algo.round(box["state"], data, jax.random.fold_in(key, box["r"]))
      box["r"] += 1
      jax.block_until_ready(box["state"].params)
    return run

  from fedjax_med.core.objective import is_batch_loss  # pylint: disable=import-outside-toplevel
  batch_level = is_batch_loss(loss)
  from fedjax_med.core.conv import round_loss  # pylint: disable=import-outside-toplevel
  loss = round_loss(loss)      # the convolution rule the round applies (per backend)
  x, y, mask = np.asarray(rows.x), np.asarray(rows.y), np.asarray(rows.mask)
  counts = mask.sum(1)
  steps = int(counts.max()) // batch

  def mean_loss(w, xb, yb):
    if batch_level:   # a `fedjax_med.batch_loss`: (params, x, y, mask) -> ()
      return loss(w, xb, yb, jnp.ones(xb.shape[0], bool))
    return jnp.mean(loss(w, xb, yb))

  def sgd_steps(p, xs, ys):
    """`steps` optimizer steps on xs [T, B', ...] (ys likewise) from p."""
    def step(carry, b):
      q, s = carry
      g = jax.grad(mean_loss)(q, b[0], b[1])
      u, s = opt.update(g, s, q)
      return (optax.apply_updates(q, u), s), None
    (q, _), _ = jax.lax.scan(step, (p, opt.init(p)), (xs, ys))
    return q

  if args.row == "per-client jit":
    local = jax.jit(sgd_steps)
    site_x = [jnp.asarray(x[k, :counts[k]][:steps * batch].reshape(
        (steps, batch) + x.shape[2:])) for k in range(x.shape[0])]
    site_y = [jnp.asarray(y[k, :counts[k]][:steps * batch].reshape(
        (steps, batch) + y.shape[2:])) for k in range(y.shape[0])]
    weights = counts / counts.sum()
    box = {"p": params}

    def run():
      total = jax.tree.map(jnp.zeros_like, box["p"])
      for k in range(len(site_x)):
        q = local(box["p"], site_x[k], site_y[k])
        total = jax.tree.map(lambda t, a, w=float(weights[k]): t + w * a, total, q)
      box["p"] = total
      jax.block_until_ready(box["p"])
    return run

  # compute floor: step t trains on every site's batch t side by side.
  k_sites = x.shape[0]
  fx = x[:, :steps * batch].reshape((k_sites, steps, batch) + x.shape[2:]).swapaxes(0, 1)
  fy = y[:, :steps * batch].reshape((k_sites, steps, batch) + y.shape[2:]).swapaxes(0, 1)
  fx = jnp.asarray(fx.reshape((steps, k_sites * batch) + x.shape[2:]))
  fy = jnp.asarray(fy.reshape((steps, k_sites * batch) + y.shape[2:]))
  train = jax.jit(sgd_steps)
  box = {"p": params}

  def run():
    box["p"] = train(box["p"], fx, fy)
    jax.block_until_ready(box["p"])
  return run


def worker(args) -> dict:
  run = _runner(args)
  t0 = time.perf_counter()
  run()
  first = time.perf_counter() - t0
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  return {"workload": args.workload, "row": args.row, "median_s": statistics.median(times),
          "min_s": min(times), "max_s": max(times), "first_round_s": first,
          "peak_rss_mib": _peak_rss_mib(), "repeats": args.repeats}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workload", default="all", choices=("w5a", "w5b", "all"))
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--features", default=None,
                      help="U-Net channels, e.g. 8,16,32 (default: the model's)")
  parser.add_argument("--sites", type=int, default=4, help="W5b sites")
  parser.add_argument("--volumes", type=int, default=8, help="W5b volumes per site")
  parser.add_argument("--json", default=None)
  parser.add_argument("--row", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.features = (tuple(int(f) for f in args.features.split(",")) if args.features
                   else (8, 16, 32))
  if args.row:
    print(json.dumps(worker(args)))
    return 0
  workloads = ("w5a", "w5b") if args.workload == "all" else (args.workload,)
  results = []
  for workload in workloads:
    for row in ROWS[workload]:
      cmd = [sys.executable, __file__, "--workload", workload, "--row", row, "--repeats",
             str(args.repeats), "--features", ",".join(map(str, args.features)),
             "--sites", str(args.sites), "--volumes", str(args.volumes)]
      out = subprocess.run(cmd, capture_output=True, text=True, check=False,
                           env={**os.environ, "TQDM_DISABLE": "1"})
      if out.returncode:
        print(f"{workload} {row}: failed\n{out.stderr[-3000:]}", file=sys.stderr)
        continue
      results.append(json.loads(out.stdout.strip().splitlines()[-1]))
      print(f"done {workload} {row}: {results[-1]['median_s']:.3f} s", file=sys.stderr)
  print(f"W5; features {args.features}; W5b: {args.sites} sites x {args.volumes} volumes"
        f" 48x64x48, batch 2; {os.cpu_count()} CPU cores")
  print("| workload | row | round (median s) | min-max s | first round (compile) s |"
        " x floor | peak RSS MiB |")
  print("|---|---|---|---|---|---|---|")
  for r in results:
    floor = next((q["median_s"] for q in results
                  if q["workload"] == r["workload"] and q["row"] == "compute floor"), None)
    ratio = f"{r['median_s'] / floor:.2f}" if floor else "-"
    print(f"| {r['workload']} | {r['row']} | {r['median_s']:.3f} |"
          f" {r['min_s']:.3f}-{r['max_s']:.3f} | {r['first_round_s']:.1f} | {ratio} |"
          f" {r['peak_rss_mib']:.0f} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
