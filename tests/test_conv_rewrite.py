"""convs_as_matmuls: same values and gradients as XLA's convolution, no conv left.

References are computed by code the rewrite did not produce: XLA's own
`lax.conv_general_dilated` (through `lax` or `flax.linen.Conv`) run in
float64 under `jax.enable_x64(True)`, and a float64 NumPy loop over output
positions. The rewritten function runs in float32 under `jax.jit` and
`jax.vmap` over a client axis of parameters AND data (the federated
setting). Tolerance (float32 vs float64 reference): |got - ref| <= 1e-5 *
max(1, max|ref|) + 1e-5 * |ref| elementwise (RTOL = ATOL = 1e-5, atol
scaled by the reference's magnitude), for outputs and for gradients w.r.t.
the kernel and the input; 1e-4 for the 3-step SGD trajectory of a whole CNN.
"""

from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fedjax_med.core.conv import conv_general_dilated_as_matmul, convs_as_matmuls

from conftest import count_convs, tiered

RTOL = ATOL = 1e-5
K = 3  # clients


def _close(got, ref, rtol=RTOL, atol=ATOL):
  for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref), strict=True):
    g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
    assert g.shape == r.shape
    scale = max(1.0, float(np.abs(r).max(initial=0)))
    np.testing.assert_allclose(g, r, rtol=rtol, atol=atol * scale)


def _f64(fn, *args):
  """fn(*args) in float64 (floating args cast), as NumPy trees."""
  def cast(a):
    a = np.asarray(a)
    return jnp.asarray(a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a)
  with jax.enable_x64(True):
    args64 = jax.tree_util.tree_map(cast, args)
    return jax.tree_util.tree_map(np.asarray, jax.jit(fn)(*args64))


def _value_and_grads(loss):
  """vmap over clients of (loss, d loss / d arg0, d loss / d arg1), jitted."""
  return jax.jit(jax.vmap(jax.value_and_grad(loss, argnums=(0, 1))))


def _check_rewrite(loss, *args):
  """Rewritten loss in float32 vs native loss in float64: values, grads, no conv left."""
  native, rewritten = _value_and_grads(loss), _value_and_grads(convs_as_matmuls(loss))
  assert count_convs(jax.make_jaxpr(native)(*args)) > 0
  assert count_convs(jax.make_jaxpr(rewritten)(*args)) == 0
  got = rewritten(*args)
  _close(got, _f64(_value_and_grads(loss), *args))
  return got


# ---------------------------------------------------------------- lax level

# name, lhs shape (one client), rhs shape, strides, padding, lhs_dil, rhs_dil, dn, groups
LAX_CASES = [
    ("1d_valid_NCH", (2, 4, 11), (6, 4, 3), (1,), "VALID", None, None, ("NCH", "OIH", "NCH"), 1),
    ("1d_same_stride2_NWC", (2, 11, 4), (3, 4, 6), (2,), "SAME", None, None,
     ("NWC", "WIO", "NWC"), 1),
    ("2d_NCHW_OIHW", (2, 4, 9, 8), (6, 4, 3, 3), (1, 1), "SAME", None, None,
     ("NCHW", "OIHW", "NCHW"), 1),
    ("2d_NCHW_asym_stride2_dil2", (2, 4, 11, 10), (6, 2, 3, 2), (2, 1), ((1, 2), (0, 3)),
     None, (2, 2), ("NCHW", "OIHW", "NCHW"), 2),
    ("2d_mixed_layouts", (2, 9, 8, 4), (6, 4, 3, 3), (2, 2), ((2, 0), (1, 1)), None, (1, 2),
     ("NHWC", "OIHW", "NCHW"), 1),
    ("2d_negative_padding", (2, 10, 9, 4), (3, 3, 4, 6), (1, 1), ((-1, 2), (1, -2)), None, None,
     ("NHWC", "HWIO", "NHWC"), 1),
    ("2d_lhs_dilation", (2, 5, 6, 4), (3, 3, 4, 6), (1, 1), ((2, 2), (1, 2)), (2, 2), None,
     ("NHWC", "HWIO", "NHWC"), 1),
    ("2d_depthwise_lhs_dil_stride", (2, 6, 5, 4), (3, 3, 1, 8), (2, 1), ((1, 1), (2, 1)),
     (2, 1), (1, 2), ("NHWC", "HWIO", "NHWC"), 4),
    ("3d_NCDHW", (2, 3, 5, 6, 5), (4, 3, 2, 3, 2), (1, 2, 1), ((0, 1), (1, 1), (1, 0)), None,
     (2, 1, 1), ("NCDHW", "OIDHW", "NCDHW"), 1),
]


