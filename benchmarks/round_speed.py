"""Seconds per FedAvg round: PyTorch loop, per-client JAX loop, fedjax_med, compute floor.

    python benchmarks/round_speed.py --json round_speed.json   # all rows (~20 min, busy 2 cores)
    python benchmarks/round_speed.py --quick                   # W1 + W2 K=100 (< 2 min)
    python benchmarks/round_speed.py --profile                 # where (c) loses to (d), K=1000

Workloads (one FedAvg round = 1 local epoch on every client, client SGD lr 0.05,
n_k-weighted average, server SGD 1.0):
  W1  Fed-Heart-Disease (bundled): K = 4 hospitals, n_k = 199/172/30/85, 13 features,
      logistic regression, batch 4 (50 local steps on the largest site).
  W2  K synthetic clients x 64 rows x 32 features, 2 classes, MLP 32-64-2 (ReLU),
      batch 16 (4 local steps), K in {10, 100, 1000, 10000}.

Methods:
  (a) torch     the textbook sequential PyTorch loop: for each client, a deepcopy of
                the global nn.Module and a fresh torch.optim.SGD, its batches from
                torch.randperm (index slicing, no DataLoader), one after another; the
                K state_dicts averaged with n_k weights. CPU wheel (`bench` extra).
  (b) per-client the same local update as fedjax_med (core.local.local_training) in
                one jax.jit per client, called from a Python loop over clients: one
                dispatch per client (the weighted accumulation is inside that jit),
                each client's own unpadded arrays already on the device.
  (c) vmapped   fedjax_med: `fm.algorithms.fedavg(...).round`, one jit, clients vmapped.
  (d) floor     the compute floor: ONE model trained centrally on the same examples
                with the same number of sequential steps, step t being one big batch
                made of every client's batch t (K*B rows; same FLOPs as the round's
                per-client steps, no per-client parameters, no shuffling, no gather).

Timing: each method after warm-up (2 calls, compile included there), median of
`--repeats` rounds (min and max shown). (c) and (d) are also timed interleaved
(c, d, c, d, ... `--interleaved` runs each) in one process and the ratio c/d is
that of each one's fastest run, so machine noise (this is a shared 2-core box)
cancels out of the ratio; the same ratio of process CPU times is given too.

Peak RSS: every (workload, method) runs in its own fresh subprocess, which reads
`resource.getrusage(RUSAGE_SELF).ru_maxrss` (the kernel's high-water mark of the
process's resident memory) after its rounds. tracemalloc would not do: it only
sees allocations through Python's allocator, while XLA's buffers (data, per-client
parameter copies, temporaries inside the compiled round), the compiled code and
torch's tensors are allocated by C++ runtimes it never sees. ru_maxrss cannot be
reset inside a process, hence one process per row; "import" is the RSS after the
imports and data loading, before any round (Python + jax/torch runtime baseline).

W3 (memory): K = 10,000 clients x 16 rows x 784 features, 10 classes, MLP 784-1000-10
(795,010 parameters), batch 16 (1 local step), FedAvg with `client_chunk_size=M`:
unchunked, the 10,000 per-client parameter copies alone would take 32 GB; chunked,
M copies are alive at a time. Peak RSS (VmHWM) of a fresh process after warm-up and
`--repeats` timed rounds; the data alone are 10,000 x 16 x 784 float32 = 478 MiB.

Seeds: `fm.run_seeds` with 8 seeds vmapped in one compiled call vs 1 seed, same
rounds, on W1 and W2 K=1000 (median of repeats after warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import _harness  # benchmarks/_harness.py (no jax import)

import numpy as np

LR = 0.05
W2_ROWS, W2_FEATURES, W2_BATCH = 64, 32, 16
W1_BATCH = 4


# -- data: written once by the driver, read by every worker -----------------------

def make_workload(name: str, out_dir: str) -> dict:
  """Writes the workload's arrays to out_dir/<name>.npz; returns its description."""
  path = os.path.join(out_dir, f"{name}.npz")
  if name == "W1":
    import fedjax_med as fm  # pylint: disable=import-outside-toplevel
    train, _ = fm.datasets.heart_disease()
    x, y, mask = (np.asarray(a) for a in (train.x, train.y, train.mask))
    desc = {"name": name, "label": "W1 heart disease K=4", "model": "logistic",
            "batch": W1_BATCH, "K": 4}
  else:
    k = int(name.split("=")[1])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(k, W2_ROWS, W2_FEATURES)).astype(np.float32)
    w = rng.normal(size=(W2_FEATURES,)).astype(np.float32)
    y = (x @ w + rng.normal(size=(k, W2_ROWS)) > 0).astype(np.int32)
    mask = np.ones((k, W2_ROWS), bool)
    desc = {"name": name, "label": f"W2 synthetic K={k}", "model": "mlp",
            "batch": W2_BATCH, "K": k}
  np.savez(path, x=x, y=y, mask=mask)
  desc["path"] = path
  return desc


