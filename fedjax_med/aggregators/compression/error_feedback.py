"""Error feedback: what compression dropped is added back the next time.

Stich, Cordonnier & Jaggi 2018 (memory), Karimireddy, Rebjock, Stich & Jaggi
2019 (EF-SGD). One client with residual e_t (e_0 = 0) sending
update g_t:

    p_t     = g_t + e_t
    sent_t  = C(p_t)              (the payload is C's encoding of p_t)
    e_{t+1} = p_t - sent_t        (exactly what C dropped)

so sum_t sent_t = sum_t g_t - e_{T+1}: nothing is lost, only delayed. In a
federation every site keeps its own e_k (per-site state with a leading K
axis in `fedjax_med.aggregators.compression.uplink`); a site that does not send in a
round keeps its residual unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_med.aggregators.compression.base import Compressor, is_stateful
from fedjax_med.core.options import OptionError


def error_feedback(compressor: Compressor) -> Compressor:
  """`compressor` with a per-client residual; state = e (the update's shape, float32)."""
  if not isinstance(compressor, Compressor):
    raise OptionError(f"error_feedback: needs a Compressor, got {type(compressor).__name__}")

  def init(template):
    if is_stateful(compressor, template):
      raise OptionError(f"error_feedback: {compressor.name!r} already keeps state;"
                        " wrap a stateless compressor once")
    return jax.tree_util.tree_map(lambda t: jnp.zeros(t.shape, jnp.float32), template)

  def encode(tree, residual, key):
    p = jax.tree_util.tree_map(lambda g, e: g.astype(jnp.float32) + e, tree, residual)
    payload, _ = compressor.encode(p, (), key)
    sent = compressor.decode(payload, p)
    return payload, jax.tree_util.tree_map(jnp.subtract, p, sent)

  return Compressor(f"ef_{compressor.name}", init, encode, compressor.decode, leaf=None,
                    unbiased=False)


__all__ = ["error_feedback"]