# `make test` runs the cases that together hold every feature (1D/2D/3D, both
# layouts, strides, both dilations, negative padding, groups); `make test-all` all.
FAST_LAX = {"1d_same_stride2_NWC", "2d_NCHW_asym_stride2_dil2", "2d_negative_padding",
            "2d_depthwise_lhs_dil_stride", "3d_NCDHW"}
FAST_FLAX = {"2d_asym_dil2", "2d_depthwise_stride2", "3d_valid_stride2_groups3"}


@pytest.mark.parametrize("case", tiered(LAX_CASES, FAST_LAX, key=lambda c: c[0], unpack=False),
                         ids=[c[0] for c in LAX_CASES])
def test_lax_conv_outputs_and_grads_under_vmap_and_jit(case):
  _, lhs_shape, rhs_shape, strides, padding, lhs_dil, rhs_dil, dn, groups = case
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (K, *lhs_shape))
  k = jax.random.normal(keys[1], (K, *rhs_shape)) / np.sqrt(np.prod(rhs_shape[1:]))

  def conv(k, x):
    return lax.conv_general_dilated(x, k, strides, padding, lhs_dilation=lhs_dil,
                                    rhs_dilation=rhs_dil, dimension_numbers=dn,
                                    feature_group_count=groups)

  out_shape = jax.eval_shape(conv, k[0], x[0]).shape
  ct = jax.random.normal(keys[2], out_shape)  # a fixed cotangent: loss = <out, ct>
  loss = lambda k, x: jnp.sum(jnp.sin(conv(k, x)) * ct)
  _check_rewrite(loss, k, x)
  # The outputs themselves (vmapped, jitted).
  got = jax.jit(jax.vmap(convs_as_matmuls(conv)))(k, x)
  _close(got, _f64(jax.vmap(conv), k, x))


def _numpy_conv_nhwc(x, k, strides, padding, rhs_dil):
  """out[b, p, o] = sum_{w, c} x_pad[b, p*s + w*d, c] k[w, c, o], one output position at a time."""
  x, k = np.asarray(x, np.float64), np.asarray(k, np.float64)
  x = np.pad(x, ((0, 0), *padding, (0, 0)))
  (kh, kw, _, o), (sh, sw), (dh, dw) = k.shape, strides, rhs_dil
  oh = (x.shape[1] - (kh - 1) * dh - 1) // sh + 1
  ow = (x.shape[2] - (kw - 1) * dw - 1) // sw + 1
  out = np.zeros((x.shape[0], oh, ow, o))
  for b in range(x.shape[0]):
    for i in range(oh):
      for j in range(ow):
        window = x[b, i * sh:i * sh + (kh - 1) * dh + 1:dh, j * sw:j * sw + (kw - 1) * dw + 1:dw]
        out[b, i, j] = np.einsum("hwc,hwco->o", window, k)
  return out


