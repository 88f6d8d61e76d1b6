"""The run loop: rounds of any FederatedAlgorithm, with a progress bar.

Randomness: one key per run, `jax.random.PRNGKey(seed)`; round r uses
`fold_in(run_key, r)` and site k within it `fold_in(round_key, k)`, so the
same seed gives bit-identical results and rounds never share randomness.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from fedjax_med.core.algorithm import FederatedAlgorithm
from fedjax_med.core.federated_data import FederatedData
from fedjax_med.core.options import check_positive_int
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


__all__ = ["run_rounds", "round_key"]
