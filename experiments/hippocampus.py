"""3D hippocampus segmentation on MRI across SIMULATED sites: FedAvg, FedProx, three
personalised methods (fine-tuned FedAvg, Ditto, FedPer), local and pooled on MSD Task04
Hippocampus.

Data: the 260 labelled MSD Hippocampus crops (`fm.datasets.msd_hippocampus`, CC BY-SA 4.0,
Vanderbilt University Medical Center). They come from ONE hospital: every site here is
SIMULATED. A seeded test set of 52 whole cases (stratified by intensity encoding) is
held out; the 208 training cases are split into sites by
  iid       4 random sites of 52 cases (index.csv's `sim_site_iid4` at split seed 0);
  encoding  5 sites by how the images are stored (uint8 / float_low x 3 / float_high):
            a feature shift that the per-volume z-score mostly removes (a storage
            difference, not a scanner or hospital difference);
  volume    K sites by hippocampus size (smallest to largest): a label shift.
Volumes are z-scored one by one and padded to 48 x 64 x 48 with a valid-voxel mask.

Model and training: `fm.models.UNet3D` (3 classes; 85,035 parameters at the default
features), masked softmax cross-entropy + soft Dice over the two hippocampus classes
(`fm.losses.segmentation.softmax_dice`). Each round every site draws one random crop
(`crop`, default 32 x 48 x 32) of the valid region of each of its volumes
(`with_random_crops`: 3x fewer voxels than the padded volume, and translation
augmentation) and runs `local_steps` Adam steps of `batch_size` crops on them (or, with
`local_epochs`, that many passes over them: `--full` runs one epoch per round, 26 steps
of 2 crops for an iid site of 52 cases, with the learning rate stepped down x0.3 after
2/3 and 5/6 of the rounds; `set_hyperparams` between segments, no recompilation). Test
volumes are segmented whole (the U-Net has no normalisation layer, so it is fully
convolutional) and scored by Dice per class on each case's valid voxels, per case then
averaged (`fm.metrics.segmentation.multiclass_dice`; empty-empty = 1).

Own-site scoring (encoding and volume splits; iid sites are random and own no test
cases): each training site owns the test cases of its distribution
(`own_test_case_ids`: its encoding, or its band of hippocampus volume). Column
"own-site" is the mean over the sites of site k's model (the one model of fedavg,
fedprox and pooled) on site k's own test cases, per case then averaged: the protocol
under which personalisation is meant to help. "all" scores every site's model on all 52.

Strategies, from the same initial model within a seed:
  fedavg    global model: Adam clients (re-initialised each round), n_k/n weights,
            server SGD 1.0
  fedprox   the same with the proximal term mu/2 ||w - w_t||^2
  finetune  fedavg's final model fine-tuned `finetune_steps` steps per site on that
            site's crops (`fm.algorithms.fedavg_finetune`; its rounds are fedavg's, so
            it is the same run); each site's model scores every test case, and
            "finetune" is the mean over the sites (test cases belong to no site)
  ditto     Ditto (Li et al., ICML 2021; `fm.algorithms.ditto`, lambda `ditto_lam`):
            FedAvg's global step plus, per site, a personal model trained with
            lambda/2 ||v - w_t||^2 towards the global one (Adam at the baseline rate,
            the same steps and step decay); each site's personal model is scored like
            finetune (about 2x FedAvg's training compute)
  fedper    FedPer (Arivazhagan et al., 2019; `fm.algorithms.fedper`): the U-Net's
            layers in `fedper_personal` (default: the 1x1x1 output layer "logits")
            stay on the site, the rest is FedAvg; scored like finetune
  local     each site trains alone (persistent Adam, the same steps per round);
            scored like finetune
  pooled    one model on all 208 training cases (K = 1) with K x local_steps steps per
            round, or local_epochs passes over the 208 cases (either way the same
            examples per round as the K sites together); it does not depend on the site
            split and is run once per seed

    python experiments/hippocampus.py                    # default: iid, short schedule
    python experiments/hippocampus.py --full             # both splits, the long schedule
                       # (the default runs all strategies but ditto and fedper; --full all)
    python experiments/hippocampus.py --splits iid,volume --rounds 60 --seeds 0,1
    python experiments/hippocampus.py --smoke            # seconds, for tests
    python experiments/hippocampus.py --full --strategies pooled,fedavg --rounds 6
    python experiments/hippocampus.py --full --memory 2 --client-chunk-size 1
                       # peak RSS of 2 FedAvg rounds (iid, 4 sites) -> --out/memory.json

Outputs in --out: results.json (tidy records: dataset "msd_hippocampus[<split>]",
strategy, seed, site = "all" / "test-<group>" / "case-NNN" / "own-site" / "own-<site>",
split "test", metric
dice_anterior / dice_posterior / dice_mean), table.md, history.json (train loss per
round) and slices.png (one test case: image, label and each strategy's prediction).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_med as fm
from fedjax_med.algorithms.segmentation import random_crop_data, with_random_crops
from fedjax_med.core.streams import CROP_STREAM
from fedjax_med.data.msd_hippocampus import (msd_hippocampus, own_test_case_ids,
                                              site_case_ids, site_names)
from fedjax_med.losses.segmentation import softmax_dice
from fedjax_med.metrics.segmentation import multiclass_dice

DATASET = "msd_hippocampus"
CLASSES = ("anterior", "posterior")
METRICS = ("dice_anterior", "dice_posterior", "dice_mean")
GROUPS = ("test-uint8", "test-float_low", "test-float_high")
SPLIT_SITES = {"iid": 4, "encoding": 5, "volume": 4}
STRATEGIES = ("pooled", "fedavg", "fedprox", "finetune", "ditto", "fedper", "local")


@dataclasses.dataclass(frozen=True)
class Config:
  """The default: a short schedule (about 10 minutes on 2 CPU cores), labelled as such."""
  splits: tuple[str, ...] = ("iid",)
  strategies: tuple[str, ...] = ("fedavg", "fedprox", "finetune", "local", "pooled")
  seeds: tuple[int, ...] = (0,)
  split_seed: int = 0                 # the test draw and the site assignment
  features: tuple[int, ...] = (8, 16, 32)
  crop: tuple[int, int, int] = (32, 48, 32)
  batch_size: int = 2
  local_steps: int = 4                # per site per round (when local_epochs is None)
  local_epochs: int | None = None     # else: passes over the site's volumes per round
  rounds: int = 12
  client_lr: float = 3e-3             # Adam, FedAvg / FedProx clients
  baseline_lr: float = 3e-3           # Adam, local and pooled
  lr_decay_at: tuple[float, ...] = () # step decay: lr x lr_decay after each fraction of rounds
  lr_decay: float = 0.3
  fedprox_mu: float = 0.01
  finetune_steps: int = 8
  ditto_lam: float = 1.0              # chosen before any run, not tuned (see README)
  fedper_personal: tuple[str, ...] = ("logits",)
  eval_batch: int = 4
  test_cases: int | None = None       # None: all 52; smoke: the first few (labelled)
  client_chunk_size: int | None = None  # sites per vmapped chunk (None: all at once)
  schedule: str = "short"

  @classmethod
  def full(cls) -> "Config":
    """30 rounds of one local epoch (26 steps of 2 crops per iid site; pooled one epoch
    of its 208 cases, 104 steps), lr 3e-3, x0.3 after rounds 20 and 25."""
    return cls(splits=("iid", "encoding"), strategies=STRATEGIES, local_epochs=1, rounds=30,
               lr_decay_at=(2 / 3, 5 / 6), finetune_steps=26, schedule="full")

  @classmethod
  def smoke(cls) -> "Config":
    """Tiny; 2 rounds with a step decay after the first, so that the decayed path
    (traced learning rates, Ditto's personal rate) runs too."""
    return cls(features=(2, 4), crop=(16, 16, 16), local_steps=1, rounds=2,
               lr_decay_at=(0.5,), strategies=STRATEGIES, finetune_steps=1, test_cases=2,
               schedule="smoke")


def _test_cases(test, seed: int) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
  """(x [52, X, Y, Z, 1], y [52, X, Y, Z, 2], case ids, encoding group of each)."""
  mask = np.asarray(test.mask)
  ids = site_case_ids(1, "iid", seed)[1]   # the test cases, per group, in row order
  cases, groups = [], []
  for group, site in zip(GROUPS, ids):
    cases += [f"case-{c}" for c in site]
    groups += [group] * len(site)
  return np.asarray(test.x)[mask], np.asarray(test.y)[mask], cases, groups


def _predict(apply_fn, params, x: np.ndarray, batch: int) -> np.ndarray:
  """Argmax classes `[N, X, Y, Z]` (uint8), `batch` volumes per call."""
  out = []
  for i in range(0, len(x), batch):
    out.append(np.asarray(apply_fn(params, jnp.asarray(x[i:i + batch]))).argmax(-1))
  return np.concatenate(out).astype(np.uint8)


def _scores(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Per-case Dice `[N, 3]`: anterior, posterior and their mean, on valid voxels."""
  d = multiclass_dice(pred, y[..., 0], y[..., 1] > 0, 3)
  return np.concatenate([d, d.mean(1, keepdims=True)], axis=1)


def _records(dataset: str, strategy: str, seed: int, cases, groups,
             per_model: np.ndarray, own: dict[str, list[int]] | None = None) -> list[dict]:
  """Records of `per_model` `[M, N, 3]` (M = 1 global model, or one model per site).

  Per case, "all" and test-<group>: the mean over the M models. With `own`
  ({site name: indices of its own test cases}, sites in model order): "own-<site>" is site
  k's model (the one model when M = 1) on site k's own test cases, per case then
  averaged, and "own-site" the mean of those over the sites (each site weighs the same).
  """
  per_case = per_model.mean(0)
  report = {case: dict(zip(METRICS, map(float, row))) for case, row in zip(cases, per_case)}
  report["all"] = dict(zip(METRICS, map(float, per_case.mean(0))))
  for group in GROUPS:
    rows = per_case[[g == group for g in groups]]
    if len(rows):
      report[group] = dict(zip(METRICS, map(float, rows.mean(0))))
  if own is not None:
    sites = [(name, per_model[k if len(per_model) > 1 else 0][idx].mean(0))
             for k, (name, idx) in enumerate(own.items()) if len(idx)]
    report.update({f"own-{name}": dict(zip(METRICS, map(float, v))) for name, v in sites})
    if sites:
      report["own-site"] = dict(zip(METRICS, map(float, np.mean([v for _, v in sites], 0))))
  return fm.report.records_from_report(dataset, strategy, seed, "test", report)


def own_test_indices(split: str, split_seed: int, cases: list[str]
                     ) -> dict[str, list[int]] | None:
  """{training site name: positions in `cases` (ascending) of its own test cases}
  (`own_test_case_ids`; only those among `cases`), or None for the iid split."""
  if split == "iid":
    return None
  k = SPLIT_SITES[split]
  position = {case: i for i, case in enumerate(cases)}
  return {name: sorted(position[f"case-{c}"] for c in site if f"case-{c}" in position)
          for name, site in zip(site_names(k, split),
                                own_test_case_ids(k, split, split_seed))}


def _site_params(tree, k):
  return jax.tree_util.tree_map(lambda a: a[k], tree)


def lr_segments(config: Config) -> list[tuple[int, int, float]]:
  """[(first round, end round, lr factor)]: the step decay of `config` over its rounds
  (`fm.training.loop.step_decay_segments`)."""
  return fm.training.loop.step_decay_segments(config.rounds, config.lr_decay_at,
                                              config.lr_decay)


def measure_memory(config: Config, rounds: int) -> dict:
  """Peak RSS of each round of the experiment's FedAvg (iid split, 4 sites, crops).

  Loads the iid training sites, builds FedAvg exactly as `run` does (same crops, local
  work, batch and `config.client_chunk_size`) and runs `rounds` rounds. Before each
  round the kernel's high-water mark of resident memory is reset to the current RSS
  (`/proc/self/clear_refs` "5", Linux >= 4.0) and read after it (VmHWM), so that each
  round's peak is its own (round 0 includes the compilation) and not the loader's;
  without clear_refs the values are the process's peak so far (ru_maxrss when
  /proc is absent). Run one process per chunk size.
  """
  memory = fm.training.memory
  model = fm.models.UNet3D(features=config.features, num_classes=3)
  loss_fn = softmax_dice(model.apply, num_classes=3)
  work = (dict(local_epochs=config.local_epochs) if config.local_epochs
          else dict(local_steps=config.local_steps))
  algo = with_random_crops(fm.algorithms.fedavg(
      loss_fn, client_optimizer=optax.adam(config.client_lr), batch_size=config.batch_size,
      client_chunk_size=config.client_chunk_size, **work), crop_shape=config.crop)
  data, _ = msd_hippocampus(num_sites=SPLIT_SITES["iid"], split="iid", seed=config.split_seed)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1,) + config.crop + (1,)))
  state = algo.init(params)
  loader_peak, rss_before = memory.peak_rss_mib(), memory.rss_mib()
  seconds, peaks, reset = [], [], True
  for r in range(rounds):
    reset = memory.reset_peak_rss() and reset
    t = time.perf_counter()
    state, _ = algo.round(state, data, jax.random.fold_in(jax.random.PRNGKey(1), r))
    jax.block_until_ready(state.params)
    seconds.append(time.perf_counter() - t)
    peaks.append(memory.peak_rss_mib())
  return {"client_chunk_size": config.client_chunk_size, "sites": SPLIT_SITES["iid"],
          "data_shape": list(data.x.shape), "crop": list(config.crop),
          "work": work, "batch_size": config.batch_size, "features": list(config.features),
          "peak_rss_loading_mib": loader_peak, "rss_before_rounds_mib": rss_before,
          "peak_rss_per_round_mib": peaks, "peak_reset_each_round": reset,
          "round_seconds": seconds}


def run(config: Config, out_dir: str, progress: bool = True
        ) -> tuple[list[dict], dict, dict]:
  timings: dict[str, float] = {}
  start = time.perf_counter()
  stamp = fm.report.provenance()   # the code as it was when the run started
  model = fm.models.UNet3D(features=config.features, num_classes=3)
  loss_fn = softmax_dice(model.apply, num_classes=3)
  apply_fn = jax.jit(model.apply)
  segments = lr_segments(config)
  # With a decay the learning rate is traced (set between segments, no recompile).
  adam = optax.inject_hyperparams(optax.adam) if len(segments) > 1 else optax.adam
  work = (dict(local_epochs=config.local_epochs) if config.local_epochs
          else dict(local_steps=config.local_steps))
  common = dict(batch_size=config.batch_size, **work)
  chunk = dict(client_chunk_size=config.client_chunk_size)

  def crops(algo):
    return with_random_crops(algo, crop_shape=config.crop)

  fedavg = crops(fm.algorithms.fedavg_finetune(   # fine-tuning at the last segment's lr
      loss_fn, client_optimizer=adam(config.client_lr), finetune_steps=config.finetune_steps,
      finetune_optimizer=optax.adam(config.baseline_lr * segments[-1][2]), **common, **chunk))
  fedprox = crops(fm.algorithms.fedprox(loss_fn, mu=config.fedprox_mu,
                                        client_optimizer=adam(config.client_lr), **common,
                                        **chunk))
  ditto = crops(fm.algorithms.ditto(loss_fn, lam=config.ditto_lam,
                                    client_optimizer=adam(config.client_lr),
                                    personal_optimizer=adam(config.baseline_lr), **common,
                                    **chunk))
  fedper = crops(fm.algorithms.fedper(loss_fn, personal=config.fedper_personal,
                                      client_optimizer=adam(config.client_lr), **common,
                                      **chunk))
  local = crops(fm.algorithms.local_only(loss_fn, optimizer=adam(config.baseline_lr), **common,
                                         **chunk))
  # Pooled sees the K sites' examples of a round: local_epochs passes over all 208 cases
  # (= the sites' epochs together), or K x the local steps.
  pooled = crops(fm.algorithms.local_only(
      loss_fn, optimizer=adam(config.baseline_lr), batch_size=config.batch_size,
      **(work if config.local_epochs else dict(
          local_steps=config.local_steps * max(SPLIT_SITES[s] for s in config.splits)))))

  records: list[dict] = []
  history: dict[str, dict] = {}
  predictions: dict[str, np.ndarray] = {}
  # One site of all 208 training cases (the pooled strategy's data) and the test set.
  pooled_train, test = msd_hippocampus(num_sites=1, split="iid", seed=config.split_seed)
  x_test, y_test, cases, groups = _test_cases(test, config.split_seed)
  if config.test_cases is not None:
    x_test, y_test = x_test[:config.test_cases], y_test[:config.test_cases]
    cases, groups = cases[:config.test_cases], groups[:config.test_cases]
  timings["load"] = time.perf_counter() - start

  def evaluate(name, dataset, seed, params_list):
    t = time.perf_counter()
    per_model = [_scores(pred := _predict(apply_fn, p, x_test, config.eval_batch), y_test)
                 for p in params_list]
    if seed == config.seeds[0]:
      predictions[f"{dataset}/{name}"] = pred       # the last model's, for the figure
    timings["evaluate"] = timings.get("evaluate", 0.0) + time.perf_counter() - t
    mean = np.mean(per_model, axis=0)
    print(f"{dataset} seed {seed} {name}: Dice anterior {mean[:, 0].mean():.3f} posterior"
          f" {mean[:, 1].mean():.3f} mean {mean[:, 2].mean():.3f}"
          f" ({time.perf_counter() - start:.0f} s)", flush=True)
    return np.asarray(per_model)

  def train(name, algo, state, data, key, rounds, dataset, seed, lr, decay_also=()):
    t = time.perf_counter()
    state, hist = fm.training.loop.run_rounds_step_decay(
        algo, state, data, rounds, key, learning_rate=lr,
        decay_at=config.lr_decay_at, decay=config.lr_decay, decay_also=decay_also,
        progress=progress, desc=f"{dataset} seed {seed} {name}")
    losses = np.asarray(hist.get("train_loss", hist.get("client_train_loss"))).tolist()
    timings[f"train_{name}"] = timings.get(f"train_{name}", 0.0) + time.perf_counter() - t
    history.setdefault(dataset, {}).setdefault(name, {})[str(seed)] = losses
    return state

  own_by_split = {split: own_test_indices(split, config.split_seed, cases)
                  for split in config.splits}
  for seed in config.seeds:
    init_key, train_key = jax.random.split(jax.random.PRNGKey(seed))
    params0 = jax.jit(model.init)(init_key, jnp.zeros((1,) + config.crop + (1,)))
    if "pooled" in config.strategies:
      state = train("pooled", pooled, pooled.init(params0, 1), pooled_train, train_key,
                    config.rounds, f"{DATASET}[pooled]", seed, config.baseline_lr)
      per_model = evaluate("pooled", f"{DATASET}[pooled]", seed,
                           [_site_params(state.client_states["params"], 0)])
      for split in config.splits:
        records += _records(f"{DATASET}[{split}]", "pooled", seed, cases, groups, per_model,
                            own_by_split[split])
    for split in config.splits:
      dataset = f"{DATASET}[{split}]"
      k = SPLIT_SITES[split]
      train_data, _ = msd_hippocampus(num_sites=k, split=split, seed=config.split_seed)
      own = own_by_split[split]
      if {"fedavg", "finetune"} & set(config.strategies):
        state = train("fedavg", fedavg, fedavg.init(params0), train_data, train_key,
                      config.rounds, dataset, seed, config.client_lr)
        if "fedavg" in config.strategies:
          records += _records(dataset, "fedavg", seed, cases, groups,
                              evaluate("fedavg", dataset, seed, [state.params]), own)
        if "finetune" in config.strategies:
          personal_key = jax.random.fold_in(train_key, config.rounds)
          site_crops = random_crop_data(train_data, jax.random.fold_in(personal_key,
                                                                       CROP_STREAM), config.crop)
          personal = fedavg.personalize(state, site_crops, personal_key)
          records += _records(dataset, "finetune", seed, cases, groups, evaluate(
              "finetune", dataset, seed, [_site_params(personal, j) for j in range(k)]), own)
      if "fedprox" in config.strategies:
        state = train("fedprox", fedprox, fedprox.init(params0), train_data, train_key,
                      config.rounds, dataset, seed, config.client_lr)
        records += _records(dataset, "fedprox", seed, cases, groups,
                            evaluate("fedprox", dataset, seed, [state.params]), own)
      # Ditto's personal Adam follows the same step decay as the client's.
      for name, algo, also in (("ditto", ditto, ("personal_learning_rate",)),
                               ("fedper", fedper, ())):
        if name not in config.strategies:
          continue
        state = train(name, algo, algo.init(params0, k), train_data, train_key, config.rounds,
                      dataset, seed, config.client_lr, decay_also=also)
        personal = jax.device_get(algo.personalize(state, train_data, train_key))
        records += _records(dataset, name, seed, cases, groups, evaluate(
            name, dataset, seed, [_site_params(personal, j) for j in range(k)]), own)
      if "local" in config.strategies:
        state = train("local", local, local.init(params0, k), train_data, train_key,
                      config.rounds, dataset, seed, config.baseline_lr)
        site_models = jax.device_get(state.client_states["params"])
        records += _records(dataset, "local", seed, cases, groups, evaluate(
            "local", dataset, seed, [_site_params(site_models, j) for j in range(k)]), own)
      del train_data

  os.makedirs(out_dir, exist_ok=True)
  fm.report.save_records(records, out_dir, stamp=stamp)
  with open(os.path.join(out_dir, "history.json"), "w") as f:
    json.dump(history, f)
  figure = _figure(out_dir, x_test, y_test, cases, predictions)
  return records, timings, {"figure": figure}


def _figure(out_dir: str, x, y, cases, predictions: dict) -> str | None:
  """slices.png: the middle axial slice of the first test case: image, label, predictions."""
  if not predictions:
    return None
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  i = 0
  valid = y[i, ..., 1] > 0
  z = int(np.argmax((y[i, ..., 0] > 0).sum((0, 1))))    # the slice with most hippocampus
  panels = [("image", x[i, :, :, z, 0], "gray"), ("label (manual)", y[i, :, :, z, 0], None)]
  panels += [(name, pred[i, :, :, z], None) for name, pred in predictions.items()]
  fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 3))
  for ax, (title, image, cmap) in zip(np.atleast_1d(axes), panels):
    if cmap is None:
      ax.imshow(np.where(valid[:, :, z], image, np.nan), cmap="viridis", vmin=0, vmax=2,
                interpolation="nearest")
    else:
      ax.imshow(image, cmap=cmap)
    ax.set_title(title.replace(f"{DATASET}", ""), fontsize=7)
    ax.axis("off")
  fig.suptitle(f"MSD Hippocampus {cases[i]}, slice z = {z} (0 background, 1 anterior,"
               " 2 posterior); SIMULATED sites", fontsize=8)
  path = os.path.join(out_dir, "slices.png")
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return path


def tables(records: list[dict], config: Config) -> str:
  out = []
  for split in config.splits:
    dataset = f"{DATASET}[{split}]"
    rows = [r for r in records if r["dataset"] == dataset]
    order = [s for s in STRATEGIES if s in config.strategies]
    for metric in METRICS:
      columns = ["all"] + list(GROUPS) + (["own-site"] if split != "iid" else [])
      out.append(f"split {split} ({SPLIT_SITES[split]} simulated sites):\n"
                 + fm.report.summary_table(rows, metric, "test", columns, order))
  return "\n\n".join(out)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, help="rounds for every strategy")
  parser.add_argument("--seeds", type=str, help="comma-separated seeds (default 0)")
  parser.add_argument("--splits", type=str, help="comma-separated: iid, encoding, volume")
  parser.add_argument("--full", action="store_true", help="the long schedule")
  parser.add_argument("--smoke", action="store_true", help="tiny run for tests")
  parser.add_argument("--out", type=str, default="results/hippocampus")
  parser.add_argument("--strategies", type=str,
                      help=f"comma-separated subset of {', '.join(STRATEGIES)}")
  parser.add_argument("--client-chunk-size", type=int,
                      help="sites per vmapped chunk in the federated rounds (default: all)")
  parser.add_argument("--memory", type=int, metavar="ROUNDS",
                      help="instead of the experiment: run ROUNDS FedAvg rounds of the"
                      " schedule (iid, 4 sites) and write the peak RSS to --out/memory.json")
  parser.add_argument("--batch-size", type=int, help="examples per local step (all strategies)")
  parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
  args = parser.parse_args(argv)
  config = Config.smoke() if args.smoke else Config.full() if args.full else Config()
  splits = tuple(s for s in (args.splits or "").split(",") if s) or None
  if splits:
    unknown = [s for s in splits if s not in SPLIT_SITES]
    if unknown:
      raise fm.OptionError(f"--splits: unknown split {unknown}; choose from"
                           f" {sorted(SPLIT_SITES)}")
  strategies = tuple(s for s in (args.strategies or "").split(",") if s) or None
  known = STRATEGIES
  if strategies and not set(strategies) <= set(known):
    raise fm.OptionError(f"--strategies: unknown {sorted(set(strategies) - set(known))};"
                         f" choose from {list(known)}")
  config = fm.training.loop.with_overrides(config, rounds=args.rounds, seeds=args.seeds,
                                           splits=splits, strategies=strategies,
                                           client_chunk_size=args.client_chunk_size,
                                           batch_size=args.batch_size)
  if args.memory:
    result = measure_memory(config, args.memory)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "memory.json"), "w") as f:
      json.dump(result, f, indent=1)
    print(json.dumps(result))
    return 0
  start = time.perf_counter()
  records, timings, files = run(config, args.out, progress=not args.no_progress)
  elapsed = time.perf_counter() - start
  text = tables(records, config)
  header = (
      f"MSD Hippocampus (Task04, 260 cases of ONE hospital; every site is SIMULATED),"
      f" 52 held-out test cases; Dice per class on valid voxels, per case then averaged;"
      f" mean ± std over seeds {list(config.seeds)}; site 'all' = the 52 test cases,"
      f" test-<group> = those stored in that encoding. Schedule: {config.schedule}"
      + (f" (ONLY the first {config.test_cases} test cases scored)" if config.test_cases
         else "") + ".\n"
      f"{json.dumps(dataclasses.asdict(config))}\n"
      f"device: {jax.devices()[0].platform}; wall time {elapsed:.0f} s ("
      + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ")\n")
  fm.training.loop.write_table(args.out, header + "\n" + text + "\n")
  print(header)
  print(text)
  print(f"\nwrote {os.path.join(args.out, 'results.json')} ({len(records)} records)"
        f"{', ' + files['figure'] if files['figure'] else ''} in {elapsed:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
