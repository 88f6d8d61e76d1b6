"""A tamper-evident round log: one JSON line per round, chained by sha256.

    import jax, optax
    import fedjax_med as fm
    train, _ = fm.datasets.heart_disease()
    model = fm.models.LogisticRegression()
    loss_fn = fm.losses.sigmoid_binary_cross_entropy(model.apply)
    algo = fm.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.05), batch_size=4)
    state = algo.init(model.init(jax.random.PRNGKey(0), train.x[0, :1]))
    log = fm.audit.AuditLog("run.audit.jsonl")    # refuses to overwrite an existing log
    callback = log.run_callback(run="heart/fedavg/seed0", algorithm="fedavg",
                                hyperparameters={"lr": 0.05, "batch_size": 4},
                                initial_state=state, site_names=train.site_names)
    fm.run_rounds(algo, state, train, 3, jax.random.PRNGKey(1), progress=False,
                  callback=callback)
    fm.audit.verify("run.audit.jsonl")            # 3; raises AuditError naming the line

Each line is a JSON object with

    run, round, cohort (site names), algorithm, hyperparameters,
    site_updates      {site: sha256 of its encoded update}, from the
                      `payload[...]` metrics of `fm.compression.uplink(...,
                      record_payloads=True)`; {} when the round exposes none
                      (e.g. FedBuff, or a plain aggregator)
    aggregate_sha256  sha256 of the round's change of the global model,
                      w_{r+1} - w_r (float32, computed on the host)
    model_sha256      sha256 of w_{r+1}
    metrics           the round's scalar and small array metrics
    checkpoint_sha256 sha256 of the state checkpoint saved before the round
                      (only with `checkpoint_dir`)
    prev_hash         the previous line's `hash` (64 zeros on the first line)
    hash              sha256 of this line's canonical JSON without `hash`

Canonical JSON = `json.dumps(obj, sort_keys=True, separators=(",", ":"))`.
An array's sha256 covers its dtype, shape and C-order bytes; a pytree's covers
every leaf with its path (`tree_sha256`).

`AuditLog` also keeps the chain's head, `{"hash": <last line's hash>, "lines":
<count>}`, in the sidecar file `<path>.head`, rewritten atomically (temporary file +
`os.replace`) after every line. `verify(path)` recomputes every line's hash and the
chain: an edited field breaks that line's hash, a deleted, inserted or reordered
line breaks the next line's `prev_hash`, and a log whose last hash or line count
differs from `<path>.head` lost (or gained) lines at the end, which a plain hash
chain cannot show by itself. What the sidecar cannot show: a forger who rewrites
the log and its `.head` together (publish or sign the head hash for that, and pass
it as `expected_head`). If the process dies between writing a line and its head,
the log has one line more than `.head` and verify says so.

`AuditLog(path)` never empties an existing log: opening a non-empty log (or one
whose `.head` records lines) raises unless `resume=True`, which verifies it and
continues its chain.

`replay(path, line, algo, data, run_key, checkpoint_dir, like_state)` re-runs
a logged round from its checkpoint and confirms the aggregate, model and site
hashes (rounds are deterministic functions of the state and the key).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np

from fedjax_med.training import checkpoint as checkpoint_lib

GENESIS = "0" * 64
PAYLOAD_PREFIX = "payload"
_MAX_METRIC_SIZE = 256


class AuditError(ValueError):
  """The log does not verify; the message names the line (1-based)."""


def array_sha256(array: Any) -> str:
  """sha256 of dtype, shape and the C-order bytes of one array."""
  a = np.ascontiguousarray(np.asarray(array))
  h = hashlib.sha256()
  h.update(f"{a.dtype.str}|{a.shape}|".encode())
  h.update(a.tobytes())
  return h.hexdigest()


def tree_sha256(tree: Any) -> str:
  """sha256 over every leaf (with its path) of a pytree, in tree order."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    h.update(jax.tree_util.keystr(path).encode())
    h.update(array_sha256(leaf).encode())
  return h.hexdigest()


def canonical_json(obj: Any) -> str:
  """The one JSON text of `obj` that is hashed: sorted keys, no spaces, NaN refused."""
  return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def line_hash(entry: dict) -> str:
  """sha256 of the canonical JSON of `entry` without its "hash" field."""
  body = {k: v for k, v in entry.items() if k != "hash"}
  return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def _jsonable(value: Any) -> Any:
  """Plain JSON values: lists for arrays, None for NaN/inf."""
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (str, bool)) or value is None:
    return value
  a = np.asarray(value)
  if a.ndim:
    return [_jsonable(v) for v in a.tolist()]
  v = a.item()
  if isinstance(v, float) and not math.isfinite(v):
    return None
  return v


