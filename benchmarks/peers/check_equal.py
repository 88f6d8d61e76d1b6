"""W4 equality check: one FedAvg round of simple_cnn in fedjax_med, plain PyTorch and pfl.

The same algorithm from the same start must give the same new global model

    w' = w - 1.0 * sum_{k in cohort} c_k (w - w_k),   c_k = 1/C = 1/50,
    w_k = 5 SGD steps (lr 0.1, batches of 10 in stored order) on client k's 50 images,

(all n_k = 50, so n_k weighting = uniform weighting). Results compared:

  fedjax_med   `fm.algorithms.fedavg(..., cohort_size=50, shuffle=False)` on
               `cnn_round.py`'s flax `SimpleCNN` and W4 data, params from
               `model.init(PRNGKey(0))`, round key `fold_in(PRNGKey(1), 0)` (the
               benchmark's first round); the cohort is read from its metrics.
  torch        a plain loop over that cohort: `copy.deepcopy` of the global model, a
               fresh `torch.optim.SGD(lr=0.1)`, 5 steps each, the mean of the deltas.
  pfl          pfl-research 0.6's `FederatedAveraging` + `SimulatedBackend` +
               `PyTorchModel` (central SGD lr 1.0, `WeightByUser`), its user sampler
               handing out the same cohort in the same order (pfl trains on each
               user's rows in stored order).

The flax parameters are copied into the torch module: conv kernels HWIO -> OIHW,
dense kernels (in, out) -> weight (out, in), and the first dense kernel's input rows
permuted from flax's (H, W, C) flatten order to torch's (C, H, W) (the torch net
sees NCHW after pfl's Transpose2D). Differences are max |a - b| over all 1,626,442
parameters; `update_max_abs` = max |w' - w| gives the scale.

Two parts:

  float32  the round as benchmarked; every result against the float64 torch loop.
           This round is ill-conditioned (ReLU and max-pool switches over 5 steps at
           lr 0.1 on noise images): `sensitivity_1e-7` is how far the float64 loop's
           own result moves when w is perturbed by a relative 1e-7 (float32's
           rounding), the scale of disagreement to expect between any two float32
           implementations. Gated: pfl == the torch float32 loop (same library, same
           operations) within `--tol32`.
  float64  (a subprocess with JAX x64) the same round in float64: fedjax_med with a
           batch-level loss in float64 (returned as float32 only for its metric; the
           cast's cotangent 1.0 is exact), the torch float64 loop, and pfl with a
           float64 model (pfl casts each user's delta to float32). fedjax_med weights
           the deltas with float32 coefficients (50/2500 in float32 = 0.02 (1 - 2.2e-8)),
           so it is also compared with the float64 loop using that coefficient.
           Gated: fedjax_med within `--tol64` of the loop with its coefficient, and
           every float64 result within `--tol64-loose` of the exact loop.

    python benchmarks/peers/check_equal.py [--users 1000] [--no-pfl] [--dtype both]

Needs fedjax_med, torch (and pfl) in one interpreter. Prints one JSON line per part;
exits 1 if a gate fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import _common as C  # noqa: E402  pylint: disable=wrong-import-position

HW, CH = 14, 64  # spatial size and channels after the pool: 14 * 14 * 64 = 12544


def flax_to_torch(params, module):
  """Copies flax SimpleCNN params into the torch `simple_cnn` (returns a state_dict)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  p = params["params"]
  k0 = np.asarray(p["Dense_0"]["kernel"])                         # [(h, w, c), 128]
  k0 = k0.reshape(HW, HW, CH, -1).transpose(2, 0, 1, 3).reshape(HW * HW * CH, -1)
  weights = [np.asarray(p["Conv_0"]["kernel"]).transpose(3, 2, 0, 1),  # HWIO -> OIHW
             np.asarray(p["Conv_1"]["kernel"]).transpose(3, 2, 0, 1),
             k0.T, np.asarray(p["Dense_1"]["kernel"]).T]
  biases = [np.asarray(p[n]["bias"]) for n in ("Conv_0", "Conv_1", "Dense_0", "Dense_1")]
  layers = [m for m in module if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
  with torch.no_grad():
    for layer, w, b in zip(layers, weights, biases):
      assert layer.weight.shape == w.shape, (layer, w.shape)
      layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
      layer.bias.copy_(torch.from_numpy(np.array(b)))
  return {k: v.detach().clone() for k, v in module.state_dict().items()}


def torch_round(state, x, y, cohort, dtype, coef=None):
  """One FedAvg round as a plain PyTorch loop in `dtype`; returns the new state (float64).

  coef: None: w - (sum_k (w - w_k)) / C; else w - sum_k coef * (w - w_k).
  """
  import torch  # pylint: disable=import-outside-toplevel
  glob = C.simple_cnn().to(dtype)
  glob.load_state_dict({k: v.to(dtype) for k, v in state.items()})
  w = {k: v.detach().clone() for k, v in glob.state_dict().items()}
  total = {k: torch.zeros_like(v) for k, v in w.items()}
  for k in cohort:
    local = copy.deepcopy(glob)
    opt = torch.optim.SGD(local.parameters(), lr=C.LR)
    xk = torch.from_numpy(x[k]).to(dtype)
    yk = torch.from_numpy(y[k]).long()
    for start in range(0, len(xk), C.BATCH):
      opt.zero_grad()
      local.loss(xk[start:start + C.BATCH], yk[start:start + C.BATCH]).backward()
      opt.step()
    for name, v in local.state_dict().items():
      total[name] += (w[name] - v) if coef is None else coef * (w[name] - v)
  scale = 1.0 / len(cohort) if coef is None else 1.0
  return {n: (w[n] - C.SERVER_LR * scale * total[n]).double() for n in w}


def pfl_round(state, x, y, cohort, dtype="float32"):
  """The same round through pfl's FederatedAveraging; returns the new state (float64)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import pfl_w4  # pylint: disable=import-outside-toplevel
  order = iter(int(k) for k in cohort)
  np.random.seed(0)
  algorithm, run_kwargs, model = pfl_w4.build(
      x, y, dropout=False, cohort_size=len(cohort), num_iterations=1,
      user_sampler=lambda: next(order), init_state=state, dtype=dtype)
  algorithm.run(**run_kwargs)
  return {k: v.detach().double().clone() for k, v in model.pytorch_model.state_dict().items()}


def _max_abs(a, b):
  return max(float((a[k].double() - b[k].double()).abs().max()) for k in b)


def _fedjax_round(users: int, dtype: str):
  """fedjax_med's round; returns (params before, params after, cohort, x, y) as numpy."""
  # pylint: disable=import-outside-toplevel,protected-access
  import numpy as np
  import cnn_round
  cnn_round.NUM_USERS = users  # only _setup's data size
  fm, jax, jnp, optax, data, loss, params = cnn_round._setup("user")
  if dtype == "float64":
    model = cnn_round._models()[0]
    data = fm.FederatedData(x=data.x.astype(jnp.float64), y=data.y, mask=data.mask)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)

    @fm.batch_loss
    def loss(p, xb, yb, mask):  # the masked mean in float64, float32 only as a value
      per = optax.softmax_cross_entropy_with_integer_labels(model.apply(p, xb), yb)
      mean = jnp.sum(jnp.where(mask, per, 0.0)) / jnp.maximum(jnp.sum(mask), 1)
      return mean.astype(jnp.float32)

  algo = fm.algorithms.fedavg(loss, client_optimizer=optax.sgd(C.LR), batch_size=C.BATCH,
                              local_epochs=1, cohort_size=C.COHORT, shuffle=False)
  state, metrics = algo.round(algo.init(params), data,
                              jax.random.fold_in(jax.random.PRNGKey(1), 0))
  leaves = {str(a.dtype) for a in jax.tree.leaves(state.params)}
  assert leaves == {dtype}, leaves
  cohort = [int(k) for k in np.asarray(metrics["cohort"])]
  return params, state.params, cohort, np.asarray(data.x), np.asarray(data.y)


