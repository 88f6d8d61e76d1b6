"""The dataset catalogue, `fm.datasets`: every loader of real multi-site medical data
bundled with the package (no download), one import away.

    train, test = fedjax_med.datasets.heart_disease()   # K = 4 hospitals
    train, test = fedjax_med.datasets.tcga_brca()       # K = 6 regions, survival
    train, test = fedjax_med.datasets.tox21()           # pharma partners (needs rdkit once)
    train, test = fedjax_med.datasets.parkinsons_telemonitoring()   # 42 home devices
    train, test = fedjax_med.datasets.breastmnist(num_sites=5, partition="dirichlet")
    train, test = fedjax_med.datasets.chase_db1(num_sites=5)        # retinal vessels
    train, test = fedjax_med.datasets.msd_hippocampus(num_sites=4)  # 3D MRI, simulated sites
    train, test = fedjax_med.datasets.from_tfds("mnist", data_dir=...)  # [tfds] extra
    stats, train, test = fedjax_med.datasets.federated_standardize(raw_train, raw_test)
"""

from fedjax_med.data.breastmnist import breastmnist
from fedjax_med.data.chase_db1 import chase_db1
from fedjax_med.data.heart_disease import heart_disease
from fedjax_med.data.msd_hippocampus import msd_hippocampus
from fedjax_med.data.standardize import federated_standardize
from fedjax_med.data.tcga_brca import tcga_brca
from fedjax_med.data.telemonitoring import parkinsons_telemonitoring
from fedjax_med.data.tfds import from_tfds
from fedjax_med.data.tox21 import tox21

__all__ = ["heart_disease", "tcga_brca", "tox21", "parkinsons_telemonitoring", "breastmnist",
           "chase_db1", "msd_hippocampus", "from_tfds", "federated_standardize"]
