"""The run loop: rounds of any FederatedAlgorithm, with a progress bar.

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
from fedjax_med.core.state import ServerState


def round_key(run_key: jax.Array, round_index: int) -> jax.Array:
  return jax.random.fold_in(run_key, round_index)


def run_rounds(algo: FederatedAlgorithm, state: ServerState, data: FederatedData,
               num_rounds: int, run_key: jax.Array, *, first_round: int = 0,
               progress: bool = True, desc: str | None = None,
               callback: Callable[[int, ServerState, dict], None] | None = None,
               ) -> tuple[ServerState, dict[str, np.ndarray]]:
  """Runs `num_rounds` rounds of `algo` from `state`.

  Args:
    algo: a FederatedAlgorithm.
    state: its state (from `algo.init`).
    data: training data.
    num_rounds: rounds to run.
    run_key: the run's key; round r uses `fold_in(run_key, first_round + r)`.
    first_round: index of the first round (to resume a run exactly).
    progress: show a tqdm progress bar over rounds.
    desc: progress bar label.
    callback: called as `callback(round_index, state, metrics)` after each round.

  Returns:
    (final state, history) where history maps each metric name to an array
    with a leading axis of length num_rounds.
  """
  check_positive_int("run_rounds", "num_rounds", num_rounds)
  history = []
  rounds = range(first_round, first_round + num_rounds)
  bar = tqdm(rounds, desc=desc or algo.name, disable=not progress, leave=False,
             dynamic_ncols=True)
  for r in bar:
    state, metrics = algo.round(state, data, round_key(run_key, r))
    history.append(metrics)
    if callback is not None:
      callback(r, state, metrics)
  history = jax.device_get(history)
  stacked = {name: np.stack([h[name] for h in history]) for name in history[0]}
  return state, stacked


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
           "write_table"]
