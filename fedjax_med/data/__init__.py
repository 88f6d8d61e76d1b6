"""Layer 3, data: real multi-site medical datasets bundled with the package (no
download), partitioners and federated standardisation.

One module per dataset (`fedjax_med.data.heart_disease`, ...); the loaders
are collected in `fedjax_med.data.datasets`, which is `fm.datasets`:

    train, test = fm.datasets.heart_disease()   # K = 4 hospitals
    parts = fm.partition.dirichlet(...)         # fedjax_med.data.partition
"""

from fedjax_med.data import datasets
from fedjax_med.data import partition

__all__ = ["datasets", "partition"]
