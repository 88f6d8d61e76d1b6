"""The round-building kit: an algorithm's round assembled from small pure pieces.

A synchronous federated round is always the same machine; an algorithm only
says what a client does and what the server does with the result:

    w_rx            = downlink(w)                             (optional, e.g. compression)
    S               = cohort(K sites)                         (all, or C sampled)
    for k in S, vmapped (in chunks of M if asked), key_k = fold_in(key, site_id_k):
      ClientResult(update_k, client_state_k', values_k)
                    = client_update(ctx, w_rx, client_state_k, data_k, key_k)
    c_k             = client_weights(server_ctx, values)      (default n_k, or 1)
    Delta           = aggregator(update [C, ...], c [C])      (default sum c_k u_k / sum c_k)
    (w', opt', s')  = server_update(server_ctx, state, Delta, values [C, ...])
                                                              (default: w' = w + optax(Delta))

`build_algorithm` turns those pieces into a `FederatedAlgorithm`: one
`jax.jit`-compiled round with cohorts, chunking, downlink, exact padding,
per-site keys, traced hyperparameters (`set_hyperparams`), `run_seeds`,
checkpoints and the audit log working exactly as for the built-in algorithms,
which are built with it (FedSGD, FedAvg, FedProx, FedNova, FedAdam/Yogi/
Adagrad, fine-tuning, SCAFFOLD, Ditto, FedPer, local training, FedDyn, q-FFL;
`fedjax_med/algorithms/`). Cyclic (sites in sequence) and FedBuff
(asynchronous) have rounds of another shape: they build their `KitConfig`
with `make_config`, their state with `initial_state`, and run the kit's
client (`client_context` + `local_training` / `fedavg_client_update`) and
server (`apply_server_update` in a `ServerContext`) pieces inside a round
loop of their own (`lax.scan` over visits, `lax.while_loop` over events).

The pieces (all pure functions of arrays; shapes for one client):

* `client_update(ctx, params, client_state, data, key) -> ClientResult`
  - `ctx`: `ClientContext` (traced hyperparameters, the server's algorithm
    state, the round number) and the static options; `local_training(ctx,
    ...)` runs the configured client optimizer and local schedule on one
    client's data, `gradient_fn(ctx)` is the configured gradient estimator.
  - `params`: the received global model w_rx (unstacked pytree).
  - `client_state`: this site's state (a leaf `[...]` of the `[K, ...]`
    state from `init_client_state`), or () when the algorithm keeps none.
  - `data`: `ClientData(x [N_max, ...], y [N_max, ...], mask [N_max])`.
  - `key`: the client key, `fold_in(round_key, site_id)`.
  - returns `ClientResult(update, client_state, values)`: `update` is the
    pseudo-gradient the aggregator averages (same tree as params), the new
    client state (or None: unchanged), and `values`, a dict of per-client
    arrays that reach the server stacked `[C, ...]` (e.g. the loss at the
    received model for q-FFL, a control-variate change for SCAFFOLD).
    By convention `num_steps` and `mean_loss` (see `LocalResult`) become
    the metrics `client_steps` and `client_train_loss`.
* `client_weights(server_ctx, values) -> [C]` raw aggregation weights;
  default `server_ctx.weights` (n_k, or 1 per non-empty site, restricted to
  the cohort, per `weighting` and `sampling`).
* `server_update(server_ctx, state, aggregate, values) -> ServerResult`:
  the new global model, server optimizer state and algorithm state; default
  `apply_server_update` (the server optimizer on the aggregate, nothing
  else). A round whose cohort holds no data changes nothing.

What is static and what is traced: everything passed to `build_algorithm`
is static (a change recompiles); every number in `hparams`, in the client
and server optimizers' `optax.inject_hyperparams` and in the gradient
estimator's hyperparameters is traced and can be changed between rounds
with `fedjax_med.set_hyperparams` without recompiling.

K is fixed by `init(params, num_sites=K)` when the algorithm keeps client
state (every state leaf has a leading K axis); a round on data with another
K, or a client_update that returns a client state of another structure or
shape, raises a ValueError naming the algorithm.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_med.core import aggregation as agg
from fedjax_med.core import chunking
from fedjax_med.core import conv as conv_lib
from fedjax_med.core import cohort as cohort_lib
from fedjax_med.core.algorithm import (FederatedAlgorithm, apply_server_optimizer,
                                       make_algorithm, new_server_state, server_key,
                                       stack_sites)
from fedjax_med.core.local import (LocalResult, LocalSchedule, client_keys, local_training
                                   as _local_training, make_schedule)
from fedjax_med.core.objective import (GradientEstimator, check_batches_span_site,
                                       masked_mean_loss, mean_gradient)
from fedjax_med.core.options import (OptionError, check_optimizer, check_positive_int,
                                     reject_unknown)
from fedjax_med.core.state import (init_client_optimizer, injected_hyperparams,
                                   optimizer_hparams)
from fedjax_med.core.tree import tree_l2_norm

SGD_LR_1 = optax.sgd(1.0)
# For algorithms whose clients take no local optimizer step (FedSGD sends a gradient).
NO_CLIENT_OPTIMIZER = optax.identity()

# The options every kit-built algorithm accepts, declared once (`common_options`).
COMMON_OPTIONS = ("client_optimizer", "server_optimizer", "local_epochs", "local_steps",
                  "batch_size", "weighting", "aggregator", "shuffle", "cohort_size",
                  "sampling", "gradient_estimator", "downlink", "client_chunk_size")


class ClientData(NamedTuple):
  """One client's padded data: x `[N_max, ...]`, y `[N_max, ...]`, mask `[N_max]` bool."""
  x: Any
  y: Any
  mask: jax.Array

  @property
  def num_examples(self) -> jax.Array:
    """n_k, int32 scalar."""
    return jnp.sum(self.mask, dtype=jnp.int32)


