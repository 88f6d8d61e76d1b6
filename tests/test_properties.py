"""Property-based invariants that every algorithm and every loss must keep (issue 17).

For EVERY constructor in `fm.algorithms.__all__` (a new one fails
`test_every_algorithm_has_a_case` until it is added to `CASES`):

  (a) padding: the same sites padded to a larger N_max give the same global
      state, per-site state and per-site metrics;
  (b) empty site: inserting a site with n_k = 0 (fresh site id) changes
      nothing for the others, and the empty site's own client state stays at
      its initial value;
  (c) permutation: permuting the sites (their ids carried along) leaves the
      global state unchanged and permutes every per-site output / state;
  (d) chunking: client_chunk_size = c (c = 2 not dividing K = 3 for every
      algorithm that accepts it, c = 1 dividing it for four) equals the
      unchunked round;
  (e) a round whose cohort holds only empty sites changes nothing (model,
      server optimizer state, client states, algorithm state).

Conditions under which an invariant is tested (and why):
  * (a)-(c) run with full participation (cohort_size=None): a sampled cohort
    is drawn by position among K sites, so its draw legitimately changes with
    K and with the order of the sites.
  * FedBuff processes simultaneous arrivals in site (position) order by
    design, so (c) holds only when no two sites finish a job at the same
    instant: its speeds here are distinct irrational-like functions of the
    site id (1 + 0.37 sqrt(id + 2)) and jobs take 1 or 2 steps, so finish
    times never tie.
  * Cyclic is tested WITHOUT a condition: a site's randomness must follow its
    id (FederatedData's contract), so an id-keyed visit order makes (b) and
    (c) hold; a position-keyed order breaks both.

For EVERY loss constructor in `fm.losses.__all__` (helpers that are not loss
constructors are listed in `LOSS_HELPERS`; anything else fails
`test_every_loss_has_a_case`), plus adversarial user losses, built on models
that are non-finite on an all-zero padded row (log x features, log y
targets, y log y, division by y): padded rows never change the loss or its
gradient. `site_objectives`, `weighted_objective` and its gradient, one FedSGD
round, one FedAvg round and evaluation are checked finite and equal to
computations on the real rows only (`jax.value_and_grad` of the loss on each
site's unpadded rows, a plain Python SGD loop over them, and float64 NumPy
closed forms for the user losses) -- never to the core's own masked
computation.

Tolerances (float32): rtol 1e-5, atol 1e-6 on values O(1); integers and
booleans exactly. Hypothesis draws site sizes (0 included), site ids,
permutations, insertion positions and fresh ids, zero or finite-garbage
padding, and seeds; shapes come from small fixed sets (K = 3, N_max 4 -> 7;
K = 4, N_max 4 for the losses) and chunk sizes are parametrized, so every
compiled round is reused across examples. Rounds run as the algorithm's
`pure_round`, compiled once per argument structure (see `call_compiled`) with
XLA's default settings (not backend level 0, which miscomputes a 3D U-Net's
gradient: benchmarks/README.md). Shrinking is disabled (each shrink step re-runs
rounds; failures report the first falsifying example) and the example database
is off. Runtime: about 170 s of test time for the fast tier of this file on
this machine's 2 cores.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import fedjax_med as fm
from conftest import tiered

RTOL, ATOL = 1e-5, 1e-6

D = 3            # features
K = 3            # sites in the padding / permutation tests
N = 4            # base N_max (site sizes are drawn in 0..N)
PADS = (7,)      # larger N_max the same sites are padded to (one value: one compile)
B = 2            # local batch size
ROUNDS = 2
MAX_ID = 9       # site ids are drawn in 0..MAX_ID

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                phases=(Phase.explicit, Phase.reuse, Phase.generate),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


# ---------------------------------------------------------------------------
# The tiny model of the algorithm tests: logistic regression on D = 3 features.
# ---------------------------------------------------------------------------

def linear(params, x):
  """[B] = x [B, D] @ w [D] + b."""
  return x @ params["w"] + params["b"]


def bce(params, x, y):
  z = linear(params, x)
  return jnp.logaddexp(0.0, z) - y * z


bce.label_type = "binary"

SGD = optax.sgd(0.3)
ADAM = optax.adam(0.05)
SERVER_SGD = optax.sgd(0.5)


def fedbuff_speeds(site_ids) -> np.ndarray:
  """Distinct per id; with 1- or 2-step jobs no two sites ever finish together."""
  return (1.0 + 0.37 * np.sqrt(np.asarray(site_ids, np.float64) + 2.0)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Case:
  """How to build and initialise one algorithm of fm.algorithms.

  build(**options) -> FederatedAlgorithm; options may hold client_chunk_size or
  cohort_size. init(algo, params, site_ids) -> ServerState.
  """
  build: Callable[..., Any]
  init: Callable[..., Any]
  chunk: bool = True     # accepts client_chunk_size
  cohort: bool = True    # accepts cohort_size


def _init(algo, params, ids):
  return algo.init(params)


def _init_k(algo, params, ids):
  return algo.init(params, len(ids))


A = fm.algorithms
CASES = {
    "cyclic": Case(lambda **o: A.cyclic(bce, client_optimizer=SGD, batch_size=B, **o), _init),
    "ditto": Case(lambda **o: A.ditto(bce, lam=0.5, client_optimizer=SGD, batch_size=B, **o),
                  _init_k),
    # DP-SGD inside FedAvg: Poisson-sampled rows, clipping, noise (keys per site id and row).
    "dp_sgd_fedavg": Case(lambda **o: A.dp_sgd_fedavg(
        bce, max_examples=64, clip_norm=1.0, noise_multiplier=0.5, expected_batch_size=3.0,
        client_optimizer=SGD, local_steps=2, **o), _init, chunk=False),
    "fedadagrad": Case(lambda **o: A.fedadagrad(bce, client_optimizer=SGD, batch_size=B,
                                                server_learning_rate=0.1, **o), _init),
    "fedadam": Case(lambda **o: A.fedadam(bce, client_optimizer=SGD, batch_size=B,
                                          server_learning_rate=0.1, **o), _init),
    "fedavg": Case(lambda **o: A.fedavg(bce, client_optimizer=SGD, batch_size=B, **o), _init),
    "fedavg_finetune": Case(lambda **o: A.fedavg_finetune(bce, client_optimizer=SGD,
                                                          batch_size=B, finetune_steps=2, **o),
                            _init),
    "feddyn": Case(lambda **o: A.feddyn(bce, alpha=0.1, client_optimizer=SGD, batch_size=B,
                                        **o), _init_k),
    "fedbuff": Case(lambda **o: A.fedbuff(bce, client_optimizer=SGD, batch_size=B,
                                          buffer_size=2, **o),
                    lambda algo, params, ids: algo.init(params, len(ids),
                                                        speeds=fedbuff_speeds(ids)),
                    chunk=False, cohort=False),
    # FedNova with uniform weighting and 2 local epochs (different step counts).
    "fednova": Case(lambda **o: A.fednova(bce, client_optimizer=SGD, batch_size=B,
                                          weighting="uniform", local_epochs=2, **o), _init),
    "fedper": Case(lambda **o: A.fedper(bce, personal=("b",), client_optimizer=SGD,
                                        batch_size=B, **o), _init_k),
    # FedProx with local_steps (the other schedule: batches computed inside the scan).
    "fedprox": Case(lambda **o: A.fedprox(bce, mu=0.1, client_optimizer=SGD, batch_size=B,
                                          local_steps=3, **o), _init),
    "fedsgd": Case(lambda **o: A.fedsgd(bce, server_optimizer=SERVER_SGD, **o), _init),
    "fedyogi": Case(lambda **o: A.fedyogi(bce, client_optimizer=SGD, batch_size=B,
                                          server_learning_rate=0.1, **o), _init),
    # local_only with Adam: its per-site optimizer state persists across rounds.
    "local_only": Case(lambda **o: A.local_only(bce, optimizer=ADAM, batch_size=B, **o),
                       _init_k, cohort=False),
    "qffl": Case(lambda **o: A.qffl(bce, q=1.0, lipschitz=3.0, client_optimizer=SGD,
                                    batch_size=B, **o), _init),
    "scaffold": Case(lambda **o: A.scaffold(bce, client_learning_rate=0.3, batch_size=B, **o),
                     _init_k),
    "with_availability": Case(
        lambda **o: A.with_availability(A.fedavg(bce, client_optimizer=SGD, batch_size=B,
                                                 **o), 0.6), _init),
}
NAMES = sorted(CASES)
# client_chunk_size: 2 does not divide K = 3 (a zero-weight filler client) for
# every algorithm that accepts it; 1 divides it, for four (the dividing case
# is the same shared chunking code without the filler; one compile per pair).
CHUNK_CASES = ([(n, 2) for n in NAMES if CASES[n].chunk]
               + [(n, 1) for n in ("fedavg", "fedsgd", "local_only", "scaffold")])

# `make test` runs each of the four costly properties below on a third of the
# algorithms (each a compile or two), chosen so that every algorithm meets at least
# one of them; `make test-all` (the slow tier) runs the full cross product.
FAST = {
    "padding": {"fedavg", "scaffold", "ditto", "fedbuff", "dp_sgd_fedavg", "fedadam"},
    "empty": {"fedper", "feddyn", "qffl", "local_only", "with_availability", "fedprox"},
    "chunked": {("fednova", 2), ("fedyogi", 2), ("fedavg_finetune", 2), ("cyclic", 2),
                ("fedsgd", 2), ("fedavg", 1)},
    "cohort": {"fedadagrad", "cyclic", "fedsgd", "scaffold", "fedavg_finetune"},
}


# DP-SGD's rounds compile about 2x faster on JAX's own CPU lowering of threefry than
# on the harness's unrolled one (tests/_unrolled_threefry.py; the same bits).
ROLLED_THREEFRY = {"dp_sgd_fedavg"}


def with_lowering(params):
  """The parametrize values with the cases of ROLLED_THREEFRY marked to run on JAX's
  own CPU lowering of threefry (a conftest fixture switches it)."""
  mark = pytest.mark.jax_cpu_threefry_lowering
  out = []
  for p in params:
    values, marks, id_ = ((p.values, tuple(p.marks), p.id) if hasattr(p, "values")
                          else ((p,), (), None))
    if values[0] in ROLLED_THREEFRY:
      p = pytest.param(*values, marks=marks + (mark,), id=id_)
    out.append(p)
  return out


@functools.lru_cache(maxsize=None)
def build(name: str, **options):
  """One algorithm object per (name, options), so hypothesis examples reuse its jit."""
  return CASES[name].build(**options)


# How each round metric / algorithm_state entry transforms under the invariants.
GLOBAL_METRICS = {"train_loss", "update_norm", "tau_eff", "control_norm", "sim_time", "version",
                  "flushes", "events", "staleness", "staleness_mean", "staleness_max",
                  "bytes_up_total", "bytes_down_total", "num_online", "skipped", "sum_h"}
SITE_METRICS = {"client_train_loss", "client_steps", "num_examples", "client_personal_loss",
                "arrivals", "bytes_up", "bytes_down", "online", "client_loss_at_start"}
# Site positions: compared as site ids. Sequences keep their order (a visiting
# or arrival order); "cohort" is compared as a multiset (the participants).
POSITION_SEQUENCES = {"visit_order", "alg/slot_site"}
POSITION_SETS = {"cohort"}
SITE_ALGORITHM_STATE = {"speeds"}   # FedBuff: one speed per site
POSITION_ALGORITHM_STATE = {"slot_site"}


# Rounds run as `pure_round` (the very function `round` jit-compiles, without
# its host-side input checks), compiled once here per argument structure; every
# comparison is between runs compiled alike or against eager references, within the
# stated tolerances.
_COMPILED: dict = {}


@pytest.fixture(autouse=True, scope="module")
def _release_this_files_programs():
  """Drops this file's own executables and algorithm objects after it (conftest's
  `_release_compiled_programs` explains why)."""
  yield
  _COMPILED.clear()
  for cached in (build, loss_of, loss_algorithm):
    cached.cache_clear()


def call_compiled(tag, fn, *args):
  """`jax.jit(fn)(*args)`, compiled once per (tag, argument structure and avals)."""
  args = tuple(strip_names(a) for a in args)
  leaves, treedef = jax.tree_util.tree_flatten(args)
  signature = (tag, treedef, tuple(jax.typeof(leaf) for leaf in leaves))
  exe = _COMPILED.get(signature)
  if exe is None:
    exe = jax.jit(fn).lower(*args).compile()
    _COMPILED[signature] = exe
  return exe(*args)


def round_tag(algo, fallback):
  """What `pure_round` closes over (the impl and its static config), as the library's
  own jit keys its cache: algorithms with equal configs (FedAvg and FedAvg +
  fine-tuning) share one compiled round, as they do in `round`."""
  try:
    values = tuple(cell.cell_contents for cell in algo.pure_round.__closure__ or ())
    hash(values)
    return ("pure_round",) + values
  except (TypeError, ValueError):
    return fallback + ("round",)


def strip_names(value):
  """FederatedData without its static names (they would only split the cache)."""
  if isinstance(value, fm.FederatedData):
    return fm.FederatedData.tree_unflatten((None, None), value.tree_flatten()[0])
  return value


@dataclasses.dataclass
class Outcome:
  initial: Any       # ServerState after init
  state: Any         # after ROUNDS rounds
  metrics: list      # one dict per round
  personal: Any      # algo.personalize(...) or None
  site_ids: np.ndarray


def init_params(seed: int):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=D) * 0.3, jnp.float32),
          "b": jnp.asarray(0.1, jnp.float32)}


def make_sites(sizes, seed):
  """Non-IID logistic sites: shifted features, different label balance."""
  rng = np.random.default_rng(seed)
  sites = []
  for k, n in enumerate(sizes):
    x = rng.normal(loc=0.4 * k, size=(n, D)).astype(np.float32)
    y = (rng.uniform(size=n) < 0.25 + 0.2 * k).astype(np.float32)
    sites.append((x, y))
  return sites


def run(name: str, data: fm.FederatedData, seed: int, **options) -> Outcome:
  algo = build(name, **options)
  ids = np.asarray(data.site_ids)
  state = CASES[name].init(algo, init_params(seed), ids)
  initial, history = state, []
  base = jax.random.PRNGKey(seed)
  tag = (name, tuple(sorted(options.items())))
  for r in range(ROUNDS):
    state, metrics = call_compiled(round_tag(algo, tag), algo.pure_round, state, data,
                                   jax.random.fold_in(base, r))
    history.append(metrics)
  personal = None
  if algo.personalize is not None:
    personal = call_compiled(tag + ("personalize",), algo.personalize, state, data,
                             jax.random.fold_in(base, 99))
  return Outcome(initial, state, history, personal, ids)


def views(name: str, out: Outcome):
  """(global, per_site, positions) dicts of numpy arrays; per-site leaves lead with K."""
  s = out.state
  glob = {"params": s.params, "server_opt_state": s.server_opt_state,
          "aggregator_state": s.aggregator_state, "round": s.round}
  site = {"client_states": s.client_states}
  pos = {}
  alg = s.algorithm_state
  if hasattr(alg, "_asdict"):  # a NamedTuple state type (FedBuffServerState)
    alg = alg._asdict()
  if isinstance(alg, dict):
    for key, value in alg.items():
      if key in SITE_ALGORITHM_STATE:
        site[f"alg/{key}"] = value
      elif key in POSITION_ALGORITHM_STATE:
        pos[f"alg/{key}"] = value
      else:
        glob[f"alg/{key}"] = value
  else:
    glob["algorithm_state"] = s.algorithm_state
  for r, metrics in enumerate(out.metrics):
    for key, value in metrics.items():
      if key in GLOBAL_METRICS:
        glob[f"round{r}/{key}"] = value
      elif key in SITE_METRICS:
        site[f"round{r}/{key}"] = value
      elif key in POSITION_SEQUENCES | POSITION_SETS:
        pos[f"round{r}/{key}"] = value
      else:
        raise AssertionError(
            f"{name}: metric {key!r} is not classified; add it to GLOBAL_METRICS,"
            " SITE_METRICS or POSITION_* in tests/test_properties.py")
  if out.personal is not None:
    site["personalize"] = out.personal
  to_np = lambda tree: jax.tree_util.tree_map(np.asarray, tree)
  glob, site, pos = to_np(glob), to_np(site), to_np(pos)
  k = len(out.site_ids)
  for path, leaf in jax.tree_util.tree_flatten_with_path(site)[0]:
    assert leaf.shape[:1] == (k,), (
        f"{name}: per-site leaf {jax.tree_util.keystr(path)} has shape {leaf.shape}, not"
        f" leading K={k}")
  return glob, site, pos


def assert_trees_close(actual, expected, what: str):
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(actual)
  flat_e, tree_e = jax.tree_util.tree_flatten_with_path(expected)
  assert tree_a == tree_e, f"{what}: structures differ\n{tree_a}\n{tree_e}"
  for (path, a), (_, e) in zip(flat_a, flat_e):
    a, e = np.asarray(a), np.asarray(e)
    msg = f"{what}: {jax.tree_util.keystr(path)}"
    assert a.shape == e.shape, f"{msg}: shape {a.shape} != {e.shape}"
    if np.issubdtype(e.dtype, np.floating):
      np.testing.assert_allclose(a, e, rtol=RTOL, atol=ATOL, err_msg=msg)
    else:
      np.testing.assert_array_equal(a, e, err_msg=msg)


def ids_of(pos: dict, site_ids: np.ndarray, drop: int | None = None) -> dict:
  """Positions -> site ids (without id `drop`); sequences keep their order, sets are sorted."""
  out = {}
  for key, value in pos.items():
    ids = site_ids[np.asarray(value)]
    ids = ids[ids != drop] if drop is not None else ids
    sequence = key in POSITION_SEQUENCES or key.split("/", 1)[1] in POSITION_SEQUENCES
    out[key] = ids if sequence else np.sort(ids)
  return out


# Strategies -----------------------------------------------------------------

def sizes_st(k):
  return st.lists(st.integers(0, N), min_size=k, max_size=k).filter(lambda s: sum(s) > 0)


def ids_st(k):
  return st.lists(st.integers(0, MAX_ID), min_size=k, max_size=k, unique=True)


seeds = st.integers(0, 2**16)


# ---------------------------------------------------------------------------
# Coverage: a new algorithm or loss must get an entry here.
# ---------------------------------------------------------------------------

# Exports of fm.algorithms that are not cases, and why.
NOT_CASES = {
    # FedAvg with privacy.site_level_dp as its aggregator; K is fixed when it is built
    # (the noise's public denominator W = K), so the empty-site case (K + 1) does not
    # apply; its round is FedAvg's, and tests/test_privacy_dp_fedavg.py checks it.
    "dp_fedavg",
    "segmentation",  # a module (patch training, tiled inference): tests/test_segmentation.py
}


def test_every_algorithm_has_a_case():
  exported = set(fm.algorithms.__all__) - NOT_CASES
  missing = sorted(exported - set(CASES))
  stale = sorted(set(CASES) - exported)
  assert not missing, (f"fm.algorithms exports {missing} with no entry in"
                       " tests/test_properties.py CASES: its invariants are not covered")
  assert not stale, f"CASES has {stale}, no longer exported by fm.algorithms"
  # `make test` (the fast tier) must check every algorithm against some invariant.
  fast = FAST["padding"] | FAST["empty"] | FAST["cohort"] | {n for n, _ in FAST["chunked"]}
  assert set(NAMES) <= fast, f"{sorted(set(NAMES) - fast)} are in no FAST set"
  # (That each FAST set holds only real cases, `tiered` asserts when the tests are collected.)


# ---------------------------------------------------------------------------
# (a) padding, (b) empty site, (c) permutation, (d) chunking, (e) empty cohort
# ---------------------------------------------------------------------------

def with_garbage(data: fm.FederatedData, seed: int) -> fm.FederatedData:
  """The same sites with finite random values instead of zeros in the padded rows."""
  rng = np.random.default_rng(seed)
  pad = ~np.asarray(data.mask)
  x, y = np.array(data.x), np.array(data.y)
  x[pad] = rng.normal(scale=3.0, size=x[pad].shape)
  y[pad] = rng.normal(scale=3.0, size=y[pad].shape)
  return data.replace(x=jnp.asarray(x), y=jnp.asarray(y))


@pytest.mark.parametrize("name", with_lowering(tiered(NAMES, FAST["padding"])))
@settings(max_examples=3, **SETTINGS)
@given(sizes=sizes_st(K), ids=ids_st(K), pad=st.sampled_from(PADS), garbage=st.booleans(),
       seed=seeds)
def test_padding_changes_nothing(name, sizes, ids, pad, garbage, seed):
  """Padding to a larger N_max (zeros, or finite garbage, in the mask=False rows)."""
  sites = make_sites(sizes, seed)
  base = fm.FederatedData.from_sites(sites, pad_to=N, site_ids=ids)
  padded = fm.FederatedData.from_sites(sites, pad_to=pad, site_ids=ids)
  if garbage:
    padded = with_garbage(padded, seed)
  g0, s0, p0 = views(name, run(name, base, seed))
  g1, s1, p1 = views(name, run(name, padded, seed))
  what = f"{name}, sizes {sizes}, N_max {N} -> {pad}{' with garbage padding' if garbage else ''}"
  assert_trees_close(g1, g0, f"{what}, global")
  assert_trees_close(s1, s0, f"{what}, per-site")
  assert_trees_close(p1, p0, f"{what}, positions")


@pytest.mark.parametrize("name", with_lowering(tiered(NAMES, FAST["empty"])))
@settings(max_examples=3, **SETTINGS)
@given(sizes=sizes_st(K), ids=ids_st(K), where=st.integers(0, K), seed=seeds, data=st.data())
def test_empty_site_changes_nothing(name, sizes, ids, where, seed, data):
  fresh = data.draw(st.integers(0, MAX_ID + 1).filter(lambda i: i not in ids), label="fresh")
  sites = make_sites(sizes, seed)
  base = fm.FederatedData.from_sites(sites, pad_to=N, site_ids=ids)
  empty = (np.zeros((0, D), np.float32), np.zeros((0,), np.float32))
  more = fm.FederatedData.from_sites(sites[:where] + [empty] + sites[where:], pad_to=N,
                                     site_ids=ids[:where] + [fresh] + ids[where:])
  out0, out1 = run(name, base, seed), run(name, more, seed)
  g0, s0, p0 = views(name, out0)
  g1, s1, p1 = views(name, out1)
  for r, metrics in enumerate(out1.metrics):
    if "online" in metrics:   # num_online counts every online site, the empty one too
      g1[f"round{r}/num_online"] = g1[f"round{r}/num_online"] - np.asarray(
          metrics["online"])[where].astype(np.int32)
  what = f"{name}, sizes {sizes} ids {ids}, empty site id {fresh} inserted at {where}"
  assert_trees_close(g1, g0, f"{what}, global")
  others = jax.tree_util.tree_map(lambda a: np.delete(a, where, axis=0), s1)
  assert_trees_close(others, s0, f"{what}, per-site (the other sites)")
  # An empty site may be listed among the participants (it contributes nothing).
  assert_trees_close(ids_of(p1, out1.site_ids, drop=fresh), ids_of(p0, out0.site_ids),
                     f"{what}, site ids of positions (the empty site left out)")
  # The empty site itself: client state untouched, no step, no arrival.
  assert_trees_close(
      jax.tree_util.tree_map(lambda a: np.asarray(a)[where], out1.state.client_states),
      jax.tree_util.tree_map(lambda a: np.asarray(a)[where], out1.initial.client_states),
      f"{what}, the empty site's client state")
  for key in ("client_steps", "num_examples", "arrivals", "bytes_up"):
    for r, metrics in enumerate(out1.metrics):
      if key in metrics:
        assert int(np.asarray(metrics[key])[where]) == 0, f"{what}: round {r} {key}"


@pytest.mark.parametrize("name", with_lowering(NAMES))
@settings(max_examples=3, **SETTINGS)
@given(sizes=sizes_st(K), ids=ids_st(K), perm=st.permutations(range(K)), seed=seeds)
def test_permuting_sites_permutes_per_site_outputs(name, sizes, ids, perm, seed):
  base = fm.FederatedData.from_sites(make_sites(sizes, seed), pad_to=N, site_ids=ids)
  permuted = base.subset(perm)     # site i of `permuted` is site perm[i] of `base`
  out0, out1 = run(name, base, seed), run(name, permuted, seed)
  g0, s0, p0 = views(name, out0)
  g1, s1, p1 = views(name, out1)
  what = f"{name}, sizes {sizes} ids {ids}, permutation {list(perm)}"
  assert_trees_close(g1, g0, f"{what}, global")
  expected = jax.tree_util.tree_map(lambda a: a[np.asarray(perm)], s0)
  assert_trees_close(s1, expected, f"{what}, per-site (permuted)")
  assert_trees_close(ids_of(p1, out1.site_ids), ids_of(p0, out0.site_ids),
                     f"{what}, site ids of positions")


@pytest.mark.parametrize("name, chunk", tiered(CHUNK_CASES, FAST["chunked"]))
@settings(max_examples=3, **SETTINGS)
@given(sizes=sizes_st(K), ids=ids_st(K), seed=seeds)
def test_chunked_equals_unchunked(name, chunk, sizes, ids, seed):
  data = fm.FederatedData.from_sites(make_sites(sizes, seed), pad_to=N, site_ids=ids)
  g0, s0, p0 = views(name, run(name, data, seed))
  g1, s1, p1 = views(name, run(name, data, seed, client_chunk_size=chunk))
  what = f"{name}, sizes {sizes}, client_chunk_size={chunk} (K={K})"
  assert_trees_close(g1, g0, f"{what}, global")
  assert_trees_close(s1, s0, f"{what}, per-site")
  assert_trees_close(p1, p0, f"{what}, positions")


def _find_round(name, state, data, seed, want_data: bool):
  """The first round key (of 200) whose cohort holds data (or holds none)."""
  algo = build(name, cohort_size=1)
  for r in range(200):
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 1000 + r)
    new_state, metrics = call_compiled(round_tag(algo, (name, "cohort_size=1")),
                                       algo.pure_round, state, data, key)
    if (int(np.sum(metrics["num_examples"])) > 0) == want_data:
      return new_state, metrics
  raise AssertionError("no round key gave the wanted cohort in 200 tries")


@pytest.mark.parametrize("name", with_lowering(
    tiered([n for n in NAMES if CASES[n].cohort], FAST["cohort"])))
@settings(max_examples=2, **SETTINGS)
@given(n0=st.integers(1, N), ids=ids_st(K), seed=seeds)
def test_round_with_only_empty_sites_in_cohort_changes_nothing(name, n0, ids, seed):
  """Sites (n0, 0, 0), cohort_size=1: a round that draws an empty site is a no-op.

  The round before it trains site 0, so stateful server optimizers (FedAdam's
  moments, ...) hold a non-zero state; a zero aggregate must not move the model.
  """
  data = fm.FederatedData.from_sites(make_sites([n0, 0, 0], seed), pad_to=N, site_ids=ids)
  algo = build(name, cohort_size=1)
  state = CASES[name].init(algo, init_params(seed), np.asarray(ids))
  state, _ = _find_round(name, state, data, seed, want_data=True)
  after, metrics = _find_round(name, state, data, seed + 1, want_data=False)
  what = (f"{name}, cohort {np.asarray(metrics['cohort']).tolist()} of empty sites after a"
          " round that trained")
  for field in ("params", "server_opt_state", "client_states", "algorithm_state"):
    assert_trees_close(getattr(after, field), getattr(state, field), f"{what}: {field}")


# ---------------------------------------------------------------------------
# Losses: padded rows never change a loss or its gradient, even where the loss
# is not finite on a padded (all-zero) row.
# ---------------------------------------------------------------------------

def log_linear(params, x):
  """Log-transformed features (lab values are log-normal): -inf on a zero row."""
  return jnp.log(x) @ params["w"] + params["b"]


def log_pixels(params, x):
  """x [B, H, W, 1] -> logits [B, H, W] on log intensities: -inf on a zero patch."""
  return params["w"] * jnp.log(x[..., 0]) + params["b"]


def log_voxels(params, x):
  """x [B, H, W, 1] -> 3-class logits [B, H, W, 3] on log intensities: -inf on a zero patch."""
  return params["w"] * jnp.log(x) + params["b"]


def log_target_mse(params, x, y):
  """(log y - f(x))^2, regression of log-scale targets (y > 0): inf at y = 0."""
  return (jnp.log(y) - linear(params, x)) ** 2


def poisson_deviance(params, x, y):
  """Half Poisson deviance, log link: y log y - y eta - y + exp(eta); NaN at y = 0."""
  eta = linear(params, x)
  return y * jnp.log(y) - y * eta - y + jnp.exp(eta)


def relative_squared_error(params, x, y):
  """((f(x) - y) / y)^2, relative error of a positive target: NaN at y = 0."""
  return ((linear(params, x) - y) / y) ** 2


def np_log_target_mse(eta, y):
  return (np.log(y) - eta) ** 2, -2.0 * (np.log(y) - eta)


def np_poisson_deviance(eta, y):
  return y * np.log(y) - y * eta - y + np.exp(eta), np.exp(eta) - y


def np_relative_squared_error(eta, y):
  return ((eta - y) / y) ** 2, 2.0 * (eta - y) / y**2


def _vector_params(seed, shape_w=(D,), shape_b=()):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=shape_w) * 0.3, jnp.float32),
          "b": jnp.asarray(rng.normal(size=shape_b) * 0.1, jnp.float32)}


def _positive_x(rng, n):
  return rng.uniform(0.5, 2.0, size=(n, D)).astype(np.float32)


def _binary(rng, shape):
  return rng.integers(0, 2, size=shape).astype(np.float32)


def _site_binary(rng, n):
  return _positive_x(rng, n), _binary(rng, n)


def _site_multiclass(rng, n):
  return _positive_x(rng, n), rng.integers(0, 3, size=n).astype(np.int32)


def _site_real(rng, n):
  return _positive_x(rng, n), rng.normal(size=n).astype(np.float32)


def _site_survival(rng, n):
  event = _binary(rng, n)
  time = rng.uniform(1.0, 10.0, size=n).astype(np.float32)
  return _positive_x(rng, n), np.stack([event, time], axis=1)


def _site_multitask(rng, n):
  observed = (rng.uniform(size=(n, 2)) < 0.8).astype(np.float32)
  return _positive_x(rng, n), np.stack([_binary(rng, (n, 2)), observed], axis=-1)


def _site_pixels(rng, n):
  x = rng.uniform(0.5, 2.0, size=(n, 2, 2, 1)).astype(np.float32)
  valid = (rng.uniform(size=(n, 2, 2)) < 0.9).astype(np.float32)
  return x, np.stack([_binary(rng, (n, 2, 2)), valid], axis=-1)


def _site_voxels(rng, n):
  x = rng.uniform(0.5, 2.0, size=(n, 2, 2, 1)).astype(np.float32)
  valid = (rng.uniform(size=(n, 2, 2)) < 0.9).astype(np.float32)
  classes = rng.integers(0, 3, size=(n, 2, 2)).astype(np.float32)
  return x, np.stack([classes, valid], axis=-1)


def _site_log_target(rng, n):
  return _positive_x(rng, n), np.exp(rng.normal(size=n)).astype(np.float32)


def _site_counts(rng, n):
  return _positive_x(rng, n), (rng.poisson(2.0, size=n) + 1).astype(np.float32)


def _site_positive(rng, n):
  return _positive_x(rng, n), rng.uniform(0.5, 2.0, size=n).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class LossCase:
  make: Callable[[], Callable]                  # () -> loss_fn
  apply: Callable                               # the model the loss is built on
  params: Callable[[int], Any]                  # seed -> params
  site: Callable[[np.random.Generator, int], tuple]   # (rng, n) -> (x_k, y_k)
  report: Callable | None = None                # evaluation report of this task
  numpy_ref: Callable | None = None             # float64 (f, df/deta) of a linear model


EV, EVT = fm.evaluation, fm.evaluation_tasks
LOSSES = fm.losses
LOSS_CASES = {
    "sigmoid_binary_cross_entropy": LossCase(
        lambda: LOSSES.sigmoid_binary_cross_entropy(log_linear), log_linear, _vector_params,
        _site_binary, EV.binary_report),
    "softmax_cross_entropy": LossCase(
        lambda: LOSSES.softmax_cross_entropy(log_linear), log_linear,
        lambda s: _vector_params(s, (D, 3), (3,)), _site_multiclass),
    "mean_squared_error": LossCase(
        lambda: LOSSES.mean_squared_error(log_linear), log_linear, _vector_params,
        _site_real, EVT.regression_report),
    "cox_loss": LossCase(
        lambda: LOSSES.cox_loss(log_linear), log_linear, _vector_params, _site_survival,
        EV.survival_report),
    "cox_loss[breslow]": LossCase(
        lambda: LOSSES.cox_loss(log_linear, ties="breslow"), log_linear, _vector_params,
        _site_survival, EV.survival_report),
    "masked_multitask_bce": LossCase(
        lambda: LOSSES.masked_multitask_bce(log_linear), log_linear,
        lambda s: _vector_params(s, (D, 2), (2,)), _site_multitask, EVT.multitask_report),
    "bce_dice": LossCase(
        lambda: LOSSES.bce_dice(log_pixels), log_pixels,
        lambda s: _vector_params(s, (), ()), _site_pixels),
    "bce_dice[batch]": LossCase(
        lambda: LOSSES.bce_dice(log_pixels, reduction="batch"), log_pixels,
        lambda s: _vector_params(s, (), ()), _site_pixels),
    "softmax_dice": LossCase(
        lambda: LOSSES.softmax_dice(log_voxels, num_classes=3), log_voxels,
        lambda s: _vector_params(s, (3,), (3,)), _site_voxels),
    # Adversarial user losses (label_type unset), finite on every real row.
    "user:log_target_mse": LossCase(
        lambda: log_target_mse, linear, _vector_params, _site_log_target,
        EVT.regression_report, np_log_target_mse),
    "user:poisson_deviance": LossCase(
        lambda: poisson_deviance, linear, _vector_params, _site_counts,
        EVT.regression_report, np_poisson_deviance),
    "user:relative_squared_error": LossCase(
        lambda: relative_squared_error, linear, _vector_params, _site_positive,
        EVT.regression_report, np_relative_squared_error),
}
LOSS_NAMES = sorted(LOSS_CASES)
# The round tests skip the Breslow variant: its padding path is cox_loss's (only
# the tie rule differs), and each case costs two compiled rounds.
ROUND_LOSS_NAMES = [n for n in LOSS_NAMES if n != "cox_loss[breslow]"]
# Exported by fm.losses but not loss constructors (covered through cox_loss,
# masked_multitask_bce or as reporting helpers).
LOSS_HELPERS = {"cox_partial_likelihood", "COX_TIES", "observed_mean_bce", "observed_fraction"}

K_LOSS = 4       # sites in the loss tests
N_LOSS = 3       # site sizes drawn in 0..N_LOSS
PAD_LOSS = 4     # N_max of the round tests: every site has padded rows
LOSS_PADS = (4,)  # N_max of the objective / evaluation tests (one compile per loss)
LR_LOSS = 0.1


@functools.lru_cache(maxsize=None)
def loss_of(name):
  return LOSS_CASES[name].make()


def test_every_loss_has_a_case():
  exported = set(fm.losses.__all__) - LOSS_HELPERS
  covered = {name.split("[")[0] for name in LOSS_CASES if not name.startswith("user:")}
  missing = sorted(exported - covered)
  assert not missing, (f"fm.losses exports {missing} with no entry in tests/test_properties.py"
                       " LOSS_CASES (or LOSS_HELPERS if it is not a loss constructor)")


def loss_sites(name, sizes, seed):
  rng = np.random.default_rng(seed)
  return [LOSS_CASES[name].site(rng, n) for n in sizes]


def loss_data(name, sites, pad_to):
  label_type = getattr(loss_of(name), "label_type", None)
  return fm.FederatedData.from_sites(sites, [f"s{k}" for k in range(len(sites))],
                                     label_type=label_type, pad_to=pad_to)


def is_batch(loss):
  from fedjax_med.core.objective import is_batch_loss
  return is_batch_loss(loss)


def real_rows_objective(loss, params, x, y):
  """F_k on the real rows only: no padding exists here, nothing to mask."""
  x, y = jnp.asarray(x), jnp.asarray(y)
  if is_batch(loss):
    return loss(params, x, y, jnp.ones((x.shape[0],), bool))
  return jnp.mean(loss(params, x, y))


def real_rows_value_and_grad(name, params, x, y):
  """(F_k, grad F_k) on one site's real rows (jit-compiled; (0, 0) for an empty site)."""
  if len(x) == 0:
    return 0.0, jax.tree_util.tree_map(jnp.zeros_like, params)
  loss = loss_of(name)
  value, grad = call_compiled(("real rows", name), jax.value_and_grad(
      lambda q, xs, ys: real_rows_objective(loss, q, xs, ys)), params, x, y)
  return float(value), grad


