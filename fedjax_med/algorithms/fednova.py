"""FedNova (Wang, Liu, Liang, Joshi & Poor, NeurIPS 2020).

When sites take different numbers of local steps tau_k (heart-disease sites
hold 30 to 199 rows, so one local epoch is 8 to 50 steps of batch 4), FedAvg's
average sum_k p_k Delta_k is biased towards the objective of the sites that
step most. Wang et al. write a site's update as Delta_k = lr G_k a_k, where
G_k = [g_1, ..., g_tau] holds its local gradients and a_k in R^tau says how
much each of them moved the model, and average normalised updates instead:

    d_k = Delta_k / ||a_k||_1,   tau_eff = sum_k p_k ||a_k||_1,
    Delta = tau_eff * sum_k p_k d_k                         (paper, Eq. 6-7)

The server then applies its optax step to Delta. a_k depends on the local
solver; this module supports the two solvers whose a_k the paper gives:

* plain SGD, `optax.sgd(lr)`: a_k = [1, ..., 1], ||a_k||_1 = tau_k;
* SGD with heavy-ball momentum rho, `optax.sgd(lr, momentum=rho)` (m <- rho m
  + g, w <- w - lr m): a_{k,i} = (1 - rho^(tau_k - i + 1)) / (1 - rho), so
  ||a_k||_1 = sum_{j=0}^{tau_k - 1} (tau_k - j) rho^j
            = [tau_k - rho (1 - rho^tau_k) / (1 - rho)] / (1 - rho).

With rho = 0.9 the ratio ||a_k||_1 / tau_k is 3.6 at tau = 8 and 8.2 at
tau = 50, so normalising a momentum client by tau_k mis-weights such sites by
2.3x. With equal a_k across sites (equal tau and rho), FedNova is FedAvg.

Which solver the client runs is read off `client_optimizer` itself: at build
time FedNova runs it for a few steps on a probe (a 3-vector, fixed gradients)
and checks that its updates are exactly -lr m_t with m_t = rho m_{t-1} + g_t
for one constant lr > 0 and one 0 <= rho < 1. Anything else -- Adam,
Nesterov momentum, weight decay, clipping, a learning-rate schedule that
changes within the probe's steps -- has a different a_k and is refused with an
OptionError rather than normalised wrongly. (A transformation that behaves
like SGD on the probe but differently later, e.g. a schedule that is constant
for the first 5 steps, cannot be detected; don't use one.) This reads the
behaviour the user built instead of trusting a second `momentum=` argument that
could disagree with the optimizer. If the client optimizer traces its momentum
(`optax.inject_hyperparams(optax.sgd)(learning_rate=..., momentum=...)`), the
normaliser uses the traced value from `state.client_hparams`, so
`set_hyperparams(state, client={"momentum": r})` changes both together
without recompiling. FedNova has no proximal term here (the paper's FedProx
variant a_k = [(1 - lr mu)^(tau-1), ..., 1] is not implemented).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_med.core import aggregation as agg
from fedjax_med.core import kit
from fedjax_med.core.kit import COMMON_OPTIONS, SGD_LR_1
from fedjax_med.core.algorithm import FederatedAlgorithm
from fedjax_med.core.options import OptionError, check_optimizer, reject_unknown
from fedjax_med.core.state import injected_hyperparams
from fedjax_med.core.tree import tree_l2_norm

# Probe of the client optimizer: start point and gradients (rows), chosen with
# unequal magnitudes and signs so that sign-based, normalised, clipped or
# parameter-dependent transformations visibly depart from SGD.
_PROBE_PARAMS = np.array([0.5, -1.0, 2.0], np.float32)
_PROBE_GRADS = np.array([[1.0, 2.0, -0.5], [-0.5, 1.5, 3.0], [2.0, -1.0, 0.25],
                         [0.25, 0.75, -2.0], [0.1, -4.0, 0.5]], np.float32)
_PROBE_RTOL = 1e-4   # float32 arithmetic on O(1) numbers errs by ~1e-7


@dataclasses.dataclass(frozen=True)
class HeavyBallNormalizer:
  """||a_k||_1 of heavy-ball SGD (static, hashable: part of the round's config).

  momentum: rho found by the probe, used when it is not traced.
  traced: True reads rho from `client_hparams["momentum"]` (injected, traced).
  """
  momentum: float = 0.0
  traced: bool = False

  def __call__(self, steps: jax.Array, client_hparams: dict, max_steps: int) -> jax.Array:
    rho = client_hparams["momentum"] if self.traced else jnp.float32(self.momentum)
    return momentum_normalizer(jnp.atleast_1d(steps), rho, max_steps).reshape(
        jnp.shape(steps))


def fednova_client_update(ctx: kit.ClientContext, params, client_state, data, key):
  """FedAvg's client, sending d_k = Delta_k / ||a_k||_1 and ||a_k||_1 (a site that
  took no step has Delta_k = 0)."""
  del client_state
  local = kit.local_training(ctx, params, data, key)
  max_steps = ctx.config.schedule.num_scan_steps(data.mask.shape[0])
  norm = ctx.config.static(local.num_steps, ctx.client_hparams, max_steps)
  update = jax.tree_util.tree_map(
      lambda a, b: (a - b) / jnp.maximum(norm, 1.0).astype(a.dtype), params, local.params)
  return kit.ClientResult(update, values={"num_steps": local.num_steps,
                                          "mean_loss": local.mean_loss, "norm": norm})


def fednova_server_update(ctx: kit.ServerContext, state, aggregate, values):
  """Delta = tau_eff sum_k p_k d_k, tau_eff = sum_k p_k ||a_k||_1, then the server optimizer."""
  tau_eff = jnp.sum(kit.normalized_weights(ctx) * values["norm"])
  delta = jax.tree_util.tree_map(lambda d: tau_eff.astype(d.dtype) * d, aggregate)
  result = kit.apply_server_update(ctx, state, delta, values)
  return result._replace(metrics={"tau_eff": tau_eff, "update_norm": tree_l2_norm(delta)})


def heavy_ball_probe(client_optimizer: optax.GradientTransformation):
  """Runs `client_optimizer` on the probe; returns (lr, rho) or a reason.

  Returns:
    `((lr, rho), None)` if every probe update equals -lr m_t with
    m_t = rho m_{t-1} + g_t (to relative 1e-4), else `(None, reason)`.
  """
  params = jnp.asarray(_PROBE_PARAMS)
  try:
    state = client_optimizer.init(params)
    updates = []
    for g in _PROBE_GRADS:
      u, state = client_optimizer.update(jnp.asarray(g), state, params)
      params = optax.apply_updates(params, u)
      updates.append(np.asarray(u, np.float64))
  except Exception as e:  # pylint: disable=broad-except
    return None, f"it could not be run on a probe 3-vector ({type(e).__name__}: {e})"
  g = _PROBE_GRADS.astype(np.float64)
  lr = -updates[0][0] / g[0][0]
  if not np.isfinite(lr) or lr <= 0:
    return None, f"its first step on gradient {g[0].tolist()} was {updates[0].tolist()}"
  m = [-u / lr for u in updates]            # m_t if it is heavy-ball SGD
  rho = float(np.mean((m[1] - g[1]) / m[0]))
  want = g[0]
  for t in range(len(g)):
    if t:
      want = rho * want + g[t]
    if not np.allclose(m[t], want, rtol=_PROBE_RTOL, atol=_PROBE_RTOL * np.abs(want).max()):
      return None, (f"on fixed probe gradients its step {t + 1} was {updates[t].tolist()},"
                    f" where SGD (learning rate {lr:.6g}, heavy-ball momentum {rho:.6g})"
                    f" gives {(-lr * want).tolist()}")
  return (float(lr), rho), None


def _check_client_optimizer(client_optimizer) -> tuple[float, bool]:
  """The client's heavy-ball rho (and whether it is traced), or OptionError."""
  found, reason = heavy_ball_probe(client_optimizer)
  if found is None:
    raise OptionError(
        "fednova: client_optimizer is not SGD with a constant learning rate and"
        f" (optional) heavy-ball momentum: {reason}. FedNova's normaliser ||a_k||_1"
        " (Wang et al. 2020) is implemented for optax.sgd(lr) and optax.sgd(lr,"
        " momentum=rho) only (optionally inside optax.inject_hyperparams); Adam,"
        " Nesterov momentum, weight decay, clipping and learning-rate schedules have"
        " other a_k. Use one of those two, or fedavg for other client optimizers")
  _, rho = found
  rho = 0.0 if abs(rho) < 1e-6 else rho   # float32 noise of plain SGD
  if not 0.0 <= rho < 1.0 - 1e-6:
    raise OptionError(
        f"fednova: client_optimizer's heavy-ball momentum is {rho:.6g}; FedNova's"
        " normaliser ||a_k||_1 = sum_j (tau_k - j) rho^j needs 0 <= momentum < 1")
  injected = injected_hyperparams(client_optimizer.init(jnp.asarray(_PROBE_PARAMS)))
  if "momentum" not in injected:
    return rho, False
  if abs(float(injected["momentum"]) - rho) > 1e-4:
    raise OptionError(
        f"fednova: client_optimizer traces a hyperparameter 'momentum' ="
        f" {float(injected['momentum']):.6g} but steps like heavy-ball momentum"
        f" {rho:.6g}; FedNova reads the traced value for its normaliser, so they must"
        " be the same (use optax.inject_hyperparams(optax.sgd)(learning_rate=...,"
        " momentum=...))")
  return rho, True


