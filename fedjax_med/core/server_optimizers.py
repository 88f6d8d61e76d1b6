"""Adaptive server optimizers of FedAdagrad, FedAdam, FedYogi: `server_adagrad`,
`server_adam`, `server_yogi`.

These are optax transformations for the server step (`fm.optimizers`); the
algorithms that use them are `fm.algorithms.fedadagrad / fedadam / fedyogi`.
Version 0.1 called the transformations `fm.optimizers.fedadam` etc., the same
names as the algorithms; those names still work for one version (until 0.3)
and emit a DeprecationWarning.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2
(arXiv:2003.00295), as optax transformations, numerically the same as FLamby's
`flamby/strategies/fed_opt.py` (Ogier du Terrail et al., NeurIPS 2022
Datasets & Benchmarks).

Signs. Reddi's Delta_t = sum_k p_k (w_k - x_t) points from the global model
towards the clients. fedjax_med's server optimizer receives the pseudo-gradient
(called Delta in `fedjax_med.algorithms.fedavg`, here g to avoid the clash)

    g_t = x_t - sum_k p_k w_k = -Delta_t,

and optax applies x_{t+1} = x_t + updates. Algorithm 2 in Reddi's notation,
elementwise over every leaf, m_{-1} = 0, v_{-1} = initial_accumulator_value:

    m_t = beta1 m_{t-1} + (1 - beta1) Delta_t                          (all three)
    v_t = v_{t-1} + Delta_t^2                                          FedAdagrad
    v_t = beta2 v_{t-1} + (1 - beta2) Delta_t^2                        FedAdam
    v_t = v_{t-1} - (1 - beta2) Delta_t^2 sign(v_{t-1} - Delta_t^2)    FedYogi
    x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)

`scale_by_fedopt` keeps m of g (which is -m of Delta; v is sign-independent)
and returns m_g / (sqrt(v) + tau), pointing along g like a gradient;
`optax.scale_by_learning_rate(eta)` then multiplies by -eta, which gives
exactly the x_{t+1} above.

This is not `optax.adam` / `optax.yogi` applied to g: there is no bias
correction (optax divides m and v by 1 - beta^t, so its first Adam step is
about eta * sign(g) rather than eta (1 - beta1) Delta / (sqrt(1 - beta2) |Delta|
+ tau)), tau is added outside the square root, and m starts at 0 (optax.yogi
starts both moments at its initial_accumulator_value).

v_{-1}: FLamby starts at 0 (the default here); Reddi's Algorithm 2 asks for
v_{-1} >= tau^2. Pass `initial_accumulator_value=tau**2` for the paper's
variant. With v_{-1} = 0 FedAdam's and FedYogi's first steps coincide.
FLamby's FedOpt defaults are tau = 1e-3 (FedAdam/FedYogi/FedAdagrad
subclasses; the base class says 1e-8), server learning rate 1e-2,
beta1 = 0.9, beta2 = 0.999.

Every hyperparameter may be a traced array, so the optimizers can be wrapped
in `optax.inject_hyperparams` and swept without recompiling:

    server_optimizer = optax.inject_hyperparams(fm.optimizers.server_adam)(
        learning_rate=1e-2, beta1=0.9, beta2=0.999, tau=1e-3)

(`initial_accumulator_value` is traced too but only read by `init`: changing
it in `state.hyperparams` later does not reset v.)
"""

from __future__ import annotations

import functools
import numbers
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_med.core.options import OptionError

ADAPTIVITIES = ("adagrad", "adam", "yogi")


class ScaleByFedOptState(NamedTuple):
  """State of `scale_by_fedopt`; both trees have the structure of the params.

  Attributes:
    m: first moment of the pseudo-gradient g, m_g = -m_Delta.
    v: second moment v (the same for g and Delta).
  """
  m: Any
  v: Any


