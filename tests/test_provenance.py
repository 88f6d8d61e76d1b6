"""Provenance in results.json: every record says which code and libraries made it.

`fm.report.save_records` stamps each record with the fedjax_med, jax and jaxlib
versions, the git commit of the checkout fedjax_med is imported from, jax's device
and the host CPU with its vector-instruction flags (`fm.report.provenance()`). The expected values here come from elsewhere:
installed package metadata (`importlib.metadata`), git run by the test itself,
and throwaway git repositories built in the test.
"""

import importlib.metadata
import json
import os
import pathlib
import shutil
import subprocess

import jax
import pytest

import fedjax_med as fm
from fedjax_med import report

REPO = pathlib.Path(fm.__file__).resolve().parent.parent
GIT = shutil.which("git")
needs_git = pytest.mark.skipif(GIT is None, reason="git is not installed")


def _git(cwd, *args):
  env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
  env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.org", GIT_COMMITTER_NAME="t",
             GIT_COMMITTER_EMAIL="t@example.org")
  return subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True,
                        env=env, check=True).stdout.strip()


def _records():
  out = report.records_from_report("toy", "A", 0, "test", {"s1": {"accuracy": 0.7}})
  out += report.run_records("toy", "A", 0, {"epsilon": 2.0},
                            neighboring_relation="replace_one")
  return out


def test_every_written_record_carries_the_versions(tmp_path):
  records = _records()
  given = json.loads(json.dumps(records))
  path = report.save_records(records, str(tmp_path))
  assert records == given                     # the caller's records are not changed
  with open(path) as f:
    written = json.load(f)
  assert len(written) == len(records)
  for r, original in zip(written, records):
    assert set(report.PROVENANCE_FIELDS) <= set(r)
    assert {k: v for k, v in r.items() if k not in report.PROVENANCE_FIELDS} == original
    assert r["fedjax_med_version"] == fm.__version__
    assert r["jax_version"] == jax.__version__ == importlib.metadata.version("jax")
    assert r["jaxlib_version"] == importlib.metadata.version("jaxlib")
    device = jax.devices()[0]
    assert r["device"] == f"{device.platform}: {device.device_kind}"
  if os.path.exists("/proc/cpuinfo"):
    # The first CPU's model name and flags, read here line by line; the record lists the
    # model and, in brackets, which of the ISA flags the CPU has.
    lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    first = lambda key: next((l.split(":", 1)[1].strip() for l in lines
                              if l.split(":")[0].strip() == key), None)
    flags = (first("flags") or first("Features") or "").split()
    cpu = written[0]["cpu"]
    model = first("model name") or first("Model") or first("CPU part")
    assert cpu.startswith(f"{model} [") and cpu.endswith("]"), cpu
    listed = cpu[len(model) + 2:-1].split()
    assert set(listed) <= set(flags)
    assert ("avx2" in listed) == ("avx2" in flags)
    assert ("avx512f" in listed) == ("avx512f" in flags)
  assert len({json.dumps({k: r[k] for k in report.PROVENANCE_FIELDS}) for r in written}) == 1


@needs_git
def test_git_commit_is_the_checkout_head():
  try:
    top = _git(REPO, "rev-parse", "--show-toplevel")
  except subprocess.CalledProcessError:
    pytest.skip("fedjax_med is not imported from a git checkout")
  if pathlib.Path(top).resolve() != REPO:
    pytest.skip("fedjax_med's folder is not the top of a git work tree")
  head = _git(REPO, "rev-parse", "HEAD")
  dirty = _git(REPO, "status", "--porcelain") != ""
  commit = report.provenance()["git_commit"]
  assert len(head) == 40 and commit == head + ("-dirty" if dirty else "")


