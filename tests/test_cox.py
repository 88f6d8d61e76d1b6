"""Cox partial likelihood (both tie modes) and Harrell's C-index.

The JAX loss is compared with two float64 NumPy references written here:
a direct evaluation of the equation with plain loops over rows (risk sets
built pair by pair, ties and censoring included), and a line-by-line
transcription of FLamby's `fed_tcga_brca/loss.py` BaselineLoss. The C-index
is compared with lifelines, which FLamby's metric calls.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_med as fm
from conftest import tiered
from fedjax_med.losses import cox_loss, cox_partial_likelihood

TIES = ("flamby", "breslow")


# -- float64 references ---------------------------------------------------------


def np_cox_direct(risk, event, time, ties):
  """(1/n) sum_{i: E_i = 1} [log sum_{j in R(i)} exp(r_j) - r_i], plain loops.

  breslow: R(i) = {j : T_j >= T_i}. flamby: R(i) = {j : T_j > T_i, or T_j = T_i
  and j <= i} (rows are in batch order; a stable sort by -T puts exactly these
  rows at or before i).
  """
  risk = np.asarray(risk, np.float64)
  n = len(risk)
  total = 0.0
  for i in range(n):
    if event[i] != 1:
      continue
    members = []
    for j in range(n):
      if ties == "breslow":
        inside = time[j] >= time[i]
      else:
        inside = time[j] > time[i] or (time[j] == time[i] and j <= i)
      if inside:
        members.append(risk[j])
    top = max(members)
    log_sum = top + math.log(sum(math.exp(r - top) for r in members))
    total += log_sum - risk[i]
  return total / n if n else 0.0


def np_flamby_baseline_loss(scores, truth):
  """FLamby's BaselineLoss.forward, transcribed from torch to NumPy float64."""
  a = np.stack((np.asarray(scores, np.float64), truth[:, 0], truth[:, 1]), axis=1)
  a = np.stack(sorted(a, key=lambda row: -row[2]))   # Python's sort is stable
  scores, events = a[:, 0], a[:, 1]
  loss = np.zeros(scores.shape[0])
  for i in range(1, scores.shape[0]):
    aux = scores[:i + 1] - scores[i]
    m = aux.max()
    aux_ = np.exp(aux - m)
    loss[i] = m + np.log(aux_.sum(0))
  loss *= events
  return loss.mean()


def random_batch(rng, n, num_times=4, event_rate=0.5, scale=1.5):
  """A batch with deliberate tied times (few distinct values) and censoring."""
  risk = rng.normal(size=n) * scale
  time = rng.integers(0, num_times, size=n).astype(np.float64) * 10.0
  event = (rng.uniform(size=n) < event_rate).astype(np.float64)
  return risk, event, time


def jax_loss(risk, event, time, mask=None, ties="flamby"):
  if mask is None:
    mask = np.ones(len(risk), bool)
  return float(cox_partial_likelihood(jnp.asarray(risk, jnp.float32),
                                      jnp.asarray(event, jnp.float32),
                                      jnp.asarray(time, jnp.float32),
                                      jnp.asarray(mask), ties=ties))


# -- the loss against the references -----------------------------------------------


