"""fm.audit: the hash-chained round log verifies untouched and names the line
when a field is edited, a line deleted, two lines swapped; replay from checkpoints."""

import hashlib
import json
import os

import jax
import numpy as np
import optax
import pytest

import fedjax_med as fm
from conftest import bce_loss, init_params, make_sites
from fedjax_med import audit
from fedjax_med import compression

SGD = optax.sgd(0.2)
NAMES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
  """4 logged FedAvg rounds with a QSGD uplink (payloads recorded) and checkpoints."""
  folder = tmp_path_factory.mktemp("audit")
  data = fm.FederatedData.from_sites(make_sites([5, 3, 4]), NAMES)
  comm = compression.communication(compression.qsgd(8), record_payloads=True)
  algo = fm.algorithms.fedavg(bce_loss, client_optimizer=SGD, batch_size=2,
                              aggregator=comm.aggregator)
  state0 = algo.init(init_params(), 3)
  log = audit.AuditLog(str(folder / "run.jsonl"), checkpoint_dir=str(folder / "ckpt"))
  run_key = jax.random.PRNGKey(3)
  history = []
  callback = log.run_callback(run="toy/qsgd8/seed0", algorithm="fedavg+qsgd8",
                              hyperparameters={"lr": 0.2, "batch_size": 2},
                              initial_state=state0, site_names=NAMES)

  def both(r, state, metrics):
    history.append((state, jax.device_get(metrics)))
    callback(r, state, metrics)

  fm.run_rounds(algo, state0, data, 4, run_key, progress=False, callback=both)
  return {"path": str(folder / "run.jsonl"), "ckpt": str(folder / "ckpt"), "algo": algo,
          "data": data, "run_key": run_key, "state0": state0, "history": history,
          "head": log.head}


def _lines(path):
  with open(path) as f:
    return f.read().splitlines()


def _write(path, lines):
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def test_untouched_log_verifies_and_holds_the_fields(logged):
  assert audit.verify(logged["path"], expected_head=logged["head"]) == 4
  entries = audit.read_lines(logged["path"])
  assert [e["round"] for e in entries] == [0, 1, 2, 3]
  assert entries[0]["prev_hash"] == audit.GENESIS
  for prev, entry in zip(entries, entries[1:]):
    assert entry["prev_hash"] == prev["hash"]
  first = entries[0]
  assert first["cohort"] == NAMES and first["algorithm"] == "fedavg+qsgd8"
  assert first["hyperparameters"] == {"lr": 0.2, "batch_size": 2}
  assert set(first["site_updates"]) == set(NAMES)
  assert first["metrics"]["bytes_up"] == [12, 12, 12]   # 8-bit codes + norm: w (3 + 4), b (1 + 4)
  assert "checkpoint_sha256" in first


def test_hashes_are_independent_recomputations(logged):
  """Site hashes from the payload rows, model hash from the parameters (hashlib)."""
  entries = audit.read_lines(logged["path"])
  state, metrics = logged["history"][1]
  payload_names = sorted(n for n in metrics if n.startswith("payload"))
  h = hashlib.sha256()
  for name in payload_names:
    row = np.ascontiguousarray(np.asarray(metrics[name])[2])
    h.update(name.encode())
    h.update(hashlib.sha256(f"{row.dtype.str}|{row.shape}|".encode() + row.tobytes())
             .hexdigest().encode())
  assert entries[1]["site_updates"]["c"] == h.hexdigest()
  assert entries[1]["model_sha256"] == audit.tree_sha256(jax.device_get(state.params))
  before = logged["history"][0][0].params
  change = jax.tree_util.tree_map(lambda a, b: np.asarray(b) - np.asarray(a), before,
                                  state.params)
  assert entries[1]["aggregate_sha256"] == audit.tree_sha256(change)


