"""BreastMNIST (MedMNIST v2): benign vs malignant breast ultrasound, bundled, offline.

Data: 780 breast ultrasound images (Al-Dhabyani, Gomaa, Khaled & Fahmy,
Data in Brief 28, 104863, 2020) as resized to 28 x 28 grey-scale by MedMNIST
(Yang et al., Scientific Data 10, 41, 2023), CC BY 4.0. See
`files/breastmnist/SOURCE.md` for provenance (a re-saved copy of the
official file, same splits and class counts), the checksum and the
citations to give.

BreastMNIST comes from one hospital, so its sites are simulated with the
partitioners of `fedjax_med.data.partition`:

  * train: MedMNIST's official train split (546 images; with
    `include_val=True` also its 78 validation images) is split over
    `num_sites` sites by `partition` ("dirichlet" label skew, "iid" or
    "quantity" skew);
  * test: MedMNIST's official test split (156 images) is split with
    `partition_like`, so site k's test set has, class by class, the same
    share of the test images as site k has of the training images: every
    simulated hospital is scored on images from its own label mix, and the
    union of the sites' test sets is exactly the official test set (so
    "pooled" test metrics are comparable with MedMNIST's published ones);
  * the 78 validation images are not used unless `include_val=True` (no
    model selection is done in the experiments).

Labels: MedMNIST stores 0 = malignant, 1 = normal or benign. Here the
positive class is the disease: by default y = 1 for malignant and 0 for
normal/benign (`positive="malignant"`); `positive="benign"` keeps MedMNIST's
stored labels. Accuracy and ROC-AUC are unchanged by the flip when the
scores are flipped too, so published MedMNIST numbers remain comparable.
Images are float32 in [0, 1] (uint8 / 255), shape [.., 28, 28, 1].
"""

from __future__ import annotations

from importlib import resources

import numpy as np

from fedjax_med.core.federated_data import FederatedData
from fedjax_med.core.options import OptionError, check_choice
from fedjax_med.data import partition as partition_lib

PARTITIONS = ("dirichlet", "iid", "quantity")
POSITIVE = ("malignant", "benign")
IMAGE_SHAPE = (28, 28, 1)
SPLIT_SIZES = {"train": 546, "val": 78, "test": 156}
# MedMNIST's stored label meaning (info.py of the medmnist package).
MEDMNIST_LABELS = {0: "malignant", 1: "normal, benign"}
_FILE = "breastmnist.npz"


def _files():
  return resources.files("fedjax_med.data").joinpath("files", "breastmnist")


def source_text() -> str:
  """The bundled SOURCE.md: provenance, licence (CC BY 4.0) and citations."""
  return _files().joinpath("SOURCE.md").read_text()


def load_raw() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """`{split: (images uint8 [n, 28, 28], medmnist_labels uint8 [n])}` for
  "train", "val", "test", exactly as stored (0 = malignant, 1 = normal/benign)."""
  with _files().joinpath(_FILE).open("rb") as f:
    with np.load(f) as npz:
      out = {split: (np.asarray(npz[f"{split}_images"]),
                     np.asarray(npz[f"{split}_labels"]).reshape(-1))
             for split in SPLIT_SIZES}
  for split, (x, y) in out.items():
    if x.shape != (SPLIT_SIZES[split], 28, 28) or y.shape != (SPLIT_SIZES[split],):
      raise ValueError(f"breastmnist: bundled {split} split has shapes {x.shape}, {y.shape};"
                       " the bundled file is damaged")
  return out


def _derived_seed(seed: int, stream: int) -> int:
  return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


def site_partition(num_sites: int = 5, partition: str = "dirichlet", alpha: float = 0.5,
                   seed: int = 0, *, min_size: int = 10, include_val: bool = False,
                   distribution: str = "dirichlet", power: float = 1.5,
                   ) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """The (train_parts, test_parts) index lists `breastmnist` uses.

  Train indices point into the official train rows (followed by the val
  rows when include_val); test indices into the official test rows.
  """
  check_choice("breastmnist", "partition", partition, PARTITIONS)
  raw = load_raw()
  train_y = raw["train"][1]
  if include_val:
    train_y = np.concatenate([train_y, raw["val"][1]])
  train_parts = partition_lib.make_partition(
      partition, num_sites, seed, labels=train_y, alpha=alpha, min_size=min_size,
      distribution=distribution, power=power)
  test_parts = partition_lib.partition_like(train_y, train_parts, raw["test"][1],
                                            _derived_seed(seed, 1))
  return train_parts, test_parts


def breastmnist(num_sites: int = 5, partition: str = "dirichlet", alpha: float = 0.5,
                seed: int = 0, *, min_size: int = 10, include_val: bool = False,
                positive: str = "malignant", distribution: str = "dirichlet",
                power: float = 1.5) -> tuple[FederatedData, FederatedData]:
  """BreastMNIST split over `num_sites` simulated hospitals: (train, test).

  Args:
    num_sites: K simulated hospitals.
    partition: "dirichlet" (label skew, q_c ~ Dir(alpha 1_K) per class),
      "iid", or "quantity" (site sizes skewed, see
      `fedjax_med.data.partition.quantity_skew`).
    alpha: Dirichlet concentration for "dirichlet" and quantity skew
      (smaller = more skewed).
    seed: the partition's seed (independent of the training seed).
    min_size: every site gets at least this many training images
      ("dirichlet", "quantity"); default 10 as NIID-Bench.
    include_val: add MedMNIST's 78 validation images to the training pool.
    positive: "malignant" (y = 1 malignant, the default) or "benign"
      (MedMNIST's stored labels: y = 1 normal or benign).
    distribution, power: quantity-skew law ("dirichlet" or "power_law") and
      Pareto tail index.

  Returns:
    train, test FederatedData: x `[K, N_max, 28, 28, 1]` float32 in [0, 1],
    y `[K, N_max]` float32 in {0, 1}, label_type "binary", site names
    "site_0" .. "site_{K-1}". Train has 546 real rows (624 with
    include_val) and test 156, over all sites.
  """
  check_choice("breastmnist", "positive", positive, POSITIVE)
  if partition == "column":
    raise OptionError("breastmnist: partition='column' is not available: BreastMNIST comes"
                      f" from a single hospital; choose one of {PARTITIONS}")
  train_parts, test_parts = site_partition(
      num_sites, partition, alpha, seed, min_size=min_size, include_val=include_val,
      distribution=distribution, power=power)
  raw = load_raw()
  x_train, y_train = raw["train"]
  if include_val:
    x_train = np.concatenate([x_train, raw["val"][0]])
    y_train = np.concatenate([y_train, raw["val"][1]])
  x_test, y_test = raw["test"]
  names = [f"site_{k}" for k in range(len(train_parts))]

  def prepare(x, y):
    images = (x.astype(np.float32) / 255.0)[..., None]
    labels = (y == 0) if positive == "malignant" else (y == 1)
    return images, labels.astype(np.float32)

  train = partition_lib.to_federated_data(*prepare(x_train, y_train), train_parts, names,
                                          label_type="binary")
  test = partition_lib.to_federated_data(*prepare(x_test, y_test), test_parts, names,
                                         label_type="binary")
  return train, test


__all__ = ["breastmnist", "site_partition", "load_raw", "source_text", "PARTITIONS",
           "POSITIVE", "IMAGE_SHAPE", "SPLIT_SIZES", "MEDMNIST_LABELS"]
