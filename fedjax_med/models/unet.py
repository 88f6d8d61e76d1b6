"""A small U-Net (Ronneberger, Fischer & Brox, MICCAI 2015) for 2D segmentation.

    x [B, H, W, C]  ->  logits [B, H, W, num_outputs]

Encoder: at each level l = 0..D-2, `convs_per_block` 3x3 convolutions with
`features[l]` channels (ReLU), then 2x2 max pooling; bottleneck: the same
with `features[-1]` channels; decoder: at each level, a 2x2 stride-2
transposed convolution back to `features[l]` channels, concatenation with
the encoder's skip connection, `convs_per_block` 3x3 convolutions; then a
1x1 convolution (a per-pixel dense layer) to the logits. Convolutions use
'SAME' zero padding. There is no normalisation layer, so a pixel's output
depends only on the input pixels within `receptive_radius()` of it, never
on the size of the input: that is what makes tiled inference
(`fedjax_med.algorithms.segmentation.predict_tiled`) equal to running the whole image.

H and W must be multiples of 2^(D-1) (`size_multiple()`); pad the input
(e.g. 960 x 999 -> 960 x 1000) or use `predict_tiled`, which pads.

Size: `features=(8, 16, 32)` (the default) has 29,465 parameters for RGB
input; `(16, 32, 64)` has 117,041. For comparison, the 68k-parameter Little
W-Net reaches F1 0.82 on CHASE_DB1 (bob.ip.binseg baselines).

Implementation note (speed, not maths). In a federated round the core runs
every client's local steps as a `lax.scan`, with the clients under
`jax.vmap`, each with its own parameters. On XLA:CPU two things then make
plain `lax.conv` ~10x slower than outside a loop (measured here; JAX issue
#12868): the backward convolutions (input gradient, kernel gradient) fall
off the fast path inside a while loop, and a vmapped kernel becomes one
grouped convolution. `conv2d_same` therefore has
  * a custom VJP: dx = conv(g, flip(W) with in/out swapped), a forward
    convolution, and dW[i, j] = sum_{b,h,w} x_pad[b, h+i, w+j] g[b, h, w]^T,
    k_h * k_w small matmuls (tested equal to autodiff of `lax.conv`);
  * a custom vmap rule: a batch of per-client kernels runs one ordinary
    convolution per client (a `lax.map`) instead of a grouped convolution;
    a batch of inputs with a shared kernel is folded into the batch axis.
Transposed convolution and pooling are a matmul + reshape and a reshape +
max, which have loop-friendly gradients. The function computed is the
standard U-Net's. Forward-mode differentiation (jvp) is not supported
(custom VJP).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_med.core import prng
from fedjax_med.models._batching import per_client_kernels

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _lax_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                      dimension_numbers=_DIMENSIONS)


# One ordinary convolution per client under the round's vmap (models/_batching.py).
_conv_unbatched = per_client_kernels(_lax_conv)


def _kernel_grad(x, g, kh, kw):
  """dW[i, j] = sum_{b,h,w} x_pad[b, h+i, w+j, :]^T g[b, h, w, :], [kh, kw, C_in, C_out]."""
  h, w = x.shape[1:3]
  x_pad = jnp.pad(x, ((0, 0), (kh // 2, (kh - 1) // 2), (kw // 2, (kw - 1) // 2), (0, 0)))
  return jnp.stack([
      jnp.stack([jnp.einsum("bhwi,bhwo->io", x_pad[:, i:i + h, j:j + w], g)
                 for j in range(kw)]) for i in range(kh)])


@jax.custom_vjp
def conv2d_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Stride-1 'SAME' convolution, x `[B, H, W, C_in]`, kernel `[kh, kw, C_in, C_out]`
  (odd kh, kw), equal to `lax.conv_general_dilated` with NHWC / HWIO."""
  return _conv_unbatched(x, kernel)


def _conv_fwd(x, kernel):
  return _conv_unbatched(x, kernel), (x, kernel)


def _conv_bwd(residuals, g):
  x, kernel = residuals
  kh, kw = kernel.shape[:2]
  dx = _conv_unbatched(g, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2))
  return dx, _kernel_grad(x, g, kh, kw).astype(kernel.dtype)


conv2d_same.defvjp(_conv_fwd, _conv_bwd)


