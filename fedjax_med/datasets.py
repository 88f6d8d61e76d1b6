"""Real multi-site medical datasets, bundled with the package (no download).

    train, test = fedjax_med.datasets.heart_disease()   # K = 4 hospitals
"""

from fedjax_med.data.heart_disease import heart_disease

__all__ = ["heart_disease"]
