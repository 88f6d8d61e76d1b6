"""One client's local training: optax steps as a `lax.scan` over its own batches.

A client with n_k real rows (out of N_max padded ones) and batch size B runs

* `local_epochs=E`: exactly E * ceil(n_k / B) steps. Each epoch visits its
  real rows once, in a fresh random order; the last batch of an epoch may be
  partial and averages only its real rows. The scan has E * ceil(N_max / B)
  steps for every client; a client's extra steps are exact no-ops (the new
  parameters and optimizer state are discarded with `jnp.where`).
* `local_steps=T`: exactly T steps whatever n_k is (FLamby's protocol). The
  client's batch stream restarts with a fresh shuffle whenever it runs out;
  batches at the end of a pass keep their real (partial) size.

Randomness: the client key is `fold_in(round_key, site_id)`; the row order
of pass e is `epoch_permutation(fold_in(client_key, e), mask_k)`. With
`shuffle=False` every pass visits the rows in stored order, which makes a
sequential reference loop trivial to write.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_med.core.options import OptionError, check_positive_int
from fedjax_med.core.tree import tree_select
from fedjax_med.core.streams import STEP_STREAM  # noqa: F401 (re-exported)

# grad_fn(params, x_batch, y_batch, row_mask, step_key) -> (loss, grads)
GradFn = Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]

# Step t's key is fold_in(fold_in(client_key, STEP_STREAM), t): disjoint from
# the pass keys fold_in(client_key, e) used for shuffling.


@dataclasses.dataclass(frozen=True)
class LocalSchedule:
  """How much local work a client does per round (static, hashable).

  Exactly one of `epochs` and `steps` is set.
  """
  batch_size: int
  epochs: int | None = None
  steps: int | None = None
  shuffle: bool = True

  def num_scan_steps(self, n_max: int) -> int:
    """Static length of the scan for sites padded to n_max rows."""
    if self.steps is not None:
      return self.steps
    return self.epochs * (-(-n_max // self.batch_size))


def make_schedule(name: str, batch_size: int, local_epochs: int | None,
                  local_steps: int | None, shuffle: bool = True) -> LocalSchedule:
  """Validates local-work options; `name` is the algorithm, for messages."""
  check_positive_int(name, "batch_size", batch_size)
  if local_epochs is not None and local_steps is not None:
    raise OptionError(
        f"{name}: give local_epochs or local_steps, not both (got"
        f" local_epochs={local_epochs}, local_steps={local_steps})")
  if local_epochs is None and local_steps is None:
    raise OptionError(f"{name}: give local_epochs or local_steps")
  if local_epochs is not None:
    check_positive_int(name, "local_epochs", local_epochs)
  else:
    check_positive_int(name, "local_steps", local_steps)
  if not isinstance(shuffle, bool):
    raise OptionError(f"{name}: shuffle must be True or False, got {shuffle!r}")
  return LocalSchedule(int(batch_size), None if local_epochs is None else int(local_epochs),
                       None if local_steps is None else int(local_steps), shuffle)


def client_keys(round_key: jax.Array, site_ids: jax.Array) -> jax.Array:
  """Per-client keys `fold_in(round_key, site_ids[k])`, `[K]` keys."""
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(round_key, site_ids)


def row_uniforms(key: jax.Array, num_rows: int) -> jax.Array:
  """`[num_rows]` uniforms; entry i depends only on (key, i), not on num_rows.

  So padding a site (a longer N_max) leaves its real rows' draws unchanged.
  """
  return jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i)))(
      jnp.arange(num_rows, dtype=jnp.uint32))


# Up to this many rows per site, permutations are ranks computed by N^2
# comparisons (exact, and ~2.4x faster than XLA:CPU's comparator sort at
# 1000 sites x 64 rows); above it, a stable argsort.
RANK_MAX_ROWS = 256


def sort_permutation(order_key: jax.Array) -> jax.Array:
  """The stable ascending order of a `[N]` key: `jnp.argsort(order_key, stable=True)`.

  For N <= RANK_MAX_ROWS it is computed as ranks, rank_i = #{j : key_j < key_i,
  or key_j = key_i and j < i}, scattered to their positions: the identical
  permutation, without a comparator sort.
  """
  n = order_key.shape[0]
  if n > RANK_MAX_ROWS:
    return jnp.argsort(order_key, stable=True).astype(jnp.int32)
  index = jnp.arange(n, dtype=jnp.int32)
  before = (order_key[None, :] < order_key[:, None]) | (
      (order_key[None, :] == order_key[:, None]) & (index[None, :] < index[:, None]))
  rank = jnp.sum(before, axis=1, dtype=jnp.int32)
  return jnp.zeros((n,), jnp.int32).at[rank].set(index, unique_indices=True)


def epoch_permutation(key: jax.Array, mask: jax.Array, shuffle: bool = True) -> jax.Array:
  """Row order of one pass: the real rows first (random order), padding last.

  Args:
    key: the pass's key, `fold_in(client_key, epoch)`.
    mask: `[N_max]` bool row mask of one client.
    shuffle: False keeps the stored order of the real rows.

  Returns:
    int32 `[N_max]` permutation whose first n_k entries are the real rows,
    sorted by `row_uniforms(key, N_max)` (so the order of the real rows does
    not depend on how much padding follows them); equal to
    `argsort(where(mask, row_uniforms(key, N_max), 2.0), stable=True)`.
  """
  if shuffle:
    order_key = jnp.where(mask, row_uniforms(key, mask.shape[0]), 2.0)
  else:
    order_key = jnp.where(mask, 0.0, 1.0)
  return sort_permutation(order_key)


class LocalResult(NamedTuple):
  """What one client's local training returns (`local_training`)."""
  params: Any          # the client's parameters after local training
  opt_state: Any       # the client optimizer's final state
  num_steps: jax.Array  # int32 (): steps actually taken
  mean_loss: jax.Array  # float32 (): mean of the batch losses before each step


