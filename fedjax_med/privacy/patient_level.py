"""Patient-level differential privacy inside each site: DP-SGD with Poisson sampling.

DP-SGD (Abadi et al., CCS 2016) as a `GradientEstimator` of the FedAvg family.
One local step of site k, whose n_k real rows all sit in the step's batch
(`batch_size >= N_max`, so the batch is the whole padded site and the row
mask marks the real rows; see `fedjax_med.core.local`):

    S      = {i : mask_i and u_i < q_k},  u_i ~ U(0, 1) iid    (Poisson sampling)
    g_i    = grad f(w; x_i, y_i)                               (per-example, nested vmap)
    g~_i   = g_i * min(1, C / ||g_i||_2)                       (per-example clipping)
    g      = (sum_{i in S} g~_i + N(0, (sigma C)^2 I)) / (q_k n_k)

The denominator q_k n_k is the *expected* batch size, a public constant;
dividing by the realised |S| would leak it. The sampling rate is either

* `expected_batch_size=b`: q_k = min(1, b / n_k). Every site's expected batch
  is b (min(b, n_k)), so the noise-to-signal ratio is the same at every site,
  and each site has its own epsilon_k: a small site samples a larger fraction
  of its patients per step and spends more privacy (Switzerland, n_k = 30
  training patients, pays most on heart disease); or
* `sampling_rate=q`: the same q at every site, hence the same epsilon at
  every site with the same number of steps, and expected batches q n_k.

Randomness: the local-step key (`fold_in(fold_in(client_key, STEP_STREAM), t)`
with `client_key = fold_in(round_key, site_id)`, see core/local.py) is split
into the sampling key `fold_in(step_key, SAMPLE_STREAM)` and the noise key
`fold_in(step_key, NOISE_STREAM)`: sampling and noise are independent of each
other and across sites, steps and rounds. Everything (sampling, per-example
gradients, clipping, noise) runs inside the vmapped, jit-compiled round.

Accounting: each step is `PoissonSampledDpEvent(q_k, GaussianDpEvent(sigma))`
with add/remove-one-patient neighbours; `PatientLevelAccountant` composes
the steps each site actually took (from the round metrics) with
dp-accounting's RDP or PLD accountant.

Threat model (local DP at each site): the site adds the noise itself, so
each patient of site k is protected against everyone who sees site k's
updates or any later global model (the server, other sites, model users),
assuming the site runs the mechanism honestly and keeps its noise secret.
n_k is treated as public (it sets q_k and the server's weights). It does not
hide whether the site took part, nor site-level statistics (n_k), nor the
per-site training loss that the round reports in the clear (a diagnostic; do
not release it), nor data-dependent preprocessing done outside the mechanism
(e.g. per-site standardisation with the site's own mean and std: its
statistics leak into every update and are outside epsilon).
Composition over sites is not needed: the sites' datasets are
disjoint, so a patient at one site is covered by that site's epsilon_k.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_med.core.local import row_uniforms
from fedjax_med.core.objective import GradientEstimator, is_batch_loss
from fedjax_med.core import prng
from fedjax_med.core.options import OptionError
from fedjax_med.core.tree import tree_l2_norm
from fedjax_med.privacy import accounting

SAMPLE_STREAM = 0
NOISE_STREAM = 1


def per_example_gradients(loss_fn, params: Any, x: jax.Array, y: jax.Array):
  """(losses [B], per-example gradients with a leading B axis on every leaf).

  One `jax.vmap` over rows of the gradient of a single row's loss; inside the
  round this vmap is nested in the vmap over sites.
  """

  def one(x_i, y_i):
    return jax.value_and_grad(lambda p: loss_fn(p, x_i[None], y_i[None])[0])(params)

  return jax.vmap(one)(x, y)


def clip_per_example(grads: Any, clip_norm: jax.Array) -> tuple[Any, jax.Array]:
  """g_i * min(1, C / ||g_i||), row by row; returns (clipped, norms [B]).

  The factor is C / max(||g_i||, C): exactly 1 (gradient unchanged) when
  ||g_i|| <= C, and the clipped norm is C otherwise.
  """
  norms = jax.vmap(tree_l2_norm)(grads)
  factor = clip_norm / jnp.maximum(norms, clip_norm)
  clipped = jax.tree_util.tree_map(
      lambda g: g * factor.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype), grads)
  return clipped, norms


def poisson_row_mask(key: jax.Array, mask: jax.Array, rate: jax.Array) -> jax.Array:
  """Poisson sample of the real rows: mask_i and u_i < q, `[B]` bool.

  u = `row_uniforms(key, B)`: row i's draw depends only on (key, i).
  """
  return jnp.logical_and(mask, row_uniforms(key, mask.shape[0]) < rate)


def site_rate(mask: jax.Array, hparams: dict, mode: str) -> tuple[jax.Array, jax.Array]:
  """(q_k, expected batch q_k n_k) of the site whose real rows are `mask`."""
  n_k = jnp.sum(mask).astype(jnp.float32)
  if mode == "expected_batch_size":
    b = hparams["expected_batch_size"]
    q = jnp.where(n_k > 0, jnp.minimum(1.0, b / jnp.maximum(n_k, 1.0)), 0.0)
  else:
    q = jnp.where(n_k > 0, hparams["sampling_rate"], 0.0)
  return q, q * n_k


def gaussian_noise_like(key: jax.Array, tree: Any, stddev: jax.Array) -> Any:
  """Independent N(0, stddev^2) for every coordinate of every leaf."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(key, len(leaves))
  # prng.normal: jax.random.normal's values, drawn flat (fast to compile for conv kernels).
  noise = [stddev.astype(leaf.dtype) * prng.normal(k, leaf.shape, leaf.dtype)
           for k, leaf in zip(keys, leaves)]
  return jax.tree_util.tree_unflatten(treedef, noise)


