"""The heart-disease study as a `DeployTask` (no Flower import: the tests and the
simulated runs use it without flwr; heart_disease_app.py wraps it in Flower apps).

The server and every node build the same task from the run config
(`algorithm`, ...). A node loads only its own hospital,
`fm.datasets.heart_disease(site=k)` (in a real deployment: the hospital's own
files). `evaluate` scores the final global model on the test rows of the four
hospitals (a real server holds no patient rows: evaluate on the nodes instead,
or on data the server owns).
"""

import jax
import optax

import fedjax_med as fm

SITES = ("cleveland", "hungarian", "switzerland", "va")
ALGORITHMS = ("fedavg", "fedprox", "scaffold", "fedadam", "ditto", "dp_fedavg")


def make_algorithm(name: str, loss_fn):
  """The six algorithms of the equivalence study (FLamby's heart-disease learning
  rates; 5 local steps of batch 4)."""
  common = dict(local_steps=5, batch_size=4)
  sgd = optax.sgd(1e-2)
  if name == "fedavg":
    return fm.algorithms.fedavg(loss_fn, client_optimizer=sgd, **common)
  if name == "fedprox":
    return fm.algorithms.fedprox(loss_fn, mu=0.01, client_optimizer=sgd, **common)
  if name == "scaffold":
    return fm.algorithms.scaffold(loss_fn, client_learning_rate=1e-2, **common)
  if name == "fedadam":
    return fm.algorithms.fedadam(loss_fn, client_optimizer=sgd, server_learning_rate=1e-2,
                                 **common)
  if name == "ditto":
    return fm.algorithms.ditto(loss_fn, lam=0.1, client_optimizer=sgd, **common)
  if name == "dp_fedavg":
    # Site-level DP: each site's update clipped to norm 0.5, Gaussian noise
    # (sigma 0.5 x 0.5) added to the sum AT THE SERVER, divided by K = 4.
    return fm.algorithms.dp_fedavg(loss_fn, clip_norm=0.5, noise_multiplier=0.5, num_sites=4,
                                   client_optimizer=sgd, **common)
  raise fm.OptionError(f"heart_disease_app: unknown algorithm {name!r}; one of {ALGORITHMS}")


def _init_params():
  model = fm.models.LogisticRegression()
  return model.init(jax.random.PRNGKey(0), jax.numpy.zeros((1, 13)))


def _evaluate(params):
  _, test = fm.datasets.heart_disease()
  model = fm.models.LogisticRegression()
  report = fm.evaluation.binary_report(model.apply, params, test)
  return [{"site": name, "metric": "accuracy", "value": float(report[name]["accuracy"])}
          for name in (*SITES, "mean") if name in report]


def make_task(run_config: dict | None = None) -> fm.deploy.DeployTask:
  run_config = run_config or {}
  model = fm.models.LogisticRegression()
  loss_fn = fm.losses.sigmoid_binary_cross_entropy(model.apply)
  algorithm = make_algorithm(str(run_config.get("algorithm", "fedavg")), loss_fn)
  return fm.deploy.DeployTask(
      algorithm=algorithm, init_params=_init_params,
      load_site=lambda site: fm.datasets.heart_disease(site=site)[0],
      num_sites=4, site_names=SITES, evaluate=_evaluate)

