"""fm.models.dense: flax.linen.Dense's function and parameters, a gradient that
equals autodiff of x W + b, plain or vmapped over clients (the unrolled rule for
small batches, the batched matmul for large ones), nested vmaps, and the MLP."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_med as fm
from fedjax_med.models import dense as dense_module
from fedjax_med.models.dense import UNROLL_MAX_ROWS, Dense, kernel_grad


def leaves(tree):
  return jax.tree_util.tree_leaves(tree)


@pytest.mark.parametrize("rows", [1, 4, UNROLL_MAX_ROWS, UNROLL_MAX_ROWS + 8])
def test_same_parameters_outputs_and_gradients_as_flax_dense(rows):
  key = jax.random.PRNGKey(rows)
  x = jax.random.normal(key, (rows, 7))
  ours, theirs = Dense(3), nn.Dense(3)
  params = ours.init(key, x)
  for a, b in zip(leaves(params), leaves(theirs.init(key, x))):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), atol=1e-6)

  def loss(module):
    return lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)) * jnp.arange(3.0))

  # Per-client parameters and data, as in a round: vmap over K = 5 clients.
  clients = jax.tree_util.tree_map(lambda a: jnp.stack([a * (1 + i) for i in range(5)]),
                                   params)
  xs = jax.random.normal(jax.random.fold_in(key, 1), (5, rows, 7))
  for axes in ((0, 0), (0, None), (None, 0)):
    args = (clients if axes[0] == 0 else params, xs if axes[1] == 0 else x)
    got = jax.jit(jax.vmap(jax.grad(loss(ours), argnums=(0, 1)), axes))(*args)
    want = jax.jit(jax.vmap(jax.grad(loss(theirs), argnums=(0, 1)), axes))(*args)
    for a, b in zip(leaves(got), leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # Unbatched, and nested vmaps (seeds x clients).
  for a, b in zip(leaves(jax.grad(loss(ours))(params, x)),
                  leaves(jax.grad(loss(theirs))(params, x))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  nested = lambda f: jax.jit(jax.vmap(jax.vmap(jax.grad(f), (None, 0)), (0, None)))
  for a, b in zip(leaves(nested(loss(ours))(clients, xs)),
                  leaves(nested(loss(theirs))(clients, xs))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("max_work", [dense_module.UNROLL_MAX_WORK, 10])
def test_kernel_grad_is_x_transpose_g(monkeypatch, max_work):
  # max_work = 10 < 6 * 3 * 2 sends the vmapped rule to the batched matmul.
  monkeypatch.setattr(dense_module, "UNROLL_MAX_WORK", max_work)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 6, 3)).astype(np.float32)
  g = rng.normal(size=(4, 6, 2)).astype(np.float32)
  want = np.einsum("kni,kno->kio", x.astype(np.float64), g.astype(np.float64))
  np.testing.assert_allclose(jax.vmap(kernel_grad)(x, g), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(kernel_grad(x[0], g[0]), want[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jax.vmap(kernel_grad, (None, 0))(x[0], g),
                             np.einsum("ni,kno->kio", x[0], g), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"\[N, features\]"):
    Dense(2).init(jax.random.PRNGKey(0), jnp.zeros((2, 3, 4)))


def test_mlp_fedavg_round_matches_flax_dense_mlp():
  """A FedAvg round with the MLP equals the same round with flax.linen.Dense layers."""

  class FlaxMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(8, name="hidden_0")(x.reshape((x.shape[0], -1))))
      return nn.Dense(2, name="output")(x)

  rng = np.random.default_rng(1)
  sites = [(rng.normal(size=(n, 5)).astype(np.float32), rng.integers(0, 2, n))
           for n in (9, 20, 3)]
  data = fm.FederatedData.from_sites(sites)
  states = []
  for model in (fm.models.MLP(hidden=(8,), num_outputs=2), FlaxMLP()):
    params = model.init(jax.random.PRNGKey(0), data.x[0, :1])
    algo = fm.algorithms.fedavg(fm.losses.softmax_cross_entropy(model.apply),
                                client_optimizer=optax.sgd(0.1), local_epochs=2,
                                batch_size=4)
    state = algo.init(params)
    for r in range(3):
      state, _ = algo.round(state, data, jax.random.PRNGKey(r))
    states.append(state.params)
  for a, b in zip(leaves(states[0]), leaves(states[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
