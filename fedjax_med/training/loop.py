"""The run loop: rounds of any FederatedAlgorithm, with a progress bar,
checkpoints and an audit log (`run_rounds`), and seeds in one compile (`run_seeds`).

Randomness: one key per run, `jax.random.PRNGKey(seed)`; round r uses
`fold_in(run_key, r)` and site k within it `fold_in(round_key, k)`, so the
same seed gives bit-identical results and rounds never share randomness.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from fedjax_med.core.algorithm import FederatedAlgorithm, arrays_only, check_round_inputs
from fedjax_med.core.federated_data import FederatedData
from fedjax_med.core.options import OptionError, check_positive_int
from fedjax_med.core.state import ServerState, set_hyperparams


def round_key(run_key: jax.Array, round_index: int) -> jax.Array:
  """The key of round `round_index` (0-based): fold_in(run_key, round_index)."""
  return jax.random.fold_in(run_key, round_index)


def run_rounds(algo: FederatedAlgorithm, state: ServerState, data: FederatedData,
               num_rounds: int, run_key: jax.Array, *, first_round: int = 0,
               progress: bool = True, desc: str | None = None,
               callback: Callable[[int, ServerState, dict], None] | None = None,
               checkpoint_dir=None, checkpoint_every: int = 1,
               max_to_keep: int | None = 3, audit=None, audit_run: str | None = None,
               log_every: int | None = None, donate_state: bool | None = None,
               ) -> tuple[ServerState, dict[str, np.ndarray]]:
  """Runs rounds of `algo` from `state`: the one run loop of fedjax_med.

  Args:
    algo: a FederatedAlgorithm.
    state: its state (from `algo.init`).
    data: training data.
    num_rounds: rounds to run (with `checkpoint_dir`: rounds of the whole run).
    run_key: the run's key; round r uses `fold_in(run_key, first_round + r)`.
    first_round: index of the first round (to resume a run exactly by hand).
    progress: show a tqdm progress bar over rounds.
    desc: progress bar label.
    callback: called as `callback(round_index, state, metrics)` after each round.
    checkpoint_dir: checkpoint the run there (orbax, `fedjax_med.training.checkpoint`)
      after every `checkpoint_every` rounds and after the last, keeping the
      newest `max_to_keep`; if the folder already holds a checkpoint of this
      run (same run key and state structure) the run continues after it, and
      the returned history covers all `num_rounds` rounds. Needs first_round=0.
    audit: an `fedjax_med.training.audit.AuditLog` that logs every round (hash chain of
      the model, the aggregate and each site's update), as `audit_run` (default
      the algorithm's name), with the state's traced hyperparameters.
    log_every: every `log_every` rounds (and after the last) fetch the metrics of
      the rounds since the last fetch to the host in one transfer and show the
      latest round's scalar metrics on the progress bar. None (default): no
      transfer at all until the run ends. Nothing else in the loop waits for
      the device, so rounds are queued back to back on an accelerator (unless
      `callback`, `audit` or checkpoints read the state).
    donate_state: run each round with the state's buffers donated to the new
      state (`jax.jit(..., donate_argnums=...)`), so an accelerator holds one
      copy of the model, optimizer and per-client states rather than two. The
      `state` you pass is copied once first and stays valid. None (default):
      donate unless a `callback` is given (a callback may keep the states it
      receives); True: donate anyway (the state a `callback` receives is then
      deleted by the next round: copy what you keep, e.g.
      `jax.device_get(state)`); False: never. Never with `checkpoint_dir` (orbax
      writes the state in the background) nor for an algorithm whose round has
      no donating variant (a hand-written round).
      Results are bit-identical either way.

  Returns:
    (final state, history) where history maps each metric name to an array
    with a leading axis of length num_rounds.
  """
  check_positive_int("run_rounds", "num_rounds", num_rounds)
  check_positive_int("run_rounds", "checkpoint_every", checkpoint_every)
  if log_every is not None:
    check_positive_int("run_rounds", "log_every", log_every)
  if donate_state not in (None, True, False):
    raise OptionError("run_rounds: donate_state must be None, True or False, got"
                      f" {donate_state!r}")
  if donate_state is None:
    donate_state = callback is None
  history, start, end, manager = [], first_round, first_round + num_rounds, None
  if checkpoint_dir is not None:
    if first_round != 0:
      raise OptionError("run_rounds: with checkpoint_dir the run resumes from its latest"
                        f" checkpoint by itself; first_round must be 0, got {first_round}")
    from fedjax_med.training import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel
    manager, start, state, history = checkpoint_lib.resume_run(
        checkpoint_dir, state, run_key, num_rounds, max_to_keep)
    end = num_rounds
  hooks = [callback] if callback is not None else []
  if audit is not None:
    hooks.insert(0, audit.run_callback(
        run=audit_run or algo.name, algorithm=algo.name,
        hyperparameters=_hyperparameters(state), initial_state=state,
        site_names=getattr(data, "names", None)))
  round_fn = algo.round
  if donate_state and manager is None and getattr(algo.round, "donating", None) is not None:
    round_fn = algo.round.donating
    state = jax.tree_util.tree_map(_copy_array, state)  # the caller's state stays valid
  fetched = 0                     # history[:fetched] is on the host
  try:
    bar = tqdm(range(start, end), desc=desc or algo.name, disable=not progress, leave=False,
               dynamic_ncols=True)
    for r in bar:
      state, metrics = round_fn(state, data, round_key(run_key, r))
      history.append(metrics)     # stays on device: rounds are dispatched without a sync
      if log_every is not None and ((r + 1 - start) % log_every == 0 or r + 1 == end):
        history[fetched:] = jax.device_get(history[fetched:])
        fetched = len(history)
        bar.set_postfix(_scalars(history[-1]), refresh=False)
      if manager is not None and ((r + 1) % checkpoint_every == 0 or r + 1 == end):
        checkpoint_lib.save_run(manager, r + 1, state, run_key, stack_history(history))
      for hook in hooks:
        hook(r, state, metrics)
  finally:
    if manager is not None:
      manager.wait_until_finished()
      manager.close()
  return state, stack_history(history)


def _copy_array(leaf):
  return jnp.array(leaf, copy=True) if isinstance(leaf, jax.Array) else leaf


def _scalars(metrics: dict) -> dict[str, str]:
  """The scalar metrics of one round, formatted for the progress bar."""
  return {name: f"{float(value):.4g}" for name, value in metrics.items()
          if np.ndim(value) == 0 and np.issubdtype(np.asarray(value).dtype, np.number)}


def stack_history(history: Sequence[dict]) -> dict[str, np.ndarray]:
  """Per-round metric dicts -> {metric: array with a leading round axis}."""
  if not history:
    return {}
  history = jax.device_get(list(history))
  return {name: np.stack([np.asarray(h[name]) for h in history]) for name in history[0]}


def _hyperparameters(state: ServerState) -> dict:
  """The state's traced numbers as plain floats (for the audit log)."""
  values = {**{f"client_{k}": v for k, v in state.client_hparams.items()}, **state.hparams}
  return {k: float(np.asarray(v)) for k, v in values.items() if np.size(v) == 1}


def stack_states(states: Sequence[ServerState]) -> ServerState:
  """S states (e.g. one per seed) stacked on a new leading axis."""
  return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *states)