def _load(desc):
  d = np.load(desc["path"])
  return d["x"], d["y"], d["mask"]


_rss_mib = _harness.peak_rss_mib   # VmHWM, else ru_maxrss


def _timed(fn):
  c0, t0 = time.process_time(), time.perf_counter()
  fn()
  return time.perf_counter() - t0, time.process_time() - c0


# -- (c), (d), (b): JAX ----------------------------------------------------------------

def _jax_setup(desc):
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  import fedjax_med as fm  # pylint: disable=import-outside-toplevel
  x, y, mask = _load(desc)
  data = fm.FederatedData(jax.numpy.asarray(x), jax.numpy.asarray(y), jax.numpy.asarray(mask))
  if desc["model"] == "logistic":
    model = fm.models.LogisticRegression()
    loss_fn = fm.losses.sigmoid_binary_cross_entropy(model.apply)
  else:
    model = fm.models.MLP(hidden=(64,), num_outputs=2)
    loss_fn = fm.losses.softmax_cross_entropy(model.apply)
  params = model.init(jax.random.PRNGKey(0), data.x[0, :1])
  return fm, jax, optax, data, loss_fn, params


def vmapped_round(desc):
  """(c): returns run() doing one fedjax_med round (state carried over)."""
  fm, jax, optax, data, loss_fn, params = _jax_setup(desc)
  algo = fm.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(LR), local_epochs=1,
                              batch_size=desc["batch"])
  box = {"state": algo.init(params), "r": 0}
  run_key = jax.random.PRNGKey(1)

  def run():
    box["state"], _ = algo.round(box["state"], data, jax.random.fold_in(run_key, box["r"]))
    box["r"] += 1
    jax.block_until_ready(box["state"].params)

  return run


def floor_round(desc):
  """(d): one model, T sequential steps on K*B-row batches (the clients' batches t)."""
  fm, jax, optax, data, loss_fn, params = _jax_setup(desc)
  jnp = jax.numpy
  b = desc["batch"]
  steps = -(-data.max_examples // b)
  x, y, mask = data.x, data.y, data.mask
  if data.max_examples % b:   # pad N_max to a multiple of B (masked rows)
    pad = steps * b - data.max_examples
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    y = jnp.pad(y, [(0, 0), (0, pad)] + [(0, 0)] * (y.ndim - 2))
    mask = jnp.pad(mask, [(0, 0), (0, pad)])
  opt = optax.sgd(LR)
  k = data.num_sites

  @jax.jit
  def train(p, x, y, mask):
    def step(carry, t):
      p, s = carry
      xb = jax.lax.dynamic_slice_in_dim(x, t * b, b, axis=1)
      yb = jax.lax.dynamic_slice_in_dim(y, t * b, b, axis=1)
      mb = jax.lax.dynamic_slice_in_dim(mask, t * b, b, axis=1)
      xb = xb.reshape((k * b,) + xb.shape[2:])
      yb = yb.reshape((k * b,) + yb.shape[2:])
      loss, g = jax.value_and_grad(
          lambda q: fm.masked_mean_loss(loss_fn, q, xb, yb, mb.reshape(k * b)))(p)
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), loss
    (p, _), losses = jax.lax.scan(step, (p, opt.init(p)), jnp.arange(steps))
    return p, jnp.mean(losses)

  box = {"p": params}

  def run():
    box["p"], _ = train(box["p"], x, y, mask)
    jax.block_until_ready(box["p"])

  return run