class Conv2D(nn.Module):
  """3x3 (odd-sized) 'SAME' convolution + bias with `conv2d_same` (see module doc).

  Initialised like `flax.linen.Conv`: LeCun-normal kernel, zero bias.
  """
  features: int
  kernel_size: tuple[int, int] = (3, 3)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = self.kernel_size
    if kh % 2 == 0 or kw % 2 == 0:
      raise ValueError(f"Conv2D: kernel_size must be odd, got {self.kernel_size}")
    kernel = self.param("kernel", prng.lecun_normal(),
                        (kh, kw, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    return conv2d_same(x, kernel) + bias


class UpConv2x2(nn.Module):
  """2x2 stride-2 transposed convolution: each input pixel -> a 2x2 output block.

  out[b, 2h + i, 2w + j] = x[b, h, w] @ kernel[i, j] + bias.
  """
  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", prng.lecun_normal(),
                        (2, 2, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    y = jnp.einsum("bhwc,ijcd->bhiwjd", x, kernel)
    b, h, _, w, _, d = y.shape
    return y.reshape(b, 2 * h, 2 * w, d) + bias


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max pooling with stride 2, `[B, H, W, C] -> [B, H/2, W/2, C]`."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class UNet(nn.Module):
  """x `[B, H, W, C]` -> per-pixel logits `[B, H, W, num_outputs]`.

  Attributes:
    features: channels per level, from the full-resolution level down to the
      bottleneck; D = len(features) >= 1 levels, D - 1 poolings.
    num_outputs: logits per pixel (1 for a binary mask).
    convs_per_block: 3x3 convolutions per block (2 in the original U-Net).
    input_mean, input_std: optional per-channel constants; the input is
      standardised as (x - mean) / std before the first convolution (e.g.
      the training images' channel statistics). A fixed affine map, so it
      keeps outputs independent of the tile size.
    output_bias: initial bias of the logits, e.g. log(q / (1 - q)) for a
      foreground share q (the prior initialisation of Lin et al., ICCV
      2017), so training does not start by unlearning a 50% prediction.
  """
  features: Sequence[int] = (8, 16, 32)
  num_outputs: int = 1
  convs_per_block: int = 2
  input_mean: Sequence[float] | None = None
  input_std: Sequence[float] | None = None
  output_bias: float = 0.0

  def size_multiple(self) -> int:
    """H and W must be multiples of this: 2^(D-1)."""
    return 2 ** (len(self.features) - 1)

  def receptive_radius(self) -> int:
    """How far (in pixels) an output pixel sees; tight for 3x3 convolutions.

    Level l (scale 2^l) adds c * 2^l per block of c 3x3 convolutions, in
    the encoder and in the decoder; each 2x2 pooling at level l adds 2^l;
    the bottleneck adds c * 2^(D-1); the 2x2 stride-2 transposed
    convolutions map one input pixel to a 2x2 block and add nothing.
    """
    c, depth = self.convs_per_block, len(self.features)
    return sum(2 * c * 2**l + 2**l for l in range(depth - 1)) + c * 2 ** (depth - 1)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(f"UNet: input must be [B, H, W, C], got shape {x.shape}")
    if not self.features or any(int(f) < 1 for f in self.features):
      raise ValueError(f"UNet: features must be positive channel counts, got"
                       f" {tuple(self.features)}")
    m = self.size_multiple()
    if x.shape[1] % m or x.shape[2] % m:
      raise ValueError(
          f"UNet: H and W must be multiples of {m} for {len(self.features)} levels, got"
          f" {x.shape[1]} x {x.shape[2]}; pad the image (or use"
          " fedjax_med.algorithms.segmentation.predict_tiled, which pads)")

    def block(h, width, name):
      for i in range(self.convs_per_block):
        h = nn.relu(Conv2D(width, name=f"{name}_conv{i}")(h))
      return h

    skips = []
    h = x.astype(jnp.float32)
    if self.input_mean is not None:
      h = h - jnp.asarray(self.input_mean, jnp.float32)
    if self.input_std is not None:
      h = h / jnp.asarray(self.input_std, jnp.float32)
    for level, width in enumerate(self.features[:-1]):
      h = block(h, width, f"down{level}")
      skips.append(h)
      h = max_pool_2x2(h)
    h = block(h, self.features[-1], "bottleneck")
    for level in reversed(range(len(self.features) - 1)):
      h = UpConv2x2(self.features[level], name=f"up{level}_transpose")(h)
      h = jnp.concatenate([h, skips[level]], axis=-1)
      h = block(h, self.features[level], f"up{level}")
    return nn.Dense(self.num_outputs, name="logits",
                    bias_init=nn.initializers.constant(self.output_bias))(h)


def num_params(params) -> int:
  """Number of scalar parameters in a pytree."""
  return sum(int(a.size) for a in jax.tree_util.tree_leaves(params))


__all__ = ["UNet", "Conv2D", "UpConv2x2", "max_pool_2x2", "conv2d_same", "num_params"]