@needs_git
def test_git_commit_in_a_fresh_repository(tmp_path):
  repo = tmp_path / "checkout"
  package = repo / "pkg"
  package.mkdir(parents=True)
  (package / "__init__.py").write_text("x = 1\n")
  assert report._git_commit(str(package)) is None          # not a git checkout
  _git(repo, "init", "-q")
  assert report._git_commit(str(package)) is None          # no commit yet
  _git(repo, "add", "pkg/__init__.py")
  _git(repo, "commit", "-q", "-m", "one")
  head = _git(repo, "rev-parse", "HEAD")
  assert report._git_commit(str(package)) == head
  (package / "__init__.py").write_text("x = 2\n")            # modified tracked file
  assert report._git_commit(str(package)) == head + "-dirty"
  _git(repo, "checkout", "-q", "--", "pkg/__init__.py")
  assert report._git_commit(str(package)) == head
  (package / "new.py").write_text("")                      # untracked file
  assert report._git_commit(str(package)) == head + "-dirty"
  # A package installed deeper inside some repository (a venv's site-packages in
  # a checkout) is not that repository's code: no commit.
  nested = repo / "venv" / "site-packages" / "pkg"
  nested.mkdir(parents=True)
  assert report._git_commit(str(nested)) is None


def test_no_git_gives_none(tmp_path, monkeypatch):
  monkeypatch.setenv("PATH", str(tmp_path))                 # no git executable on PATH
  assert report._git_commit(str(REPO / "fedjax_med")) is None
  assert report.provenance()["git_commit"] is None
  path = report.save_records(_records(), str(tmp_path))
  assert all(r["git_commit"] is None for r in report.load_records(path))


def test_records_that_carry_provenance_keep_it(tmp_path):
  old = [dict(r, fedjax_med_version="0.1.0", git_commit="abc") for r in _records()]
  path = report.save_records(old, str(tmp_path))
  for r in report.load_records(path):
    assert r["fedjax_med_version"] == "0.1.0" and r["git_commit"] == "abc"
    assert r["jax_version"] == jax.__version__
    assert r["device"] is None and r["cpu"] is None     # made elsewhere: not this machine


def test_a_stamp_taken_at_the_start_is_what_the_records_carry(tmp_path):
  """A long run takes provenance() when it starts and passes it as `stamp`: its records
  carry those values, not the ones save_records would find at the end (a commit made
  during the run)."""
  stamp = {f: f"at-start-{f}" for f in report.PROVENANCE_FIELDS}
  path = report.save_records(_records(), str(tmp_path), stamp=stamp)
  for r in report.load_records(path):
    assert {f: r[f] for f in report.PROVENANCE_FIELDS} == stamp
  # A record from an earlier run keeps its own values; the machine fields stay unknown.
  old = [dict(_records()[0], git_commit="abc")]
  (r,) = report.load_records(report.save_records(old, str(tmp_path), stamp=stamp))
  assert r["git_commit"] == "abc" and r["cpu"] is None and r["device"] is None
  assert r["jax_version"] == "at-start-jax_version"
  with pytest.raises(ValueError, match=r"missing \['git_commit'\]"):
    report.save_records(_records(), str(tmp_path),
                        stamp={f: "x" for f in report.PROVENANCE_FIELDS if f != "git_commit"})


def test_files_without_provenance_still_load_and_tabulate(tmp_path):
  """A results.json of version 0.1 (RECORD_FIELDS only), written by hand here."""
  rows = [{"dataset": "toy", "strategy": s, "seed": seed, "site": site, "split": "test",
           "metric": "accuracy", "value": v}
          for s, seed, site, v in (("A", 0, "s1", 0.7), ("A", 1, "s1", 0.8),
                                   ("A", 0, "mean", 0.7), ("A", 1, "mean", 0.8),
                                   ("B", 0, "s1", 0.6), ("B", 0, "mean", 0.6))]
  path = tmp_path / "results.json"
  path.write_text(json.dumps(rows))
  loaded = report.load_records(str(path))
  assert loaded == rows
  # mean 0.75, sample std |0.8 - 0.7| / sqrt(2) = 0.0707
  assert report.summary_table(loaded, "accuracy") == (
      "| accuracy (test) | s1 | mean |\n|---|---|---|\n"
      "| A | 0.750 ± 0.071 | 0.750 ± 0.071 |\n| B | 0.600 ± 0.000 | 0.600 ± 0.000 |")
  assert report.strategy_table(loaded).splitlines()[2:] == [
      "| A | 0.750 ± 0.071 |", "| B | 0.600 ± 0.000 |"]
  written = report.write_report(str(path))
  assert set(written) == {"report.md", "sites.png"}
