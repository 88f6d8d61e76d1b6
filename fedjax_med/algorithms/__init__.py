"""Federated algorithms, each an (init, round) pair in its own small file."""

from fedjax_med.algorithms.fedavg import fedavg
from fedjax_med.algorithms.fedsgd import fedsgd
from fedjax_med.algorithms.local import local_only

__all__ = ["fedavg", "fedsgd", "local_only"]
