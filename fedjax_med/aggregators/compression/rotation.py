"""Random rotation (randomised Hadamard) before quantisation.

Suresh, Yu, Kumar & McMahan, ICML 2017 (their pi_srk): before a
per-tensor quantiser, a tensor x `[d]` is zero-padded to n = 2^ceil(log2 d)
and rotated,

    y = R x,   R = H D / sqrt(n),

with H the n x n Walsh-Hadamard matrix (Sylvester order, entries +-1) and D
a diagonal of independent random signs. R is orthonormal, so the receiver
recovers x_hat = R^T y_hat = D H y_hat / sqrt(n) (first d entries), the
quantiser stays unbiased (E[x_hat] = R^T E[y_hat] = x) and its squared error
is unchanged by the rotation, E||x_hat - x||^2 = E||y_hat - y||^2; but the
rotated coordinates are spread evenly, so the range max(y) - min(y) that sets
the quantisation step shrinks from O(||x||) to O(||x|| sqrt(log n / n)) with
high probability, and the error bound of stochastic k-level
quantisation falls from O(d / k^2) to O(log d / k^2) ||x||^2 (Suresh et al.).

H y costs O(n log n) (the fast Walsh-Hadamard transform, log2 n butterfly
stages). The sign diagonal is drawn from a 4-byte seed that travels in the
payload (`"seed"`, uint32 `[1]`), so the payload decodes on its own; the
padded coordinates are transmitted and counted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_med.aggregators.compression.base import Compressor, LeafCodec, per_tensor
from fedjax_med.core.options import OptionError


def next_power_of_two(d: int) -> int:
  return 1 if d <= 1 else 1 << (d - 1).bit_length()


def hadamard_transform(x: jax.Array) -> jax.Array:
  """H x for x `[n]`, n a power of two (H in Sylvester order, unnormalised)."""
  n = x.shape[0]
  if n & (n - 1):
    raise ValueError(f"hadamard_transform: length must be a power of two, got {n}")
  h = 1
  while h < n:
    y = x.reshape(n // (2 * h), 2, h)
    x = jnp.stack([y[:, 0] + y[:, 1], y[:, 0] - y[:, 1]], axis=1).reshape(n)
    h *= 2
  return x


def _signs(seed: jax.Array, n: int) -> jax.Array:
  return jax.random.rademacher(jax.random.PRNGKey(seed[0]), (n,), jnp.float32)


def rotate(x: jax.Array, seed: jax.Array) -> jax.Array:
  """R x = H D x / sqrt(n) with x zero-padded to n = next power of two."""
  n = next_power_of_two(x.shape[0])
  x = jnp.pad(x, (0, n - x.shape[0]))
  return hadamard_transform(_signs(seed, n) * x) / jnp.sqrt(jnp.float32(n))


def unrotate(y: jax.Array, seed: jax.Array, d: int) -> jax.Array:
  """R^T y = D H y / sqrt(n), first d entries."""
  n = y.shape[0]
  return (_signs(seed, n) * hadamard_transform(y) / jnp.sqrt(jnp.float32(n)))[:d]


def rotated_leaf(inner: LeafCodec) -> LeafCodec:
  """`inner` applied to the randomly rotated tensor."""

  def encode(x, key):
    rot_key, q_key = jax.random.split(key)
    seed = jax.random.bits(rot_key, (1,), jnp.uint32)
    payload = inner.encode(rotate(x, seed), q_key)
    return {**payload, "seed": seed}

  def decode(payload, d):
    n = next_power_of_two(d)
    inner_payload = {k: v for k, v in payload.items() if k != "seed"}
    return unrotate(inner.decode(inner_payload, n), payload["seed"], d)

  return LeafCodec(f"rotated_{inner.name}", encode, decode)


def rotated(compressor: Compressor) -> Compressor:
  """Randomised Hadamard rotation before a per-tensor compressor.

  `rotated(uniform(b))` is Suresh et al.'s pi_srk; `rotated(qsgd(b))` also
  works. The compressor must be per-tensor (`uniform`, `qsgd`, `sign`).
  """
  if not isinstance(compressor, Compressor) or compressor.leaf is None:
    name = getattr(compressor, "name", type(compressor).__name__)
    raise OptionError(
        f"rotated: needs a per-tensor compressor (uniform(b), qsgd(b), sign()), got"
        f" {name!r}; rotate before error feedback, not after: error_feedback(rotated(c))")
  return per_tensor(rotated_leaf(compressor.leaf), unbiased=compressor.unbiased)


__all__ = ["rotated", "rotated_leaf", "rotate", "unrotate", "hadamard_transform",
           "next_power_of_two"]
