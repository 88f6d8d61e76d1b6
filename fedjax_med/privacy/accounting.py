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
  N(0, (sigma C)^2 I) to the sum of the clipped site updates. With every site
  in every round, or Poisson sampling of sites with rate q
  (`poisson_site_sampling`), a round is `PoissonSampledDpEvent(q,
  GaussianDpEvent(sigma))` (q = 1: `GaussianDpEvent(sigma)`), neighbours
  differ by one whole site (add/remove). With the algorithms' fixed-size
  cohorts (`cohort_size=C` of K, uniformly without replacement) a round is
  `SampledWithoutReplacementDpEvent(K, C, GaussianDpEvent(sigma / 2))` under
  `REPLACE_ONE` (Wang, Balle & Kasiviswanathan 2019): replacing one site moves
  the clipped sum by up to 2C, so the noise multiplier relative to that
  sensitivity is sigma / 2. Only the RDP accountant supports this event.

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
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name}: noise_multiplier must be a number >= 0, got {value!r}") from None
  if not v >= 0.0 or math.isinf(v):
    raise ValueError(f"{name}: noise_multiplier must be a finite number >= 0, got {value!r}")
  return v


def check_clip_norm(name: str, value: Any) -> float:
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name}: clip_norm must be a number > 0, got {value!r}") from None
  if not v > 0.0 or math.isinf(v):
    raise ValueError(f"{name}: clip_norm must be a finite number > 0, got {value!r}")
  return v


def check_rate(name: str, field: str, value: Any) -> float:
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
                     num_sites: int | None = None, cohort_size: int | None = None):
  """The DpEvent of `num_rounds` rounds of DP-FedAvg (site-level DP).

  Args:
    noise_multiplier: sigma; the sum of clipped updates gets N(0, (sigma C)^2 I).
    num_rounds: rounds run.
    sampling_rate: Poisson rate q of `poisson_site_sampling` (1: every site,
      every round).
    num_sites, cohort_size: instead of Poisson sampling, the algorithms'
      fixed-size cohort of C sites out of K drawn without replacement; the
      event is then `SampledWithoutReplacementDpEvent(K, C, Gaussian(sigma/2))`
      under REPLACE_ONE (see module docstring; RDP accountant only).
  """
  dpa = _dpa()
  rounds = _check_count("site_level_event", "num_rounds", num_rounds)
  sigma = check_noise_multiplier("site_level_event", noise_multiplier)
  if rounds == 0:
    return dpa.NoOpDpEvent()
  if cohort_size is None and num_sites is None:
    return dpa.SelfComposedDpEvent(gaussian_step_event(sigma, sampling_rate), rounds)
  if cohort_size is None or num_sites is None:
    raise ValueError("site_level_event: give both num_sites and cohort_size (fixed-size"
                     " cohorts) or neither (Poisson sampling with sampling_rate)")
  k = _check_count("site_level_event", "num_sites", num_sites, 1)
  c = _check_count("site_level_event", "cohort_size", cohort_size, 1)
  if c > k:
    raise ValueError(f"site_level_event: cohort_size={c} > num_sites={k}")
  if sampling_rate != 1.0:
    raise ValueError("site_level_event: fixed-size cohorts and Poisson sampling_rate"
                     " cannot be combined")
  if sigma == 0.0:
    return dpa.SelfComposedDpEvent(dpa.NonPrivateDpEvent(), rounds)
  if c == k:
    return dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(sigma), rounds)
  return dpa.SelfComposedDpEvent(
      dpa.SampledWithoutReplacementDpEvent(k, c, dpa.GaussianDpEvent(sigma / 2.0)), rounds)


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
            pld_discretization: float = 1e-4) -> float:
  """epsilon(delta) of `event` from a fresh dp-accounting accountant.

  Returns inf for a non-private event (sigma = 0), 0 for a no-op.
  """
  dpa = _dpa()
  delta = check_delta("epsilon", delta)
  _check_accountant("epsilon", accountant)
  if isinstance(event, dpa.NoOpDpEvent):
    return 0.0
  acc = make_accountant(accountant, neighboring_relation_for(event), pld_discretization)
  if not acc.supports(event):
    raise ValueError(f"epsilon: the {accountant!r} accountant does not support {event}"
                     " (sampling without replacement needs accountant='rdp')")
  return float(acc.compose(event).get_epsilon(delta))


# ----------------------------------------------------------------------------- calibration

