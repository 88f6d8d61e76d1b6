"""Aggregation under additively homomorphic encryption (Paillier, EUROCRYPT 1999).

Each site encrypts its fixed-point (quantised) update with the federation's
Paillier public key; the server multiplies ciphertexts, which adds the
plaintexts, and only the *total* is decrypted by the private-key holder:

    c_kd = Enc_pk(round(p_k u_kd * s))             site k, coordinate d
    C_d  = prod_k c_kd  (mod n^2)  = Enc_pk(sum_k round(p_k u_kd s))     server
    Delta_d = Dec_sk(C_d) / s                      key holder, total only

Library: python-paillier (`phe`), an optional extra: `pip install
'fedjax_med[he]'`. It is imported lazily; without it these functions raise an
ImportError saying how to install it. Paillier's plaintext space is Z_n
(n of `key_bits` = 2048 bits by default). Encoding is exact rational
arithmetic in Python integers (round(v s), ties to even, no int64 cast), and
`paillier_sum` refuses (ValueError) inputs whose K encoded values could sum
beyond phe's signed range |m| <= max_int ~ n / 3, where the decrypted sum
would wrap mod n. The error is then quantisation, at most K / (2 s) per
coordinate (s = `scale`, default 2^24), plus 2^-53 |sum| for the float64
result (decoding is exact: the integer sum / s correctly rounded).

What runs where: everything here is Python big-integer arithmetic on the host,
outside jit. `paillier_weighted_mean` makes it usable as the reducer of a
jit-compiled round through `jax.pure_callback` (sequential under vmap); it is
slow (thousands of modular exponentiations per round): see the cost measured
in docs/privacy.md.

Threat model: honest-but-curious server that does not hold the private key;
the private key is held by a party that never sees individual ciphertexts
(in practice the sites jointly through threshold decryption, or a separate
key authority; the simulation keeps the key pair in one process). A server
colluding with the key holder learns every update. Like secure aggregation,
HE hides individual updates, not the sum or the model.
"""

from __future__ import annotations

import dataclasses
import functools
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fedjax_med.core.aggregation import Aggregator, normalized
from fedjax_med.core.options import OptionError

DEFAULT_SCALE = 2.0**24
DEFAULT_KEY_BITS = 2048


def _phe():
  try:
    import phe  # pylint: disable=import-outside-toplevel
  except ImportError as err:
    raise ImportError(
        "homomorphic aggregation needs python-paillier: pip install 'fedjax_med[he]'"
        " (or pip install 'phe>=1.5,<2')") from err
  return phe


def paillier_keypair(key_bits: int = DEFAULT_KEY_BITS):
  """(public_key, private_key) of a fresh Paillier key with an n of `key_bits` bits."""
  if isinstance(key_bits, bool) or not isinstance(key_bits, int) or key_bits < 256:
    raise OptionError(f"paillier_keypair: key_bits must be an integer >= 256, got {key_bits!r}")
  return _phe().paillier.generate_paillier_keypair(n_length=key_bits)


def _check_scale(scale) -> float:
  s = float(scale)
  if not s > 0 or not np.isfinite(s):
    raise OptionError(f"paillier: scale must be a finite number > 0, got {scale!r}")
  return s


def encode_update(values: np.ndarray, scale: float) -> list[int]:
  """round(v * s) for every value, exactly (Python integers, ties to even).

  Never wraps: the product is taken in rational arithmetic and the result is
  an unbounded Python integer. Raises ValueError for non-finite values.
  """
  values = np.asarray(values, np.float64)
  if not np.all(np.isfinite(values)):
    bad = np.flatnonzero(~np.isfinite(values.ravel())).tolist()
    raise ValueError(f"paillier: cannot encode non-finite values (flat positions {bad})")
  s = Fraction(float(scale))
  return [round(Fraction(float(v)) * s) for v in values.ravel()]


def decode_total(ints, scale: float) -> np.ndarray:
  """float64 of m / s for every integer m, correctly rounded (exact division)."""
  s = Fraction(float(scale))
  return np.array([float(Fraction(int(m)) / s) for m in ints], np.float64)


def encrypt_update(public_key, values: np.ndarray, scale: float) -> list:
  """Site side: [Enc(round(v * s)) for v in values] (one ciphertext per coordinate).

  Raises ValueError if a value's encoding exceeds the key's plaintext range.
  """
  ints = encode_update(values, scale)
  too_big = [i for i, m in enumerate(ints) if abs(m) > public_key.max_int]
  if too_big:
    raise ValueError(f"paillier: values at {too_big} times scale {scale} exceed the"
                     f" plaintext space of the key (|round(v s)| <= max_int ~ n / 3);"
                     " use a longer key or a smaller scale")
  return [public_key.encrypt(m) for m in ints]


def add_ciphertexts(encrypted_updates: list[list]) -> list:
  """Server side: coordinate-wise homomorphic sum of K encrypted updates."""
  total = list(encrypted_updates[0])
  for row in encrypted_updates[1:]:
    total = [a + b for a, b in zip(total, row)]
  return total


