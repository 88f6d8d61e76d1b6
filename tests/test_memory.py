"""fm.training.memory: the peak-RSS reader against a known allocation (its nbytes)."""

import gc
import os

import numpy as np
import pytest

import fedjax_med as fm

memory = fm.training.memory


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_peak_sees_a_known_allocation_and_reset_forgets_it():
  size_mib = 256
  reset = memory.reset_peak_rss()
  before = memory.rss_mib()
  assert memory.peak_rss_mib() >= before - 1.0       # the mark is never below the RSS
  block = np.ones(size_mib * 2**20 // 8)             # float64, every page written
  assert block.nbytes == size_mib * 2**20
  # The peak holds at least the block (page-granular, nothing freed meanwhile);
  # the margin is 1% of the block.
  assert memory.peak_rss_mib() - before >= 0.99 * size_mib
  peak_with_block = memory.peak_rss_mib()
  del block
  gc.collect()
  if reset:                                          # clear_refs 5: the mark drops to
    assert memory.reset_peak_rss()                   # the RSS without the block
    assert memory.peak_rss_mib() <= peak_with_block - 0.9 * size_mib
  else:                                              # no reset: the peak is kept
    assert memory.peak_rss_mib() >= peak_with_block