class ClientResult(NamedTuple):
  """What `client_update` returns for one client (see the module docstring)."""
  update: Any
  client_state: Any = None
  values: dict = {}


class ServerResult(NamedTuple):
  """What `server_update` returns: the next global model, the server-side
  states, and round metrics of its own (e.g. FedNova's tau_eff)."""
  params: Any
  server_opt_state: Any
  algorithm_state: Any = ()
  metrics: dict = {}


class ClientContext(NamedTuple):
  """What a client sees besides its data and key (closed over, not vmapped).

  config: the algorithm's static `KitConfig`.
  hparams: `state.hparams`, the algorithm's traced numbers (e.g. {"mu": ...}).
  client_hparams: the client optimizer's traced hyperparameters.
  algorithm_state: `state.algorithm_state` (e.g. SCAFFOLD's server control
    variate), read-only for clients.
  round: int32 scalar, rounds completed before this one.
  """
  config: Any
  hparams: dict
  client_hparams: dict
  algorithm_state: Any
  round: jax.Array


class ServerContext(NamedTuple):
  """What the server sees besides the state and the aggregate.

  config: the static `KitConfig`.
  hparams: `state.hparams`.
  weights: `[C]` the cohort scheme's raw weights (n_k, or 1 per non-empty site).
  aggregation_weights: `[C]` the weights the aggregator used (`client_weights`).
  positions: `[C]` the cohort's site positions among the K sites.
  num_sites: K (static).
  population_num_examples: `[K]` n_k of every site.
  participated: bool scalar, some participant held data.
  key: the server's key for this round.
  """
  config: Any
  hparams: dict
  weights: jax.Array
  aggregation_weights: jax.Array
  positions: jax.Array
  num_sites: int
  population_num_examples: jax.Array
  participated: jax.Array
  key: jax.Array


@dataclasses.dataclass(frozen=True)
class KitConfig:
  """Everything static about a kit-built algorithm (hashable: part of the jit key)."""
  name: str
  loss_fn: Any
  client_update: Callable
  server_update: Callable
  client_weights: Callable | None
  client_optimizer: optax.GradientTransformation
  server_optimizer: optax.GradientTransformation
  schedule: LocalSchedule
  cohort: cohort_lib.CohortSpec
  aggregator: agg.Aggregator
  gradient: Any            # GradientEstimator.build
  downlink: Any = None     # downlink(w, key) -> (w as received, metrics)
  client_chunk_size: int | None = None
  has_client_state: bool = False
  static: Any = None       # the algorithm's own static options (hashable)
  report_metrics: tuple | None = None   # the round metrics kept (None: all)