def test_matches_a_numpy_loop_over_output_positions():
  x = np.random.default_rng(0).normal(size=(2, 9, 8, 3)).astype(np.float32)
  k = np.random.default_rng(1).normal(size=(3, 2, 3, 5)).astype(np.float32)
  for strides, padding, dil in [((1, 1), ((0, 0), (0, 0)), (1, 1)),
                                ((2, 1), ((1, 2), (2, 0)), (2, 2))]:
    got = conv_general_dilated_as_matmul(x, k, strides, padding, rhs_dilation=dil,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
    _close(got, _numpy_conv_nhwc(x, k, strides, padding, dil))


# ---------------------------------------------------------------- flax level

FLAX_CASES = [
    # name, input shape (one client), nn.Conv kwargs
    ("1d_same", (3, 12, 4), dict(features=6, kernel_size=(3,), padding="SAME")),
    ("1d_valid_stride2_dil2", (3, 15, 4), dict(features=6, kernel_size=(3,), padding="VALID",
                                               strides=(2,), kernel_dilation=(2,))),
    ("2d_same", (3, 8, 8, 4), dict(features=6, kernel_size=(3, 3), padding="SAME")),
    ("2d_valid_stride2", (3, 9, 9, 4), dict(features=6, kernel_size=(3, 3), padding="VALID",
                                            strides=(2, 2))),
    ("2d_asym_dil2", (3, 9, 10, 4), dict(features=6, kernel_size=(3, 2),
                                         padding=((1, 2), (0, 1)), kernel_dilation=(2, 2))),
    ("2d_groups2", (3, 8, 8, 4), dict(features=6, kernel_size=(3, 3), padding="SAME",
                                      feature_group_count=2)),
    ("2d_depthwise_stride2", (3, 8, 8, 4), dict(features=8, kernel_size=(3, 3), padding="SAME",
                                                strides=(2, 2), feature_group_count=4)),
    ("3d_same", (2, 5, 6, 5, 3), dict(features=4, kernel_size=(3, 3, 2), padding="SAME")),
    ("3d_valid_stride2_groups3", (2, 7, 6, 5, 3), dict(features=6, kernel_size=(3, 2, 2),
                                                       padding="VALID", strides=(2, 2, 1),
                                                       feature_group_count=3)),
]


def _client_params(module, x, seed=0):
  """Per-client parameters [K, ...], different on every client."""
  keys = jax.random.split(jax.random.key(seed), K)
  return jax.vmap(lambda key: module.init(key, x[0]))(keys)


@pytest.mark.parametrize("case", tiered(FLAX_CASES, FAST_FLAX, key=lambda c: c[0], unpack=False),
                         ids=[c[0] for c in FLAX_CASES])
def test_flax_conv_outputs_and_grads_under_vmap_and_jit(case):
  _, x_shape, kwargs = case
  module = nn.Conv(**kwargs)
  x = jax.random.normal(jax.random.key(1), (K, *x_shape))
  params = _client_params(module, x)
  one_client = jax.tree_util.tree_map(lambda a: a[0], params)
  ct = jax.random.normal(jax.random.key(2), jax.eval_shape(module.apply, one_client, x[0]).shape)
  loss = lambda p, x: jnp.sum(jnp.tanh(module.apply(p, x)) * ct)
  _check_rewrite(loss, params, x)


def test_conv_transpose_is_rewritten_as_input_dilation():
  module = nn.ConvTranspose(5, (3, 3), strides=(2, 2), padding="SAME")
  x = jax.random.normal(jax.random.key(3), (K, 2, 5, 6, 4))
  params = _client_params(module, x)
  jaxpr = jax.make_jaxpr(lambda p, x: module.apply(p, x))(
      jax.tree_util.tree_map(lambda a: a[0], params), x[0])
  (conv,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  assert conv.params["lhs_dilation"] == (2, 2)
  loss = lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))
  _check_rewrite(loss, params, x)


def test_batch_group_count_raises():
  x, k = jnp.ones((4, 5, 5, 2)), jnp.ones((3, 3, 2, 4))
  f = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "SAME", batch_group_count=2,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
  with pytest.raises(NotImplementedError, match="batch_group_count=2"):
    convs_as_matmuls(f)(x, k)


# ---------------------------------------------------------------- a whole CNN, federated


class SmallCNN(nn.Module):
  """Conv VALID -> relu -> Conv SAME -> max_pool 2 -> Dense."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (3, 3), padding="VALID")(x))
    x = nn.Conv(8, (3, 3), padding="SAME")(x)
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return nn.Dense(5)(x.reshape((x.shape[0], -1)))


def _sgd_scan(apply, lr=0.1):
  """One client's 3 SGD steps (lax.scan over batches [3, B, ...]): final params, losses."""

  def loss(params, x, y):
    logits = apply(params, x)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], 1)[:, 0])

  def train(params, xs, ys):
    def step(p, batch):
      value, grads = jax.value_and_grad(loss)(p, *batch)
      return jax.tree_util.tree_map(lambda a, g: a - lr * g, p, grads), value
    return lax.scan(step, params, (xs, ys))

  return train


def test_small_cnn_sgd_scan_under_vmap_over_4_clients():
  model = SmallCNN()
  n_clients = 4
  xs = jax.random.normal(jax.random.key(4), (n_clients, 3, 6, 10, 10, 3))
  ys = jax.random.randint(jax.random.key(5), (n_clients, 3, 6), 0, 5)
  params = jax.vmap(lambda key: model.init(key, xs[0, 0]))(jax.random.split(jax.random.key(6),
                                                                           n_clients))
  native = jax.jit(jax.vmap(_sgd_scan(model.apply)))
  rewritten = jax.jit(jax.vmap(_sgd_scan(convs_as_matmuls(model.apply))))
  assert count_convs(jax.make_jaxpr(native)(params, xs, ys)) > 0
  assert count_convs(jax.make_jaxpr(rewritten)(params, xs, ys)) == 0
  got = rewritten(params, xs, ys)
  ref = _f64(native, params, xs, ys)
  _close(got, ref, rtol=1e-4, atol=1e-4)
  assert not np.allclose(np.asarray(got[1][:, 0]), np.asarray(got[1][:, -1]))  # it trained