@pytest.mark.parametrize("ties", TIES)
@pytest.mark.parametrize("seed", range(8))
def test_matches_direct_evaluation(ties, seed):
  rng = np.random.default_rng(seed)
  n = [1, 2, 5, 8, 13, 32, 64, 100][seed]
  risk, event, time = random_batch(rng, n, num_times=2 + seed % 4)
  assert len(np.unique(time)) < n or n <= 2   # ties are present
  expected = np_cox_direct(risk, event, time, ties)
  np.testing.assert_allclose(jax_loss(risk, event, time, ties=ties), expected,
                             rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("seed", range(8))
def test_flamby_mode_matches_flamby_baseline_loss(seed):
  rng = np.random.default_rng(100 + seed)
  n = [2, 3, 8, 8, 8, 17, 40, 120][seed]
  risk, event, time = random_batch(rng, n, num_times=3)
  truth = np.stack([event, time], axis=1)
  expected = np_flamby_baseline_loss(risk, truth)
  np.testing.assert_allclose(jax_loss(risk, event, time, ties="flamby"), expected,
                             rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(np_cox_direct(risk, event, time, "flamby"), expected,
                             rtol=1e-12, atol=1e-12)


def test_tie_modes_differ_only_with_ties():
  rng = np.random.default_rng(7)
  risk, event, time = random_batch(rng, 20, num_times=3)
  event[:] = 1.0
  assert not np.isclose(jax_loss(risk, event, time, ties="flamby"),
                        jax_loss(risk, event, time, ties="breslow"))
  distinct = rng.permutation(20).astype(np.float64)
  np.testing.assert_allclose(jax_loss(risk, event, distinct, ties="flamby"),
                             jax_loss(risk, event, distinct, ties="breslow"), rtol=1e-6)


def test_hand_computed_case():
  # Rows (r, E, T): a (0, 1, 5), b (1, 0, 5), c (2, 1, 3), d (0.5, 1, 9).
  risk = np.array([0.0, 1.0, 2.0, 0.5])
  event = np.array([1.0, 0.0, 1.0, 1.0])
  time = np.array([5.0, 5.0, 3.0, 9.0])
  lse = lambda *r: math.log(sum(math.exp(v) for v in r))
  # breslow: R(a) = {a, b, d}, R(c) = all, R(d) = {d}.
  breslow = (lse(0, 1, 0.5) - 0 + lse(0, 1, 2, 0.5) - 2 + 0.0) / 4
  # flamby: sorted d, a, b, c (a before b: batch order); R(a) = {d, a}.
  flamby = (lse(0.5, 0) - 0 + lse(0, 1, 2, 0.5) - 2 + 0.0) / 4
  np.testing.assert_allclose(jax_loss(risk, event, time, ties="breslow"), breslow,
                             rtol=1e-6)
  np.testing.assert_allclose(jax_loss(risk, event, time, ties="flamby"), flamby,
                             rtol=1e-6)


def test_large_scores_are_stable():
  rng = np.random.default_rng(3)
  risk, event, time = random_batch(rng, 30, num_times=5)
  risk = risk * 40.0 + 300.0                       # exp overflows float32
  for ties in TIES:
    value = jax_loss(risk, event, time, ties=ties)
    assert np.isfinite(value)
    np.testing.assert_allclose(value, np_cox_direct(risk, event, time, ties),
                               rtol=1e-4, atol=1e-3)


# -- padding, degenerate batches, gradients ---------------------------------------


def _padded(rng, risk, event, time, extra):
  """Real rows at random positions among `extra` garbage padded rows."""
  n = len(risk)
  size = n + extra
  slots = np.sort(rng.choice(size, n, replace=False))   # keeps the real rows' order
  mask = np.zeros(size, bool)
  mask[slots] = True
  p_risk = rng.normal(size=size) * 50.0
  p_event = np.ones(size)
  p_time = rng.choice(time, size=size)                  # ties with real rows
  p_risk[slots], p_event[slots], p_time[slots] = risk, event, time
  return p_risk, p_event, p_time, mask, slots


_cox_value_and_grad = jax.jit(jax.value_and_grad(cox_partial_likelihood),
                              static_argnames="ties")


def _value_and_grad(risk, event, time, mask, ties):
  value, grad = _cox_value_and_grad(jnp.asarray(risk, jnp.float32), jnp.asarray(event, jnp.float32),
                   jnp.asarray(time, jnp.float32), jnp.asarray(mask), ties=ties)
  return float(value), np.asarray(grad)


@pytest.mark.parametrize("ties", TIES)
@pytest.mark.parametrize("seed", tiered(range(4), {0, 1}))   # each seed: its own shapes
def test_padding_changes_neither_loss_nor_gradient(ties, seed):
  rng = np.random.default_rng(200 + seed)
  risk, event, time = random_batch(rng, 9 + seed, num_times=3)
  value, grad = _value_and_grad(risk, event, time, np.ones(len(risk), bool), ties)
  p_risk, p_event, p_time, mask, slots = _padded(rng, risk, event, time, 7)
  p_value, p_grad = _value_and_grad(p_risk, p_event, p_time, mask, ties)
  np.testing.assert_allclose(p_value, value, rtol=1e-6)
  np.testing.assert_allclose(p_grad[slots], grad, rtol=1e-5, atol=1e-7)
  assert (p_grad[~mask] == 0).all()
  # Padded rows with non-finite values are ignored as well.
  p_risk[~mask], p_time[~mask] = np.inf, np.nan
  inf_value, inf_grad = _value_and_grad(p_risk, p_event, p_time, mask, ties)
  np.testing.assert_allclose(inf_value, value, rtol=1e-6)
  assert np.isfinite(inf_grad).all() and (inf_grad[~mask] == 0).all()


@pytest.mark.parametrize("ties", TIES)
def test_gradient_matches_finite_differences(ties):
  rng = np.random.default_rng(5)
  risk, event, time = random_batch(rng, 12, num_times=3)
  _, grad = _value_and_grad(risk, event, time, np.ones(12, bool), ties)
  assert np.isfinite(grad).all()
  eps = 1e-6
  numeric = np.array([
      (np_cox_direct(risk + eps * np.eye(12)[i], event, time, ties)
       - np_cox_direct(risk - eps * np.eye(12)[i], event, time, ties)) / (2 * eps)
      for i in range(12)])
  np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("ties", TIES)
def test_degenerate_batches_give_zero(ties):
  rng = np.random.default_rng(11)
  risk, _, time = random_batch(rng, 10)
  censored = np.zeros(10)
  value, grad = _value_and_grad(risk, censored, time, np.ones(10, bool), ties)
  assert value == 0.0 and (grad == 0).all()
  value, grad = _value_and_grad(risk, np.ones(10), time, np.zeros(10, bool), ties)
  assert value == 0.0 and (grad == 0).all()
  # A lone event (risk set = itself) costs log exp(r) - r = 0; B = 0 gives 0.
  assert jax_loss([3.0], [1.0], [4.0], ties=ties) == 0.0
  assert jax_loss([], [], [], ties=ties) == 0.0


def test_vmap_over_sites_equals_a_loop():
  rng = np.random.default_rng(9)
  batches = [random_batch(rng, 16, num_times=3) for _ in range(3)]
  mask = np.stack([np.arange(16) < n for n in (16, 9, 0)])
  stacked = [jnp.asarray(np.stack(parts), jnp.float32) for parts in zip(*batches)]
  for ties in TIES:
    values = jax.jit(jax.vmap(lambda r, e, t, m: cox_partial_likelihood(
        r, e, t, m, ties=ties)))(*stacked, jnp.asarray(mask))
    for k, (risk, event, time) in enumerate(batches):
      m = mask[k]
      expected = np_cox_direct(risk[m], event[m], time[m], ties) if m.any() else 0.0
      np.testing.assert_allclose(values[k], expected, rtol=2e-5, atol=1e-6)


def test_bad_arguments_raise():
  r = jnp.zeros(4)
  with pytest.raises(ValueError, match="'efron'"):
    cox_partial_likelihood(r, r, r, jnp.ones(4, bool), ties="efron")
  with pytest.raises(ValueError, match="'exact'"):
    cox_loss(lambda p, x: x[:, 0], ties="exact")
  with pytest.raises(ValueError, match="shape"):
    cox_partial_likelihood(r, r, jnp.zeros(3), jnp.ones(4, bool))
  with pytest.raises(ValueError, match="shape"):
    cox_partial_likelihood(jnp.zeros((4, 1)), r, r, jnp.ones(4, bool))


# -- cox_loss: a batch-level loss of a model ----------------------------------------


def linear_risk(params, x):
  return x @ params["w"] + params["b"]


@pytest.mark.parametrize("ties", TIES)
def test_cox_loss_is_a_batch_loss_of_the_model(ties):
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(10, 3)), jnp.float32)
  risk_np, event, time = random_batch(rng, 10, num_times=3)
  y = jnp.asarray(np.stack([event, time], axis=1), jnp.float32)
  mask = jnp.asarray(np.arange(10) < 8)
  params = {"w": jnp.asarray([0.3, -0.2, 0.5]), "b": jnp.asarray(0.1)}
  loss_fn = cox_loss(linear_risk, ties=ties)
  assert fm.core.objective.is_batch_loss(loss_fn) and loss_fn.label_type == "real"
  risk = linear_risk(params, x)
  expected = cox_partial_likelihood(risk, y[:, 0], y[:, 1], mask, ties=ties)
  np.testing.assert_allclose(loss_fn(params, x, y, mask), expected, rtol=1e-6)
  # [B, 1] outputs are accepted; the mean over real rows goes through the core.
  column = cox_loss(lambda p, x: linear_risk(p, x)[:, None], ties=ties)
  np.testing.assert_allclose(fm.masked_mean_loss(column, params, x, y, mask), expected,
                             rtol=1e-6)
  grads = jax.grad(loss_fn)(params, x, y, mask)
  assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
  with pytest.raises(ValueError, match=r"\[B, 2\]"):
    loss_fn(params, x, y[:, 0], mask)
  with pytest.raises(ValueError, match="one risk score per row"):
    cox_loss(lambda p, x: jnp.stack([x[:, 0], x[:, 1]], 1))(params, x, y, mask)


