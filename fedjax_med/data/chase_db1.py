"""CHASE_DB1: retinal-vessel segmentation, 28 fundus photographs of 14 children.

Data: CHASE_DB1 (Child Heart and Health Study in England), Kingston
University, CC BY 4.0. Fraz et al. (2012), IEEE TBME 59(9):2538-2548;
Owen et al. (2009), IOVS 50(5):2004-2010. See `files/chase_db1/SOURCE.md`
for provenance, checksums and the attribution to give.

Contents: for each child NN = 01..14 and eye E in {L, R}, a 999 x 960
(width x height) RGB JPEG `images/Image_NNE.jpg` and two binary vessel
annotations `1st_label/Image_NNE_1stHO.png` (first observer, the usual
ground truth) and `2nd_label/Image_NNE_2ndHO.png` (second observer, the
usual human reference). Arrays here are `[H, W] = [960, 999]`.

Split (fixed, by child, so both eyes of a child are always together):
  * train: children 01-10 (20 images), grouped into `num_sites` sites
    (clients) of whole children by a seeded permutation (5 sites = 2
    children = 4 images each by default);
  * test: children 11-14 (8 images), one test site per child.
This is the 20-train / 8-test split common in U-Net-family papers. Idiap's
bob.ip.binseg "first-annotator" protocol uses the reverse (train 11-14,
test 01-10); its published numbers are therefore not directly comparable.

Preprocessing:
  * x = RGB / 255, float32 in [0, 1], full resolution (no downscaling);
  * labels: the PNGs are 1-bit; any non-zero value is a vessel, so labels
    are in {0, 1} whatever the decoder returns (bool, 0/1 or 0/255);
  * field of view (FOV), computed from the image (no FOV mask is bundled;
    see SOURCE.md), deterministic, NumPy only (`fov_mask`): threshold the
    red channel at 20, open it with a 5 x 5 square (drops bright specks
    outside the aperture), make every row and column contiguous between its
    first and last FOV pixel until stable (fills the dark holes and notches
    of the disc: the mask is convex along rows and columns), then erode by
    the 5 x 5 square (drops the dark-to-bright rim). On the bundled images
    the FOV covers 64.4-68.9% of the pixels, and 18-797 (at most 1.1%) of
    an image's 48,524-81,663 1st-observer vessel pixels fall outside it
    (`fov_stats()`); metrics are computed inside it.

FederatedData layout (`chase_db1()`):
    x  [K, N_max, 960, 999, 3] float32   RGB in [0, 1]; padded rows zero
    y  [K, N_max, 960, 999, 2] float32   y[..., 0] = vessel label in {0, 1}
                                         y[..., 1] = FOV mask in {0, 1}
    mask [K, N_max] bool                 one row = one whole image
label_type "binary" (both channels are in {0, 1}). Per-pixel labels are
just another label shape for the core; the FOV channel travels with the
data so that losses (`fedjax_med.losses.segmentation`) and metrics
(`fedjax_med.metrics.segmentation`) are restricted to it. Training on
random patches of these images is `fedjax_med.algorithms.segmentation.with_patches`.
Memory: the default train and test sets hold ~540 MB of float32 arrays.

Optional preprocessing (`chase_db1(preprocess=...)`; default None = RGB / 255 above):
  * "green": x = G / 255, one channel (vessels contrast most in green);
  * "clahe": CLAHE-style contrast normalisation inside the FOV (`clahe`) of
    each RGB channel, three channels in [0, 1], 0 outside the FOV;
  * "green_clahe": the same on the green channel alone, one channel.
Labels, FOV and splits are unchanged; models built from the training images'
statistics (`input_statistics` in experiments/retina_vessels.py) adapt to
the channel count.

Decoding: images and labels are decoded with Pillow once, checked against
SHA256SUMS, and cached as an .npz (uint8 images, bit-packed labels and
FOV; ~90 MB; ~1.5x faster to read than decoding) in `cache_dir()`
(`$FEDJAX_MED_CACHE`, else `$XDG_CACHE_HOME/fedjax_med`, else
`~/.cache/fedjax_med`). A missing, stale or damaged cache is rebuilt; an
unwritable one (read-only install, read-only home) is skipped silently and
the arrays are kept in memory for the process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import tempfile
import zipfile
from importlib import resources

import jax.numpy as jnp
import numpy as np

from fedjax_med.core.federated_data import FederatedData
from fedjax_med.core.options import OptionError
from fedjax_med.data._renamed import renamed_keyword

HEIGHT, WIDTH = 960, 999
CHILDREN = tuple(range(1, 15))
TRAIN_CHILDREN = tuple(range(1, 11))
TEST_CHILDREN = tuple(range(11, 15))
EYES = ("L", "R")
IMAGE_IDS = tuple(f"{c:02d}{e}" for c in CHILDREN for e in EYES)   # "01L", ..., "14R"
ANNOTATORS = (1, 2)
FOV_THRESHOLD = 20     # red channel > 20 (of 255)
FOV_EROSION = 2        # erosion by a (2 r + 1)^2 = 5 x 5 square
_CACHE_VERSION = 2
_MEMORY: dict[str, "Raw"] = {}


@dataclasses.dataclass(frozen=True)
class Raw:
  """All 28 images decoded, in IMAGE_IDS order.

  images [28, 960, 999, 3] uint8; labels [2, 28, 960, 999] uint8 in {0, 1}
  (annotator 1 then 2); fov [28, 960, 999] bool; ids: IMAGE_IDS.
  """
  images: np.ndarray
  labels: np.ndarray
  fov: np.ndarray
  ids: tuple[str, ...] = IMAGE_IDS

  def index(self, image_id: str) -> int:
    return self.ids.index(image_id)


def _files():
  return resources.files("fedjax_med.data").joinpath("files", "chase_db1")


def _damaged(message: str) -> ValueError:
  return ValueError(f"chase_db1: {message}; the bundled files are damaged")


def image_path(image_id: str) -> str:
  return f"images/Image_{image_id}.jpg"


def label_path(image_id: str, annotator: int) -> str:
  folder, tag = {1: ("1st_label", "1stHO"), 2: ("2nd_label", "2ndHO")}[annotator]
  return f"{folder}/Image_{image_id}_{tag}.png"


def _checksums() -> tuple[dict[str, str], str]:
  """({relative path: sha256}, sha256 of SHA256SUMS itself)."""
  text = _files().joinpath("SHA256SUMS").read_text()
  sums = {}
  for line in text.splitlines():
    if line.strip():
      digest, _, path = line.strip().partition("  ")
      sums[path.strip()] = digest
  return sums, hashlib.sha256(text.encode()).hexdigest()


def _square(m: np.ndarray, r: int, erode: bool) -> np.ndarray:
  """Erosion (AND) or dilation (OR) by a (2r+1) x (2r+1) square, separably;
  pixels outside the image count as background."""
  if r <= 0:
    return m
  h, w = m.shape
  combine = np.logical_and if erode else np.logical_or
  padded = np.pad(m, r, constant_values=False)
  rows = padded[:, 0:w].copy()
  for d in range(1, 2 * r + 1):
    combine(rows, padded[:, d:d + w], out=rows)
  out = rows[0:h].copy()
  for d in range(1, 2 * r + 1):
    combine(out, rows[d:d + h], out=out)
  return out


def _fill_rows(m: np.ndarray) -> np.ndarray:
  """Every row set between its first and last set pixel."""
  has = m.any(axis=1)
  first = np.where(has, m.argmax(axis=1), m.shape[1])
  last = np.where(has, m.shape[1] - 1 - m[:, ::-1].argmax(axis=1), -1)
  pos = np.arange(m.shape[1])
  return (pos[None, :] >= first[:, None]) & (pos[None, :] <= last[:, None])


def fov_mask(image: np.ndarray, threshold: int = FOV_THRESHOLD,
             erosion: int = FOV_EROSION) -> np.ndarray:
  """Field of view of one fundus image (see the module docstring).

      m   = red > threshold
      m   = dilate(erode(m))          opening: drops bright specks
      m   = fill(m)                   rows and columns made contiguous, repeated
                                      until stable: no holes, no notches
      fov = erode(m)                  drops the dark-to-bright rim

  Erosion and dilation use a (2r+1) x (2r+1) square, r = `erosion`
  (pixels outside the image count as background). The result is convex
  along every row and every column (one run per row and per column).

  Args:
    image: `[H, W, 3]` uint8 RGB.
    threshold: red-channel threshold (outside the circular aperture the
      image is black, red <= ~5; the retina has red >= ~40).
    erosion: r (0: threshold and fill only).

  Returns:
    `[H, W]` bool.
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"fov_mask: image must be [H, W, 3] RGB, got shape {image.shape}")
  m = image[..., 0] > threshold
  m = _square(_square(m, erosion, erode=True), erosion, erode=False)
  for _ in range(m.shape[0] + m.shape[1]):       # a few passes in practice
    filled = _fill_rows(_fill_rows(m).T).T
    if np.array_equal(filled, m):
      break
    m = filled
  return _square(m, erosion, erode=True)


