"""QSGD: unbiased stochastic quantisation with a per-tensor norm scale.

Alistarh, Grubic, Li, Tomioka & Vojnovic, "QSGD: Communication-Efficient SGD
via Gradient Quantization and Encoding", NeurIPS 2017, Section 3.1. With s
levels, for one tensor v `[d]` (scale ||v||_2 sent once per tensor):

    Q_s(v)_i = ||v||_2 sign(v_i) xi_i(v, s),
    xi_i = (l + 1)/s with probability |v_i|/||v||_2 s - l, l/s otherwise,
    l = floor(|v_i|/||v||_2 s),

so E[Q_s(v)] = v and (Lemma 3.1)

    E ||Q_s(v) - v||^2 <= min(d / s^2, sqrt(d) / s) ||v||^2.

b bits per coordinate hold the signed level sign(v_i) l_i in [-s, s] as the
code s + sign(v_i) l_i, so s = 2^(b-1) - 1 (b = 2: s = 1, ternary; b = 4:
s = 7; b = 8: s = 127). b = 1 leaves s = 0 and is rejected (use `uniform(1)`
or `sign()` with error feedback); b = 32 is the identity. Payload per
tensor: codes packed b bits each into uint8 words, plus ||v||_2 as float32 `[1]`.
"""

from __future__ import annotations

import jax.numpy as jnp

from fedjax_med.aggregators.compression.base import (Compressor, LeafCodec, float32, per_tensor,
                                         stochastic_round)
from fedjax_med.aggregators.compression.packing import pack_bits, unpack_bits
from fedjax_med.aggregators.compression.uniform import check_bits
from fedjax_med.core.options import OptionError


def qsgd_levels(bits: int) -> int:
  """s = 2^(bits-1) - 1 quantisation levels for b-bit signed codes."""
  return (1 << (bits - 1)) - 1


def qsgd_leaf(bits: int) -> LeafCodec:
  """The per-tensor codec of `qsgd(bits)` (bits in 2..16)."""
  s = qsgd_levels(bits)

  def encode(x, key):
    norm = jnp.sqrt(jnp.sum(jnp.square(x)))
    positive = norm > 0
    r = jnp.where(positive, jnp.abs(x) / jnp.where(positive, norm, 1.0) * s, 0.0)
    level = jnp.clip(stochastic_round(r, key), 0, s)
    code = (s + jnp.sign(x) * level).astype(jnp.uint32)
    return {"codes": pack_bits(code, bits), "norm": jnp.reshape(norm, (1,)).astype(jnp.float32)}

  def decode(payload, d):
    code = unpack_bits(payload["codes"], bits, d).astype(jnp.float32)
    return payload["norm"][0] / s * (code - s)

  return LeafCodec(f"qsgd{bits}", encode, decode)


def qsgd(bits: int) -> Compressor:
  """QSGD with b-bit codes (s = 2^(b-1) - 1 levels), per-tensor ||v||_2 scale.

  Args:
    bits: 2..16, or 32 for the identity (float32).

  Raises:
    OptionError when bits < 2 (b < 1 is never valid; b = 1 leaves no level),
    bits is not an integer, or 16 < bits < 32.
  """
  bits = check_bits("qsgd", bits, minimum=1)
  if bits == 1:
    raise OptionError(
        "qsgd: bits must be >= 2 (1 bit holds only the sign: s = 2^(b-1) - 1 = 0 levels);"
        " for 1 bit use uniform(1) or error_feedback(sign())")
  if bits == 32:
    return float32()
  return per_tensor(qsgd_leaf(bits), unbiased=True)


__all__ = ["qsgd", "qsgd_leaf", "qsgd_levels"]