def per_client_round(desc):
  """(b): one jitted call per client (local training + weighted accumulation)."""
  fm, jax, optax, data, loss_fn, params = _jax_setup(desc)
  from fedjax_med.core.local import local_training  # pylint: disable=import-outside-toplevel
  from fedjax_med.core.objective import loss_and_grad  # pylint: disable=import-outside-toplevel
  jnp = jax.numpy
  opt = optax.sgd(LR)
  schedule = fm.LocalSchedule(batch_size=desc["batch"], epochs=1)
  grad_fn = loss_and_grad(loss_fn)
  x, y, mask = _load(desc)
  n = mask.sum(axis=1)
  clients = []   # each client's own (unpadded) arrays, on the device once
  for k in range(len(n)):
    clients.append((jnp.asarray(x[k, :n[k]]), jnp.asarray(y[k, :n[k]]),
                    jnp.asarray(mask[k, :n[k]]), jnp.asarray(k, jnp.int32),
                    jnp.asarray(n[k] / n.sum(), jnp.float32)))

  @jax.jit
  def client(acc, w, xk, yk, mk, site, pk, round_key):
    key = jax.random.fold_in(round_key, site)
    local = local_training(grad_fn, opt, schedule, w, opt.init(w), xk, yk, mk, key).params
    return jax.tree_util.tree_map(lambda a, l: a + pk * l, acc, local)

  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  run_key = jax.random.PRNGKey(1)
  box = {"w": params, "r": 0}

  def run():
    round_key = jax.random.fold_in(run_key, box["r"])
    acc = zeros
    for xk, yk, mk, site, pk in clients:
      acc = client(acc, box["w"], xk, yk, mk, site, pk, round_key)
    box["w"] = acc
    box["r"] += 1
    jax.block_until_ready(acc)

  return run


# -- (a): PyTorch ------------------------------------------------------------------

def torch_round(desc):
  """(a): the textbook loop: deepcopy + fresh SGD per client, state_dicts averaged."""
  import copy  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(desc.get("torch_threads", 1))
  torch.manual_seed(0)
  x, y, mask = _load(desc)
  n = mask.sum(axis=1)
  if desc["model"] == "logistic":
    model = torch.nn.Linear(x.shape[-1], 1)
    criterion = torch.nn.BCEWithLogitsLoss()
    clients = [(torch.from_numpy(x[k, :n[k]]), torch.from_numpy(y[k, :n[k]]).float()[:, None])
               for k in range(len(n))]
  else:
    model = torch.nn.Sequential(torch.nn.Linear(x.shape[-1], 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 2))
    criterion = torch.nn.CrossEntropyLoss()
    clients = [(torch.from_numpy(x[k, :n[k]]), torch.from_numpy(y[k, :n[k]]).long())
               for k in range(len(n))]
  batch = desc["batch"]
  gen = torch.Generator().manual_seed(1)
  box = {"model": model}

  def run():
    global_model = box["model"]
    states, sizes = [], []
    for xk, yk in clients:
      local = copy.deepcopy(global_model)
      opt = torch.optim.SGD(local.parameters(), lr=LR)
      perm = torch.randperm(len(yk), generator=gen)
      for s in range(0, len(yk), batch):
        idx = perm[s:s + batch]
        opt.zero_grad()
        loss = criterion(local(xk[idx]), yk[idx])
        loss.backward()
        opt.step()
      states.append(local.state_dict())
      sizes.append(len(yk))
    total = float(sum(sizes))
    avg = {name: sum(s[name] * (m / total) for s, m in zip(states, sizes))
           for name in states[0]}
    global_model.load_state_dict(avg)

  return run


BUILDERS = {"a": torch_round, "b": per_client_round, "c": vmapped_round, "d": floor_round}
NAMES = {"a": "(a) torch loop", "b": "(b) per-client jit", "c": "(c) fedjax_med vmapped",
         "d": "(d) compute floor"}


# -- workers (one fresh process each) -------------------------------------------------

