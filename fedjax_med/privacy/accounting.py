"""Privacy accounting with Google's `dp-accounting` (never a home-made formula).

Every epsilon in fedjax_med comes from a `dp_accounting` accountant applied
to a `DpEvent` that describes exactly what the code does:

* patient-level DP-SGD at site k (`fedjax_med.privacy.patient_level`): each local
  step samples every real row independently with probability q_k (Poisson
  sampling) and adds N(0, (sigma C)^2 I) to the sum of the clipped
  per-example gradients, so one step is

      PoissonSampledDpEvent(q_k, GaussianDpEvent(sigma))

  and T_k steps (over all rounds in which the site trained) compose to
  `SelfComposedDpEvent(step, T_k)`; neighbouring datasets differ by adding or
  removing one patient of site k (`ADD_OR_REMOVE_ONE`). Each site has its own
  q_k and T_k, hence its own epsilon_k(delta).
* site-level DP-FedAvg (`fedjax_med.privacy.site_level`): each round adds
  N(0, (sigma C)^2 I) to the sum of the clipped site updates. Every site-level
  epsilon is reported with its neighbouring relation, one relation for every
  participation mode:

  - "replace_one" (default): neighbouring federations differ in the data of
    one site, K fixed and public (as `dp_fedavg` enforces). Replacing a site
    moves the clipped sum by up to 2C, so the noise multiplier relative to
    that sensitivity is sigma / 2: every site every round (or a cohort of
    C = K) is `GaussianDpEvent(sigma / 2)`; fixed-size cohorts of C < K drawn
    uniformly without replacement are `SampledWithoutReplacementDpEvent(K, C,
    GaussianDpEvent(sigma / 2))` (Wang, Balle & Kasiviswanathan 2019, RDP
    only). Poisson site sampling has no replace-one analysis here: it raises.
  - "add_or_remove_one": neighbours differ by one whole site; the sum moves by
    up to C. Every site every round is `GaussianDpEvent(sigma)`, Poisson site
    sampling with rate q (`poisson_site_sampling`) is
    `PoissonSampledDpEvent(q, GaussianDpEvent(sigma))` (RDP or PLD).
    Fixed-size cohorts (C < K) have no add/remove analysis (K would change):
    they raise.

  Under "replace_one" sampling fewer sites can only lower epsilon
  (eps(C < K) <= eps(C = K)); the two relations are not comparable numbers
  (replace one = remove one then add one: roughly twice the add/remove eps).

Accountants: "rdp" (`dp_accounting.rdp.RdpAccountant`, Mironov 2017; fast)
and "pld" (`dp_accounting.pld.PLDAccountant`, privacy loss distributions,
tighter, slower: seconds per call, minutes for a calibration).

Calibration (`calibrate_noise_multiplier`) is `dp_accounting.calibrate_dp_mechanism`
(Brent's method on the accountant's epsilon) over an explicit bracket
[min_noise_multiplier, max_noise_multiplier]; a target that even the largest
noise multiplier cannot meet raises a ValueError.

Threat model: epsilon bounds what anyone who sees the released quantity
(the noised gradient or update, hence every later model) can infer about one
patient (patient level) or one site (site level). It assumes the noise is
drawn as stated and kept secret, the sampling is done as stated, and delta <<
1/n. It says nothing about side channels, metrics released outside the
mechanism (e.g. per-site train loss, which `fedavg` reports in the clear), or
membership of the site itself (patient level).
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
from typing import Any, Iterable, Sequence

import numpy as np

ACCOUNTANTS = ("rdp", "pld")
REPLACE_ONE = "replace_one"
ADD_OR_REMOVE_ONE = "add_or_remove_one"
RELATIONS = (REPLACE_ONE, ADD_OR_REMOVE_ONE)


def _dpa():
  try:
    import dp_accounting  # pylint: disable=import-outside-toplevel
    from dp_accounting import pld, rdp  # noqa: F401  pylint: disable=import-outside-toplevel
  except ImportError as err:  # pragma: no cover - dependency of the package
    raise ImportError(
        "fedjax_med.privacy needs Google's dp-accounting: pip install"
        " 'dp-accounting>=0.5,<0.7'") from err
  return dp_accounting


class _QuietRdpWarnings(logging.Filter):
  """Drops dp-accounting's per-order convergence warnings (the order is excluded)."""

  def filter(self, record):
    return "failed to converge" not in record.getMessage()


_absl_logger = logging.getLogger("absl")
if not any(isinstance(f, _QuietRdpWarnings) for f in _absl_logger.filters):
  _absl_logger.addFilter(_QuietRdpWarnings())