def weights_of(sizes):
  n = np.asarray(sizes, np.float64)
  return n / n.sum()


def tree_lincomb(trees, coefs):
  """sum_k c_k tree_k in float64."""
  return jax.tree_util.tree_map(
      lambda *leaves: sum(c * np.asarray(l, np.float64) for c, l in zip(coefs, leaves)), *trees)


def assert_finite(tree, what):
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    assert np.all(np.isfinite(np.asarray(leaf))), (
        f"{what}: {jax.tree_util.keystr(path)} is not finite: {np.asarray(leaf)}")


loss_sizes = st.lists(st.integers(0, N_LOSS), min_size=K_LOSS,
                      max_size=K_LOSS).filter(lambda s: sum(s) > 0)


@pytest.mark.parametrize("name", LOSS_NAMES)
@settings(max_examples=3, **SETTINGS)
@given(sizes=loss_sizes, pad=st.sampled_from(LOSS_PADS), seed=seeds)
def test_padded_rows_never_change_objective_or_gradient(name, sizes, pad, seed):
  case, loss = LOSS_CASES[name], loss_of(name)
  sites = loss_sites(name, sizes, seed)
  data = loss_data(name, sites, pad)
  params = case.params(seed)
  p = weights_of(sizes)
  what = f"{name}, sizes {sizes}, N_max {pad}"

  values, value, grad = call_compiled(("objective", name), lambda q, d: (
      fm.site_objectives(loss, q, d), fm.weighted_objective(loss, q, d),
      jax.grad(lambda r: fm.weighted_objective(loss, r, d))(q)), params, data)
  values, value = np.asarray(values), float(value)
  assert_finite(values, f"{what}: site_objectives")
  assert_finite(value, f"{what}: weighted_objective")
  assert_finite(grad, f"{what}: gradient of weighted_objective")

  refs = [real_rows_value_and_grad(name, params, x, y) for x, y in sites]
  ref_values = [v for v, _ in refs]
  np.testing.assert_allclose(values, ref_values, rtol=RTOL, atol=ATOL, err_msg=what)
  np.testing.assert_allclose(value, float(np.dot(p, ref_values)), rtol=RTOL, atol=ATOL,
                             err_msg=what)
  assert_trees_close(grad, tree_lincomb([g for _, g in refs], p), f"{what}: gradient")

  if case.numpy_ref is not None:
    # float64 closed form of a linear model: F = mean over all real rows of f,
    # dF/dw = mean f'(eta) x, dF/db = mean f'(eta).
    x = np.concatenate([s[0] for s in sites]).astype(np.float64)
    y = np.concatenate([s[1] for s in sites]).astype(np.float64)
    w, b = np.asarray(params["w"], np.float64), float(params["b"])
    f, df = case.numpy_ref(x @ w + b, y)
    np.testing.assert_allclose(value, f.mean(), rtol=RTOL, atol=ATOL, err_msg=what)
    np.testing.assert_allclose(grad["w"], (df[:, None] * x).mean(0), rtol=RTOL, atol=ATOL,
                               err_msg=f"{what}: dF/dw vs float64")
    np.testing.assert_allclose(grad["b"], df.mean(), rtol=RTOL, atol=ATOL,
                               err_msg=f"{what}: dF/db vs float64")


