"""SCAFFOLD (Karimireddy, Kale, Mohri, Reddi, Stich & Suresh, ICML 2020), Algorithm 1.

Control variates correct each site's drift. Server state: model x and control
variate c; each site k keeps c_k (client state, leading K axis). Per round,
for every participating site k:

    y_k <- x;  tau_k local SGD steps:  y_k <- y_k - lr (g_k(y_k) - c_k + c)
    c_k+ = c_k - c + (x - y_k) / (tau_k lr)                         (option II)
    Delta_k = x - y_k,   dc_k = c_k+ - c_k

and the server takes

    x <- x - server_step( sum_{k in S} p_k Delta_k )     (p_k over the cohort, as FedAvg)
    c <- c + sum_{k in S} q_k dc_k

with q_k the population weight of site k (1/K' for weighting="uniform",
which is the paper's |S|/N * mean; n_k/n for "num_examples", FLamby's
weighting). This keeps c = sum_k q_k c_k exactly under any cohort, so the
method stays correct when only some sites participate; non-participants'
c_k are untouched. In round 1 all control variates are 0, so it equals FedAvg.

SCAFFOLD's option II needs the local learning rate and plain SGD, so the
constructor takes `client_learning_rate` (traced: `state.client_hparams`)
rather than a client optimizer. `init(params, num_sites)` needs K.

Built with the round-building kit (`fedjax_med.core.kit`): the client
(`scaffold_client_update`) trains with the corrected gradient and sends
Delta_k with dc_k in its values; the server (`scaffold_server_update`) applies
the server optimizer to sum_k p_k Delta_k and moves c by sum_k q_k dc_k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_med.core import aggregation as agg
from fedjax_med.core import kit
from fedjax_med.core.algorithm import FederatedAlgorithm
from fedjax_med.core.kit import SGD_LR_1
from fedjax_med.core.options import OptionError, check_nonnegative_float, reject_unknown
from fedjax_med.core.tree import tree_l2_norm, tree_select

# One shared client optimizer: its learning rate is always injected from the state.
_CLIENT_SGD = optax.inject_hyperparams(optax.sgd)(learning_rate=0.0)

_OPTIONS = ("client_learning_rate", "server_optimizer", "local_epochs", "local_steps",
            "batch_size", "weighting", "aggregator", "shuffle", "cohort_size", "sampling",
            "client_chunk_size")


def scaffold_client_update(ctx: kit.ClientContext, x, client_state, data: kit.ClientData,
                           key) -> kit.ClientResult:
  """Site k: tau_k SGD steps on g_k(y) - c_k + c from y = x; option II c_k+.

  Returns Delta_k = x - y_k `[P]`, the new {"control": c_k+} and values
  {"dc": dc_k = c_k+ - c_k, "num_steps": tau_k, "mean_loss"}. A site that
  took no step keeps c_k (dc_k = 0).
  """
  c = ctx.algorithm_state["control"]
  c_k = client_state["control"]
  lr = ctx.client_hparams["learning_rate"]
  correction = jax.tree_util.tree_map(jnp.subtract, c, c_k)          # c - c_k
  base_grad = kit.gradient_fn(ctx)

  def grad_fn(params, xb, yb, mb, step_key=None):
    loss, grads = base_grad(params, xb, yb, mb, step_key)
    return loss, jax.tree_util.tree_map(jnp.add, grads, correction)

  local = kit.local_training(ctx, x, data, key, grad_fn=grad_fn)      # SGD at lr
  delta = kit.pseudo_gradient(x, local.params)                        # x - y_k
  scale = 1.0 / (jnp.maximum(local.num_steps, 1).astype(jnp.float32) * lr)
  c_new = jax.tree_util.tree_map(lambda ck, cg, d: ck - cg + scale * d, c_k, c, delta)
  c_new = tree_select(local.num_steps > 0, c_new, c_k)
  dc = jax.tree_util.tree_map(jnp.subtract, c_new, c_k)
  return kit.ClientResult(delta, {"control": c_new},
                          {"dc": dc, "num_steps": local.num_steps,
                           "mean_loss": local.mean_loss})


def scaffold_server_update(ctx: kit.ServerContext, state, aggregate, values) -> kit.ServerResult:
  """x <- x + server_step(sum_k p_k Delta_k); c <- c + sum_{k in S} q_k dc_k.

  `values["dc"]` is `[C, ...]`; a site drawn m times in the cohort (sampling
  with replacement) contributes q_k dc_k once (each copy weighs q_k / m).
  """
  result = kit.apply_server_update(ctx, state, aggregate, values)
  q = population_weights(ctx.population_num_examples, ctx.config.cohort.weighting)
  positions = ctx.positions
  multiplicity = jnp.sum(positions[:, None] == positions[None, :], axis=1)
  coeff = q[positions] / multiplicity.astype(jnp.float32)
  c = jax.tree_util.tree_map(jnp.add, state.algorithm_state["control"],
                             agg.weighted_sum(values["dc"], coeff))
  return result._replace(algorithm_state={"control": c},
                         metrics={"control_norm": tree_l2_norm(c)})


def _zero_control(params):
  return {"control": jax.tree_util.tree_map(jnp.zeros_like, params)}


def scaffold(loss_fn, *, client_learning_rate: float,
             server_optimizer: optax.GradientTransformation = SGD_LR_1,
             local_epochs: int | None = None, local_steps: int | None = None,
             batch_size: int = 32, weighting: str = "num_examples",
             aggregator: agg.Aggregator | None = None, shuffle: bool = True,
             cohort_size: int | None = None, sampling: str = "uniform",
             client_chunk_size: int | None = None,
             **unknown_options) -> FederatedAlgorithm:
  """Builds SCAFFOLD (option II control variates).

  Args:
    loss_fn: per-example (or batch-level) loss.
    client_learning_rate: local SGD step size lr (traced; change it with
      `fm.set_hyperparams(state, client={"learning_rate": ...})`).
    server_optimizer: optax step on the aggregated Delta (default SGD 1.0,
      i.e. global step size eta_g = 1).
    Others as `fedavg` (client_chunk_size bounds the local-training memory;
    the control variates themselves are K x P).

  Returns:
    FederatedAlgorithm with `init(params, num_sites)`. State:
    `client_states["control"]` holds c_k `[K, ...]`, `algorithm_state["control"]`
    holds c. Metrics as `fedavg` plus `control_norm` = ||c||.
  """
  reject_unknown("scaffold", unknown_options, _OPTIONS)
  lr = check_nonnegative_float("scaffold", "client_learning_rate", client_learning_rate)
  if lr == 0.0:
    raise OptionError("scaffold: client_learning_rate must be > 0 (option II divides by it)")
  algo = kit.build_algorithm(
      "scaffold", loss_fn, client_update=scaffold_client_update,
      server_update=scaffold_server_update, init_client_state=_zero_control,
      init_server_state=_zero_control, client_optimizer=_CLIENT_SGD,
      server_optimizer=server_optimizer, local_epochs=local_epochs, local_steps=local_steps,
      batch_size=batch_size, weighting=weighting, aggregator=aggregator, shuffle=shuffle,
      cohort_size=cohort_size, sampling=sampling, client_chunk_size=client_chunk_size,
      client_hparams={"learning_rate": lr})
  return algo


def population_weights(num_examples: jax.Array, weighting: str) -> jax.Array:
  """q_k over all K sites: n_k / n or 1 / K' (0 for empty sites); sums to 1."""
  return agg.normalized(agg.client_weights(num_examples, weighting))


__all__ = ["scaffold", "scaffold_client_update", "scaffold_server_update",
           "population_weights"]
