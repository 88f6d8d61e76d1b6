"""Layer 2, aggregators: what the server does with the sites' updates.

The chain itself (`Aggregator`, `ClientTransform`, `chain`, `weighted_mean`,
the weightings) is the core's (`fedjax_med.core.aggregation`) and is
re-exported here; the links that plug into it live in this package:

    robust        reject_nonfinite, norm_bound, coordinate_median, trimmed_mean,
                  inject_faults (faulty sites, for robustness studies)
    compression   uplink / downlink compressors with exact byte counts
    secure        secure aggregation (Bonawitz et al., CCS 2017) as a reducer
    homomorphic   Paillier-encrypted weighted mean (needs fedjax_med[he])

    agg = fm.aggregators.chain(fm.aggregators.robust.reject_nonfinite(),
                               fm.aggregators.robust.norm_bound(1.0),
                               fm.aggregators.weighted_mean())

This package imports only the core.
"""

from fedjax_med.aggregators import compression
from fedjax_med.aggregators import homomorphic
from fedjax_med.aggregators import robust
from fedjax_med.aggregators import secure
from fedjax_med.core.aggregation import (WEIGHTINGS, AggregationContext, Aggregator,
                                         ClientTransform, chain, client_weights,
                                         full_context, normalized, weighted_mean,
                                         weighted_sum)

__all__ = ["compression", "homomorphic", "robust", "secure",
           "Aggregator", "AggregationContext", "ClientTransform", "WEIGHTINGS",
           "full_context", "client_weights", "normalized", "weighted_sum", "weighted_mean",
           "chain"]
