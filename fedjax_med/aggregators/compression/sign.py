"""Scaled sign compression, 1 bit per coordinate (EF-signSGD's compressor).

Karimireddy, Rebjock, Stich & Jaggi, "Error Feedback Fixes SignSGD and other
Gradient Compression Schemes", ICML 2019 (EF-SIGNSGD): for one tensor p `[d]`

    C(p) = (||p||_1 / d) sign(p),

with sign(0) taken as +1 here. It is biased (a delta-contraction with
delta = ||p||_1^2 / (d ||p||_2^2)), so use it with error feedback:
`error_feedback(sign())` is EF-signSGD. Payload per tensor: the signs packed
8 per uint8 word and the scale ||p||_1 / d as float32 `[1]`.
"""

from __future__ import annotations

import jax.numpy as jnp

from fedjax_med.aggregators.compression.base import Compressor, LeafCodec, per_tensor
from fedjax_med.aggregators.compression.packing import pack_bits, unpack_bits


def sign_leaf() -> LeafCodec:

  def encode(x, key):
    del key
    scale = jnp.mean(jnp.abs(x)) if x.shape[0] else jnp.float32(0.0)
    bits = (x >= 0).astype(jnp.uint32)
    return {"codes": pack_bits(bits, 1), "scale": jnp.reshape(scale, (1,)).astype(jnp.float32)}

  def decode(payload, d):
    bits = unpack_bits(payload["codes"], 1, d).astype(jnp.float32)
    return payload["scale"][0] * (2.0 * bits - 1.0)

  return LeafCodec("sign", encode, decode)


def sign() -> Compressor:
  """(||p||_1 / d) sign(p) per tensor: 1 bit per coordinate + one float32 scale."""
  return per_tensor(sign_leaf(), unbiased=False)


__all__ = ["sign", "sign_leaf"]
