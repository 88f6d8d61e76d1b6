"""Top-k sparsification: only the k largest-magnitude coordinates are sent.

Stich, Cordonnier & Jaggi, "Sparsified SGD with Memory", NeurIPS 2018: for a
vector v `[D]` (here the whole update, all tensors flattened and
concatenated in `tree_leaves` order),

    top_k(v)_i = v_i if |v_i| is among the k largest magnitudes, else 0,

k = ceil(fraction * D). It is biased (it keeps ||top_k(v)||^2 >= (k/D)||v||^2,
a k/D-contraction), so use it with error feedback (`error_feedback(top_k(f))`,
Stich et al.'s memory; Karimireddy et al. 2019). Payload: the k values
(float32 `[k]`) and their positions in the flattened update, in the smallest
unsigned type that holds D - 1 (uint8 for D <= 256, uint16 for D <= 65536,
else uint32). With k = D (fraction = 1) the payload is the dense vector
(no indices) and decode(encode(v)) = v exactly.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_med.aggregators.compression.base import Compressor, flatten, tree_size, unflatten
from fedjax_med.core.options import OptionError


def check_fraction(name: str, fraction) -> float:
  try:
    f = float(fraction)
  except (TypeError, ValueError):
    raise OptionError(f"{name}: fraction must be a number in (0, 1], got {fraction!r}") from None
  if isinstance(fraction, bool) or not (0.0 < f <= 1.0):
    raise OptionError(f"{name}: fraction must be in (0, 1] (the share of coordinates"
                      f" kept), got {fraction!r}")
  return f


def num_kept(fraction: float, size: int) -> int:
  """k = ceil(fraction * D), at least 1 (float noise such as 0.07 * 100 ignored)."""
  if size == 0:
    return 0
  return max(1, min(size, math.ceil(round(fraction * size, 6))))


def index_dtype(size: int):
  """Smallest unsigned integer type holding positions 0 .. size - 1."""
  if size <= 1 << 8:
    return jnp.uint8
  if size <= 1 << 16:
    return jnp.uint16
  return jnp.uint32


def top_k(fraction: float) -> Compressor:
  """Keeps the ceil(fraction * D) largest |v_i| of the whole update.

  Args:
    fraction: share of coordinates kept, in (0, 1]; 1.0 is the identity.

  Raises:
    OptionError when fraction is outside (0, 1].
  """
  fraction = check_fraction("top_k", fraction)

  def init(template):
    del template
    return ()

  def encode(tree, state, key):
    del key
    v = flatten(tree)
    size = v.shape[0]
    k = num_kept(fraction, size)
    if k == size:
      return {"values": v}, state
    _, idx = jax.lax.top_k(jnp.abs(v), k)
    return {"values": v[idx], "indices": idx.astype(index_dtype(size))}, state

  def decode(payload, template):
    size = tree_size(template)
    if "indices" not in payload:
      return unflatten(payload["values"], template)
    v = jnp.zeros((size,), jnp.float32).at[payload["indices"].astype(jnp.int32)].set(
        payload["values"])
    return unflatten(v, template)

  return Compressor(f"top{np.format_float_positional(100 * fraction, trim='-')}%",
                    init, encode, decode, leaf=None, unbiased=fraction == 1.0)


__all__ = ["top_k", "num_kept", "index_dtype", "check_fraction"]