def _is_number(value) -> bool:
  """A concrete Python / NumPy real (not a bool, not a possibly traced array)."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_arguments(name: str, beta1, beta2, tau, initial_accumulator_value) -> None:
  for field, value in (("beta1", beta1), ("beta2", beta2)):
    if _is_number(value) and not 0.0 <= value < 1.0:
      raise OptionError(f"{name}: {field} must be in [0, 1), got {value}")
  if _is_number(tau) and not tau > 0.0:
    raise OptionError(f"{name}: tau must be > 0, got {tau}")
  if _is_number(initial_accumulator_value) and not initial_accumulator_value >= 0.0:
    raise OptionError(f"{name}: initial_accumulator_value must be >= 0, got"
                      f" {initial_accumulator_value}")


def _second_moment(adaptivity: str, beta2):
  """v_t from (g_t, v_{t-1}), elementwise; g^2 = Delta^2."""
  if adaptivity == "adagrad":
    return lambda g, v: v + jnp.square(g)
  if adaptivity == "adam":
    return lambda g, v: beta2 * v + (1 - beta2) * jnp.square(g)

  def yogi(g, v):
    g2 = jnp.square(g)
    return v - (1 - beta2) * g2 * jnp.sign(v - g2)

  return yogi


def scale_by_fedopt(adaptivity: str, beta1=0.9, beta2=0.999, tau=1e-3,
                    initial_accumulator_value=0.0) -> optax.GradientTransformation:
  """Rescales g_t to m_t / (sqrt(v_t) + tau) (Reddi et al. 2021, Algorithm 2).

  With g_t = -Delta_t (per leaf, any shape, elementwise):

    m_t = beta1 m_{t-1} + (1 - beta1) g_t         (= -m_t of Delta)
    v_t = v_{t-1} + g_t^2                                       "adagrad"
    v_t = beta2 v_{t-1} + (1 - beta2) g_t^2                     "adam"
    v_t = v_{t-1} - (1 - beta2) g_t^2 sign(v_{t-1} - g_t^2)     "yogi"
    output_t = m_t / (sqrt(v_t) + tau)

  No bias correction; m_{-1} = 0, v_{-1} = initial_accumulator_value. The
  output points along g; chain with `optax.scale_by_learning_rate(eta)` for
  x_{t+1} = x_t + eta m_Delta / (sqrt(v) + tau).

  Args:
    adaptivity: "adagrad", "adam" or "yogi".
    beta1: first-moment decay, in [0, 1).
    beta2: second-moment decay, in [0, 1); unused by "adagrad".
    tau: degree of adaptivity, added outside the square root, > 0.
    initial_accumulator_value: v_{-1} >= 0; 0.0 as FLamby, Reddi et al. ask
      for >= tau^2.

  Numbers are validated here; arrays (e.g. traced by `inject_hyperparams`)
  are not.

  Returns:
    optax.GradientTransformation with state `ScaleByFedOptState(m, v)`.

  Raises:
    OptionError (a ValueError) for an unknown adaptivity or an out-of-range
    number.
  """
  if adaptivity not in ADAPTIVITIES:
    raise OptionError(f"scale_by_fedopt: unknown adaptivity {adaptivity!r};"
                      f" choose one of {list(ADAPTIVITIES)}")
  _check_arguments(f"scale_by_fedopt({adaptivity!r})", beta1, beta2, tau,
                   initial_accumulator_value)
  second_moment = _second_moment(adaptivity, beta2)

  def init_fn(params):
    return ScaleByFedOptState(
        m=optax.tree_utils.tree_zeros_like(params),
        v=optax.tree_utils.tree_full_like(params, initial_accumulator_value))

  def update_fn(updates, state, params=None):
    del params
    m = optax.tree_utils.tree_update_moment(updates, state.m, beta1, 1)
    v = jax.tree.map(second_moment, updates, state.v)
    out = jax.tree.map(lambda g, m_, v_: (m_ / (jnp.sqrt(v_) + tau)).astype(g.dtype),
                       updates, m, v)
    # Keep the state's dtypes fixed (e.g. bf16 params with float32 hyperparams).
    m = jax.tree.map(lambda new, old: new.astype(old.dtype), m, state.m)
    v = jax.tree.map(lambda new, old: new.astype(old.dtype), v, state.v)
    return out, ScaleByFedOptState(m=m, v=v)

  return optax.GradientTransformation(init_fn, update_fn)


def _fedopt(adaptivity, learning_rate, beta1, beta2, tau, initial_accumulator_value):
  return optax.chain(
      scale_by_fedopt(adaptivity, beta1=beta1, beta2=beta2, tau=tau,
                      initial_accumulator_value=initial_accumulator_value),
      optax.scale_by_learning_rate(learning_rate))


def server_adagrad(learning_rate, beta1=0.9, beta2=0.999, tau=1e-3,
               initial_accumulator_value=0.0) -> optax.GradientTransformation:
  """FedAdagrad server optimizer: v_t = v_{t-1} + Delta_t^2.

  x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau) with
  m_t = beta1 m_{t-1} + (1 - beta1) Delta_t (Reddi et al. 2021, Algorithm 2).

  Args:
    learning_rate: server learning rate eta (scalar or optax schedule).
    beta1: first-moment decay, in [0, 1).
    beta2: unused by Adagrad; accepted (and range-checked) so the three
      optimizers share one signature.
    tau: degree of adaptivity, > 0.
    initial_accumulator_value: v_{-1} (0.0 as FLamby; Reddi et al. >= tau^2).

  Returns:
    optax.chain(scale_by_fedopt("adagrad", ...), scale_by_learning_rate(eta)).
  """
  return _fedopt("adagrad", learning_rate, beta1, beta2, tau, initial_accumulator_value)


def server_adam(learning_rate, beta1=0.9, beta2=0.999, tau=1e-3,
            initial_accumulator_value=0.0) -> optax.GradientTransformation:
  """FedAdam server optimizer: v_t = beta2 v_{t-1} + (1 - beta2) Delta_t^2.

  x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau) with
  m_t = beta1 m_{t-1} + (1 - beta1) Delta_t, no bias correction (Reddi et
  al. 2021, Algorithm 2), so not `optax.adam`.

  Args:
    learning_rate: server learning rate eta (scalar or optax schedule).
    beta1: first-moment decay, in [0, 1).
    beta2: second-moment decay, in [0, 1).
    tau: degree of adaptivity, > 0.
    initial_accumulator_value: v_{-1} (0.0 as FLamby; Reddi et al. >= tau^2).

  Returns:
    optax.chain(scale_by_fedopt("adam", ...), scale_by_learning_rate(eta)).
  """
  return _fedopt("adam", learning_rate, beta1, beta2, tau, initial_accumulator_value)


def server_yogi(learning_rate, beta1=0.9, beta2=0.999, tau=1e-3,
            initial_accumulator_value=0.0) -> optax.GradientTransformation:
  """FedYogi server optimizer.

  v_t = v_{t-1} - (1 - beta2) Delta_t^2 sign(v_{t-1} - Delta_t^2): v moves
  towards Delta_t^2 by (1 - beta2) Delta_t^2 (additively, unlike Adam's
  multiplicative decay); sign(0) = 0 leaves v unchanged, as np.sign in
  FLamby. x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau), no bias correction
  (Reddi et al. 2021, Algorithm 2), so not `optax.yogi`.

  Args:
    learning_rate: server learning rate eta (scalar or optax schedule).
    beta1: first-moment decay, in [0, 1).
    beta2: second-moment rate, in [0, 1).
    tau: degree of adaptivity, > 0.
    initial_accumulator_value: v_{-1} (0.0 as FLamby; Reddi et al. >= tau^2).

  Returns:
    optax.chain(scale_by_fedopt("yogi", ...), scale_by_learning_rate(eta)).
  """
  return _fedopt("yogi", learning_rate, beta1, beta2, tau, initial_accumulator_value)


def _renamed(new, old_name: str):
  """`new` under its version-0.1 name, warning once per call site."""

  @functools.wraps(new)
  def old(*args, **kwargs):
    warnings.warn(f"fm.optimizers.{old_name} is now fm.optimizers.{new.__name__} (the name"
                  f" {old_name} is the algorithm, fm.algorithms.{old_name}); the old name"
                  " is removed in 0.3", DeprecationWarning, stacklevel=2)
    return new(*args, **kwargs)

  old.__name__ = old.__qualname__ = old_name
  return old


fedadagrad = _renamed(server_adagrad, "fedadagrad")
fedadam = _renamed(server_adam, "fedadam")
fedyogi = _renamed(server_yogi, "fedyogi")

__all__ = ["ScaleByFedOptState", "scale_by_fedopt", "server_adagrad", "server_adam",
           "server_yogi", "ADAPTIVITIES", "fedadagrad", "fedadam", "fedyogi"]