@functools.lru_cache(maxsize=None)
def loss_algorithm(kind, name):
  loss = loss_of(name)
  if kind == "fedsgd":
    return fm.algorithms.fedsgd(loss, server_optimizer=optax.sgd(LR_LOSS))
  return fm.algorithms.fedavg(loss, client_optimizer=optax.sgd(LR_LOSS), batch_size=B,
                              local_epochs=1, shuffle=False)


@pytest.mark.parametrize("name", ROUND_LOSS_NAMES)
@settings(max_examples=2, **SETTINGS)
@given(sizes=loss_sizes, seed=seeds)
def test_fedsgd_ignores_padded_rows(name, sizes, seed):
  """One FedSGD round = w - lr sum_k (n_k/n) grad F_k(w), F_k on the real rows only."""
  case = LOSS_CASES[name]
  sites = loss_sites(name, sizes, seed)
  data = loss_data(name, sites, PAD_LOSS)
  params = case.params(seed)
  algo = loss_algorithm("fedsgd", name)
  state, metrics = call_compiled(("fedsgd", name), algo.pure_round, algo.init(params), data,
                                 jax.random.PRNGKey(seed))
  what = f"{name}, sizes {sizes}, FedSGD"
  assert_finite(state.params, f"{what}: params")
  assert_finite(metrics["train_loss"], f"{what}: train_loss")
  grads = [real_rows_value_and_grad(name, params, x, y)[1] for x, y in sites]
  step = tree_lincomb(grads, weights_of(sizes))
  expected = jax.tree_util.tree_map(lambda w, g: np.asarray(w, np.float64) - LR_LOSS * g,
                                    params, step)
  assert_trees_close(state.params, expected, f"{what}: params")


