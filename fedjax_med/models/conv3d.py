"""The 3x3x3 'SAME' convolution as 2D convolutions over (Y, Z) planes.

    x [B, X, Y, Z, C_in], kernel [3, 3, 3, C_in, C_out]  ->  y [B, X, Y, Z, C_out]

    y[b, x, y, z, o] = sum_{d, e, f in {0, 1, 2}} sum_i x_pad[b, x+d, y+e, z+f, i] k[d, e, f, i, o]

with x_pad the input padded by one zero voxel on each side of X, Y and Z (stride
1, 'SAME': the same map as `lax.conv_general_dilated(x, k, (1, 1, 1), "SAME")`
with NDHWC / DHWIO, and as `flax.linen.Conv(C_out, (3, 3, 3))` without its
bias). For a fixed X tap d the sum over (e, f, i) is a 2D 3x3 'SAME'
convolution of the (Y, Z) plane x - 1 + d, so the 3D convolution is one 2D
convolution over the B X planes with the three X taps stacked on the channels
of the smaller side:

  in-stack (C_in <= C_out):  xs[b X + x, y, z, d C_in + i] = x[b, x + d - 1, y, z, i]
      (zero outside 0..X-1), K[e, f, d C_in + i, o] = k[d, e, f, i, o],
      y = conv2d(xs, K): one 2D convolution with 3 C_in input channels;
  out-stack (C_in > C_out):  t = conv2d(x as [B X, Y, Z, C_in], K'), with
      K'[e, f, i, d C_out + o] = k[d, e, f, i, o], then
      y[b, x] = t_0[b, x - 1] + t_1[b, x] + t_2[b, x + 1]  (t_d: output channels
      d C_out .. d C_out + C_out - 1, zero outside 0..X-1): 3 C_out output channels;
  C_in = 1:  y = sum_{w in {0,1,2}^3} x_pad[b, p + w, 0] k[w, 0, :], 27 broadcast
      multiply-adds (no convolution at all).

Both stacks cost 27 C_in C_out multiply-adds per voxel, as the 3D convolution;
stacking the smaller side keeps the extra tensor (3 C_in or 3 C_out channels)
small.

Gradients (`jax.custom_vjp`), each an explicit FORWARD convolution:

  dx[b, p, i] = sum_{w, o} g_pad[b, p + w, o] k[2 - w, i, o]: `conv3d_same` of
      the cotangent g with the kernel flipped on its three spatial axes and its
      in / out channels swapped (so C_in and C_out trade places: the transpose
      of an in-stack is an out-stack; for C_in = C_out the forward in-stacks and
      dx out-stacks, as the transpose of the forward would);
  dk[d, e, f, i, o] = sum_{b, x, y, z} x_pad[b, x+d, y+e, z+f, i] g[b, x, y, z, o]:
      for every batch element b one 2D convolution whose lhs is the in-stacked
      x[b] laid out as [3 C_in (batch), Y, Z, X (features)], padded by 1 on Y and
      Z, and whose rhs is g[b] as [Y, Z, X (input features), C_out]: the result
      [3 C_in, 3, 3, C_out] is dk in the order (d, i), e, f, o; the B results
      are summed. This is a Python loop over the batch, so the backward program
      holds B such convolutions per layer (compile time grows linearly in B;
      B = 2 in the measurements below). One convolution with the batch folded
      into the contracted axis ([Y, Z, B X, C_out]) computes the same sum but
      measured 1.4-2x slower under the round (8 -> 8 channels at 48 x 64 x 48:
      463 ms vs 341 ms for 4 clients x 2 steps of B = 2).

Batching (`custom_batching.custom_vmap`, as `fedjax_med.models.unet.conv2d_same`):
a batch of inputs with a shared kernel is folded into the batch axis; a batch
of per-client kernels (the federated round's `jax.vmap` over clients) runs one
ordinary convolution per client with `lax.map`, never a grouped convolution.
The same for dx; dk (a reduction over the batch) always runs per client. The
function computed is the 3D convolution above; forward-mode differentiation
(jvp) is not supported (custom VJP).

Why (speed, not maths; measured on XLA:CPU, jaxlib 0.10.2, a 2-core Sapphire
Rapids VM). XLA:CPU has a fast path for 2D convolutions (YNNPACK) and none for
3D ones; inside a while loop (`lax.scan`, `lax.map`) XLA's own gradient
convolutions keep non-canonical layouts (kernel gradient `f01b_i01o->01bf`,
input gradient with an `01oi` kernel) and miss the fast path, and a vmapped
kernel becomes a grouped convolution; the explicit forward convolutions on
transposed operands above avoid all three. Forward + backward of one layer,
B = 2, [2, 48, 64, 48, C]: 8 -> 8 channels 376 ms native 3D, 311 ms im2col +
GEMM (`fedjax_med.convs_as_matmuls`, the round's rewrite), 92 ms here; the
same layer under a round (`jax.vmap` over 4 clients' kernels of a `lax.scan` of
2 SGD steps) 2.35 s rewritten, 0.81 s here. `fm.models.UNet3D(8, 16, 32)`:
gradient of one batch of 2 volumes 48 x 64 x 48 1.86 s native, 1.77 s
rewritten, 0.44 s here; a round of 4 clients x 2 steps of batch 2: 13.7 s
rewritten, 3.25 s here; a FedAvg round of 4 sites x 8 volumes (batch 2, 4
local steps) 6.4 s here, 27.7 s rewritten. Not measured on GPU / TPU, where
XLA's native 3D convolution (cuDNN, the TPU's convolution units) is the
expected fast path.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import custom_batching
from jax import lax

from fedjax_med.core import prng
from fedjax_med.models._batching import per_client_kernels

_DIMENSIONS_2D = ("NHWC", "HWIO", "NHWC")


def _conv2d(lhs: jax.Array, rhs: jax.Array, padding) -> jax.Array:
  return lax.conv_general_dilated(lhs, rhs, (1, 1), padding,
                                  dimension_numbers=_DIMENSIONS_2D)


def _in_stack(x: jax.Array) -> jax.Array:
  """[B, X, Y, Z, C] -> [B X, Y, Z, 3 C]; channel d C + i at plane b X + x holds
  x[b, x + d - 1, :, :, i] (zero for x + d - 1 outside 0..X-1)."""
  b, nx, ny, nz, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
  return jnp.concatenate([xp[:, d:d + nx] for d in range(3)], axis=-1).reshape(
      b * nx, ny, nz, 3 * c)


def _forward_in_stack(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """One 2D convolution with the three X taps stacked on the input channels."""
  b, nx, ny, nz, c = x.shape
  k2 = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(3, 3, 3 * c, kernel.shape[-1])
  return _conv2d(_in_stack(x), k2, "SAME").reshape(b, nx, ny, nz, -1)


def _forward_out_stack(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """One 2D convolution with the three X taps stacked on the output channels, then
  y[x] = t_0[x - 1] + t_1[x] + t_2[x + 1], the shifts as (negative) zero pads."""
  b, nx, ny, nz, c = x.shape
  o = kernel.shape[-1]
  k2 = jnp.transpose(kernel, (1, 2, 3, 0, 4)).reshape(3, 3, c, 3 * o)  # out channel d o + j
  t = _conv2d(x.reshape(b * nx, ny, nz, c), k2, "SAME").reshape(b, nx, ny, nz, 3 * o)
  zero = jnp.zeros((), t.dtype)
  shift = lambda lo, hi: [(0, 0, 0), (lo, hi, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0)]
  return (lax.pad(t[..., :o], zero, shift(1, -1)) + t[..., o:2 * o]
          + lax.pad(t[..., 2 * o:], zero, shift(-1, 1)))


def _forward_one_channel(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """C_in = 1: y = sum_w x_pad[.., p + w, 0] k[w, 0, :], 27 broadcast multiply-adds."""
  b, nx, ny, nz, _ = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
  y = None
  for d in range(3):
    for e in range(3):
      for f in range(3):
        term = xp[:, d:d + nx, e:e + ny, f:f + nz] * kernel[d, e, f, 0]
        y = term if y is None else y + term
  return y


def _forward(x: jax.Array, kernel: jax.Array, prefer_in_stack: bool) -> jax.Array:
  c_in, c_out = kernel.shape[3], kernel.shape[4]
  if c_in == 1:
    return _forward_one_channel(x, kernel)
  if c_in < c_out or (c_in == c_out and prefer_in_stack):
    return _forward_in_stack(x, kernel)
  return _forward_out_stack(x, kernel)


_per_client = per_client_kernels    # models/_batching.py
_forward_batched = _per_client(lambda x, k: _forward(x, k, prefer_in_stack=True))
_input_grad_batched = _per_client(lambda g, k: _forward(g, k, prefer_in_stack=False))


def _kernel_grad(x: jax.Array, g: jax.Array) -> jax.Array:
  """dk[d, e, f, i, o] = sum_{b,x,y,z} x_pad[b, x+d, y+e, z+f, i] g[b, x, y, z, o],
  one forward 2D convolution per batch element (see the module docstring)."""
  c, o = x.shape[-1], g.shape[-1]
  acc = None
  for b in range(x.shape[0]):
    lhs = jnp.transpose(_in_stack(x[b:b + 1]), (3, 1, 2, 0))  # [3C, Y, Z, X]
    rhs = jnp.transpose(g[b], (1, 2, 0, 3))  # [Y, Z, X, O]
    d = _conv2d(lhs, rhs, ((1, 1), (1, 1)))  # [3C, 3, 3, O]
    acc = d if acc is None else acc + d
  return acc.reshape(3, c, 3, 3, o).transpose(0, 2, 3, 1, 4)


@custom_batching.custom_vmap
def _kernel_grad_batched(x: jax.Array, g: jax.Array) -> jax.Array:
  return _kernel_grad(x, g)


@_kernel_grad_batched.def_vmap
def _kernel_grad_rule(axis_size, in_batched, x, g):
  # A sum over the batch: one client at a time, whichever operand is batched.
  x_batched, g_batched = in_batched
  if not x_batched and not g_batched:
    return _kernel_grad_batched(x, g), False
  x = x if x_batched else jnp.broadcast_to(x, (axis_size,) + x.shape)
  g = g if g_batched else jnp.broadcast_to(g, (axis_size,) + g.shape)
  return lax.map(lambda xg: _kernel_grad_batched(*xg), (x, g)), True


def _check(x, kernel) -> None:
  if x.ndim != 5 or kernel.ndim != 5 or kernel.shape[:3] != (3, 3, 3) \
      or kernel.shape[3] != x.shape[-1]:
    raise ValueError(
        f"conv3d_same: needs x [B, X, Y, Z, C_in] and kernel [3, 3, 3, C_in, C_out], got"
        f" {x.shape} and {kernel.shape}")


@jax.custom_vjp
def _conv3d(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return _forward_batched(x, kernel)


def _conv3d_fwd(x, kernel):
  return _forward_batched(x, kernel), (x, kernel)


def _conv3d_bwd(residuals, g):
  x, kernel = residuals
  flipped = jnp.flip(kernel, (0, 1, 2)).swapaxes(3, 4)
  dx = _input_grad_batched(g, flipped).astype(x.dtype)
  return dx, _kernel_grad_batched(x, g).astype(kernel.dtype)


_conv3d.defvjp(_conv3d_fwd, _conv3d_bwd)


def conv3d_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """3x3x3 stride-1 'SAME' convolution, x `[B, X, Y, Z, C_in]`, kernel
  `[3, 3, 3, C_in, C_out]` -> `[B, X, Y, Z, C_out]`:

    y[b, p, o] = sum_{w in {0,1,2}^3} sum_i x_pad[b, p + w, i] k[w, i, o],

  equal to `lax.conv_general_dilated(x, kernel, (1, 1, 1), "SAME")` with NDHWC /
  DHWIO, computed as 2D convolutions over the (Y, Z) planes with a custom VJP and
  vmap rule (module docstring). Raises ValueError for other shapes.
  """
  _check(x, kernel)
  return _conv3d(x, kernel)


class Conv3D(nn.Module):
  """3x3x3 'SAME' convolution + bias with `conv3d_same`, a drop-in for
  `flax.linen.Conv(features, (3, 3, 3), padding="SAME")`: the same parameters
  (`kernel` `[3, 3, 3, C_in, features]`, LeCun-normal; `bias` `[features]`,
  zero), the same initial values for the same key, the same dtype promotion.

  x `[B, X, Y, Z, C_in]` -> `conv3d_same(x, kernel) + bias`.
  """
  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", prng.lecun_normal(),
                        (3, 3, 3, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias)
    return conv3d_same(x, kernel) + bias


__all__ = ["conv3d_same", "Conv3D"]
