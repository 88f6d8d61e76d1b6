"""Real multi-site medical datasets, bundled with the package (no download).

    train, test = fedjax_med.datasets.heart_disease()   # K = 4 hospitals
    train, test = fedjax_med.datasets.tcga_brca()       # K = 6 regions, survival
"""

from fedjax_med.data.heart_disease import heart_disease
from fedjax_med.data.tcga_brca import tcga_brca

__all__ = ["heart_disease", "tcga_brca"]