def test_edited_field_fails_naming_the_line(logged, tmp_path):
  lines = _lines(logged["path"])
  entry = json.loads(lines[1])
  entry["metrics"]["train_loss"] = entry["metrics"]["train_loss"] + 1e-3
  lines[1] = json.dumps(entry)
  path = str(tmp_path / "edited.jsonl")
  _write(path, lines)
  with pytest.raises(audit.AuditError, match="line 2 was modified"):
    audit.verify(path)


@pytest.mark.parametrize("field,value", [("cohort", ["a", "b"]), ("round", 7),
                                         ("hyperparameters", {"lr": 0.3, "batch_size": 2})])
def test_any_edited_field_fails(logged, tmp_path, field, value):
  lines = _lines(logged["path"])
  entry = json.loads(lines[2])
  entry[field] = value
  lines[2] = json.dumps(entry)
  path = str(tmp_path / "edited.jsonl")
  _write(path, lines)
  with pytest.raises(audit.AuditError, match="line 3"):
    audit.verify(path)


def test_rehashed_edit_breaks_the_next_link(logged, tmp_path):
  """A forger who also recomputes the edited line's hash is caught at the next line."""
  lines = _lines(logged["path"])
  entry = json.loads(lines[1])
  entry["model_sha256"] = "f" * 64
  entry["hash"] = audit.line_hash(entry)
  lines[1] = json.dumps(entry)
  path = str(tmp_path / "rehashed.jsonl")
  _write(path, lines)
  with pytest.raises(audit.AuditError, match="line 3 has a broken chain link"):
    audit.verify(path)


def test_deleted_line_fails_naming_the_line(logged, tmp_path):
  lines = _lines(logged["path"])
  path = str(tmp_path / "deleted.jsonl")
  _write(path, lines[:2] + lines[3:])
  with pytest.raises(audit.AuditError, match="line 3 has a broken chain link"):
    audit.verify(path)
  _write(path, lines[1:])
  with pytest.raises(audit.AuditError, match="line 1 has a broken chain link"):
    audit.verify(path)


def test_swapped_lines_fail_naming_the_line(logged, tmp_path):
  lines = _lines(logged["path"])
  lines[1], lines[2] = lines[2], lines[1]
  path = str(tmp_path / "swapped.jsonl")
  _write(path, lines)
  with pytest.raises(audit.AuditError, match="line 2 has a broken chain link"):
    audit.verify(path)


def test_a_copy_without_its_head_file_needs_a_head(logged, tmp_path):
  """Lines copied without `.head`: verify(path) refuses to vouch for the tail; the chain
  alone (require_head=False) cannot see the truncation, a kept head can."""
  lines = _lines(logged["path"])
  path = str(tmp_path / "truncated.jsonl")
  _write(path, lines[:3])
  with pytest.raises(audit.AuditError, match="no head file"):
    audit.verify(path)
  assert audit.verify(path, require_head=False) == 3
  with pytest.raises(audit.AuditError, match="expected head"):
    audit.verify(path, expected_head=logged["head"])
  _write(path, lines)
  assert audit.verify(path, expected_head=logged["head"]) == 4


def test_garbage_line_fails_naming_the_line(logged, tmp_path):
  lines = _lines(logged["path"])
  lines[3] = lines[3][:-5]
  path = str(tmp_path / "garbage.jsonl")
  _write(path, lines)
  with pytest.raises(audit.AuditError, match="line 4 is not valid JSON"):
    audit.verify(path)


def test_replay_from_checkpoint_confirms_the_round(logged, tmp_path):
  entry = audit.replay(logged["path"], 3, logged["algo"], logged["data"], logged["run_key"],
                       logged["ckpt"], logged["state0"], site_names=NAMES)
  assert entry["round"] == 2
  # A different key (another run) gives different hashes.
  with pytest.raises(audit.AuditError, match="line 3: re-running round 2"):
    audit.replay(logged["path"], 3, logged["algo"], logged["data"], jax.random.PRNGKey(99),
                 logged["ckpt"], logged["state0"], site_names=NAMES)


