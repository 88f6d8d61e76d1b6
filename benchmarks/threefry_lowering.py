"""XLA:CPU compile time of fedjax_med programs under JAX's two threefry lowerings.

JAX lowers its threefry2x32 hash (every key derivation and random draw) on CPU as a
rolled loop (5 iterations of 4 rounds) and on GPU/TPU as the 20 rounds written out.
Both compute the same uint32 arithmetic, so the bits are the same (tests/test_prng.py
checks them); only XLA's compile time differs. The test harness uses the unrolled
lowering on CPU (tests/_unrolled_threefry.py), except in the DP-SGD test files, where
this table shows it compiles slower. fedjax_med itself does not patch JAX.

Each row: the median of `--repeats` fresh compiles (JAX's caches cleared before each;
the persistent cache is off), in seconds, and whether the outputs of the two compiled
programs are bit-identical. Run:

    .venv/bin/python benchmarks/threefry_lowering.py      # ~3 min on 2 idle cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_ENABLE_COMPILATION_CACHE", "false")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import optax
from jax._src.interpreters import mlir  # pylint: disable=g-import-not-at-top
from jax._src.random import threefry2x32  # pylint: disable=g-import-not-at-top

import fedjax_med as fm
from fedjax_med.algorithms.dp_fedavg import dp_sgd_fedavg

import compile_flags  # pylint: disable=g-bad-import-order (benchmarks/, the script's dir)

LOWERINGS = {
    "rolled (JAX's CPU default)": threefry2x32._threefry2x32_cpu_lowering_rule,  # pylint: disable=protected-access
    "unrolled": threefry2x32._threefry2x32_lowering_rule,  # pylint: disable=protected-access
}


def _programs():
  """(name, function, args): each compiled under both lowerings. The logistic-regression
  and CNN rounds are compile_flags.py's; the other two rounds use its logistic data."""
  rounds = compile_flags._rounds()  # pylint: disable=protected-access
  _, fedavg, params, data = next(rounds)
  _, cnn_algo, cnn_params, cnn_data = next(rounds)
  key = jax.random.key(0)
  fedavg_steps = fm.algorithms.fedavg(compile_flags.linear_bce, client_optimizer=optax.sgd(0.1),
                                      batch_size=2, local_steps=5)
  dp = dp_sgd_fedavg(compile_flags.linear_bce, max_examples=16, clip_norm=0.5,
                     noise_multiplier=1.0, expected_batch_size=4.0,
                     client_optimizer=optax.sgd(0.1), local_steps=3)
  unet = fm.models.UNet3D(num_classes=3, features=(8, 16, 32))
  return [
      ("FedAvg round, logistic regression, K=3, 2 epochs", fedavg.pure_round,
       (fedavg.init(params), data, key)),
      ("FedAvg round, logistic regression, K=3, 5 local steps", fedavg_steps.pure_round,
       (fedavg_steps.init(params), data, key)),
      ("DP-SGD FedAvg round, logistic regression, K=3, 3 steps", dp.pure_round,
       (dp.init(params), data, key)),
      ("FedAvg round, CNN on 16x16 images, K=2", cnn_algo.pure_round,
       (cnn_algo.init(cnn_params), cnn_data, key)),
      ("UNet3D(8, 16, 32).init on 16^3", unet.init, (key, jnp.zeros((1, 16, 16, 16, 1)))),
      ("jax.random.normal, shape [4, 2, 4, 9, 8]",
       lambda k: jax.random.normal(k, (4, 2, 4, 9, 8)), (key,)),
      ("jax.random.split(key, 1000)", lambda k: jax.random.key_data(jax.random.split(k, 1000)),
       (key,)),
  ]


def _compile(fn, args, repeats):
  """(median compile seconds, outputs as NumPy) under the lowering registered now."""
  times = []
  for _ in range(repeats):
    jax.clear_caches()
    lowered = jax.jit(fn).lower(*args)
    start = time.perf_counter()
    compiled = lowered.compile()
    times.append(time.perf_counter() - start)
  out = compiled(*args)
  leaves = [np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
                       else x) for x in jax.tree_util.tree_leaves(out)]
  return statistics.median(times), leaves


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)
  print(f"jax {jax.__version__}, backend {jax.default_backend()}; median of "
        f"{args.repeats} fresh compiles, seconds\n")
  print("| program | " + " | ".join(LOWERINGS) + " | ratio | same bits |")
  print("|---|" + "---|" * (len(LOWERINGS) + 2))
  try:
    for name, fn, fn_args in _programs():
      seconds, outputs = [], []
      for rule in LOWERINGS.values():
        mlir.register_lowering(threefry2x32.threefry2x32_p, rule, platform="cpu")
        s, out = _compile(fn, fn_args, args.repeats)
        seconds.append(s)
        outputs.append(out)
      same = all(np.array_equal(a, b) for a, b in zip(*outputs))
      print(f"| {name} | " + " | ".join(f"{s:.2f}" for s in seconds)
            + f" | {seconds[0] / seconds[1]:.1f}x | {'yes' if same else 'NO'} |")
  finally:
    mlir.register_lowering(threefry2x32.threefry2x32_p,
                           LOWERINGS["rolled (JAX's CPU default)"], platform="cpu")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
