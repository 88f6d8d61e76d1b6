"""Client sampling: which sites take part in a round, and with what weight.

A round may train only a cohort of C of the K sites. The cohort is drawn from
`fold_in(round_key, SAMPLING_STREAM)`, the round gathers the cohort's rows and
client states (`x[idx]`, ...) and vmaps over C, so its cost follows the cohort,
not K; only participants' client states change.

With p_k = w_k / sum_j w_j the full-participation weights (n_k / n, or 1 / K'
over the K' non-empty sites for `weighting="uniform"`) and Delta_k the site
updates, the schemes and what their aggregate estimates:

* `sampling="uniform"` (default): C distinct sites S, uniformly without
  replacement (McMahan et al. 2017); the aggregate is the mean over the cohort
  with the weights renormalised over it, sum_{k in S} w_k Delta_k / sum_{k in S} w_k.
  **Biased** for sum_k p_k Delta_k when the w_k differ: a small site drawn
  with a large one gets more than its share (exact enumeration over the
  heart-disease sizes 199/172/30/85 with C = 2: the smallest site's expected
  coefficient is 0.090 instead of p_3 = 0.062, the largest's 0.351 instead
  of 0.409). It is unbiased for weighting="uniform" with no empty site.
* `sampling="uniform_unbiased"`: the same cohort draw, aggregated as Li, Huang,
  Yang, Wang & Zhang (ICLR 2020, "On the convergence of FedAvg on non-IID
  data", sampling scheme II): sum_{k in S} p_k (K / C) Delta_k. Each site is
  in S with probability C / K, so E[aggregate] = sum_k p_k Delta_k exactly.
  The weights no longer sum to 1 (the round's `update_scale` is
  (K / C) sum_{k in S} p_k); implemented as the renormalised mean times that
  scale (`AggregationContext.update_scale`), which is the scheme exactly for
  the linear (default) aggregator; a non-linear reduction's output is scaled
  by the same factor.
* `sampling="num_examples"`: C draws with replacement, site k with
  probability n_k / n, and each draw weighted 1/C (Li et al., FedProx, 2020,
  sampling scheme I): **unbiased** for sum_k (n_k/n) Delta_k. A site drawn
  twice counts twice (its two copies see the same key, so they agree).
  Requires `weighting="num_examples"`.

A cohort in which no site holds data aggregates nothing: the round leaves
the model and the server optimizer's state unchanged (no zero step through a
stateful server optimizer such as FedAdam).

Tests: tests/test_cohort.py enumerates every cohort exactly (float64) for
each scheme's expectation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_med.core import aggregation as agg
from fedjax_med.core.options import OptionError, check_choice, check_positive_int
from fedjax_med.core.streams import SAMPLING_STREAM  # noqa: F401 (re-exported)

SAMPLINGS = ("uniform", "uniform_unbiased", "num_examples")


@dataclasses.dataclass(frozen=True)
class CohortSpec:
  """Static cohort options: size None = every site, every round."""
  size: int | None = None
  sampling: str = "uniform"
  weighting: str = "num_examples"


def make_cohort_spec(name: str, cohort_size: int | None, sampling: str,
                     weighting: str) -> CohortSpec:
  """Checked static cohort options (OptionError on a bad one): `cohort_size` None
  (every site) or >= 1, a known `sampling` and `weighting`, and
  sampling="num_examples" only with weighting="num_examples"."""
  check_choice(name, "weighting", weighting, agg.WEIGHTINGS)
  check_choice(name, "sampling", sampling, SAMPLINGS)
  if cohort_size is not None:
    check_positive_int(name, "cohort_size", cohort_size)
  if sampling == "num_examples" and weighting != "num_examples":
    raise OptionError(
        f"{name}: sampling='num_examples' already weights sites by n_k; it needs"
        f" weighting='num_examples', got {weighting!r}")
  return CohortSpec(None if cohort_size is None else int(cohort_size), sampling, weighting)


class Cohort(NamedTuple):
  """One round's participants: their positions, rows, client states and weights."""
  indices: jax.Array | None  # [C] positions in the K sites, None = all sites
  data: Any                  # FederatedData restricted to the cohort
  client_states: Any         # client states of the cohort ([C, ...] leaves)
  weights: jax.Array         # [C] raw aggregation weights
  context: agg.AggregationContext  # the cohort's positions, K, n_k


def sample_indices(spec: CohortSpec, num_examples: jax.Array, key: jax.Array) -> jax.Array:
  """[C] site positions for this round."""
  num_sites = num_examples.shape[0]
  if spec.sampling in ("uniform", "uniform_unbiased"):
    if spec.size > num_sites:
      raise ValueError(f"cohort_size={spec.size} > number of sites K={num_sites}")
    return jax.random.choice(key, num_sites, (spec.size,), replace=False).astype(jnp.int32)
  n = num_examples.astype(jnp.float32)
  return jax.random.choice(key, num_sites, (spec.size,), replace=True,
                           p=n / jnp.sum(n)).astype(jnp.int32)


def take_sites(tree: Any, indices: jax.Array | None) -> Any:
  """Leaves restricted to the sites `indices` along the leading axis."""
  if indices is None:
    return tree
  return jax.tree_util.tree_map(lambda a: a[indices], tree)


def put_sites(full: Any, part: Any, indices: jax.Array | None) -> Any:
  """`full` with the rows `indices` replaced by `part` (others untouched)."""
  if indices is None:
    return part
  return jax.tree_util.tree_map(lambda f, p: f.at[indices].set(p), full, part)


def select_cohort(spec: CohortSpec, data: Any, client_states: Any,
                  round_key: jax.Array) -> Cohort:
  """Samples the cohort and gathers its data, client states and weights."""
  num_examples = data.num_examples
  num_sites = num_examples.shape[0]
  if spec.size is None:
    return Cohort(None, data, client_states,
                  agg.client_weights(num_examples, spec.weighting),
                  agg.full_context(num_examples))
  indices = sample_indices(spec, num_examples,
                           jax.random.fold_in(round_key, SAMPLING_STREAM))
  cohort_n = num_examples[indices]
  scale = 1.0
  if spec.sampling == "num_examples":
    weights = (cohort_n > 0).astype(jnp.float32)
  else:
    weights = agg.client_weights(cohort_n, spec.weighting)
    if spec.sampling == "uniform_unbiased":
      # (K / C) sum_{k in S} p_k: the renormalised mean times this is scheme II.
      total = jnp.sum(agg.client_weights(num_examples, spec.weighting))
      scale = (num_sites / spec.size) * jnp.sum(weights) / jnp.maximum(total, 1e-30)
  return Cohort(indices, take_sites(data, indices), take_sites(client_states, indices),
                weights, agg.AggregationContext(indices, num_sites, cohort_n, scale))


def participated(cohort: Cohort) -> jax.Array:
  """bool scalar: some participant holds data (else the round changes nothing)."""
  return jnp.sum(cohort.weights) > 0


__all__ = ["CohortSpec", "Cohort", "SAMPLINGS", "SAMPLING_STREAM", "make_cohort_spec",
           "sample_indices", "take_sites", "put_sites", "select_cohort", "participated"]
