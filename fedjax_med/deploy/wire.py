"""What crosses the network: pytrees as flat, named numpy arrays, checked on arrival.

A message between the server and a node is `(arrays, config)`:

* `arrays`: `{name: np.ndarray}`, the leaves of the pytrees sent, named
  `<part>/<i>` (`params/0`, `params/1`, ...) in `jax.tree_util` leaf order;
  both sides build the same algorithm, so each rebuilds the tree from its own
  template (`unflatten`), which checks the count, shapes and dtypes of what
  arrived and raises `MalformedMessage` naming the first mismatch.
* `config`: a flat `{name: int | float | str}` of scalars (site, round, ...).

`payload_nbytes(arrays)` is the payload on the wire: the sum of the arrays'
bytes, as `fedjax_med.aggregators.compression.payload_nbytes` counts a
compressed update (the transport's own framing, e.g. Flower's protobuf and HTTP
headers, comes on top).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


class MalformedMessage(ValueError):
  """A message whose arrays do not fit the algorithm's template."""


def is_typed_key(key: Any) -> bool:
  return jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key) if isinstance(
      key, jax.Array) else False


def key_to_array(key: jax.Array) -> np.ndarray:
  """A PRNG key as plain uint32 data (typed keys are unwrapped)."""
  if is_typed_key(key):
    return np.asarray(jax.random.key_data(key))
  return np.asarray(key)


def flatten(part: str, tree: Any) -> dict[str, np.ndarray]:
  """`{part/i: leaf i as numpy}` for the leaves of `tree` (typed keys as data)."""
  leaves = jax.tree_util.tree_leaves(tree)
  return {f"{part}/{i}": (key_to_array(leaf) if is_typed_key(leaf) else np.asarray(leaf))
          for i, leaf in enumerate(leaves)}


def unflatten(part: str, arrays: dict[str, np.ndarray], template: Any,
              *, sender: str = "the sender") -> Any:
  """The tree of `template`'s structure from `arrays[part/i]`, as jax arrays.

  Raises:
    MalformedMessage: a leaf is missing, or its shape or dtype differs from the
      template's (the message names `sender`, the part and the leaf).
  """
  leaves, treedef = jax.tree_util.tree_flatten(template)
  names = sorted((n for n in arrays if n.startswith(part + "/")),
                 key=lambda n: int(n.rsplit("/", 1)[1]) if n.rsplit("/", 1)[1].isdigit() else -1)
  if len(names) != len(leaves):
    raise MalformedMessage(f"{sender} sent {len(names)} arrays for '{part}', expected"
                           f" {len(leaves)}")
  out = []
  for i, leaf in enumerate(leaves):
    name = f"{part}/{i}"
    if name not in arrays:
      raise MalformedMessage(f"{sender} sent no array '{name}'")
    value = np.asarray(arrays[name])
    shape, dtype = tuple(np.shape(leaf)), np.dtype(jnp.result_type(leaf))
    if shape == () and value.shape == (1,):
      value = value.reshape(())   # transports that store a scalar as one element
    if value.shape != shape or value.dtype != dtype:
      raise MalformedMessage(f"{sender} sent '{name}' as {value.dtype}{list(value.shape)},"
                             f" expected {dtype}{list(shape)}")
    out.append(jnp.asarray(value))
  return jax.tree_util.tree_unflatten(treedef, out)


def nonfinite_names(arrays: dict[str, np.ndarray]) -> list[str]:
  """The names of the floating arrays holding NaN or inf."""
  return [name for name, a in arrays.items()
          if np.issubdtype(np.asarray(a).dtype, np.inexact) and not np.all(np.isfinite(a))]


def payload_nbytes(arrays: dict[str, np.ndarray]) -> int:
  """Bytes of the arrays' data (size x itemsize, summed)."""
  return int(sum(np.asarray(a).nbytes for a in arrays.values()))


__all__ = ["MalformedMessage", "flatten", "unflatten", "nonfinite_names", "payload_nbytes",
           "key_to_array", "is_typed_key"]