# ---------------------------------------------------------------- the interpreter


def test_function_without_convs_is_returned_equal():
  def mlp(p, x):
    return jnp.tanh(x @ p["w"] + p["b"]).sum()
  p = {"w": jnp.arange(12.0).reshape(4, 3) / 10, "b": jnp.ones(3)}
  x = jnp.linspace(-1, 1, 8).reshape(2, 4)
  g = convs_as_matmuls(mlp)
  assert str(jax.make_jaxpr(g)(p, x)) == str(jax.make_jaxpr(mlp)(p, x))
  np.testing.assert_array_equal(g(p, x), mlp(p, x))
  np.testing.assert_array_equal(jax.grad(g)(p, x)["w"], jax.grad(mlp)(p, x)["w"])


def _conv_nhwc(x, k):
  return lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


@jax.custom_jvp
def _custom_square(x):
  return x * x


_custom_square.defjvp(lambda primals, tangents: (primals[0] ** 2, 2 * primals[0] * tangents[0]))


@jax.custom_jvp
def _custom_jvp_conv(x, k):
  return _conv_nhwc(x, k)


@_custom_jvp_conv.defjvp
def _custom_jvp_conv_rule(primals, tangents):  # exact: the conv is bilinear
  (x, k), (dx, dk) = primals, tangents
  return _conv_nhwc(x, k), _conv_nhwc(dx, k) + _conv_nhwc(x, dk)


@jax.custom_vjp
def _custom_vjp_conv(x, k):
  return _conv_nhwc(x, k)


def _custom_vjp_fwd(x, k):
  return _conv_nhwc(x, k), (x, k)


def _custom_vjp_bwd(res, g):  # exact
  return jax.vjp(_conv_nhwc, *res)[1](g)


_custom_vjp_conv.defvjp(_custom_vjp_fwd, _custom_vjp_bwd)

WRAPPERS = {
    "checkpoint": lambda k, x: jax.checkpoint(_conv_nhwc)(x, k),
    "checkpoint_policy": lambda k, x: jax.checkpoint(
        lambda x, k: jnp.sin(_conv_nhwc(x, k)),
        policy=jax.checkpoint_policies.nothing_saveable)(x, k),
    "nested_jit": lambda k, x: jax.jit(lambda x: jax.jit(_conv_nhwc)(x, k) ** 2)(x),
    "custom_jvp_outside": lambda k, x: _custom_square(_conv_nhwc(x, k)),
    "custom_jvp_inside": lambda k, x: _custom_jvp_conv(x, k),
    "custom_vjp_inside": lambda k, x: _custom_vjp_conv(x, k),
    "scan": lambda k, x: lax.scan(lambda c, kk: (jnp.tanh(_conv_nhwc(c, kk)), None), x,
                                  jnp.stack([k, 0.5 * k]))[0],
    "cond": lambda k, x: lax.cond(x.sum() > 0, lambda x: _conv_nhwc(x, k),
                                  lambda x: -_conv_nhwc(x, 2 * k), x),
    "while": lambda k, x: lax.fori_loop(0, 2, lambda i, c: jnp.tanh(_conv_nhwc(c, k)), x),
}


@pytest.mark.parametrize("name", list(WRAPPERS))
def test_convs_inside_higher_order_primitives_are_rewritten(name):
  f = WRAPPERS[name]
  k = jax.random.normal(jax.random.key(7), (K, 3, 3, 4, 4)) / 6
  x = jax.random.normal(jax.random.key(8), (K, 2, 6, 5, 4))
  loss = lambda k, x: jnp.sum(jnp.sin(f(k, x)))
  g = convs_as_matmuls(loss)
  assert count_convs(jax.make_jaxpr(loss)(k[0], x[0])) > 0
  assert count_convs(jax.make_jaxpr(g)(k[0], x[0])) == 0
  if name != "while":  # reverse-mode through a while loop does not exist
    assert count_convs(jax.make_jaxpr(jax.grad(g, argnums=(0, 1)))(k[0], x[0])) == 0
    _check_rewrite(loss, k, x)
  else:
    _close(jax.jit(jax.vmap(g))(k, x), _f64(jax.vmap(loss), k, x))