# ----------------------------------------------------------------------------- client side

def gradient_fn(ctx: ClientContext) -> Callable:
  """The configured gradient estimator (default: the mean gradient over the
  batch's real rows), built with the traced hyperparameters:
  `(params, x_b, y_b, mask_b, key) -> (loss, grads)`."""
  return ctx.config.gradient(ctx.config.loss_fn, ctx.hparams)


def proximal(grad_fn: Callable, mu: jax.Array, anchor: Any) -> Callable:
  """`grad_fn` of F(w) + (mu / 2) ||w - anchor||^2 (FedProx, Ditto's personal step)."""

  def prox_grad_fn(params, x, y, mask, key=None):
    loss, grads = grad_fn(params, x, y, mask, key)
    grads = jax.tree_util.tree_map(lambda g, p, a: g + mu * (p - a), grads, params, anchor)
    return loss, grads

  return prox_grad_fn


def local_training(ctx: ClientContext, params: Any, data: ClientData, key: jax.Array, *,
                   grad_fn: Callable | None = None,
                   optimizer: optax.GradientTransformation | None = None,
                   optimizer_hparams: dict | None = None,
                   opt_state: Any = None) -> LocalResult:
  """One client's local optimisation with the configured schedule (exact padding).

  Args:
    ctx: the client context.
    params: the starting point.
    data: the client's `ClientData`.
    key: the client key.
    grad_fn: `(params, x_b, y_b, mask_b, key) -> (loss, grads)`; default
      `gradient_fn(ctx)`.
    optimizer: default the configured client optimizer, started fresh from
      `params` with the traced `ctx.client_hparams`.
    optimizer_hparams: traced hyperparameters for a fresh `optimizer` state
      (default `ctx.client_hparams`).
    opt_state: continue from this optimizer state instead of a fresh one.

  Returns:
    `LocalResult(params, opt_state, num_steps, mean_loss)`.
  """
  config = ctx.config
  grad_fn = grad_fn if grad_fn is not None else gradient_fn(ctx)
  check_batches_span_site(config.gradient, config.schedule.batch_size, data.mask.shape[0],
                          config.name)
  optimizer = optimizer if optimizer is not None else config.client_optimizer
  if opt_state is None:
    opt_state = init_client_optimizer(
        optimizer, params,
        ctx.client_hparams if optimizer_hparams is None else optimizer_hparams)
  return _local_training(grad_fn, optimizer, config.schedule, params, opt_state,
                         data.x, data.y, data.mask, key)


def site_loss(ctx: ClientContext, params: Any, data: ClientData) -> jax.Array:
  """F_k(params): the mean loss over the client's real rows (0 for an empty client)."""
  return masked_mean_loss(ctx.config.loss_fn, params, data.x, data.y, data.mask)


def pseudo_gradient(received: Any, trained: Any) -> Any:
  """Delta_k = w_rx - w_k (what FedAvg-style clients send)."""
  return jax.tree_util.tree_map(jnp.subtract, received, trained)


def fedavg_client_update(ctx: ClientContext, params, client_state, data, key) -> ClientResult:
  """FedAvg's client (McMahan et al. 2017): local training, Delta_k = w - w_k."""
  del client_state
  local = local_training(ctx, params, data, key)
  return ClientResult(pseudo_gradient(params, local.params),
                      values={"num_steps": local.num_steps, "mean_loss": local.mean_loss})


# ----------------------------------------------------------------------------- server side

def apply_server_update(ctx: ServerContext, state, aggregate, values) -> ServerResult:
  """The default server: w <- w + optax_update(aggregate); no step when no
  participant held data (a stateful server optimizer does not move)."""
  del values
  params, opt_state = apply_server_optimizer(
      ctx.config.server_optimizer, state.params, state.server_opt_state, aggregate,
      active=ctx.participated)
  return ServerResult(params, opt_state, state.algorithm_state)


