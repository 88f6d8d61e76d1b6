"""Compile time of random draws of high-rank arrays: jax.random vs fedjax_med.core.prng.

XLA's CPU compiler is slow on JAX's (partitionable) threefry draw of an array of
rank >= 3; `fedjax_med.core.prng` draws the same values flat and reshapes
(bit-identical, tests/test_prng.py). Each row: the median of `--repeats` fresh
compiles (JAX's caches cleared before each; the persistent cache is off), in
seconds, then the ratio. Run:

    .venv/bin/python benchmarks/prng_compile.py            # ~2 min on 2 idle cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_ENABLE_COMPILATION_CACHE", "false")

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp

from fedjax_med.core import prng
from fedjax_med.models import conv3d, unet3d


def _compile_seconds(fn, *args, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    jax.clear_caches()
    start = time.perf_counter()
    jax.jit(fn).lower(*args).compile()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _unet3d_init(initializer, features):
  """UNet3D(features).init with the given kernel initializer module (flax's or prng)."""
  model = unet3d.UNet3D(num_classes=3, features=features, conv="planes")
  x = jnp.zeros((1, 16, 16, 16, 1))

  def init(key):   # traced by _compile_seconds with `initializer` in place
    old = conv3d.prng, unet3d.prng
    conv3d.prng = unet3d.prng = initializer
    try:
      return model.init(key, x)
    finally:
      conv3d.prng, unet3d.prng = old

  return init


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)
  key = jax.random.key(0)

  class FlaxInit:   # flax's own initializer on the full kernel shape
    lecun_normal = staticmethod(nn.initializers.lecun_normal)

  rows = []
  for name, shape in [("data [K, B, X, Y, C]", (4, 2, 4, 9, 8)),
                      ("2D kernel [3, 3, 16, 32]", (3, 3, 16, 32)),
                      ("3D kernel [3, 3, 3, 8, 16]", (3, 3, 3, 8, 16)),
                      ("flat [4608]", (4608,))]:
    rows.append((f"normal {name}",
                 _compile_seconds(lambda k, s=shape: jax.random.normal(k, s), key,
                                  repeats=args.repeats),
                 _compile_seconds(lambda k, s=shape: prng.normal(k, s), key,
                                  repeats=args.repeats)))
  for features in [(2, 4), (8, 16, 32)]:
    rows.append((f"UNet3D{features}.init",
                 _compile_seconds(_unet3d_init(FlaxInit, features), key, repeats=args.repeats),
                 _compile_seconds(_unet3d_init(prng, features), key, repeats=args.repeats)))
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"median of {args.repeats} compiles (s)\n")
  print("| draw | jax.random / flax | fedjax_med.core.prng | ratio |")
  print("|---|---|---|---|")
  for name, ref, ours in rows:
    print(f"| {name} | {ref:.2f} | {ours:.2f} | {ref / ours:.1f}x |")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
