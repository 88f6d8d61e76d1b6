"""PRNG streams: every constant folded into the same key is distinct (one harmless overlap)."""

import itertools

from fedjax_med.core import streams

ROUND_KEY = ("SERVER_STREAM", "SAMPLING_STREAM", "ORDER_STREAM", "PATCH_STREAM",
             "CROP_STREAM", "AUGMENT_STREAM", "AVAILABILITY_STREAM", "RESTART_STREAM")
CLIENT_KEY = ("STEP_STREAM", "DURATION_STREAM", "PERSONAL_STREAM")
# Documented in fedjax_med/core/streams.py. FedBuff has neither cohorts nor a visit order:
KNOWN_OVERLAPS = {frozenset({"ORDER_STREAM", "RESTART_STREAM"})}


def test_streams_folded_into_one_key_are_distinct_and_above_site_ids():
  for group in (ROUND_KEY, CLIENT_KEY):
    for a, b in itertools.combinations(group, 2):
      if frozenset({a, b}) in KNOWN_OVERLAPS:
        continue
      assert getattr(streams, a) != getattr(streams, b), (a, b)
  for name in ROUND_KEY + CLIENT_KEY:
    assert int(getattr(streams, name)) >= 2**31, name   # never a site id
  assert set(ROUND_KEY + CLIENT_KEY) == set(streams.__all__)