def normalized_weights(ctx: ServerContext) -> jax.Array:
  """The aggregation weights normalised to sum to 1 over the cohort, `[C]`."""
  return agg.normalized(ctx.aggregation_weights)


# ----------------------------------------------------------------------------- assembly

def check_common_options(name: str, *, client_optimizer, server_optimizer, local_epochs,
                         local_steps, batch_size, weighting, aggregator, shuffle,
                         cohort_size, sampling, gradient_estimator, downlink,
                         client_chunk_size) -> tuple[dict, GradientEstimator]:
  """Validates the common options once; returns (the static pieces of a
  KitConfig, the gradient estimator)."""
  if local_epochs is None and local_steps is None:
    local_epochs = 1
  chunking.require_linear_aggregator(name, client_chunk_size, aggregator,
                                     agg.weighted_mean())
  estimator = gradient_estimator or mean_gradient()
  if not isinstance(estimator, GradientEstimator):
    raise OptionError(f"{name}: gradient_estimator must be a GradientEstimator (e.g."
                      f" fedjax_med.privacy.dp_sgd(...)), got {type(estimator).__name__}")
  if downlink is not None and not callable(downlink):
    raise OptionError(f"{name}: downlink must be a function (w, key) -> (w, metrics),"
                      f" got {type(downlink).__name__}")
  return dict(
      client_optimizer=check_optimizer(name, "client_optimizer", client_optimizer),
      server_optimizer=check_optimizer(name, "server_optimizer", server_optimizer),
      schedule=make_schedule(name, batch_size, local_epochs, local_steps, shuffle),
      cohort=cohort_lib.make_cohort_spec(name, cohort_size, sampling, weighting),
      aggregator=aggregator if aggregator is not None else agg.weighted_mean(),
      gradient=estimator.build, downlink=downlink,
      client_chunk_size=chunking.check_chunk_size(name, client_chunk_size)), estimator


