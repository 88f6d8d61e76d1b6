"""FedBuff: buffered asynchronous aggregation on a simulated clock.

Nguyen, Malik, Zhan, Yousefpour, Rabbat, Malek & Huba, "Federated Learning
with Buffered Asynchronous Aggregation", AISTATS 2022.

Sites train at their own pace. A site downloads the current global model
w_v (version v), runs its local steps, and uploads Delta = w_v - w_local.
The server keeps a buffer; an update arriving while the server is at
version v' has staleness s = v' - v and enters the buffer with weight
g(s) = (1 + s)^(-a) (a = `staleness_exponent`; a = 1/2 is the paper's
1/sqrt(1 + s), a = 0 ignores staleness). When the buffer holds M updates
(`buffer_size`) the server steps

    Delta_bar = sum_{i in buffer} p_i g(s_i) Delta_i / sum_{i in buffer} p_i,
    w_{v+1}   = server_optimizer step on Delta_bar,

with p_i = n_i (weighting="num_examples") or 1 ("uniform", the paper's
(1/M) sum_i g(s_i) Delta_i), and clears the buffer. A site that has
uploaded immediately downloads the newest model and starts again, so a fast
site can put several updates into one buffer and a straggler's updates
arrive stale.

Simulated clock. Site k runs at `speeds[k]` local steps per time unit: a
job of tau local steps takes tau / speeds[k] (times exp(jitter * z),
z ~ N(0, 1) drawn from the job's key, when `jitter` > 0). Speeds are given
to `init(params, num_sites, speeds=...)`; `site_speeds` builds them
(proportional to each site's work, a straggler factor, a seeded spread).
Events at the same instant are simultaneous: their arrivals are processed
in site order (a flush happens as soon as the buffer holds M), and only then
do those sites restart, all from the newest model. So with equal job
durations and M = K every site arrives at once, the buffer is flushed with
staleness 0 and every site restarts from the new model: exactly synchronous
FedAvg (tested, bit for bit).

One `round` = simulated events until at least one server step (a flush):

    repeat (one lax.while_loop iteration per event time):
      A. sites that are idle start a job from the current model w
         (one vmapped local training over all K sites; idle ones keep it);
      B. t = the earliest finish time; every site finishing at t uploads
         (through the optional `uplink` link, e.g. compression), in site
         order its update enters the buffer; a full buffer is flushed;
    until a flush happened.

Sites that arrived at the flushing event restart at the beginning of the next
round from the newest model. Keys: the jobs started at the first event of
round r use `client_keys(round_key, site_ids)`, as FedAvg's round r; jobs
started at a later event e of the same round use
`client_keys(fold_in(fold_in(round_key, RESTART_STREAM), e), site_ids)`.
Everything (events, training, flushes) is one jit-compiled function of
arrays, deterministic from the key; `pure_round` can be vmapped over seeds
(`fm.run_seeds`). Cost: step A trains all K sites under one vmap and keeps
the idle sites' results (others' are discarded), so on an accelerator an
event costs about one site's training, on a CPU up to K sites'. Step A is
skipped (`lax.cond`) when no site is idle.

Bytes are counted per job: a start downloads the model (float32 reference,
or the `downlink` hook's `bytes_down_per_site`), an arrival uploads its
update (float32 reference, or the `uplink` link's `bytes_up`).

Built from the round-building kit (`fedjax_med.core.kit`): the options and
the static `KitConfig` come from `kit.make_config` (the buffer's reducer is
its aggregator, FedBuff's own options its `static` `FedBuffConfig`), the
state from `kit.initial_state`; a job is the kit's FedAvg client
(`kit.fedavg_client_update` in the round's `kit.client_context`, with the
kit's per-site keys `kit.client_keys`), and a flush is the kit's server step
(`kit.apply_server_update` in a `kit.ServerContext` whose participants are
the buffered updates). Only the clock, the buffer and the staleness weights
are FedBuff's own.

State (`init(params, num_sites, speeds)`; K sites, buffer size M):

    client_states     FedBuffClientState: each site's job in flight
    algorithm_state   FedBuffServerState: clock, version, speeds and the buffer
    aggregator_state  {"uplink": the uplink link's state or (),
                       "reducer": the reducer's state}
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_med.core import aggregation as agg
from fedjax_med.core import kit
from fedjax_med.core.algorithm import (FederatedAlgorithm, check_num_sites, make_algorithm,
                                       server_key)
from fedjax_med.core.objective import GradientEstimator
from fedjax_med.core.options import (OptionError, check_nonnegative_float, check_positive_int,
                                     reject_unknown)
from fedjax_med.core.tree import tree_l2_norm
from fedjax_med.core.streams import RESTART_STREAM, DURATION_STREAM  # noqa: F401 (re-exported)

# Event e >= 1 of a round: keys from fold_in(fold_in(round_key, RESTART_STREAM), e);
# distinct from site ids, SAMPLING_STREAM (2^32 - 2) and SERVER_STREAM (2^32 - 1).
# Within a job's client key: the duration jitter's normal draw (pass keys use small
# integers, the local steps STEP_STREAM = 2^32 - 1).

_OPTIONS = ("client_optimizer", "buffer_size", "server_optimizer", "local_epochs",
            "local_steps", "batch_size", "weighting", "staleness_exponent", "jitter",
            "uplink", "reducer", "downlink", "gradient_estimator", "shuffle")


@dataclasses.dataclass(frozen=True)
class FedBuffConfig:
  """FedBuff's own static options (`KitConfig.static`; hashable).

  buffer_size: M, updates per server step.
  uplink: `ClientTransform` applied to each arriving update, or None.
  """
  buffer_size: int
  uplink: Any = None


class FedBuffClientState(NamedTuple):
  """`state.client_states`: each site's job in flight (every leaf leads with K).

  update: tree `[K, ...]` (as params), Delta_k = w_v - w_k of the site's job.
  version: `[K]` int32, the server version v the job started from.
  finish: `[K]` float32, the simulated time at which the job ends.
  busy: `[K]` bool, a job is running (its update not yet uploaded).
  loss: `[K]` float32, the job's mean local batch loss.
  """
  update: Any
  version: jax.Array
  finish: jax.Array
  busy: jax.Array
  loss: jax.Array


class FedBuffServerState(NamedTuple):
  """The server's side: clock, model version, site speeds and the buffer.

  `state.algorithm_state` is one of these.

  clock: float32 `[]`, simulated time of the latest event.
  version: int32 `[]`, server steps (flushes) so far.
  speeds: `[K]` float32, local steps per unit of simulated time.
  slots: tree `[M, ...]` (as params), the buffered (uplinked) updates.
  slot_site: `[M]` int32, the site position of each buffered update.
  slot_staleness: `[M]` int32, s_i = version at arrival - version at start.
  slot_weight: `[M]` float32, p_i (n_i, or 1 with weighting="uniform").
  slot_loss: `[M]` float32, the job's mean local batch loss.
  count: int32 `[]`, updates in the buffer (0 <= count < M between events).
  """
  clock: jax.Array
  version: jax.Array
  speeds: jax.Array
  slots: Any
  slot_site: jax.Array
  slot_staleness: jax.Array
  slot_weight: jax.Array
  slot_loss: jax.Array
  count: jax.Array


def fedbuff(loss_fn, *, client_optimizer: optax.GradientTransformation, buffer_size: int,
            server_optimizer: optax.GradientTransformation = kit.SGD_LR_1,
            local_epochs: int | None = None, local_steps: int | None = None,
            batch_size: int = 32, weighting: str = "num_examples",
            staleness_exponent: float = 0.5, jitter: float = 0.0,
            uplink: agg.ClientTransform | None = None, reducer: agg.Aggregator | None = None,
            downlink=None, gradient_estimator: GradientEstimator | None = None,
            shuffle: bool = True, **unknown_options) -> FederatedAlgorithm:
  """Builds FedBuff (see the module docstring for the exact semantics).

  Args:
    loss_fn: per-example (or batch-level) loss.
    client_optimizer: optax transformation for the local steps (fresh per job).
    buffer_size: M >= 1, updates per server step.
    server_optimizer: optax step on the buffered pseudo-gradient (default
      SGD 1.0; the paper uses a server learning rate eta_g).
    local_epochs / local_steps / batch_size / shuffle: local work per job, as FedAvg.
    weighting: "num_examples" (p_i = n_i) or "uniform" (p_i = 1, the paper's).
    staleness_exponent: a in g(s) = (1 + s)^(-a); traced (`state.hparams`).
    jitter: sigma of the log-normal factor exp(sigma z) on each job's
      duration; traced. 0 = durations exactly tau / speed.
    uplink: optional `ClientTransform` applied to the arriving updates
      (e.g. `fm.compression.uplink(...)`); its `bytes_up` are counted.
    reducer: the buffer's reduction (default `weighted_mean()`); it gets the
      weights p_i g(s_i) and its result is rescaled by
      sum_i p_i g(s_i) / sum_i p_i (so that staleness shrinks the step).
    downlink: optional hook `downlink(w, key) -> (w_received, metrics)`.
    gradient_estimator: as FedAvg's.

  Returns:
    FederatedAlgorithm with `init(params, num_sites, speeds=None)` (state
    types `FedBuffClientState`, `FedBuffServerState`). Round
    metrics: train_loss, update_norm (of the last flush), sim_time (clock
    after the round), version (server steps so far), flushes, events,
    arrivals [K], staleness [M] and cohort [M] (the last flushed buffer's
    staleness and sites, in arrival order), staleness_mean, staleness_max,
    num_examples [K], bytes_up [K], bytes_up_total, bytes_down [K],
    bytes_down_total.

  Raises:
    OptionError for buffer_size < 1, negative staleness_exponent or jitter,
    unknown options.
  """
  reject_unknown("fedbuff", unknown_options, _OPTIONS)
  check_positive_int("fedbuff", "buffer_size", buffer_size)
  exponent = check_nonnegative_float("fedbuff", "staleness_exponent", staleness_exponent)
  jitter = check_nonnegative_float("fedbuff", "jitter", jitter)
  if uplink is not None and not isinstance(uplink, agg.ClientTransform):
    raise OptionError(f"fedbuff: uplink must be a ClientTransform (e.g."
                      f" fm.compression.uplink(...)), got {type(uplink).__name__}")
  if reducer is not None and not isinstance(reducer, agg.Aggregator):
    raise OptionError(f"fedbuff: reducer must be an Aggregator (e.g."
                      f" fm.aggregators.weighted_mean()), got {type(reducer).__name__}")
  config, estimator = kit.make_config(
      "fedbuff", loss_fn, static=FedBuffConfig(int(buffer_size), uplink),
      has_client_state=True, client_optimizer=client_optimizer,
      server_optimizer=server_optimizer, local_epochs=local_epochs, local_steps=local_steps,
      batch_size=batch_size, weighting=weighting, aggregator=reducer, shuffle=shuffle,
      gradient_estimator=gradient_estimator, downlink=downlink)
  hparams = {**estimator.hparams, "staleness_exponent": exponent, "jitter": jitter}

  def init(params, num_sites: int, speeds=None):
    check_positive_int("fedbuff.init", "num_sites", num_sites)
    speeds = check_speeds("fedbuff.init", speeds, num_sites)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, jax.tree_util.tree_map(jnp.asarray, params))
    m = config.static.buffer_size
    client_states = FedBuffClientState(
        update=kit.stack_sites(zeros, num_sites),
        version=jnp.zeros((num_sites,), jnp.int32),
        finish=jnp.zeros((num_sites,), jnp.float32),
        busy=jnp.zeros((num_sites,), bool),
        loss=jnp.zeros((num_sites,), jnp.float32))
    server = FedBuffServerState(
        clock=jnp.zeros((), jnp.float32),
        version=jnp.zeros((), jnp.int32),
        speeds=jnp.asarray(speeds, jnp.float32),
        slots=kit.stack_sites(zeros, m),
        slot_site=jnp.zeros((m,), jnp.int32),
        slot_staleness=jnp.zeros((m,), jnp.int32),
        slot_weight=jnp.zeros((m,), jnp.float32),
        slot_loss=jnp.zeros((m,), jnp.float32),
        count=jnp.zeros((), jnp.int32))
    aggregator_state = {
        "uplink": () if uplink is None else uplink.init(params, num_sites),
        "reducer": config.aggregator.init(params, num_sites),
    }
    return kit.initial_state(config, params, hparams=hparams, client_states=client_states,
                             aggregator_state=aggregator_state,
                             algorithm_state=server)

  return make_algorithm("fedbuff", _fedbuff_round, config, loss_fn, init)


def check_speeds(name: str, speeds, num_sites: int) -> np.ndarray:
  """`[K]` float32 speeds (local steps per time unit), each finite and > 0."""
  if speeds is None:
    return np.ones((num_sites,), np.float32)
  try:
    values = np.asarray(speeds, dtype=np.float64)
  except (TypeError, ValueError):
    raise OptionError(f"{name}: speeds must be {num_sites} numbers, got {speeds!r}") from None
  if values.shape != (num_sites,):
    raise OptionError(f"{name}: speeds must have one entry per site, shape ({num_sites},),"
                      f" got shape {values.shape}")
  for k, v in enumerate(values):
    if not (np.isfinite(v) and v > 0):
      raise OptionError(f"{name}: speeds[{k}] = {v} must be a finite number > 0 (local"
                        " steps per unit of simulated time)")
  return values.astype(np.float32)


def site_speeds(work, *, slowdown=None, spread: float = 0.0, key=None) -> np.ndarray:
  """Site speeds for `fedbuff.init`: speed_k = work_k * exp(spread * z_k) / slowdown_k.

  With work_k = site k's local steps per job (e.g. E * ceil(n_k / B)) every
  site needs one time unit per job ("compute proportional to its data"), a
  slowdown of 10 makes a site a 10x straggler, and spread > 0 draws a
  log-normal factor per site from `key` (z_k ~ N(0, 1)).

  Args:
    work: `[K]` positive numbers (entries <= 0, e.g. empty sites that never
      run, get speed 1).
    slowdown: None, a `[K]` array of factors >= 1... (any positive numbers),
      or a dict {site_index: factor}.
    spread: sigma of the seeded log-normal factor (needs `key` when > 0).
    key: a JAX PRNG key.

  Returns:
    `[K]` float32 numpy array.
  """
  w = np.asarray(work, dtype=np.float64).reshape(-1)
  speeds = np.where(w > 0, w, 1.0)
  factors = np.ones_like(speeds)
  if isinstance(slowdown, dict):
    for k, f in slowdown.items():
      if not (isinstance(k, numbers.Integral) and 0 <= k < len(w)):
        raise OptionError(f"site_speeds: slowdown site {k!r} is not a site index in"
                          f" [0, {len(w)})")
      factors[k] = float(f)
  elif slowdown is not None:
    factors = np.asarray(slowdown, dtype=np.float64).reshape(-1)
    if factors.shape != w.shape:
      raise OptionError(f"site_speeds: slowdown must have {len(w)} entries, got"
                        f" {factors.shape[0]}")
  for k, f in enumerate(factors):
    if not (np.isfinite(f) and f > 0):
      raise OptionError(f"site_speeds: slowdown[{k}] = {f} must be a finite number > 0")
  spread = check_nonnegative_float("site_speeds", "spread", spread)
  if spread > 0:
    if key is None:
      raise OptionError("site_speeds: spread > 0 needs a key")
    z = np.asarray(jax.random.normal(key, (len(w),)), np.float64)
    speeds = speeds * np.exp(spread * z)
  return (speeds / factors).astype(np.float32)


def synchronous_time(client_steps, speeds, cohort=None) -> np.ndarray:
  """Cumulative simulated time of a synchronous algorithm (FedAvg) on the same clock.

  A synchronous round waits for its slowest participant:
  T_r = max_k client_steps[r, k] / speeds[k] over the participants that took
  a step; returns cumsum_r T_r `[R]` (float64). Host-side NumPy.

  Args:
    client_steps: `[R, C]` local steps per round and participant (FedAvg's
      `client_steps` history).
    speeds: `[K]` speeds.
    cohort: `[R, C]` site positions of the participants (FedAvg's `cohort`
      history); None = participant c is site c.
  """
  # Durations in float32 as FedBuff's clock computes them (speeds are float32).
  steps = np.asarray(client_steps, dtype=np.float32)
  speeds = np.asarray(speeds, dtype=np.float32)
  if steps.ndim != 2:
    raise ValueError(f"synchronous_time: client_steps must be [R, C], got {steps.shape}")
  positions = (np.broadcast_to(np.arange(steps.shape[1]), steps.shape) if cohort is None
               else np.asarray(cohort))
  durations = np.where(steps > 0, steps / speeds[positions], np.float32(0.0))
  return np.cumsum(durations.max(axis=1).astype(np.float64))


class _Carry(NamedTuple):
  params: Any
  opt_state: Any
  cs: FedBuffClientState
  alg: FedBuffServerState
  agg_state: dict
  event: jax.Array
  flushes: jax.Array
  bytes_up: jax.Array
  bytes_down: jax.Array
  arrivals: jax.Array
  last_staleness: jax.Array
  last_sites: jax.Array
  last_loss: jax.Array
  last_norm: jax.Array


def _tree_nbytes(tree: Any) -> int:
  return int(sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize
                 for a in jax.tree_util.tree_leaves(tree)))


def _fedbuff_round(config: kit.KitConfig, state, data, key):
  num_sites = data.mask.shape[0]
  m = config.static.buffer_size
  uplink = config.static.uplink
  check_num_sites("fedbuff", state.client_states, num_sites)
  n = data.num_examples
  active = n > 0
  base_w = agg.client_weights(n, config.cohort.weighting)
  ctx = kit.client_context(config, state)
  exponent = state.hparams["staleness_exponent"]
  jitter = state.hparams["jitter"]
  context = agg.full_context(n)
  model_bytes = _tree_nbytes(state.params)
  restart_base = jax.random.fold_in(key, RESTART_STREAM)

  def event_key(event):
    return jax.lax.cond(event == 0, lambda: key,
                        lambda: jax.random.fold_in(restart_base, event))

  def train_all(w, ekey):
    """Every site's job from w: the kit's client update, vmapped over the K sites."""
    def job(x_k, y_k, mask_k, key_k):
      result = config.client_update(ctx, w, (), kit.ClientData(x_k, y_k, mask_k), key_k)
      z = jax.random.normal(jax.random.fold_in(key_k, DURATION_STREAM))
      return result.update, result.values["num_steps"], result.values["mean_loss"], z

    return jax.vmap(job)(data.x, data.y, data.mask, kit.client_keys(ekey, data.site_ids))

  def flush(c: _Carry, ekey) -> _Carry:
    """Delta_bar = reducer(slots, p_i g(s_i)) * sum_i p_i g(s_i) / sum_i p_i; server step."""
    buf = c.alg
    g = jnp.power(1.0 + buf.slot_staleness.astype(jnp.float32), -exponent)
    weights = buf.slot_weight * g
    red_ctx = agg.AggregationContext(buf.slot_site, num_sites, n[buf.slot_site])
    red_key = jax.random.fold_in(jax.random.fold_in(server_key(ekey), 3), buf.version)
    delta, reducer_state, _ = config.aggregator.aggregate(
        buf.slots, weights, c.agg_state["reducer"], red_key, red_ctx)
    total = jnp.sum(buf.slot_weight)
    factor = jnp.where(total > 0, jnp.sum(weights) / jnp.where(total > 0, total, 1.0), 0.0)
    delta = jax.tree_util.tree_map(lambda d: d * factor.astype(d.dtype), delta)
    # The buffer is the flush's cohort: its weights p_i, the reducer's p_i g(s_i).
    # A flush always steps: its M updates come from sites holding data (p_i > 0).
    # (A traced predicate here would add a select that changes XLA's fusion
    # and the last bit of some results.)
    server_ctx = kit.ServerContext(config, state.hparams, buf.slot_weight, weights,
                                   buf.slot_site, num_sites, n, jnp.asarray(True), red_key)
    result = config.server_update(
        server_ctx, state._replace(params=c.params, server_opt_state=c.opt_state), delta, {})
    return c._replace(
        params=result.params, opt_state=result.server_opt_state,
        alg=buf._replace(version=buf.version + 1, count=jnp.zeros((), jnp.int32)),
        agg_state={**c.agg_state, "reducer": reducer_state}, flushes=c.flushes + 1,
        last_staleness=buf.slot_staleness, last_sites=buf.slot_site,
        last_loss=jnp.sum(agg.normalized(buf.slot_weight) * buf.slot_loss),
        last_norm=tree_l2_norm(delta))

  def body(c: _Carry) -> _Carry:
    ekey = event_key(c.event)

    # A. Idle sites start a job from the current model.
    idle = active & ~c.cs.busy

    def start(c: _Carry) -> _Carry:
      if config.downlink is not None:
        w, down_metrics = config.downlink(c.params, jax.random.fold_in(server_key(ekey), 1))
        down = jnp.asarray(down_metrics.get("bytes_down_per_site", model_bytes), jnp.int32)
      else:
        w, down = c.params, jnp.int32(model_bytes)
      deltas, steps, losses, z = train_all(w, ekey)
      duration = steps.astype(jnp.float32) / c.alg.speeds * jnp.exp(jitter * z)

      def pick(new, old):
        return jnp.where(idle.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)

      cs = c.cs
      cs = FedBuffClientState(
          update=jax.tree_util.tree_map(pick, deltas, cs.update),
          version=jnp.where(idle, c.alg.version, cs.version),
          finish=jnp.where(idle, c.alg.clock + duration, cs.finish),
          busy=cs.busy | idle,
          loss=jnp.where(idle, losses, cs.loss))
      return c._replace(cs=cs, bytes_down=c.bytes_down + jnp.where(idle, down, 0))

    c = jax.lax.cond(jnp.any(idle), start, lambda c: c, c)

    # B. The next event: every site finishing at the earliest time t uploads.
    busy = c.cs.busy
    t = jnp.min(jnp.where(busy, c.cs.finish, jnp.inf))
    arriving = busy & (c.cs.finish == t)
    if uplink is not None:
      decoded, _, up_state, up_metrics = uplink.apply(
          c.cs.update, base_w * arriving.astype(jnp.float32), c.agg_state["uplink"],
          jax.random.fold_in(server_key(ekey), 2), context)
      up = up_metrics["bytes_up"]
      c = c._replace(agg_state={**c.agg_state, "uplink": up_state})
    else:
      decoded = c.cs.update
      up = jnp.where(arriving, jnp.int32(model_bytes), 0)
    c = c._replace(alg=c.alg._replace(clock=jnp.where(jnp.isfinite(t), t, c.alg.clock)),
                   bytes_up=c.bytes_up + up)

    def visit(k, c: _Carry) -> _Carry:
      def insert(c: _Carry) -> _Carry:
        buf = c.alg
        slot = buf.count
        buf = buf._replace(
            slots=jax.tree_util.tree_map(lambda s, u: s.at[slot].set(u[k]), buf.slots,
                                         decoded),
            slot_site=buf.slot_site.at[slot].set(k),
            slot_staleness=buf.slot_staleness.at[slot].set(buf.version - c.cs.version[k]),
            slot_weight=buf.slot_weight.at[slot].set(base_w[k]),
            slot_loss=buf.slot_loss.at[slot].set(c.cs.loss[k]),
            count=slot + 1)
        c = c._replace(alg=buf, arrivals=c.arrivals.at[k].add(1))
        return jax.lax.cond(buf.count == m, lambda c: flush(c, ekey), lambda c: c, c)

      return jax.lax.cond(arriving[k], insert, lambda c: c, c)

    c = jax.lax.fori_loop(0, num_sites, visit, c)
    return c._replace(cs=c.cs._replace(busy=c.cs.busy & ~arriving), event=c.event + 1)

  def cond(c: _Carry):
    # At most M events reach a flush (each has >= 1 arrival); the bound only
    # stops a round whose durations are not finite (e.g. a NaN jitter).
    return (c.flushes == 0) & jnp.any(active) & (c.event <= m)

  zeros_k = jnp.zeros((num_sites,), jnp.int32)
  carry = _Carry(
      params=state.params, opt_state=state.server_opt_state, cs=state.client_states,
      alg=state.algorithm_state, agg_state=state.aggregator_state,
      event=jnp.zeros((), jnp.int32), flushes=jnp.zeros((), jnp.int32),
      bytes_up=zeros_k, bytes_down=zeros_k, arrivals=zeros_k,
      last_staleness=jnp.zeros((m,), jnp.int32), last_sites=jnp.zeros((m,), jnp.int32),
      last_loss=jnp.zeros((), jnp.float32), last_norm=jnp.zeros((), jnp.float32))
  c = jax.lax.while_loop(cond, body, carry)
  staleness = c.last_staleness.astype(jnp.float32)
  metrics = {
      "train_loss": c.last_loss,
      "update_norm": c.last_norm,
      "sim_time": c.alg.clock,
      "version": c.alg.version,
      "flushes": c.flushes,
      "events": c.event,
      "arrivals": c.arrivals,
      "staleness": c.last_staleness,
      "staleness_mean": jnp.mean(staleness),
      "staleness_max": jnp.max(c.last_staleness),
      "cohort": c.last_sites,
      "num_examples": n,
      "bytes_up": c.bytes_up,
      "bytes_up_total": jnp.sum(c.bytes_up, dtype=jnp.int32),
      "bytes_down": c.bytes_down,
      "bytes_down_total": jnp.sum(c.bytes_down, dtype=jnp.int32),
  }
  new_state = state._replace(params=c.params, server_opt_state=c.opt_state,
                             client_states=c.cs, aggregator_state=c.agg_state,
                             algorithm_state=c.alg, round=state.round + 1)
  return new_state, metrics


__all__ = ["fedbuff", "FedBuffConfig", "FedBuffClientState", "FedBuffServerState",
           "site_speeds", "synchronous_time", "check_speeds", "RESTART_STREAM",
           "DURATION_STREAM"]
