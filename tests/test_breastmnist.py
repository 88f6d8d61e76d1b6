"""BreastMNIST loader, the CNN through a federated round, and experiments/breastmnist.py --smoke."""

import hashlib
import json
import os
import re
import subprocess
import sys
from importlib import resources

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_med as fm
from fedjax_med.data import breastmnist as bm
from fedjax_med.data import partition as P
from fedjax_med.models.cnn import CNN, PatchConv

from conftest import import_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "breastmnist.py")
FILES = resources.files("fedjax_med.data").joinpath("files", "breastmnist")


# -- data ----------------------------------------------------------------------


def test_bundled_file_and_attribution():
  source = bm.source_text()
  for text in ("CC BY 4.0", "MedMNIST v2", "Scientific Data", "Al-Dhabyani",
               "Data in Brief", "0 = malignant"):
    assert text in source
  digest = hashlib.sha256(FILES.joinpath("breastmnist.npz").read_bytes()).hexdigest()
  assert digest in source          # SOURCE.md lists the sha256 of the bundled file


def test_raw_splits_match_source_md_counts():
  raw = bm.load_raw()
  counts = {split: np.bincount(y, minlength=2).tolist() for split, (_, y) in raw.items()}
  assert counts == {"train": [147, 399], "val": [21, 57], "test": [42, 114]}
  assert all(x.dtype == np.uint8 and x.shape[1:] == (28, 28) for x, _ in raw.values())


def test_loader_shapes_counts_and_labels():
  train, test = bm.breastmnist(num_sites=5, alpha=0.5, seed=0)
  for data in (train, test):
    assert data.num_sites == 5 and data.label_type == "binary"
    assert data.feature_shape == (28, 28, 1) and data.x.dtype == jnp.float32
    assert data.names == tuple(f"site_{k}" for k in range(5))
    x = np.asarray(data.x)
    assert x.min() >= 0.0 and x.max() <= 1.0
    y = np.asarray(data.y)[np.asarray(data.mask)]
    assert set(np.unique(y).tolist()) <= {0.0, 1.0}
  assert int(np.sum(train.num_examples)) == 546 and int(np.sum(test.num_examples)) == 156
  assert min(np.asarray(train.num_examples)) >= 10                  # min_size
  # y = 1 is malignant: 147 of the train images, 42 of the test images.
  assert sum(float(y.sum()) for _, y in train.sites()) == 147
  assert sum(float(y.sum()) for _, y in test.sites()) == 42


def test_sites_hold_the_partitioned_rows_exactly():
  raw = bm.load_raw()
  train, test = bm.breastmnist(num_sites=4, alpha=1.0, seed=3)
  train_parts, test_parts = bm.site_partition(4, "dirichlet", 1.0, 3)
  assert [p.tolist() for p in train_parts] == [
      p.tolist() for p in P.dirichlet_label_skew(raw["train"][1], 4, 1.0, 3, min_size=10)]
  for data, parts, (x_raw, y_raw) in ((train, train_parts, raw["train"]),
                                      (test, test_parts, raw["test"])):
    P.check_partition(parts, y_raw.size)          # every official row once
    for k, (x_k, y_k) in enumerate(data.sites()):
      np.testing.assert_array_equal(x_k[..., 0], x_raw[parts[k]].astype(np.float32) / 255.0)
      np.testing.assert_array_equal(y_k, (y_raw[parts[k]] == 0).astype(np.float32))
  # Test rows mirror each site's train label mix, class by class.
  for c in (0, 1):
    m = [int(np.sum(raw["train"][1][p] == c)) for p in train_parts]
    got = [int(np.sum(raw["test"][1][p] == c)) for p in test_parts]
    assert got == P.largest_remainder(int(np.sum(raw["test"][1] == c)), m).tolist()


def test_loader_options():
  train, test = bm.breastmnist(num_sites=3, partition="iid", seed=1, positive="benign")
  assert np.asarray(train.num_examples).tolist() == [182, 182, 182]
  assert sum(float(y.sum()) for _, y in train.sites()) == 399     # stored labels kept
  train, _ = bm.breastmnist(num_sites=3, include_val=True)
  assert int(np.sum(train.num_examples)) == 624
  train, _ = bm.breastmnist(num_sites=6, partition="quantity", alpha=0.3, seed=2)
  assert int(np.sum(train.num_examples)) == 546 and train.num_sites == 6
  a, _ = bm.breastmnist(seed=5)
  b, _ = bm.breastmnist(seed=5)
  np.testing.assert_array_equal(np.asarray(a.y), np.asarray(b.y))


@pytest.mark.parametrize("kwargs, match", [
    (dict(partition="column"), "single hospital"),
    (dict(partition="natural"), "partition"),
    (dict(positive="normal"), "positive"),
    (dict(alpha=0.0), "alpha must be > 0"),
    (dict(num_sites=0), "num_sites"),
    (dict(num_sites=60), "min_size=10 x num_sites=60"),
])
def test_loader_bad_options(kwargs, match):
  with pytest.raises(ValueError, match=match):
    bm.breastmnist(**kwargs)


# -- model ---------------------------------------------------------------------