def build_algorithm(name: str, loss_fn, *, client_update: Callable = fedavg_client_update,
                    server_update: Callable = apply_server_update,
                    client_weights: Callable | None = None,
                    init_client_state: Callable | None = None,
                    init_server_state: Callable | None = None,
                    hparams: dict | None = None, personalize: Callable | None = None,
                    static: Any = None, client_hparams: dict | None = None,
                    report_metrics: tuple[str, ...] | None = None,
                    prefixed_optimizers: dict | None = None,
                    client_optimizer: optax.GradientTransformation,
                    server_optimizer: optax.GradientTransformation = SGD_LR_1,
                    local_epochs: int | None = None, local_steps: int | None = None,
                    batch_size: int = 32, weighting: str = "num_examples",
                    aggregator: agg.Aggregator | None = None, shuffle: bool = True,
                    cohort_size: int | None = None, sampling: str = "uniform",
                    gradient_estimator: GradientEstimator | None = None, downlink=None,
                    client_chunk_size: int | None = None,
                    **unknown_options) -> FederatedAlgorithm:
  """Builds a `FederatedAlgorithm` from the kit's pieces (module docstring).

  Args:
    name: the algorithm's name (messages, progress bars, records).
    loss_fn: `loss_fn(params, x, y) -> [B]` (or a `fedjax_med.batch_loss`).
    client_update: `(ctx, params, client_state, data, key) -> ClientResult`
      (default FedAvg's client).
    server_update: `(server_ctx, state, aggregate, values) -> ServerResult`
      (default: the server optimizer on the aggregate).
    client_weights: `(server_ctx, values) -> [C]` raw aggregation weights
      (default the cohort scheme's n_k or 1).
    init_client_state: `params -> one site's state`; stacked K times by
      `init(params, num_sites=K)` (which then needs num_sites).
    init_server_state: `params -> algorithm_state` (default ()).
    hparams: the algorithm's traced numbers, `{name: float}`, read in the
      pieces as `ctx.hparams[name]`; settable with `set_hyperparams`.
    personalize: optional `(state, data, key) -> per-site params [K, ...]`.
    static: any hashable value the pieces read as `ctx.config.static`.
    report_metrics: the names of the round metrics the round returns (None:
      every metric; e.g. `local_only` keeps its per-site ones). A name the
      round does not produce raises a ValueError naming it.
    client_hparams: initial traced client-optimizer hyperparameters
      (`state.client_hparams`), overriding the optimizer's injected values
      (e.g. SCAFFOLD's client learning rate on one shared optimizer object).
    prefixed_optimizers: `{prefix: optimizer}` for client-side optimizers
      beside the client optimizer (Ditto's personal step, fine-tuning): each
      one's injected hyperparameters are traced in `state.hparams` as
      `{prefix}_{name}` (settable on their own with `set_hyperparams`); read
      them back with `fedjax_med.core.state.select_prefixed(prefix, ctx.hparams)`.
    client_optimizer ... client_chunk_size: the common options, as for
      `fedjax_med.algorithms.fedavg`.

  Returns:
    FederatedAlgorithm: `init(params, num_sites=None)`, `round`, `pure_round`.
  """
  reject_unknown(name, unknown_options, COMMON_OPTIONS)
  config, estimator = make_config(
      name, loss_fn, client_update=client_update, server_update=server_update,
      client_weights=client_weights, has_client_state=init_client_state is not None,
      static=static, report_metrics=report_metrics, client_optimizer=client_optimizer,
      server_optimizer=server_optimizer, local_epochs=local_epochs, local_steps=local_steps,
      batch_size=batch_size, weighting=weighting, aggregator=aggregator, shuffle=shuffle,
      cohort_size=cohort_size, sampling=sampling, gradient_estimator=gradient_estimator,
      downlink=downlink, client_chunk_size=client_chunk_size)
  traced = {**estimator.hparams, **(hparams or {})}

  def init(params, num_sites: int | None = None):
    client_states = ()
    if init_client_state is not None:
      if num_sites is None:
        raise ValueError(f"{name}.init: this algorithm keeps per-site state; call"
                         f" init(params, num_sites=K)")
      check_positive_int(f"{name}.init", "num_sites", num_sites)
      client_states = stack_sites(init_client_state(params), num_sites)
    algorithm_state = init_server_state(params) if init_server_state is not None else ()
    second = {name: value for prefix, optimizer in (prefixed_optimizers or {}).items()
              for name, value in optimizer_hparams(prefix, optimizer, params).items()}
    return initial_state(config, params, hparams={**traced, **second},
                         client_hparams=client_hparams, client_states=client_states,
                         algorithm_state=algorithm_state,
                         aggregator_state=config.aggregator.init(params, num_sites))

  return make_algorithm(name, kit_round, config, loss_fn, init, personalize,
                        expose_config=True)


def _check_client_states(name: str, client_states: Any, num_sites: int) -> None:
  leaves = jax.tree_util.tree_leaves(client_states)
  bad = [leaf.shape for leaf in leaves if not leaf.shape or leaf.shape[0] != num_sites]
  if bad:
    built = bad[0][0] if bad[0] else "no"
    raise ValueError(
        f"{name}: state was built for {built} sites but data has {num_sites} (the state's"
        f" client states have leading axes {[s[:1] for s in bad]}, the data K = {num_sites}"
        f" sites); call init(params, num_sites={num_sites}) for this data")


def _check_returned_state(name: str, old: Any, new: Any) -> None:
  old_struct = jax.tree_util.tree_structure(old)
  new_struct = jax.tree_util.tree_structure(new)
  if old_struct != new_struct:
    raise ValueError(f"{name}: client_update returned a client state of structure"
                     f" {new_struct}, but the state holds {old_struct}")
  for a, b in zip(jax.tree_util.tree_leaves(old), jax.tree_util.tree_leaves(new)):
    if jnp.shape(a) != jnp.shape(b) or jnp.result_type(a) != jnp.result_type(b):
      raise ValueError(f"{name}: client_update returned a client state leaf"
                       f" {jnp.result_type(b)}{list(jnp.shape(b))} where the state holds"
                       f" {jnp.result_type(a)}{list(jnp.shape(a))}")


def reject_fixed_options(name: str, options: dict, fixed: tuple) -> None:
  """OptionError for common options an algorithm fixes itself (e.g. FedDyn's
  server update has no server optimizer)."""
  given = sorted(set(options) & set(fixed))
  if given:
    raise OptionError(f"{name}: option(s) {given} are fixed by the algorithm and cannot"
                      " be set")


