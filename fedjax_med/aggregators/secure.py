"""Secure aggregation, simulated faithfully (Bonawitz et al., CCS 2017, "Practical
Secure Aggregation for Privacy-Preserving Machine Learning").

The server learns sum_k x_k and nothing else about the individual x_k, even if
some sites drop out after the masks are set up.

Protocol as simulated here (one round, K sites, threshold t):

1. Encoding. Each site's (flattened) update x_k in R^D is clipped to
   [-R, R] coordinate-wise and encoded in fixed point in the ring Z_{2^32}
   (uint32 words, arithmetic mod 2^32):

       e_k = round(clip(x_k, -R, R) * s) mod 2^32,    s = `scale` (default 2^20, R = 16).

   s must be a power of two (checked), so x s is exact in float32 and the
   only encoding error is the rounding to an integer, |e_k / s - x_k| <=
   1 / (2 s). Decoding the sum reads the 32-bit word as a signed int32,
   converts it to float32 (relative error <= 2^-24) and divides by s (exact);
   the ring sum is exact as long as K (R s + 1/2) < 2^31 (checked). So the
   decoded sum differs from sum_k clip(x_k) by at most K / (2 s) + 2^-24 |sum|
   per coordinate (`quantization_bound`; tested against a float64 reference).
2. Setup. Every pair of sites (i, j) shares a pairwise seed s_ij (in the real
   protocol: Diffie-Hellman key agreement), and every site draws a self-mask
   seed b_i. Here both come from the operating system's CSPRNG (`secrets`,
   `draw_seeds`), never from the round's JAX key (which the server knows).
   Seeds are 64-bit (two uint32 words); the PRG is JAX's threefry
   (`jax.random.bits`), standing in for AES-CTR.
3. Secret sharing. Every site Shamir-shares (Shamir 1979) b_i and each of its
   pairwise seeds s_ij among the K sites with threshold t over the prime field
   GF(2^127 - 1); the t - 1 random coefficients of every polynomial come from
   `random.SystemRandom` (the OS's CSPRNG), so t - 1 shares are uniform on
   GF(p)^(t-1) whatever the secret.
4. Masked input. Site i sends
       y_i = e_i + PRG(b_i) + sum_{j > i} PRG(s_ij) - sum_{j < i} PRG(s_ij)   (mod 2^32).
   Pairwise masks cancel in the sum over all sites; each y_i alone is
   uniformly distributed in Z_{2^32}^D (the self-mask hides it even when a
   dropped site's pairwise seeds are later revealed).
5. Unmasking. With the survivors S (sites whose y arrived), if |S| < t the
   server aborts (`TooManyDropouts`, a ValueError). Otherwise each survivor
   sends, for every survivor i, its share of b_i, and for every dropped u,
   its share of u's pairwise seeds (never both for one site). The server
   reconstructs b_i (i in S) and s_uj (u not in S) from t shares and computes
       sum_{i in S} y_i - sum_{i in S} PRG(b_i) - sum_{j in S, u not in S} sign(j, u) PRG(s_ju)
   = sum_{i in S} e_i (mod 2^32), then decodes.

What runs where: encoding, masking (vmapped over sites, a `lax.fori_loop`
over pairs, O(K D) memory), the server's sum and unmasking are jnp functions
that run inside `jax.jit`. Shamir sharing and reconstruction use Python
integers (a 127-bit field) on the host: in `secure_sum` directly, and in the
round-level aggregator `secure_weighted_mean` through `jax.pure_callback`, so
that the aggregator is usable inside the jit-compiled round (and under
`run_seeds`' vmap, sequentially).

Threat model: honest-but-curious server, possibly colluding with fewer than t
sites: it learns only the sum of the survivors' inputs (the full protocol's
guarantee against an active server needs signatures and a consistency
check, not simulated). t > K/2 is recommended so that two disjoint groups of
survivors cannot both be answered. The simulation draws every secret (seeds,
Shamir coefficients) from the OS's CSPRNG and shares them in memory (one
process plays every party); the unmasked sum does not depend on them (the
masks cancel exactly), so rounds stay reproducible. It demonstrates the
arithmetic and the data flow (`ServerView` is exactly what the server
receives), not a network implementation, and is not constant-time. Secure
aggregation hides individual updates but not the sum: combine with DP for
guarantees on what the sum (and the model) reveals.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import secrets
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fedjax_med.core.aggregation import Aggregator, normalized

SHAMIR_PRIME = 2**127 - 1
DEFAULT_SCALE = 2.0**20
DEFAULT_CLIP_RANGE = 16.0
_SELF_STREAM = 0
_PAIR_STREAM = 1
# Every secret coefficient comes from the OS's CSPRNG unless a caller passes its own rng.
_SYSTEM_RANDOM = random.SystemRandom()


class TooManyDropouts(ValueError):
  """Fewer than t sites survived: the sum cannot (and must not) be unmasked."""


class SecureAggregationError(ValueError):
  """Bad secure-aggregation options (threshold, scale, range)."""


# ----------------------------------------------------------------------------- options

def check_threshold(threshold: Any, num_sites: int) -> int:
  """1 <= t <= K, an integer."""
  if isinstance(threshold, bool) or not isinstance(threshold, (int, np.integer)):
    raise SecureAggregationError(f"secure aggregation: threshold t must be an integer, got"
                                 f" {threshold!r}")
  t = int(threshold)
  if t < 1:
    raise SecureAggregationError(f"secure aggregation: threshold t must be >= 1, got {t}")
  if t > num_sites:
    raise SecureAggregationError(
        f"secure aggregation: threshold t = {t} > number of sites K = {num_sites}; the"
        f" seeds could never be reconstructed (need 1 <= t <= K)")
  return t


def check_fixed_point(scale: float, clip_range: float, num_sites: int) -> tuple[float, float]:
  """Checks that s is a power of two (x s exact in float32) and that K encoded
  values in [-R s, R s] sum without wrapping mod 2^32."""
  s, r = float(scale), float(clip_range)
  if not s > 0 or not r > 0 or not np.isfinite(s) or not np.isfinite(r):
    raise SecureAggregationError(f"secure aggregation: scale and clip_range must be finite"
                                 f" numbers > 0, got scale={scale!r}, clip_range={clip_range!r}")
  if math.frexp(s)[0] != 0.5:
    raise SecureAggregationError(
        f"secure aggregation: scale must be a power of two (2^m), got {scale!r}: only then"
        f" is x * s exact in float32 and the quantisation error within K / (2 s) +"
        f" 2^-24 |sum|; use 2.0**{round(math.log2(s))}")
  if num_sites * (r * s + 0.5) >= 2.0**31:
    raise SecureAggregationError(
        f"secure aggregation: K = {num_sites} sites x (clip_range {r} x scale {s}) overflows"
        f" the signed 32-bit range; lower scale or clip_range (need K (R s + 1/2) < 2^31)")
  return s, r


def quantization_bound(num_sites: int, scale: float, total_abs: Any = 0.0) -> Any:
  """Max |decoded sum - sum_k clip(x_k)| per coordinate: K / (2 s) + 2^-24 |sum|."""
  return num_sites / (2.0 * float(scale)) + 2.0**-24 * np.abs(total_abs)


# ----------------------------------------------------------------------------- ring (jit)

def encode(x: jax.Array, scale: float, clip_range: float) -> tuple[jax.Array, jax.Array]:
  """Fixed point in Z_{2^32}: round(clip(x, -R, R) s) as uint32 words (two's complement).

  Returns (words, number of entries that were clipped).
  """
  clipped = jnp.clip(x, -clip_range, clip_range)
  ints = jnp.round(clipped.astype(jnp.float32) * jnp.float32(scale)).astype(jnp.int32)
  return (jax.lax.bitcast_convert_type(ints, jnp.uint32),
          jnp.sum(jnp.abs(x) > clip_range, dtype=jnp.int32))


def decode(words: jax.Array, scale: float) -> jax.Array:
  """uint32 ring elements -> signed int32 -> float32 / s."""
  return jax.lax.bitcast_convert_type(words, jnp.int32).astype(jnp.float32) / jnp.float32(scale)


def prg(seed: jax.Array, size: int) -> jax.Array:
  """`size` pseudo-random uint32 words from a 64-bit seed (two uint32 words)."""
  return jax.random.bits(seed.astype(jnp.uint32), (size,), jnp.uint32)


def draw_seeds(num_sites: int) -> tuple[np.ndarray, np.ndarray]:
  """Secret seeds from the OS's CSPRNG (`secrets`): (b [K, 2], s [K, K, 2]) uint32.

  b_i is site i's self-mask seed; s is symmetric (s_ij = s_ji, in the real
  protocol agreed by Diffie-Hellman) with s_ii = 0. Host side.
  """
  k = int(num_sites)
  self_seeds = np.frombuffer(secrets.token_bytes(8 * k), np.uint32).reshape(k, 2).copy()
  raw = np.frombuffer(secrets.token_bytes(8 * k * k), np.uint32).reshape(k, k, 2)
  upper = np.triu(np.ones((k, k), bool), 1)[..., None]
  pair = np.where(upper, raw, np.swapaxes(raw, 0, 1))
  pair = np.where(np.eye(k, dtype=bool)[..., None], np.uint32(0), pair).astype(np.uint32)
  return self_seeds, pair


def setup_seeds(key: jax.Array, num_sites: int) -> tuple[jax.Array, jax.Array]:
  """(self seeds b [K, 2], symmetric pairwise seeds s [K, K, 2]) uint32; s_ii = 0,
  derived from a JAX key: for tests of the ring arithmetic only. Seeds derived
  from a key the server knows are not secret: the protocol uses `draw_seeds`."""
  self_seeds = jax.random.bits(jax.random.fold_in(key, _SELF_STREAM), (num_sites, 2),
                               jnp.uint32)
  raw = jax.random.bits(jax.random.fold_in(key, _PAIR_STREAM), (num_sites, num_sites, 2),
                        jnp.uint32)
  i, j = jnp.meshgrid(jnp.arange(num_sites), jnp.arange(num_sites), indexing="ij")
  upper = (i < j)[..., None]
  pair = jnp.where(upper, raw, jnp.swapaxes(raw, 0, 1))
  pair = jnp.where((i == j)[..., None], jnp.uint32(0), pair)
  return self_seeds, pair


def _signed(i, j, words):
  """+words if i < j, -words (mod 2^32) if i > j, 0 if i == j."""
  neg = jnp.zeros_like(words) - words
  return jnp.where(i == j, jnp.zeros_like(words), jnp.where(i < j, words, neg))


def mask_inputs(encoded: jax.Array, self_seeds: jax.Array, pair_seeds: jax.Array) -> jax.Array:
  """Every site's masked input y_i, `[K, D]` uint32 (vmapped over sites).

  y_i = e_i + PRG(b_i) + sum_{j != i} sign(i, j) PRG(s_ij)   (mod 2^32),
  sign(i, j) = +1 for i < j and -1 for i > j.
  """
  k, d = encoded.shape

  def one(i, e_i):
    def body(j, acc):
      return acc + _signed(i, j, prg(pair_seeds[i, j], d))
    return jax.lax.fori_loop(0, k, body, e_i + prg(self_seeds[i], d))

  return jax.vmap(one)(jnp.arange(k), encoded)


def unmask_sum(masked: jax.Array, survivors: jax.Array, revealed_self: jax.Array,
               revealed_pair: jax.Array) -> jax.Array:
  """The server's unmasking: sum_{i in S} e_i (mod 2^32), `[D]` uint32.

  Args:
    masked: `[K, D]` masked inputs (rows of dropped sites are ignored).
    survivors: `[K]` bool, S.
    revealed_self: `[K, 2]` reconstructed b_i (used for i in S).
    revealed_pair: `[K, K, 2]`; row u holds the reconstructed s_uj of a dropped u.
  """
  k, d = masked.shape
  zero = jnp.zeros((d,), jnp.uint32)
  total = jnp.sum(jnp.where(survivors[:, None], masked, jnp.uint32(0)), axis=0,
                  dtype=jnp.uint32)

  def correction(j):
    self_part = prg(revealed_self[j], d)

    def body(u, acc):
      m = _signed(j, u, prg(revealed_pair[u, j], d))
      return acc + jnp.where(survivors[u], zero, m)

    pair_part = jax.lax.fori_loop(0, k, body, zero)
    return jnp.where(survivors[j], self_part + pair_part, zero)

  corrections = jax.vmap(correction)(jnp.arange(k))
  return total - jnp.sum(corrections, axis=0, dtype=jnp.uint32)


# ----------------------------------------------------------------------------- Shamir (host)

def shamir_share(secret: int, num_shares: int, threshold: int,
                 rng: random.Random | None = None,
                 prime: int = SHAMIR_PRIME) -> list[tuple[int, int]]:
  """Shares (x, f(x)), x = 1..n, of a random degree-(t-1) polynomial f with f(0) = secret.

  The t - 1 other coefficients are uniform on GF(p), drawn from `rng`
  (default: `random.SystemRandom`, the OS's CSPRNG; pass a seeded
  `random.Random` only in tests: a public seed lets anyone holding one share
  recover the secret).
  """
  if not 0 <= secret < prime:
    raise ValueError(f"shamir_share: secret must be in [0, p), got {secret}")
  rng = _SYSTEM_RANDOM if rng is None else rng
  coeffs = [secret] + [rng.randrange(prime) for _ in range(threshold - 1)]
  shares = []
  for x in range(1, num_shares + 1):
    y = 0
    for c in reversed(coeffs):
      y = (y * x + c) % prime
    shares.append((x, y))
  return shares


def shamir_reconstruct(shares: Sequence[tuple[int, int]], prime: int = SHAMIR_PRIME) -> int:
  """f(0) by Lagrange interpolation over GF(p) from t shares (distinct x)."""
  secret = 0
  for i, (xi, yi) in enumerate(shares):
    num, den = 1, 1
    for j, (xj, _) in enumerate(shares):
      if i != j:
        num = num * (-xj) % prime
        den = den * (xi - xj) % prime
    secret = (secret + yi * num * pow(den, -1, prime)) % prime
  return secret


def _seed_int(words) -> int:
  w = np.asarray(words, dtype=np.uint64)
  return int(w[0]) << 32 | int(w[1])


def _seed_words(value: int) -> np.ndarray:
  return np.array([value >> 32, value & 0xFFFFFFFF], dtype=np.uint32)


@dataclasses.dataclass
class ShareBook:
  """The shares every site holds: holder -> {(owner, other): (x, y)}; other = None for b."""
  threshold: int
  held: list[dict]


def share_seeds(self_seeds: np.ndarray, pair_seeds: np.ndarray, threshold: int,
                rng: random.Random | None = None) -> ShareBook:
  """Step 3: every site i Shamir-shares b_i and each s_ij (j != i) among the K sites
  (coefficients from `rng`, default the OS's CSPRNG; see `shamir_share`)."""
  k = self_seeds.shape[0]
  held = [dict() for _ in range(k)]
  for owner in range(k):
    secrets = [(None, _seed_int(self_seeds[owner]))] + [
        (j, _seed_int(pair_seeds[owner, j])) for j in range(k) if j != owner]
    for other, value in secrets:
      for holder, share in enumerate(shamir_share(value, k, threshold, rng)):
        held[holder][(owner, other)] = share
  return ShareBook(threshold, held)


def recover_seeds(book: ShareBook, survivors: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
  """Step 5 on the server: reconstruct b_i (i in S) and s_uj (u not in S).

  Returns (revealed_self [K, 2], revealed_pair [K, K, 2], shares received).
  Raises TooManyDropouts when |S| < t.
  """
  survivors = np.asarray(survivors, bool)
  k = survivors.shape[0]
  alive = [int(i) for i in np.flatnonzero(survivors)]
  t = book.threshold
  if len(alive) < t:
    raise TooManyDropouts(
        f"secure aggregation: too many dropouts: only {len(alive)} of {k} sites survived,"
        f" fewer than the threshold t = {t}; the server cannot unmask the sum (and learns"
        f" nothing). Dropped sites: {[i for i in range(k) if not survivors[i]]}")
  responders = alive[:t]  # any t survivors suffice
  revealed_self = np.zeros((k, 2), np.uint32)
  revealed_pair = np.zeros((k, k, 2), np.uint32)
  received = 0
  for owner in range(k):
    if survivors[owner]:
      shares = [book.held[h][(owner, None)] for h in responders]
      revealed_self[owner] = _seed_words(shamir_reconstruct(shares))
      received += len(shares)
    else:
      for j in range(k):
        if j == owner:
          continue
        shares = [book.held[h][(owner, j)] for h in responders]
        revealed_pair[owner, j] = _seed_words(shamir_reconstruct(shares))
        received += len(shares)
  return revealed_self, revealed_pair, received


def _host_setup(survivors, nonce, threshold):
  """pure_callback body: the sites draw secret seeds (CSPRNG) and Shamir-share them;
  the server reconstructs what it may learn. Returns (b, s, revealed b, revealed s).

  `nonce` (the round's key data) is unused: it only keeps two calls of different
  rounds from being merged as identical pure calls.
  """
  del nonce
  survivors = np.asarray(survivors, bool)
  self_seeds, pair_seeds = draw_seeds(survivors.shape[0])
  book = share_seeds(self_seeds, pair_seeds, int(threshold))
  revealed_self, revealed_pair, _ = recover_seeds(book, survivors)
  return self_seeds, pair_seeds, revealed_self, revealed_pair


# ----------------------------------------------------------------------------- protocol

@dataclasses.dataclass
class ServerView:
  """Everything the server receives in one round of the protocol.

  masked_inputs: {site: y_i [D] uint32} for the survivors only.
  survivors: `[K]` bool.
  revealed_self_seeds: {i: b_i} reconstructed for survivors.
  revealed_pair_seeds: {(u, j): s_uj} reconstructed for dropped u.
  shares_received: number of Shamir shares the server collected.
  """
  masked_inputs: dict
  survivors: np.ndarray
  revealed_self_seeds: dict
  revealed_pair_seeds: dict
  shares_received: int


@dataclasses.dataclass
class SecureSum:
  """Result of `secure_sum`.

  total: the decoded sum over the survivors (pytree like one update).
  words: `[D]` uint32, the unmasked ring sum.
  server_view: `ServerView`.
  bound: per-coordinate quantisation error bound `[D]` (see `quantization_bound`).
  clipped: number of input entries outside [-R, R] (clipped before encoding).
  """
  total: Any
  words: np.ndarray
  server_view: ServerView
  bound: np.ndarray
  clipped: int


@jax.jit
def _mask_jit(encoded, self_seeds, pair_seeds):
  return mask_inputs(encoded, self_seeds, pair_seeds)


@jax.jit
def _unmask_jit(masked, survivors, revealed_self, revealed_pair):
  return unmask_sum(masked, survivors, revealed_self, revealed_pair)


def secure_sum(updates: Any, key: jax.Array | None = None, *, threshold: int,
               dropped: Sequence[int] = (), scale: float = DEFAULT_SCALE,
               clip_range: float = DEFAULT_CLIP_RANGE) -> SecureSum:
  """Runs the whole protocol for K stacked updates and returns the sum and the server's view.

  Args:
    updates: pytree with a leading K axis on every leaf (one update per site).
    key: unused (kept for the call signature): every secret (mask seeds,
      Shamir coefficients) comes from the OS's CSPRNG, never from a key the
      server could know. The result does not depend on them.
    threshold: t, 1 <= t <= K.
    dropped: sites that drop out after sharing their seeds (their masked input
      never arrives).
    scale, clip_range: fixed-point scale s (a power of two) and clipping range R.

  Raises:
    SecureAggregationError for bad options; TooManyDropouts when fewer than t
    sites survive.
  """
  leaves = jax.tree_util.tree_leaves(updates)
  k = int(leaves[0].shape[0])
  t = check_threshold(threshold, k)
  s, r = check_fixed_point(scale, clip_range, k)
  survivors = np.ones(k, bool)
  for u in dropped:
    if not 0 <= int(u) < k:
      raise SecureAggregationError(f"secure_sum: dropped site {u} is not in 0..{k - 1}")
    survivors[int(u)] = False
  template = jax.tree_util.tree_map(lambda a: a[0], updates)
  _, unravel = ravel_pytree(template)
  flat = jax.vmap(lambda u: ravel_pytree(u)[0])(updates)
  del key
  encoded, clipped = encode(flat, s, r)
  self_seeds, pair_seeds = draw_seeds(k)
  book = share_seeds(self_seeds, pair_seeds, t)
  masked = np.asarray(_mask_jit(encoded, jnp.asarray(self_seeds), jnp.asarray(pair_seeds)))
  # --- what crosses the network to the server: survivors' masked inputs only.
  received = {i: masked[i].copy() for i in range(k) if survivors[i]}
  if survivors.sum() < t:
    raise TooManyDropouts(
        f"secure aggregation: too many dropouts: only {int(survivors.sum())} of {k} sites"
        f" survived, fewer than the threshold t = {t}; the server cannot unmask the sum"
        f" (and learns nothing). Dropped sites: {sorted(int(u) for u in dropped)}")
  revealed_self, revealed_pair, n_shares = recover_seeds(book, survivors)
  server_masked = np.zeros_like(masked)
  for i, y in received.items():
    server_masked[i] = y
  words = np.asarray(_unmask_jit(jnp.asarray(server_masked), jnp.asarray(survivors),
                                 jnp.asarray(revealed_self), jnp.asarray(revealed_pair)))
  total_flat = np.asarray(decode(jnp.asarray(words), s))
  view = ServerView(
      masked_inputs=received, survivors=survivors,
      revealed_self_seeds={i: _seed_int(revealed_self[i]) for i in range(k) if survivors[i]},
      revealed_pair_seeds={(u, j): _seed_int(revealed_pair[u, j]) for u in range(k)
                           if not survivors[u] for j in range(k) if j != u},
      shares_received=n_shares)
  return SecureSum(total=unravel(jnp.asarray(total_flat)), words=words, server_view=view,
                   bound=quantization_bound(int(survivors.sum()), s, total_flat),
                   clipped=int(clipped))


# ----------------------------------------------------------------------------- aggregator

def secure_weighted_mean(threshold: int | None = None, *, scale: float = DEFAULT_SCALE,
                         clip_range: float = DEFAULT_CLIP_RANGE) -> Aggregator:
  """Weighted mean computed through the secure-aggregation protocol, inside a round.

  Site k encodes p_k u_k, with p_k = w_k / sum_j w_j computed from the public
  weights (n_k is public in this codebase: the server already weights by it),
  so the unmasked secure sum is the weighted mean. A site with weight 0
  sends nothing: it counts as a dropout and its pairwise masks are recovered
  from the survivors' Shamir shares. Fewer than t sites with weight > 0 fails
  the round with TooManyDropouts (raised by the host callback, surfacing as
  a runtime error naming it).

  Args:
    threshold: t (default: floor(C / 2) + 1 for a cohort of C sites).
    scale, clip_range: fixed point (s a power of two, R); the weighted updates p_k u_k must lie in
      [-R, R] (entries outside are clipped and counted in "secagg_clipped").

  Metrics: secagg_dropouts (sites with weight 0), secagg_clipped.
  Runs in jit except drawing the secret seeds (OS CSPRNG) and Shamir
  sharing/reconstruction, one host call (`jax.pure_callback`) per round.
  """
  if threshold is not None and (isinstance(threshold, bool) or
                                not isinstance(threshold, (int, np.integer)) or threshold < 1):
    raise SecureAggregationError(f"secure_weighted_mean: threshold must be an integer >= 1,"
                                 f" got {threshold!r}")

  def init(update_template, num_sites=None):
    if num_sites is not None:
      if threshold is not None:
        check_threshold(threshold, num_sites)
      check_fixed_point(scale, clip_range, num_sites)
    return ()

  def aggregate(updates, weights, state, key, context):
    del context
    leaves = jax.tree_util.tree_leaves(updates)
    c = int(leaves[0].shape[0])
    t = check_threshold(c // 2 + 1 if threshold is None else threshold, c)
    s, r = check_fixed_point(scale, clip_range, c)
    template = jax.tree_util.tree_map(lambda a: a[0], updates)
    _, unravel = ravel_pytree(template)
    flat = jax.vmap(lambda u: ravel_pytree(u)[0])(updates)
    p = normalized(weights)
    survivors = weights > 0
    encoded, clipped = encode(flat * p[:, None].astype(flat.dtype), s, r)
    shapes = (jax.ShapeDtypeStruct((c, 2), jnp.uint32),
              jax.ShapeDtypeStruct((c, c, 2), jnp.uint32),
              jax.ShapeDtypeStruct((c, 2), jnp.uint32),
              jax.ShapeDtypeStruct((c, c, 2), jnp.uint32))
    self_seeds, pair_seeds, revealed_self, revealed_pair = jax.pure_callback(
        functools.partial(_host_setup, threshold=t), shapes, survivors,
        jax.random.key_data(key), vmap_method="sequential")
    masked = mask_inputs(encoded, self_seeds, pair_seeds)
    words = unmask_sum(masked, survivors, revealed_self, revealed_pair)
    mean = unravel(decode(words, s).astype(flat.dtype))
    return mean, state, {"secagg_dropouts": jnp.sum(~survivors, dtype=jnp.int32),
                         "secagg_clipped": clipped}

  return Aggregator(init, aggregate)


__all__ = ["SHAMIR_PRIME", "DEFAULT_SCALE", "DEFAULT_CLIP_RANGE", "TooManyDropouts",
           "SecureAggregationError", "check_threshold", "check_fixed_point",
           "quantization_bound", "encode", "decode", "prg", "draw_seeds", "setup_seeds",
           "mask_inputs",
           "unmask_sum", "shamir_share", "shamir_reconstruct", "ShareBook", "share_seeds",
           "recover_seeds", "ServerView", "SecureSum", "secure_sum", "secure_weighted_mean"]
