"""fedjax_med.deploy on Flower's deployment engine, as real local processes.

A SuperLink and four SuperNodes start as separate local processes (insecure,
loopback only, every process group stopped on failure or timeout), the example
app (experiments/heart_disease_flower) runs 2 rounds of SCAFFOLD (round 2 uses the
control variates the nodes kept from round 1) through the
`flwr run` CLI, and the global parameters are compared with the simulator's
`fm.run_rounds` (marker `flower_processes`: in the default suite; deselect with
-m 'not flower_processes'). About 50-60 s on 2 cores.
"""

import json

import numpy as np
import pytest

from flower_common import APP_DIR, RUN_KEY_SEED, app, simulated  # (sets Flower's env)

flwr = pytest.importorskip("flwr")

from fedjax_med.deploy import launch  # noqa: E402


@pytest.mark.flower_processes
@pytest.mark.slow
def test_superlink_and_four_supernodes_as_processes(tmp_path):
  out = tmp_path / "out"
  # Flower starts a ClientApp process per message: JAX's persistent compilation cache
  # lets round 2 skip compiling the client update (about 20% of the run here).
  cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  with launch.local_federation(4, str(tmp_path / "flower"), env=cache) as federation:
    federation.run(APP_DIR, {"algorithm": "scaffold", "num-rounds": 2, "seed": RUN_KEY_SEED,
                             "out-dir": str(out), "timeout": 120.0}, timeout=170)
    assert all(p.poll() is None for p in federation.processes)   # all still up
  assert all(p.poll() is not None for p in federation.processes)  # all stopped
  params = np.load(out / "params.npz")
  for i, want in enumerate(simulated("scaffold", 2)):
    np.testing.assert_allclose(params[f"leaf_{i}"], want, rtol=0, atol=1e-6)
  history = json.load(open(out / "history.json"))
  assert history["sites"] == list(app.SITES)
  assert history["metrics"]["online"] == [[True] * 4] * 2
  assert history["metrics"]["uplink_bytes"][0] == [14 * 4 * 2 + 3 * 4] * 4   # Delta_k, dc_k; n_k, steps, loss
  results = json.load(open(out / "results.json"))
  assert {r["site"] for r in results} == {*app.SITES, "mean"}