def decrypt_total(private_key, encrypted_total: list, scale: float) -> np.ndarray:
  """Key holder: Dec(C_d) / s, float64 `[D]` (exact integer, correctly rounded quotient)."""
  return decode_total([private_key.decrypt(c) for c in encrypted_total], scale)


@dataclasses.dataclass
class PaillierSum:
  """Result of `paillier_sum`.

  total: decoded sum `[D]` float64.
  ciphertexts: what the server receives, K lists of D `phe.EncryptedNumber`.
  encrypted_total: the D ciphertexts the server computes and sends for decryption.
  bound: quantisation error bound per coordinate, K / (2 s).
  """
  total: np.ndarray
  ciphertexts: list
  encrypted_total: list
  bound: float


def paillier_sum(updates: np.ndarray, public_key, private_key, *,
                 scale: float = DEFAULT_SCALE) -> PaillierSum:
  """sum_k updates[k] computed under Paillier encryption, `updates` `[K, D]`."""
  s = _check_scale(scale)
  updates = np.asarray(updates, np.float64)
  if updates.ndim != 2 or updates.shape[0] < 1:
    raise ValueError(f"paillier_sum: updates must be [K, D] with K >= 1, got {updates.shape}")
  if not np.all(np.isfinite(updates)):
    bad = sorted(set(np.argwhere(~np.isfinite(updates))[:, 0].tolist()))
    raise ValueError(f"paillier_sum: non-finite update entries at sites {bad}")
  bound = [sum(abs(m) for m in col) for col in zip(*(encode_update(r, s) for r in updates))]
  over = [d for d, b in enumerate(bound) if b > public_key.max_int]
  if over:
    raise ValueError(
        f"paillier_sum: at coordinates {over} the K encoded values sum_k |round(u_kd s)| can"
        f" exceed the plaintext space of the key (max_int ~ n / 3), where the decrypted sum"
        f" would wrap mod n; use a longer key or a smaller scale (s = {s})")
  ciphertexts = [encrypt_update(public_key, row, s) for row in updates]
  encrypted_total = add_ciphertexts(ciphertexts)
  total = decrypt_total(private_key, encrypted_total, s)
  return PaillierSum(total, ciphertexts, encrypted_total, updates.shape[0] / (2.0 * s))


def _host_weighted_sum(weighted, *, keypair_cell, key_bits, scale):
  if keypair_cell[0] is None:
    keypair_cell[0] = paillier_keypair(key_bits)
  public_key, private_key = keypair_cell[0]
  weighted = np.asarray(weighted, np.float64)
  # Sites with weight 0 contribute nothing and send nothing.
  rows = [row for row in weighted if np.any(row != 0.0)] or [np.zeros(weighted.shape[1])]
  result = paillier_sum(np.stack(rows), public_key, private_key, scale=scale)
  return result.total.astype(np.float32)


def paillier_weighted_mean(*, key_bits: int = DEFAULT_KEY_BITS, scale: float = DEFAULT_SCALE,
                           keypair=None) -> Aggregator:
  """Weighted mean sum_k p_k u_k computed under Paillier encryption (reducer).

  Each site encrypts p_k u_k (p_k from the public weights); the server adds
  ciphertexts; the total is decrypted. Runs on the host through
  `jax.pure_callback`, so it fits in a jit-compiled round. The key pair is
  `keypair` or generated on first use (`key_bits`).
  """
  _phe()  # fail at construction, with the install hint, if phe is missing
  s = _check_scale(scale)
  if keypair is None and (isinstance(key_bits, bool) or not isinstance(key_bits, int)
                          or key_bits < 256):
    raise OptionError(f"paillier_weighted_mean: key_bits must be an integer >= 256, got"
                      f" {key_bits!r}")
  cell = [keypair]

  def init(update_template, num_sites=None):
    del update_template, num_sites
    return ()

  def aggregate(updates, weights, state, key, context):
    del key, context
    template = jax.tree_util.tree_map(lambda a: a[0], updates)
    _, unravel = ravel_pytree(template)
    flat = jax.vmap(lambda u: ravel_pytree(u)[0])(updates)
    weighted = flat * normalized(weights)[:, None].astype(flat.dtype)
    finite = jnp.all(jnp.isfinite(weighted))
    weighted = jnp.where(finite, weighted, 0.0)  # phe cannot encrypt NaN
    total = jax.pure_callback(
        functools.partial(_host_weighted_sum, keypair_cell=cell, key_bits=key_bits, scale=s),
        jax.ShapeDtypeStruct((flat.shape[1],), jnp.float32), weighted,
        vmap_method="sequential")
    total = jnp.where(finite, total, jnp.nan)
    return unravel(total.astype(flat.dtype)), state, {}

  return Aggregator(init, aggregate)


__all__ = ["DEFAULT_SCALE", "DEFAULT_KEY_BITS", "paillier_keypair", "encode_update",
           "decode_total", "encrypt_update",
           "add_ciphertexts", "decrypt_total", "PaillierSum", "paillier_sum",
           "paillier_weighted_mean"]