def test_resume_continues_the_chain(logged, tmp_path):
  path = _copy_log(logged, tmp_path, "resumed")
  log = audit.AuditLog(path, resume=True)
  log.append({"run": "note", "round": 99, "metrics": {"x": float("nan")}})
  assert audit.verify(path) == 5
  assert audit.read_lines(path)[-1]["metrics"]["x"] is None
  assert audit.read_head(path) == {"hash": log.head, "lines": 5}

# ----------------------------------------------------------------------------- attacks
# Each attack below is checked against a hash chain recomputed here with hashlib and
# json (not audit.line_hash): sha256 of the line's JSON without "hash", keys sorted,
# separators (",", ":"); prev_hash of line 1 is 64 zeros, of line i the hash of line i-1.


def _chain(lines):
  """(every line's own hash is right, every link is right, last hash) by hashlib."""
  prev, own_ok, links_ok = "0" * 64, True, True
  for text in lines:
    entry = json.loads(text)
    body = {k: v for k, v in entry.items() if k != "hash"}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"))
                            .encode()).hexdigest()
    own_ok &= digest == entry["hash"]
    links_ok &= entry["prev_hash"] == prev
    prev = entry["hash"]
  return own_ok, links_ok, prev


def _copy_log(logged, tmp_path, name):
  """A copy of the logged run: the log and whatever else AuditLog wrote beside it."""
  import shutil
  folder = tmp_path / name
  folder.mkdir()
  src = logged["path"]
  for f in os.listdir(os.path.dirname(src)):
    if f.startswith(os.path.basename(src)):
      shutil.copy(os.path.join(os.path.dirname(src), f), folder / f)
  return str(folder / os.path.basename(src))


def test_the_untouched_chain_checks_out_by_hashlib(logged):
  own_ok, links_ok, last = _chain(_lines(logged["path"]))
  assert own_ok and links_ok and last == logged["head"]
  assert audit.verify(logged["path"]) == 4


@pytest.mark.parametrize("drop", [1, 2])
def test_attack_truncate_the_last_lines_is_caught_without_the_callers_head(
    logged, tmp_path, drop):
  """Deleting the last line(s) leaves a chain that checks out by hashlib; verify(path)
  alone, with no head kept by the caller, must still see that lines are missing."""
  path = _copy_log(logged, tmp_path, f"truncated{drop}")
  lines = _lines(path)
  _write(path, lines[:-drop])
  own_ok, links_ok, _ = _chain(lines[:-drop])
  assert own_ok and links_ok            # invisible to the chain itself
  with pytest.raises(audit.AuditError, match=f"{4 - drop} lines.*4"):
    audit.verify(path)


def test_attack_empty_the_log_is_caught(logged, tmp_path):
  path = _copy_log(logged, tmp_path, "emptied")
  _write(path, [])
  open(path, "w").close()
  with pytest.raises(audit.AuditError, match="0 lines.*4"):
    audit.verify(path)


def test_attack_delete_a_middle_line(logged, tmp_path):
  path = _copy_log(logged, tmp_path, "middle")
  lines = _lines(path)
  _write(path, lines[:1] + lines[2:])
  own_ok, links_ok, _ = _chain(lines[:1] + lines[2:])
  assert own_ok and not links_ok
  with pytest.raises(audit.AuditError, match="line 2 has a broken chain link"):
    audit.verify(path)


def test_attack_edit_a_value(logged, tmp_path):
  path = _copy_log(logged, tmp_path, "edited")
  lines = _lines(path)
  entry = json.loads(lines[3])
  entry["metrics"]["bytes_up"] = [1, 1, 1]
  lines[3] = json.dumps(entry)
  _write(path, lines)
  own_ok, _, _ = _chain(lines)
  assert not own_ok
  with pytest.raises(audit.AuditError, match="line 4 was modified"):
    audit.verify(path)