def round_metrics(metrics: dict) -> dict:
  """The metrics worth logging: no payload arrays, small arrays only."""
  out = {}
  for name, value in metrics.items():
    if name.startswith(PAYLOAD_PREFIX):
      continue
    a = np.asarray(value)
    if a.size <= _MAX_METRIC_SIZE:
      out[name] = _jsonable(a)
  return out


def site_update_hashes(metrics: dict, site_names: Sequence[str] | None) -> dict:
  """{site: sha256 of its encoded update} from the `payload[...]` metrics.

  Row c of every payload array is participant c (position `cohort[c]`);
  a site that appears twice (sampling with replacement) is named `site#2`.
  """
  names = sorted(n for n in metrics if n.startswith(PAYLOAD_PREFIX))
  if not names:
    return {}
  arrays = [np.asarray(metrics[n]) for n in names]
  rows = arrays[0].shape[0]
  cohort = np.asarray(metrics.get("cohort", np.arange(rows))).reshape(-1)
  out, seen = {}, {}
  for c in range(rows):
    h = hashlib.sha256()
    for name, a in zip(names, arrays):
      h.update(name.encode())
      h.update(array_sha256(a[c]).encode())
    base = _site_label(int(cohort[c]), site_names)
    seen[base] = seen.get(base, 0) + 1
    out[base if seen[base] == 1 else f"{base}#{seen[base]}"] = h.hexdigest()
  return out


def _site_label(position: int, site_names: Sequence[str] | None) -> str:
  if site_names is not None and 0 <= position < len(site_names):
    return str(site_names[position])
  return str(position)


def _model_change(before: Any, after: Any) -> Any:
  return jax.tree_util.tree_map(
      lambda a, b: np.asarray(b, np.float32) - np.asarray(a, np.float32), before, after)


# The audit log's per-round state files: one .npz whose sha256 goes into the log
# line (`fedjax_med.training.checkpoint.save_state_file`; orbax directories
# cannot be hashed as one file).
save_checkpoint = checkpoint_lib.save_state_file


def load_checkpoint(path: str, like: Any) -> Any:
  """The state saved by `save_checkpoint`, with the tree structure of `like`."""
  try:
    return checkpoint_lib.load_state_file(path, like)
  except ValueError as e:
    raise AuditError(str(e)) from None


HEAD_SUFFIX = ".head"


def head_path(path: str) -> str:
  """The sidecar file holding the log's head: `<path>.head`."""
  return path + HEAD_SUFFIX


def read_head(path: str) -> dict | None:
  """`{"hash", "lines"}` from `<path>.head`, or None if there is no such file."""
  hp = head_path(path)
  if not os.path.exists(hp):
    return None
  try:
    with open(hp) as f:
      head = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise AuditError(f"{hp}: the head file cannot be read ({e})") from None
  if (not isinstance(head, dict) or not isinstance(head.get("hash"), str)
      or isinstance(head.get("lines"), bool) or not isinstance(head.get("lines"), int)):
    raise AuditError(f"{hp}: the head file must hold {{\"hash\": str, \"lines\": int}},"
                     f" got {head!r}")
  return head


def _write_head(path: str, head_hash: str, lines: int) -> None:
  """Replaces `<path>.head` atomically (write a temporary file, then os.replace)."""
  hp = head_path(path)
  tmp = f"{hp}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(canonical_json({"hash": head_hash, "lines": int(lines)}) + "\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, hp)