def ref_local_sgd(name, params, x, y):
  """Plain SGD over the real rows in stored order, batches of B (the last one partial)."""
  losses = []
  for start in range(0, len(x), B):
    value, g = real_rows_value_and_grad(name, params, x[start:start + B], y[start:start + B])
    losses.append(value)
    params = jax.tree_util.tree_map(lambda w, d: w - LR_LOSS * d, params, g)
  return params, float(np.mean(losses))


@pytest.mark.parametrize("name", ROUND_LOSS_NAMES)
@settings(max_examples=2, **SETTINGS)
@given(sizes=loss_sizes, seed=seeds)
def test_fedavg_ignores_padded_rows(name, sizes, seed):
  """One FedAvg round (1 epoch, B = 2, stored order) = sum_k p_k w_k of real-row SGD loops."""
  case = LOSS_CASES[name]
  sites = loss_sites(name, sizes, seed)
  data = loss_data(name, sites, PAD_LOSS)
  params = case.params(seed)
  algo = loss_algorithm("fedavg", name)
  state, metrics = call_compiled(("fedavg", name), algo.pure_round, algo.init(params), data,
                                 jax.random.PRNGKey(seed))
  what = f"{name}, sizes {sizes}, FedAvg"
  assert_finite(state.params, f"{what}: params")
  assert_finite(metrics["client_train_loss"], f"{what}: client_train_loss")
  results = [ref_local_sgd(name, params, x, y) if len(x) else (params, 0.0) for x, y in sites]
  expected = tree_lincomb([w for w, _ in results], weights_of(sizes))
  assert_trees_close(state.params, expected, f"{what}: params")
  np.testing.assert_allclose(metrics["client_train_loss"], [l for _, l in results],
                             rtol=RTOL, atol=ATOL, err_msg=f"{what}: client_train_loss")


