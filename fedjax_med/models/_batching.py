"""The batching rule that keeps per-client convolutions on XLA's fast path.

A federated round runs the clients under `jax.vmap`, each with its own
parameters, so a convolution layer sees a batch of kernels. XLA's default
rule turns that into one grouped convolution, which XLA:CPU runs far off its
fast path. `per_client_kernels(fn)` wraps `fn(x, kernel)` (x `[B, ...]` ->
`[B, ...]`) in a `custom_vmap` whose rule instead

  * folds a batch of inputs over a shared kernel into the batch axis B
    (`[N, B, ...]` -> `[N * B, ...]`, one convolution), and
  * runs one ordinary convolution per kernel (`lax.map`) when the kernels are
    batched: a short program to compile, and forward convolutions stay on the
    fast path inside loops.

Used by `fm.models.unet.conv2d_same` and `fm.models.conv3d.conv3d_same`.
"""

from __future__ import annotations

from typing import Callable

import jax
from jax import custom_batching


def per_client_kernels(fn: Callable[[jax.Array, jax.Array], jax.Array]
                       ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """`fn(x, kernel)` with the per-client batching rule above (module docstring)."""

  @custom_batching.custom_vmap
  def mapped(x, kernel):
    return fn(x, kernel)

  @mapped.def_vmap
  def rule(axis_size, in_batched, x, kernel):  # pylint: disable=unused-argument
    x_batched, kernel_batched = in_batched
    if not kernel_batched:
      if not x_batched:
        return mapped(x, kernel), False
      n, b = x.shape[:2]
      out = mapped(x.reshape((n * b,) + x.shape[2:]), kernel)
      return out.reshape((n, b) + out.shape[1:]), True
    if x_batched:
      return jax.lax.map(lambda xk: mapped(*xk), (x, kernel)), True
    return jax.lax.map(lambda k: mapped(x, k), kernel), True

  return mapped
