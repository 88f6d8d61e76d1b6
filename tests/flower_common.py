"""What the Flower deployment tests share: Flower's telemetry off, the example app's
task (experiments/heart_disease_flower) and the simulator's reference run.

Imported by tests/test_deploy_flower*.py before flwr (the environment must be set
before flwr's first import)."""

import os
import sys

import jax
import numpy as np

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")   # CI is offline; so are hospitals
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

import fedjax_med as fm  # noqa: E402

APP_DIR = os.path.join(os.path.dirname(__file__), "..", "experiments", "heart_disease_flower")
sys.path.insert(0, APP_DIR)
import heart_disease_task as app  # noqa: E402

RUN_KEY_SEED = 7


def simulated(name: str, rounds: int) -> list[np.ndarray]:
  """The simulator's (`fm.run_rounds`) final global parameters for the app's `name`."""
  task = app.make_task({"algorithm": name})
  train, _ = fm.datasets.heart_disease()
  state, _ = fm.run_rounds(task.algorithm, fm.deploy.initial_state(task), train, rounds,
                           jax.random.PRNGKey(RUN_KEY_SEED), progress=False)
  return [np.asarray(a) for a in jax.tree_util.tree_leaves(state.params)]
