"""The TFDS door, offline: `tfds.testing.mock_data` and a tiny dataset prepared on disk.

No download, no network, no TensorFlow: `tfds.data_source` reads ArrayRecord
files with `array-record`; the tiny dataset is written with Tensor features
(encoding PNG images would need TensorFlow). Skipped when
tensorflow-datasets (the `fedjax_med[tfds]` extra) is not installed, except
the test of the error message that names the extra.
"""

import sys

import numpy as np
import pytest

import fedjax_med as fm
from fedjax_med.data import partition as P
from fedjax_med.data import tfds as tfds_door


def test_missing_tfds_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)   # import fails
  with pytest.raises(ImportError, match=r"pip install 'fedjax_med\[tfds\]'"):
    tfds_door.from_tfds("mnist", num_sites=2)


def test_bad_options_fail_before_reading():
  with pytest.raises(fm.OptionError, match="column_key"):
    tfds_door.from_tfds("mnist", partition="column")
  with pytest.raises(fm.OptionError, match="num_sites"):
    tfds_door.from_tfds("mnist", partition="iid")
  with pytest.raises(fm.OptionError, match="partition"):
    tfds_door.from_tfds("mnist", partition="random", num_sites=2)
  with pytest.raises(fm.OptionError, match="label_type"):
    tfds_door.from_tfds("mnist", num_sites=2, label_type="ordinal")


@pytest.fixture(scope="module")
def tfds():
  """tensorflow_datasets, or skip (the tests above run without it)."""
  return pytest.importorskip("tensorflow_datasets")


def _raw(tfds, name, split, data_dir=None):
  """The examples as TFDS gives them, one by one (the reference)."""
  source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  examples = [source[i] for i in range(len(source))]
  return (np.stack([e["image"] for e in examples]),
          np.array([e["label"] for e in examples]), examples)


def test_mock_mnist_dirichlet_train_and_test(tfds):
  with tfds.testing.mock_data(num_examples=60):
    train, test = tfds_door.from_tfds("mnist", split=("train", "test"),
                                      partition="dirichlet", num_sites=4, alpha=0.5, seed=3)
    x_tr, y_tr, _ = _raw(tfds, "mnist", "train")
    _, y_te, _ = _raw(tfds, "mnist", "test")
  assert train.label_type == "multiclass"       # ClassLabel(num_classes=10)
  assert train.num_sites == test.num_sites == 4
  assert int(np.sum(train.num_examples)) == 60 and int(np.sum(test.num_examples)) == 60
  assert train.feature_shape == (28, 28, 1) and train.x.dtype == np.float32
  # Site k holds exactly the rows the partitioner picks, scaled by 1/255.
  parts = P.dirichlet_label_skew(y_tr, 4, 0.5, 3)
  for k, (x_k, y_k) in enumerate(train.sites()):
    np.testing.assert_array_equal(y_k, y_tr[parts[k]])
    np.testing.assert_allclose(x_k, x_tr[parts[k]].astype(np.float32) / 255.0, rtol=0,
                               atol=1e-7)
  # Test rows mirror each site's train label mix (partition_like).
  for c in np.unique(y_te):
    got = [int(np.sum(y == c)) for _, y in test.sites()]
    m = [int(np.sum(y_tr[p] == c)) for p in parts]
    if sum(m):
      assert got == P.largest_remainder(int(np.sum(y_te == c)), m).tolist()
    else:
      assert sum(got) == int(np.sum(y_te == c))


