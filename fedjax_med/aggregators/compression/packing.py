"""Bit packing: b-bit integer codes stored as real uint8 words.

`pack_bits(codes [d], b)` writes the d codes as one little-endian bit stream
(bit j of code i is stream bit i*b + j; stream bit m is bit m % 8 of byte
m // 8) into ceil(d*b/8) bytes: the layout of
`np.packbits(bits, bitorder="little")`. For b in {1, 2, 4, 8} a byte holds
8/b whole codes; other widths let codes straddle bytes, so no bit is wasted
except in the last byte.
"""

from __future__ import annotations

import jax.numpy as jnp

MAX_PACKED_BITS = 16


def packed_size(num_values: int, bits: int) -> int:
  """Bytes of `num_values` codes of `bits` bits: ceil(num_values * bits / 8)."""
  return -(-num_values * bits // 8)


def pack_bits(codes: jnp.ndarray, bits: int) -> jnp.ndarray:
  """uint codes `[d]` (each < 2**bits) -> uint8 `[ceil(d * bits / 8)]`."""
  d = codes.shape[0]
  codes = codes.astype(jnp.uint32)
  nbytes = packed_size(d, bits)
  if 8 % bits == 0:
    per = 8 // bits
    padded = jnp.pad(codes, (0, nbytes * per - d)).reshape(nbytes, per)
    shifts = jnp.arange(per, dtype=jnp.uint32) * bits
    return jnp.sum(padded << shifts, axis=1).astype(jnp.uint8)
  shifts = jnp.arange(bits, dtype=jnp.uint32)
  stream = ((codes[:, None] >> shifts) & 1).reshape(-1)
  stream = jnp.pad(stream, (0, nbytes * 8 - d * bits)).reshape(nbytes, 8)
  return jnp.sum(stream << jnp.arange(8, dtype=jnp.uint32), axis=1).astype(jnp.uint8)


def unpack_bits(packed: jnp.ndarray, bits: int, num_values: int) -> jnp.ndarray:
  """Inverse of `pack_bits`: uint8 `[ceil(d * bits / 8)]` -> uint32 codes `[d]`."""
  packed = packed.astype(jnp.uint32)
  mask = jnp.uint32((1 << bits) - 1)
  if 8 % bits == 0:
    per = 8 // bits
    shifts = jnp.arange(per, dtype=jnp.uint32) * bits
    return ((packed[:, None] >> shifts) & mask).reshape(-1)[:num_values]
  stream = ((packed[:, None] >> jnp.arange(8, dtype=jnp.uint32)) & 1).reshape(-1)
  stream = stream[:num_values * bits].reshape(num_values, bits)
  return jnp.sum(stream << jnp.arange(bits, dtype=jnp.uint32), axis=1).astype(jnp.uint32)


__all__ = ["MAX_PACKED_BITS", "packed_size", "pack_bits", "unpack_bits"]
