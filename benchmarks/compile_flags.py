"""XLA:CPU compile time and run time of fedjax_med rounds under XLA's fast-compile flags.

Two thirds of the test suite's time is XLA compiling. This script measures what XLA's
flags for faster compiles do to one round's compile and run time, and how far the
results move, against XLA's defaults. Each flag set runs in a fresh process (XLA reads
XLA_FLAGS once). Each row: the median of `--repeats` fresh compiles (JAX's caches
cleared before each; the persistent cache is off) and of `--repeats` runs of the
compiled round, in seconds; "max |diff|" is the largest absolute difference of the
round's new parameters from those of XLA's defaults. benchmarks/README.md says why
the tests nevertheless keep XLA's defaults (these flags miscompute a 3D U-Net's
gradient). Run:

    .venv/bin/python benchmarks/compile_flags.py        # ~3.5 min on 2 idle cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

LEGACY = "--xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false"
FLAG_SETS = {
    "XLA defaults": "",
    "legacy emitters": LEGACY,
    "legacy emitters + level 1": LEGACY + " --xla_backend_optimization_level=1",
    "legacy emitters + level 0": LEGACY + " --xla_backend_optimization_level=0",
}
PROGRAMS = ("FedAvg, logistic regression, K=3, 2 epochs",
            "FedAvg, CNN on 16x16 images, K=2",
            "FedAvg, UNet3D(4, 8) on 16^3 volumes, K=2")


def linear_bce(params, x, y):
  """Per-example BCE of logistic regression, [B] (the benchmarks' smallest model)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  z = x @ params["w"] + params["b"]
  return jnp.logaddexp(0.0, z) - y * z


linear_bce.label_type = "binary"


def _rounds():
  """(name, algorithm, initial params, data) for each program (also used by
  benchmarks/threefry_lowering.py)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  import fedjax_med as fm  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  sites = [(rng.normal(size=(n, 3)).astype(np.float32),
            (rng.uniform(size=n) < 0.5).astype(np.float32)) for n in (7, 3, 5)]
  yield (PROGRAMS[0], fm.algorithms.fedavg(linear_bce, client_optimizer=optax.sgd(0.1),
                                           batch_size=2, local_epochs=2),
         {"w": jnp.full((3,), 0.1), "b": jnp.zeros(())},
         fm.FederatedData.from_sites(sites, label_type="binary"))

  cnn = fm.models.CNN()
  images = rng.normal(size=(2, 6, 16, 16, 1)).astype(np.float32)
  labels = (rng.uniform(size=(2, 6)) < 0.5).astype(np.float32)
  cnn_loss = fm.losses.sigmoid_binary_cross_entropy(
      lambda p, x: cnn.apply(p, x).squeeze(-1))
  yield (PROGRAMS[1], fm.algorithms.fedavg(cnn_loss, client_optimizer=optax.sgd(0.1),
                                           batch_size=2, local_epochs=1),
         cnn.init(jax.random.key(1), images[0, :1]),
         fm.FederatedData.from_sites([(images[k], labels[k]) for k in range(2)],
                                     label_type="binary"))

  unet = fm.models.UNet3D(num_classes=3, features=(4, 8))
  volumes = rng.normal(size=(2, 3, 16, 16, 16, 1)).astype(np.float32)
  target = np.where(volumes[..., 0] > 0.8, 1, np.where(volumes[..., 0] < -0.8, 2, 0))
  seg = np.stack([target, np.ones_like(target)], -1).astype(np.float32)
  unet_loss = fm.losses.softmax_dice(unet.apply, num_classes=3)
  yield (PROGRAMS[2], fm.algorithms.fedavg(unet_loss, client_optimizer=optax.adam(1e-3),
                                           batch_size=1, local_steps=2),
         unet.init(jax.random.key(2), volumes[0, :1]),
         fm.FederatedData.from_sites([(volumes[k], seg[k]) for k in range(2)],
                                     label_type="multiclass"))


def measure(repeats: int) -> dict:
  """In this process (XLA_FLAGS already set): {program: [compile_s, run_s, params]}."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  results = {}
  for name, algo, params, data in _rounds():
    state = algo.init(params, data)
    key = jax.random.key(0)
    round_fn = jax.jit(algo.pure_round)
    compiles, runs = [], []
    for _ in range(repeats):
      jax.clear_caches()
      start = time.perf_counter()
      compiled = round_fn.lower(state, data, key).compile()
      compiles.append(time.perf_counter() - start)
    for _ in range(repeats):
      start = time.perf_counter()
      new_state, _ = compiled(state, data, key)
      jax.block_until_ready(new_state)
      runs.append(time.perf_counter() - start)
    leaves = [np.asarray(leaf, np.float64).ravel().tolist()
              for leaf in jax.tree_util.tree_leaves(new_state.params)]
    results[name] = [statistics.median(compiles), statistics.median(runs), leaves]
  return results


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(measure(args.repeats)))
    return 0
  by_flags = {}
  for label, flags in FLAG_SETS.items():
    env = dict(os.environ, XLA_FLAGS=flags, JAX_ENABLE_COMPILATION_CACHE="false")
    out = subprocess.run([sys.executable, __file__, "--child", "--repeats", str(args.repeats)],
                         env=env, check=True, capture_output=True, text=True).stdout
    by_flags[label] = json.loads(out.strip().splitlines()[-1])
  reference = by_flags["XLA defaults"]
  print(f"median of {args.repeats} fresh compiles / runs of one round, seconds\n")
  print("| program | XLA flags | compile | run | max abs diff of the new params |")
  print("|---|---|---|---|---|")
  for name in PROGRAMS:
    for label in FLAG_SETS:
      compile_s, run_s, leaves = by_flags[label][name]
      diff = max(abs(a - b) for got, want in zip(leaves, reference[name][2])
                 for a, b in zip(got, want))
      print(f"| {name} | {label} | {compile_s:.2f} | {run_s:.4f} | {diff:.1e} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