def _report_close(actual: dict, expected: dict, what: str):
  assert set(actual) == set(expected), what
  for metric, value in expected.items():
    np.testing.assert_allclose(actual[metric], value, rtol=RTOL, atol=ATOL, equal_nan=True,
                               err_msg=f"{what}: {metric}")


@pytest.mark.parametrize("name", LOSS_NAMES)
@settings(max_examples=2, **SETTINGS)
@given(sizes=loss_sizes, pad=st.sampled_from(LOSS_PADS), seed=seeds)
def test_evaluation_ignores_padded_rows(name, sizes, pad, seed):
  """Model outputs and per-site reports on padded data = on each site's rows alone."""
  case = LOSS_CASES[name]
  sites = loss_sites(name, sizes, seed)
  data = loss_data(name, sites, pad)
  params = case.params(seed)
  what = f"{name}, sizes {sizes}, N_max {pad}, evaluation"
  outputs = EVT.site_outputs(case.apply, params, data)
  for k, (x, _) in enumerate(sites):
    assert_finite(outputs[k], f"{what}: site {k} outputs")
    if len(x):
      np.testing.assert_allclose(outputs[k], np.asarray(case.apply(params, jnp.asarray(x))),
                                 rtol=RTOL, atol=ATOL, err_msg=f"{what}: site {k} outputs")
  if case.report is None:
    return
  report = case.report(case.apply, params, data)
  for k, site in enumerate(sites):
    if len(site[0]):
      alone = case.report(case.apply, params, loss_data(name, [site], None).replace(
          site_names=[f"s{k}"]))
      _report_close(report[f"s{k}"], alone[f"s{k}"], f"{what}: site {k} report")
  pooled = case.report(case.apply, params, data.pooled())
  _report_close(report["pooled"], pooled["pooled"], f"{what}: pooled report")