def test_site_objectives_use_each_site_as_one_batch():
  rng = np.random.default_rng(6)
  sites = []
  for n in (12, 5, 9):
    x = rng.normal(size=(n, 3)).astype(np.float32)
    _, event, time = random_batch(rng, n, num_times=3)
    sites.append((x, np.stack([event, time], axis=1).astype(np.float32)))
  data = fm.FederatedData.from_sites(sites, label_type="real")
  params = {"w": jnp.asarray([0.3, -0.2, 0.5]), "b": jnp.asarray(0.1)}
  for ties in TIES:
    values = fm.site_objectives(cox_loss(linear_risk, ties=ties), params, data)
    for k, (x, y) in enumerate(sites):
      risk = x.astype(np.float64) @ np.asarray(params["w"], np.float64) + 0.1
      np.testing.assert_allclose(values[k], np_cox_direct(risk, y[:, 0], y[:, 1], ties),
                                 rtol=2e-5, atol=1e-6)


# -- Harrell's C-index ---------------------------------------------------------------


def test_c_index_hand_computed():
  # Rows (T, E, risk): a (1, 1, .5), b (1, 0, .5), c (2, 1, .2), d (3, 1, .9),
  # e (1, 1, .1). Admissible (event first): a-b (censored at a's time, tied risk:
  # 0.5), a-c (1), a-d (0), e-b (0), e-c (0), e-d (0), c-d (0); a-e are two
  # events at the same time: not admissible. C = 1.5 / 7.
  time = [1, 1, 2, 3, 1]
  event = [1, 0, 1, 1, 1]
  risk = [0.5, 0.5, 0.2, 0.9, 0.1]
  assert fm.metrics.c_index(time, event, risk) == pytest.approx(1.5 / 7)
  # Perfect ranking.
  assert fm.metrics.c_index([1, 2, 3], [1, 0, 1], [3, 2, 1]) == 1.0
  assert fm.metrics.c_index([1, 2, 3], [1, 0, 1], [1, 2, 3]) == 0.0