# ----------------------------------------------------------------------------- checks

def check_delta(name: str, delta: Any) -> float:
  """delta must lie strictly inside (0, 1)."""
  try:
    d = float(delta)
  except (TypeError, ValueError):
    raise ValueError(f"{name}: delta must be a number in (0, 1), got {delta!r}") from None
  if not 0.0 < d < 1.0:
    raise ValueError(f"{name}: delta must be in the open interval (0, 1), got {delta!r}")
  return d


def check_noise_multiplier(name: str, value: Any) -> float:
  """The noise multiplier sigma as a float; it must be a finite number >= 0."""
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name}: noise_multiplier must be a number >= 0, got {value!r}") from None
  if not v >= 0.0 or math.isinf(v):
    raise ValueError(f"{name}: noise_multiplier must be a finite number >= 0, got {value!r}")
  return v


def check_clip_norm(name: str, value: Any) -> float:
  """The clipping norm C as a float; it must be a finite number > 0."""
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name}: clip_norm must be a number > 0, got {value!r}") from None
  if not v > 0.0 or math.isinf(v):
    raise ValueError(f"{name}: clip_norm must be a finite number > 0, got {value!r}")
  return v


def check_rate(name: str, field: str, value: Any) -> float:
  """A sampling rate as a float; it must lie in (0, 1]."""
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name}: {field} must be a number in (0, 1], got {value!r}") from None
  if not 0.0 < v <= 1.0:
    raise ValueError(f"{name}: {field} must be in (0, 1], got {value!r}")
  return v


def _check_count(name: str, field: str, value: Any, minimum: int = 0) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise ValueError(f"{name}: {field} must be an integer >= {minimum}, got {value!r}")
  return int(value)


def check_relation(name: str, relation: Any) -> str:
  """"replace_one" or "add_or_remove_one" (the neighbouring relation's name)."""
  if relation not in RELATIONS:
    raise ValueError(f"{name}: unknown neighboring_relation {relation!r}; expected one of"
                     f" {RELATIONS}")
  return relation


def relation_enum(relation: str):
  """The `dp_accounting.NeighboringRelation` of a relation name."""
  rel = _dpa().NeighboringRelation
  return rel.REPLACE_ONE if check_relation("relation_enum", relation) == REPLACE_ONE \
      else rel.ADD_OR_REMOVE_ONE


def _check_accountant(name: str, accountant: str) -> str:
  if accountant not in ACCOUNTANTS:
    raise ValueError(f"{name}: unknown accountant {accountant!r}; expected one of {ACCOUNTANTS}")
  return accountant


# ----------------------------------------------------------------------------- events

def gaussian_step_event(noise_multiplier: float, sampling_rate: float = 1.0):
  """One Poisson-subsampled Gaussian step: `PoissonSampledDpEvent(q, GaussianDpEvent(sigma))`.

  q = 1 gives the plain `GaussianDpEvent(sigma)`; sigma = 0 gives
  `NonPrivateDpEvent` (epsilon = inf).
  """
  dpa = _dpa()
  sigma = check_noise_multiplier("gaussian_step_event", noise_multiplier)
  q = check_rate("gaussian_step_event", "sampling_rate", sampling_rate)
  if sigma == 0.0:
    return dpa.NonPrivateDpEvent()
  gaussian = dpa.GaussianDpEvent(sigma)
  return gaussian if q == 1.0 else dpa.PoissonSampledDpEvent(q, gaussian)


def dp_sgd_event(noise_multiplier: float, sampling_rate: float, num_steps: int):
  """`SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), T)`.

  DP-SGD (Abadi et al. 2016) with Poisson sampling rate q and T steps; the
  event of one site under patient-level DP.
  """
  dpa = _dpa()
  steps = _check_count("dp_sgd_event", "num_steps", num_steps)
  if steps == 0:
    return dpa.NoOpDpEvent()
  return dpa.SelfComposedDpEvent(gaussian_step_event(noise_multiplier, sampling_rate), steps)