# ----------------------------------------------------------------------------- schedule check

# The marker and the check live in the core (`fedjax_med.core.objective`), where
# estimators meet local schedules; re-exported here for the privacy API.
from fedjax_med.core.objective import (  # pylint: disable=g-import-not-at-top
    WHOLE_SITE_ATTR, check_batches_span_site, fill_padded_rows, mark_whole_site,
    needs_whole_site)


def _make_build(mode: str):

  def build(loss_fn, hparams):
    if is_batch_loss(loss_fn):
      raise ValueError(
          "dp_sgd: a batch-level loss (fedjax_med.batch_loss, e.g. Cox) has no"
          " per-example gradients, so per-example clipping and patient-level DP-SGD"
          " do not apply; use a per-example loss or site-level DP (dp_fedavg)")
    missing = [n for n in ("clip_norm", "noise_multiplier", mode) if n not in hparams]
    if missing:
      raise ValueError(f"dp_sgd: state.hparams lacks {missing}; build the algorithm with"
                       " gradient_estimator=dp_sgd(...) so init puts them there")

    def grad_fn(params, x, y, mask, key):
      return dp_sgd_gradient(loss_fn, params, x, y, mask, key, hparams, mode)

    return mark_whole_site(grad_fn)

  return mark_whole_site(build)


_BUILDS = {mode: _make_build(mode) for mode in ("expected_batch_size", "sampling_rate")}