def momentum_normalizer(steps: jax.Array, rho: jax.Array, max_steps: int) -> jax.Array:
  """||a_k||_1 for heavy-ball SGD, `[C]` from steps `[C]` (int) and rho ().

  ||a_k||_1 = sum_{j=0}^{tau_k - 1} (tau_k - j) rho^j (= tau_k at rho = 0),
  summed term by term over a static range (no cancellation as rho -> 1).
  """
  j = jnp.arange(max(max_steps, 1), dtype=jnp.float32)
  tau = steps.astype(jnp.float32)[:, None]
  powers = jnp.power(jnp.asarray(rho, jnp.float32), j)   # 0^0 = 1
  return jnp.sum(jnp.maximum(tau - j, 0.0) * powers, axis=1)


def fednova(loss_fn, *, client_optimizer: optax.GradientTransformation,
            server_optimizer: optax.GradientTransformation = SGD_LR_1,
            local_epochs: int | None = None, local_steps: int | None = None,
            batch_size: int = 32, weighting: str = "num_examples",
            aggregator: agg.Aggregator | None = None, shuffle: bool = True,
            cohort_size: int | None = None, sampling: str = "uniform",
            gradient_estimator=None, downlink=None, client_chunk_size=None,
            **unknown_options) -> FederatedAlgorithm:
  """Builds FedNova; arguments as `fedavg`.

  `client_optimizer` must be `optax.sgd(lr)` or `optax.sgd(lr, momentum=rho)`
  with 0 <= rho < 1 (optionally built with `optax.inject_hyperparams`);
  anything else raises OptionError (see the module docstring).

  Metrics add `tau_eff` = sum_k p_k ||a_k||_1 (with `client_steps` [C] = tau_k,
  ||a_k||_1 follows from the formula above).
  """
  reject_unknown("fednova", unknown_options, COMMON_OPTIONS)
  client_optimizer = check_optimizer("fednova", "client_optimizer", client_optimizer)
  rho, traced = _check_client_optimizer(client_optimizer)
  return kit.build_algorithm(
      "fednova", loss_fn, client_update=fednova_client_update,
      server_update=fednova_server_update,
      static=HeavyBallNormalizer(momentum=rho, traced=traced),
      client_optimizer=client_optimizer,
      server_optimizer=server_optimizer, local_epochs=local_epochs,
      local_steps=local_steps, batch_size=batch_size, weighting=weighting,
      aggregator=aggregator, shuffle=shuffle, cohort_size=cohort_size, sampling=sampling,
      gradient_estimator=gradient_estimator, downlink=downlink,
      client_chunk_size=client_chunk_size)


__all__ = ["fednova", "fednova_client_update", "fednova_server_update",
           "HeavyBallNormalizer", "momentum_normalizer", "heavy_ball_probe"]