class AuditLog:
  """Appends chained round lines to a JSONL file and keeps its head in `<path>.head`.

  Args:
    path: the log file; created (parent folders too) if absent or empty.
      An existing log is never emptied: if it holds lines (or `<path>.head`
      records some), `AuditLog` raises unless `resume=True`.
    checkpoint_dir: if given, the state before every round is saved there
      (`<run>_round<r>.npz`, run names sanitised) and its sha256 logged, so
      `replay` can re-run the round.
    resume: continue the chain of an existing log after `verify(path)`
      (which needs its `.head`); a missing or empty log starts a new chain.

  Raises:
    AuditError: the log exists and holds lines but `resume` is False (naming
      the path and the options), or `resume=True` and the log does not verify.
  """

  def __init__(self, path: str, checkpoint_dir: str | None = None, resume: bool = False):
    self.path = path
    self.checkpoint_dir = checkpoint_dir
    has_lines = os.path.exists(path) and os.path.getsize(path) > 0
    stored = read_head(path)
    recorded = stored is not None and stored["lines"] > 0
    if not resume and (has_lines or recorded):
      what = "holds lines" if has_lines else f"has a {HEAD_SUFFIX} file recording lines"
      raise AuditError(
          f"AuditLog: {path} already {what}; refusing to overwrite an audit log. Pass"
          f" resume=True to verify it and append to its chain, or choose another path"
          f" (or move {path} and {head_path(path)} away first to start a new log)")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    if checkpoint_dir is not None:
      os.makedirs(checkpoint_dir, exist_ok=True)
    if resume and (has_lines or recorded):
      if not os.path.exists(path):
        raise AuditError(f"AuditLog: {path} is missing but {head_path(path)} records"
                         f" {stored['lines']} lines")
      self.lines = verify(path)
      self.head = _last_hash(path)
    else:
      open(path, "w").close()
      self.head, self.lines = GENESIS, 0
      _write_head(path, self.head, 0)

  def append(self, entry: dict) -> dict:
    """Adds prev_hash and hash to `entry`, writes it as one line, updates `.head`; returns it."""
    entry = {**_jsonable(entry), "prev_hash": self.head}
    entry["hash"] = line_hash(entry)
    with open(self.path, "a") as f:
      f.write(canonical_json(entry) + "\n")
    self.head, self.lines = entry["hash"], self.lines + 1
    _write_head(self.path, self.head, self.lines)
    return entry

  def record_round(self, *, run: str, round_index: int, algorithm: str,
                   hyperparameters: dict, params_before: Any, params_after: Any,
                   metrics: dict, site_names: Sequence[str] | None = None,
                   checkpoint_sha256: str | None = None) -> dict:
    """Logs one round from the global model before/after and its metrics."""
    metrics = jax.device_get(metrics)
    cohort = np.asarray(metrics.get("cohort", [])).reshape(-1)
    entry = {
        "run": run,
        "round": int(round_index),
        "cohort": [_site_label(int(p), site_names) for p in cohort],
        "algorithm": algorithm,
        "hyperparameters": hyperparameters,
        "site_updates": site_update_hashes(metrics, site_names),
        "aggregate_sha256": tree_sha256(_model_change(params_before, params_after)),
        "model_sha256": tree_sha256(jax.device_get(params_after)),
        "metrics": round_metrics(metrics),
    }
    if checkpoint_sha256 is not None:
      entry["checkpoint_sha256"] = checkpoint_sha256
    return self.append(entry)

  def checkpoint_path(self, run: str, round_index: int) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in run)
    return os.path.join(self.checkpoint_dir, f"{safe}_round{int(round_index):05d}.npz")

  def run_callback(self, *, run: str, algorithm: str, hyperparameters: dict,
                   initial_state: Any, site_names: Sequence[str] | None = None
                   ) -> Callable[[int, Any, dict], None]:
    """A `fm.run_rounds` callback logging every round of one run.

    `initial_state` is the state the run starts from (its params are w_0).
    With `checkpoint_dir`, the state before round r is saved when round r-1
    is logged (and the initial state now), so every line has its checkpoint.
    """
    # The previous round's params are kept as a host copy: `fm.run_rounds` may donate
    # the state's device buffers to the next round.
    last = {"params": jax.device_get(initial_state.params)}
    if self.checkpoint_dir is not None:
      last["sha"] = save_checkpoint(initial_state, self.checkpoint_path(run, 0))

    def callback(round_index: int, state: Any, metrics: dict) -> None:
      self.record_round(run=run, round_index=round_index, algorithm=algorithm,
                        hyperparameters=hyperparameters,
                        params_before=last["params"], params_after=state.params,
                        metrics=metrics, site_names=site_names,
                        checkpoint_sha256=last.get("sha"))
      last["params"] = jax.device_get(state.params)
      if self.checkpoint_dir is not None:
        last["sha"] = save_checkpoint(state, self.checkpoint_path(run, round_index + 1))

    return callback


def _last_hash(path: str) -> str:
  head = GENESIS
  with open(path) as f:
    for line in f:
      if line.strip():
        head = json.loads(line)["hash"]
  return head


