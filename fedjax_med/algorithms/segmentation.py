"""Segmentation through the federated round: random patches in, tiled inference out.

Training on patches. Segmentation data are FederatedData whose rows are
whole images, `x [K, N_max, H, W, C]`, with per-pixel labels
`y [K, N_max, H, W, L]` (e.g. `fedjax_med.data.chase_db1`: L = 2 =
(vessel, FOV)). `with_patches(algo, ...)` turns any FederatedAlgorithm into
one whose round first draws, for every real image of every site,
`patches_per_image` random `patch_size x patch_size` crops of x and y (a pure
function of the round key), then runs `algo`'s own round on those patches
as rows. Both steps are one `jax.jit`-compiled function:

    round(state, images, key) = algo.pure_round(state, patch_data(images, k_p), key)
    k_p = fold_in(key, PATCH_STREAM)

Why per-round patches rather than a gradient estimator that crops inside
each local step: it works unchanged for every algorithm (FedAvg family,
local-only, pooled, personalised methods), including those whose local
training does not take a `GradientEstimator` (`local_only`); a local step
gathers B small patches instead of B whole 11 MB images; and padding stays
exact (an image's patches inherit its row mask, so a padded image yields
only padded rows, and n_k = patches_per_image x images_k keeps FedAvg's
n_k / n weights proportional to the sites' numbers of images). The patches
of one round are fixed for that round, and the local epochs / steps of
`algo` iterate over them in batches.

Sampling: a patch centre is drawn uniformly among the pixels of the image's
validity channel (`y[..., valid_channel]`, the FOV; all pixels when the
channel is empty or absent), by inverse-CDF sampling on the cumulative sum
of the mask; the top-left corner is `clip(centre - patch_size // 2,
0, (H, W) - patch_size)`, so every patch lies inside the image. Keys follow
site ids like the rest of fedjax_med: image i of site k uses
`fold_in(fold_in(k_p, site_ids[k]), i)`.

Augmentation (`with_patches(..., augment=AugmentSpec(...))`, off by default):
after sampling, every patch row r of site k is transformed with key
`fold_in(fold_in(k_a, site_ids[k]), r)`, `k_a = fold_in(key, AUGMENT_STREAM)`
(its own stream: the patches, and every other draw of the round, are those of
the unaugmented round). Geometric maps (flips, rot90) move x and y alike, so
labels and FOV follow their pixels and keep their values; photometric maps
(gamma, contrast, brightness) change x only, inside the patch's FOV
(`augment_patch` has the equations). Without `augment` the round is the
unaugmented one, bit for bit.

Inference by tiling (`predict_tiled`): the image is zero-padded at the
bottom / right to multiples of the model's size multiple, cut into
overlapping `tile x tile` windows whose origins are multiples of that size
multiple, run in batches of tiles, and stitched: each output pixel is taken
from a window in which it lies at least `margin` pixels from every window
edge that is not an image edge. When `margin` >= the model's receptive
radius (`UNet.receptive_radius()`), the stitched logits equal those of the
whole padded image in one pass (tested), with memory bounded by the tile
batch instead of the image.

Test-time averaging (`dihedral_average`): the mean of a prediction over 2, 4
or 8 flips / rotations of the images, each mapped back to the original pixel
grid; for models trained with flip and rot90 augmentation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_med.core.algorithm import FederatedAlgorithm, make_round, with_data_check
from fedjax_med.core.federated_data import FederatedData
from fedjax_med.core.options import OptionError, check_positive_int
from fedjax_med.core.streams import AUGMENT_STREAM, CROP_STREAM, PATCH_STREAM  # noqa: F401 (re-exported)

# The patch stream's key is fold_in(round_key, PATCH_STREAM): a value that no
# site id takes in practice and distinct from the server stream (2**32 - 1).


# -- patch sampling -----------------------------------------------------------

def sample_corners(key: jax.Array, valid: jax.Array, num_patches: int,
                   patch_size: int) -> jax.Array:
  """Top-left corners `[P, 2]` (row, col) of P patches of one image.

  Args:
    key: the image's key.
    valid: `[H, W]` mask of admissible patch centres (e.g. the FOV); when it
      is empty every pixel is admissible.
    num_patches: P.
    patch_size: p <= min(H, W).

  Returns:
    int32 `[P, 2]`; `0 <= corner <= (H, W) - p`, so patches lie inside the
    image. Centres are uniform over the admissible pixels (inverse CDF).
  """
  h, w = valid.shape
  weights = (valid > 0).reshape(-1)
  weights = jnp.where(jnp.any(weights), weights, True).astype(jnp.int32)
  cdf = jnp.cumsum(weights)
  draws = jax.random.randint(key, (num_patches,), 0, cdf[-1])
  flat = jnp.searchsorted(cdf, draws, side="right").astype(jnp.int32)
  centres = jnp.stack([flat // w, flat % w], axis=-1)
  upper = jnp.asarray([h - patch_size, w - patch_size], jnp.int32)
  return jnp.clip(centres - patch_size // 2, 0, upper)


def crop(image: jax.Array, corners: jax.Array, patch_size: int) -> jax.Array:
  """Patches `[P, p, p, ...]` of `image [H, W, ...]` at `corners [P, 2]`."""
  def one(corner):
    start = (corner[0], corner[1]) + (0,) * (image.ndim - 2)
    return jax.lax.dynamic_slice(image, start, (patch_size, patch_size) + image.shape[2:])
  return jax.vmap(one)(corners)


def sample_patches(key: jax.Array, x: jax.Array, y: jax.Array, num_patches: int,
                   patch_size: int, valid_channel: int | None = -1
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """P random patches of one image: `(x [P, p, p, C], y [P, p, p, L], corners [P, 2])`.

  Args:
    key: the image's key (same key, same patches).
    x: `[H, W, C]` image; y: `[H, W, L]` or `[H, W]` per-pixel labels.
    num_patches, patch_size: P and p.
    valid_channel: channel of y whose non-zero pixels are admissible
      centres (default the last, the FOV of chase_db1); None, or labels
      with a single channel: every pixel.
  """
  if y.ndim == 3 and y.shape[-1] >= 2 and valid_channel is not None:
    valid = y[..., valid_channel]
  else:
    valid = jnp.ones(x.shape[:2], jnp.int32)
  corners = sample_corners(key, valid, num_patches, patch_size)
  return crop(x, corners, patch_size), crop(y, corners, patch_size), corners


def patch_data(data: FederatedData, key: jax.Array, patches_per_image: int,
               patch_size: int, valid_channel: int | None = -1) -> FederatedData:
  """Every real image's patches as rows: x `[K, N_max * P, p, p, C]`, y likewise.

  Rows i*P .. i*P + P - 1 of site k are the patches of image i; their row
  mask is the image's. Image i of site k uses key
  `fold_in(fold_in(key, site_ids[k]), i)`. Traceable (used inside the
  jit-compiled round of `with_patches`); no validation is repeated.
  """
  x, y = data.x, data.y
  k_sites, n_max = data.mask.shape
  if x.ndim < 4 or min(x.shape[2:4]) < patch_size:
    raise ValueError(
        f"patch_data: images x {x.shape} must be [K, N_max, H, W, ...] with H, W >="
        f" patch_size = {patch_size}")

  def site(x_k, y_k, site_id):
    site_key = jax.random.fold_in(key, site_id)

    def image(x_i, y_i, i):
      px, py, _ = sample_patches(jax.random.fold_in(site_key, i), x_i, y_i,
                                 patches_per_image, patch_size, valid_channel)
      return px, py

    return jax.vmap(image)(x_k, y_k, jnp.arange(n_max, dtype=jnp.uint32))

  px, py = jax.vmap(site)(x, y, data.site_ids)
  rows = n_max * patches_per_image
  px = px.reshape((k_sites, rows) + px.shape[3:])
  py = py.reshape((k_sites, rows) + py.shape[3:])
  mask = jnp.repeat(data.mask, patches_per_image, axis=1)
  return FederatedData(px, py, mask, data.site_names, data.label_type,
                       site_ids=data.site_ids, validate=False)


# -- augmentation of patches ----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AugmentSpec:
  """Random augmentation of training patches (`with_patches(augment=...)`).

  Geometric, applied to x and y alike (labels and FOV move with their pixels):
    flip_h: mirror left-right (axis W) with probability 1/2;
    flip_v: mirror up-down (axis H) with probability 1/2;
    rot90: rotate by k quarter turns (`np.rot90(a, k)`), k uniform on {0, 1, 2, 3}.
  Photometric, x only, inside the patch's valid pixels (y[..., valid_channel]
  non-zero; every pixel when None or when y has one channel), for intensities
  in [0, 1]; 0 switches a map off (it is then not computed at all):
    gamma: exponent g = exp(u), u ~ U[-log(1 + gamma), log(1 + gamma)];
    contrast: factor c ~ U[1 - contrast, 1 + contrast];
    brightness: offset b ~ U[-brightness, brightness].
  One draw of each per patch, shared by its channels (see `augment_patch`).
  """
  flip_h: bool = True
  flip_v: bool = True
  rot90: bool = True
  brightness: float = 0.0
  contrast: float = 0.0
  gamma: float = 0.0
  valid_channel: int | None = -1

  def __post_init__(self):
    for field in ("brightness", "contrast", "gamma"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
          0.0 <= value < (1.0 if field == "contrast" else float("inf"))):
        raise OptionError(f"AugmentSpec: {field} must be a number >= 0"
                          f"{' and < 1' if field == 'contrast' else ''}, got {value!r}")

  @property
  def photometric(self) -> bool:
    return bool(self.brightness or self.contrast or self.gamma)


def augment_patch(key: jax.Array, x: jax.Array, y: jax.Array, spec: AugmentSpec
                  ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """One augmented patch: `(x' [p, p, C], y' [p, p, L], draws)`.

  With keys (k_h, k_v, k_r, k_g, k_c, k_b) = `jax.random.split(key, 6)`:

      f_h ~ Bernoulli(1/2) (k_h),  f_v ~ Bernoulli(1/2) (k_v),  k ~ U{0..3} (k_r)
      T(a) = rot90^k(flipud^f_v(fliplr^f_h(a)))                 for a = x and a = y
      z    = clip(T(x), 0, 1) ** g                               (gamma)
      z    = m + c (z - m),   m = per-channel mean of z over the valid pixels
                                  of T(y) (all pixels when none is valid)
      z    = clip(z + b, 0, 1)
      x'   = where(valid, z, T(x)),   y' = T(y)

  A switched-off map is skipped (f = False, k = 0, g = c = 1, b = 0, and no
  clip when all three photometric maps are off: x' = T(x) exactly). Pure,
  traceable; `draws` = {"flip_h", "flip_v", "k", "gamma", "contrast",
  "brightness"} (the values used).

  Args:
    key: the patch's key.
    x: `[p, p, C]` intensities; y: `[p, p, L]` (or `[p, p]`) per-pixel labels.
    spec: `AugmentSpec`.
  """
  k_h, k_v, k_r, k_g, k_c, k_b = jax.random.split(key, 6)
  false, zero, one = jnp.asarray(False), jnp.asarray(0.0, jnp.float32), jnp.asarray(
      1.0, jnp.float32)
  f_h = jax.random.bernoulli(k_h) if spec.flip_h else false
  f_v = jax.random.bernoulli(k_v) if spec.flip_v else false
  k = jax.random.randint(k_r, (), 0, 4) if spec.rot90 else jnp.asarray(0, jnp.int32)

  def geometric(a):
    if spec.flip_h:
      a = jnp.where(f_h, jnp.flip(a, 1), a)
    if spec.flip_v:
      a = jnp.where(f_v, jnp.flip(a, 0), a)
    if spec.rot90:
      if a.shape[0] != a.shape[1]:
        raise ValueError(f"augment_patch: rot90 needs square patches, got {a.shape}")
      a = jax.lax.switch(k, [functools.partial(jnp.rot90, k=j, axes=(0, 1))
                             for j in range(4)], a)
    return a

  x, y = geometric(x), geometric(y)
  log_g = float(np.log1p(spec.gamma))
  g = jnp.exp(jax.random.uniform(k_g, (), jnp.float32, -log_g, log_g)) if spec.gamma else one
  c = (jax.random.uniform(k_c, (), jnp.float32, 1.0 - spec.contrast, 1.0 + spec.contrast)
       if spec.contrast else one)
  b = (jax.random.uniform(k_b, (), jnp.float32, -spec.brightness, spec.brightness)
       if spec.brightness else zero)
  if spec.photometric:
    if y.ndim == 3 and y.shape[-1] >= 2 and spec.valid_channel is not None:
      valid = y[..., spec.valid_channel] != 0
    else:
      valid = jnp.ones(x.shape[:2], bool)
    valid = jnp.where(jnp.any(valid), valid, True)
    z = jnp.clip(x, 0.0, 1.0)
    if spec.gamma:
      z = z ** g
    if spec.contrast:
      w = valid[..., None].astype(z.dtype)
      m = jnp.sum(z * w, axis=(0, 1)) / jnp.sum(w, axis=(0, 1))
      z = m + c * (z - m)
    if spec.brightness:
      z = z + b
    x = jnp.where(valid[..., None], jnp.clip(z, 0.0, 1.0), x)
  draws = {"flip_h": f_h, "flip_v": f_v, "k": k, "gamma": g, "contrast": c, "brightness": b}
  return x, y, draws


def augment_data(data: FederatedData, key: jax.Array, spec: AugmentSpec) -> FederatedData:
  """Every row augmented (`augment_patch`): row r of site k uses key
  `fold_in(fold_in(key, site_ids[k]), r)`; shapes, mask and n_k unchanged.
  Traceable; x `[K, N, p, p, C]`, y `[K, N, p, p, L]`."""
  rows = data.mask.shape[1]

  def site(x_k, y_k, site_id):
    site_key = jax.random.fold_in(key, site_id)

    def row(x_r, y_r, r):
      x_a, y_a, _ = augment_patch(jax.random.fold_in(site_key, r), x_r, y_r, spec)
      return x_a, y_a

    return jax.vmap(row)(x_k, y_k, jnp.arange(rows, dtype=jnp.uint32))

  x, y = jax.vmap(site)(data.x, data.y, data.site_ids)
  return FederatedData(x, y, data.mask, data.site_names, data.label_type,
                       site_ids=data.site_ids, validate=False)


@dataclasses.dataclass(frozen=True)
class PatchSpec:
  """Static patch options of `with_patches`: P patches of p x p per real image per
  round, centres admissible where `y[..., valid_channel]` is non-zero (None: all);
  `augment` (None: off) transforms them (`augment_data`)."""
  patches_per_image: int
  patch_size: int
  valid_channel: int | None = -1
  augment: AugmentSpec | None = None


def _patched_round(config: tuple[Callable, PatchSpec], state, data, key):
  """The round on this round's patches: config = (the algorithm's pure_round, spec)."""
  pure_round, spec = config
  patches = patch_data(data, jax.random.fold_in(key, PATCH_STREAM),
                       spec.patches_per_image, spec.patch_size, spec.valid_channel)
  if spec.augment is not None:
    patches = augment_data(patches, jax.random.fold_in(key, AUGMENT_STREAM), spec.augment)
  return pure_round(state, patches, key)


def with_patches(algo: FederatedAlgorithm, *, patches_per_image: int, patch_size: int,
                 valid_channel: int | None = -1,
                 augment: AugmentSpec | None = None) -> FederatedAlgorithm:
  """`algo` trained on random patches of whole-image FederatedData (see module doc).

  Args:
    algo: any FederatedAlgorithm with a `pure_round` (FedAvg family,
      local_only, ...), built with a per-pixel loss such as
      `fedjax_med.losses.segmentation.bce_dice`.
    patches_per_image: P patches drawn per real image per round.
    patch_size: p; patches are p x p (a multiple of the model's size multiple).
    valid_channel: channel of y holding the admissible centres (the FOV);
      None samples centres over the whole image.
    augment: an `AugmentSpec` (random flips, rot90, intensity jitter per
      patch, from AUGMENT_STREAM), or None (default): no augmentation, the
      round computes exactly what it computed before the option existed.

  Returns:
    FederatedAlgorithm with the same `init` and `personalize`; its
    `round(state, images, key)` is one jit-compiled call (patch sampling and
    `algo`'s round), so `fm.run_rounds` works on the image data; its
    `pure_round` composes the two and stays traceable (jit, vmap, scan).
    Round metrics are `algo`'s, with num_examples counted in patches.
    Compiled once per `with_patches` object (and data shape).
  """
  if algo.pure_round is None:
    raise OptionError(f"with_patches: {algo.name} has no pure_round")
  spec = PatchSpec(check_positive_int("with_patches", "patches_per_image",
                                      patches_per_image),
                   check_positive_int("with_patches", "patch_size", patch_size),
                   valid_channel, augment)
  if augment is not None and not isinstance(augment, AugmentSpec):
    raise OptionError(f"with_patches: augment must be an AugmentSpec or None, got"
                      f" {augment!r}")
  config = (algo.pure_round, spec)
  name = f"{algo.name}+patches"

  def check(data):
    if not isinstance(data, FederatedData):
      return      # make_round's check raises the TypeError
    if data.x.ndim < 4 or min(data.x.shape[2:4]) < spec.patch_size:
      raise ValueError(
          f"{name}.round: data.x has shape {data.x.shape}; expected images"
          f" [K, N_max, H, W, C] with H, W >= patch_size = {spec.patch_size}")
    if data.y.shape[2:4] != data.x.shape[2:4]:
      raise ValueError(
          f"{name}.round: data.y has shape {data.y.shape}; expected per-pixel labels"
          f" [K, N_max, {data.x.shape[2]}, {data.x.shape[3]}, ...]")

  patched = FederatedAlgorithm(init=algo.init,
                               round=make_round(name, _patched_round, config, None),
                               name=name, pure_round=functools.partial(_patched_round, config),
                               personalize=algo.personalize)
  return with_data_check(patched, check)


# -- random crops of volumes (any number of spatial axes) ----------------------

def crop_starts(key: jax.Array, valid: jax.Array, crop_shape: tuple[int, ...]) -> jax.Array:
  """A random crop origin inside the bounding box of `valid`; int32 `[D]`.

  valid `[S_1, ..., S_D]` (non-zero = a real voxel). With [lo_d, hi_d) the
  bounding box of the valid voxels on axis d (the whole axis when none is
  valid), the origin is uniform on the integers

      start_d in [lo_d, max(lo_d, hi_d - c_d)],   then clipped to [0, S_d - c_d],

  independently per axis (one `jax.random.randint` per axis, keys
  `fold_in(key, d)`): the crop lies inside the volume and covers as much of
  the valid box as its size allows; when the box is smaller than the crop the
  crop starts at lo_d and includes padding (which the loss masks).
  """
  starts = []
  for d, c in enumerate(crop_shape):
    others = tuple(a for a in range(valid.ndim) if a != d)
    present = jnp.any(valid != 0, axis=others)                     # [S_d]
    size = valid.shape[d]
    index = jnp.arange(size)
    any_valid = jnp.any(present)
    lo = jnp.where(any_valid, jnp.min(jnp.where(present, index, size)), 0)
    hi = jnp.where(any_valid, jnp.max(jnp.where(present, index, -1)) + 1, size)
    high = jnp.maximum(lo, hi - c)
    start = jax.random.randint(jax.random.fold_in(key, d), (), lo, high + 1)
    starts.append(jnp.clip(start, 0, size - c))
  return jnp.stack(starts).astype(jnp.int32)


def random_crop_data(data: FederatedData, key: jax.Array, crop_shape: tuple[int, ...],
                     valid_channel: int | None = -1) -> FederatedData:
  """One random crop of `crop_shape` per real volume: x `[K, N_max, *crop_shape, C]`.

  data.x `[K, N_max, S_1..S_D, C]`, data.y `[K, N_max, S_1..S_D, L]`; volume i of
  site k is cropped at `crop_starts(fold_in(fold_in(key, site_ids[k]), i),
  y[k, i, ..., valid_channel], crop_shape)` (x and y alike); None as
  `valid_channel` treats every voxel as valid. Rows keep their mask, so
  n_k and FedAvg's weights are unchanged. Traceable; no validation repeated.
  """
  d = len(crop_shape)
  n_max = data.mask.shape[1]

  def volume(x_i, y_i, volume_key):
    valid = (jnp.ones(x_i.shape[:d], bool) if valid_channel is None
             else y_i[..., valid_channel])
    start = crop_starts(volume_key, valid, crop_shape)
    origin = tuple(start) + (0,)
    return (jax.lax.dynamic_slice(x_i, origin, tuple(crop_shape) + x_i.shape[d:]),
            jax.lax.dynamic_slice(y_i, origin, tuple(crop_shape) + y_i.shape[d:]))

  def site(x_k, y_k, site_id):
    site_key = jax.random.fold_in(key, site_id)
    keys = jax.vmap(lambda i: jax.random.fold_in(site_key, i))(
        jnp.arange(n_max, dtype=jnp.uint32))
    return jax.vmap(volume)(x_k, y_k, keys)

  x, y = jax.vmap(site)(data.x, data.y, data.site_ids)
  return FederatedData(x, y, data.mask, data.site_names, data.label_type,
                       site_ids=data.site_ids, validate=False)


@dataclasses.dataclass(frozen=True)
class CropSpec:
  """Static options of `with_random_crops`."""
  crop_shape: tuple[int, ...]
  valid_channel: int | None = -1


def _cropped_round(config: tuple[Callable, CropSpec], state, data, key):
  pure_round, spec = config
  crops = random_crop_data(data, jax.random.fold_in(key, CROP_STREAM), spec.crop_shape,
                           spec.valid_channel)
  return pure_round(state, crops, key)


def with_random_crops(algo: FederatedAlgorithm, *, crop_shape, valid_channel: int | None = -1
                      ) -> FederatedAlgorithm:
  """`algo` trained on one random crop per volume per round (3D volumes, or any D).

  Volumetric data are expensive per voxel (`fedjax_med.models.UNet3D` on a
  48 x 64 x 48 volume is ~10 GFLOP per forward + backward); a crop of the
  valid region (`crop_starts`) cuts the cost of a local step and augments
  the data by translation, while the model (fully convolutional, no
  normalisation over the volume) still predicts whole volumes at test time.

      round(state, volumes, key) = algo.pure_round(state, random_crop_data(volumes, k_c), key)
      k_c = fold_in(key, CROP_STREAM)

  Args:
    algo: any FederatedAlgorithm with a `pure_round`, built with a per-voxel
      loss that masks invalid voxels (`fedjax_med.losses.segmentation.softmax_dice`).
    crop_shape: (c_1, ..., c_D), each a multiple of the model's size multiple
      and at most the volume's size.
    valid_channel: channel of y holding the valid-voxel mask (None: all voxels).

  Returns:
    FederatedAlgorithm with the same `init` and `personalize`, one
    jit-compiled round (cropping and `algo`'s round).
  """
  if algo.pure_round is None:
    raise OptionError(f"with_random_crops: {algo.name} has no pure_round")
  if isinstance(crop_shape, (int, np.integer)) or not crop_shape:
    raise OptionError(f"with_random_crops: crop_shape must be a tuple of positive ints,"
                      f" got {crop_shape!r}")
  spec = CropSpec(tuple(check_positive_int("with_random_crops", "crop_shape", c)
                        for c in crop_shape), valid_channel)
  config = (algo.pure_round, spec)
  name = f"{algo.name}+crops"
  d = len(spec.crop_shape)

  def check(data):
    if not isinstance(data, FederatedData):
      return
    spatial = data.x.shape[2:2 + d]
    if data.x.ndim < 3 + d or any(c > s for c, s in zip(spec.crop_shape, spatial)):
      raise ValueError(f"{name}.round: data.x has shape {data.x.shape}; expected volumes"
                       f" [K, N_max, S_1..S_{d}, C] with every S_d >= crop_shape"
                       f" {spec.crop_shape}")
    if data.y.shape[2:2 + d] != spatial:
      raise ValueError(f"{name}.round: data.y has shape {data.y.shape}; expected per-voxel"
                       f" labels [K, N_max, {', '.join(map(str, spatial))}, ...]")

  cropped = FederatedAlgorithm(init=algo.init,
                               round=make_round(name, _cropped_round, config, None),
                               name=name, pure_round=functools.partial(_cropped_round, config),
                               personalize=algo.personalize)
  return with_data_check(cropped, check)


# -- tiled inference ----------------------------------------------------------

def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def tile_windows(length: int, tile: int, margin: int) -> list[tuple[int, int, int]]:
  """Windows along one axis of a padded length: [(start, own_lo, own_hi)].

  Window j covers [start_j, start_j + tile); it owns (writes) the output
  positions [own_lo_j, own_hi_j), which partition [0, length) and lie at
  least `margin` from the window's edges except at the ends of the axis.
  """
  if tile >= length:
    return [(0, 0, length)]
  step = tile - 2 * margin
  starts = list(range(0, length - tile, step)) + [length - tile]
  owned_from = [0] + [s + margin for s in starts[1:]]
  owned_to = owned_from[1:] + [length]
  return list(zip(starts, owned_from, owned_to))


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5, 6))
def _predict_tiled(apply_fn, params, images, tile, margin, multiple, tile_batch):
  n, h, w = images.shape[:3]
  hp, wp = _round_up(h, multiple), _round_up(w, multiple)
  th, tw = min(tile, hp), min(tile, wp)
  padded = jnp.pad(images, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
  rows, cols = tile_windows(hp, th, margin), tile_windows(wp, tw, margin)
  tiles = jnp.stack([padded[:, r0:r0 + th, c0:c0 + tw]
                     for r0, _, _ in rows for c0, _, _ in cols], axis=1)
  num_tiles = tiles.shape[1]
  flat = tiles.reshape((n * num_tiles,) + tiles.shape[2:])

  def run(batch):
    logits = apply_fn(params, batch)
    if logits.ndim == 4 and logits.shape[-1] == 1:
      logits = logits[..., 0]
    return logits.astype(jnp.float32)

  total = flat.shape[0]
  chunk = min(tile_batch, total)
  num_chunks = -(-total // chunk)
  flat = jnp.pad(flat, ((0, num_chunks * chunk - total), (0, 0), (0, 0), (0, 0)))
  logits = jax.lax.map(run, flat.reshape((num_chunks, chunk) + flat.shape[1:]))
  logits = logits.reshape((num_chunks * chunk, th, tw))[:total]
  logits = logits.reshape((n, num_tiles, th, tw))
  out = jnp.zeros((n, hp, wp), jnp.float32)
  t = 0
  for r0, r_lo, r_hi in rows:
    for c0, c_lo, c_hi in cols:
      out = out.at[:, r_lo:r_hi, c_lo:c_hi].set(
          logits[:, t, r_lo - r0:r_hi - r0, c_lo - c0:c_hi - c0])
      t += 1
  return out[:, :h, :w]


def predict_tiled(apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any,
                  images, *, tile: int = 256, margin: int = 32, multiple: int = 4,
                  tile_batch: int = 8) -> jax.Array:
  """Per-pixel logits of whole images by overlapping tiles (see module doc).

  Args:
    apply_fn: `apply(params, x [B, T, T, C]) -> logits [B, T, T] or [B, T, T, 1]`.
    params: the model's parameters.
    images: `[N, H, W, C]` (or one `[H, W, C]` image).
    tile: window size T (a multiple of `multiple`; shrunk to the padded
      image size when larger).
    margin: pixels discarded next to inner window edges (a multiple of
      `multiple`, >= the model's receptive radius for an exact result,
      and < tile / 2).
    multiple: the model's size multiple (`UNet.size_multiple()`); images are
      zero-padded to multiples of it and windows start at multiples of it.
    tile_batch: tiles per forward pass (memory vs. speed).

  Returns:
    logits `[N, H, W]` (or `[H, W]`), float32; deterministic, jit-compiled
    once per (apply_fn, image shape, tile settings).
  """
  for field, value in (("tile", tile), ("multiple", multiple), ("tile_batch", tile_batch)):
    check_positive_int("predict_tiled", field, value)
  if isinstance(margin, bool) or not isinstance(margin, (int, np.integer)) or margin < 0:
    raise OptionError(f"predict_tiled: margin must be an integer >= 0, got {margin!r}")
  if tile % multiple or margin % multiple:
    raise OptionError(f"predict_tiled: tile ({tile}) and margin ({margin}) must be"
                      f" multiples of {multiple}")
  if 2 * margin >= tile:
    raise OptionError(f"predict_tiled: margin ({margin}) must be < tile / 2 ({tile / 2})")
  images = jnp.asarray(images)
  single = images.ndim == 3
  if single:
    images = images[None]
  if images.ndim != 4:
    raise ValueError(f"predict_tiled: images must be [N, H, W, C], got {images.shape}")
  out = _predict_tiled(apply_fn, params, images, int(tile), int(margin), int(multiple),
                       int(tile_batch))
  return out[0] if single else out


# -- test-time dihedral averaging ------------------------------------------------

DIHEDRAL_COUNTS = (1, 2, 4, 8)


def _dihedral(a, index: int, inverse: bool = False):
  """The `index`-th of the 8 symmetries of the square on axes (1, 2) of `a`
  ([N, H, W, ...]): bit 0 flips W, bit 1 flips H, bit 2 swaps H and W (applied
  last; the inverse undoes the swap first)."""
  def flips(b):
    if index & 1:
      b = jnp.flip(b, axis=2)
    if index & 2:
      b = jnp.flip(b, axis=1)
    return b

  def swap(b):
    return jnp.swapaxes(b, 1, 2) if index & 4 else b

  return flips(swap(a)) if inverse else swap(flips(a))


def dihedral_average(predict_fn: Callable[[jax.Array], jax.Array], images, *,
                     transforms: int = 8) -> jax.Array:
  """Test-time augmentation: the mean of `predict_fn` over symmetries of the images.

      out = (1 / T) sum_{g in G_T} g^{-1}( predict_fn( g(images) ) )

  with G_1 = {identity}, G_2 = {identity, flip W}, G_4 = the flips of H and W,
  G_8 = the dihedral group of the square (flips and the H <-> W swap: every
  rotation by 90 degrees and reflection). Models trained with flip / rot90
  augmentation (`AugmentSpec`) see every g(images) in training.

  Args:
    predict_fn: `[N, H', W', C] -> [N, H', W', ...]` (pixel outputs aligned with
      the input pixels, e.g. probabilities from `predict_tiled`); called with
      swapped H and W for the transforms with bit 2 set.
    images: `[N, H, W, C]`.
    transforms: T in (1, 2, 4, 8).

  Returns:
    `[N, H, W, ...]` float32, the mean of the T aligned predictions. Average
    probabilities, not logits, for the usual soft-voting ensemble.
  """
  if isinstance(transforms, bool) or transforms not in DIHEDRAL_COUNTS:
    raise OptionError(f"dihedral_average: transforms must be one of {DIHEDRAL_COUNTS},"
                      f" got {transforms!r}")
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"dihedral_average: images must be [N, H, W, C], got {images.shape}")
  total = None
  for index in range(transforms):
    transformed = _dihedral(images, index)
    out = jnp.asarray(predict_fn(transformed), jnp.float32)
    if out.shape[:3] != transformed.shape[:3]:
      raise ValueError(f"dihedral_average: predict_fn must keep [N, H, W], returned"
                       f" {out.shape} for input {transformed.shape}")
    out = _dihedral(out, index, inverse=True)
    total = out if total is None else total + out
  return total / transforms


__all__ = ["PATCH_STREAM", "CROP_STREAM", "AUGMENT_STREAM", "AugmentSpec", "augment_patch",
           "augment_data", "crop_starts", "random_crop_data", "with_random_crops",
           "sample_corners", "crop", "sample_patches", "patch_data",
           "PatchSpec", "with_patches", "tile_windows", "predict_tiled",
           "DIHEDRAL_COUNTS", "dihedral_average"]