CLAHE_GRID = (8, 8)     # tiles (rows, columns)
CLAHE_CLIP = 2.0        # clip limit, in multiples of a tile's mean count per bin
PREPROCESS = (None, "green", "clahe", "green_clahe")


def _edges(length: int, tiles: int) -> np.ndarray:
  """Tile boundaries along an axis: e_i = floor(i * length / tiles), i = 0..tiles."""
  return (np.arange(tiles + 1) * length) // tiles


def clahe(channel: np.ndarray, fov: np.ndarray | None = None,
          grid: tuple[int, int] = CLAHE_GRID, clip_limit: float = CLAHE_CLIP) -> np.ndarray:
  """Contrast-limited adaptive histogram equalisation inside the FOV (Zuiderveld,
  Graphics Gems IV, 1994), NumPy only: float32 `[H, W]` in [0, 1], 0 outside the FOV.

  channel `[H, W]` uint8 (values v in 0..255); fov `[H, W]` bool (None: all
  pixels). The image is cut into gy x gx tiles (rows [e_i, e_{i+1}) with
  e_i = floor(i H / gy), columns likewise). For tile t, with h_t(v) the
  number of its FOV pixels of value v and n_t = sum_v h_t(v):

      L_t     = max(1, clip_limit * n_t / 256)                 clip level
      E_t     = sum_v max(h_t(v) - L_t, 0)                     excess
      h'_t(v) = min(h_t(v), L_t) + E_t / 256                   redistributed evenly
      T_t(v)  = sum_{u <= v} h'_t(u) / n_t                     (T_t(v) = v / 255 if n_t = 0)

  Each pixel's output is the bilinear interpolation of the mappings of the
  (up to) four tiles whose centres surround it: with tile centres
  c_i = (e_i + e_{i+1} - 1) / 2, the fractional tile row of pixel row r is
  a = interp(r, c, [0..gy-1]) (clamped at the first and last centre),
  i0 = floor(a), i1 = min(i0 + 1, gy - 1), w = a - i0 (columns likewise:
  j0, j1, u), and

      out(r, s) = (1-w)(1-u) T_{i0 j0}(v) + (1-w) u T_{i0 j1}(v)
                  + w (1-u) T_{i1 j0}(v) + w u T_{i1 j1}(v),   v = channel(r, s).

  Only FOV pixels enter the histograms, so the black surround does not
  take half of the output range; clip_limit = inf is plain adaptive
  equalisation, grid (1, 1) global equalisation of the FOV.
  """
  channel = np.asarray(channel)
  if channel.ndim != 2 or channel.dtype != np.uint8:
    raise ValueError(f"clahe: channel must be [H, W] uint8, got {channel.shape}"
                     f" {channel.dtype}")
  h, w = channel.shape
  fov = np.ones((h, w), bool) if fov is None else np.asarray(fov, bool)
  gy, gx = grid
  ey, ex = _edges(h, gy), _edges(w, gx)
  maps = np.empty((gy, gx, 256), np.float64)
  for i in range(gy):
    for j in range(gx):
      tile = channel[ey[i]:ey[i + 1], ex[j]:ex[j + 1]]
      inside = fov[ey[i]:ey[i + 1], ex[j]:ex[j + 1]]
      hist = np.bincount(tile[inside], minlength=256).astype(np.float64)
      n = hist.sum()
      if n == 0:
        maps[i, j] = np.arange(256) / 255.0
        continue
      limit = max(1.0, clip_limit * n / 256.0)
      excess = np.maximum(hist - limit, 0.0).sum()
      hist = np.minimum(hist, limit) + excess / 256.0
      maps[i, j] = np.cumsum(hist) / n

  def position(length, edges, tiles):
    centres = (edges[:-1] + edges[1:] - 1) / 2.0
    a = np.interp(np.arange(length), centres, np.arange(tiles, dtype=np.float64))
    i0 = np.floor(a).astype(np.int64)
    return i0, np.minimum(i0 + 1, tiles - 1), a - i0

  i0, i1, wr = position(h, ey, gy)
  j0, j1, wc = position(w, ex, gx)
  v = channel.astype(np.int64)
  wr, wc = wr[:, None], wc[None, :]
  out = ((1 - wr) * (1 - wc) * maps[i0[:, None], j0[None, :], v]
         + (1 - wr) * wc * maps[i0[:, None], j1[None, :], v]
         + wr * (1 - wc) * maps[i1[:, None], j0[None, :], v]
         + wr * wc * maps[i1[:, None], j1[None, :], v])
  return np.where(fov, out, 0.0).astype(np.float32)