def test_attack_edit_the_last_line_and_rehash_it(logged, tmp_path):
  """A forger who edits the last line and recomputes its hash keeps the chain whole;
  the stored head no longer matches."""
  path = _copy_log(logged, tmp_path, "rehashed_last")
  lines = _lines(path)
  entry = json.loads(lines[3])
  entry["model_sha256"] = "f" * 64
  body = {k: v for k, v in entry.items() if k != "hash"}
  entry["hash"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"))
                                 .encode()).hexdigest()
  lines[3] = json.dumps(entry)
  _write(path, lines)
  own_ok, links_ok, _ = _chain(lines)
  assert own_ok and links_ok
  with pytest.raises(audit.AuditError, match="head"):
    audit.verify(path)


def test_attack_reopen_without_resume_refuses_and_keeps_the_history(logged, tmp_path):
  path = _copy_log(logged, tmp_path, "reopened")
  with open(path, "rb") as f:
    before = hashlib.sha256(f.read()).hexdigest()
  with pytest.raises(audit.AuditError) as err:
    audit.AuditLog(path)
  message = str(err.value)
  assert path in message and "resume=True" in message
  with open(path, "rb") as f:
    assert hashlib.sha256(f.read()).hexdigest() == before
  assert audit.verify(path) == 4
  # resume=True continues the same chain, and the stored head follows.
  log = audit.AuditLog(path, resume=True)
  log.append({"run": "note", "round": 4})
  lines = _lines(path)
  own_ok, links_ok, last = _chain(lines)
  assert own_ok and links_ok and len(lines) == 5 and last == log.head
  assert audit.verify(path) == 5


def test_a_new_log_and_an_empty_file_are_fine(tmp_path):
  path = str(tmp_path / "sub" / "new.jsonl")
  log = audit.AuditLog(path)
  assert audit.verify(path) == 0
  log.append({"run": "x", "round": 0})
  assert audit.verify(path) == 1
  empty = str(tmp_path / "empty.jsonl")
  open(empty, "w").close()
  audit.AuditLog(empty).append({"run": "y", "round": 0})
  assert audit.verify(empty) == 1


def test_module_docstring_example_runs(tmp_path, monkeypatch):
  """The example at the top of fedjax_med/audit.py, executed as written."""
  doc = audit.__doc__
  block = doc[doc.index("\n\n") + 2:doc.index("\n\nEach line")]
  code = "\n".join(line[4:] for line in block.splitlines())
  monkeypatch.chdir(tmp_path)
  namespace = {}
  exec(compile(code, "audit-docstring", "exec"), namespace)
  assert audit.verify(str(tmp_path / "run.audit.jsonl")) >= 1


def test_a_line_without_its_head_update_is_reported(logged, tmp_path):
  """A writer that stopped between a line and its head (or a forged extra line)."""
  path = _copy_log(logged, tmp_path, "extra")
  lines = _lines(path)
  last = json.loads(lines[-1])
  body = {"run": "extra", "round": 4, "prev_hash": last["hash"]}
  body["hash"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"))
                                .encode()).hexdigest()
  _write(path, lines + [json.dumps(body)])
  with pytest.raises(audit.AuditError, match="5 lines.*records 4 lines.*added"):
    audit.verify(path)


def test_attack_delete_the_log_keeps_its_head_and_refuses_a_fresh_start(logged, tmp_path):
  """The log file removed (or emptied): its .head still records 4 lines, so neither a new
  AuditLog nor resume=True silently starts over, and verify reports the loss."""
  path = _copy_log(logged, tmp_path, "deleted")
  os.remove(path)
  with pytest.raises(audit.AuditError, match="head file recording lines"):
    audit.AuditLog(path)
  with pytest.raises(audit.AuditError, match="is missing but .* records 4 lines"):
    audit.AuditLog(path, resume=True)
  open(path, "w").close()
  with pytest.raises(audit.AuditError, match="0 lines.*records 4 lines.*missing at the end"):
    audit.AuditLog(path, resume=True)