def calibrate_noise_multiplier(target_epsilon: float, delta: float, *, num_steps: int,
                               sampling_rate: float = 1.0, num_sites: int | None = None,
                               cohort_size: int | None = None, accountant: str = "rdp",
                               min_noise_multiplier: float = 0.05,
                               max_noise_multiplier: float = 500.0,
                               tol: float = 1e-4) -> float:
  """The smallest noise multiplier sigma with epsilon(delta) <= target_epsilon.

  Uses `dp_accounting.calibrate_dp_mechanism` (Brent's method) on the event
  `num_steps` x PoissonSampled(q, Gaussian(sigma)) (DP-SGD steps, or
  DP-FedAvg rounds), or, with `num_sites` and `cohort_size`, fixed-size
  cohorts (see `site_level_event`).

  Args:
    target_epsilon: > 0.
    delta: in (0, 1).
    num_steps: compositions (local steps x rounds for DP-SGD; rounds for DP-FedAvg).
    sampling_rate: Poisson sampling probability q in (0, 1].
    num_sites, cohort_size: fixed-size cohort sampling instead of Poisson.
    accountant: "rdp" (default) or "pld" (tighter, much slower).
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

  def make_event(sigma):
    if num_sites is None and cohort_size is None:
      return dpa.SelfComposedDpEvent(gaussian_step_event(sigma, q), steps)
    return site_level_event(sigma, steps, num_sites=num_sites, cohort_size=cohort_size)

  def fresh():
    return make_accountant(accountant, neighboring_relation_for(make_event(hi)))

  eps_hi = epsilon(make_event(hi), delta, accountant)
  if eps_hi > eps:
    raise ValueError(
        f"{name}: target epsilon {eps} at delta {delta} is unreachable: even noise"
        f" multiplier {hi} gives epsilon {eps_hi:.4g} over {steps} steps with sampling"
        f" rate {q}; raise max_noise_multiplier, the sampling rate's denominator"
        " (more rows / sites), or lower the number of steps")
  eps_lo = epsilon(make_event(lo), delta, accountant)
  if eps_lo <= eps:
    return lo
  sigma = dpa.calibrate_dp_mechanism(
      fresh, make_event, eps, delta,
      bracket_interval=dpa.ExplicitBracketInterval(lo, hi), tol=tol)
  # calibrate_dp_mechanism guarantees epsilon(sigma) <= target (it falls back to a
  # bisection that keeps the non-positive side when Brent's root overshoots).
  return float(sigma)


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

  def add_steps(self, site: int, noise_multiplier: float, steps: int,
                sampling_rate: float | None = None) -> None:
    """Records `steps` DP-SGD steps of site `site` with noise multiplier sigma."""
    q = float(self.rates[site] if sampling_rate is None else sampling_rate)
    if steps <= 0 or q == 0.0:
      return
    key = (float(noise_multiplier), q)
    self._steps[site][key] = self._steps[site].get(key, 0) + int(steps)

  def observe(self, state, metrics: dict) -> np.ndarray:
    """Records one round from its metrics (client_steps, cohort) and the state's
    noise multiplier (and expected batch size / sampling rate if traced);
    returns epsilon_k for every site `[K]`."""
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
  """epsilon(delta) of site-level DP-FedAvg after every round.

  Every site gets the same guarantee (the mechanism treats sites alike).
  Args: delta; sampling_rate q of Poisson site sampling (1 = every site
  every round) or num_sites + cohort_size for fixed-size cohorts; accountant.
  The noise multiplier of each round is read from the metrics
  ("dp_noise_multiplier", reported by `gaussian_sum_mean`) or given to
  `add_rounds`.
  """

  def __init__(self, delta: float, *, sampling_rate: float = 1.0,
               num_sites: int | None = None, cohort_size: int | None = None,
               accountant: str = "rdp"):
    self.delta = check_delta("SiteLevelAccountant", delta)
    self.sampling_rate = check_rate("SiteLevelAccountant", "sampling_rate", sampling_rate)
    self.num_sites, self.cohort_size = num_sites, cohort_size
    self.accountant = _check_accountant("SiteLevelAccountant", accountant)
    self._rounds: dict[float, int] = {}
    self.history: list[float] = []

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
    parts = [site_level_event(sigma, rounds, sampling_rate=self.sampling_rate,
                              num_sites=self.num_sites, cohort_size=self.cohort_size)
             for sigma, rounds in self._rounds.items()]
    if not parts:
      return dpa.NoOpDpEvent()
    return parts[0] if len(parts) == 1 else dpa.ComposedDpEvent(parts)

  def epsilon(self) -> float:
    return epsilon(self.event(), self.delta, self.accountant)


def epsilon_curve(events: Iterable, delta: float, accountant: str = "rdp") -> np.ndarray:
  """epsilon(delta) of each event in `events` (e.g. one per round)."""
  return np.array([epsilon(e, delta, accountant) for e in events])


__all__ = ["ACCOUNTANTS", "check_delta", "check_clip_norm", "check_noise_multiplier",
           "check_rate", "gaussian_step_event", "dp_sgd_event", "site_level_event",
           "neighboring_relation_for", "make_accountant", "epsilon",
           "calibrate_noise_multiplier", "sampling_rates", "PatientLevelAccountant",
           "SiteLevelAccountant", "epsilon_curve"]