def preprocess_image(image: np.ndarray, fov: np.ndarray, preprocess: str | None
                     ) -> np.ndarray:
  """One image as x `[H, W, C]` float32 for a `preprocess` option (module docstring)."""
  if preprocess is None:
    return np.divide(image, np.float32(255.0), dtype=np.float32)
  if preprocess == "green":
    return np.divide(image[..., 1:2], np.float32(255.0), dtype=np.float32)
  if preprocess == "clahe":
    return np.stack([clahe(image[..., c], fov) for c in range(3)], axis=-1)
  if preprocess == "green_clahe":
    return clahe(image[..., 1], fov)[..., None]
  raise OptionError(f"chase_db1: preprocess must be one of {PREPROCESS}, got {preprocess!r}")


def cache_dir() -> str:
  """Where decoded arrays are cached (see the module docstring)."""
  root = os.environ.get("FEDJAX_MED_CACHE")
  if not root:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                            ".cache")
    root = os.path.join(base, "fedjax_med")
  return root


def _decode(sums: dict[str, str]) -> Raw:
  from PIL import Image  # a dependency of fedjax_med; imported where it is used

  files = _files()

  def read(path):
    if path not in sums:
      raise _damaged(f"SHA256SUMS has no entry for {path}")
    data = files.joinpath(path).read_bytes()
    if hashlib.sha256(data).hexdigest() != sums[path]:
      raise _damaged(f"{path} does not match its sha256 in SHA256SUMS")
    return Image.open(io.BytesIO(data))

  images = np.zeros((len(IMAGE_IDS), HEIGHT, WIDTH, 3), np.uint8)
  labels = np.zeros((2, len(IMAGE_IDS), HEIGHT, WIDTH), np.uint8)
  for i, image_id in enumerate(IMAGE_IDS):
    image = np.asarray(read(image_path(image_id)).convert("RGB"))
    if image.shape != (HEIGHT, WIDTH, 3):
      raise _damaged(f"{image_path(image_id)} has shape {image.shape}, expected"
                     f" {(HEIGHT, WIDTH, 3)}")
    images[i] = image
    for a in ANNOTATORS:
      label = np.asarray(read(label_path(image_id, a)))
      if label.shape != (HEIGHT, WIDTH):
        raise _damaged(f"{label_path(image_id, a)} has shape {label.shape}, expected"
                       f" {(HEIGHT, WIDTH)}")
      labels[a - 1, i] = label != 0      # bool, 0/1 or 0/255 -> {0, 1}
  fov = np.stack([fov_mask(im) for im in images])
  return Raw(images, labels, fov)


