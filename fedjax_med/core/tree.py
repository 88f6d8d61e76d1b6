"""Small pytree helpers."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def tree_l2_norm(tree: Any) -> jax.Array:
  """sqrt(sum of squares of every leaf), float32 scalar."""
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in leaves))


def tree_select(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
  """Leafwise `jnp.where(pred, on_true, on_false)` for a scalar predicate."""
  return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


__all__ = ["tree_l2_norm", "tree_select"]
