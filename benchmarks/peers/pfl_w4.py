"""W4 on pfl-research (PyTorch backend): one FedAvg round as pfl's CIFAR10 benchmark runs it.

Built like pfl-research's `benchmarks/image_classification/pytorch/train.py` with
`configs/baseline.yaml`: `FederatedDataset.from_slices` over 1,000 users x 50 images
(torch tensors, a 'random' user sampler), `PyTorchModel(simple_cnn,
local_optimizer_create=torch.optim.SGD, central_optimizer=torch.optim.SGD(lr=1.0))`,
`SimulatedBackend` with `WeightByUser` (weight_by_samples: false), pfl's
`FederatedAveraging` with `NNAlgorithmParams(train_cohort_size=50, val_cohort_size=0)`
and `NNTrainHyperParams(local_learning_rate=0.1, local_num_epochs=1,
local_batch_size=10)`. The data are `cnn_round.py`'s (numpy default_rng(0)).

Timing: `algorithm.run` for 1 + repeats central iterations; a callback stamps
`time.perf_counter()` at `on_train_begin` and after every central iteration, so a
round is everything pfl does from the end of one iteration to the end of the next
(context, cohort sampling, 50 local trainings, aggregation, central update). The first
iteration is the warm-up; it also evaluates the cohort before and after local training
(pfl evaluates at iterations divisible by `evaluation_frequency`, here set past the
last round, so the timed rounds train only, like 9 in 10 rounds of the benchmark).

    python benchmarks/peers/pfl_w4.py [--repeats 3] [--threads 1] [--dropout]

Prints one JSON line {"row", "times", "median_s", ..., "peak_rss_mib", "versions"};
peak RSS is the process's VmHWM (pfl runs in this one process).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402  pylint: disable=wrong-import-position


def build(x, y, *, dropout: bool, cohort_size: int, num_iterations: int,
          user_sampler=None, init_state=None, dtype: str = "float32"):
  """pfl's objects for W4: (algorithm, run kwargs, pfl PyTorchModel).

  Args:
    x: float32 [U, N, 32, 32, 3]; y: int [U, N].
    user_sampler: `() -> user id` (default pfl's 'random' sampler over range(U)).
    init_state: optional torch state_dict for the initial model.
    dtype: "float32" (the benchmark) or "float64" (model and images; used by
      `check_equal.py`; pfl still casts each user's delta to float32).
  """
  # pylint: disable=import-outside-toplevel
  import numpy as np
  import torch
  from pfl.aggregate.simulate import SimulatedBackend
  from pfl.aggregate.weighting import WeightByUser
  from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
  from pfl.data.federated_dataset import FederatedDataset
  from pfl.data.sampling import get_user_sampler
  from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
  from pfl.internal.ops.pytorch_ops import to_tensor
  from pfl.model.pytorch import PyTorchModel

  images = to_tensor(x, dtype=dtype)
  labels = to_tensor(y.astype(np.int64), dtype="int64")
  users_to_data = {u: (images[u], labels[u]) for u in range(x.shape[0])}
  sampler = user_sampler or get_user_sampler("random", range(x.shape[0]))
  dataset = FederatedDataset.from_slices(users_to_data, sampler)

  module = C.simple_cnn(dropout=dropout).to(getattr(torch, dtype))
  if init_state is not None:
    module.load_state_dict(init_state)
  params = [p for p in module.parameters() if p.requires_grad]
  model = PyTorchModel(model=module, local_optimizer_create=torch.optim.SGD,
                       central_optimizer=torch.optim.SGD(params, C.SERVER_LR))
  backend = SimulatedBackend(training_data=dataset, val_data=None,
                             postprocessors=[WeightByUser()])
  algorithm_params = NNAlgorithmParams(
      central_num_iterations=num_iterations, evaluation_frequency=num_iterations + 1,
      train_cohort_size=cohort_size, val_cohort_size=0)
  train_params = NNTrainHyperParams(local_learning_rate=C.LR, local_num_epochs=1,
                                    local_batch_size=C.BATCH)
  eval_params = NNEvalHyperParams(local_batch_size=C.BATCH)
  run_kwargs = {"algorithm_params": algorithm_params, "backend": backend, "model": model,
                "model_train_params": train_params, "model_eval_params": eval_params}
  return FederatedAveraging(), run_kwargs, model


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
  parser.add_argument("--dropout", action="store_true",
                      help="keep pfl's Dropout layers (default: none, as the flax rows)")
  args = parser.parse_args(argv)

  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from pfl.callback.base import TrainingProcessCallback  # pylint: disable=import-outside-toplevel
  from pfl.metrics import Metrics  # pylint: disable=import-outside-toplevel

  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  np.random.seed(0)  # pfl's user sampler and seeds draw from numpy's global state
  x, y = C.synthetic_data()
  algorithm, run_kwargs, _ = build(x, y, dropout=args.dropout, cohort_size=C.COHORT,
                                   num_iterations=1 + args.repeats)
  del x, y  # pfl holds the torch tensors (which share the arrays' memory)

  class Stamps(TrainingProcessCallback):
    """Wall-clock stamps at the start of training and after each central iteration."""

    def __init__(self):
      self.stamps = []

    def on_train_begin(self, *, model):
      self.stamps.append(time.perf_counter())
      return Metrics()

    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
      self.stamps.append(time.perf_counter())
      return False, Metrics()

  stamps = Stamps()
  algorithm.run(callbacks=[stamps], **run_kwargs)
  laps = list(np.diff(stamps.stamps))
  first, times = laps[0], laps[1:]
  row = "pfl-research" + (" (dropout)" if args.dropout else "")
  print(json.dumps({
      "row": row, "times": times, "median_s": statistics.median(times),
      "min_s": min(times), "max_s": max(times), "first_round_s": first,
      "peak_rss_mib": C.peak_rss_mib(), "repeats": args.repeats,
      "threads": args.threads, "versions": C.versions("pfl", "torch", "numpy")}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