# ----------------------------------------------------------------------------- rounds of another shape

def make_config(name: str, loss_fn, *, client_update: Callable = fedavg_client_update,
                server_update: Callable = apply_server_update,
                client_weights: Callable | None = None, has_client_state: bool = False,
                static: Any = None, report_metrics: tuple[str, ...] | None = None,
                client_optimizer: optax.GradientTransformation,
                server_optimizer: optax.GradientTransformation = SGD_LR_1,
                local_epochs: int | None = None, local_steps: int | None = None,
                batch_size: int = 32, weighting: str = "num_examples",
                aggregator: agg.Aggregator | None = None, shuffle: bool = True,
                cohort_size: int | None = None, sampling: str = "uniform",
                gradient_estimator: GradientEstimator | None = None, downlink=None,
                client_chunk_size: int | None = None) -> tuple[KitConfig, GradientEstimator]:
  """The validated `KitConfig` of an algorithm whose round has another shape.

  For algorithms that use the kit's client and server pieces inside a round
  loop of their own (Cyclic: a `lax.scan` over sites in sequence; FedBuff: a
  `lax.while_loop` over asynchronous events), where `build_algorithm`'s
  vmapped round does not fit. The options are checked as `build_algorithm`
  checks them (same defaults, same messages); unknown options are the
  caller's to reject (`fedjax_med.core.options.reject_unknown`).

  Args:
    name ... static, report_metrics: as `build_algorithm` (`has_client_state`: the
      state keeps per-site client states with a leading K axis).
    client_optimizer ... client_chunk_size: the common options, as for
      `fedjax_med.algorithms.fedavg`.

  Returns:
    (config, estimator): the static `KitConfig` and the gradient estimator,
    whose `hparams` belong in the state's traced `hparams` (`initial_state`).
  """
  pieces, estimator = check_common_options(
      name, client_optimizer=client_optimizer, server_optimizer=server_optimizer,
      local_epochs=local_epochs, local_steps=local_steps, batch_size=batch_size,
      weighting=weighting, aggregator=aggregator, shuffle=shuffle, cohort_size=cohort_size,
      sampling=sampling, gradient_estimator=gradient_estimator, downlink=downlink,
      client_chunk_size=client_chunk_size)
  for what, fn in (("client_update", client_update), ("server_update", server_update)):
    if not callable(fn):
      raise OptionError(f"{name}: {what} must be a function, got {type(fn).__name__}")
  config = KitConfig(name=name, loss_fn=conv_lib.round_loss(loss_fn),
                     client_update=client_update,
                     server_update=server_update, client_weights=client_weights,
                     has_client_state=has_client_state, static=static,
                     report_metrics=None if report_metrics is None else tuple(report_metrics),
                     **pieces)
  return config, estimator


def initial_state(config: KitConfig, params: Any, *, hparams: dict | None = None,
                  client_hparams: dict | None = None, client_states: Any = (),
                  algorithm_state: Any = (), aggregator_state: Any = ()):
  """A round-0 `ServerState` for `config`, as `build_algorithm`'s `init` makes it.

  state.server_opt_state = server_optimizer.init(params); state.client_hparams
  = the client optimizer's injected hyperparameters (`optax.inject_hyperparams`),
  overridden by `client_hparams`; state.hparams = `hparams` (traced; include
  the gradient estimator's `hparams`); the other fields as given (client
  states with a leading K axis, e.g. from `stack_sites`).
  """
  return new_server_state(
      params, config.server_optimizer,
      client_hparams={**injected_hyperparams(config.client_optimizer.init(params)),
                      **(client_hparams or {})},
      hparams=dict(hparams or {}), client_states=client_states,
      algorithm_state=algorithm_state, aggregator_state=aggregator_state)


def client_context(config: KitConfig, state) -> ClientContext:
  """The `ClientContext` clients see in a round from `state` (what `kit_round`
  builds): its traced hparams and client hparams, algorithm state and round."""
  return ClientContext(config, state.hparams, state.client_hparams, state.algorithm_state,
                       state.round)


