"""Checkpoints and exact resume of a federated run, with orbax-checkpoint.

A run of `num_rounds` rounds is a pure function of (initial state, data,
run key): round r uses `fold_in(run_key, r)` (`fedjax_med.training.loop`), and
everything a round carries to the next is in the `ServerState` (global
model, server optimizer state, client states such as SCAFFOLD's control
variates, aggregator state, traced hyperparameters, round counter). So a
checkpoint after round r holds

    state    every leaf of the ServerState (client states included)
    meta     r, the run key (raw key data and its PRNG impl), the state's
             tree structure, and the library version
    history  the metrics of rounds 0..r-1 (numpy, leading axis r)

and resuming from it replays rounds r..R-1 with the same keys on the same
state: the final parameters are bit-identical to an uninterrupted run.

    state, history = fm.checkpoint.run_with_checkpoints(
        algo, algo.init(params), train, num_rounds=200, run_key=jax.random.PRNGKey(0),
        directory="runs/fedavg/ckpt", every=10)
    # killed at round 137? the same call resumes from round 130.

orbax-checkpoint is imported only when a checkpoint is written or read.
Checkpoints are written asynchronously (orbax's default) and each is
atomic: a run killed while writing leaves the previous checkpoint as the
latest one. Sharded states (`fedjax_med.training.sharding`) are saved and restored
with their shardings; orbax handles multi-host writes.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_med.core.algorithm import FederatedAlgorithm
from fedjax_med.core.federated_data import FederatedData
from fedjax_med.core.options import check_positive_int
from fedjax_med.core.state import ServerState

_ITEMS = ("state", "meta", "history")
FORMAT_VERSION = 1


def _ocp():
  try:
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  except ImportError as err:  # pragma: no cover - orbax comes with flax
    raise ImportError(
        "fedjax_med.training.checkpoint needs orbax-checkpoint: pip install"
        " 'orbax-checkpoint>=0.11,<0.13'") from err
  return ocp


class Checkpoint(NamedTuple):
  """What `restore` returns.

  state: the ServerState after `round` rounds.
  run_key: the run's PRNG key (same kind as saved: raw uint32 or typed).
  round: rounds completed in this run (the next round index).
  history: {metric: array with leading axis `round`} of the rounds run so
    far, or {} when none was saved.
  """
  state: ServerState
  run_key: jax.Array
  round: int
  history: dict


def _key_meta(run_key) -> dict:
  key = jnp.asarray(run_key) if not isinstance(run_key, jax.Array) else run_key
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return {"typed": True, "impl": str(jax.random.key_impl(key)),
            "data": np.asarray(jax.random.key_data(key)).tolist()}
  return {"typed": False, "dtype": str(key.dtype), "data": np.asarray(key).tolist()}


def _key_from_meta(meta: dict) -> jax.Array:
  if meta["typed"]:
    return jax.random.wrap_key_data(jnp.asarray(meta["data"], jnp.uint32),
                                    impl=meta["impl"])
  return jnp.asarray(meta["data"], meta["dtype"])


def _leaves_dict(state: ServerState) -> tuple[dict, Any]:
  leaves, treedef = jax.tree_util.tree_flatten(state)
  return {f"{i:05d}": leaf for i, leaf in enumerate(leaves)}, treedef


def _manager(directory, max_to_keep: int | None = None, create: bool = True):
  ocp = _ocp()
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
  return ocp.CheckpointManager(os.path.abspath(os.fspath(directory)), options=options,
                               item_names=_ITEMS)


def _check_state(state, where: str) -> None:
  if not isinstance(state, ServerState):
    raise TypeError(f"{where}: state must be a ServerState, got {type(state).__name__}")


def _save_with(manager, round_index: int, state: ServerState, run_key,
               history: dict | None) -> None:
  ocp = _ocp()
  leaves, treedef = _leaves_dict(state)
  history = {k: np.asarray(v) for k, v in (history or {}).items()}
  meta = {"format": FORMAT_VERSION, "round": int(round_index), "run_key": _key_meta(run_key),
          "treedef": str(treedef), "num_leaves": len(leaves),
          "leaves": {k: [str(jnp.dtype(v.dtype)), list(np.shape(v))] for k, v in leaves.items()},
          "history_keys": sorted(history), "jax": jax.__version__}
  args = {"state": ocp.args.StandardSave(leaves), "meta": ocp.args.JsonSave(meta)}
  # orbax cannot save an empty tree; an empty history is recorded in meta.
  args["history"] = ocp.args.StandardSave(history or {"_empty": np.zeros(())})
  manager.save(int(round_index), args=ocp.args.Composite(**args), force=True)


def save(directory, round_index: int, state: ServerState, run_key,
         history: dict | None = None, *, max_to_keep: int | None = None) -> None:
  """Writes the checkpoint of round `round_index` to `directory/<round_index>/`.

  Args:
    directory: the run's checkpoint folder (created if needed).
    round_index: rounds completed so far in this run, r >= 0.
    state: the ServerState after those r rounds.
    run_key: the run's key (round r uses `fold_in(run_key, r)`).
    history: optional {metric: [r, ...]} of the rounds so far.
    max_to_keep: keep only the newest checkpoints (None: all).
  """
  _check_state(state, "checkpoint.save")
  if int(round_index) < 0:
    raise ValueError(f"checkpoint.save: round_index must be >= 0, got {round_index}")
  manager = _manager(directory, max_to_keep)
  try:
    _save_with(manager, round_index, state, run_key, history)
  finally:
    manager.wait_until_finished()
    manager.close()


def latest_round(directory) -> int | None:
  """The newest complete checkpoint's round in `directory`, or None."""
  if not os.path.isdir(os.fspath(directory)):
    return None
  manager = _manager(directory, create=False)
  try:
    return manager.latest_step()
  finally:
    manager.close()