def run_seeds(algo: FederatedAlgorithm, states: ServerState, data: FederatedData,
              num_rounds: int, run_keys: jax.Array) -> tuple[ServerState, dict[str, np.ndarray]]:
  """Runs S independent runs (seeds, or hyperparameter values) as one compiled call.

  `jax.vmap` over the S runs of a `lax.scan` over rounds of `algo.pure_round`;
  run s uses round keys `fold_in(run_keys[s], r)` exactly as `run_rounds`
  does, so each run equals its sequential counterpart (to float rounding).

  Args:
    algo: a FederatedAlgorithm.
    states: S states stacked on a leading axis (`stack_states`). Put
      different hyperparameters in them (`set_hyperparams`) to sweep those.
    data: training data, shared by the S runs.
    num_rounds: rounds per run.
    run_keys: `[S]` run keys.

  Returns:
    (final states [S, ...], history with leaves [S, num_rounds, ...]).
  """
  check_positive_int("run_seeds", "num_rounds", num_rounds)
  if algo.pure_round is None:
    raise ValueError(f"run_seeds: {algo.name} has no pure_round")
  check_round_inputs(algo.name, None, jax.tree_util.tree_map(lambda a: a[0], states), data)
  return _run_seeds_jit(algo.pure_round, num_rounds, states, arrays_only(data), run_keys)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _run_seeds_jit(pure_round, num_rounds, states, data, run_keys):

  def one_run(state, run_key):
    def body(state, r):
      return pure_round(state, data, jax.random.fold_in(run_key, r))
    return jax.lax.scan(body, state, jnp.arange(num_rounds))

  states, history = jax.vmap(one_run)(states, run_keys)
  return states, history



# -- step decay of a traced learning rate ----------------------------------------