def site_level_event(noise_multiplier: float, num_rounds: int, *, sampling_rate: float = 1.0,
                     num_sites: int | None = None, cohort_size: int | None = None,
                     neighboring_relation: str = REPLACE_ONE):
  """The DpEvent of `num_rounds` rounds of DP-FedAvg (site-level DP) under a relation.

  Args:
    noise_multiplier: sigma; the sum of clipped updates gets N(0, (sigma C)^2 I).
    num_rounds: rounds run.
    sampling_rate: Poisson rate q of `poisson_site_sampling` (1: every site,
      every round); q < 1 needs neighboring_relation="add_or_remove_one".
    num_sites, cohort_size: the algorithms' fixed-size cohort of C sites out
      of K drawn without replacement (C = K: every site).
    neighboring_relation: "replace_one" (default; sensitivity 2C, events on
      Gaussian(sigma / 2)) or "add_or_remove_one" (sensitivity C, events on
      Gaussian(sigma)); see the module docstring. Account the event with the
      same relation (`epsilon(..., neighboring_relation=...)`,
      `site_level_epsilon`, `SiteLevelAccountant`).

  Raises:
    ValueError for a mode the relation has no analysis of (Poisson sampling
    under replace_one; cohorts C < K under add_or_remove_one).
  """
  dpa = _dpa()
  name = "site_level_event"
  rounds = _check_count(name, "num_rounds", num_rounds)
  sigma = check_noise_multiplier(name, noise_multiplier)
  q = check_rate(name, "sampling_rate", sampling_rate)
  relation = check_relation(name, neighboring_relation)
  if (cohort_size is None) != (num_sites is None):
    raise ValueError(f"{name}: give both num_sites and cohort_size (fixed-size"
                     " cohorts) or neither (Poisson sampling with sampling_rate)")
  k = c = None
  if cohort_size is not None:
    k = _check_count(name, "num_sites", num_sites, 1)
    c = _check_count(name, "cohort_size", cohort_size, 1)
    if c > k:
      raise ValueError(f"{name}: cohort_size={c} > num_sites={k}")
    if q != 1.0:
      raise ValueError(f"{name}: fixed-size cohorts and Poisson sampling_rate cannot be"
                       " combined")
  subsampled = c is not None and c < k
  if relation == REPLACE_ONE and q < 1.0:
    raise ValueError(
        f"{name}: Poisson site sampling (sampling_rate={q} < 1) is accounted under"
        " neighboring_relation='add_or_remove_one' only (dp-accounting's RDP has no"
        " replace-one analysis of Poisson sampling); pass it explicitly")
  if relation == ADD_OR_REMOVE_ONE and subsampled:
    raise ValueError(
        f"{name}: neighboring_relation='add_or_remove_one' has no analysis for fixed-size"
        f" cohorts (C = {c} of K = {k} without replacement: adding a site changes K);"
        " use neighboring_relation='replace_one'")
  if rounds == 0:
    return dpa.NoOpDpEvent()
  if sigma == 0.0:
    return dpa.SelfComposedDpEvent(dpa.NonPrivateDpEvent(), rounds)
  if relation == ADD_OR_REMOVE_ONE:
    return dpa.SelfComposedDpEvent(gaussian_step_event(sigma, q), rounds)
  gaussian = dpa.GaussianDpEvent(sigma / 2.0)
  if subsampled:
    return dpa.SelfComposedDpEvent(dpa.SampledWithoutReplacementDpEvent(k, c, gaussian),
                                   rounds)
  return dpa.SelfComposedDpEvent(gaussian, rounds)


def _cohort_rdp_curve(num_sites: int, cohort_size: int,
                      noise_multiplier: float) -> tuple[np.ndarray, np.ndarray]:
  """(orders, per-round RDP) of a cohort of C < K under replace_one.

  The pointwise minimum over orders of RdpAccountant(REPLACE_ONE)'s curves of
  SampledWithoutReplacement(K, C, Gaussian(sigma / 2)) and of
  Gaussian(sigma / 2): both bound the round's Renyi divergence, the second
  because for each cohort the mechanism is a Gaussian of sensitivity 2C and
  the Renyi divergence of two mixtures with the same weights is at most the
  largest over the components (joint quasi-convexity). Wang et al.'s bound
  alone exceeds the unsampled Gaussian for C close to K (e.g. 240 vs 166 at
  K = 20, C = 19, sigma = 1, 50 rounds, delta 1e-5), which would make a
  smaller cohort cost more privacy than every site.
  """
  return _cohort_rdp_curve_cached(int(num_sites), int(cohort_size), float(noise_multiplier))


@functools.lru_cache(maxsize=64)
def _cohort_rdp_curve_cached(k: int, c: int, sigma: float):
  dpa = _dpa()
  rel = dpa.NeighboringRelation.REPLACE_ONE
  gaussian = dpa.GaussianDpEvent(sigma / 2.0)
  wor = dpa.rdp.RdpAccountant(neighboring_relation=rel).compose(
      dpa.SampledWithoutReplacementDpEvent(k, c, gaussian))
  full = dpa.rdp.RdpAccountant(neighboring_relation=rel).compose(gaussian)
  return wor.orders, np.minimum(wor.rdp, full.rdp)


