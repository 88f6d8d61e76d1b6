"""Per-site evaluation, reported the way FLamby reports it.

For one model and one FederatedData split: the metric on each site's own
rows, their unweighted mean over sites (FLamby's headline number), and the
metric on all rows pooled. Per-site models (local training, personalisation)
are evaluated with `params` stacked on a leading K axis.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_med import metrics as metrics_lib
from fedjax_med.core.federated_data import FederatedData

BINARY_METRICS = {"accuracy": metrics_lib.accuracy, "auc": metrics_lib.roc_auc}


def _binary_probabilities(apply_fn, params, x):
  logits = apply_fn(params, x)
  return jax.nn.sigmoid(logits.reshape(x.shape[0], -1)[:, 0])


@functools.partial(jax.jit, static_argnums=(0, 3))
def _sites_binary_probabilities(apply_fn, params, x, per_site_params):
  in_axes = (0 if per_site_params else None, 0)
  return jax.vmap(lambda p, x_k: _binary_probabilities(apply_fn, p, x_k),
                  in_axes=in_axes)(params, x)


def site_probabilities(apply_fn: Callable, params: Any, data: FederatedData,
                       per_site_params: bool = False) -> list[np.ndarray]:
  """P(y = 1) for the real rows of every site: K arrays `[n_k]`.

  Args:
    apply_fn: `apply(params, x [B, ...]) -> logits [B] or [B, 1]`.
    params: one model, or (per_site_params=True) K models stacked on axis 0,
      model k scoring site k.
  """
  probs = np.asarray(_sites_binary_probabilities(apply_fn, params, data.x,
                                                 bool(per_site_params)))
  mask = np.asarray(data.mask)
  return [probs[k][mask[k]] for k in range(data.num_sites)]


def binary_report(apply_fn: Callable, params: Any, data: FederatedData,
                  per_site_params: bool = False) -> dict[str, dict[str, float]]:
  """`{site_name: {metric: value}, "mean": ..., "pooled": ...}` for a binary task.

  "mean" is the unweighted mean over sites of each metric, over the sites
  where it is defined (AUC is undefined on a site whose rows are all one
  class); "pooled" scores all rows together.
  """
  probs = site_probabilities(apply_fn, params, data, per_site_params)
  labels = [y for _, y in data.sites()]
  report = {}
  for name, p, y in zip(data.names, probs, labels):
    report[name] = {m: fn(y, p) if y.size else float("nan")
                    for m, fn in BINARY_METRICS.items()}
  report["mean"] = {m: metrics_lib.nanmean([report[n][m] for n in data.names])
                    for m in BINARY_METRICS}
  all_p, all_y = np.concatenate(probs), np.concatenate(labels)
  report["pooled"] = {m: fn(all_y, all_p) for m, fn in BINARY_METRICS.items()}
  return report


def unstack(tree: Any, index: int) -> Any:
  """Model `index` from parameters stacked on a leading axis."""
  return jax.tree_util.tree_map(lambda a: a[index], tree)


def stack_like(tree: Any, num: int) -> Any:
  """`num` copies of a model stacked on a new leading axis."""
  return jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (num,) + a.shape), tree)


__all__ = ["site_probabilities", "binary_report", "unstack", "stack_like", "BINARY_METRICS"]