def test_c_index_nan_without_admissible_pairs():
  assert math.isnan(fm.metrics.c_index([1, 2, 3], [0, 0, 0], [1, 2, 3]))
  assert math.isnan(fm.metrics.c_index([2, 2], [1, 1], [1, 2]))   # tied events
  assert math.isnan(fm.metrics.c_index([5, 1], [1, 0], [1, 2]))    # censored earlier
  assert math.isnan(fm.metrics.c_index([], [], []))


def test_c_index_bad_inputs_raise():
  with pytest.raises(ValueError, match="same length"):
    fm.metrics.c_index([1, 2], [1, 0], [1, 2, 3])
  with pytest.raises(ValueError, match="NaN"):
    fm.metrics.c_index([1, 2], [1, 0], [np.nan, 2])
  with pytest.raises(ValueError, match="event"):
    fm.metrics.c_index([1, 2], [2, 0], [1, 2])


@pytest.mark.parametrize("seed", range(10))
def test_c_index_matches_lifelines(seed):
  lifelines_utils = pytest.importorskip("lifelines.utils")
  rng = np.random.default_rng(300 + seed)
  n = [2, 3, 5, 10, 30, 50, 100, 250, 600, 1100][seed]
  time = rng.integers(0, max(2, n // 4), size=n).astype(np.float64)   # tied times
  event = (rng.uniform(size=n) < 0.4).astype(np.float64)
  event[0] = 1.0
  risk = np.round(rng.normal(size=n), 1)                             # tied risks
  try:
    expected = lifelines_utils.concordance_index(time, -risk, event)
  except ZeroDivisionError:
    expected = float("nan")
  np.testing.assert_allclose(fm.metrics.c_index(time, event, risk), expected,
                             rtol=1e-12, equal_nan=True)


def test_c_index_matches_lifelines_on_censored_ties_at_event_times():
  lifelines_utils = pytest.importorskip("lifelines.utils")
  rng = np.random.default_rng(17)
  for _ in range(30):
    n = 12
    time = rng.integers(0, 3, size=n).astype(np.float64)
    event = (rng.uniform(size=n) < 0.5).astype(np.float64)
    risk = rng.integers(0, 3, size=n).astype(np.float32)    # float32 as a model gives
    try:
      expected = lifelines_utils.concordance_index(time, -risk, event)
    except ZeroDivisionError:
      expected = float("nan")
    np.testing.assert_allclose(fm.metrics.c_index(time, event, risk), expected,
                               rtol=1e-12, equal_nan=True)