def _cohort_epsilon(rounds_by_sigma: dict, num_sites: int, cohort_size: int,
                    delta: float) -> float:
  """epsilon of sum over sigma of R_sigma cohort rounds (`_cohort_rdp_curve`), RDP."""
  dpa = _dpa()
  total, orders = None, None
  for sigma, rounds in rounds_by_sigma.items():
    if rounds == 0:
      continue
    if sigma == 0.0:
      return math.inf
    orders, curve = _cohort_rdp_curve(num_sites, cohort_size, sigma)
    total = rounds * curve if total is None else total + rounds * curve
  if total is None:
    return 0.0
  return float(dpa.rdp.rdp_privacy_accountant.compute_epsilon(orders, total, delta)[0])


def _is_cohort(num_sites, cohort_size, relation) -> bool:
  return (relation == REPLACE_ONE and cohort_size is not None and num_sites is not None
          and int(cohort_size) < int(num_sites))


def site_level_epsilon(noise_multiplier: float, num_rounds: int, delta: float, *,
                       sampling_rate: float = 1.0, num_sites: int | None = None,
                       cohort_size: int | None = None,
                       neighboring_relation: str = REPLACE_ONE,
                       accountant: str = "rdp") -> float:
  """epsilon(delta) of `site_level_event(...)` under its own neighbouring relation.

  Cohorts C < K (replace_one, RDP only) compose `_cohort_rdp_curve`, the
  tighter of the subsampled and the unsampled Gaussian's RDP at each order.
  """
  event = site_level_event(noise_multiplier, num_rounds, sampling_rate=sampling_rate,
                           num_sites=num_sites, cohort_size=cohort_size,
                           neighboring_relation=neighboring_relation)
  if _is_cohort(num_sites, cohort_size, neighboring_relation):
    _check_accountant("site_level_epsilon", accountant)
    if accountant != "rdp":
      raise ValueError("site_level_epsilon: fixed-size cohorts (C < K) need accountant='rdp'")
    return _cohort_epsilon({float(noise_multiplier): int(num_rounds)}, num_sites,
                           cohort_size, check_delta("site_level_epsilon", delta))
  return epsilon(event, delta, accountant, neighboring_relation=neighboring_relation)


def neighboring_relation_for(event):
  """REPLACE_ONE for sampling without replacement, ADD_OR_REMOVE_ONE otherwise."""
  dpa = _dpa()
  rel = dpa.NeighboringRelation
  for e in _walk(event):
    if isinstance(e, dpa.SampledWithoutReplacementDpEvent):
      return rel.REPLACE_ONE
  return rel.ADD_OR_REMOVE_ONE


def _walk(event):
  dpa = _dpa()
  yield event
  if isinstance(event, dpa.SelfComposedDpEvent):
    yield from _walk(event.event)
  elif isinstance(event, dpa.ComposedDpEvent):
    for e in event.events:
      yield from _walk(e)
  elif isinstance(event, (dpa.PoissonSampledDpEvent, dpa.SampledWithoutReplacementDpEvent)):
    yield from _walk(event.event)


def make_accountant(accountant: str = "rdp", neighboring_relation=None,
                    pld_discretization: float = 1e-4):
  """A fresh dp-accounting accountant ("rdp" or "pld")."""
  dpa = _dpa()
  _check_accountant("make_accountant", accountant)
  rel = neighboring_relation or dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
  if accountant == "rdp":
    return dpa.rdp.RdpAccountant(neighboring_relation=rel)
  return dpa.pld.PLDAccountant(rel, value_discretization_interval=pld_discretization)


def epsilon(event, delta: float, accountant: str = "rdp",
            pld_discretization: float = 1e-4, neighboring_relation: str | None = None) -> float:
  """epsilon(delta) of `event` from a fresh dp-accounting accountant.

  `neighboring_relation` ("replace_one" or "add_or_remove_one") is the
  relation the event was built for; None infers it from the event
  (`neighboring_relation_for`: replace_one only for sampling without
  replacement). Site-level events carry sigma / 2 under replace_one: pass the
  relation (or use `site_level_epsilon`). Returns inf for a non-private event
  (sigma = 0), 0 for a no-op.
  """
  dpa = _dpa()
  delta = check_delta("epsilon", delta)
  _check_accountant("epsilon", accountant)
  if isinstance(event, dpa.NoOpDpEvent):
    return 0.0
  rel = (neighboring_relation_for(event) if neighboring_relation is None
         else relation_enum(check_relation("epsilon", neighboring_relation)))
  acc = make_accountant(accountant, rel, pld_discretization)
  if not acc.supports(event):
    raise ValueError(f"epsilon: the {accountant!r} accountant does not support {event}"
                     " (sampling without replacement needs accountant='rdp')")
  return float(acc.compose(event).get_epsilon(delta))


