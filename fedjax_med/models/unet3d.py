"""A small 3D U-Net (Cicek, Abdulkadir, Lienkamp, Brox & Ronneberger, MICCAI 2016)
for volumetric segmentation.

    x [B, X, Y, Z, C]  ->  logits [B, X, Y, Z, num_classes]

The 2D U-Net of `fedjax_med.models.unet` with every operation one dimension
up. Encoder: at each level l = 0..D-2, `convs_per_block` 3x3x3 convolutions
with `features[l]` channels ('SAME' zero padding, ReLU), then 2x2x2 max
pooling with stride 2; bottleneck: the same with `features[-1]` channels;
decoder: at each level, a 2x2x2 stride-2 transposed convolution back to
`features[l]` channels,

    up[b, 2x + i, 2y + j, 2z + k, :] = h[b, x, y, z, :] @ W[i, j, k] + bias,

concatenation [up, skip] with the encoder's output at that level, and
`convs_per_block` 3x3x3 convolutions; then a 1x1x1 convolution (a
per-voxel dense layer) to the logits. The transposed convolution is the
einsum above and a reshape, and the pooling a reshape + max: neither is a
convolution, in the model or in its gradient.

The 3x3x3 convolutions (`conv`; the function computed is the same, only the
speed differs): `conv="planes"` computes them with
`fedjax_med.models.conv3d.Conv3D`, 2D convolutions over the (Y, Z) planes with
the X taps stacked on the channels, a custom VJP and a custom vmap rule;
`conv="native"` with `flax.linen.Conv` (XLA's 3D convolution; in a federated
round on CPU the kit computes it as im2col + GEMM, `fedjax_med.convs_as_matmuls`,
the rule of `fedjax_med.core.conv.round_loss`); `conv="auto"` (the default) is
"planes" when `jax.default_backend() == "cpu"` and "native" otherwise. Both
have the same parameters (names, shapes, initial values), so parameters of one
run the other. Measured on XLA:CPU (jaxlib 0.10.2, 2 cores), `features=(8, 16,
32)`, volumes 48 x 64 x 48: the gradient of a batch of 2 takes 0.44 s with
planes, 1.77 s with the round's rewrite of nn.Conv and 1.86 s with native
nn.Conv; a FedAvg round of 4 sites x 8 volumes (batch 2, 4 local steps;
`benchmarks/segmentation_round.py`, W5b) 6.4 s with planes, 27.7 s rewritten
(peak RSS 1.8 vs 7.8 GiB), with `client_chunk_size=1` 6.2 s vs 30.4 s (1.4 vs
2.8 GiB). On GPU / TPU the planes path was not measured, hence "native"
there (cuDNN / the TPU's convolution units).

X, Y and Z must be multiples of 2^(D-1) (`size_multiple()`; 4 for three
levels, e.g. MSD Hippocampus crops padded to 48 x 64 x 48).

Normalisation: none by default (as the 2D U-Net), or `norm="group"`: a
GroupNorm (Wu & He, ECCV 2018) after every 3x3x3 convolution, before the
ReLU. No batch norm: its running statistics would be per-client state. Note
that GroupNorm's statistics run over the whole input volume, padding
included, so with it a voxel's output depends on the size of the input.
Measured on XLA:CPU (jaxlib 0.10.2): with `norm="group"`, the jitted
`jax.vmap` over per-client parameters of the model's gradient with XLA's
NATIVE convolutions is wrong (errors of order 1 in the first level's kernel
gradients; one client at a time, the op-by-op vmap, finite differences and
the matmul rewrite agree). The round's default for `conv="native"` on CPU
(the rewrite) is right; do not combine `norm="group"`, `conv="native"` and
`fedjax_med.keep_native_convs` on CPU. `conv="planes"` (the CPU default)
never vmaps a native convolution.

Size (C = 1 input channel, 3 classes, two convolutions per block): a
3x3x3 convolution has 27 C_in C_out + C_out parameters, the transposed
convolution 8 C_in C_out + C_out, the head F_0 num_classes + num_classes;
`features=(8, 16, 32)` (the default) has 85,035 parameters, `(16, 32, 64)`
has 339,283. `norm="group"` adds 2 F per convolution (scale and bias).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_med.core import prng
from fedjax_med.models.conv3d import Conv3D

NORMS = ("none", "group")
CONVS = ("auto", "planes", "native")


class UpConv3D(nn.Module):
  """2x2x2 stride-2 transposed convolution: each voxel -> a 2x2x2 output block.

  x `[B, X, Y, Z, C]` -> `[B, 2X, 2Y, 2Z, features]`,
  out[b, 2x + i, 2y + j, 2z + k] = x[b, x, y, z] @ kernel[i, j, k] + bias
  (kernel `[2, 2, 2, C, features]`, LeCun-normal; bias zero), the same map as
  `flax.linen.ConvTranspose(features, (2, 2, 2), strides=(2, 2, 2))` with its
  kernel flipped on the three spatial axes, written as one einsum and a
  reshape.
  """
  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", prng.lecun_normal(),
                        (2, 2, 2, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    y = jnp.einsum("bxyzc,ijkcd->bxiyjzkd", x, kernel)
    b, nx, _, ny, _, nz, _, d = y.shape
    return y.reshape(b, 2 * nx, 2 * ny, 2 * nz, d) + bias


def max_pool_2x2x2(x: jax.Array) -> jax.Array:
  """2x2x2 max pooling with stride 2, `[B, X, Y, Z, C] -> [B, X/2, Y/2, Z/2, C]`."""
  b, nx, ny, nz, c = x.shape
  return x.reshape(b, nx // 2, 2, ny // 2, 2, nz // 2, 2, c).max(axis=(2, 4, 6))


class UNet3D(nn.Module):
  """x `[B, X, Y, Z, C]` -> per-voxel logits `[B, X, Y, Z, num_classes]`.

  Attributes:
    features: channels per level, from the full-resolution level down to the
      bottleneck; D = len(features) >= 1 levels, D - 1 poolings.
    num_classes: logits per voxel (softmax classes, background included;
      e.g. 3 for MSD Hippocampus: background, anterior, posterior).
    convs_per_block: 3x3x3 convolutions per block (2 in Cicek et al.).
    norm: "none" (default) or "group" (GroupNorm after every 3x3x3
      convolution; see the module docstring).
    norm_groups: GroupNorm's number of groups, min(norm_groups, channels);
      the channels of every level must be divisible by it.
    conv: how the 3x3x3 convolutions are computed (same function, same
      parameters): "planes" (`fedjax_med.models.conv3d.Conv3D`), "native"
      (`flax.linen.Conv`) or "auto" (the default: "planes" on the CPU backend,
      "native" on GPU / TPU, where planes was not measured); see the module
      docstring.
  """
  features: Sequence[int] = (8, 16, 32)
  num_classes: int = 3
  convs_per_block: int = 2
  norm: str = "none"
  norm_groups: int = 4
  conv: str = "auto"

  def size_multiple(self) -> int:
    """X, Y and Z must be multiples of this: 2^(D-1)."""
    return 2 ** (len(self.features) - 1)

  def _check(self, x: jax.Array) -> None:
    if x.ndim != 5:
      raise ValueError(f"UNet3D: input must be [B, X, Y, Z, C], got shape {x.shape}")
    if not self.features or any(int(f) < 1 for f in self.features):
      raise ValueError(f"UNet3D: features must be positive channel counts, got"
                       f" {tuple(self.features)}")
    if int(self.num_classes) < 1 or int(self.convs_per_block) < 1:
      raise ValueError(f"UNet3D: num_classes and convs_per_block must be >= 1, got"
                       f" {self.num_classes} and {self.convs_per_block}")
    if self.conv not in CONVS:
      raise ValueError(f"UNet3D: conv must be one of {CONVS}, got {self.conv!r}")
    if self.norm not in NORMS:
      raise ValueError(f"UNet3D: norm must be one of {NORMS}, got {self.norm!r}")
    if self.norm == "group":
      for f in self.features:
        if f % min(self.norm_groups, f):
          raise ValueError(f"UNet3D: norm='group' needs every level's channels divisible"
                           f" by min(norm_groups, channels); {f} is not divisible by"
                           f" {min(self.norm_groups, f)}")
    m = self.size_multiple()
    if any(s % m for s in x.shape[1:4]):
      raise ValueError(
          f"UNet3D: X, Y and Z must be multiples of {m} for {len(self.features)} levels,"
          f" got {x.shape[1]} x {x.shape[2]} x {x.shape[3]}; pad the volume")

  def conv_path(self) -> str:
    """The path taken, "planes" or "native": `conv` with "auto" resolved by
    `jax.default_backend()` when the model is traced."""
    if self.conv == "auto":
      return "planes" if jax.default_backend() == "cpu" else "native"
    return self.conv

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    self._check(x)
    planes = self.conv_path() == "planes"

    def block(h, width, name):
      for i in range(self.convs_per_block):
        if planes:
          h = Conv3D(width, name=f"{name}_conv{i}")(h)
        else:
          h = nn.Conv(width, (3, 3, 3), padding="SAME", name=f"{name}_conv{i}")(h)
        if self.norm == "group":
          h = nn.GroupNorm(num_groups=min(self.norm_groups, width), use_fast_variance=False,
                           name=f"{name}_norm{i}")(h)
        h = nn.relu(h)
      return h

    skips = []
    h = x.astype(jnp.float32)
    for level, width in enumerate(self.features[:-1]):
      h = block(h, width, f"down{level}")
      skips.append(h)
      h = max_pool_2x2x2(h)
    h = block(h, self.features[-1], "bottleneck")
    for level in reversed(range(len(self.features) - 1)):
      h = UpConv3D(self.features[level], name=f"up{level}_transpose")(h)
      h = jnp.concatenate([h, skips[level]], axis=-1)
      h = block(h, self.features[level], f"up{level}")
    return nn.Dense(self.num_classes, name="logits")(h)


__all__ = ["UNet3D", "UpConv3D", "max_pool_2x2x2", "NORMS", "CONVS"]
