"""What the benchmark scripts share, importable without jax (torch rows must not
pay for importing JAX): the peak resident memory of this process.

`fedjax_med.training.memory` holds the same reader (and a reset) for code that
has fedjax_med imported anyway (the experiments); this copy exists so that a
torch-only row's memory is torch's alone.
"""

from __future__ import annotations

import resource


def peak_rss_mib() -> float:
  """Peak resident memory of this process so far, MiB.

  VmHWM (the high-water mark of this process's address space) where Linux has
  it; ru_maxrss otherwise. ru_maxrss survives execve on Linux (a fresh worker
  would start at its parent's peak), VmHWM does not.
  """
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024.0  # kB
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