# ----------------------------------------------------------------------------- calibration

def calibrate_noise_multiplier(target_epsilon: float, delta: float, *, num_steps: int,
                               sampling_rate: float = 1.0, num_sites: int | None = None,
                               cohort_size: int | None = None, accountant: str = "rdp",
                               neighboring_relation: str | None = None,
                               min_noise_multiplier: float = 0.05,
                               max_noise_multiplier: float = 500.0,
                               tol: float = 1e-4) -> float:
  """The smallest noise multiplier sigma with epsilon(delta) <= target_epsilon.

  Uses `dp_accounting.calibrate_dp_mechanism` (Brent's method) on the event
  `num_steps` x PoissonSampled(q, Gaussian(sigma)) under add/remove-one
  (DP-SGD steps), or, with `neighboring_relation` or `num_sites` and
  `cohort_size`, DP-FedAvg rounds: `site_level_event(sigma, num_steps, ...)`
  under that relation (default "replace_one", as `SiteLevelAccountant`).

  Args:
    target_epsilon: > 0.
    delta: in (0, 1).
    num_steps: compositions (local steps x rounds for DP-SGD; rounds for DP-FedAvg).
    sampling_rate: Poisson sampling probability q in (0, 1].
    num_sites, cohort_size: fixed-size cohort sampling instead of Poisson.
    accountant: "rdp" (default) or "pld" (tighter, much slower).
    neighboring_relation: site level: "replace_one" or "add_or_remove_one".
    min_noise_multiplier, max_noise_multiplier: the bracket searched.
    tol: tolerance on sigma.

  Raises:
    ValueError: bad arguments, or an epsilon target not reachable with
      sigma <= max_noise_multiplier (the message gives the epsilon there).
  """
  dpa = _dpa()
  name = "calibrate_noise_multiplier"
  try:
    eps = float(target_epsilon)
  except (TypeError, ValueError):
    raise ValueError(f"{name}: target_epsilon must be a number > 0, got"
                     f" {target_epsilon!r}") from None
  if not eps > 0.0 or math.isinf(eps):
    raise ValueError(f"{name}: target_epsilon must be a finite number > 0, got"
                     f" {target_epsilon!r}")
  delta = check_delta(name, delta)
  steps = _check_count(name, "num_steps", num_steps, 1)
  q = check_rate(name, "sampling_rate", sampling_rate)
  _check_accountant(name, accountant)
  lo, hi = float(min_noise_multiplier), float(max_noise_multiplier)
  if not 0.0 < lo < hi:
    raise ValueError(f"{name}: need 0 < min_noise_multiplier < max_noise_multiplier, got"
                     f" {lo}, {hi}")

  site_level = not (num_sites is None and cohort_size is None and neighboring_relation is None)
  relation = check_relation(name, neighboring_relation or REPLACE_ONE) if site_level \
      else ADD_OR_REMOVE_ONE

  def make_event(sigma):
    if not site_level:
      return dpa.SelfComposedDpEvent(gaussian_step_event(sigma, q), steps)
    return site_level_event(sigma, steps, sampling_rate=q, num_sites=num_sites,
                            cohort_size=cohort_size, neighboring_relation=relation)

  def fresh():
    return make_accountant(accountant, relation_enum(relation))

  make_event(hi)  # raises for a mode the relation has no analysis of

  if site_level and _is_cohort(num_sites, cohort_size, relation):
    return _bisect_sigma(
        lambda sigma: site_level_epsilon(sigma, steps, delta, num_sites=num_sites,
                                         cohort_size=cohort_size, accountant=accountant),
        eps, lo, hi, tol, name, f"{steps} rounds with cohorts of {cohort_size} of {num_sites}")
  eps_hi = epsilon(make_event(hi), delta, accountant, neighboring_relation=relation)
  if eps_hi > eps:
    raise ValueError(
        f"{name}: target epsilon {eps} at delta {delta} is unreachable: even noise"
        f" multiplier {hi} gives epsilon {eps_hi:.4g} over {steps} steps with sampling"
        f" rate {q}; raise max_noise_multiplier, the sampling rate's denominator"
        " (more rows / sites), or lower the number of steps")
  eps_lo = epsilon(make_event(lo), delta, accountant, neighboring_relation=relation)
  if eps_lo <= eps:
    return lo
  sigma = dpa.calibrate_dp_mechanism(
      fresh, make_event, eps, delta,
      bracket_interval=dpa.ExplicitBracketInterval(lo, hi), tol=tol)
  # calibrate_dp_mechanism guarantees epsilon(sigma) <= target (it falls back to a
  # bisection that keeps the non-positive side when Brent's root overshoots).
  return float(sigma)


