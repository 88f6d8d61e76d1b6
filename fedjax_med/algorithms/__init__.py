"""Layer 5, algorithms: each an (init, round) pair in its own small file, built from
the kit (`fm.kit`); privacy enters as plug-ins (`dp_fedavg.py`)."""

from fedjax_med.algorithms.availability import with_availability
from fedjax_med.algorithms.cyclic import cyclic
from fedjax_med.algorithms import segmentation
from fedjax_med.algorithms.ditto import ditto
from fedjax_med.algorithms.dp_fedavg import dp_fedavg, dp_sgd_fedavg
from fedjax_med.algorithms.fedavg import fedavg
from fedjax_med.algorithms.fedbuff import fedbuff
from fedjax_med.algorithms.feddyn import feddyn
from fedjax_med.algorithms.fednova import fednova
from fedjax_med.algorithms.fedopt import fedadagrad, fedadam, fedyogi
from fedjax_med.algorithms.fedper import fedper
from fedjax_med.algorithms.fedprox import fedprox
from fedjax_med.algorithms.fedsgd import fedsgd
from fedjax_med.algorithms.finetune import fedavg_finetune
from fedjax_med.algorithms.local import local_only
from fedjax_med.algorithms.qffl import qffl
from fedjax_med.algorithms.scaffold import scaffold

__all__ = ["cyclic", "ditto", "dp_fedavg", "dp_sgd_fedavg", "fedadagrad", "fedadam", "fedavg", "fedavg_finetune", "fedbuff",
           "feddyn", "fednova", "fedper", "fedprox", "fedsgd", "fedyogi", "local_only", "qffl",
           "scaffold", "segmentation", "with_availability"]
