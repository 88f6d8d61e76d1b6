"""Probe: a vmapped SGD scan of a CNN with native nn.Conv vs `convs_as_matmuls`.

Workload (issue 18): pfl-research's simple_cnn, Conv 3->32 3x3 VALID, ReLU,
Conv 32->64 3x3 VALID, ReLU, MaxPool 2, Dense 12544->128, ReLU, Dense
128->10; K = 10 clients, each running 5 SGD steps (lax.scan) on batches of
10 images 32x32x3, all clients under one jax.vmap, one jax.jit. Each variant
is compiled and run once (warm-up), then timed 3 times; the table gives the
median (and min, max) wall time and the process CPU time per run, and the
ratio of medians. Both variants start from the same parameters; the maximum
difference of their final parameters is printed as a sanity check.

  .venv/bin/python benchmarks/conv_rewrite_probe.py [--clients 10] [--steps 5] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fedjax_med.core.conv import convs_as_matmuls


class SimpleCNN(nn.Module):
  """pfl-research simple_cnn: x [B, 32, 32, 3] -> logits [B, 10]."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(32, (3, 3), padding="VALID")(x))
    x = nn.relu(nn.Conv(64, (3, 3), padding="VALID")(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(nn.Dense(128)(x.reshape((x.shape[0], -1))))
    return nn.Dense(10)(x)


def make_round(apply, lr=0.05):
  """vmap over clients of a lax.scan of SGD steps on softmax cross-entropy."""

  def loss(params, x, y):
    logits = apply(params, x)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], 1)[:, 0])

  def client(params, xs, ys):
    def step(p, batch):
      value, grads = jax.value_and_grad(loss)(p, *batch)
      return jax.tree_util.tree_map(lambda a, g: a - lr * g, p, grads), value
    return lax.scan(step, params, (xs, ys))

  return jax.jit(jax.vmap(client))


def time_runs(fn, args, runs):
  out = jax.block_until_ready(fn(*args))  # warm-up: compile + first run
  walls, cpus = [], []
  for _ in range(runs):
    w0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    walls.append(time.perf_counter() - w0)
    cpus.append(time.process_time() - c0)
  return out, walls, cpus


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--clients", type=int, default=10)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--batch", type=int, default=10)
  parser.add_argument("--runs", type=int, default=3)
  args = parser.parse_args()

  model = SimpleCNN()
  k, s, b = args.clients, args.steps, args.batch
  xs = jax.random.normal(jax.random.key(0), (k, s, b, 32, 32, 3))
  ys = jax.random.randint(jax.random.key(1), (k, s, b), 0, 10)
  params = model.init(jax.random.key(2), xs[0, 0])
  params = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (k, *a.shape)), params)

  variants = {"nn.Conv (native)": make_round(model.apply),
              "convs_as_matmuls": make_round(convs_as_matmuls(model.apply))}
  load_before = os.getloadavg()[0]
  results = {}
  for name, fn in variants.items():
    results[name] = time_runs(fn, (params, xs, ys), args.runs)

  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs; "
        f"1-min load average before/after {load_before:.1f}/{os.getloadavg()[0]:.1f}")
  print("NOTE: this CPU is shared with other jobs; wall times are noisy, CPU times are "
        "this process's own.")
  print(f"workload: simple_cnn, K={k} clients x {s} SGD steps x batch {b} (32x32x3), "
        f"vmap + scan + jit; median of {args.runs} runs after warm-up\n")
  print(f"{'variant':<20} {'median s':>9} {'min s':>8} {'max s':>8} {'CPU s (median)':>15}")
  for name, (_, walls, cpus) in results.items():
    print(f"{name:<20} {statistics.median(walls):9.3f} {min(walls):8.3f} {max(walls):8.3f} "
          f"{statistics.median(cpus):15.3f}")
  (native_out, native_walls, native_cpus), (new_out, new_walls, new_cpus) = results.values()
  wall_ratio = statistics.median(native_walls) / statistics.median(new_walls)
  print(f"\nratio native / convs_as_matmuls: wall {wall_ratio:.1f}x, "
        f"CPU {statistics.median(native_cpus) / statistics.median(new_cpus):.1f}x")
  diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(c))))
             for a, c in zip(jax.tree_util.tree_leaves(native_out),
                             jax.tree_util.tree_leaves(new_out)))
  print(f"max |difference| of final params and losses (float32): {diff:.2e}")


if __name__ == "__main__":
  main()