def _bisect_sigma(eps_of, target: float, lo: float, hi: float, tol: float, name: str,
                  what: str) -> float:
  """Smallest sigma in [lo, hi] (within tol) with eps_of(sigma) <= target (bisection;
  eps_of decreasing), keeping the side that meets the target."""
  eps_hi = eps_of(hi)
  if eps_hi > target:
    raise ValueError(f"{name}: target epsilon {target} is unreachable: even noise multiplier"
                     f" {hi} gives epsilon {eps_hi:.4g} over {what}; raise"
                     " max_noise_multiplier or lower the number of rounds")
  if eps_of(lo) <= target:
    return lo
  while hi - lo > tol:
    mid = 0.5 * (lo + hi)
    if eps_of(mid) <= target:
      hi = mid
    else:
      lo = mid
  return float(hi)


# ----------------------------------------------------------------------------- ledgers

def sampling_rates(num_examples: Sequence[int] | np.ndarray, *,
                   expected_batch_size: float | None = None,
                   sampling_rate: float | None = None) -> np.ndarray:
  """Per-site Poisson rates q_k, `[K]` float64 (the host twin of dp_sgd's).

  expected_batch_size b: q_k = min(1, b / n_k) (each site's own epsilon);
  sampling_rate q: q_k = q for every site (the same epsilon for every site
  with the same number of steps). An empty site gets q_k = 0.
  """
  n = np.asarray(num_examples, dtype=np.float64)
  if (expected_batch_size is None) == (sampling_rate is None):
    raise ValueError("sampling_rates: give exactly one of expected_batch_size and"
                     " sampling_rate")
  if sampling_rate is not None:
    q = check_rate("sampling_rates", "sampling_rate", sampling_rate)
    return np.where(n > 0, q, 0.0)
  b = float(expected_batch_size)
  if not b > 0:
    raise ValueError(f"sampling_rates: expected_batch_size must be > 0, got {b}")
  return np.where(n > 0, np.minimum(1.0, b / np.maximum(n, 1.0)), 0.0)


@functools.lru_cache(maxsize=256)
def _rdp_step_curve(noise_multiplier: float, sampling_rate: float) -> tuple[np.ndarray, np.ndarray]:
  """(orders, RDP of one PoissonSampled(q, Gaussian(sigma)) step) from RdpAccountant."""
  acc = make_accountant("rdp").compose(gaussian_step_event(noise_multiplier, sampling_rate))
  return acc.orders, acc.rdp


def _rdp_epsilon(steps: tuple, delta: float) -> float:
  """epsilon of sum over ((sigma, q), T) of T steps, via cached one-step RDP curves."""
  dpa = _dpa()
  if not steps:
    return 0.0
  total = None
  for (sigma, q), count in steps:
    orders, curve = _rdp_step_curve(float(sigma), float(q))
    total = count * curve if total is None else total + count * curve
  return float(dpa.rdp.rdp_privacy_accountant.compute_epsilon(orders, total, delta)[0])


