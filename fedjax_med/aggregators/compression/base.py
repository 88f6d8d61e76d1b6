"""Compressors as (init, encode, decode) triples over pytrees, and exact byte counts.

A `Compressor` turns one client's update (a pytree, e.g. the pseudo-gradient
Delta_k) into a *payload*: a pytree of real arrays (packed uint8 codes,
indices, float32 scales) that is what would go over the wire, and back:

    state              = init(update_template)               per-client state, () if none
    payload, state     = encode(update, state, key)
    update_hat         = decode(payload, update_template)

`update_template` is any pytree with the update's shapes and dtypes (arrays
or `jax.ShapeDtypeStruct`s). Stateless compressors return `()` from `init`;
error feedback (`error_feedback`) keeps a residual with the update's shape.

Bytes: `payload_nbytes(payload)` is the sum of the payload arrays' sizes in
bytes (values + indices + scales + seeds), i.e. exactly
`sum(np.asarray(a).nbytes for a in leaves(payload))`. No other header is
counted: the codec, its parameters and the model's shapes are agreed once
when the federation is set up (like the model architecture), so a message
carries only its payload arrays. The reference is the uncompressed update
(`float32()`): 4 bytes per float32 parameter.

Per-tensor codecs (`LeafCodec`) act on one flattened leaf `[d]` at a time,
with one scale per tensor; `per_tensor(codec)` lifts one to a `Compressor`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_med.core import prng


class LeafCodec(NamedTuple):
  """A per-tensor codec on a flat float32 vector.

  encode(x [d], key) -> payload (dict of arrays)
  decode(payload, d) -> x_hat [d] float32
  """
  name: str
  encode: Callable[[jax.Array, jax.Array], dict]
  decode: Callable[[dict, int], jax.Array]


class Compressor(NamedTuple):
  """(init, encode, decode) on a client's update pytree; see the module doc.

  leaf: the per-tensor codec when the compressor is `per_tensor(leaf)` (so
    `rotated` can wrap it), else None.
  unbiased: E[decode(encode(x))] = x over the key.
  """
  name: str
  init: Callable[[Any], Any]
  encode: Callable[[Any, Any, jax.Array], tuple[Any, Any]]
  decode: Callable[[Any, Any], Any]
  leaf: LeafCodec | None = None
  unbiased: bool = False


def payload_nbytes(payload: Any) -> int:
  """Bytes of a payload: sum over its arrays of size * itemsize (static int).

  Works on arrays, tracers and `jax.ShapeDtypeStruct`s alike.
  """
  return int(sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
                 for leaf in jax.tree_util.tree_leaves(payload)))


def shapes_of(tree: Any) -> Any:
  """The `jax.ShapeDtypeStruct` of every leaf."""
  return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), a.dtype), tree)


def encoded_nbytes(compressor: Compressor, template: Any) -> int:
  """Bytes of the payload `compressor` produces for an update shaped like `template`."""
  template = shapes_of(template)

  def run(t, key):
    return compressor.encode(t, compressor.init(t), key)[0]

  return payload_nbytes(jax.eval_shape(run, template, jax.random.PRNGKey(0)))


def reference_nbytes(template: Any) -> int:
  """Bytes of the uncompressed update (float32 models: 4 bytes per parameter)."""
  return payload_nbytes(shapes_of(template))


def is_stateful(compressor: Compressor, template: Any) -> bool:
  """Whether `compressor` keeps per-client state (e.g. error feedback)."""
  return bool(jax.tree_util.tree_leaves(compressor.init(shapes_of(template))))


def flatten(tree: Any) -> jax.Array:
  """All leaves, flattened and concatenated in `tree_leaves` order: `[D]` float32."""
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    return jnp.zeros((0,), jnp.float32)
  return jnp.concatenate([jnp.reshape(a, (-1,)).astype(jnp.float32) for a in leaves])


def unflatten(vector: jax.Array, template: Any) -> Any:
  """Inverse of `flatten` for a tree shaped like `template`."""
  leaves, treedef = jax.tree_util.tree_flatten(template)
  out, offset = [], 0
  for t in leaves:
    size = math.prod(t.shape)
    out.append(vector[offset:offset + size].reshape(t.shape).astype(t.dtype))
    offset += size
  return jax.tree_util.tree_unflatten(treedef, out)


def tree_size(template: Any) -> int:
  return int(sum(math.prod(t.shape) for t in jax.tree_util.tree_leaves(template)))


def per_tensor(codec: LeafCodec, unbiased: bool = False) -> Compressor:
  """A `Compressor` applying `codec` to every leaf separately (one scale per tensor).

  Leaf i uses key `split(key, num_leaves)[i]`. The payload mirrors the
  update's tree structure, each leaf replaced by the codec's payload dict.
  """

  def init(template):
    del template
    return ()

  def encode(tree, state, key):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    payloads = [codec.encode(jnp.reshape(leaf, (-1,)).astype(jnp.float32), keys[i])
                for i, leaf in enumerate(leaves)]
    return jax.tree_util.tree_unflatten(treedef, payloads), state

  def decode(payload, template):
    leaves, treedef = jax.tree_util.tree_flatten(template)
    parts = treedef.flatten_up_to(payload)
    out = [codec.decode(p, math.prod(t.shape)).reshape(t.shape).astype(t.dtype)
           for p, t in zip(parts, leaves)]
    return jax.tree_util.tree_unflatten(treedef, out)

  return Compressor(codec.name, init, encode, decode, leaf=codec, unbiased=unbiased)


def float32() -> Compressor:
  """The uncompressed reference: each leaf sent as it is (float32 for float32 models).

  decode(encode(x)) == x bit for bit; bytes = 4 per float32 parameter.
  """

  def init(template):
    del template
    return ()

  def encode(tree, state, key):
    del key
    return jax.tree_util.tree_map(lambda a: {"values": a}, tree), state

  def decode(payload, template):
    leaves, treedef = jax.tree_util.tree_flatten(template)
    parts = treedef.flatten_up_to(payload)
    return jax.tree_util.tree_unflatten(
        treedef, [p["values"].reshape(t.shape).astype(t.dtype) for p, t in zip(parts, leaves)])

  return Compressor("float32", init, encode, decode, leaf=None, unbiased=True)


def stochastic_round(t: jax.Array, key: jax.Array) -> jax.Array:
  """floor(t) + Bernoulli(t - floor(t)): an unbiased rounding of t, E = t."""
  low = jnp.floor(t)
  u = prng.uniform(key, t.shape, jnp.float32)   # jax.random.uniform's values, drawn flat
  return low + (u < (t - low)).astype(jnp.float32)


__all__ = ["LeafCodec", "Compressor", "payload_nbytes", "shapes_of", "encoded_nbytes",
           "reference_nbytes", "is_stateful", "flatten", "unflatten", "tree_size",
           "per_tensor", "float32", "stochastic_round"]