@pytest.mark.parametrize("kernel_size, channels", [(3, 1), (3, 4), (5, 2)])
def test_patch_conv_equals_flax_conv(kernel_size, channels):
  rng = np.random.default_rng(kernel_size * 10 + channels)
  x = rng.normal(size=(2, 9, 7, channels)).astype(np.float32)
  conv = PatchConv(5, kernel_size)
  params = {"params": {"kernel": rng.normal(size=(kernel_size, kernel_size, channels, 5))
                       .astype(np.float32),
                       "bias": rng.normal(size=5).astype(np.float32)}}
  reference = nn.Conv(5, (kernel_size, kernel_size), padding="SAME")
  np.testing.assert_allclose(jax.jit(conv.apply)(params, x),
                             jax.jit(reference.apply)(params, x), rtol=1e-5, atol=1e-5)


def test_cnn_shapes_and_conv_choice_agree():
  model = CNN()
  x = np.random.default_rng(2).uniform(size=(3, 28, 28, 1)).astype(np.float32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  apply = jax.jit(model.apply)
  assert apply(params, x).shape == (3, 1)
  assert jax.eval_shape(model.apply, params, x[..., 0]).shape == (3, 1)   # [B, H, W] too
  assert sum(a.size for a in jax.tree_util.tree_leaves(params)) == 26401
  slow = CNN(patch_conv=False)
  np.testing.assert_allclose(apply(params, x), jax.jit(slow.apply)(params, x),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="images"):
    jax.eval_shape(model.apply, params, jnp.ones((3, 784)))


def test_cnn_through_one_fedavg_round():
  train, test = bm.breastmnist(num_sites=3, partition="iid", seed=0)
  model = CNN(features=(4, 8), hidden=8)
  loss_fn = fm.losses.sigmoid_binary_cross_entropy(model.apply)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), train.x[0, :1])
  algo = fm.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.1), batch_size=32)
  state = algo.init(params)
  new_state, metrics = algo.round(state, train, jax.random.PRNGKey(1))
  shapes = jax.tree_util.tree_map(jnp.shape, params)
  assert jax.tree_util.tree_map(jnp.shape, new_state.params) == shapes
  assert metrics["client_train_loss"].shape == (3,)
  assert metrics["client_steps"].tolist() == [6, 6, 6]            # ceil(182 / 32)
  assert np.isfinite(float(metrics["train_loss"]))
  changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), params,
                                   new_state.params)
  assert all(jax.tree_util.tree_leaves(changed))
  report = fm.evaluation.binary_report(model.apply, new_state.params, test)
  assert set(report) == {"site_0", "site_1", "site_2", "mean", "pooled"}
  assert 0.0 <= report["pooled"]["accuracy"] <= 1.0


# -- experiment ------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("breastmnist")
  proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--no-progress", "--out",
                         str(out)], capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out, proc.stdout


@pytest.mark.slow
def test_smoke_writes_valid_records(smoke):
  out, stdout = smoke
  records = fm.report.load_records(os.path.join(out, "results.json"))
  assert records and all(
      set(r) == set(fm.report.RECORD_FIELDS) | set(fm.report.PROVENANCE_FIELDS)
      for r in records)
  assert {r["dataset"] for r in records} == {"breastmnist"}
  assert {r["strategy"] for r in records} == {"fedavg", "fedprox", "scaffold", "local",
                                              "pooled"}
  sites = [f"site_{k}" for k in range(5)]
  assert {r["site"] for r in records} == set(sites) | {"mean", "pooled"}
  assert {r["metric"] for r in records} == {"accuracy", "auc"}
  assert {r["split"] for r in records} == {"train", "test"}
  assert {r["seed"] for r in records} == {0, 1}
  assert all(r["value"] is None or 0.0 <= r["value"] <= 1.0 for r in records)
  _, test = bm.breastmnist()          # the experiment's default split
  n = np.asarray(test.num_examples, np.float64)
  for strategy in ("fedavg", "scaffold", "local", "pooled"):
    by = {(r["site"], r["metric"]): r["value"] for r in records if r["strategy"] == strategy
          and r["seed"] == 1 and r["split"] == "test"}
    acc = np.array([by[(s, "accuracy")] for s in sites])
    # "mean" is the unweighted mean over sites; pooled accuracy is the n_k-weighted one.
    assert by[("mean", "accuracy")] == pytest.approx(acc.mean(), abs=1e-12)
    assert by[("pooled", "accuracy")] == pytest.approx((n * acc).sum() / n.sum(), abs=1e-9)
    aucs = [by[(s, "auc")] for s in sites if by[(s, "auc")] is not None]
    assert by[("mean", "auc")] == pytest.approx(np.mean(aucs), abs=1e-12)
  table = open(os.path.join(out, "table.md")).read()
  assert "| scaffold |" in table and "auc (test)" in table and "± " in stdout
  assert re.search(r"\| site_0 \| \d+ \| [01]\.\d\d \|", table)      # the split summary
  history = json.load(open(os.path.join(out, "history.json")))
  assert set(history) == {"fedavg", "fedprox", "scaffold", "local", "pooled"}
  assert all(len(h["0"]) == 2 for h in history.values())          # 2 smoke rounds


def test_default_config_is_the_documented_one():
  module = import_experiment(SCRIPT, "breastmnist_experiment")
  config = module.Config()
  assert (config.num_sites, config.alpha, config.rounds, config.batch_size) == (5, 0.5, 30, 16)
  assert config.baseline_epochs == config.rounds * config.local_epochs
  assert module.Config.smoke().rounds == 2
