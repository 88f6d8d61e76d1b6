"""Resident memory of this process, for the benchmarks' and experiments' memory columns.

Linux keeps each process's resident set size (VmRSS) and its high-water mark
(VmHWM) in `/proc/self/status`; writing "5" to `/proc/self/clear_refs` (Linux
>= 4.0) resets the mark to the current RSS, so a measured step gets a peak of
its own. Elsewhere the peak is `resource.getrusage(RUSAGE_SELF).ru_maxrss`
(which survives `execve` on Linux, hence VmHWM first) and cannot be reset.
All values in MiB.
"""

from __future__ import annotations


def _status_mib(field: str) -> float | None:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) / 1024.0          # kB
  except OSError:
    pass
  return None


def peak_rss_mib() -> float:
  """Peak resident memory of this process since its start or the last
  `reset_peak_rss()`: VmHWM, else ru_maxrss (KiB on Linux, bytes on macOS)."""
  peak = _status_mib("VmHWM")
  if peak is not None:
    return peak
  import resource  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  scale = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def rss_mib() -> float | None:
  """Current resident memory of this process (VmRSS); None where /proc is absent."""
  return _status_mib("VmRSS")


def reset_peak_rss() -> bool:
  """Resets the high-water mark to the current RSS (`clear_refs` 5); False where the
  kernel does not allow it (then `peak_rss_mib` keeps the process's peak so far)."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


__all__ = ["peak_rss_mib", "rss_mib", "reset_peak_rss"]
