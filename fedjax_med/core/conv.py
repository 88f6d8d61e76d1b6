"""Convolutions rewritten as matmuls: `convs_as_matmuls(fn)`.

The rule. `convs_as_matmuls(fn)` returns a function that computes what `fn`
computes, with every `lax.conv_general_dilated` inside it (including those
of `flax.linen.Conv`, `nn.ConvTranspose`, `jax.numpy.convolve`, ...)
replaced by im2col + ONE `lax.dot_general`. Why: in a federated round the
per-client loss runs under `jax.vmap` over K clients (different weights per
client) inside a `lax.scan` over local steps; XLA:CPU runs a vmapped
convolution and its weight-gradient convolution as slow generic code, but a
vmapped matmul is a batched GEMM (issue 18: a CNN round 146-156 s with
`nn.Conv`, 8-10 s as patches @ kernel). Apply it to the FORWARD function
(the per-client loss or the model's apply) and differentiate / vmap / scan
the result: JAX then differentiates slices, pads and a matmul, and never
builds a gradient convolution.

The equation. With the input dilated by `lhs_dilation` (zeros inserted
between pixels) and padded by `padding` (lo, hi) on every spatial axis into
x_pad, strides s, kernel dilation d, spatial window offsets w (a tuple, one
per spatial axis) and the input features split into G = feature_group_count
groups of I = C_in / G channels (group g: channels g*I .. g*I + I - 1, and
output features g*O_g .. g*O_g + O_g - 1, O_g = C_out / G):

  out[b, p, g*O_g + o] = sum_{window w, i} x_pad[b, p*s + w*d, g*I + i] k[w, i, g*O_g + o]

computed as: for every kernel offset w one strided slice of x_pad (shape
[B, out_spatial..., C]), concatenated on the feature axis (feature index
w*C + c, w row-major), reshaped to the patch matrix [B*prod(out_spatial),
prod(window)*C]; the kernel reshaped to [prod(window)*I, C_out]; for G = 1 a
plain GEMM [B*P, W*C] @ [W*C, C_out], for G > 1 one dot_general with the
group as a batch dimension ([B*P, W, G, I] x [W, I, G, O_g] -> [G, B*P, O_g]),
no Python loop over groups. `precision` and `preferred_element_type` of the
convolution are passed to the dot_general.

Supported: any number of spatial dims (1D/2D/3D/...), any
`dimension_numbers`, explicit padding (negative padding crops, as XLA's),
window strides, kernel dilation (`rhs_dilation`), input dilation
(`lhs_dilation`: transposed convolutions, by interior padding with
`lax.pad`), `feature_group_count` >= 1 (grouped, depthwise).

The interpreter. `fn` is traced to a jaxpr with `jax.make_jaxpr` on its
arguments (tracers are fine: it works inside jit / vmap / grad / scan, and
closed-over tracers become constants of the jaxpr), then the jaxpr is
evaluated binding every primitive as is, except `conv_general_dilated`.
Equations that carry sub-jaxprs are bound unchanged when no convolution
hides in them (searched recursively); otherwise:
  jit / pjit / closed_call / core_call : the inner jaxpr is interpreted inline
                                         (its shardings, donation and name are dropped);
  remat2 (jax.checkpoint)              : re-wrapped in `jax.checkpoint` with the same
                                         policy and prevent_cse;
  custom_jvp_call / custom_vjp_call    : the primal jaxpr is interpreted inline, so the
                                         CUSTOM DERIVATIVE RULE IS DROPPED (JAX
                                         differentiates the rewritten primal);
  scan / while / cond                  : re-expressed with `lax.scan` / `lax.while_loop`
                                         / `lax.switch` over the interpreted bodies;
  anything else (shard_map, custom_linear_solve, ...) : NotImplementedError naming it.

Raises NotImplementedError for `batch_group_count` > 1 (it only appears in the
weight gradient of a grouped convolution, i.e. when `fn` itself contains a
gradient: apply the rewrite to the forward function and differentiate the
result instead). Arguments are traced like `jax.jit`'s (every leaf of every
argument is an array); bind static configuration with `functools.partial`.

Cost note: the patch matrix holds prod(window) copies of the input, so
memory grows by that factor; rewriting a function that already contains a
weight-gradient convolution (window = the whole output image) would be slow.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from typing import Any, Callable, Sequence

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
from jax import lax

_CONV = "conv_general_dilated"
_INLINE_CALLS = ("jit", "pjit", "closed_call", "core_call")
_CUSTOM_CALLS = ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr")
_REMAT = ("remat2", "checkpoint", "remat")


# --------------------------------------------------------------------------
# The convolution as patches @ kernel.


def conv_general_dilated_as_matmul(
    lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None, feature_group_count: int = 1,
    batch_group_count: int = 1, precision: Any = None,
    preferred_element_type: Any = None, **unused_params) -> jax.Array:
  """`lax.conv_general_dilated`'s value, computed as im2col + one dot_general.

  Same arguments as `lax.conv_general_dilated` (and as the params of its
  jaxpr equation; `out_sharding` is ignored). lhs [N, C_in, spatial...] and
  rhs [C_out, C_in / G, window...] in the layouts `dimension_numbers` names
  (default NC..., OI..., NC...); result in the out layout:

    out[b, p, g*O_g + o] = sum_{w, i} x_pad[b, p*s + w*d, g*I + i] k[w, i, g*O_g + o]

  Raises NotImplementedError if `batch_group_count` > 1.
  """
  if batch_group_count != 1:
    raise NotImplementedError(
        f"convs_as_matmuls: conv_general_dilated with batch_group_count="
        f"{batch_group_count} (> 1) is not rewritten; it only appears in the weight "
        "gradient of a grouped convolution: apply convs_as_matmuls to the forward "
        "function and differentiate the rewritten function instead.")
  nsp = lhs.ndim - 2
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    dn = dimension_numbers
  else:
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  lhs_dilation = tuple(lhs_dilation or (1,) * nsp)
  rhs_dilation = tuple(rhs_dilation or (1,) * nsp)
  strides = tuple(window_strides)
  groups = int(feature_group_count)

  # Channels last: x [N, spatial..., C], kernel [window..., I, O].
  x = jnp.transpose(lhs, (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1]))
  k = jnp.transpose(rhs, (*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0]))
  n, channels = x.shape[0], x.shape[-1]
  window = k.shape[:nsp]
  per_group, out_features = k.shape[nsp], k.shape[nsp + 1]
  if isinstance(padding, str):
    dilated_in = [(size - 1) * dil + 1 if size else 0
                  for size, dil in zip(x.shape[1:-1], lhs_dilation)]
    dilated_window = [(size - 1) * dil + 1 for size, dil in zip(window, rhs_dilation)]
    padding = lax.padtype_to_pads(dilated_in, dilated_window, strides, padding)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)

  # x_pad: interior padding (input dilation) then edge padding (negative crops).
  config = [(0, 0, 0)] + [(lo, hi, dil - 1) for (lo, hi), dil in zip(padding, lhs_dilation)] \
      + [(0, 0, 0)]
  if any(c != (0, 0, 0) for c in config):
    x = lax.pad(x, jnp.zeros((), x.dtype), config)

  out_spatial = []
  for size, w, dil, s in zip(x.shape[1:-1], window, rhs_dilation, strides):
    span = (w - 1) * dil + 1 if w else 0
    out_spatial.append(max(0, (size - span) // s + 1) if size >= span else 0)
  out_dtype = preferred_element_type if preferred_element_type is not None else lhs.dtype

  def to_out_layout(y):  # y [N, out_spatial..., O] -> out_spec layout
    perm = [0] * (nsp + 2)
    perm[dn.out_spec[0]] = 0
    perm[dn.out_spec[1]] = nsp + 1
    for i in range(nsp):
      perm[dn.out_spec[2 + i]] = 1 + i
    return jnp.transpose(y, perm)

  n_window = math.prod(window)
  if math.prod(out_spatial) == 0 or n == 0 or n_window == 0 or channels == 0:
    return to_out_layout(jnp.zeros((n, *out_spatial, out_features), out_dtype))

  # im2col: one strided slice per kernel offset, concatenated on the feature axis.
  slices = []
  for offset in itertools.product(*(range(w) for w in window)):
    start = [o * dil for o, dil in zip(offset, rhs_dilation)]
    limit = [st + (m - 1) * s + 1 for st, m, s in zip(start, out_spatial, strides)]
    slices.append(lax.slice(x, (0, *start, 0), (n, *limit, channels), (1, *strides, 1)))
  patches = slices[0] if len(slices) == 1 else lax.concatenate(slices, nsp + 1)
  rows = n * math.prod(out_spatial)
  if groups == 1:
    y = lax.dot_general(patches.reshape(rows, n_window * channels),
                        k.reshape(n_window * per_group, out_features),
                        (((1,), (0,)), ((), ())), precision=precision,
                        preferred_element_type=preferred_element_type)
  else:
    og = out_features // groups
    y = lax.dot_general(patches.reshape(rows, n_window, groups, per_group),
                        k.reshape(n_window, per_group, groups, og),
                        (((1, 3), (0, 1)), ((2,), (2,))), precision=precision,
                        preferred_element_type=preferred_element_type)  # [G, rows, og]
    y = jnp.transpose(y, (1, 0, 2)).reshape(rows, out_features)
  return to_out_layout(y.reshape(n, *out_spatial, out_features))


# --------------------------------------------------------------------------
# The jaxpr interpreter.


def _open(jaxpr) -> tuple[Any, list]:
  """(Jaxpr, consts) of a Jaxpr or ClosedJaxpr."""
  if isinstance(jaxpr, jex_core.ClosedJaxpr):
    return jaxpr.jaxpr, list(jaxpr.consts)
  return jaxpr, []


def _has_conv(jaxpr) -> bool:
  """Whether a conv_general_dilated equation occurs in `jaxpr` or any sub-jaxpr."""
  jaxpr, _ = _open(jaxpr)
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == _CONV:
      return True
    if any(_has_conv(sub) for sub in jex_core.jaxprs_in_params(eqn.params)):
      return True
  return False


_CUSTOM_RULES = ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr",
                 "custom_vmap_call", "custom_lin", "custom_transpose_call")


def _literal(v) -> bool:
  return isinstance(v, jex_core.Literal)


def argument_kernel_convs(jaxpr, in_deps: Sequence[bool]) -> set[int]:
  """ids of the conv equations (in `jaxpr` and its sub-jaxprs) whose kernel
  depends on the inputs marked True in `in_deps`, outside custom derivative /
  batching rules.

  A kernel that depends on no argument (e.g. the identity kernel of
  `lax.conv_general_dilated_patches`) is the same for every client under
  vmap and stays a native convolution; a convolution inside a custom_jvp /
  custom_vjp / custom_vmap function is a formulation its author chose (e.g.
  `fm.models.UNet`'s) and is left alone. Dependencies through scan / while /
  cond bodies are over-approximated (any dependent input makes every body
  input dependent).
  """
  jaxpr, _ = _open(jaxpr)
  dep = dict(zip(jaxpr.invars, in_deps))
  selected: set[int] = set()
  for eqn in jaxpr.eqns:
    din = [False if _literal(v) else dep.get(v, False) for v in eqn.invars]
    name = eqn.primitive.name
    if name == _CONV:
      if din[1]:
        selected.add(id(eqn))
    elif name not in _CUSTOM_RULES:
      for sub in jex_core.jaxprs_in_params(eqn.params):
        sub_jaxpr, _ = _open(sub)
        n = len(sub_jaxpr.invars)
        if name in _INLINE_CALLS or name in _REMAT:
          sub_deps = din if len(din) == n else [any(din)] * n
        else:  # scan / while / cond / others: over-approximate
          sub_deps = [any(din)] * n
        selected |= argument_kernel_convs(sub, sub_deps)
    out = any(din)
    for v in eqn.outvars:
      dep[v] = out
  return selected


def _eval(jaxpr, consts: Sequence[Any], *args: Any, only: set[int] | None = None
          ) -> list[Any]:
  """Evaluates `jaxpr` on `args`, convolutions rewritten (those whose equation id
  is in `only`, or every one when `only` is None); returns the outputs."""
  env: dict[Any, Any] = {}

  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]

  def write(v, val):
    if not isinstance(v, jex_core.DropVar):
      env[v] = val

  for v, val in zip(jaxpr.constvars, consts, strict=True):
    write(v, val)
  for v, val in zip(jaxpr.invars, args, strict=True):
    write(v, val)
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
    with ctx if ctx is not None else contextlib.nullcontext():  # eqn's context (e.g. remat)
      outvals = _eval_eqn(eqn, invals, only)
    if eqn.primitive.multiple_results:
      for v, val in zip(eqn.outvars, outvals, strict=True):
        write(v, val)
    else:
      write(eqn.outvars[0], outvals)
  return [read(v) for v in jaxpr.outvars]


def _interpreted(closed, only: set[int] | None = None) -> Callable[..., list[Any]]:
  """f(*args) -> list of outputs of the (Closed)Jaxpr, convolutions rewritten."""
  jaxpr, consts = _open(closed)
  return lambda *args: _eval(jaxpr, consts, *args, only=only)


def _has_selected_conv(jaxpr, only: set[int] | None) -> bool:
  if only is None:
    return _has_conv(jaxpr)
  jaxpr, _ = _open(jaxpr)
  for eqn in jaxpr.eqns:
    if id(eqn) in only:
      return True
    if any(_has_selected_conv(sub, only) for sub in jex_core.jaxprs_in_params(eqn.params)):
      return True
  return False


def _eval_eqn(eqn, invals: list[Any], only: set[int] | None = None) -> Any:
  prim, params = eqn.primitive, eqn.params
  name = prim.name
  if name == _CONV and (only is None or id(eqn) in only):
    return conv_general_dilated_as_matmul(*invals, **params)
  subs = list(jex_core.jaxprs_in_params(params))
  if not subs or not any(_has_selected_conv(sub, only) for sub in subs):
    return prim.bind(*invals, **prim.get_bind_params(params))
  _interpreted_here = functools.partial(_interpreted, only=only)

  if name in _INLINE_CALLS or name in _CUSTOM_CALLS:
    inner = params.get("jaxpr", params.get("call_jaxpr", params.get("fun_jaxpr")))
    if inner is None:
      raise NotImplementedError(f"convs_as_matmuls: no inner jaxpr found in {name!r}")
    outs = _interpreted_here(inner)(*invals)
    return outs if prim.multiple_results else outs[0]
  if name in _REMAT:
    return jax.checkpoint(_interpreted_here(params["jaxpr"]),
                          prevent_cse=params.get("prevent_cse", True),
                          policy=params.get("policy"))(*invals)
  if name == "scan":
    n_consts, n_carry = params["num_consts"], params["num_carry"]
    consts, init, xs = (invals[:n_consts], invals[n_consts:n_consts + n_carry],
                        invals[n_consts + n_carry:])
    body_fn = _interpreted_here(params["jaxpr"])

    def body(carry, x):
      outs = body_fn(*consts, *carry, *x)
      return outs[:n_carry], outs[n_carry:]

    carry, ys = lax.scan(body, list(init), list(xs), length=params["length"],
                         reverse=params["reverse"], unroll=params["unroll"])
    return [*carry, *ys]
  if name == "while":
    nc, nb = params["cond_nconsts"], params["body_nconsts"]
    cond_consts, body_consts, init = invals[:nc], invals[nc:nc + nb], invals[nc + nb:]
    cond_fn, body_fn = _interpreted_here(params["cond_jaxpr"]), _interpreted_here(params["body_jaxpr"])
    return lax.while_loop(lambda c: cond_fn(*cond_consts, *c)[0],
                          lambda c: body_fn(*body_consts, *c), list(init))
  if name == "cond":
    index, operands = invals[0], invals[1:]
    branches = [_interpreted_here(b) for b in params["branches"]]
    return lax.switch(index, branches, *operands)
  raise NotImplementedError(
      f"convs_as_matmuls: a conv_general_dilated inside a {name!r} equation is not "
      "supported (handled: jit, closed_call, checkpoint, custom_jvp_call, "
      "custom_vjp_call, scan, while, cond).")


def convs_as_matmuls(fn: Callable[..., Any], *, kernels: str = "all") -> Callable[..., Any]:
  """fn with every `lax.conv_general_dilated` computed as im2col + dot_general.

  Returns g with g(*args, **kwargs) == fn(*args, **kwargs) (to float rounding:
  the sums run in a different order), usable under jit / vmap / grad / scan.
  Under `jax.vmap` over per-client weights the convolutions become batched
  matmuls, which XLA:CPU runs many times faster than vmapped convolutions.
  Every argument leaf is traced (as in `jax.jit`); custom derivative rules of
  custom_jvp / custom_vjp functions that CONTAIN a convolution are dropped;
  see the module docstring for the full rule and what raises.

  kernels="all" rewrites every convolution; kernels="arguments" only those
  whose kernel depends on `fn`'s arguments and that are not inside a custom
  derivative / batching rule (`argument_kernel_convs`): the ones that become
  per-client convolutions under the round's vmap. When none qualifies, g
  calls `fn` itself (the same program, bit for bit).
  """
  if kernels not in ("all", "arguments"):
    raise ValueError(f"convs_as_matmuls: kernels must be 'all' or 'arguments', got"
                     f" {kernels!r}")

  @functools.wraps(fn)
  def rewritten(*args, **kwargs):
    leaves, in_tree = jax.tree_util.tree_flatten((args, kwargs))

    def flat_fn(*flat):
      a, kw = jax.tree_util.tree_unflatten(in_tree, flat)
      return fn(*a, **kw)

    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*leaves)
    only = None
    if kernels == "arguments":
      only = argument_kernel_convs(closed, [True] * len(leaves))
      if not only:
        return fn(*args, **kwargs)  # nothing to rewrite: fn itself
    elif not _has_conv(closed):
      return fn(*args, **kwargs)  # nothing to rewrite: fn itself
    outs = _eval(closed.jaxpr, closed.consts, *leaves, only=only)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

  return rewritten


NATIVE_CONVS_ATTR = "_fedjax_med_native_convs"


def keep_native_convs(fn: Callable[..., Any]) -> Callable[..., Any]:
  """Marks a loss so that the round leaves its convolutions native (no rewrite)."""
  setattr(fn, NATIVE_CONVS_ATTR, True)
  return fn


def round_loss(loss_fn: Callable[..., Any]) -> Callable[..., Any]:
  """The loss the federated round differentiates: `loss_fn` with the rule below.

  The rule (measured, issue 18): on the CPU backend, convolutions whose
  kernel depends on the loss's arguments (the per-client weights) are
  computed as matmuls (`convs_as_matmuls(loss_fn, kernels="arguments")`):
  XLA:CPU runs vmapped convolutions and their weight gradients inside the
  local-step scan as generic loops, 15-85x slower than the batched GEMMs of
  the rewrite (benchmarks/conv_rewrite_probe.py). On GPU / TPU the
  convolutions stay native (cuDNN / the TPU's convolution units are the fast
  path there; not measured on this project's machines). Losses without such
  convolutions, losses marked with `keep_native_convs`, and convolutions the
  author wrapped in a custom derivative or batching rule (`fm.models.UNet`)
  run exactly as written. Cached per loss, so equal configurations still
  share one compiled round.
  """
  if getattr(loss_fn, NATIVE_CONVS_ATTR, False):
    return loss_fn
  try:
    return _cached_round_loss(loss_fn)
  except TypeError:  # an unhashable callable: a fresh wrapper (its own compile)
    return _round_loss(loss_fn)


@functools.lru_cache(maxsize=None)
def _cached_round_loss(loss_fn):
  return _round_loss(loss_fn)


def _round_loss(loss_fn):
  rewritten = convs_as_matmuls(loss_fn, kernels="arguments")

  @functools.wraps(loss_fn)
  def loss(*args, **kwargs):
    if jax.default_backend() != "cpu":
      return loss_fn(*args, **kwargs)
    return rewritten(*args, **kwargs)

  return loss


__all__ = ["conv_general_dilated_as_matmul", "convs_as_matmuls", "argument_kernel_convs",
           "keep_native_convs", "round_loss", "NATIVE_CONVS_ATTR"]
