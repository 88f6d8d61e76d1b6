"""The node's side of a deployed round: ONE site's jit-compiled client update.

A hospital's node holds its own rows and nothing else. Each round it receives
the global model as the clients receive it (after the downlink), the client
context (the algorithm's traced hyperparameters, the server's algorithm state,
e.g. SCAFFOLD's control variate c, the round number), its client key and the
padded length N_max, and runs exactly what `kit_round` runs for one site under
`jax.vmap`:

    update_k, (client_state_k', values_k) = client_step(config, ctx, w_rx,
                                                        client_state_k, data_k, key_k)

It keeps `client_state_k` (SCAFFOLD's c_k, Ditto's personal model v_k, ...)
itself between rounds and returns `update_k` and `values_k` (the per-client
numbers the server's aggregation and server update read). The client state
never leaves the node.

Exactness: the node pads its rows to the federation's N_max (the server sends
it) with `FederatedData.pad_to`, so its batches, shuffles and masks are the
simulated site's; its key is `fold_in(round_key, site_id)` as in the simulator
(the server derives it and sends it).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_med.core.algorithm import FederatedAlgorithm, required_label_type
from fedjax_med.core.federated_data import FederatedData
from fedjax_med.core.kit import ClientContext, ClientData, client_step
from fedjax_med.deploy import wire


def node_codec(config):
  """The uplink `Compressor` a node applies itself, or None.

  When the aggregator is a chain whose FIRST link is an uplink codec
  (`fm.aggregators.compression.uplink`, e.g. from `communication(...)`), the
  node encodes its update (keeping an error-feedback residual, if any, as part
  of its state) and only the payload crosses the network; the server decodes it
  and runs the rest of the chain. A codec elsewhere in the chain runs on the
  server, after the links before it.
  """
  links = getattr(config.aggregator, "links", ())
  if len(links) > 1 and getattr(links[0], "compressor", None) is not None:
    return links[0].compressor
  return None


@functools.partial(jax.jit, static_argnums=0)
def _encode_jit(compressor, update, codec_state, key):
  return compressor.encode(update, codec_state, key)


def kit_config(algorithm: FederatedAlgorithm):
  """The algorithm's `KitConfig`; raises for rounds the deployment cannot split."""
  if not isinstance(algorithm, FederatedAlgorithm):
    raise TypeError("fedjax_med.deploy: algorithm must be a FederatedAlgorithm, got"
                    f" {type(algorithm).__name__}")
  if algorithm.config is None:
    raise ValueError(
        f"fedjax_med.deploy: {algorithm.name} has no synchronous kit round to split into"
        " node and server halves (cyclic and FedBuff run rounds of another shape,"
        " with_availability draws availability inside the round: a deployment's"
        " availability is the nodes' own); build the algorithm with"
        " fedjax_med.kit.build_algorithm or use a built-in synchronous one")
  return algorithm.config


def initial_state_template(algorithm: FederatedAlgorithm, params: Any):
  """`algorithm.init(params, num_sites=1)`: the structure of every part of the
  state, and one site's initial client state."""
  return algorithm.init(params, num_sites=1)


@functools.partial(jax.jit, static_argnums=0)
def _client_step_jit(config, hparams, client_hparams, algorithm_state, round_, params,
                     client_state, data, key):
  ctx = ClientContext(config, hparams, client_hparams, algorithm_state, round_)
  return client_step(config, ctx, params, client_state, data, key)


def as_site_data(site: Any, name: str = "site") -> FederatedData:
  """A node's rows as a K = 1 `FederatedData` (from `(x, y)` or a K = 1 FederatedData)."""
  if isinstance(site, FederatedData):
    if site.num_sites != 1:
      raise ValueError(f"fedjax_med.deploy: the node's data loader returned {site.num_sites}"
                       " sites; a node holds exactly one (select it, e.g."
                       " fm.datasets.heart_disease(site=k))")
    return site
  if not isinstance(site, (tuple, list)) or len(site) != 2:
    raise TypeError("fedjax_med.deploy: the node's data loader must return (x, y) or a"
                    f" K = 1 FederatedData, got {type(site).__name__}")
  return FederatedData.from_sites([tuple(site)], [name])


