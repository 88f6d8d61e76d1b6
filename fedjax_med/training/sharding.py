"""The site axis K sharded over devices and hosts, with JAX's own runtime.

A round is one `jax.jit` of arrays whose leading axis is the site axis K
(`data.x [K, N_max, ...]`, `data.mask [K, N_max]`, per-site client states
`[K, ...]`). Placing those arrays with `NamedSharding(mesh, P("sites"))`
over a 1-D `jax.sharding.Mesh` of every device is all it takes: the same
jitted round then runs each device's sites on that device (the vmap over K
is split by the compiler, GSPMD/Shardy) and the n_k-weighted sum over sites
becomes a cross-device reduction. Nothing in `core/` or `algorithms/`
changes; one CPU, several GPUs, a TPU slice or several hosts
(`jax.distributed.initialize`) run the same code.

    mesh = fm.sharding.site_mesh()                     # all devices, axis "sites"
    data = fm.sharding.shard_sites(train, mesh)        # K padded to a multiple of D
    state = fm.sharding.shard_state(algo.init(params, data.num_sites), mesh)
    state, metrics = algo.round(state, data, key)      # the unchanged jitted round

Padding. K must be a multiple of the number of devices D; `shard_sites`
appends ceil(K/D)*D - K empty sites (n_k = 0, all-False mask, fresh site
ids). An empty site has weight 0 under every weighting, takes no local step
and leaves its client state untouched, so with every site taking part
(`cohort_size=None`) the padded round equals the unpadded one (to float
rounding of the sums' order). With cohort sampling the draw is over the K
positions, so padding changes which sites are drawn: pick a mesh whose size
divides K (or pass `pad=False` to get an error instead of padding).

Multi-host (`jax.process_count() > 1`): every process calls `shard_sites`
with the sites it holds (`FederatedData` of its local sites, carrying their
global `site_ids`), and gets one global `FederatedData` whose K axis spans
all processes, in process order; every process calls `shard_state` /
`replicate` with the same server state and key. Global arrays that are not
fully addressable cannot be fetched with `np.asarray`; use
`fm.sharding.to_host` (an all-gather) for metrics with a K axis.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fedjax_med.core.federated_data import FederatedData
from fedjax_med.core.state import ServerState

SITE_AXIS = "sites"


def site_mesh(devices=None, axis_name: str = SITE_AXIS) -> Mesh:
  """A 1-D mesh over `devices` (default: every device of every process).

  `jax.devices()` lists devices in process order, so in a multi-host run
  process p's devices hold a contiguous block of the site axis.
  """
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("site_mesh: got no devices")
  return Mesh(np.asarray(devices), (axis_name,))


def _axis_name(mesh: Mesh) -> str:
  if len(mesh.axis_names) != 1:
    raise ValueError(
        f"fedjax_med.training.sharding: expected a 1-D mesh (one axis for the sites), got axes"
        f" {mesh.axis_names}; build one with fm.sharding.site_mesh()")
  return mesh.axis_names[0]


def site_sharding(mesh: Mesh) -> NamedSharding:
  """`NamedSharding(mesh, P(axis))`: leading axis K split over the mesh."""
  return NamedSharding(mesh, PartitionSpec(_axis_name(mesh)))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """`NamedSharding(mesh, P())`: a full copy on every device."""
  return NamedSharding(mesh, PartitionSpec())


def padded_num_sites(num_sites: int, mesh: Mesh | None = None) -> int:
  """K rounded up to a multiple of the mesh size (its number of devices)."""
  mesh = site_mesh() if mesh is None else mesh
  d = mesh.devices.size
  return -(-int(num_sites) // d) * d


def _pad_leading(a, extra: int):
  """`a` with `extra` zero (False) rows appended on axis 0."""
  a = np.asarray(a)
  if extra == 0:
    return a
  return np.concatenate([a, np.zeros((extra,) + a.shape[1:], a.dtype)])


def _pad_rows(a, n_max: int):
  """`a [K, N, ...]` padded with zero rows on axis 1 to `n_max`."""
  a = np.asarray(a)
  if a.shape[1] == n_max:
    return a
  width = [(0, 0), (0, n_max - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
  return np.pad(a, width)


def _put(value, sharding: NamedSharding):
  """Places a host value on a (possibly multi-process) sharding.

  Each process passes the rows it holds: the whole array for a replicated
  sharding, its block of the site axis for a site sharding.
  """
  value = np.asarray(value)
  if jax.process_count() == 1:
    return jax.device_put(value, sharding)
  if sharding.spec == PartitionSpec():
    return jax.make_array_from_process_local_data(sharding, value, value.shape)
  global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
  return jax.make_array_from_process_local_data(sharding, value, global_shape)


def _check_even_split(mesh: Mesh) -> int:
  """Devices per process in the mesh; they must be the same for every process."""
  counts = {}
  for d in mesh.devices.flat:
    counts[d.process_index] = counts.get(d.process_index, 0) + 1
  if len(set(counts.values())) != 1 or len(counts) != jax.process_count():
    raise ValueError(
        f"fedjax_med.training.sharding: every process must contribute the same number of devices"
        f" to the mesh, got {counts} for {jax.process_count()} processes")
  return next(iter(counts.values()))


def shard_sites(data: FederatedData, mesh: Mesh | None = None, *,
                pad: bool = True) -> FederatedData:
  """Places `data` with its site axis K split over `mesh`.

  Args:
    data: a FederatedData. Single process: all K sites. Multi-process: the
      sites this process holds (with their global `site_ids`); every
      process must hold at least one site.
    mesh: a 1-D mesh (default `site_mesh()`: every device).
    pad: append empty sites so that K is a multiple of the device count
      (they change nothing, see the module docstring); False raises a
      ValueError instead when K does not divide.

  Returns:
    FederatedData whose x `[K', N_max, ...]`, y, mask `[K', N_max]` and
    site_ids `[K']` are sharded on axis 0 (K' = padded K; in a multi-host
    run, the sum over processes). Padded sites have ids above every real
    id and names "(empty i)".

  Raises:
    ValueError when K does not divide and pad=False, or on a non-1-D mesh.
  """
  if not isinstance(data, FederatedData):
    raise TypeError(f"shard_sites: expected a FederatedData, got {type(data).__name__}")
  mesh = site_mesh() if mesh is None else mesh
  sharding = site_sharding(mesh)
  x, y, mask = np.asarray(data.x), np.asarray(data.y), np.asarray(data.mask)
  ids = np.asarray(data.site_ids).astype(np.int64)
  local_k, n_max, max_id = mask.shape[0], mask.shape[1], int(ids.max())
  nprocs = jax.process_count()
  if nprocs == 1:
    per_process_devices = mesh.devices.size
    id_offset = 0
  else:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    per_process_devices = _check_even_split(mesh)
    shapes = np.asarray(multihost_utils.process_allgather(
        np.asarray([local_k, n_max, max_id], np.int64)))
    local_k, n_max, max_id = (int(v) for v in shapes.max(axis=0))
    id_offset = jax.process_index() * -(-local_k // per_process_devices) * per_process_devices
  target_k = -(-local_k // per_process_devices) * per_process_devices
  extra = target_k - mask.shape[0]
  if extra and not pad:
    where = "this process's" if nprocs > 1 else "the"
    raise ValueError(
        f"shard_sites: {where} {mask.shape[0]} sites do not split evenly over"
        f" {per_process_devices} devices; pass pad=True to append {extra} empty sites")
  new_ids = max_id + 1 + id_offset + np.arange(extra)
  x = _pad_rows(_pad_leading(x, extra), n_max)
  y = _pad_rows(_pad_leading(y, extra), n_max)
  mask = _pad_rows(_pad_leading(mask, extra), n_max)
  ids = np.concatenate([ids, new_ids]).astype(np.int32)
  names = None
  if data.site_names is not None and nprocs == 1:
    names = data.site_names + tuple(f"(empty {i})" for i in range(extra))
  leaves = [_put(a, sharding) for a in (x, y, mask, ids)]
  return FederatedData.tree_unflatten((names, data.label_type), leaves)


def replicate(tree: Any, mesh: Mesh | None = None) -> Any:
  """Every leaf copied to every device of `mesh` (parameters, keys, ...)."""
  mesh = site_mesh() if mesh is None else mesh
  sharding = replicated_sharding(mesh)
  return jax.tree_util.tree_map(lambda a: _put(_host_value(a), sharding), tree)


def _host_value(a):
  if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
    raise ValueError("fedjax_med.training.sharding: typed PRNG keys are not supported here; use"
                     " jax.random.PRNGKey (raw uint32 keys)")
  return np.asarray(a)


def shard_client_states(client_states: Any, num_sites: int, mesh: Mesh | None = None) -> Any:
  """Per-site states `[K, ...]` padded with zero rows to `num_sites` and sharded.

  Zero rows are the states of the padded, empty sites; they are never
  updated (an empty site takes no step) and have weight 0.

  Args:
    client_states: pytree whose leaves have a leading axis K (this
      process's sites in a multi-host run), or ().
    num_sites: the padded K of this process (`shard_sites(...)`'s K divided
      by the number of processes).
    mesh: the mesh used for the data.
  """
  mesh = site_mesh() if mesh is None else mesh
  sharding = site_sharding(mesh)

  def place(a):
    a = np.asarray(a)
    if a.ndim == 0 or a.shape[0] > num_sites:
      raise ValueError(
          f"shard_client_states: a client-state leaf has shape {a.shape}; expected a"
          f" leading site axis of at most {num_sites}")
    return _put(_pad_leading(a, num_sites - a.shape[0]), sharding)

  return jax.tree_util.tree_map(place, client_states)


def shard_state(state: ServerState, data: FederatedData,
                mesh: Mesh | None = None) -> ServerState:
  """`state` placed for rounds on the sharded `data`.

  `state.client_states` (leading axis K) is padded with zero rows to the
  data's padded K and sharded like the data; everything else (parameters,
  optimizer and aggregator state, hyperparameters, round) is replicated.
  An aggregator that keeps per-site state must be initialised for the
  padded K (`algo.init(params, num_sites=data.num_sites)`): its state is
  replicated as is.

  Args:
    state: a ServerState built on one process (every process passes the
      same values in a multi-host run, except client_states, which hold the
      process's own sites).
    data: the output of `shard_sites`.
    mesh: the mesh used by `shard_sites`.
  """
  if not isinstance(state, ServerState):
    raise TypeError(f"shard_state: expected a ServerState, got {type(state).__name__}")
  mesh = site_mesh() if mesh is None else mesh
  local_sites = data.num_sites // jax.process_count()
  client_states = shard_client_states(state.client_states, local_sites, mesh)
  rest = replicate(state._replace(client_states=()), mesh)
  return rest._replace(client_states=client_states)


def to_host(tree: Any) -> Any:
  """Leaves as numpy on every process (an all-gather for multi-host arrays)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  def fetch(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      if a.is_fully_replicated:
        return np.asarray(a.addressable_data(0))
      return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(a)

  return jax.tree_util.tree_map(fetch, tree)


__all__ = ["SITE_AXIS", "site_mesh", "site_sharding", "replicated_sharding",
           "padded_num_sites", "shard_sites", "shard_client_states", "shard_state",
           "replicate", "to_host"]
