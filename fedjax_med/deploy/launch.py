"""A Flower deployment on one machine: SuperLink + one SuperNode per site, as processes.

    with fm.deploy.launch.local_federation(num_sites=4, workdir="/tmp/fl") as fed:
      fed.run("experiments/heart_disease_flower", {"algorithm": "scaffold",
                                                   "num-rounds": 3, "out-dir": "/tmp/out"})

For demos and tests: every process listens on loopback only (127.0.0.1) and
runs in Flower's INSECURE mode (no TLS, no node authentication); a real
deployment starts `flower-superlink` with TLS certificates and node
authentication, and each hospital starts its own `flower-supernode` (see
docs/deployment.md). The processes are separate process groups, stopped when
the `with` block ends, also on an error or a timeout. Logs are in `workdir`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from typing import Any


def free_port() -> int:
  """A TCP port free on 127.0.0.1 now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_port(port: int, deadline: float, process: subprocess.Popen, log: str) -> None:
  while time.monotonic() < deadline:
    if process.poll() is not None:
      raise RuntimeError(f"the SuperLink exited with code {process.returncode}; see {log}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
      if s.connect_ex(("127.0.0.1", port)) == 0:
        return
    time.sleep(0.1)
  raise TimeoutError(f"the SuperLink did not open port {port} in time; see {log}")


def _toml_value(value: Any) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (int, float)):
    return repr(value)
  return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclasses.dataclass
class LocalFederation:
  """A running SuperLink and its SuperNodes (`local_federation`)."""
  address: str
  workdir: str
  env: dict
  bin_dir: str
  processes: list

  def run(self, app_dir: str, run_config: dict | None = None, *, timeout: float = 600.0
          ) -> subprocess.CompletedProcess:
    """`flwr run app_dir` on this federation (`--stream`: waits for the run's end).

    Raises:
      RuntimeError: `flwr run` failed (its output is in the message).
      subprocess.TimeoutExpired: the run took longer than `timeout` seconds.
    """
    cmd = [os.path.join(self.bin_dir, "flwr"), "run", os.path.abspath(app_dir), "local-deployment",
           "--stream"]
    if run_config:
      cmd += ["--run-config", " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())]
    done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    with open(os.path.join(self.workdir, "flwr-run.log"), "a") as f:
      f.write(f"$ {shlex.join(cmd)}\n{done.stdout}\n{done.stderr}\n")
    if done.returncode != 0:
      raise RuntimeError(f"flwr run failed ({done.returncode}):\n{done.stdout[-3000:]}"
                         f"\n{done.stderr[-3000:]}")
    return done


def _stop(processes: list, grace: float = 10.0) -> None:
  for p in processes:
    if p.poll() is None:
      with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGTERM)
  deadline = time.monotonic() + grace
  for p in processes:
    try:
      p.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)
      p.wait()


@contextlib.contextmanager
def local_federation(num_sites: int, workdir: str, *, node_config: dict | None = None,
                     startup_timeout: float = 60.0, env: dict | None = None):
  """Starts a SuperLink and `num_sites` SuperNodes (node config `site=k`) on loopback.

  Args:
    num_sites: K; SuperNode k gets `--node-config "site=k"` plus `node_config`.
    workdir: logs, the SuperLink's database and `FLWR_HOME` (the `flwr` CLI's
      connection `local-deployment`).
    startup_timeout: seconds for the SuperLink to listen.
    env: extra environment variables for every process.

  Yields:
    `LocalFederation`; `.run(app_dir, run_config)` runs an app on it.
  """
  os.makedirs(workdir, exist_ok=True)
  bin_dir = os.path.dirname(sys.executable)
  if not os.path.exists(os.path.join(bin_dir, "flower-superlink")):
    raise FileNotFoundError(f"flower-superlink is not in {bin_dir}: pip install"
                            " 'fedjax_med[flower]' into this environment")
  port = free_port()
  home = os.path.join(workdir, "flwr_home")
  os.makedirs(home, exist_ok=True)
  with open(os.path.join(home, "config.toml"), "w") as f:
    f.write('[superlink]\ndefault = "local-deployment"\n\n[superlink.local-deployment]\n'
            f'address = "127.0.0.1:{port}"\ninsecure = true\n')
  # No telemetry (telemetry.flower.ai) and no update check from any process.
  full_env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              **(env or {}), "FLWR_HOME": home,
              "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
  processes = []

  def start(name: str, cmd: list) -> subprocess.Popen:
    log = open(os.path.join(workdir, f"{name}.log"), "w")  # pylint: disable=consider-using-with
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                         start_new_session=True, cwd=workdir)
    processes.append(p)
    return p

  try:
    link = start("superlink", [
        os.path.join(bin_dir, "flower-superlink"), "--insecure", "--host", "127.0.0.1",
        "--port", str(port), "--database", os.path.join(workdir, "superlink.db"),
        "--disable-runtime-dependency-installation"])
    _wait_port(port, time.monotonic() + startup_timeout, link,
               os.path.join(workdir, "superlink.log"))
    for k in range(num_sites):
      config = " ".join(f"{key}={_toml_value(v)}" for key, v in
                        {"site": k, **(node_config or {})}.items())
      start(f"supernode{k}", [
          os.path.join(bin_dir, "flower-supernode"), "--insecure",
          "--superlink", f"127.0.0.1:{port}", "--node-config", config,
          "--host", "127.0.0.1", "--port", str(free_port())])
    yield LocalFederation(f"127.0.0.1:{port}", workdir, full_env, bin_dir, processes)
  finally:
    _stop(processes)


__all__ = ["local_federation", "LocalFederation", "free_port"]
