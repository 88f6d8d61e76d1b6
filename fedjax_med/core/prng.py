"""Random draws of multi-dimensional arrays that compile fast on XLA's CPU backend.

With `jax_threefry_partitionable` on (JAX's default since 0.5), the value drawn at
flat (row-major) index i of an array of shape S is threefry2x32(key, i), whatever S
is. So `jax.random.normal(key, S)` equals
`jax.random.normal(key, (prod(S),)).reshape(S)` bit for bit (and likewise for
`uniform`, `bits`, `truncated_normal`). The values are the same; the compile time
is not. XLA's CPU compiler is slow on the threefry hash of a high-rank array:
measured with jax 0.10.2 on a 2-core AVX2 CPU, compiling `jax.random.normal` of
shape `[4, 2, 4, 9, 8]` takes 4.8 s, and of the same 576 values drawn flat 0.3 s;
a 3x3x3 convolution kernel `[3, 3, 3, 8, 16]` 5.0 s against 0.4 s. A 3D U-Net's
`init` spends most of its compile time there.

The functions here draw flat and reshape: the values of JAX's own draw of the full
shape (checked bit for bit in tests/test_prng.py, against `jax.random` and
`flax.linen.initializers`), at the compile time of a flat draw. With
`jax_threefry_partitionable` off, JAX's original threefry also draws flat and
reshapes, so the equality should hold there too (read from JAX's code; the tests
check the default setting only).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

Shape = Sequence[int]


def _flat(shape: Shape) -> tuple[int]:
  return (math.prod(int(d) for d in shape),)


def normal(key: jax.Array, shape: Shape, dtype: Any = jnp.float32) -> jax.Array:
  """`jax.random.normal(key, shape, dtype)`, drawn flat: the same values."""
  return jax.random.normal(key, _flat(shape), dtype).reshape(tuple(shape))


def uniform(key: jax.Array, shape: Shape, dtype: Any = jnp.float32, minval: Any = 0.0,
            maxval: Any = 1.0) -> jax.Array:
  """`jax.random.uniform(key, shape, dtype, minval, maxval)` with scalar bounds, drawn
  flat: the same values."""
  if jnp.ndim(minval) or jnp.ndim(maxval):
    raise ValueError("prng.uniform: minval and maxval must be scalars (array bounds"
                     " would broadcast against the flat draw, not against shape)")
  return jax.random.uniform(key, _flat(shape), dtype, minval, maxval).reshape(tuple(shape))


def lecun_normal() -> jax.nn.initializers.Initializer:
  """`flax.linen.initializers.lecun_normal()` for kernels `[..., C_in, C_out]`.

  Truncated normal on [-2, 2] scaled to variance 1 / fan_in, fan_in = C_in times the
  product of the leading (receptive-field) axes (`in_axis=-2, out_axis=-1`, no batch
  axis). It draws the `[fan_in, C_out]` matrix, which has the same fan_in and the same
  values in the same order, and reshapes: bit-identical to flax's initializer on the
  full kernel shape, which compiles slowly for 4D and 5D convolution kernels.
  """
  base = jax.nn.initializers.lecun_normal()

  def init(key: jax.Array, shape: Shape, dtype: Any = jnp.float32) -> jax.Array:
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2:
      raise ValueError(f"prng.lecun_normal: a kernel needs >= 2 axes [..., C_in, C_out],"
                       f" got shape {shape}")
    return base(key, (math.prod(shape[:-1]), shape[-1]), dtype).reshape(shape)

  return init


__all__ = ["normal", "uniform", "lecun_normal"]
