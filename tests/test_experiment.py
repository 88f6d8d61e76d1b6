"""run_rounds and run_seeds: the vmapped multi-seed run equals separate runs."""

import jax
import numpy as np
import pytest
import optax

import fedjax_med as fm
from conftest import bce_loss, init_params


def test_run_seeds_equals_sequential_runs(data):
  algo = fm.algorithms.fedavg(bce_loss, client_optimizer=optax.sgd(0.2), batch_size=2,
                              cohort_size=2)
  seeds = [0, 1, 2]
  params = [init_params(seed=10 + s) for s in seeds]
  keys = [jax.random.PRNGKey(s) for s in seeds]
  states, history = fm.run_seeds(algo, fm.stack_states([algo.init(p) for p in params]), data,
                                 4, np.stack(keys))
  assert history["train_loss"].shape == (3, 4)
  for i, (p, k) in enumerate(zip(params, keys)):
    state, hist = fm.run_rounds(algo, algo.init(p), data, 4, k, progress=False)
    np.testing.assert_allclose(states.params["w"][i], state.params["w"], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(history["cohort"][i], hist["cohort"])
    np.testing.assert_allclose(history["train_loss"][i], hist["train_loss"], rtol=1e-6)


def test_run_seeds_sweeps_learning_rates(data):
  opt = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
  algo = fm.algorithms.fedprox(bce_loss, mu=0.1, client_optimizer=opt, batch_size=2)
  base = algo.init(init_params())
  rates = [0.01, 0.1, 0.3]
  states = fm.stack_states([fm.set_hyperparams(base, client={"learning_rate": lr}, mu=lr)
                            for lr in rates])
  key = jax.random.PRNGKey(7)
  swept, _ = fm.run_seeds(algo, states, data, 3, np.stack([key] * 3))
  for i, lr in enumerate(rates):
    single, _ = fm.run_rounds(algo, fm.set_hyperparams(base, client={"learning_rate": lr},
                                                       mu=lr), data, 3, key, progress=False)
    np.testing.assert_allclose(swept.params["w"][i], single.params["w"], rtol=1e-6, atol=1e-7)


def test_experiment_script_helpers(tmp_path):
  import dataclasses

  @dataclasses.dataclass(frozen=True)
  class Config:
    seeds: tuple = (0,)
    rounds: int = 10
    alpha: float = 0.5

  assert fm.experiment.parse_seeds("0, 1,2") == (0, 1, 2)
  for bad in ("", ",", "a,1"):
    with pytest.raises(ValueError, match="seeds"):
      fm.experiment.parse_seeds(bad)
  config = fm.experiment.with_overrides(Config(), seeds="3,4", rounds=None, alpha=0.1)
  assert config == Config(seeds=(3, 4), rounds=10, alpha=0.1)
  assert fm.experiment.with_overrides(Config(), seeds="", rounds=5) == Config(rounds=5)
  assert fm.experiment.with_overrides(Config(), seeds=(7,)) == Config(seeds=(7,))
  path = fm.experiment.write_table(str(tmp_path / "out"), "| a |\n")
  assert path == str(tmp_path / "out" / "table.md") and open(path).read() == "| a |\n"