def test_mock_single_split_iid_and_determinism(tfds):
  with tfds.testing.mock_data(num_examples=30):
    a = tfds_door.from_tfds("mnist", split="train", partition="iid", num_sites=3, seed=1)
    b = tfds_door.from_tfds("mnist", split="train", partition="iid", num_sites=3, seed=1)
    c = tfds_door.from_tfds("mnist", split="train", partition="iid", num_sites=3, seed=2)
    raw = tfds_door.from_tfds("mnist", split="train", partition="iid", num_sites=3,
                              scale_images=False)
    with pytest.raises(fm.OptionError, match="one class label per row"):
      tfds_door.from_tfds("mnist", partition="dirichlet", num_sites=3, label_key="image")
    # Labels that are not classes: later splits follow the sites' sizes only.
    tr, te = tfds_door.from_tfds("mnist", split=("train", "test"), partition="quantity",
                                 num_sites=3, alpha=1.0, label_key="image",
                                 label_type="real")
    n_test = int(np.sum(te.num_examples))
    assert te.num_examples.tolist() == P.largest_remainder(n_test, tr.num_examples).tolist()
  assert isinstance(a, fm.FederatedData)
  assert a.num_examples.tolist() == [10, 10, 10]
  np.testing.assert_array_equal(np.asarray(a.x), np.asarray(b.x))
  assert not np.array_equal(np.asarray(a.y), np.asarray(c.y))
  assert raw.x.dtype == np.int32 and int(np.max(raw.x)) > 1   # unscaled uint8 -> int32


@pytest.fixture(scope="module")
def tiny_dir(tfds, tmp_path_factory):
  """A binary dataset with a hospital column, prepared on disk as ArrayRecord."""

  class FedjaxMedTinyHospitals(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Tensor(shape=(6, 6, 1), dtype=np.uint8),
          "label": tfds.features.ClassLabel(num_classes=2),
          "hospital": tfds.features.Text(),
      }))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(45, 0), "test": self._generate_examples(15, 1)}

    def _generate_examples(self, n, seed):
      rng = np.random.default_rng(seed)
      for i in range(n):
        yield i, {"image": rng.integers(0, 256, (6, 6, 1), dtype=np.uint8),
                  "label": int(rng.integers(0, 2)), "hospital": f"h{(i * 7) % 3}"}

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  FedjaxMedTinyHospitals(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


def test_prepared_dataset_split_by_hospital_column(tfds, tiny_dir):
  name = "fedjax_med_tiny_hospitals"
  train, test = tfds_door.from_tfds(name, split=["train", "test"], partition="column",
                                    column_key="hospital", data_dir=tiny_dir)
  assert train.label_type == "binary" and train.y.dtype == np.float32
  assert train.names == test.names == ("h0", "h1", "h2")
  for split, data in (("train", train), ("test", test)):
    x, y, examples = _raw(tfds, name, split, tiny_dir)
    hospital = np.array([e["hospital"].decode() if isinstance(e["hospital"], bytes)
                         else str(e["hospital"]) for e in examples])
    for k, site in enumerate(data.names):
      rows = np.flatnonzero(hospital == site)       # file order kept within a site
      x_k, y_k = data.site(k)
      np.testing.assert_array_equal(y_k, y[rows].astype(np.float32))
      np.testing.assert_allclose(x_k, x[rows] / 255.0, rtol=0, atol=1e-7)
  assert int(np.sum(train.num_examples)) == 45 and int(np.sum(test.num_examples)) == 15


def test_prepared_dataset_trains_one_round(tiny_dir):
  import jax
  import optax
  train = tfds_door.from_tfds("fedjax_med_tiny_hospitals", split="train[:80%]",
                              partition="quantity", num_sites=3, alpha=1.0,
                              data_dir=tiny_dir)
  assert int(np.sum(train.num_examples)) == 36
  model = fm.models.MLP(hidden=(4,))
  loss_fn = fm.losses.sigmoid_binary_cross_entropy(model.apply)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), train.x[0, :1])
  algo = fm.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.1), batch_size=8)
  state, metrics = algo.round(algo.init(params), train, jax.random.PRNGKey(1))
  assert np.isfinite(float(metrics["train_loss"]))


def test_prepared_dataset_errors(tiny_dir, tmp_path):
  with pytest.raises(ValueError, match="no feature 'pixels'"):
    tfds_door.from_tfds("fedjax_med_tiny_hospitals", num_sites=2, data_dir=tiny_dir,
                        image_key="pixels")
  with pytest.raises(FileNotFoundError, match="never downloads"):
    tfds_door.from_tfds("fedjax_med_tiny_hospitals", num_sites=2, data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="num_sites=50 is more than"):
    tfds_door.from_tfds("fedjax_med_tiny_hospitals", num_sites=50, data_dir=tiny_dir)
