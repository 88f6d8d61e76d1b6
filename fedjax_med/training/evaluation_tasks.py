"""Per-site evaluation for multi-task classification and regression.

Same shape of report as `fedjax_med.training.evaluation` (FLamby's convention):

    {site_name: {metric: value}, "mean": {...}, "pooled": {...}}

"mean" is the unweighted mean over sites of each site's metric (over the
sites where it is defined), "pooled" scores all sites' real rows together
(each row scored by its own site's model when `per_site_params=True`).

* `multitask_report` (Tox21): ROC-AUC of each task on the site's observed
  labels (`fedjax_med.metrics.multitask`), "auc/<task>", and "auc", their
  mean over the tasks where defined. So site "mean" / "auc" is: per site,
  mean over assays; then mean over sites.
* `regression_report` (telemonitoring): "mae" and "rmse" per site
  (`fedjax_med.metrics.regression`).
* `constant_apply` and `mean_predictors`: the trivial floors (predict the
  global training mean, or each site's own training mean) as models, so
  they are scored by exactly the same code as every trained model.
* `share_beating`: the share of sites on which one report beats another.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_med.core.federated_data import FederatedData
from fedjax_med.metrics.classification import nanmean
from fedjax_med.metrics.multitask import per_task_roc_auc
from fedjax_med.metrics.regression import mae, rmse

REGRESSION_METRICS = {"mae": mae, "rmse": rmse}
LOWER_IS_BETTER = ("mae", "rmse")


@functools.partial(jax.jit, static_argnums=(0, 3))
def _outputs(apply_fn, params, x, per_site_params):
  in_axes = (0 if per_site_params else None, 0)
  return jax.vmap(apply_fn, in_axes=in_axes)(params, x)


def site_outputs(apply_fn: Callable, params: Any, data: FederatedData,
                 per_site_params: bool = False) -> list[np.ndarray]:
  """The model's raw outputs on the real rows of every site: K arrays `[n_k, ...]`.

  Args:
    apply_fn: `apply(params, x [B, ...]) -> [B, ...]`.
    params: one model, or (per_site_params=True) K models stacked on axis 0.
  """
  out = np.asarray(_outputs(apply_fn, params, data.x, bool(per_site_params)))
  mask = np.asarray(data.mask)
  return [out[k][mask[k]] for k in range(data.num_sites)]


def _add_mean_and_pooled(report, names, pooled_values):
  metrics = list(next(iter(report.values())).keys()) if report else []
  report["mean"] = {m: nanmean([report[n][m] for n in names]) for m in metrics}
  report["pooled"] = pooled_values
  return report


def multitask_report(apply_fn: Callable, params: Any, data: FederatedData,
                     per_site_params: bool = False,
                     task_names: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
  """ROC-AUC per task on observed labels, per site, mean over sites, pooled.

  Args:
    apply_fn: `apply(params, x) -> logits [B, T]`.
    params: one model or K stacked models (`per_site_params=True`).
    data: FederatedData with y `[K, N_max, T, 2]` = (label, observed).
    task_names: T names for the "auc/<name>" entries (default "task_t").

  Returns:
    `{site: {"auc": mean over tasks, "auc/<task>": AUC_t, ...}, "mean": ...,
    "pooled": ...}`; AUC_t is NaN (skipped by the means) where the site has no
    observed label of one of the two classes for task t.
  """
  if data.y.ndim != 4 or data.y.shape[3] != 2:
    raise ValueError(f"multitask_report: data.y must be [K, N_max, T, 2] = (label,"
                     f" observed), got shape {tuple(data.y.shape)}")
  num_tasks = data.y.shape[2]
  names = tuple(task_names) if task_names is not None else tuple(
      f"task_{t}" for t in range(num_tasks))
  if len(names) != num_tasks:
    raise ValueError(f"multitask_report: {len(names)} task_names for {num_tasks} tasks")
  logits = site_outputs(apply_fn, params, data, per_site_params)
  if logits[0].ndim != 2 or logits[0].shape[1] != num_tasks:
    raise ValueError(f"multitask_report: the model must output [B, {num_tasks}] logits,"
                     f" got {logits[0].shape}")
  labels = [y for _, y in data.sites()]

  def scores(lab, logit):
    auc = per_task_roc_auc(lab[..., 0], lab[..., 1], logit)
    return {"auc": nanmean(auc), **{f"auc/{n}": float(a) for n, a in zip(names, auc)}}

  report = {site: scores(lab, logit) for site, lab, logit in zip(data.names, labels, logits)}
  return _add_mean_and_pooled(report, data.names,
                              scores(np.concatenate(labels), np.concatenate(logits)))


def regression_report(apply_fn: Callable, params: Any, data: FederatedData,
                      per_site_params: bool = False) -> dict[str, dict[str, float]]:
  """MAE and RMSE per site, their unweighted mean over sites, and pooled.

  Args:
    apply_fn: `apply(params, x) -> predictions [B] or [B, 1]`.
    params: one model or K stacked models (`per_site_params=True`).
    data: FederatedData with real-valued y `[K, N_max]` (or `[K, N_max, 1]`).
  """
  if data.y.ndim not in (2, 3) or (data.y.ndim == 3 and data.y.shape[2] != 1):
    raise ValueError(f"regression_report: data.y must be [K, N_max] or [K, N_max, 1],"
                     f" got shape {tuple(data.y.shape)}")
  preds = site_outputs(apply_fn, params, data, per_site_params)
  # Explicit widths: an empty site's [0, ...] cannot be reshaped with -1.
  preds = [p.reshape(p.shape[0], int(np.prod(p.shape[1:], dtype=np.int64))) for p in preds]
  if preds[0].shape[1] != 1:
    raise ValueError(f"regression_report: the model must output one value per row,"
                     f" got {preds[0].shape[1]}")
  preds = [p[:, 0] for p in preds]
  targets = [y.reshape(-1) for _, y in data.sites()]
  report = {site: {m: fn(t, p) for m, fn in REGRESSION_METRICS.items()}
            for site, t, p in zip(data.names, targets, preds)}
  all_t, all_p = np.concatenate(targets), np.concatenate(preds)
  return _add_mean_and_pooled(report, data.names,
                              {m: fn(all_t, all_p) for m, fn in REGRESSION_METRICS.items()})


def constant_apply(params: Any, x: jax.Array) -> jax.Array:
  """A model that predicts `params["value"]` for every row: `[B]`."""
  return jnp.broadcast_to(params["value"], (x.shape[0],))


def mean_predictors(train: FederatedData) -> tuple[dict, dict]:
  """The two trivial floors as `constant_apply` parameters.

  Returns:
    (global_params, site_params): `{"value": mean of y over all real train
    rows}`, and `{"value": [K]}` with each site's own train mean (a site
    without train rows gets the global mean). Use site_params with
    `per_site_params=True`.
  """
  y = np.asarray(train.y, np.float64).reshape(train.num_sites, train.max_examples, -1)[..., 0]
  mask = np.asarray(train.mask)
  global_mean = float(y[mask].mean())
  n = mask.sum(axis=1)
  sums = np.where(mask, y, 0.0).sum(axis=1)
  site = np.where(n > 0, sums / np.maximum(n, 1), global_mean)
  return ({"value": jnp.asarray(global_mean, jnp.float32)},
          {"value": jnp.asarray(site, jnp.float32)})


def share_beating(report: dict, reference: dict, metric: str,
                  sites: Sequence[str]) -> float:
  """Share of `sites` where `report` beats `reference` on `metric` (strictly).

  Lower is better for "mae"/"rmse", higher otherwise. Sites where either
  value is undefined are left out; NaN when none is left.
  """
  lower = metric in LOWER_IS_BETTER
  wins = []
  for s in sites:
    a, b = report[s][metric], reference[s][metric]
    if a is None or b is None or not (np.isfinite(a) and np.isfinite(b)):
      continue
    wins.append(a < b if lower else a > b)
  return float(np.mean(wins)) if wins else float("nan")


__all__ = ["multitask_report", "regression_report", "site_outputs", "constant_apply",
           "mean_predictors", "share_beating", "REGRESSION_METRICS"]
