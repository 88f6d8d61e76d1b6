"""Device availability: each client is online in a round with some probability.

Home devices (telemonitoring) and hospital servers are not always reachable.
`with_availability(algo, probability)` wraps ANY FederatedAlgorithm of the
suite (FedAvg, FedProx, SCAFFOLD, FedPer, Ditto, local_only, ...) without
touching it: in round r, site k is online with probability p_k, drawn as

    online_k = U_k < p_k,   U_k = uniform(fold_in(fold_in(round_key, AVAILABILITY_STREAM), site_id_k))

independently across sites and rounds (the draw follows the site's id, so a
permutation of the sites or a cohort does not change who is online). The
wrapped round then runs the inner algorithm's `pure_round` on the data with
the offline sites' rows masked out (mask and rows zeroed): an offline site
has n_k = 0 this round, so, exactly as the core treats an empty site, it
trains nothing, its aggregation weight is 0 (under "num_examples" and
"uniform" weighting alike, so the average is over the online sites) and its
client state (control variates, personal models, ...) is left untouched.

* probability 1 (every site): the round IS the inner round, bit for bit.
* probability 0 is refused (OptionError): no client would ever be online.
* a round in which no participating site is online with data is SKIPPED:
  the state is returned unchanged (server optimizer state and round counter
  included; a server momentum does not keep moving on a zero update) and the
  metric "skipped" is True.

Combined with client sampling (`cohort_size=C` in the inner algorithm),
availability acts first: with `sampling="num_examples"` the cohort is drawn
among the online sites only (their n_k > 0); with `sampling="uniform"` the
cohort is drawn from all K sites and its offline members contribute nothing,
so the round trains the cohort's online members (cohort ∩ online).

Caveat, SCAFFOLD: its server control variate is updated with population
weights q_k computed from the round's data, so under availability
c <- c + sum_{online k} q'_k dc_k with q' over the online sites, i.e. each
round is exactly SCAFFOLD on the online sub-federation, not the paper's
|S|/N scaling of client sampling (use SCAFFOLD's own `cohort_size` for that).

The probability is traced: it lives in `state.hparams["availability"]`
(a scalar, or a `[K]` vector of per-site probabilities), so
`fm.set_hyperparams(state, availability=0.5)` changes it without
recompiling. `algo.personalize` is passed through unchanged (it sees the
full data). Round metrics add "online" `[K]`, "num_online" and "skipped".
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_med.core.algorithm import FederatedAlgorithm, make_algorithm
from fedjax_med.core.federated_data import FederatedData
from fedjax_med.core.options import OptionError, reject_unknown
from fedjax_med.core.tree import tree_select
from fedjax_med.core.streams import AVAILABILITY_STREAM  # noqa: F401 (re-exported)

HPARAM = "availability"


@dataclasses.dataclass(frozen=True)
class AvailabilityConfig:
  inner_round: Callable   # the inner algorithm's pure_round


def _check_probability(probability) -> np.ndarray:
  """A scalar in (0, 1], or a 1-D vector in [0, 1] with at least one p_k > 0."""
  if isinstance(probability, bool) or isinstance(probability, str):
    raise OptionError(f"with_availability: probability must be a number in (0, 1] or a"
                      f" vector of per-site probabilities, got {probability!r}")
  try:
    p = np.asarray(probability, dtype=np.float64)
  except (TypeError, ValueError):
    raise OptionError(f"with_availability: probability must be a number in (0, 1] or a"
                      f" vector of per-site probabilities, got {probability!r}") from None
  if p.ndim > 1 or (p.ndim == 1 and p.size == 0):
    raise OptionError(f"with_availability: probability must be a scalar or a [K] vector,"
                      f" got shape {p.shape}")
  if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
    raise OptionError(f"with_availability: probability must lie in [0, 1], got"
                      f" {probability!r}")
  if p.max() == 0:
    raise OptionError("with_availability: probability 0: no client would ever be online,"
                      " so no round could train; give a probability in (0, 1]")
  return p.astype(np.float32)


def online_sites(probability: jax.Array, site_ids: jax.Array, round_key: jax.Array
                 ) -> jax.Array:
  """bool `[K]`: which sites are online this round (U_k < p_k, keyed by site id)."""
  key = jax.random.fold_in(round_key, AVAILABILITY_STREAM)
  u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i)))(site_ids)
  return u < probability


def mask_offline(data: FederatedData, online: jax.Array) -> FederatedData:
  """`data` with the offline sites' rows removed (mask False, x and y zeroed)."""
  mask = data.mask & online[:, None]

  def zero(a):
    m = mask.reshape(mask.shape + (1,) * (a.ndim - 2))
    return jnp.where(m, a, jnp.zeros((), a.dtype))

  return FederatedData(zero(data.x), zero(data.y), mask, data.site_names, data.label_type,
                       site_ids=data.site_ids, validate=False)


def _availability_round(config: AvailabilityConfig, state, data, key):
  p = state.hparams[HPARAM]
  num_sites = data.mask.shape[0]
  if p.ndim == 1 and p.shape[0] != num_sites:
    raise ValueError(f"with_availability: {p.shape[0]} per-site probabilities but the"
                     f" data has K={num_sites} sites")
  online = online_sites(p, data.site_ids, key)
  new_state, metrics = config.inner_round(state, mask_offline(data, online), key)
  if "num_examples" in metrics:
    active = jnp.any(metrics["num_examples"] > 0)
  else:  # pragma: no cover - every algorithm of the suite reports num_examples
    active = jnp.any(online & jnp.any(data.mask, axis=1))
  new_state = tree_select(active, new_state, state)
  metrics = {**metrics, "online": online,
             "num_online": jnp.sum(online, dtype=jnp.int32), "skipped": ~active}
  return new_state, metrics


def with_availability(algo: FederatedAlgorithm, probability, **unknown_options
                      ) -> FederatedAlgorithm:
  """Wraps `algo` so that each site is online in a round with `probability`.

  Args:
    algo: any FederatedAlgorithm with a `pure_round`.
    probability: p in (0, 1] for every site, or a `[K]` sequence of per-site
      probabilities in [0, 1] (at least one > 0). Traced: stored in
      `state.hparams["availability"]`.

  Returns:
    FederatedAlgorithm named "<algo.name>+availability", with the same
    `init` signature (it adds the traced probability to the state) and the
    same `personalize`.

  Raises:
    OptionError for probability 0, values outside [0, 1], NaN, wrong shapes
    or unknown options; TypeError when `algo` is not a FederatedAlgorithm.
  """
  reject_unknown("with_availability", unknown_options, ("probability",))
  if not isinstance(algo, FederatedAlgorithm) or algo.pure_round is None:
    raise TypeError(f"with_availability: algo must be a FederatedAlgorithm with a"
                    f" pure_round, got {type(algo).__name__}")
  p = _check_probability(probability)
  name = f"{algo.name}+availability"

  def init(*args, **kwargs):
    state = algo.init(*args, **kwargs)
    if HPARAM in state.hparams:
      raise OptionError(f"with_availability: {algo.name} already has an"
                        f" {HPARAM!r} hyperparameter (wrapped twice?)")
    return state._replace(hparams={**state.hparams, HPARAM: jnp.asarray(p)})

  return make_algorithm(name, _availability_round, AvailabilityConfig(algo.pure_round),
                        None, init, personalize=algo.personalize)


__all__ = ["with_availability", "online_sites", "mask_offline", "AVAILABILITY_STREAM",
           "AvailabilityConfig"]