def test_custom_rule_around_a_conv_is_dropped():
  """Documented: a custom_jvp whose primal holds a conv is inlined, its rule dropped."""
  @jax.custom_jvp
  def f(x, k):
    return _conv_nhwc(x, k)
  f.defjvp(lambda primals, tangents: (f(*primals), 0.0 * f(*primals)))  # a deliberately zero rule
  k = jax.random.normal(jax.random.key(15), (3, 3, 4, 2)) / 6
  x = jax.random.normal(jax.random.key(16), (1, 5, 5, 4))
  loss = lambda k: jnp.sum(f(x, k) ** 2)
  assert not np.any(np.asarray(jax.grad(loss)(k)))
  _close(jax.grad(convs_as_matmuls(loss))(k),
         _f64(jax.grad(lambda k, x: jnp.sum(_conv_nhwc(x, k) ** 2)), k, x))


def test_closed_over_tracers_under_vmap():
  k = jax.random.normal(jax.random.key(9), (K, 3, 3, 4, 2)) / 6
  x = jax.random.normal(jax.random.key(10), (K, 2, 5, 5, 4))
  per_client = lambda k, x: convs_as_matmuls(lambda x: _conv_nhwc(x, k))(x)
  _close(jax.jit(jax.vmap(per_client))(k, x), _f64(jax.vmap(_conv_nhwc), x, k))


