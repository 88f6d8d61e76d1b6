"""Shared pieces of the personalised algorithms (FedPer, Ditto).

Per-site models live in `state.client_states["params"]`, every leaf with a
leading K axis; only the cohort's rows change in a round.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from fedjax_med.core.options import OptionError


def _path_names(path) -> list[str]:
  names = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        names.append(str(getattr(entry, attr)))
        break
  return names


def personal_mask(params: Any, personal: Sequence[str] | Callable[[str], bool]) -> Any:
  """A tree of Python bools: True on the personal leaves.

  `personal` is either a sequence of layer names (a leaf is personal when any
  key on its path equals one of them, e.g. ("output",) for an MLP head or
  ("bias",) for a personal intercept) or a predicate on the path string
  "params/output/kernel".
  """
  if callable(personal):
    predicate = lambda path: bool(personal("/".join(_path_names(path))))
  else:
    wanted = set(personal)
    predicate = lambda path: bool(wanted & set(_path_names(path)))
  mask = jax.tree_util.tree_map_with_path(lambda path, leaf: predicate(path), params)
  flags = jax.tree_util.tree_leaves(mask)
  if not any(flags):
    raise OptionError(f"fedper: personal={personal!r} matches no parameter")
  if all(flags):
    raise OptionError(f"fedper: personal={personal!r} matches every parameter;"
                      " nothing would be shared")
  return mask


def merge(mask: Any, shared: Any, personal: Any) -> Any:
  """Leaves from `personal` where mask is True, else from `shared`."""
  return jax.tree_util.tree_map(lambda m, s, p: p if m else s, mask, shared, personal)


def stacked_merge(mask: Any, shared: Any, personal_stacked: Any) -> Any:
  """Per-site models `[K, ...]`: personal leaves per site, shared leaves broadcast."""
  num_sites = jax.tree_util.tree_leaves(personal_stacked)[0].shape[0]
  return jax.tree_util.tree_map(
      lambda m, s, p: p if m else jnp.broadcast_to(s, (num_sites,) + s.shape),
      mask, shared, personal_stacked)


__all__ = ["personal_mask", "merge", "stacked_merge"]