def local_training(grad_fn: GradFn, optimizer: optax.GradientTransformation,
                   schedule: LocalSchedule, params: Any, opt_state: Any,
                   x: jax.Array, y: jax.Array, mask: jax.Array,
                   key: jax.Array) -> LocalResult:
  """Runs one client's local optimisation as one `lax.scan`.

  Args:
    grad_fn: `(params, x_b [B, ...], y_b [B, ...], row_mask [B], step_key)
      -> (loss, grads)`, the client's local objective (mean over real rows)
      and its gradient (or an estimate of it, e.g. DP-SGD's).
    optimizer: the client's optax transformation.
    schedule: batch size and local epochs or steps.
    params, opt_state: starting point.
    x: `[N_max, ...]`; y: `[N_max, ...]`; mask: `[N_max]` bool, one client.
    key: the client key.

  Returns:
    LocalResult. A client with n_k = 0 returns its inputs unchanged.
  """
  n_max = mask.shape[0]
  b = schedule.batch_size
  n_k = jnp.sum(mask, dtype=jnp.int32)
  offsets = jnp.arange(b, dtype=jnp.int32)

  step_keys = jax.random.fold_in(key, STEP_STREAM)
  if schedule.epochs is not None:
    # Every step's rows and row mask are known before training: compute them
    # all at once and feed them to the scan (fewer ops inside the loop).
    steps_per_epoch_max = -(-n_max // b)
    perms = jax.vmap(
        lambda e: epoch_permutation(jax.random.fold_in(key, e), mask, schedule.shuffle))(
            jnp.arange(schedule.epochs))
    positions = jnp.arange(steps_per_epoch_max * b, dtype=jnp.int32)
    rows = jnp.take(perms, positions, axis=1, mode="clip")          # [E, S*B]
    row_masks = jnp.broadcast_to(positions < n_k, rows.shape)
    schedule_xs = (rows.reshape(-1, b), row_masks.reshape(-1, b))  # [E*S, B] each

    def batch_at(t, xs):
      del t
      return xs
  else:
    steps_per_epoch = jnp.maximum((n_k + b - 1) // b, 1)
    schedule_xs = None

    def batch_at(t, xs):
      del xs
      epoch, j = t // steps_per_epoch, t % steps_per_epoch
      perm = epoch_permutation(jax.random.fold_in(key, epoch), mask, schedule.shuffle)
      positions = j * b + offsets
      return jnp.take(perm, positions, mode="clip"), positions < n_k

  def step(carry, inputs):
    t, xs = inputs
    params, opt_state, loss_sum, taken = carry
    idx, row_mask = batch_at(t, xs)
    active = jnp.any(row_mask)
    loss, grads = grad_fn(params, x[idx], y[idx], row_mask,
                          jax.random.fold_in(step_keys, t))
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    params = tree_select(active, new_params, params)
    opt_state = tree_select(active, new_opt_state, opt_state)
    loss_sum = loss_sum + jnp.where(active, loss, 0.0)
    return (params, opt_state, loss_sum, taken + active.astype(jnp.int32)), None

  num_steps = schedule.num_scan_steps(n_max)
  init = (params, opt_state, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
  (params, opt_state, loss_sum, taken), _ = jax.lax.scan(
      step, init, (jnp.arange(num_steps, dtype=jnp.int32), schedule_xs))
  mean_loss = loss_sum / jnp.maximum(taken, 1).astype(jnp.float32)
  return LocalResult(params, opt_state, taken, mean_loss)


__all__ = ["STEP_STREAM", "RANK_MAX_ROWS", "LocalSchedule", "make_schedule", "client_keys",
           "row_uniforms", "sort_permutation", "epoch_permutation",
           "LocalResult", "local_training"]
