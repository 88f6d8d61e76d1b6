"""client_chunk_size: a chunked round equals the unchunked one (float tolerance)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_med as fm
from fedjax_med.core import chunking
from conftest import bce_loss, init_params, make_sites, tiered

SGD = optax.sgd(0.2)
CASES = {
    "fedavg": (lambda **c: fm.algorithms.fedavg(bce_loss, client_optimizer=SGD, batch_size=2,
                                                **c), False),
    "fednova": (lambda **c: fm.algorithms.fednova(bce_loss, client_optimizer=SGD, batch_size=2,
                                                  **c), False),
    "fedadam": (lambda **c: fm.algorithms.fedadam(bce_loss, client_optimizer=SGD, batch_size=2,
                                                  server_learning_rate=0.05, **c), False),
    "fedsgd": (lambda **c: fm.algorithms.fedsgd(bce_loss, server_optimizer=optax.sgd(0.5),
                                                **c), False),
    "scaffold": (lambda **c: fm.algorithms.scaffold(bce_loss, client_learning_rate=0.2,
                                                    batch_size=2, **c), True),
    "fedper": (lambda **c: fm.algorithms.fedper(bce_loss, personal=("b",), client_optimizer=SGD,
                                                batch_size=2, **c), True),
    "ditto": (lambda **c: fm.algorithms.ditto(bce_loss, lam=0.1, client_optimizer=SGD,
                                              batch_size=2, **c), True),
    "local_only": (lambda **c: fm.algorithms.local_only(bce_loss, optimizer=SGD, batch_size=2,
                                                        **c), True),
}


@pytest.fixture(scope="module")
def five():
  return fm.FederatedData.from_sites(make_sites([6, 2, 9, 0, 3], seed=11))


# `make test`: four algorithms (each its own compile); `make test-all`: all of them.
@pytest.mark.parametrize("name, chunk, cohort", tiered(
    [(n, 2, 3) for n in sorted(CASES)] + [("fedavg", 2, None)],
    {("fedavg", 2, 3), ("scaffold", 2, 3), ("ditto", 2, 3), ("fedsgd", 2, 3)}))
def test_chunked_equals_unchunked(five, name, chunk, cohort):
  make, needs_k = CASES[name]
  extra = {} if cohort is None or name == "local_only" else {"cohort_size": cohort}
  plain = make(**extra)
  chunked = make(client_chunk_size=chunk, **extra)
  init = (lambda a: a.init(init_params(), 5)) if needs_k else (lambda a: a.init(init_params()))
  s_plain, s_chunked = init(plain), init(chunked)
  for r in range(2):
    key = jax.random.PRNGKey(r)
    s_plain, m_plain = plain.round(s_plain, five, key)
    s_chunked, m_chunked = chunked.round(s_chunked, five, key)
  leaves = lambda s: jax.tree_util.tree_leaves((s.params, s.client_states, s.algorithm_state))
  for a, b in zip(leaves(s_plain), leaves(s_chunked)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  if "client_steps" in m_plain:
    np.testing.assert_array_equal(m_plain["client_steps"], m_chunked["client_steps"])


def test_map_clients_pads_with_zero_weight():
  fn = lambda a: (a * 2.0, a + 1.0)
  inputs = (jnp.arange(5.0),)
  weights = jnp.array([1.0, 0.0, 2.0, 1.0, 3.0])
  for chunk in (None, 1, 2, 3, 5, 8):
    total, stacked = chunking.map_clients(fn, inputs, weights, chunk)
    assert float(total) == pytest.approx(float(2 * jnp.arange(5.0) @ weights))
    np.testing.assert_array_equal(stacked, jnp.arange(5.0) + 1)


def test_chunking_needs_the_linear_aggregator():
  clip = fm.ClientTransform(lambda t, k=None: (), lambda u, w, s, k, c: (u, w, s, {}))
  chain = fm.aggregators.chain(clip, fm.aggregators.weighted_mean())
  with pytest.raises(ValueError, match="client_chunk_size accumulates the weighted mean"):
    fm.algorithms.fedavg(bce_loss, client_optimizer=SGD, aggregator=chain, client_chunk_size=2)
  with pytest.raises(ValueError, match="client_chunk_size must be an integer >= 1"):
    fm.algorithms.fedavg(bce_loss, client_optimizer=SGD, client_chunk_size=0)