class SiteWorker:
  """One node: its site's rows and the algorithm's client half.

  Args:
    algorithm: the same kit-built algorithm the server runs.
    params: the initial model (its structure is the template of every message).
    data: this site's rows, `(x [n, ...], y [n, ...])` or a K = 1 FederatedData.
    site: the site's index among the K sites (its id in the simulator).
    private_seed: None (default): the node uses the client key the server sends,
      fold_in(round_key, site_id), so the run reproduces the simulator exactly.
      An integer (e.g. from `secrets.randbits(31)`, kept on the node): the key
      is further folded with it, so the server cannot know the node's
      randomness. Use it whenever the node adds privacy noise itself
      (patient-level DP-SGD, `fm.privacy.dp_sgd`): with the server's key, the
      server could recompute and subtract that noise.
  """

  def __init__(self, algorithm: FederatedAlgorithm, params: Any, data: Any, site: int,
               private_seed: int | None = None):
    self.config = kit_config(algorithm)
    self.private_seed = private_seed
    self.name = algorithm.name
    self.site = int(site)
    self.data = as_site_data(data, f"site_{self.site}")
    needed = required_label_type(algorithm.config.loss_fn)
    if needed is not None and self.data.label_type != needed:
      self.data = self.data.replace(label_type=needed)   # validates the labels
    self.template = initial_state_template(algorithm, params)
    self.initial_client_state = jax.tree_util.tree_map(
        lambda a: a[0], self.template.client_states)
    self.codec = node_codec(self.config)
    if self.codec is not None:
      from fedjax_med.aggregators.compression.base import shapes_of  # pylint: disable=import-outside-toplevel
      self.initial_codec_state = self.codec.init(shapes_of(self.template.params))
    self._padded = {}

  # -- census ------------------------------------------------------------------
  def census(self) -> dict:
    """What the node tells the server before the first round: its site index,
    n_k and the shapes of its rows (no rows)."""
    return {"site": self.site, "num_examples": int(np.asarray(self.data.num_examples)[0]),
            "x_shape": ",".join(map(str, self.data.feature_shape)),
            "x_dtype": str(np.dtype(self.data.x.dtype)),
            "y_shape": ",".join(map(str, self.data.y.shape[2:])),
            "y_dtype": str(np.dtype(self.data.y.dtype)), "label_type": self.data.label_type or ""}

  def _rows(self, pad_to: int) -> ClientData:
    if pad_to not in self._padded:
      n = int(np.asarray(self.data.num_examples)[0])
      if pad_to < n:
        raise ValueError(f"fedjax_med.deploy: the server asked site {self.site} to pad to"
                         f" N_max = {pad_to} rows but it holds {n}")
      padded = self.data if self.data.max_examples == pad_to else self.data.pad_to(pad_to)
      self._padded = {pad_to: ClientData(padded.x[0], padded.y[0], padded.mask[0])}
    return self._padded[pad_to]

  # -- one round ---------------------------------------------------------------
  def train(self, arrays: dict, config: dict, stored_state: dict | None
            ) -> tuple[dict, dict, dict]:
    """Runs this site's client update.

    Args:
      arrays: from the server: `params/*` (w as received), `hparams/*`,
        `client_hparams/*`, `algorithm_state/*`, `round/0`, `key/0`.
      config: `{"pad_to": N_max, "round": r, ...}`.
      stored_state: the node's stored client state (`client_state/*`), None
        before its first round.

    Returns:
      (reply arrays `update/*` and `values/*`, reply config, the client state to store).
    """
    sender = "the server"
    t = self.template
    params = wire.unflatten("params", arrays, t.params, sender=sender)
    hparams = wire.unflatten("hparams", arrays, t.hparams, sender=sender)
    client_hparams = wire.unflatten("client_hparams", arrays, t.client_hparams, sender=sender)
    algorithm_state = wire.unflatten("algorithm_state", arrays, t.algorithm_state,
                                     sender=sender)
    round_ = wire.unflatten("round", arrays, t.round, sender=sender)
    key = jnp.asarray(arrays["key/0"])
    if config.get("typed_key"):
      key = jax.random.wrap_key_data(key)
    if self.private_seed is not None:
      key = jax.random.fold_in(key, self.private_seed)
    client_state = self.initial_client_state
    if stored_state:
      client_state = wire.unflatten("client_state", stored_state, client_state,
                                    sender=f"the node's store (site {self.site})")
    data = self._rows(int(config["pad_to"]))
    update, (new_state, values) = _client_step_jit(
        self.config, hparams, client_hparams, algorithm_state, round_, params, client_state,
        data, key)
    stored_out = wire.flatten("client_state", new_state)
    if config.get("uplink"):
      # Encode here: only the payload leaves the node; its residual stays here
      # (unchanged for a node without rows, as the simulator's link keeps it).
      codec_state = self.initial_codec_state
      if stored_state and any(k.startswith("codec/") for k in stored_state):
        codec_state = wire.unflatten("codec", stored_state, codec_state,
                                     sender=f"the node's store (site {self.site})")
      payload, new_codec = _encode_jit(self.codec, update, codec_state,
                                       jnp.asarray(arrays["uplink_key/0"]))
      if int(np.asarray(values["num_examples"])) == 0:
        new_codec = codec_state
      reply = {**wire.flatten("payload", payload), **wire.flatten("values", values)}
      stored_out.update(wire.flatten("codec", new_codec))
    else:
      reply = {**wire.flatten("update", update), **wire.flatten("values", values)}
    return reply, {"site": self.site}, stored_out


__all__ = ["SiteWorker", "kit_config", "as_site_data", "initial_state_template", "node_codec"]
