"""Stochastic uniform quantisation to b bits with a per-tensor range.

Suresh, Yu, Kumar & McMahan, "Distributed Mean Estimation with Limited
Communication", ICML 2017, stochastic k-level quantisation (k = 2^b levels):
for one tensor x `[d]` with lo = min_i x_i, hi = max_i x_i and step
Delta = (hi - lo) / (2^b - 1), each coordinate is rounded to one of its two
neighbouring levels l_i <= x_i <= u_i = l_i + Delta at random,

    Q(x)_i = u_i with probability (x_i - l_i) / Delta,  l_i otherwise,

so E[Q(x)] = x (unbiased) and

    E ||Q(x) - x||^2 = sum_i (u_i - x_i)(x_i - l_i) <= d Delta^2 / 4
                     = d (hi - lo)^2 / (4 (2^b - 1)^2) <= d ||x||^2 / (2 (2^b - 1)^2)

(Suresh et al.'s bound for stochastic k-level quantisation, k = 2^b).
Payload per tensor: the level indices packed b bits each into uint8 words,
plus (lo, hi) as float32 `[2]`. b = 1 is valid (each coordinate becomes lo or
hi). b = 32 is the identity (float32 values sent as they are).
"""

from __future__ import annotations

import numbers

import jax.numpy as jnp

from fedjax_med.aggregators.compression.base import (Compressor, LeafCodec, float32, per_tensor,
                                         stochastic_round)
from fedjax_med.aggregators.compression.packing import MAX_PACKED_BITS, pack_bits, unpack_bits
from fedjax_med.core.options import OptionError


def check_bits(name: str, bits, minimum: int = 1) -> int:
  """bits must be an integer in [minimum, 16] or exactly 32 (identity)."""
  if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
    raise OptionError(f"{name}: bits must be an integer, got {bits!r}")
  if bits == 32:
    return 32
  if bits < minimum:
    raise OptionError(f"{name}: bits must be >= {minimum}, got {bits}")
  if bits > MAX_PACKED_BITS:
    raise OptionError(
        f"{name}: bits must be <= {MAX_PACKED_BITS} (packed codes) or 32 (float32, no"
        f" compression), got {bits}")
  return int(bits)


def uniform_leaf(bits: int) -> LeafCodec:
  """The per-tensor codec of `uniform(bits)` (bits in 1..16)."""
  levels = (1 << bits) - 1

  def encode(x, key):
    if x.shape[0] == 0:
      return {"codes": jnp.zeros((0,), jnp.uint8), "scale": jnp.zeros((2,), jnp.float32)}
    lo, hi = jnp.min(x), jnp.max(x)
    step = (hi - lo) / levels
    positive = step > 0
    t = jnp.where(positive, (x - lo) / jnp.where(positive, step, 1.0), 0.0)
    q = jnp.clip(stochastic_round(t, key), 0, levels).astype(jnp.uint32)
    return {"codes": pack_bits(q, bits), "scale": jnp.stack([lo, hi]).astype(jnp.float32)}

  def decode(payload, d):
    lo, hi = payload["scale"][0], payload["scale"][1]
    q = unpack_bits(payload["codes"], bits, d).astype(jnp.float32)
    return lo + q * ((hi - lo) / levels)

  return LeafCodec(f"uniform{bits}", encode, decode)


def uniform(bits: int) -> Compressor:
  """Unbiased stochastic uniform quantisation, 2^bits levels on [min, max] per tensor.

  Args:
    bits: 1..16 bits per coordinate, or 32 for the identity (float32).

  Raises:
    OptionError when bits < 1, bits is not an integer, or 16 < bits < 32.
  """
  bits = check_bits("uniform", bits, minimum=1)
  if bits == 32:
    return float32()
  return per_tensor(uniform_leaf(bits), unbiased=True)


__all__ = ["uniform", "uniform_leaf", "check_bits"]