def _cache_path(digest: str) -> str:
  tag = f"v{_CACHE_VERSION}_t{FOV_THRESHOLD}_e{FOV_EROSION}_{digest[:16]}"
  return os.path.join(cache_dir(), f"chase_db1_{tag}.npz")


def _read_cache(path: str) -> Raw | None:
  """The cached arrays, or None when the cache is missing or unreadable."""
  n = len(IMAGE_IDS)
  try:
    with np.load(path) as f:
      images = f["images"]
      labels = np.unpackbits(f["labels"], count=2 * n * HEIGHT * WIDTH)
      fov = np.unpackbits(f["fov"], count=n * HEIGHT * WIDTH)
  except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
    return None
  if images.shape != (n, HEIGHT, WIDTH, 3) or images.dtype != np.uint8:
    return None
  return Raw(images, labels.reshape(2, n, HEIGHT, WIDTH),
             fov.reshape(n, HEIGHT, WIDTH).astype(bool))


def _write_cache(path: str, raw: Raw) -> None:
  """Writes the arrays (uncompressed .npz, labels and FOV bit-packed: ~90 MB).

  Atomic (temporary file + rename); any OSError (read-only location, full
  disk) leaves no file and is ignored.
  """
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".chase_db1_", suffix=".npz",
                               dir=os.path.dirname(path))
    try:
      with os.fdopen(fd, "wb") as f:
        np.savez(f, images=raw.images, labels=np.packbits(raw.labels.ravel()),
                 fov=np.packbits(raw.fov.ravel()))
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
  except OSError:
    pass  # read-only install or home: keep the arrays in memory only


