"""fm.audit: the hash-chained round log verifies untouched and names the line
when a field is edited, a line deleted, two lines swapped; replay from checkpoints."""

import hashlib
import json

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


def test_truncated_tail_needs_the_head(logged, tmp_path):
  lines = _lines(logged["path"])
  path = str(tmp_path / "truncated.jsonl")
  _write(path, lines[:3])
  assert audit.verify(path) == 3
  with pytest.raises(audit.AuditError, match="expected head"):
    audit.verify(path, expected_head=logged["head"])


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
  path = str(tmp_path / "resumed.jsonl")
  _write(path, _lines(logged["path"]))
  log = audit.AuditLog(path, resume=True)
  log.append({"run": "note", "round": 99, "metrics": {"x": float("nan")}})
  assert audit.verify(path) == 5
  assert audit.read_lines(path)[-1]["metrics"]["x"] is None
