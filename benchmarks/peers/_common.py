"""Shared pieces of the W4 peer scripts (`pfl_w4.py`, `flower_w4.py`, `check_equal.py`).

W4 (see `benchmarks/cnn_round.py`): 1,000 users x 50 synthetic images 32 x 32 x 3,
cohort 50, local batch 10, one local epoch (5 SGD steps, lr 0.1), server SGD lr 1.0,
pfl-research's `simple_cnn` in PyTorch:

    Transpose NHWC -> NCHW, Conv 3->32 3x3 VALID, ReLU, Conv 32->64 3x3 VALID, ReLU,
    MaxPool 2, [Dropout 0.25], Flatten (C, H, W order), Linear 12544->128, ReLU,
    [Dropout 0.5], Linear 128->10                        (1,626,442 parameters)

Only torch and numpy here (the peers' interpreter need not have jax).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform

import numpy as np

NUM_USERS, IMAGES, COHORT, BATCH, LR, SERVER_LR = 1000, 50, 50, 10, 0.1, 1.0
NUM_PARAMS = 1_626_442


def synthetic_data(num_users: int = NUM_USERS, images: int = IMAGES):
  """The W4 data, drawn exactly as `cnn_round.py` draws it.

  Returns:
    x float32 [num_users, images, 32, 32, 3] (NHWC, standard normal),
    y int32 [num_users, images] (uniform in 0..9); numpy.random.default_rng(0).
  """
  rng = np.random.default_rng(0)
  x = rng.normal(size=(num_users, images, 32, 32, 3)).astype(np.float32)
  y = rng.integers(0, 10, size=(num_users, images)).astype(np.int32)
  return x, y


def simple_cnn(dropout: bool = False):
  """pfl-research's `benchmarks/model/pytorch/cnn.py:simple_cnn` for 32x32x3 inputs.

  Args:
    dropout: keep pfl's two Dropout layers (0.25 after the pool, 0.5 after the
      hidden Dense). False (default) drops them, so that the network computes the
      same function as the flax `SimpleCNN` of `cnn_round.py` (which has none).

  Returns:
    An `nn.Sequential` with pfl's `loss(x, y)` (mean cross-entropy, train mode)
    and `metrics(x, y)` methods, weights Glorot-uniform as in pfl.
  """
  import torch  # pylint: disable=import-outside-toplevel
  from torch import nn  # pylint: disable=import-outside-toplevel

  class Transpose2D(nn.Module):
    """NHWC -> NCHW, pfl's `layer.Transpose2D`."""

    def forward(self, inputs):
      return inputs.permute((0, 3, 1, 2))

  class SimpleCNN(nn.Sequential):
    """nn.Sequential with pfl's `loss` and `metrics` methods attached."""

    def loss(self, inputs, targets, eval=False):  # pylint: disable=redefined-builtin
      self.eval() if eval else self.train()  # pylint: disable=expression-not-assigned
      return nn.functional.cross_entropy(self(inputs), targets.long())

    @torch.no_grad()
    def metrics(self, inputs, targets, eval=True):  # pylint: disable=redefined-builtin
      from pfl.metrics import Weighted  # pylint: disable=import-outside-toplevel
      self.eval() if eval else self.train()  # pylint: disable=expression-not-assigned
      logits = self(inputs)
      n = len(inputs)
      loss = nn.functional.cross_entropy(logits, targets.long(), reduction="sum").item()
      correct = (logits.argmax(-1) == targets.long()).float().sum().item()
      return {"loss": Weighted(loss, n), "accuracy": Weighted(correct, n)}

  layers = [Transpose2D(), nn.Conv2d(3, 32, kernel_size=(3, 3)), nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=(3, 3)), nn.ReLU(), nn.MaxPool2d((2, 2))]
  layers += [nn.Dropout(0.25)] if dropout else []
  layers += [nn.Flatten(), nn.Linear(14 * 14 * 64, 128), nn.ReLU()]
  layers += [nn.Dropout(0.5)] if dropout else []
  layers += [nn.Linear(128, 10)]
  model = SimpleCNN(*layers)
  for m in model.modules():
    if isinstance(m, (nn.Conv2d, nn.Linear)):
      torch.nn.init.xavier_uniform_(m.weight)
  assert sum(p.numel() for p in model.parameters()) == NUM_PARAMS
  return model


def _status_kib(pid: int, field: str) -> int:
  with open(f"/proc/{pid}/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  return 0


def _pss_kib(pid: int) -> int:
  with open(f"/proc/{pid}/smaps_rollup") as f:
    for line in f:
      if line.startswith("Pss:"):
        return int(line.split()[1])
  return 0


def peak_rss_mib() -> float:
  """This process's `VmHWM` (peak resident set) in MiB."""
  return _status_kib(os.getpid(), "VmHWM") / 1024.0


def tree_memory_mib(root: int | None = None) -> dict:
  """Memory of a process and all its descendants (e.g. Ray's raylet, GCS, workers).

  Returns:
    {"processes": count, "hwm_sum_mib": sum of each process's VmHWM (peak RSS),
     "rss_sum_mib": sum of current VmRSS, "pss_sum_mib": sum of current PSS
     (shared pages split between the processes that map them)}. Sums of RSS count a
    shared page (libtorch's code, Ray's object store) once per process mapping it;
    PSS does not.
  """
  import psutil  # pylint: disable=import-outside-toplevel
  root_proc = psutil.Process(root or os.getpid())
  procs = [root_proc] + root_proc.children(recursive=True)
  out = {"processes": 0, "hwm_sum_mib": 0.0, "rss_sum_mib": 0.0, "pss_sum_mib": 0.0}
  for p in procs:
    try:
      hwm, rss, pss = (_status_kib(p.pid, "VmHWM"), _status_kib(p.pid, "VmRSS"),
                       _pss_kib(p.pid))
    except (OSError, ValueError):
      continue  # exited meanwhile
    out["processes"] += 1
    out["hwm_sum_mib"] += hwm / 1024.0
    out["rss_sum_mib"] += rss / 1024.0
    out["pss_sum_mib"] += pss / 1024.0
  return out


def versions(*packages: str) -> dict:
  """Installed versions of `packages` (plus Python's)."""
  out = {"python": platform.python_version()}
  for name in packages:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out