def worker(task: dict) -> dict:
  kind = task["kind"]
  if kind == "seeds":
    return seeds_worker(task)
  if kind == "profile":
    return profile_worker(task)
  if kind == "memory":
    return memory_worker(task)
  desc = task["workload"]
  if kind == "time":            # one method: warm-up, `repeats` timed rounds, RSS
    run = BUILDERS[task["method"]](desc)
    rss_import = _rss_mib()
    run()
    if task["method"] != "a":   # jit: a second call after the compile
      run()
    samples = [_timed(run) for _ in range(task["repeats"])]
    return {"wall": [s[0] for s in samples], "cpu": [s[1] for s in samples],
            "rss_import_mib": rss_import, "peak_rss_mib": _rss_mib()}
  if kind == "rss":             # one method: warm-up + 1 round, RSS only
    run = BUILDERS[task["method"]](desc)
    rss_import = _rss_mib()
    run(); run(); run()
    return {"rss_import_mib": rss_import, "peak_rss_mib": _rss_mib()}
  if kind == "interleaved":     # (c) and (d) alternating in one process
    runs = {m: BUILDERS[m](desc) for m in ("c", "d")}
    for r in runs.values():
      r(); r()
    out = {m: {"wall": [], "cpu": []} for m in runs}
    out["peak_rss_mib"] = _rss_mib()
    for i in range(task["n"]):
      order = ("c", "d") if i % 2 == 0 else ("d", "c")
      for m in order:
        wall, cpu = _timed(runs[m])
        out[m]["wall"].append(wall)
        out[m]["cpu"].append(cpu)
    return out
  raise ValueError(f"unknown task {kind!r}")


W3_K, W3_ROWS, W3_FEATURES, W3_HIDDEN, W3_CLASSES, W3_BATCH = 10_000, 16, 784, 1000, 10, 16


def memory_worker(task: dict) -> dict:
  """W3: a chunked FedAvg round on 10,000 clients with a 0.8M-parameter MLP."""
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  import fedjax_med as fm  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  x = jax.numpy.asarray(rng.standard_normal((W3_K, W3_ROWS, W3_FEATURES), np.float32))
  y = jax.numpy.asarray(rng.integers(0, W3_CLASSES, (W3_K, W3_ROWS), dtype=np.int32))
  data = fm.FederatedData(x, y, jax.numpy.ones((W3_K, W3_ROWS), bool))
  del x, y
  model = fm.models.MLP(hidden=(W3_HIDDEN,), num_outputs=W3_CLASSES)
  loss_fn = fm.losses.softmax_cross_entropy(model.apply)
  params = model.init(jax.random.PRNGKey(0), data.x[0, :1])
  algo = fm.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(LR), local_epochs=1,
                              batch_size=W3_BATCH, client_chunk_size=task["chunk"])
  box = {"state": algo.init(params), "r": 0}
  rss_import = _rss_mib()

  def run():
    box["state"], _ = algo.round(box["state"], data, jax.random.PRNGKey(box["r"]))
    box["r"] += 1
    jax.block_until_ready(box["state"].params)

  run()
  samples = [_timed(run) for _ in range(task["repeats"])]
  return {"wall": [w for w, _ in samples], "cpu": [c for _, c in samples],
          "rss_import_mib": rss_import, "peak_rss_mib": _rss_mib(),
          "num_params": sum(int(a.size) for a in jax.tree_util.tree_leaves(params))}


def seeds_worker(task: dict) -> dict:
  """fm.run_seeds with S seeds vmapped in one call: seconds per call."""
  fm, jax, optax, data, loss_fn, params = _jax_setup(task["workload"])
  algo = fm.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(LR), local_epochs=1,
                              batch_size=task["workload"]["batch"])
  out = {}
  for s in task["seeds"]:
    states = fm.stack_states([algo.init(params)] * s)
    keys = jax.random.split(jax.random.PRNGKey(0), s)

    def run(states=states, keys=keys):
      jax.block_until_ready(fm.run_seeds(algo, states, data, task["rounds"], keys)[0].params)

    run()
    samples = [_timed(run) for _ in range(task["repeats"])]
    out[str(s)] = {"wall": [w for w, _ in samples], "cpu": [c for _, c in samples]}
  out["peak_rss_mib"] = _rss_mib()
  return out