_VALUE_METRICS = {"num_steps": "client_steps", "mean_loss": "client_train_loss"}


class RoundPlan(NamedTuple):
  """A round's server side before any client runs (`begin_round`).

  params: w as the clients receive it (after the downlink, if any).
  cohort: the `Cohort` (positions, the cohort's rows or census, client states,
    raw weights `[C]`, aggregation context).
  keys: `[C, ...]` the client keys, fold_in(round_key, site_id_k).
  positions: `[C]` int32 positions of the cohort among the K sites.
  server_key: fold_in(round_key, SERVER_STREAM).
  downlink_metrics: the downlink's metrics ({} without one).
  """
  params: Any
  cohort: cohort_lib.Cohort
  keys: jax.Array
  positions: jax.Array
  server_key: jax.Array
  downlink_metrics: dict


def begin_round(config: KitConfig, state, data, key) -> RoundPlan:
  """The server's first half of a round: downlink, cohort, client keys.

  `data` needs only `num_examples [K]` and `site_ids [K]` (a `FederatedData`,
  or a census of the sites: `fedjax_med.deploy` plans rounds from the n_k the
  nodes report, without their rows).
  """
  w = state.params
  downlink_metrics = {}
  if config.downlink is not None:
    w, downlink_metrics = config.downlink(w, jax.random.fold_in(server_key(key), 1))
  cohort = cohort_lib.select_cohort(config.cohort, data, state.client_states, key)
  num_sites = data.num_examples.shape[0]
  return RoundPlan(w, cohort, client_keys(key, cohort.data.site_ids),
                   cohort_positions(cohort, num_sites), server_key(key), downlink_metrics)


def client_step(config: KitConfig, ctx: ClientContext, params, client_state, data: ClientData,
                key) -> tuple[Any, tuple[Any, dict]]:
  """One client's part of a round: `config.client_update`, checked, with the
  kit's conventions (an empty client keeps its state exactly; `values` gains
  `num_examples`). Returns `(update, (client_state', values))`; `client_state`
  is () for algorithms without one."""
  result = config.client_update(ctx, params, client_state, data, key)
  if not isinstance(result, ClientResult):
    raise TypeError(f"{config.name}: client_update must return a ClientResult, got"
                    f" {type(result).__name__}")
  new_state = client_state if result.client_state is None else result.client_state
  if config.has_client_state:
    _check_returned_state(config.name, client_state, new_state)
    # A client with no data keeps its state exactly.
    new_state = jax.tree_util.tree_map(
        lambda new, old: jnp.where(jnp.any(data.mask), new, old), new_state, client_state)
  values = {**result.values, "num_examples": jnp.sum(data.mask, dtype=jnp.int32)}
  return result.update, (new_state, values)


def server_context(config: KitConfig, state, plan: RoundPlan, population_num_examples,
                   cohort_weights, weights) -> ServerContext:
  """The `ServerContext` of a round planned by `plan` (`cohort_weights`: the cohort
  scheme's raw weights; `weights`: the aggregation weights)."""
  return ServerContext(config, state.hparams, cohort_weights, weights, plan.positions,
                       population_num_examples.shape[0], population_num_examples,
                       jnp.sum(cohort_weights) > 0, plan.server_key)


