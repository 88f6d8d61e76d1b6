"""Padded rows never reach a loss (issue 17, defect 2).

Padded rows hold zeros. Each loss below is finite on every real row but
non-finite at x = 0 or y = 0, so before the fix its masked-out padded rows
gave 0 * inf = NaN gradients (FedAvg / FedSGD parameters became NaN while
`site_objectives` stayed finite). Every result is checked against a float64
NumPy computation on the real rows only.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_med as fm


def _pred(params, x):
  return x @ params["w"] + params["b"]


def log_mse(params, x, y):
  """(log y - (x w + b))^2: -> inf at the padded y = 0."""
  return (jnp.log(y) - _pred(params, x)) ** 2


def log_feature_mse(params, x, y):
  """(y - log(x) w - b)^2: log(0) = -inf at the padded x = 0."""
  return (y - (jnp.log(x) @ params["w"] + params["b"])) ** 2


def _np_log_mse_grad(w, b, x, y):
  r = np.log(y) - (x @ w + b)
  return -2 * x.T @ r / len(y), -2 * r.mean(), np.mean(r ** 2)


def _np_log_feature_grad(w, b, x, y):
  lx = np.log(x)
  r = y - (lx @ w + b)
  return -2 * lx.T @ r / len(y), -2 * r.mean(), np.mean(r ** 2)


LOSSES = {"log_y": (log_mse, _np_log_mse_grad), "log_x": (log_feature_mse, _np_log_feature_grad)}


def _sites(seed=0, sizes=(5, 3, 7)):
  rng = np.random.default_rng(seed)
  return [(rng.uniform(0.5, 2.0, size=(n, 3)).astype(np.float32),
           rng.uniform(0.5, 2.0, size=n).astype(np.float32)) for n in sizes]


def _params():
  return {"w": jnp.array([0.1, -0.2, 0.3], jnp.float32), "b": jnp.array(0.05, jnp.float32)}


def _with_empty_site(sites):
  return sites[:1] + [(np.zeros((0, 3), np.float32), np.zeros(0, np.float32))] + sites[1:]


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_site_objectives_and_gradient_are_finite_and_exact(loss):
  loss_fn, np_grad = LOSSES[loss]
  sites = _sites()
  data = fm.FederatedData.from_sites(_with_empty_site(sites)).pad_to(12)
  params = _params()
  value, grad = jax.value_and_grad(lambda p: fm.weighted_objective(loss_fn, p, data))(params)
  w, b = np.asarray(params["w"], np.float64), float(params["b"])
  xs = np.concatenate([x for x, _ in sites]).astype(np.float64)
  ys = np.concatenate([y for _, y in sites]).astype(np.float64)
  gw, gb, f = np_grad(w, b, xs, ys)
  np.testing.assert_allclose(value, f, rtol=1e-6)
  np.testing.assert_allclose(grad["w"], gw, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad["b"], gb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_fedsgd_with_padding_and_an_empty_site_is_one_pooled_step(loss):
  loss_fn, np_grad = LOSSES[loss]
  sites = _sites(1)
  data = fm.FederatedData.from_sites(_with_empty_site(sites)).pad_to(10)
  algo = fm.algorithms.fedsgd(loss_fn, server_optimizer=optax.sgd(0.1))
  state = algo.init(_params())
  w, b = np.asarray(_params()["w"], np.float64), 0.05
  xs = np.concatenate([x for x, _ in sites]).astype(np.float64)
  ys = np.concatenate([y for _, y in sites]).astype(np.float64)
  for r in range(3):
    state, _ = algo.round(state, data, jax.random.PRNGKey(r))
    gw, gb, _ = np_grad(w, b, xs, ys)
    w, b = w - 0.1 * gw, b - 0.1 * gb
  np.testing.assert_allclose(state.params["w"], w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.params["b"], b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_fedavg_with_partial_batches_matches_numpy_loop(loss):
  """Batch 2 over sites of 5, 3, 7 rows: every site's last batch is partial."""
  loss_fn, np_grad = LOSSES[loss]
  sites = _sites(2)
  data = fm.FederatedData.from_sites(_with_empty_site(sites)).pad_to(9)
  lr, batch = 0.05, 2
  algo = fm.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(lr), local_epochs=2,
                              batch_size=batch, shuffle=False)
  state, _ = algo.round(algo.init(_params()), data, jax.random.PRNGKey(0))
  w0, b0 = np.asarray(_params()["w"], np.float64), 0.05
  n = sum(len(y) for _, y in sites)
  avg_w, avg_b = np.zeros(3), 0.0
  for x, y in sites:
    w, b = w0.copy(), b0
    for _ in range(2):
      for s in range(0, len(y), batch):
        gw, gb, _ = np_grad(w, b, x[s:s + batch].astype(np.float64),
                            y[s:s + batch].astype(np.float64))
        w, b = w - lr * gw, b - lr * gb
    avg_w += len(y) / n * w
    avg_b += len(y) / n * b
  np.testing.assert_allclose(state.params["w"], avg_w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.params["b"], avg_b, rtol=1e-5, atol=1e-6)