def part_float32(args) -> tuple[dict, bool]:
  import torch  # pylint: disable=import-outside-toplevel
  params, new_params, cohort, x, y = _fedjax_round(args.users, "float32")
  torch.set_num_threads(1)
  w0 = flax_to_torch(params, C.simple_cnn())
  results = {"fedjax_med": flax_to_torch(new_params, C.simple_cnn()),
             "torch f32": torch_round(w0, x, y, cohort, torch.float32)}
  if not args.no_pfl:
    results["pfl"] = pfl_round(w0, x, y, cohort)
  ref = torch_round(w0, x, y, cohort, torch.float64)
  g = torch.Generator().manual_seed(1)
  perturbed = {k: v.double() * (1 + 1e-7 * torch.randn(v.shape, generator=g,
                                                         dtype=torch.float64))
               for k, v in w0.items()}
  report = {"part": "float32", "users": args.users, "cohort": cohort,
            "update_max_abs": _max_abs(ref, w0),
            "sensitivity_1e-7": _max_abs(torch_round(perturbed, x, y, cohort,
                                                     torch.float64), ref),
            "max_abs_diff_to_torch_f64": {n: _max_abs(r, ref) for n, r in results.items()},
            "fedjax_med_vs_torch_f32": _max_abs(results["fedjax_med"], results["torch f32"])}
  ok = True
  if "pfl" in results:
    report["pfl_vs_torch_f32"] = _max_abs(results["pfl"], results["torch f32"])
    ok = report["pfl_vs_torch_f32"] <= args.tol32
  return report, ok