def step_decay_segments(num_rounds: int, decay_at: Sequence[float] = (),
                        decay: float = 0.3) -> list[tuple[int, int, float]]:
  """[(first round, end round, lr factor)]: a step decay over `num_rounds` rounds.

  Boundary b_i = round(decay_at[i] * num_rounds), kept when 0 < b_i < num_rounds
  (duplicates merged); rounds [b_i, b_{i+1}) train at lr x decay^(i+1). No
  boundary: one segment [0, num_rounds) at factor 1. E.g. (30, (2/3, 5/6), 0.3)
  -> [(0, 20, 1.0), (20, 25, 0.3), (25, 30, 0.09)].
  """
  bounds = sorted({round(f * num_rounds) for f in decay_at} & set(range(1, num_rounds)))
  starts, ends = [0] + bounds, bounds + [num_rounds]
  return [(a, b, decay ** i) for i, (a, b) in enumerate(zip(starts, ends))]


def run_rounds_step_decay(algo: FederatedAlgorithm, state: ServerState, data: FederatedData,
                          num_rounds: int, run_key: jax.Array, *, learning_rate: float,
                          decay_at: Sequence[float] = (), decay: float = 0.3,
                          decay_also: Sequence[str] = (),
                          **kwargs: Any) -> tuple[ServerState, dict[str, np.ndarray]]:
  """`run_rounds` with the client optimizer's learning rate stepped down between rounds.

  Segment by segment of `step_decay_segments(num_rounds, decay_at, decay)`, the
  client optimizer's traced `learning_rate` is set to `learning_rate x factor`
  (`fm.set_hyperparams`, no recompilation) and `run_rounds` continues with
  `first_round` = the segment's first round, so round r still uses
  `fold_in(run_key, r)`: with one segment this IS `run_rounds`. The client
  optimizer must be built with `optax.inject_hyperparams` when there is more
  than one segment (`set_hyperparams` names the problem otherwise). The
  histories of the segments are concatenated along rounds.

  `decay_also` names traced algorithm hyperparameters (`state.hparams` keys) that
  follow the same step decay from their values in `state` at the call: e.g. Ditto's
  personal learning rate, `decay_also=("personal_learning_rate",)`, so that
  segment s sets it to (its value at the call) x factor_s. Like the client rate,
  they are read and set only when there is more than one segment.
  """
  if "first_round" in kwargs or "checkpoint_dir" in kwargs:
    raise OptionError("run_rounds_step_decay: first_round and checkpoint_dir are not"
                      " supported (the segments set first_round themselves)")
  segments = step_decay_segments(num_rounds, decay_at, decay)
  also_base = {}
  if len(segments) > 1:
    unknown = sorted(set(decay_also) - set(state.hparams))
    if unknown:
      raise OptionError(f"run_rounds_step_decay: decay_also names {unknown}, which are not"
                        f" traced algorithm hyperparameters; traced: {sorted(state.hparams)}")
    also_base = {name: float(state.hparams[name]) for name in decay_also}
  histories = []
  for first, end, factor in segments:
    if len(segments) > 1:
      state = set_hyperparams(state, client={"learning_rate": learning_rate * factor},
                              **{name: base * factor for name, base in also_base.items()})
    state, hist = run_rounds(algo, state, data, end - first, run_key, first_round=first,
                             **kwargs)
    histories.append(hist)
  history = {k: np.concatenate([np.asarray(h[k]) for h in histories]) for k in histories[0]}
  return state, history



# -- experiment scripts: command-line overrides and the table they write --------

def parse_seeds(text: str) -> tuple[int, ...]:
  """"0,1,2" -> (0, 1, 2), as the experiment scripts' `--seeds` flag gives it."""
  try:
    seeds = tuple(int(s) for s in str(text).split(",") if s.strip())
  except ValueError:
    raise OptionError(f"seeds must be comma-separated integers, got {text!r}") from None
  if not seeds:
    raise OptionError(f"seeds must name at least one seed, got {text!r}")
  return seeds


def with_overrides(config: Any, **values: Any) -> Any:
  """`dataclasses.replace(config, **values)` for the values given (not None or "").

  A `seeds` value may be the comma-separated string of a `--seeds` flag.
  """
  values = {k: v for k, v in values.items() if v is not None and v != ""}
  if isinstance(values.get("seeds"), str):
    values["seeds"] = parse_seeds(values["seeds"])
  return dataclasses.replace(config, **values)


def write_table(out_dir: str, text: str) -> str:
  """Writes `text` as `out_dir/table.md` (creating the folder); returns the path."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "table.md")
  with open(path, "w") as f:
    f.write(text)
  return path

__all__ = ["run_rounds", "round_key", "run_seeds", "stack_states", "parse_seeds", "with_overrides",
           "write_table", "step_decay_segments", "run_rounds_step_decay"]