def _restore_with(manager, directory, template: ServerState,
                  round_index: int | None) -> Checkpoint:
  ocp = _ocp()
  if round_index is None:
    round_index = manager.latest_step()
    if round_index is None:
      raise FileNotFoundError(f"checkpoint.restore: no checkpoint in {directory}")
  elif round_index not in manager.all_steps():
    raise FileNotFoundError(
        f"checkpoint.restore: no checkpoint of round {round_index} in {directory};"
        f" found rounds {list(manager.all_steps())}")
  meta = manager.restore(round_index, args=ocp.args.Composite(
      meta=ocp.args.JsonRestore()))["meta"]
  leaves, treedef = _leaves_dict(template)
  if meta.get("format") != FORMAT_VERSION or meta["num_leaves"] != len(leaves) or (
      meta["treedef"] != str(treedef)):
    raise ValueError(
        f"checkpoint.restore: the checkpoint of round {round_index} in {directory} holds"
        f" a state of another structure ({meta['num_leaves']} leaves,"
        f" {meta['treedef'][:200]}...) than the template ({len(leaves)} leaves,"
        f" {str(treedef)[:200]}...); restore it with the same algorithm and init")
  for name, leaf in leaves.items():
    want = [str(jnp.dtype(leaf.dtype)), list(np.shape(leaf))]
    if meta["leaves"][name] != want:
      saved_dtype, saved_shape = meta["leaves"][name]
      raise ValueError(
          f"checkpoint.restore: state leaf {int(name)} (of {len(leaves)}) is"
          f" {saved_dtype}{saved_shape} in the checkpoint of round {round_index} but"
          f" {want[0]}{want[1]} in the template; restore it with the same model and init")
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, leaves)
  restored = manager.restore(round_index, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract),
      history=ocp.args.StandardRestore()))
  state = jax.tree_util.tree_unflatten(treedef, [restored["state"][k] for k in sorted(leaves)])
  history = {k: np.asarray(restored["history"][k]) for k in meta["history_keys"]}
  return Checkpoint(state, _key_from_meta(meta["run_key"]), int(meta["round"]), history)


def restore(directory, template: ServerState, round_index: int | None = None) -> Checkpoint:
  """Reads a checkpoint back.

  Args:
    directory: the run's checkpoint folder.
    template: a ServerState of the same structure (e.g. `algo.init(params)`);
      gives the tree structure, shapes, dtypes and shardings to restore into.
    round_index: which checkpoint (default: the newest).

  Returns:
    Checkpoint(state, run_key, round, history).

  Raises:
    FileNotFoundError when there is no such checkpoint; ValueError when the
    saved state's structure, shapes or dtypes differ from the template's.
  """
  _check_state(template, "checkpoint.restore")
  manager = _manager(directory, create=False)
  try:
    return _restore_with(manager, directory, template, round_index)
  finally:
    manager.close()


