"""The TFDS door: any TensorFlow Datasets dataset already on disk -> FederatedData.

    train, test = from_tfds("mnist", split=("train", "test"), partition="dirichlet",
                            num_sites=10, alpha=0.5, data_dir="~/tensorflow_datasets")
    hospitals = from_tfds("my_dataset", split="train", partition="column",
                          column_key="hospital_id")

Reading. Examples are read with `tfds.data_source` (random access to a
dataset prepared in the ArrayRecord format; needs `tensorflow-datasets` and
`array-record`, not TensorFlow). A dataset prepared in the TFRecord format
has no random access; it is then read with `tfds.load(..., batch_size=-1)`,
which needs TensorFlow, and a clear error says so when TensorFlow is
missing. Nothing is ever downloaded or prepared here (`download=False`):
prepare the dataset beforehand, e.g. once on a machine with network,
`tfds.data_source(name, data_dir=..., builder_kwargs={"file_format":
"array_record"})`. The whole split is read into memory, as FederatedData is
dense; use TFDS's split slicing (e.g. "train[:10%]") for a part of a large
dataset.

Fields. `x` is the feature `image_key` (any array feature, not only images;
integer images are divided by their dtype's maximum, 255 for uint8, into
float32 in [0, 1] when scale_images=True), `y` the feature `label_key`.
label_type "auto" reads the dataset's features: a ClassLabel with 2 classes
-> "binary" (y float32 in {0, 1}), another ClassLabel -> "multiclass"
(y int32), anything else -> unchecked.

Sites. The first split is partitioned by `partition` ("iid", "dirichlet"
label skew, "quantity" skew or "column": one site per distinct value of the
feature `column_key`, e.g. a hospital id; see `fedjax_med.data.partition`).
Every further split (e.g. "test") is divided with `partition_like`, so each
site's share of it mirrors, class by class, its share of the first split
(labels that are not one class per row, e.g. real or multi-label, split in
proportion to the sites' sizes only); for "column" every split is divided
by the same column, so site k holds the rows of the same value everywhere.

`tensorflow-datasets` is an optional extra: `pip install 'fedjax_med[tfds]'`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from fedjax_med.core.federated_data import LABEL_TYPES, FederatedData
from fedjax_med.core.options import OptionError, check_choice
from fedjax_med.data import partition as partition_lib

PARTITIONS = partition_lib.METHODS   # ("iid", "dirichlet", "quantity", "column")
_CHUNK = 4096
_EXTRA_MESSAGE = (
    "fedjax_med.data.from_tfds needs the optional dependency tensorflow-datasets;"
    " install it with: pip install 'fedjax_med[tfds]'")


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as err:
    raise ImportError(_EXTRA_MESSAGE) from err
  return tfds


def _tensorflow_available() -> bool:
  try:
    import tensorflow  # pylint: disable=import-outside-toplevel,unused-import  # noqa: F401
  except ImportError:
    return False
  return True


def _as_array(values: list, key: str, split: str) -> np.ndarray:
  try:
    return np.stack([np.asarray(v) for v in values])
  except ValueError as err:
    shapes = sorted({np.asarray(v).shape for v in values})[:4]
    raise ValueError(
        f"from_tfds: split {split!r}, feature {key!r}: examples have different shapes"
        f" (e.g. {shapes}); FederatedData needs one shape, so resize them first (e.g. a"
        " decoder or a prepared variant of the dataset)") from err


def _decode(value: Any) -> Any:
  value = value.item() if isinstance(value, np.ndarray) and value.ndim == 0 else value
  return value.decode("utf-8") if isinstance(value, bytes) else value


def _read_source(source, keys: Sequence[str], split: str) -> dict[str, list]:
  """All examples of one random-access source: `{key: [values]}`."""
  n = len(source)
  out: dict[str, list] = {k: [] for k in keys}
  batched = hasattr(source, "__getitems__")
  for start in range(0, n, _CHUNK):
    idx = list(range(start, min(n, start + _CHUNK)))
    examples = None
    if batched:
      try:
        examples = source.__getitems__(idx)
      except TypeError:   # some sources (e.g. tfds.testing.mock_data's) lack batch reads
        batched = False
    if examples is None:
      examples = [source[i] for i in idx]
    for ex in examples:
      for k in keys:
        if k not in ex:
          raise ValueError(f"from_tfds: split {split!r} has no feature {k!r}; its"
                           f" features are {sorted(ex)}")
        out[k].append(ex[k])
  return out


def _raise_if_not_prepared(tfds, name, data_dir, builder_kwargs, err) -> None:
  """Turns a failed read of a dataset that is not on disk into a FileNotFoundError."""
  try:
    prepared = tfds.builder(name, data_dir=data_dir, **(builder_kwargs or {})).is_prepared()
  except Exception:   # e.g. DatasetNotFoundError: unknown name and nothing on disk
    prepared = False
  if not prepared:
    raise FileNotFoundError(
        f"from_tfds: dataset {name!r} is not prepared in data_dir={data_dir!r}"
        f" ({type(err).__name__}: {str(err)[:200]}). from_tfds never downloads: prepare"
        f" it first, e.g. tfds.data_source({name!r}, data_dir=...,"
        " builder_kwargs={'file_format': 'array_record'})") from err


def _read_splits(tfds, name, splits, data_dir, keys, builder_kwargs, decoders):
  """`([{key: [values]} per split], features)` without downloading anything."""
  kwargs = dict(split=list(splits), data_dir=data_dir, download=False)
  if builder_kwargs:
    kwargs["builder_kwargs"] = builder_kwargs
  if decoders:
    kwargs["decoders"] = decoders
  try:
    sources = tfds.data_source(name, **kwargs)
  except NotImplementedError as err:   # stored (or to be stored) without random access
    _raise_if_not_prepared(tfds, name, data_dir, builder_kwargs, err)
    if not _tensorflow_available():
      raise ImportError(
          f"from_tfds: {name!r} in data_dir={data_dir!r} is stored without random access"
          f" (not ArrayRecord), which needs TensorFlow to read ({err}). Install"
          " tensorflow, or prepare the dataset with builder_kwargs={'file_format':"
          " 'array_record'}") from err
    arrays = tfds.as_numpy(tfds.load(name, batch_size=-1, **kwargs))
    builder = tfds.builder(name, data_dir=data_dir, **(builder_kwargs or {}))
    out = []
    for split, batch in zip(splits, arrays):
      missing = [k for k in keys if k not in batch]
      if missing:
        raise ValueError(f"from_tfds: split {split!r} has no feature {missing[0]!r}; its"
                         f" features are {sorted(batch)}")
      out.append({k: list(batch[k]) for k in keys})
    return out, builder.info.features
  except Exception as err:
    _raise_if_not_prepared(tfds, name, data_dir, builder_kwargs, err)
    raise
  if not isinstance(sources, (list, tuple)):
    sources = [sources]
  features = getattr(getattr(sources[0], "dataset_info", None), "features", None)
  return [_read_source(s, keys, split) for s, split in zip(sources, splits)], features


def _infer_label_type(tfds, features, label_key):
  try:
    feature = features[label_key]
  except (KeyError, TypeError):
    return None
  if isinstance(feature, tfds.features.ClassLabel):
    return "binary" if feature.num_classes == 2 else "multiclass"
  return None


def _strata(y: np.ndarray, label_type: str | None) -> np.ndarray | None:
  """Class labels `[N]` to stratify on, or None when y is not one class per row."""
  if y.ndim == 2 and y.shape[1] == 1:
    y = y[:, 0]
  if y.ndim != 1:
    return None
  if label_type in ("binary", "multiclass"):
    return y
  if label_type is None and (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
    return y
  return None


def _prepare_x(values: np.ndarray, scale: bool) -> np.ndarray:
  if scale and np.issubdtype(values.dtype, np.integer):
    return values.astype(np.float32) / np.float32(np.iinfo(values.dtype).max)
  if values.dtype == np.bool_:
    return values.astype(np.float32)
  return values


def from_tfds(name: str, split: str | Sequence[str] = "train", *, partition: str = "iid",
              num_sites: int | None = None, data_dir: str | None = None,
              image_key: str = "image", label_key: str = "label", seed: int = 0,
              alpha: float = 0.5, min_size: int = 1, column_key: str | None = None,
              distribution: str = "dirichlet", power: float = 1.5,
              scale_images: bool = True, label_type: str | None = "auto",
              builder_kwargs: dict | None = None, decoders: Any = None,
              ) -> FederatedData | tuple[FederatedData, ...]:
  """A TFDS dataset prepared on disk as FederatedData over simulated (or natural) sites.

  Args:
    name: TFDS name, e.g. "mnist" or "my_dataset/config:1.0.0".
    split: one split ("train", "train[:50%]") -> one FederatedData; a
      sequence ("train", "test") -> a tuple, the first split partitioned by
      `partition` and the others like it (see the module docstring).
    partition: "iid", "dirichlet", "quantity" or "column".
    num_sites: K (not needed for "column": one site per distinct value).
    data_dir: TFDS data directory (default: TFDS's, ~/tensorflow_datasets).
    image_key: feature used as x (an image, or any array feature).
    label_key: feature used as y.
    seed: partition seed (non-negative int).
    alpha, min_size, distribution, power: partitioner options
      (`fedjax_med.data.partition`).
    column_key: feature holding the site (e.g. a hospital id) for "column".
    scale_images: integer x -> float32 x / dtype max (uint8: / 255).
    label_type: "auto" (from the ClassLabel feature), None, or one of
      "binary", "multiclass", "real".
    builder_kwargs, decoders: passed to `tfds.data_source`.

  Returns:
    FederatedData (or a tuple, one per split), x `[K, N_max, *shape]`,
    site names "site_k" (or the column values).

  Raises:
    ImportError naming the extra `fedjax_med[tfds]` when tensorflow-datasets
    is missing; FileNotFoundError when the dataset is not prepared in
    data_dir; OptionError / ValueError for bad options or features.
  """
  check_choice("from_tfds", "partition", partition, PARTITIONS)
  if label_type not in ("auto", None) + LABEL_TYPES:
    raise OptionError(f"from_tfds: unknown label_type {label_type!r}; expected 'auto', None"
                      f" or one of {LABEL_TYPES}")
  if partition == "column" and not column_key:
    raise OptionError("from_tfds: partition='column' needs column_key, the feature that"
                      " names each row's site (e.g. a hospital id)")
  if partition != "column" and num_sites is None:
    raise OptionError(f"from_tfds: partition={partition!r} needs num_sites")
  single = isinstance(split, str)
  splits = [split] if single else list(split)
  if not splits or not all(isinstance(s, str) for s in splits):
    raise OptionError(f"from_tfds: split must be a split name or a sequence of them, got"
                      f" {split!r}")
  tfds = _import_tfds()
  keys = [image_key, label_key] + ([column_key] if partition == "column" else [])
  raw, features = _read_splits(tfds, name, splits, data_dir, keys, builder_kwargs, decoders)
  if label_type == "auto":
    label_type = _infer_label_type(tfds, features, label_key)

  xs, ys, columns = [], [], []
  for split_name, values in zip(splits, raw):
    if not values[label_key]:
      raise ValueError(f"from_tfds: split {split_name!r} of {name!r} is empty")
    xs.append(_prepare_x(_as_array(values[image_key], image_key, split_name), scale_images))
    y = _as_array(values[label_key], label_key, split_name)
    ys.append(y.astype(np.float32) if label_type == "binary" else y)
    if partition == "column":
      columns.append(np.asarray([_decode(v) for v in values[column_key]]))

  if partition == "column":
    site_keys = np.unique(np.concatenate(columns))
    all_parts = [partition_lib.by_column(c, keys=site_keys) for c in columns]
    names = [str(k) for k in site_keys]
  else:
    strata = [_strata(y, label_type) for y in ys]
    if partition == "dirichlet" and strata[0] is None:
      raise OptionError(
          f"from_tfds: partition='dirichlet' needs one class label per row; feature"
          f" {label_key!r} has shape {ys[0].shape[1:]} per row and label_type {label_type!r}")
    first = partition_lib.make_partition(
        partition, num_sites, seed, labels=strata[0], num_rows=ys[0].shape[0], alpha=alpha,
        min_size=min_size, distribution=distribution, power=power)
    all_parts = [first]
    for i, y in enumerate(ys[1:], start=1):
      seed_i = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
      if strata[0] is None or strata[i] is None:   # no classes: split by site size only
        ref, new = np.zeros(ys[0].shape[0], np.int64), np.zeros(y.shape[0], np.int64)
      else:
        ref, new = strata[0], strata[i]
      all_parts.append(partition_lib.partition_like(ref, first, new, seed_i))
    names = [f"site_{k}" for k in range(len(first))]
  out = tuple(partition_lib.to_federated_data(x, y, parts, names, label_type=label_type)
              for x, y, parts in zip(xs, ys, all_parts))
  return out[0] if single else out


__all__ = ["from_tfds", "PARTITIONS"]
