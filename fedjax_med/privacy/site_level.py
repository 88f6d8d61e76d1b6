"""Site-level differential privacy: DP-FedAvg (McMahan, Ramage, Talwar & Zhang, ICLR 2018).

The unit of privacy is a whole site (hospital): the released global model
barely changes whether any one site took part or not. Each round, as links
of the core aggregation chain (all inside the jit-compiled round):

    poisson_site_sampling(q)   optional: site k takes part with probability q
    clip_updates(C)            Delta~_k = Delta_k * min(1, C / ||Delta_k||_2)
    gaussian_sum_mean(sigma, C, W)
                               Delta = (sum_{k sampled} Delta~_k + N(0, (sigma C)^2 I)) / W

with W a *fixed* public denominator: the expected number of participating
sites (q K with Poisson sampling, C for a fixed cohort of C sites, K when
every site takes part). This is McMahan et al.'s unweighted estimator
f~_f with w_k = 1: adding or removing one site moves the noised sum by at most
C, so sigma C of noise gives the Gaussian mechanism with noise multiplier
sigma relative to that sensitivity.

Why not weight by n_k: the weighted mean sum_k (n_k / n) Delta~_k has
sensitivity max_k (n_k / n) C only if n is fixed and public; but n = sum_k n_k
changes when a site joins or leaves, which rescales *every other* site's
weight, so one site moves the aggregate by up to C + sum_{j != k} |p_j - p'_j| C
(unbounded relative to the noise), and a site can claim a large n_k to
dominate. Dividing the plain sum by a constant keeps the per-site
contribution at most C / W. (McMahan et al. allow capped weights
w_k = min(n_k / w^, 1) with a public cap; w_k = 1 is the special case kept here.)

Accounting (`accounting.site_level_event`, `SiteLevelAccountant`), always
reported with its neighbouring relation. Default "replace_one" (one site's
data replaced, K public, as dp_fedavg enforces; the sum moves by up to 2C):
every site every round is R x Gaussian(sigma / 2), fixed-size cohorts of
C < K are R x SampledWithoutReplacement(K, C, Gaussian(sigma / 2)) (RDP,
never above the C = K value). "add_or_remove_one" (the sum moves by up to
C): R x Gaussian(sigma), or R x PoissonSampled(q, Gaussian(sigma)) with
Poisson site sampling; it has no analysis of fixed-size cohorts.

Threat model (trusted aggregator): the SERVER clips and adds the noise, so
it sees every site's update before noise (clipped or not) and is NOT
covered by epsilon; epsilon bounds what everyone who sees only the noised
aggregate and the models (other sites, model users, an outside observer)
can learn about any one site's data. Removing that trust needs secure
aggregation plus distributed noise added by the sites (not done here).
n_k and participation are public. With K = 4 hospitals the noise
needed for a small epsilon is of the order of the signal: site-level DP
needs many sites.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_med.core.aggregation import Aggregator, ClientTransform, chain
from fedjax_med.core import state as state_lib
from fedjax_med.core.options import OptionError
from fedjax_med.privacy import accounting
from fedjax_med.privacy.patient_level import gaussian_noise_like
from fedjax_med.aggregators.robust import norm_bound


def clip_updates(clip_norm: float) -> ClientTransform:
  """Clips every site's update to L2 norm <= C (norm taken over the whole pytree).

  The robust layer's clipping link (`aggregators.robust.norm_bound`) under
  DP's names. State: {"clip_norm": float32} (traced; `fm.set_hyperparams(
  state, aggregator={"clip_norm": ...})`). Metrics: dp_clipped_fraction
  (share of the participating sites whose update was clipped).
  """
  c = accounting.check_clip_norm("clip_updates", clip_norm)
  return norm_bound(c, "clip_updates", hparam="clip_norm", metric="dp_clipped_fraction",
                    as_fraction=True)


def poisson_site_sampling(sampling_rate: float) -> ClientTransform:
  """Each site takes part independently with probability q (Poisson sampling).

  A site left out gets weight 0 (its update is discarded before clipping and
  noise). Draws use `fold_in(key, position)`, so they are independent across
  sites and, through the round's key, across rounds. State: {"sampling_rate"}.
  Metrics: dp_sampled [C] bool (diagnostic; the realised participants are
  not covered by the DP guarantee if released).
  """
  q = accounting.check_rate("poisson_site_sampling", "sampling_rate", sampling_rate)

  def init(update_template, num_sites=None):
    del update_template, num_sites
    return {"sampling_rate": jnp.asarray(q, jnp.float32)}

  def apply(updates, weights, state, key, context):
    u = jax.vmap(lambda p: jax.random.uniform(jax.random.fold_in(key, p)))(
        context.positions.astype(jnp.uint32))
    sampled = u < state["sampling_rate"]
    return updates, jnp.where(sampled, weights, 0.0), state, {"dp_sampled": sampled}

  return ClientTransform(init, apply)


def gaussian_sum_mean(noise_multiplier: float, clip_norm: float,
                      denominator: float) -> Aggregator:
  """(sum_{k: w_k > 0} u_k + N(0, (sigma C)^2 I)) / W, W fixed (reducer).

  The weights only select who counts (w_k > 0); the sum is unweighted. Noise
  comes from the reducer's key (split from the round's server key), so it is
  fresh every round.

  Args:
    noise_multiplier: sigma >= 0.
    clip_norm: C > 0, the bound the preceding `clip_updates` enforces.
    denominator: W > 0, the public expected number of participating sites.

  State: {"noise_multiplier", "clip_norm", "denominator"} float32, traced.
  Metrics: dp_noise_multiplier, dp_noise_stddev (of the mean: sigma C / W).
  """
  name = "gaussian_sum_mean"
  sigma = accounting.check_noise_multiplier(name, noise_multiplier)
  c = accounting.check_clip_norm(name, clip_norm)
  try:
    w = float(denominator)
  except (TypeError, ValueError):
    raise OptionError(f"{name}: denominator must be a number > 0, got {denominator!r}") from None
  if not w > 0 or w == float("inf"):
    raise OptionError(f"{name}: denominator must be a finite number > 0, got {denominator!r}")

  def init(update_template, num_sites=None):
    del update_template, num_sites
    return {"noise_multiplier": jnp.asarray(sigma, jnp.float32),
            "clip_norm": jnp.asarray(c, jnp.float32),
            "denominator": jnp.asarray(w, jnp.float32)}

  def aggregate(updates, weights, state, key, context):
    del context
    included = (weights > 0).astype(jnp.float32)
    total = jax.tree_util.tree_map(
        lambda u: jnp.tensordot(included.astype(u.dtype), u, axes=(0, 0)), updates)
    std = state["noise_multiplier"] * state["clip_norm"]
    noise = gaussian_noise_like(key, total, std)
    mean = jax.tree_util.tree_map(lambda s, z: (s + z) / state["denominator"].astype(s.dtype),
                                  total, noise)
    return mean, state, {"dp_noise_multiplier": state["noise_multiplier"],
                         "dp_noise_stddev": std / state["denominator"]}

  return Aggregator(init, aggregate)


def site_level_dp(clip_norm: float, noise_multiplier: float, *, expected_sites: float,
                  sampling_rate: float | None = None, pre: tuple = ()) -> Aggregator:
  """The DP-FedAvg aggregation chain: `[sampling ->] [pre ->] clip -> noisy sum / W`.

  Args:
    clip_norm: C > 0.
    noise_multiplier: sigma >= 0.
    expected_sites: W, the public expected number of participating sites (q K
      with Poisson sampling, the cohort size with `cohort_size`, else K).
    sampling_rate: optional Poisson site sampling rate q (None: no extra sampling).
    pre: extra ClientTransforms to run before clipping (e.g.
      `robust.reject_nonfinite()`).
  """
  links = []
  if sampling_rate is not None:
    links.append(poisson_site_sampling(sampling_rate))
  links += list(pre)
  links += [clip_updates(clip_norm), gaussian_sum_mean(noise_multiplier, clip_norm,
                                                       expected_sites)]
  return chain(*links)


# `fm.set_hyperparams(state, aggregator={...})` calls this; re-exported for 0.1 code.
set_aggregator_hparams = state_lib.set_aggregator_hparams


__all__ = ["clip_updates", "poisson_site_sampling", "gaussian_sum_mean", "site_level_dp",
           "set_aggregator_hparams"]