def save_state_file(state: Any, path: str) -> str:
  """Every leaf of `state` as `leaf_i` in one .npz file; returns the file's sha256.

  The single-file snapshot the audit log hashes (`fedjax_med.training.audit`);
  `save` / `restore` (orbax directories) are for resuming runs.
  """
  leaves = jax.tree_util.tree_leaves(jax.device_get(state))
  with open(path, "wb") as f:
    np.savez(f, **{f"leaf_{i}": np.asarray(a) for i, a in enumerate(leaves)})
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def load_state_file(path: str, like: Any) -> Any:
  """The state written by `save_state_file`, with the tree structure of `like`.

  Raises:
    ValueError when the file has another number of leaves or a leaf another shape.
  """
  leaves, treedef = jax.tree_util.tree_flatten(like)
  with np.load(path) as f:
    if len(f.files) != len(leaves):
      raise ValueError(f"load_state_file: {path} has {len(f.files)} leaves, the template"
                       f" {len(leaves)}")
    loaded = [f[f"leaf_{i}"] for i in range(len(leaves))]
  for i, (a, b) in enumerate(zip(leaves, loaded)):
    if np.shape(a) != b.shape:
      raise ValueError(f"load_state_file: leaf {i} has shape {b.shape}, expected"
                       f" {np.shape(a)}")
  return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(b) for b in loaded])


def _same_key(a, b) -> bool:
  return _key_meta(a) == _key_meta(b)


def resume_run(directory, state: ServerState, run_key, num_rounds: int,
               max_to_keep: int | None = 3):
  """Opens a run's checkpoint folder for `fm.run_rounds(checkpoint_dir=...)`.

  Returns (manager, first round to run, state to run from, past history as a
  list of per-round metric dicts). Raises ValueError when the latest
  checkpoint was written with another run key, lies beyond num_rounds, or
  holds a state of another structure.
  """
  if max_to_keep is not None:
    check_positive_int("run_rounds", "max_to_keep", max_to_keep)
  _check_state(state, "run_rounds")
  manager = _manager(directory, max_to_keep)
  if manager.latest_step() is None:
    return manager, 0, state, []
  try:
    ckpt = _restore_with(manager, directory, state, None)
    if not _same_key(ckpt.run_key, run_key):
      raise ValueError(
          f"run_rounds: the checkpoint of round {ckpt.round} in {directory} was written by"
          " a run with another run_key; use a new directory for a new run")
    if ckpt.round > num_rounds:
      raise ValueError(f"run_rounds: {directory} holds a checkpoint of round {ckpt.round},"
                       f" beyond num_rounds={num_rounds}")
  except Exception:
    manager.close()
    raise
  past = [{k: v[i] for k, v in ckpt.history.items()} for i in range(ckpt.round)]
  return manager, ckpt.round, ckpt.state, past


def save_run(manager, round_index: int, state: ServerState, run_key, history: dict) -> None:
  """Writes the checkpoint of `round_index` rounds done (used by `fm.run_rounds`)."""
  _save_with(manager, round_index, state, run_key, history)


def run_with_checkpoints(algo: FederatedAlgorithm, state: ServerState, data: FederatedData,
                         num_rounds: int, run_key: jax.Array, directory, *, every: int = 1,
                         max_to_keep: int | None = 3, progress: bool = False,
                         desc: str | None = None,
                         callback: Callable[[int, ServerState, dict], None] | None = None,
                         ) -> tuple[ServerState, dict[str, np.ndarray]]:
  """Deprecated alias, kept for one version: `fm.run_rounds(algo, state, data,
  num_rounds, run_key, checkpoint_dir=directory, checkpoint_every=every, ...)`,
  the one run loop (checkpoints every `every` rounds, resumes from the latest)."""
  from fedjax_med.training.loop import run_rounds  # pylint: disable=import-outside-toplevel
  check_positive_int("run_with_checkpoints", "num_rounds", num_rounds)
  check_positive_int("run_with_checkpoints", "every", every)
  return run_rounds(algo, state, data, num_rounds, run_key, progress=progress, desc=desc,
                    callback=callback, checkpoint_dir=directory, checkpoint_every=every,
                    max_to_keep=max_to_keep)


__all__ = ["Checkpoint", "FORMAT_VERSION", "save", "restore", "latest_round",
           "resume_run", "save_run", "run_with_checkpoints", "save_state_file",
           "load_state_file"]