def dp_sgd_gradient(loss_fn, params, x, y, mask, key, hparams: dict, mode: str):
  """One DP-SGD gradient for one site's whole padded data (module docstring).

  Args:
    loss_fn: per-example loss `(params, x, y) -> [B]`.
    params: model parameters.
    x: `[B, ...]`, y: `[B, ...]`, mask: `[B]` bool; B >= n_k and the mask marks
      all of the site's real rows (`check_batches_span_site`). Padded rows are
      replaced by a real row before the loss (`fill_padded_rows`).
    key: the local step's key.
    hparams: {"clip_norm", "noise_multiplier", and "expected_batch_size" or
      "sampling_rate"} (traced float32).
    mode: "expected_batch_size" or "sampling_rate".

  Returns:
    (mean loss over the sampled rows, noisy clipped gradient).
  """
  clip_norm = hparams["clip_norm"]
  sigma = hparams["noise_multiplier"]
  q, expected = site_rate(mask, hparams, mode)
  sampled = poisson_row_mask(jax.random.fold_in(key, SAMPLE_STREAM), mask, q)
  x, y = fill_padded_rows(x, y, mask)
  losses, grads = per_example_gradients(loss_fn, params, x, y)
  clipped, _ = clip_per_example(grads, clip_norm)
  summed = jax.tree_util.tree_map(
      lambda g: jnp.sum(jnp.where(_rows(sampled, g), g, jnp.zeros((), g.dtype)), axis=0),
      clipped)
  noise = gaussian_noise_like(jax.random.fold_in(key, NOISE_STREAM), summed, sigma * clip_norm)
  denom = jnp.where(expected > 0, expected, 1.0)
  grads = jax.tree_util.tree_map(lambda s, z: (s + z) / denom.astype(s.dtype), summed, noise)
  count = jnp.sum(sampled.astype(jnp.float32))
  loss = jnp.sum(jnp.where(sampled, losses, 0.0)) / jnp.maximum(count, 1.0)
  return loss, grads


def _rows(row_mask: jax.Array, leaf: jax.Array) -> jax.Array:
  """`[B]` mask reshaped to broadcast against a `[B, ...]` leaf."""
  return row_mask.reshape((-1,) + (1,) * (leaf.ndim - 1))


def dp_sgd(clip_norm: float, noise_multiplier: float, *,
           expected_batch_size: float | None = None,
           sampling_rate: float | None = None) -> GradientEstimator:
  """DP-SGD gradient estimator (Poisson sampling, per-example clipping, Gaussian noise).

  Pass it as `gradient_estimator=` to a FedAvg-family algorithm whose
  `batch_size >= N_max` (every local step sees the site's whole padded data;
  `dp_sgd_fedavg` wires this for you). Smaller batches would run a different
  mechanism from the one the accountant charges: `dp_sgd_fedavg` and
  `dp_fedavg` raise (`check_batches_span_site`). The numbers go to `state.hparams`
  ("clip_norm", "noise_multiplier", and "expected_batch_size" or
  "sampling_rate"), traced: change them with `fm.set_hyperparams` or vmap over
  them with `fm.run_seeds` without recompiling.

  Args:
    clip_norm: C > 0, per-example L2 clipping norm.
    noise_multiplier: sigma >= 0 (0: no noise, epsilon = inf).
    expected_batch_size: b > 0, q_k = min(1, b / n_k) (per-site epsilon); or
    sampling_rate: q in (0, 1], the same at every site.
  """
  name = "dp_sgd"
  clip = accounting.check_clip_norm(name, clip_norm)
  sigma = accounting.check_noise_multiplier(name, noise_multiplier)
  if (expected_batch_size is None) == (sampling_rate is None):
    raise OptionError(f"{name}: give exactly one of expected_batch_size and sampling_rate")
  if expected_batch_size is not None:
    b = float(expected_batch_size)
    if not b > 0 or not np.isfinite(b):
      raise OptionError(f"{name}: expected_batch_size must be a finite number > 0, got"
                        f" {expected_batch_size!r}")
    mode, value = "expected_batch_size", b
  else:
    mode, value = "sampling_rate", accounting.check_rate(name, "sampling_rate", sampling_rate)
  return GradientEstimator(_BUILDS[mode], {"clip_norm": clip, "noise_multiplier": sigma,
                                           mode: value})


__all__ = ["SAMPLE_STREAM", "NOISE_STREAM", "per_example_gradients", "clip_per_example",
           "poisson_row_mask", "site_rate", "gaussian_noise_like", "fill_padded_rows",
           "dp_sgd_gradient", "dp_sgd",
           "WHOLE_SITE_ATTR", "mark_whole_site", "needs_whole_site",
           "check_batches_span_site"]
