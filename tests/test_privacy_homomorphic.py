"""Paillier aggregation (python-paillier): the decrypted total equals the plain sum."""

import sys

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
  # the server holds ciphertexts only: integers mod n^2, not the encoded plaintexts
  pub = KEYPAIR[0]
  c = res.ciphertexts[0][0]
  assert isinstance(c, phe.paillier.EncryptedNumber)
  assert c.ciphertext(be_secure=False) != int(round(updates[0, 0] * he.DEFAULT_SCALE))
  assert 0 < c.ciphertext(be_secure=False) < pub.nsquare
  # a fresh encryption of the same value differs (probabilistic encryption)
  again = he.encrypt_update(pub, updates[0, :1], he.DEFAULT_SCALE)[0]
  assert again.ciphertext() != c.ciphertext()
  # the encrypted total decrypts to the sum
  np.testing.assert_allclose(he.decrypt_total(KEYPAIR[1], res.encrypted_total,
                                              he.DEFAULT_SCALE), res.total)


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