def test_fill_padded_rows_copies_the_first_real_row():
  x = jnp.array([[0., 0.], [1., 2.], [3., 4.], [0., 0.]])
  y = jnp.array([0., 5., 6., 0.])
  mask = jnp.array([False, True, True, False])
  fx, fy = fm.core.objective.fill_padded_rows(x, y, mask)
  np.testing.assert_array_equal(fx, [[1., 2.], [1., 2.], [3., 4.], [1., 2.]])
  np.testing.assert_array_equal(fy, [5., 5., 6., 5.])


def test_batch_loss_sees_only_real_values():
  """A batch-level loss that is non-finite on any zero (masked or not) stays finite."""

  @fm.batch_loss
  def log_batch(params, x, y, mask):
    per_row = (jnp.log(y) - _pred(params, x)) ** 2
    return jnp.sum(jnp.where(mask, per_row, 0.0)) / jnp.sum(mask)

  sites = _sites(3)
  data = fm.FederatedData.from_sites(_with_empty_site(sites)).pad_to(8)
  grad = jax.grad(lambda p: fm.weighted_objective(log_batch, p, data))(_params())
  xs = np.concatenate([x for x, _ in sites]).astype(np.float64)
  ys = np.concatenate([y for _, y in sites]).astype(np.float64)
  # Site-weighted mean of per-site means == pooled mean for this loss.
  gw, gb, _ = _np_log_mse_grad(np.asarray(_params()["w"], np.float64), 0.05, xs, ys)
  np.testing.assert_allclose(grad["w"], gw, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad["b"], gb, rtol=1e-5, atol=1e-6)


def test_segmentation_patches_of_padded_images_never_reach_the_loss():
  """with_patches: patches of padded (all-zero) images are padded rows. A per-pixel
  loss on log intensities (-inf on a zero pixel) must give the same finite round on
  sites padded with extra images as without them."""

  def log_pixel_bce(params, x, y):  # x [B, p, p, 1] > 0 on real images; y [B, p, p, 1]
    z = jnp.log(x[..., 0]) * params["w"] + params["b"]
    return jnp.mean(jnp.logaddexp(0.0, z) - y[..., 0] * z, axis=(1, 2))

  rng = np.random.default_rng(4)
  sites = [(rng.uniform(0.2, 1.0, size=(2, 8, 8, 1)).astype(np.float32),
            (rng.uniform(size=(2, 8, 8, 1)) < 0.3).astype(np.float32)) for _ in range(2)]
  plain = fm.FederatedData.from_sites(sites)
  padded = plain.pad_to(4)
  params = {"w": jnp.float32(0.3), "b": jnp.float32(-0.1)}
  results = []
  for data in (plain, padded):
    algo = fm.segmentation.with_patches(
        fm.algorithms.fedavg(log_pixel_bce, client_optimizer=optax.sgd(0.5), batch_size=3,
                             local_epochs=1),
        patches_per_image=2, patch_size=4, valid_channel=None)
    state, _ = algo.round(algo.init(params), data, jax.random.PRNGKey(0))
    results.append(state.params)
  for name in ("w", "b"):
    assert np.isfinite(results[1][name])
    np.testing.assert_allclose(results[1][name], results[0][name], rtol=1e-6, atol=1e-7)


def test_evaluation_reports_only_real_rows_of_a_model_non_finite_at_zero():
  sites = _sites(5)
  data = fm.FederatedData.from_sites(_with_empty_site(sites)).pad_to(11)
  params = _params()
  apply_fn = lambda p, x: jnp.log(x) @ p["w"] + p["b"]
  probs = fm.evaluation.site_probabilities(apply_fn, params, data)
  w, b = np.asarray(params["w"], np.float64), 0.05
  want = [1 / (1 + np.exp(-(np.log(x.astype(np.float64)) @ w + b))) for x, _ in sites]
  want.insert(1, np.zeros(0))
  assert [len(p) for p in probs] == [len(v) for v in want]
  for got, ref in zip(probs, want):
    np.testing.assert_allclose(got, ref, rtol=1e-5)