def read_lines(path: str) -> list[dict]:
  """The log's entries (no verification)."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def verify(path: str, expected_head: str | None = None, require_head: bool = True) -> int:
  """Recomputes every line's hash and the chain, checks the head; returns the line count.

  Args:
    path: the log.
    expected_head: a head hash kept elsewhere (published, signed); the last
      line's hash must equal it.
    require_head: without `expected_head`, the log's `<path>.head` (written
      by `AuditLog`) must exist. Whenever it exists it must match the last
      line's hash and the line count. Pass False only for a log without one
      (then lines missing at the end go unnoticed).

  Raises:
    AuditError naming the first bad line (1-based): not JSON, a missing
    field, an edited line (its hash differs), or a broken link (its
    prev_hash is not the previous line's hash: a line was deleted, inserted
    or reordered before it); or a log whose line count or last hash differs
    from its `.head` (lines missing at the end, or the last line rewritten),
    a missing `.head` (with `require_head`), or a last hash that is not
    `expected_head`.
  """
  prev = GENESIS
  count = 0
  with open(path) as f:
    for number, text in enumerate(f, start=1):
      if not text.strip():
        raise AuditError(f"{path}: line {number} is empty")
      try:
        entry = json.loads(text)
      except json.JSONDecodeError as e:
        raise AuditError(f"{path}: line {number} is not valid JSON ({e.msg})") from None
      if not isinstance(entry, dict) or "hash" not in entry or "prev_hash" not in entry:
        raise AuditError(f"{path}: line {number} lacks its hash or prev_hash field")
      try:
        recomputed = line_hash(entry)
      except ValueError as e:
        raise AuditError(f"{path}: line {number} cannot be hashed ({e})") from None
      if recomputed != entry["hash"]:
        raise AuditError(f"{path}: line {number} was modified: its content hashes to"
                         f" {recomputed[:12]}..., the line says {str(entry['hash'])[:12]}...")
      if entry["prev_hash"] != prev:
        what = ("the first line must start the chain" if number == 1
                else f"it is not the hash of line {number - 1}")
        raise AuditError(f"{path}: line {number} has a broken chain link (prev_hash"
                         f" {str(entry['prev_hash'])[:12]}...: {what}); a line was deleted,"
                         " inserted or reordered before it")
      prev = entry["hash"]
      count += 1
  stored = read_head(path)
  if stored is None and require_head and expected_head is None:
    raise AuditError(f"{path}: no head file {head_path(path)}, so lines missing at the end"
                     " cannot be detected; pass expected_head=<the last hash kept elsewhere>"
                     " or require_head=False to check the chain alone")
  if stored is not None and (stored["lines"] != count or stored["hash"] != prev):
    if stored["lines"] > count:
      why = "lines are missing at the end"
    elif stored["lines"] < count:
      why = ("lines were added after the head was written (or the writer stopped between"
             " a line and its head)")
    else:
      why = "the last line was rewritten"
    raise AuditError(f"{path}: the log has {count} lines ending in hash {prev[:12]}..., its"
                     f" head file {head_path(path)} records {stored['lines']} lines ending in"
                     f" {stored['hash'][:12]}...: {why}")
  if expected_head is not None and prev != expected_head:
    raise AuditError(f"{path}: the last line's hash {prev[:12]}... is not the expected head"
                     f" {expected_head[:12]}... (lines missing at the end?)")
  return count


def replay(path: str, line: int, algo, data, run_key: jax.Array, checkpoint_dir: str,
           like_state: Any, site_names: Sequence[str] | None = None) -> dict:
  """Re-runs the round logged on `line` (1-based) and checks its hashes.

  Loads `<checkpoint_dir>/<run>_round<r>.npz` (as written by `AuditLog`
  with `checkpoint_dir`), checks its sha256 against the line, runs
  `algo.round(state, data, fold_in(run_key, r))` (the key `fm.run_rounds`
  used) and compares the aggregate, model and per-site update hashes.

  Returns:
    The verified entry.

  Raises:
    AuditError naming the line when the chain, the checkpoint or a hash differs.
  """
  verify(path)
  entries = read_lines(path)
  if not 1 <= line <= len(entries):
    raise AuditError(f"{path}: no line {line} (the log has {len(entries)})")
  entry = entries[line - 1]
  r = entry["round"]
  safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in entry["run"])
  ckpt = os.path.join(checkpoint_dir, f"{safe}_round{int(r):05d}.npz")
  if "checkpoint_sha256" not in entry:
    raise AuditError(f"{path}: line {line} has no checkpoint_sha256 (log written without"
                     " checkpoint_dir)")
  with open(ckpt, "rb") as f:
    ckpt_sha = hashlib.sha256(f.read()).hexdigest()
  if ckpt_sha != entry["checkpoint_sha256"]:
    raise AuditError(f"{path}: line {line}: checkpoint {ckpt} does not match the logged"
                     " sha256")
  state = load_checkpoint(ckpt, like_state)
  new_state, metrics = algo.round(state, data, jax.random.fold_in(run_key, r))
  metrics = jax.device_get(metrics)
  checks = {
      "aggregate_sha256": tree_sha256(_model_change(state.params, new_state.params)),
      "model_sha256": tree_sha256(jax.device_get(new_state.params)),
      "site_updates": site_update_hashes(metrics, site_names),
  }
  for name, value in checks.items():
    if value != entry[name]:
      raise AuditError(f"{path}: line {line}: re-running round {r} gives a different"
                       f" {name}")
  return entry


__all__ = ["AuditError", "AuditLog", "GENESIS", "HEAD_SUFFIX", "head_path", "read_head", "array_sha256", "tree_sha256",
           "canonical_json", "line_hash", "verify", "replay", "read_lines",
           "save_checkpoint", "load_checkpoint", "site_update_hashes", "round_metrics"]
