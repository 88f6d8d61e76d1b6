"""Checkpoint and exact resume: a run stopped after round r and resumed from its
latest checkpoint ends bit-identical to the uninterrupted `fm.run_rounds` run.

The stop is a callback that raises after round r (as a killed job would stop),
with the last checkpoint before it, or exactly at it; the resumed call then
replays the rounds since that checkpoint.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_med as fm
from conftest import bce_loss, init_params, make_sites
from fedjax_med import checkpoint as ckpt


class Stop(Exception):
  pass


def stop_after(round_index):
  def callback(r, state, metrics):
    del state, metrics
    if r == round_index:
      raise Stop(f"stopped after round {r}")
  return callback


def assert_trees_identical(a, b):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def data():
  return fm.FederatedData.from_sites(make_sites([9, 4, 6, 0, 5], seed=2), label_type="binary")


@functools.cache
def fedavg_adam():
  """One algorithm object for the whole file, so its round compiles once.

  Adam on the server: its moment estimates and step count must resume too.
  """
  return fm.algorithms.fedavg(bce_loss, client_optimizer=optax.sgd(0.2), local_epochs=2,
                              batch_size=2, server_optimizer=optax.adam(0.05))


@pytest.mark.parametrize("stop,every", [(4, 3), (5, 3), (2, 1)])
def test_fedavg_resume_is_bit_identical(tmp_path, data, stop, every):
  algo = fedavg_adam()
  key = jax.random.PRNGKey(11)
  num_rounds = 7
  ref_state, ref_history = fm.run_rounds(algo, algo.init(init_params()), data, num_rounds,
                                         key, progress=False)
  with pytest.raises(Stop):
    ckpt.run_with_checkpoints(algo, algo.init(init_params()), data, num_rounds, key,
                              tmp_path, every=every, callback=stop_after(stop))
  done = stop + 1
  assert ckpt.latest_round(tmp_path) == done - done % every
  ran = []
  state, history = ckpt.run_with_checkpoints(
      algo, algo.init(init_params()), data, num_rounds, key, tmp_path, every=every,
      callback=lambda r, s, m: ran.append(r))
  assert ran == list(range(done - done % every, num_rounds))   # resumed, not restarted
  assert_trees_identical(state, ref_state)
  assert set(history) == set(ref_history)
  for name in ref_history:
    np.testing.assert_array_equal(history[name], ref_history[name], err_msg=name)
  assert ckpt.latest_round(tmp_path) == num_rounds
  # A finished run resumes to its end without running a round.
  again, _ = ckpt.run_with_checkpoints(algo, algo.init(init_params()), data, num_rounds, key,
                                       tmp_path, every=every, callback=stop_after(-1))
  assert_trees_identical(again, ref_state)


def test_scaffold_with_cohorts_and_typed_key_resumes_exactly(tmp_path, data):
  """Client states (control variates), cohort sampling and a typed PRNG key."""
  algo = fm.algorithms.scaffold(bce_loss, client_learning_rate=0.1, local_epochs=1,
                                batch_size=3, cohort_size=3)
  key = jax.random.key(5)
  init = lambda: algo.init(init_params(), data.num_sites)  # noqa: E731
  ref_state, _ = fm.run_rounds(algo, init(), data, 6, key, progress=False)
  with pytest.raises(Stop):
    ckpt.run_with_checkpoints(algo, init(), data, 6, key, tmp_path, every=2,
                              callback=stop_after(2))
  restored = ckpt.restore(tmp_path, init())
  assert restored.round == 2
  assert jnp.issubdtype(restored.run_key.dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(restored.run_key),
                                jax.random.key_data(key))
  assert int(restored.state.round) == 2
  assert restored.history["client_steps"].shape == (2, 3)
  state, _ = ckpt.run_with_checkpoints(algo, init(), data, 6, key, tmp_path, every=2)
  assert_trees_identical(state, ref_state)
  assert np.abs(np.asarray(state.client_states["control"]["w"])).sum() > 0


def test_save_restore_round_trip(tmp_path, data):
  algo = fedavg_adam()
  key = jax.random.PRNGKey(3)
  state, history = fm.run_rounds(algo, algo.init(init_params()), data, 2, key,
                                 progress=False)
  assert ckpt.latest_round(tmp_path / "none") is None
  ckpt.save(tmp_path, 2, state, key, history)
  ckpt.save(tmp_path, 1, state, key)
  assert ckpt.latest_round(tmp_path) == 2
  back = ckpt.restore(tmp_path, algo.init(init_params()))
  assert back.round == 2
  assert_trees_identical(back.state, state)
  np.testing.assert_array_equal(back.run_key, key)
  for name in history:
    np.testing.assert_array_equal(back.history[name], history[name])
  assert ckpt.restore(tmp_path, algo.init(init_params()), round_index=1).history == {}


def test_mismatches_raise(tmp_path, data):
  algo = fedavg_adam()
  key = jax.random.PRNGKey(0)
  ckpt.run_with_checkpoints(algo, algo.init(init_params()), data, 2, key, tmp_path)
  with pytest.raises(ValueError, match="another run_key"):
    ckpt.run_with_checkpoints(algo, algo.init(init_params()), data, 3,
                              jax.random.PRNGKey(1), tmp_path)
  with pytest.raises(ValueError, match="beyond num_rounds=1"):
    ckpt.run_with_checkpoints(algo, algo.init(init_params()), data, 1, key, tmp_path)
  other = fm.algorithms.fedavg(bce_loss, client_optimizer=optax.sgd(0.2), batch_size=2)
  with pytest.raises(ValueError, match="another structure"):
    ckpt.restore(tmp_path, other.init(init_params()))
  wider = algo.init(init_params(dim=4))
  with pytest.raises(ValueError, match="leaf"):
    ckpt.restore(tmp_path, wider)
  with pytest.raises(FileNotFoundError, match="round 7"):
    ckpt.restore(tmp_path, algo.init(init_params()), round_index=7)
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    ckpt.restore(tmp_path / "empty", algo.init(init_params()))
  with pytest.raises(fm.OptionError, match="every"):
    ckpt.run_with_checkpoints(algo, algo.init(init_params()), data, 2, key, tmp_path,
                              every=0)


def test_state_file_round_trip_and_hash(tmp_path, data):
  """The audit log's single-file snapshot: exact leaves back, sha256 of the bytes on disk."""
  import hashlib  # pylint: disable=import-outside-toplevel
  algo = fedavg_adam()
  state, _ = fm.run_rounds(algo, algo.init(init_params()), data, 2, jax.random.PRNGKey(5),
                           progress=False)
  path = str(tmp_path / "s.npz")
  sha = ckpt.save_state_file(state, path)
  with open(path, "rb") as f:
    assert sha == hashlib.sha256(f.read()).hexdigest()
  assert_trees_identical(ckpt.load_state_file(path, algo.init(init_params())), state)
  with pytest.raises(ValueError, match="leaf"):
    ckpt.load_state_file(path, algo.init(init_params(dim=4)))
  with pytest.raises(ValueError, match="leaves"):
    ckpt.load_state_file(path, {"w": jnp.zeros(2)})
  assert fm.audit.save_checkpoint is ckpt.save_state_file