def run_worker(task: dict, timeout: float = 1800) -> dict:
  """Runs `task` in a fresh Python process; returns its JSON answer."""
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker",
                         json.dumps(task)], capture_output=True, text=True, timeout=timeout)
  if proc.returncode != 0:
    raise RuntimeError(f"worker {task['kind']} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


# -- profile: variants of the vmapped round at K = 1000 --------------------------------

def profile_worker(task: dict) -> dict:
  """Variants of one vmapped FedAvg round, each one jit, timed interleaved.

  Written like core/local.py (per-client permutation by argsort of per-row
  uniforms, per-step gather x[perm[tB:(t+1)B]], masked mean loss, jnp.where
  no-op selects), with one piece changed at a time.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  import fedjax_med as fm  # pylint: disable=import-outside-toplevel
  from fedjax_med.core.local import client_keys, row_uniforms  # pylint: disable=import-outside-toplevel
  desc = task["workload"]
  x, y, mask = _load(desc)
  data = fm.FederatedData(jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask))
  k_sites, n, b = x.shape[0], x.shape[1], desc["batch"]
  steps = n // b
  model = fm.models.MLP(hidden=(64,), num_outputs=2)
  loss_fn = fm.losses.softmax_cross_entropy(model.apply)
  params = model.init(jax.random.PRNGKey(0), data.x[0, :1])
  opt = optax.sgd(LR)
  key = jax.random.PRNGKey(1)
  index_bits = max(1, (n - 1).bit_length())

  def make(shuffle="argsort", gather="step", select=True, masked=True):
    def client(w, xk, yk, mk, ck):
      n_k = jnp.sum(mk, dtype=jnp.int32)
      if shuffle == "argsort":      # as core/local.py: argsort of row uniforms
        u = jnp.where(mk, row_uniforms(jax.random.fold_in(ck, 0), n), 2.0)
        perm = jnp.argsort(u, stable=True).astype(jnp.int32)
      elif shuffle == "packed":     # one-operand uint32 sort: random high bits | row
        r = jax.vmap(lambda i: jax.random.bits(jax.random.fold_in(
            jax.random.fold_in(ck, 0), i), (), jnp.uint32))(jnp.arange(n, dtype=jnp.uint32))
        hi = jnp.where(mk, (r >> 1) >> index_bits << index_bits,
                       jnp.uint32(0xFFFFFFFF) >> index_bits << index_bits)
        perm = (jax.lax.sort(hi | jnp.arange(n, dtype=jnp.uint32))
                & ((1 << index_bits) - 1)).astype(jnp.int32)
      else:
        perm = jnp.arange(n, dtype=jnp.int32)
      offsets = jnp.arange(b, dtype=jnp.int32)

      def step(carry, t):
        p, s, loss_sum, taken = carry
        positions = t * b + offsets
        rm = positions < n_k
        if gather == "step":
          idx = jnp.take(perm, positions, mode="clip")
          xb, yb = xk[idx], yk[idx]
        else:
          xb = jax.lax.dynamic_slice_in_dim(xk, t * b, b)
          yb = jax.lax.dynamic_slice_in_dim(yk, t * b, b)
        if masked:
          loss, g = jax.value_and_grad(
              lambda q: fm.masked_mean_loss(loss_fn, q, xb, yb, rm))(p)
        else:
          loss, g = jax.value_and_grad(lambda q: jnp.mean(loss_fn(q, xb, yb)))(p)
        u, s2 = opt.update(g, s, p)
        p2 = optax.apply_updates(p, u)
        if select:
          active = jnp.any(rm)
          p2 = jax.tree_util.tree_map(lambda a, c: jnp.where(active, a, c), p2, p)
          loss = jnp.where(active, loss, 0.0)
          active = active.astype(jnp.int32)
        else:
          active = 1
        return (p2, s2, loss_sum + loss, taken + active), None

      (p, _, ls, tk), _ = jax.lax.scan(step, (w, opt.init(w), 0.0, 0),
                                       jnp.arange(steps, dtype=jnp.int32))
      return jax.tree_util.tree_map(jnp.subtract, w, p), ls / jnp.maximum(tk, 1)

    @jax.jit
    def rnd(w, x, y, m, ids, key):
      deltas, losses = jax.vmap(client, in_axes=(None, 0, 0, 0, 0))(
          w, x, y, m, client_keys(key, ids))
      nk = jnp.sum(m, axis=1).astype(jnp.float32)
      pk = nk / nk.sum()
      delta = jax.tree_util.tree_map(lambda d: jnp.tensordot(pk, d, axes=(0, 0)), deltas)
      return jax.tree_util.tree_map(jnp.subtract, w, delta), jnp.sum(pk * losses)

    return lambda: jax.block_until_ready(
        rnd(params, data.x, data.y, data.mask, data.site_ids, key))

  fm_algo = fm.algorithms.fedavg(loss_fn, client_optimizer=opt, local_epochs=1, batch_size=b)
  fm_state = fm_algo.init(params)
  floor = floor_round(desc)
  variants = {
      "(c) fm.algorithms.fedavg round": lambda: jax.block_until_ready(
          fm_algo.round(fm_state, data, key)[0].params),
      "(c') same, re-implemented here": make(),
      "  shuffle by packed uint32 sort": make(shuffle="packed"),
      "  no shuffle (gather kept)": make(shuffle="none"),
      "  no shuffle, no gather (slices)": make(shuffle="none", gather="slice"),
      "  packed sort, no jnp.where selects": make(shuffle="packed", select=False),
      "  bare: no shuffle/gather/mask/select": make(shuffle="none", gather="slice",
                                                     select=False, masked=False),
      "(d) compute floor": floor,
  }
  for fn in variants.values():
    fn(); fn()
  best = {name: [float("inf"), float("inf")] for name in variants}
  for _ in range(task["n"]):
    for name, fn in variants.items():
      wall, cpu = _timed(fn)
      best[name][0] = min(best[name][0], wall)
      best[name][1] = min(best[name][1], cpu)
  return {"variants": best}


# -- driver ----------------------------------------------------------------------------

def _summary(samples):
  return statistics.median(samples), min(samples), max(samples)


def machine_info() -> dict:
  info = {"python": platform.python_version(), "platform": platform.platform(),
          "cpus": os.cpu_count()}
  try:
    with open("/proc/cpuinfo") as f:
      info["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    info["cpu"] = platform.processor()
  import jax  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel
  import numpy  # pylint: disable=import-outside-toplevel
  info.update(jax=jax.__version__, jaxlib=jaxlib.__version__, numpy=numpy.__version__,
              backend=jax.default_backend())
  try:
    import torch  # pylint: disable=import-outside-toplevel
    info["torch"] = torch.__version__
    info["torch_default_threads"] = torch.get_num_threads()
  except ImportError:
    info["torch"] = None
  info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
  return info


def run_benchmark(args) -> dict:
  have_torch = _have_torch() and not args.no_torch
  ks = [int(k) for k in args.ks.split(",")] if args.ks else (
      [100] if args.quick else [10, 100, 1000, 10000])
  names = ([] if args.no_w1 else ["W1"]) + [f"W2 K={k}" for k in ks]
  load_before = os.getloadavg()
  result = {"meta": {**machine_info(), "repeats": args.repeats,
                     "torch_threads": args.torch_threads,
                     "interleaved_runs": args.interleaved, "quick": args.quick},
            "rows": [], "interleaved": [], "seeds": [], "memory": []}
  with tempfile.TemporaryDirectory() as tmp:
    for name in names:
      desc = make_workload(name, tmp)
      print(f"# {desc['label']}", file=sys.stderr, flush=True)
      rows = {}
      desc["torch_threads"] = args.torch_threads
      methods = (["a"] if have_torch else []) + ["b"]
      for m in methods:
        out = run_worker({"kind": "time", "workload": desc, "method": m,
                          "repeats": args.repeats})
        rows[m] = {"wall": out["wall"], "cpu": out["cpu"], "rss_import_mib":
                   out["rss_import_mib"], "peak_rss_mib": out["peak_rss_mib"]}
      inter = run_worker({"kind": "interleaved", "workload": desc, "n": args.interleaved})
      for m in ("c", "d"):
        if args.quick:   # one process for both: its peak (marked * in the table)
          mem = {"peak_rss_mib": inter["peak_rss_mib"], "rss_import_mib": float("nan"),
                 "rss_shared": True}
        else:
          mem = run_worker({"kind": "rss", "workload": desc, "method": m})
        rows[m] = {"wall": inter[m]["wall"], "cpu": inter[m]["cpu"], **mem}
      base = statistics.median(rows["c"]["wall"])
      for m in ("a", "b", "c", "d"):
        if m not in rows:
          continue
        med, lo, hi = _summary(rows[m]["wall"])
        result["rows"].append({
            "workload": desc["label"], "K": desc["K"], "method": NAMES[m],
            "median_s": med, "min_s": lo, "max_s": hi, "runs": len(rows[m]["wall"]),
            "rounds_per_s": 1.0 / med, "ratio_to_c": med / base,
            "cpu_median_s": statistics.median(rows[m]["cpu"]),
            "peak_rss_mib": rows[m]["peak_rss_mib"],
            "rss_import_mib": rows[m]["rss_import_mib"],
            "rss_shared_with_c_and_d": rows[m].get("rss_shared", False)})
      c_wall, d_wall = min(inter["c"]["wall"]), min(inter["d"]["wall"])
      c_cpu, d_cpu = min(inter["c"]["cpu"]), min(inter["d"]["cpu"])
      result["interleaved"].append({
          "workload": desc["label"], "K": desc["K"], "runs": args.interleaved,
          "c_fastest_s": c_wall, "d_fastest_s": d_wall, "c_over_d": c_wall / d_wall,
          "c_cpu_fastest_s": c_cpu, "d_cpu_fastest_s": d_cpu, "c_over_d_cpu": c_cpu / d_cpu})
    if not args.no_seeds:
      seed_names = ["W1"] if args.quick else ["W1", "W2 K=1000"]
      for name in seed_names:
        desc = make_workload(name, tmp)
        rounds = 50 if name == "W1" else 5
        print(f"# seeds {desc['label']}", file=sys.stderr, flush=True)
        out = run_worker({"kind": "seeds", "workload": desc, "seeds": [1, 8],
                          "rounds": rounds, "repeats": args.repeats})
        t1, t8 = statistics.median(out["1"]["wall"]), statistics.median(out["8"]["wall"])
        result["seeds"].append({
            "workload": desc["label"], "rounds": rounds, "one_seed_s": t1,
            "eight_seeds_s": t8, "ratio_8_over_1": t8 / t1,
            "speedup_vs_8_sequential": 8 * t1 / t8,
            "cpu_ratio_8_over_1": statistics.median(out["8"]["cpu"]) /
                                  statistics.median(out["1"]["cpu"]),
            "peak_rss_mib": out["peak_rss_mib"]})
  if not args.quick and not args.no_w3:
    result["memory"] = memory_rows(args)
  result["meta"]["loadavg_before"] = load_before
  result["meta"]["loadavg_after"] = os.getloadavg()
  return result


def memory_rows(args) -> list[dict]:
  """W3: one fresh process per client_chunk_size; s/round and peak RSS."""
  rows = []
  for chunk in (int(c) for c in args.w3_chunks.split(",")):
    print(f"# W3 client_chunk_size {chunk}", file=sys.stderr, flush=True)
    out = run_worker({"kind": "memory", "chunk": chunk, "repeats": args.repeats})
    med, lo, hi = _summary(out["wall"])
    rows.append({
        "workload": f"W3 K={W3_K} MLP {W3_FEATURES}-{W3_HIDDEN}-{W3_CLASSES}",
        "num_params": out["num_params"], "client_chunk_size": chunk, "median_s": med,
        "min_s": lo, "max_s": hi, "peak_rss_mib": out["peak_rss_mib"],
        "rss_import_mib": out["rss_import_mib"]})
  return rows


def _have_torch() -> bool:
  try:
    import torch  # pylint: disable=import-outside-toplevel,unused-import
    return True
  except ImportError:
    return False


def _rss_cell(r) -> str:
  if r.get("rss_shared_with_c_and_d"):
    return f"{r['peak_rss_mib']:.0f}*"
  return f"{r['peak_rss_mib']:.0f} ({r['rss_import_mib']:.0f})"


def print_tables(result: dict) -> None:
  meta = result["meta"]
  print(f"jax {meta['jax']} / jaxlib {meta['jaxlib']} ({meta['backend']}), torch"
        f" {meta.get('torch')} ({meta.get('torch_threads')} thread), numpy {meta['numpy']}, Python {meta['python']};"
        f" {meta['cpu']}, {meta['cpus']} CPUs; load average"
        f" {meta['loadavg_before'][0]:.1f} -> {meta['loadavg_after'][0]:.1f}")
  print()
  print("| workload | method | s/round (median) | min | max | rounds/s | x (c) |"
        " peak RSS MiB (import) |")
  print("|---|---|---|---|---|---|---|---|")
  for r in result["rows"]:
    print(f"| {r['workload']} | {r['method']} | {r['median_s']:.5f} | {r['min_s']:.5f} |"
          f" {r['max_s']:.5f} | {r['rounds_per_s']:.1f} | {r['ratio_to_c']:.2f} |"
          f" {_rss_cell(r)} |")
  if any(r.get("rss_shared_with_c_and_d") for r in result["rows"]):
    print("\n* --quick: (c) and (d) share one process; its peak RSS.")
  print()
  print("(c) vs (d) interleaved, fastest of each:")
  print()
  print("| workload | (c) s | (d) s | c/d wall | c/d CPU time |")
  print("|---|---|---|---|---|")
  for r in result["interleaved"]:
    print(f"| {r['workload']} | {r['c_fastest_s']:.5f} | {r['d_fastest_s']:.5f} |"
          f" {r['c_over_d']:.2f} | {r['c_over_d_cpu']:.2f} |")
  if result["seeds"]:
    print()
    print("fm.run_seeds: 8 seeds vmapped in one call vs 1 seed (median s per call):")
    print()
    print("| workload | rounds | 1 seed s | 8 seeds s | 8 / 1 | speed-up vs 8 runs |"
          " peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in result["seeds"]:
      print(f"| {r['workload']} | {r['rounds']} | {r['one_seed_s']:.4f} |"
            f" {r['eight_seeds_s']:.4f} | {r['ratio_8_over_1']:.2f} |"
            f" {r['speedup_vs_8_sequential']:.2f}x | {r['peak_rss_mib']:.0f} |")


def _print_memory(result: dict) -> None:
  if not result.get("memory"):
    return
  print()
  print("W3 memory: chunked FedAvg round, peak RSS of a fresh process (target < 4 GiB):")
  print()
  print("| workload | parameters | client_chunk_size | s/round (median) | min | max |"
        " peak RSS MiB (after data) |")
  print("|---|---|---|---|---|---|---|")
  for r in result["memory"]:
    print(f"| {r['workload']} | {r['num_params']:,} | {r['client_chunk_size']} |"
          f" {r['median_s']:.2f} | {r['min_s']:.2f} | {r['max_s']:.2f} |"
          f" {r['peak_rss_mib']:.0f} ({r['rss_import_mib']:.0f}) |")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="W1 + W2 K=100 and W1 seeds only (< 2 minutes)")
  parser.add_argument("--json", type=str, default=None, help="write the results here")
  parser.add_argument("--repeats", type=int, default=5, help="timed rounds per method")
  parser.add_argument("--interleaved", type=int, default=10,
                      help="runs of each of (c) and (d), alternating")
  parser.add_argument("--ks", type=str, default=None, help="W2 client counts, e.g. 10,1000")
  parser.add_argument("--no-torch", action="store_true", help="skip (a)")
  parser.add_argument("--torch-threads", type=int, default=1,
                      help="torch.set_num_threads for (a) (default 1: the fastest for"
                           " these tiny models on a shared 2-core machine)")
  parser.add_argument("--no-w1", action="store_true", help="skip W1")
  parser.add_argument("--no-seeds", action="store_true", help="skip the seeds benchmark")
  parser.add_argument("--no-w3", action="store_true", help="skip the W3 memory rows")
  parser.add_argument("--w3-only", action="store_true", help="run the W3 memory rows only")
  parser.add_argument("--w3-chunks", type=str, default="100,1000",
                      help="client_chunk_size values for W3")
  parser.add_argument("--profile", action="store_true",
                      help="time variants of the vmapped round at K=1000 instead")
  parser.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker is not None:
    print(json.dumps(worker(json.loads(args.worker))))
    return
  if args.repeats < 5 or args.interleaved < 10:
    parser.error("--repeats must be >= 5 and --interleaved >= 10")
  if args.profile:
    with tempfile.TemporaryDirectory() as tmp:
      k = int(args.ks) if args.ks else 1000
      desc = make_workload(f"W2 K={k}", tmp)
      out = run_worker({"kind": "profile", "workload": desc, "n": 2 * args.interleaved})
    floor_wall, floor_cpu = out["variants"]["(d) compute floor"]
    print(f"W2 K={k}: variants of the vmapped round, fastest of {2 * args.interleaved}"
          " interleaved runs")
    print()
    print("| variant | wall ms | x (d) | CPU ms | x (d) |")
    print("|---|---|---|---|---|")
    for name, (wall, cpu) in out["variants"].items():
      print(f"| {name.strip()} | {wall * 1e3:.2f} | {wall / floor_wall:.2f} |"
            f" {cpu * 1e3:.2f} | {cpu / floor_cpu:.2f} |")
    result = {"meta": machine_info(), "profile": out["variants"], "K": k}
  elif args.w3_only:
    load_before = os.getloadavg()
    result = {"meta": machine_info(), "memory": memory_rows(args)}
    print(f"load average {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    _print_memory(result)
  else:
    result = run_benchmark(args)
    print_tables(result)
    _print_memory(result)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
