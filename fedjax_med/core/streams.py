"""Every PRNG stream of fedjax_med, in one place.

One key per run; everything else is derived with `jax.random.fold_in`, so the
same seed gives bit-identical results and no two uses share randomness. Site
streams fold a site's id (0 <= id < 2^31 in practice) into the round key;
every other stream folds a constant from the top of the uint32 range, so it
can never equal a site's id.

    run key
    └─ round key r = fold_in(run_key, r)                         (experiment.round_key)
       ├─ client key k = fold_in(round_key, site_id_k)           (local.client_keys)
       │  ├─ pass e's shuffle: fold_in(client_key, e)            (local.epoch_permutation)
       │  ├─ step keys: fold_in(client_key, STEP_STREAM)         (local_training)
       │  └─ Ditto's personal pass: fold_in(client_key, PERSONAL_STREAM)
       ├─ server key = fold_in(round_key, SERVER_STREAM)         (aggregation noise, downlink)
       ├─ cohort draw = fold_in(round_key, SAMPLING_STREAM)
       ├─ Cyclic's visit order = fold_in(round_key, ORDER_STREAM)
       ├─ with_patches' patches = fold_in(round_key, PATCH_STREAM)
       ├─ with_random_crops' crops = fold_in(round_key, CROP_STREAM)
       ├─ with_patches' augmentation = fold_in(round_key, AUGMENT_STREAM)
       ├─ with_availability's draw = fold_in(round_key, AVAILABILITY_STREAM)
       └─ FedBuff's event e: fold_in(fold_in(round_key, RESTART_STREAM), e);
          a job's duration jitter: fold_in(job client key, DURATION_STREAM)

PATCH_STREAM was 2^32 - 2, SAMPLING_STREAM's value, up to fedjax_med 0.2.0;
it now has its own value, so `with_patches` around an algorithm that samples
a cohort draws its patches and its cohort from different keys (the patches of
every run changed with it; the retina tables were rerun, experiments/README.md).
ORDER_STREAM and RESTART_STREAM
share a value, harmlessly: Cyclic has no FedBuff events and FedBuff no visit
order. tests/test_streams.py fails on any other overlap.
"""

from __future__ import annotations

import numpy as np

# Folded into the round key.
SERVER_STREAM = np.uint32(2**32 - 1)
SAMPLING_STREAM = np.uint32(2**32 - 2)
ORDER_STREAM = np.uint32(2**32 - 3)
PATCH_STREAM = np.uint32(2**32 - 14)      # was 2**32 - 2 (= SAMPLING_STREAM)
AVAILABILITY_STREAM = np.uint32(2**32 - 11)
CROP_STREAM = np.uint32(2**32 - 12)        # with_random_crops (3D volumes)
AUGMENT_STREAM = np.uint32(2**32 - 13)     # with_patches(augment=...): flips, rot90, jitter
RESTART_STREAM = np.uint32(2**32 - 3)      # FedBuff (it has no visit order)

# Folded into a client key.
STEP_STREAM = np.uint32(2**32 - 1)
DURATION_STREAM = np.uint32(2**32 - 2)     # FedBuff: a job's duration jitter
PERSONAL_STREAM = np.uint32(2**32 - 4)

__all__ = ["SERVER_STREAM", "SAMPLING_STREAM", "ORDER_STREAM", "PATCH_STREAM",
           "CROP_STREAM", "AUGMENT_STREAM", "AVAILABILITY_STREAM", "DURATION_STREAM", "RESTART_STREAM", "STEP_STREAM",
           "PERSONAL_STREAM"]