def part_float64(args) -> tuple[dict, bool]:
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_enable_x64", True)
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  params, new_params, cohort, x, y = _fedjax_round(args.users, "float64")
  torch.set_num_threads(1)
  w0 = flax_to_torch(params, C.simple_cnn().double())
  fm_new = flax_to_torch(new_params, C.simple_cnn().double())
  ref = torch_round(w0, x, y, cohort, torch.float64)
  coef = float(np.float32(C.IMAGES) / np.float32(C.IMAGES * len(cohort)))
  ref_coef = torch_round(w0, x, y, cohort, torch.float64, coef=coef)
  results = {"fedjax_med": fm_new}
  if not args.no_pfl:
    results["pfl"] = pfl_round(w0, x, y, cohort, dtype="float64")
  report = {"part": "float64", "users": args.users, "update_max_abs": _max_abs(ref, w0),
            "float32_coefficient": coef,
            "max_abs_diff_to_torch_f64": {n: _max_abs(r, ref) for n, r in results.items()},
            "fedjax_med_vs_torch_f64_same_coefficient": _max_abs(fm_new, ref_coef)}
  ok = (report["fedjax_med_vs_torch_f64_same_coefficient"] <= args.tol64
        and max(report["max_abs_diff_to_torch_f64"].values()) <= args.tol64_loose)
  return report, ok


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--users", type=int, default=C.NUM_USERS,
                      help="population (W4: 1000; fewer: the same draw, smaller)")
  parser.add_argument("--no-pfl", action="store_true", help="skip the pfl results")
  parser.add_argument("--dtype", choices=("float32", "float64", "both"), default="both")
  parser.add_argument("--tol32", type=float, default=1e-6)
  parser.add_argument("--tol64", type=float, default=1e-12)
  parser.add_argument("--tol64-loose", type=float, default=1e-7)
  args = parser.parse_args(argv)
  ok = True
  if args.dtype in ("float32", "both"):
    report, ok32 = part_float32(args)
    print(json.dumps({**report, "ok": ok32}), flush=True)
    ok &= ok32
  if args.dtype == "float64":
    report, ok64 = part_float64(args)
    print(json.dumps({**report, "ok": ok64}), flush=True)
    ok &= ok64
  elif args.dtype == "both":  # JAX's x64 mode in a fresh process
    cmd = [sys.executable, os.path.abspath(__file__), "--dtype", "float64",
           "--users", str(args.users), "--tol64", str(args.tol64),
           "--tol64-loose", str(args.tol64_loose)] + (["--no-pfl"] if args.no_pfl else [])
    ok &= subprocess.run(cmd, check=False).returncode == 0
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