class PatientLevelAccountant:
  """Per-site epsilon of patient-level DP-SGD, updated after every round.

  Keeps, for every site k, the list of (sigma, q_k, steps) it has run and
  reports epsilon_k(delta) from a dp-accounting accountant on the composed
  event. Use it as `fm.run_rounds(..., callback=accountant)`, or call
  `observe(state, metrics)` after each `algo.round`.

  Args:
    num_examples: n_k, `[K]`.
    delta: target delta in (0, 1) (the same for every site).
    expected_batch_size / sampling_rate: as given to `dp_sgd` (one of them).
    accountant: "rdp" or "pld".
    site_names: optional names for `report()`.
  """

  def __init__(self, num_examples, delta: float, *, expected_batch_size=None,
               sampling_rate=None, accountant: str = "rdp", site_names=None):
    self.num_examples = np.asarray(num_examples, dtype=np.int64)
    self.delta = check_delta("PatientLevelAccountant", delta)
    self.accountant = _check_accountant("PatientLevelAccountant", accountant)
    self._expected_batch_size = expected_batch_size
    self._sampling_rate = sampling_rate
    self.rates = sampling_rates(self.num_examples, expected_batch_size=expected_batch_size,
                                sampling_rate=sampling_rate)
    k = self.num_examples.shape[0]
    self.site_names = tuple(site_names) if site_names is not None else tuple(
        f"site {i}" for i in range(k))
    # per site: {(sigma, q): steps}
    self._steps: list[dict[tuple[float, float], int]] = [dict() for _ in range(k)]
    self.history: list[np.ndarray] = []
    self.neighboring_relation = ADD_OR_REMOVE_ONE  # one patient of site k

  def add_steps(self, site: int, noise_multiplier: float, steps: int,
                sampling_rate: float | None = None) -> None:
    """Records `steps` DP-SGD steps of site `site` with noise multiplier sigma."""
    q = float(self.rates[site] if sampling_rate is None else sampling_rate)
    if steps <= 0 or q == 0.0:
      return
    key = (float(noise_multiplier), q)
    self._steps[site][key] = self._steps[site].get(key, 0) + int(steps)

  def check_num_examples(self, cohort: np.ndarray, num_examples: np.ndarray) -> None:
    """Raises ValueError unless the round's n_k equal the accountant's (q_k = b / n_k)."""
    k = self.num_examples.shape[0]
    bad = [int(p) for p in cohort if not 0 <= int(p) < k]
    if bad:
      raise ValueError(f"PatientLevelAccountant: built for {k} sites (num_examples has"
                       f" {k} entries) but the round trained site positions {bad}")
    for pos, n in zip(cohort, num_examples):
      if int(n) != int(self.num_examples[int(pos)]):
        raise ValueError(
            f"PatientLevelAccountant: site {int(pos)} ({self.site_names[int(pos)]}) was"
            f" given n_k = {int(self.num_examples[int(pos)])} but the round's data has"
            f" {int(n)} real rows; its sampling rate q_k and epsilon would be wrong. Build"
            f" the accountant with the num_examples of the data the algorithm trains on")

  def observe(self, state, metrics: dict) -> np.ndarray:
    """Records one round from its metrics (client_steps, cohort, num_examples)
    and the state's noise multiplier (and expected batch size / sampling rate
    if traced); returns epsilon_k for every site `[K]`.

    Raises ValueError when the round's n_k (metrics["num_examples"], the real
    rows of each trained site) differ from the accountant's."""
    if "num_examples" not in metrics:
      raise ValueError("PatientLevelAccountant: the round metrics lack 'num_examples'"
                       " (n_k of the trained sites), needed to check the accountant's n_k"
                       " against the data")
    hparams = getattr(state, "hparams", state)
    sigma = float(np.asarray(hparams["noise_multiplier"]))
    rates = self.rates
    if "expected_batch_size" in hparams:
      rates = sampling_rates(self.num_examples,
                             expected_batch_size=float(np.asarray(hparams["expected_batch_size"])))
    elif "sampling_rate" in hparams:
      rates = sampling_rates(self.num_examples,
                             sampling_rate=float(np.asarray(hparams["sampling_rate"])))
    steps = np.asarray(metrics["client_steps"]).reshape(-1)
    cohort = np.asarray(metrics.get("cohort", np.arange(steps.shape[0]))).reshape(-1)
    self.check_num_examples(cohort, np.asarray(metrics["num_examples"]).reshape(-1))
    for pos, s in zip(cohort, steps):
      self.add_steps(int(pos), sigma, int(s), float(rates[int(pos)]))
    eps = self.epsilons()
    self.history.append(eps)
    return eps

  def __call__(self, round_index, state, metrics) -> None:
    """`run_rounds` callback."""
    del round_index
    self.observe(state, metrics)

  def event(self, site: int):
    """The composed DpEvent of site `site` so far."""
    dpa = _dpa()
    parts = [dp_sgd_event(sigma, q, steps) for (sigma, q), steps in self._steps[site].items()]
    if not parts:
      return dpa.NoOpDpEvent()
    return parts[0] if len(parts) == 1 else dpa.ComposedDpEvent(parts)

  def epsilons(self) -> np.ndarray:
    """epsilon_k(delta) for every site, `[K]` float64.

    "pld": a fresh PLD accountant on `event(k)`. "rdp": the same value
    computed faster: the RDP curve of one step is computed once per (sigma,
    q) by `RdpAccountant().compose(step)` and composed T_k times the way
    RdpAccountant composes a SelfComposedDpEvent (RDP curves add), then
    converted with dp-accounting's `compute_epsilon`; tested equal to
    `epsilon(event(k), delta, "rdp")`.
    """
    if self.accountant == "pld":
      return np.array([epsilon(self.event(k), self.delta, "pld")
                       for k in range(len(self._steps))])
    return np.array([_rdp_epsilon(tuple(self._steps[k].items()), self.delta)
                     for k in range(len(self._steps))])

  def report(self) -> dict[str, float]:
    eps = self.epsilons()
    return {**{name: float(e) for name, e in zip(self.site_names, eps)},
            "max": float(np.max(eps))}