def load_raw(cache: bool = True) -> Raw:
  """All 28 images, both observers' labels and the FOV masks (`Raw`).

  Decoded once per process; with `cache=True` also once per machine (see
  the module docstring). `cache=False` re-decodes from the bundled files
  and neither reads nor writes the cache.
  """
  sums, digest = _checksums()
  if cache and digest in _MEMORY:
    return _MEMORY[digest]
  raw = None
  path = _cache_path(digest)
  if cache:
    raw = _read_cache(path)
  if raw is None:
    raw = _decode(sums)
    if cache:
      _write_cache(path, raw)
  for array in (raw.images, raw.labels, raw.fov):
    array.setflags(write=False)
  if cache:
    _MEMORY[digest] = raw
  return raw


def _check_int(name: str, value, low: int, high: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise OptionError(f"chase_db1: {name} must be an integer, got {value!r}")
  if not low <= value <= high:
    raise OptionError(f"chase_db1: {name} must be in {low}..{high}, got {value!r}")
  return int(value)


@renamed_keyword("num_clients", "num_sites")
def client_children(num_sites: int = 5, seed: int = 0) -> tuple[tuple[int, ...], ...]:
  """The training children of each site (client): K tuples of child numbers (sorted).

  Children 01-10 are shuffled by `np.random.default_rng(seed).permutation`
  and cut into `num_sites` = K consecutive groups whose sizes differ by at
  most one (`np.array_split`): 5 sites get 2 children each, 3 sites get
  4, 3 and 3. `num_clients=` is the deprecated earlier name of `num_sites=`.
  """
  num_sites = _check_int("num_sites", num_sites, 1, len(TRAIN_CHILDREN))
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise OptionError(f"chase_db1: seed must be an integer, got {seed!r}")
  order = np.random.default_rng(int(seed)).permutation(np.asarray(TRAIN_CHILDREN))
  return tuple(tuple(sorted(int(c) for c in group))
               for group in np.array_split(order, num_sites))


@renamed_keyword("num_clients", "num_sites")
def site_image_ids(num_sites: int = 5, seed: int = 0
                   ) -> tuple[tuple[tuple[str, ...], ...], tuple[tuple[str, ...], ...]]:
  """Image ids of every row: (train `[K][n_k]`, test `[4][2]`), as `chase_db1` orders them.

  `num_clients=` is the deprecated earlier name of `num_sites=`.
  """
  def ids(children):
    return tuple(f"{c:02d}{e}" for c in children for e in EYES)
  return (tuple(ids(group) for group in client_children(num_sites, seed)),
          tuple(ids((c,)) for c in TEST_CHILDREN))


def _site_name(children) -> str:
  return "children_" + "_".join(f"{c:02d}" for c in children)


@renamed_keyword("num_clients", "num_sites")
def chase_db1(num_sites: int = 5, annotator: int = 1, seed: int = 0, *,
              cache: bool = True, preprocess: str | None = None
              ) -> tuple[FederatedData, FederatedData]:
  """CHASE_DB1 as (train, test) FederatedData; sites are groups of whole children.

  Args:
    num_sites: K, the number of training sites (clients), 1..10; children
      01-10 are split between them by `client_children(num_sites, seed)`.
      `num_clients=` is its deprecated earlier name (same result, a
      DeprecationWarning; removed in 0.3); giving both is an
      OptionError.
    annotator: whose vessel labels go in y[..., 0]: 1 (first observer, the
      usual ground truth) or 2 (second observer).
    seed: seed of the children -> sites assignment.
    cache: use the decoded-array cache (see the module docstring).
    preprocess: None (default: RGB / 255), "green", "clahe" or
      "green_clahe" (module docstring; `clahe` has the formula); x then
      has 1 channel for the green options.

  Returns:
    train: K sites named "children_NN_MM..." (n_k = 2 x children), rows
      ordered by child then eye (L, R).
    test: 4 sites "child_11" .. "child_14", 2 rows each (L, R).
    Both with x `[K, N_max, 960, 999, 3]` float32 RGB in [0, 1] and
    y `[K, N_max, 960, 999, 2]` float32 = (vessel label, FOV mask), both in
    {0, 1}; label_type "binary". `site_image_ids` gives every row's image id.

  Raises:
    OptionError (a ValueError) for num_sites outside 1..10, an annotator
    other than 1 or 2, or a non-integer seed.
  """
  num_sites = _check_int("num_sites", num_sites, 1, len(TRAIN_CHILDREN))
  if isinstance(annotator, bool) or annotator not in ANNOTATORS:
    raise OptionError(
        f"chase_db1: annotator must be 1 (first observer) or 2 (second observer),"
        f" got {annotator!r}")
  if preprocess not in PREPROCESS:
    raise OptionError(f"chase_db1: preprocess must be one of {PREPROCESS}, got"
                      f" {preprocess!r}")
  groups = client_children(num_sites, seed)
  raw = load_raw(cache=cache)
  train = _federated(raw, groups, annotator, [_site_name(g) for g in groups], preprocess)
  test = _federated(raw, [(c,) for c in TEST_CHILDREN], annotator,
                    [f"child_{c:02d}" for c in TEST_CHILDREN], preprocess)
  return train, test


def _federated(raw: Raw, groups, annotator: int, names,
               preprocess: str | None = None) -> FederatedData:
  """Stacks whole children into sites, padded (see `chase_db1`).

  Built directly rather than through `FederatedData.from_sites`, which would
  copy the ~40 MB of float32 pixels per image several times: x is uint8 / 255
  (finite) and y is built from {0, 1} arrays, so the checks `from_sites`
  makes hold by construction.
  """
  rows = [[raw.index(f"{c:02d}{e}") for c in children for e in EYES]
          for children in groups]
  n_max = max(len(r) for r in rows)
  channels = 1 if preprocess in ("green", "green_clahe") else 3
  x = np.zeros((len(rows), n_max, HEIGHT, WIDTH, channels), np.float32)
  y = np.zeros((len(rows), n_max, HEIGHT, WIDTH, 2), np.float32)
  mask = np.zeros((len(rows), n_max), bool)
  for k, site_rows in enumerate(rows):
    for i, row in enumerate(site_rows):
      if preprocess is None:
        np.divide(raw.images[row], np.float32(255.0), out=x[k, i], dtype=np.float32)
      else:
        x[k, i] = preprocess_image(raw.images[row], raw.fov[row], preprocess)
      y[k, i] = np.stack([raw.labels[annotator - 1, row], raw.fov[row]], axis=-1)
      mask[k, i] = True
  return FederatedData(jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask), names,
                       "binary", validate=False)


def fov_stats() -> dict[str, np.ndarray]:
  """Per image (IMAGE_IDS order): FOV fraction and 1st-observer vessel pixels outside it."""
  raw = load_raw()
  return {"fov_fraction": raw.fov.mean(axis=(1, 2)),
          "vessels": raw.labels[0].sum(axis=(1, 2)),
          "vessels_outside_fov": (raw.labels[0].astype(bool) & ~raw.fov).sum(axis=(1, 2))}


__all__ = ["chase_db1", "load_raw", "Raw", "fov_mask", "clahe", "preprocess_image",
           "CLAHE_GRID", "CLAHE_CLIP", "PREPROCESS", "client_children", "site_image_ids",
           "cache_dir", "fov_stats", "HEIGHT", "WIDTH", "IMAGE_IDS", "TRAIN_CHILDREN",
           "TEST_CHILDREN", "ANNOTATORS", "FOV_THRESHOLD", "FOV_EROSION"]
