"""Communication compression with exact bytes: `fm.compression`.

Compressors are (init, encode, decode) triples over a client's update whose
payloads are real arrays (packed uint8 codes, indices, float32 scales):

    qsgd(b)                 QSGD, b-bit codes, per-tensor ||v|| scale (Alistarh et al. 2017)
    uniform(b)              stochastic 2^b-level quantisation on [min, max] (Suresh et al. 2017)
    rotated(c)              randomised Hadamard rotation before c (Suresh et al. 2017)
    top_k(fraction)         largest |v_i| of the whole update (Stich et al. 2018)
    sign()                  (||p||_1 / d) sign(p) per tensor (Karimireddy et al. 2019)
    error_feedback(c)       per-site residual memory (EF-SGD / EF-signSGD)
    float32()               the uncompressed reference

In a round: `uplink(c)` (a ClientTransform for `fm.aggregators.chain`),
`downlink(c)` (the FedAvg family's `downlink=` hook), or both at once with
`communication(up, down)`. Bytes are `payload_nbytes` of the encoded arrays.
"""

from fedjax_med.aggregators.compression.base import (Compressor, LeafCodec, encoded_nbytes, float32,
                                         payload_nbytes, per_tensor, reference_nbytes)
from fedjax_med.aggregators.compression.error_feedback import error_feedback
from fedjax_med.aggregators.compression.links import (Communication, communication, downlink,
                                          payload_metric_name, uplink)
from fedjax_med.aggregators.compression.packing import pack_bits, packed_size, unpack_bits
from fedjax_med.aggregators.compression.qsgd import qsgd, qsgd_levels
from fedjax_med.aggregators.compression.rotation import hadamard_transform, rotated
from fedjax_med.aggregators.compression.sign import sign
from fedjax_med.aggregators.compression.topk import num_kept, top_k
from fedjax_med.aggregators.compression.uniform import uniform

__all__ = ["Compressor", "LeafCodec", "Communication", "communication", "downlink",
           "encoded_nbytes", "error_feedback", "float32", "hadamard_transform", "num_kept",
           "pack_bits", "packed_size", "payload_metric_name", "payload_nbytes", "per_tensor",
           "qsgd", "qsgd_levels", "reference_nbytes", "rotated", "sign", "top_k", "uniform",
           "unpack_bits", "uplink"]