def test_rewriting_a_gradient_function():
  """Gradient convolutions (input dilation for stride 2, whole-image windows) rewrite too."""
  x = jax.random.normal(jax.random.key(11), (2, 7, 7, 3))
  k = jax.random.normal(jax.random.key(12), (3, 3, 3, 4)) / 5
  loss = lambda k, x: jnp.sum(jnp.sin(lax.conv_general_dilated(
      x, k, (2, 2), ((1, 0), (0, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))))
  grad = jax.grad(loss, argnums=(0, 1))
  g = convs_as_matmuls(grad)
  assert count_convs(jax.make_jaxpr(grad)(k, x)) >= 2
  assert count_convs(jax.make_jaxpr(g)(k, x)) == 0
  _close(jax.jit(g)(k, x), _f64(grad, k, x))


def test_pytree_and_keyword_arguments():
  k = jax.random.normal(jax.random.key(13), (3, 3, 4, 2))
  x = jax.random.normal(jax.random.key(14), (1, 5, 5, 4))
  f = lambda p, *, x: {"y": _conv_nhwc(x, p["k"]), "n": x.shape[0]}
  out = convs_as_matmuls(f)({"k": k}, x=x)
  assert set(out) == {"y", "n"}
  _close(out["y"], _f64(_conv_nhwc, x, k))


def test_precision_and_preferred_element_type_reach_the_dot():
  x = jax.random.normal(jax.random.key(17), (2, 6, 5, 4)).astype(jnp.bfloat16)
  k = (jax.random.normal(jax.random.key(18), (3, 3, 4, 3)) / 6).astype(jnp.bfloat16)
  conv = lambda x, k: lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  g = convs_as_matmuls(conv)
  (dot,) = [e for e in jax.make_jaxpr(g)(x, k).jaxpr.eqns if e.primitive.name == "dot_general"]
  assert dot.params["preferred_element_type"] == jnp.float32
  assert dot.params["precision"] == (lax.Precision.HIGHEST, lax.Precision.HIGHEST)
  out = g(x, k)
  assert out.dtype == jnp.float32
  # bfloat16 products are exact in float32; the sums (36 terms) round in float32.
  _close(out, _f64(lambda x, k: lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")),
      np.asarray(x, np.float32), np.asarray(k, np.float32)))


def test_conv_inside_an_unsupported_higher_order_primitive_raises():
  k = jnp.ones((3, 3, 4, 4)) / 36
  conv = lambda v: _conv_nhwc(v, k)
  f = lambda b: lax.custom_linear_solve(conv, b, solve=lambda matvec, b: b)
  with pytest.raises(NotImplementedError, match="custom_linear_solve"):
    convs_as_matmuls(f)(jnp.ones((1, 5, 5, 4)))


# --------------------------------------------------------------------------
# The round's rule (fedjax_med.core.conv.round_loss), wired into the kit.

import optax  # pylint: disable=g-import-not-at-top,wrong-import-position

import fedjax_med as fm  # pylint: disable=g-import-not-at-top,wrong-import-position
from fedjax_med.core import conv as conv_lib  # pylint: disable=g-import-not-at-top


class _UserCNN(nn.Module):
  """A CNN as a user writes it: nn.Conv VALID and strided SAME, pooling, dense."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), padding="VALID")(x))
    x = nn.relu(nn.Conv(6, (3, 3), strides=(2, 2), padding="SAME")(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    return nn.Dense(1)(x.reshape(x.shape[0], -1))[:, 0]


def _cnn_sites(num_sites=3, seed=0):
  rng = np.random.default_rng(seed)
  sites = []
  for k in range(num_sites):
    n = 4 + 2 * k
    x = rng.normal(size=(n, 10, 10, 2)).astype(np.float32)
    y = (rng.uniform(size=n) < 0.5).astype(np.float32)
    sites.append((x, y))
  return fm.FederatedData.from_sites(sites)


def _loss_for(model):
  def loss(params, x, y):
    logits = model.apply(params, x)
    return optax.sigmoid_binary_cross_entropy(logits.reshape(y.shape), y)
  return loss


def test_round_selects_only_per_client_kernels():
  """nn.Conv kernels (the weights) are selected; PatchConv's identity kernel and
  UNet's custom-rule convolutions are not."""
  x = jnp.zeros((2, 16, 16, 3))
  for model, expected in ((fm.models.CNN(patch_conv=False), 2), (fm.models.CNN(), 0),
                          (fm.models.UNet(), 0)):
    params = model.init(jax.random.PRNGKey(0), x)
    closed = jax.make_jaxpr(lambda p, x, m=model: jnp.sum(m.apply(p, x)))(params, x)
    assert conv_lib._has_conv(closed)  # pylint: disable=protected-access
    leaves = jax.tree_util.tree_leaves((params, x))
    assert len(conv_lib.argument_kernel_convs(closed, [True] * len(leaves))) == expected


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the rewrite applies on CPU")
def test_fedavg_round_of_a_user_nn_conv_cnn_matches_native_convolutions():
  """Two rounds of FedAvg on a user's nn.Conv CNN: the rewritten round (default on
  CPU, no conv left in its program) against the same round with XLA's native
  convolutions (`keep_native_convs`); float32, rtol 2e-5 / atol 2e-6."""
  data = _cnn_sites()
  model = _UserCNN()
  params = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 10, 10, 2)))
  loss = _loss_for(model)
  native_loss = conv_lib.keep_native_convs(_loss_for(model))
  make = lambda fn: fm.algorithms.fedavg(fn, client_optimizer=optax.sgd(0.1), batch_size=3,
                                         local_epochs=2)
  fast, native = make(loss), make(native_loss)
  key = jax.random.PRNGKey(3)
  s_fast, s_native = fast.init(params), native.init(params)
  for r in range(2):
    s_fast, m_fast = fast.round(s_fast, data, jax.random.fold_in(key, r))
    s_native, m_native = native.round(s_native, data, jax.random.fold_in(key, r))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
               s_fast.params, s_native.params)
  np.testing.assert_allclose(m_fast["train_loss"], m_native["train_loss"], rtol=2e-5)
  assert count_convs(jax.make_jaxpr(fast.pure_round)(s_fast, data, key)) == 0
  assert count_convs(jax.make_jaxpr(native.pure_round)(s_native, data, key)) > 0


def test_models_without_per_client_kernels_run_exactly_as_written():
  """PatchConv CNN: the round calls the loss itself, bit for bit."""
  data = _cnn_sites(seed=1)
  model = fm.models.CNN(features=(3,), hidden=4)
  params = model.init(jax.random.PRNGKey(2), jnp.zeros((1, 10, 10, 2)))
  make = lambda fn: fm.algorithms.fedavg(fn, client_optimizer=optax.sgd(0.1), batch_size=3)
  a, b = make(_loss_for(model)), make(conv_lib.keep_native_convs(_loss_for(model)))
  s_a, _ = a.round(a.init(params), data, jax.random.PRNGKey(0))
  s_b, _ = b.round(b.init(params), data, jax.random.PRNGKey(0))
  jax.tree.map(np.testing.assert_array_equal, s_a.params, s_b.params)


def test_round_loss_is_cached_so_equal_configs_share_a_compile():
  loss = _loss_for(_UserCNN())
  assert conv_lib.round_loss(loss) is conv_lib.round_loss(loss)
  native = conv_lib.keep_native_convs(_loss_for(_UserCNN()))
  assert conv_lib.round_loss(native) is native