def finish_round(config: KitConfig, state, plan: RoundPlan, population_num_examples,
                 cohort_weights, weights, update, new_states, values, aggregator_state,
                 aggregator_metrics):
  """The server's second half of a round, once the aggregate is known: the
  server update, the cohort's client states written back, the metrics.

  population_num_examples: `[K]` n_k of every site; cohort_weights: `[C]` the
  cohort scheme's raw weights (a round in which they sum to 0 changes
  nothing); weights: `[C]` the aggregation weights; update: the aggregate;
  new_states / values: the clients' outputs stacked `[C, ...]`.
  """
  result = config.server_update(
      server_context(config, state, plan, population_num_examples, cohort_weights, weights),
      state, update, values)
  if not isinstance(result, ServerResult):
    raise TypeError(f"{config.name}: server_update must return a ServerResult, got"
                    f" {type(result).__name__}")
  new_client_states = state.client_states
  if config.has_client_state:
    new_client_states = cohort_lib.put_sites(state.client_states, new_states,
                                             plan.cohort.indices)

  metrics = {}
  if "mean_loss" in values:
    metrics["train_loss"] = jnp.sum(agg.normalized(weights) * values["mean_loss"])
  for name, metric in _VALUE_METRICS.items():
    if name in values:
      metrics[metric] = values[name]
  metrics.update({"num_examples": values["num_examples"], "cohort": plan.positions,
                  "update_norm": tree_l2_norm(update), **aggregator_metrics, **result.metrics,
                  **plan.downlink_metrics})
  new_state = state._replace(params=result.params, server_opt_state=result.server_opt_state,
                             algorithm_state=result.algorithm_state,
                             aggregator_state=aggregator_state,
                             client_states=new_client_states, round=state.round + 1)
  if config.report_metrics is not None:
    missing = sorted(set(config.report_metrics) - set(metrics))
    if missing:
      raise ValueError(f"{config.name}: report_metrics names {missing}, which the round does"
                       f" not produce; it produces {sorted(metrics)}")
    metrics = {name: metrics[name] for name in config.report_metrics}
  return new_state, metrics


def kit_round(config: KitConfig, state, data, key):
  """One round of a kit-built algorithm on data.x [K, N_max, ...], data.mask [K, N_max]:
  `begin_round`, the cohort's `client_step`s under vmap (in chunks if asked) with
  their aggregation, then `finish_round`."""
  num_sites = data.mask.shape[0]
  if config.has_client_state:
    _check_client_states(config.name, state.client_states, num_sites)
  plan = begin_round(config, state, data, key)
  cohort = plan.cohort
  ctx = client_context(config, state)

  def fn(x_k, y_k, mask_k, key_k, state_k=()):
    return client_step(config, ctx, plan.params, state_k, ClientData(x_k, y_k, mask_k), key_k)

  inputs = (cohort.data.x, cohort.data.y, cohort.data.mask, plan.keys)
  if config.has_client_state:
    inputs = inputs + (cohort.client_states,)

  if config.client_weights is None:
    weights = cohort.weights
    update, (new_states, values), aggregator_state, agg_metrics = chunking.aggregate_clients(
        fn, inputs, weights, config.aggregator, state.aggregator_state, plan.server_key,
        cohort.context, config.client_chunk_size)
  else:
    # Weights that depend on the clients' values: run the clients, then aggregate.
    updates, (new_states, values) = chunking.map_clients(
        lambda *a: ((), fn(*a)), inputs, jnp.zeros_like(cohort.weights),
        config.client_chunk_size)[1]
    weights = config.client_weights(
        server_context(config, state, plan, data.num_examples, cohort.weights,
                       cohort.weights), values).astype(jnp.float32)
    update, aggregator_state, agg_metrics = config.aggregator.aggregate(
        updates, weights, state.aggregator_state, plan.server_key, cohort.context)
    update = chunking.scaled_aggregate(update, cohort.context)

  return finish_round(config, state, plan, data.num_examples, cohort.weights, weights, update,
                      new_states, values, aggregator_state, agg_metrics)


def cohort_positions(cohort: cohort_lib.Cohort, size: int) -> jax.Array:
  """[C] positions of the cohort's sites among the K sites."""
  if cohort.indices is None:
    return jnp.arange(size, dtype=jnp.int32)
  return cohort.indices


__all__ = ["ClientData", "ClientResult", "ServerResult", "ClientContext", "ServerContext",
           "KitConfig", "COMMON_OPTIONS", "SGD_LR_1", "NO_CLIENT_OPTIMIZER", "gradient_fn", "proximal",
           "local_training", "site_loss", "pseudo_gradient", "fedavg_client_update",
           "apply_server_update", "normalized_weights", "check_common_options",
           "reject_fixed_options", "OptionError",
           "build_algorithm", "kit_round", "cohort_positions", "make_config",
           "RoundPlan", "begin_round", "client_step", "server_context", "finish_round",
           "initial_state", "client_context", "client_keys", "stack_sites"]