class SiteLevelAccountant:
  """epsilon(delta) of site-level DP-FedAvg after every round, with its relation.

  Every site gets the same guarantee (the mechanism treats sites alike).
  Args: delta; sampling_rate q of Poisson site sampling (1 = every site
  every round) or num_sites + cohort_size for fixed-size cohorts; accountant;
  neighboring_relation: "replace_one" (default, every mode but Poisson
  sampling) or "add_or_remove_one" (every mode but cohorts C < K); see
  `site_level_event`. `report()` returns the epsilon with its delta and
  relation. The noise multiplier of each round is read from the metrics
  ("dp_noise_multiplier", reported by `gaussian_sum_mean`) or given to
  `add_rounds`.
  """

  def __init__(self, delta: float, *, sampling_rate: float = 1.0,
               num_sites: int | None = None, cohort_size: int | None = None,
               accountant: str = "rdp", neighboring_relation: str = REPLACE_ONE):
    name = "SiteLevelAccountant"
    self.delta = check_delta(name, delta)
    self.sampling_rate = check_rate(name, "sampling_rate", sampling_rate)
    self.num_sites, self.cohort_size = num_sites, cohort_size
    self.accountant = _check_accountant(name, accountant)
    self.neighboring_relation = check_relation(name, neighboring_relation)
    self._event_for(1.0, 1)  # raises now for a mode the relation has no analysis of
    self._rounds: dict[float, int] = {}
    self.history: list[float] = []

  def _event_for(self, sigma: float, rounds: int):
    return site_level_event(sigma, rounds, sampling_rate=self.sampling_rate,
                            num_sites=self.num_sites, cohort_size=self.cohort_size,
                            neighboring_relation=self.neighboring_relation)

  def add_rounds(self, noise_multiplier: float, rounds: int = 1) -> None:
    sigma = check_noise_multiplier("SiteLevelAccountant", noise_multiplier)
    self._rounds[sigma] = self._rounds.get(sigma, 0) + int(rounds)

  def observe(self, state, metrics: dict) -> float:
    del state
    self.add_rounds(float(np.asarray(metrics["dp_noise_multiplier"])))
    eps = self.epsilon()
    self.history.append(eps)
    return eps

  def __call__(self, round_index, state, metrics) -> None:
    del round_index
    self.observe(state, metrics)

  def event(self):
    dpa = _dpa()
    parts = [self._event_for(sigma, rounds) for sigma, rounds in self._rounds.items()]
    if not parts:
      return dpa.NoOpDpEvent()
    return parts[0] if len(parts) == 1 else dpa.ComposedDpEvent(parts)

  def epsilon(self) -> float:
    """epsilon(delta) under `neighboring_relation` (cohorts C < K: `site_level_epsilon`)."""
    if _is_cohort(self.num_sites, self.cohort_size, self.neighboring_relation):
      if self.accountant != "rdp":
        raise ValueError("SiteLevelAccountant: fixed-size cohorts (C < K) need"
                         " accountant='rdp'")
      return _cohort_epsilon(self._rounds, self.num_sites, self.cohort_size, self.delta)
    return epsilon(self.event(), self.delta, self.accountant,
                   neighboring_relation=self.neighboring_relation)

  def report(self) -> dict:
    """{"epsilon", "delta", "neighboring_relation", "accountant"}."""
    return {"epsilon": self.epsilon(), "delta": self.delta,
            "neighboring_relation": self.neighboring_relation,
            "accountant": self.accountant}


def epsilon_curve(events: Iterable, delta: float, accountant: str = "rdp") -> np.ndarray:
  """epsilon(delta) of each event in `events` (e.g. one per round)."""
  return np.array([epsilon(e, delta, accountant) for e in events])


__all__ = ["ACCOUNTANTS", "RELATIONS", "REPLACE_ONE", "ADD_OR_REMOVE_ONE", "check_relation",
           "relation_enum", "site_level_epsilon", "check_delta", "check_clip_norm",
           "check_noise_multiplier",
           "check_rate", "gaussian_step_event", "dp_sgd_event", "site_level_event",
           "neighboring_relation_for", "make_accountant", "epsilon",
           "calibrate_noise_multiplier", "sampling_rates", "PatientLevelAccountant",
           "SiteLevelAccountant", "epsilon_curve"]
