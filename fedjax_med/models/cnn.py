"""A small convolutional network for 2-D images (e.g. BreastMNIST, 28 x 28 x 1)."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_med.core import prng


class PatchConv(nn.Module):
  """A k x k convolution, stride 1, SAME padding, computed as patches @ kernel.

  y[b, i, j, o] = sum_{di, dj, c} x[b, i + di - p, j + dj - p, c] kernel[di, dj, c, o] + bias[o]

  (zero padding p = (k - 1) / 2 on each side, as `flax.linen.Conv(padding="SAME")`).
  `jax.lax.conv_general_dilated_patches` extracts the k*k*C values around
  every pixel (ordered channel-major: c, di, dj) and one matmul applies the
  kernel. Same parameters ("kernel" [k, k, C, O], "bias" [O]) and outputs as
  `nn.Conv`, but under `jax.vmap` over per-site weights, as every federated
  round does, this is a batched matmul, whereas a vmapped `lax.conv`
  becomes a grouped convolution that XLA:CPU runs several times slower
  (measured about 4x per FedAvg round of the BreastMNIST CNN on CPU).
  """
  features: int
  kernel_size: int = 3

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    if k % 2 != 1:
      raise ValueError(f"PatchConv: kernel_size must be odd for SAME padding, got {k}")
    channels = x.shape[-1]
    kernel = self.param("kernel", prng.lecun_normal(),
                        (k, k, channels, self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    patches = jax.lax.conv_general_dilated_patches(
        x, (k, k), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    # Patch features are ordered (c, di, dj); order the kernel the same way.
    matrix = jnp.transpose(kernel, (2, 0, 1, 3)).reshape(channels * k * k, self.features)
    return patches @ matrix.astype(patches.dtype) + bias


class CNN(nn.Module):
  """x [B, H, W, C] (or [B, H, W]) -> logits [B, num_outputs].

  For each width f in `features`: a 3 x 3 convolution (SAME padding) with f
  channels, ReLU, then 2 x 2 max pooling with stride 2; then flatten, a
  ReLU dense layer of `hidden` units (none if 0) and a linear output layer.
  No batch normalisation, so the model has no state beyond its parameters
  (running statistics do not average well across hospitals).

  With the defaults on 28 x 28 x 1 images: 28 -> 14 -> 7, i.e.
  conv(1->8) 80 + conv(8->16) 1,168 + dense(784->32) 25,120 + dense(32->1)
  33 = 26,401 parameters; num_outputs=1 gives one logit per row for a
  binary task (`fedjax_med.losses.sigmoid_binary_cross_entropy`).
  `patch_conv=False` uses `nn.Conv` instead of `PatchConv` (same
  parameters and outputs; slower when vmapped on CPU).
  """
  features: Sequence[int] = (8, 16)
  hidden: int = 32
  num_outputs: int = 1
  patch_conv: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim == 3:
      x = x[..., None]
    if x.ndim != 4:
      raise ValueError(f"CNN: expected images [B, H, W, C] or [B, H, W], got shape {x.shape}")
    for i, width in enumerate(self.features):
      if self.patch_conv:
        x = PatchConv(width, 3, name=f"conv_{i}")(x)
      else:
        x = nn.Conv(width, (3, 3), padding="SAME", name=f"conv_{i}")(x)
      x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    if self.hidden:
      x = nn.relu(nn.Dense(self.hidden, name="hidden")(x))
    return nn.Dense(self.num_outputs, name="output")(x)


__all__ = ["CNN", "PatchConv"]
