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
SURVIVAL_METRICS = {"c_index": metrics_lib.c_index}


def _first_output(apply_fn, params, x, sigmoid):
  scores = apply_fn(params, x).reshape(x.shape[0], -1)[:, 0]
  return jax.nn.sigmoid(scores) if sigmoid else scores


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _sites_outputs(apply_fn, params, x, per_site_params, sigmoid):
  """The model's first output per row for every site, `[K, N_max]`."""
  in_axes = (0 if per_site_params else None, 0)
  return jax.vmap(lambda p, x_k: _first_output(apply_fn, p, x_k, sigmoid),
                  in_axes=in_axes)(params, x)


def _real_rows(values, data):
  mask = np.asarray(data.mask)
  return [values[k][mask[k]] for k in range(data.num_sites)]


def site_probabilities(apply_fn: Callable, params: Any, data: FederatedData,
                       per_site_params: bool = False) -> list[np.ndarray]:
  """P(y = 1) for the real rows of every site: K arrays `[n_k]`.

  Args:
    apply_fn: `apply(params, x [B, ...]) -> logits [B] or [B, 1]`.
    params: one model, or (per_site_params=True) K models stacked on axis 0,
      model k scoring site k.
  """
  probs = np.asarray(_sites_outputs(apply_fn, params, data.x,
                                    bool(per_site_params), True))
  return _real_rows(probs, data)


def site_scores(apply_fn: Callable, params: Any, data: FederatedData,
                per_site_params: bool = False) -> list[np.ndarray]:
  """The raw model output (e.g. a Cox risk score) for the real rows of every
  site: K arrays `[n_k]`; arguments as `site_probabilities`."""
  scores = np.asarray(_sites_outputs(apply_fn, params, data.x,
                                     bool(per_site_params), False))
  return _real_rows(scores, data)


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


def survival_report(apply_fn: Callable, params: Any, data: FederatedData,
                    per_site_params: bool = False) -> dict[str, dict[str, float]]:
  """`{site_name: {"c_index": C}, "mean": ..., "pooled": ...}` for survival.

  C is Harrell's C-index of the model's risk scores r = apply_fn(params, x)
  against `y[:, 1]` = time and `y[:, 0]` = event (`fedjax_med.metrics.c_index`,
  lifelines' conventions, as FLamby's Fed-TCGA-BRCA metric), higher risk
  meaning an earlier event. "mean" is the unweighted mean over the sites
  where C is defined (it is NaN on a site without an admissible pair, e.g.
  no event); "pooled" scores all rows of all sites together.

  Args:
    apply_fn: `apply(params, x [B, ...]) -> risk [B] or [B, 1]`.
    params: one model, or (per_site_params=True) K models stacked on axis 0.
    data: FederatedData with y `[K, N_max, 2]` = (event, time).
  """
  if data.y.ndim != 3 or data.y.shape[2] != 2:
    raise ValueError(
        f"survival_report: data.y must be [K, N_max, 2] = (event, time), got shape"
        f" {data.y.shape}")
  scores = site_scores(apply_fn, params, data, per_site_params)
  labels = [y for _, y in data.sites()]
  report = {}
  for name, r, y in zip(data.names, scores, labels):
    report[name] = {m: fn(y[:, 1], y[:, 0], r) for m, fn in SURVIVAL_METRICS.items()}
  report["mean"] = {m: metrics_lib.nanmean([report[n][m] for n in data.names])
                    for m in SURVIVAL_METRICS}
  all_r, all_y = np.concatenate(scores), np.concatenate(labels)
  report["pooled"] = {m: fn(all_y[:, 1], all_y[:, 0], all_r)
                      for m, fn in SURVIVAL_METRICS.items()}
  return report


def unstack(tree: Any, index: int) -> Any:
  """Model `index` from parameters stacked on a leading axis."""
  return jax.tree_util.tree_map(lambda a: a[index], tree)


def stack_like(tree: Any, num: int) -> Any:
  """`num` copies of a model stacked on a new leading axis."""
  return jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (num,) + a.shape), tree)


__all__ = ["site_probabilities", "site_scores", "binary_report", "survival_report",
           "unstack", "stack_like", "BINARY_METRICS", "SURVIVAL_METRICS"]
