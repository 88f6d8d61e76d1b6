"""Paillier aggregation (python-paillier): the decrypted total equals the plain sum."""

import math
import sys
from fractions import Fraction

import jax
import numpy as np
import optax
import pytest

import fedjax_med as fm
from conftest import bce_loss, init_params, make_sites
from fedjax_med.privacy import homomorphic as he

phe = pytest.importorskip("phe")

# A short key keeps the test fast; the arithmetic is the same at 2048 bits.
KEYPAIR = he.paillier_keypair(512)


def test_paillier_sum_equals_plain_sum_up_to_quantisation():
  rng = np.random.default_rng(0)
  updates = rng.normal(size=(4, 14)) * 0.3
  res = he.paillier_sum(updates, *KEYPAIR)
  assert np.all(np.abs(res.total - updates.sum(0)) <= res.bound + 1e-12)
  assert res.bound == 4 / (2 * he.DEFAULT_SCALE)
  # what the server holds and computes, checked with textbook Paillier decryption
  # written here from the paper (Paillier 1999, g = n + 1): every ciphertext is an
  # encryption of round(v s) (exact Python integers), and the server's product of the
  # K ciphertexts mod n^2 decrypts to their exact integer sum
  s = he.DEFAULT_SCALE
  for k in range(4):
    for d in range(14):
      c = res.ciphertexts[k][d]
      assert c.exponent == 0
      assert textbook_decrypt(c.ciphertext(be_secure=False)) == exact_round(updates[k, d], s)
  n2 = KEYPAIR[0].nsquare
  for d in range(14):
    prod = 1
    for k in range(4):
      prod = prod * res.ciphertexts[k][d].ciphertext(be_secure=False) % n2
    assert textbook_decrypt(prod) == sum(exact_round(updates[k, d], s) for k in range(4))
  # a fresh encryption of the same value differs (probabilistic encryption)
  again = he.encrypt_update(KEYPAIR[0], updates[0, :1], s)[0]
  assert again.ciphertext() != res.ciphertexts[0][0].ciphertext()


def exact_round(v, s):
  """round(v s) to the nearest integer (ties to even), in exact rational arithmetic."""
  return round(Fraction(float(v)) * Fraction(float(s)))


def textbook_decrypt(c):
  """m = L(c^lambda mod n^2) mu mod n, L(u) = (u - 1) / n, mu = L(g^lambda mod n^2)^-1,
  g = n + 1; read as signed (m > n / 2 is negative)."""
  p, q = KEYPAIR[1].p, KEYPAIR[1].q
  n = p * q
  lam = (p - 1) * (q - 1) // math.gcd(p - 1, q - 1)
  ell = lambda u: (u - 1) // n
  mu = pow(ell(pow(n + 1, lam, n * n)), -1, n)
  m = ell(pow(c, lam, n * n)) * mu % n
  return m - n if m > n // 2 else m


def test_paillier_encoding_is_exact_for_large_values():
  """6e11 * 2^24 ~ 1e19 > 2^63: the old int64 cast wrapped it to a negative number (a
  diverged model got a wrong-signed sum). Reference: the exact rational sum of the inputs;
  allowed error K / (2 s) (rounding to integers) + 2^-53 |sum| (the float64 result)."""
  updates = np.array([[6e11, 1.5, -3e14], [-2.5e11, 1e-7, 2e14], [7e11, -2.25, 1e14]])
  res = he.paillier_sum(updates, *KEYPAIR)
  for d in range(3):
    exact = sum(Fraction(float(v)) for v in updates[:, d])
    err = abs(Fraction(float(res.total[d])) - exact)
    assert err <= Fraction(3, 2) / Fraction(he.DEFAULT_SCALE) + abs(exact) * Fraction(1, 2**53)
  assert res.total[0] > 0 and res.total[2] == 0.0


def test_paillier_refuses_values_outside_the_plaintext_space():
  """|sum| must stay below n / 3 (phe's max_int): otherwise the decrypted sum wraps mod n."""
  big = float(KEYPAIR[0].max_int) / he.DEFAULT_SCALE  # one value alone is at the limit
  with pytest.raises(ValueError, match="plaintext"):
    he.paillier_sum(np.array([[big * 0.6], [big * 0.6]]), *KEYPAIR)


def test_paillier_aggregator_in_a_round_matches_weighted_mean():
  sites = make_sites([9, 4, 6], seed=3)
  data = fm.FederatedData.from_sites(sites)
  params = init_params()
  kwargs = dict(client_optimizer=optax.sgd(0.3), local_epochs=1, batch_size=3)
  plain = fm.algorithms.fedavg(bce_loss, **kwargs)
  enc = fm.algorithms.fedavg(bce_loss, aggregator=he.paillier_weighted_mean(keypair=KEYPAIR),
                             **kwargs)
  s1, s2 = plain.init(params), enc.init(params)
  for r in range(2):
    s1, _ = plain.round(s1, data, jax.random.PRNGKey(r))
    s2, _ = enc.round(s2, data, jax.random.PRNGKey(r))
  np.testing.assert_allclose(s2.params["w"], s1.params["w"], atol=1e-6)
  np.testing.assert_allclose(s2.params["b"], s1.params["b"], atol=1e-6)


def test_nonfinite_and_bad_options():
  with pytest.raises(ValueError, match="non-finite update entries at sites \\[1\\]"):
    he.paillier_sum(np.array([[1.0], [np.nan]]), *KEYPAIR)
  with pytest.raises(ValueError, match="scale"):
    he.paillier_sum(np.ones((2, 2)), *KEYPAIR, scale=0)
  with pytest.raises(ValueError, match="key_bits"):
    he.paillier_keypair(64)


def test_missing_phe_gives_install_hint(monkeypatch):
  monkeypatch.setitem(sys.modules, "phe", None)
  with pytest.raises(ImportError, match=r"fedjax_med\[he\]"):
    he.paillier_weighted_mean()
  with pytest.raises(ImportError, match=r"fedjax_med\[he\]"):
    he.paillier_keypair(512)
