"""Pallas GPU kernels for GDN decode and MTP verify (installed as `gdn_jax.kernels`).

Depends on jax only: no Flax, no model code, nothing from the rest of gdn_jax. The kernels below
are lowered through Pallas-Triton (`_pallas.py` is the one place that knows it); the `*_mgpu`
ones are the same decode and verify as Pallas Mosaic GPU kernels for Hopper and later (`_mgpu.py`
holds what is bound to Mosaic GPU and its differences across jax versions).

    o, pool = decode(q, k, v, a, b, A_log, dt_bias, pool, cand_k, cand_v, cand_g, cand_beta,
                     count, slots)
    o, inter = verify_intermediate(...same arguments, T in 1..8...)   # pool untouched
    o, pool = verify_replay(...same arguments...)                     # pool := folded state
    pool = fold(pool, cand_k, cand_v, cand_g, cand_beta, count, slots)

    o, pool = decode_mgpu(...same arguments as decode...)             # Mosaic GPU, SM90+
    o, pool = verify_replay_mgpu(...same arguments as verify_replay...)
    o, inter = verify_intermediate_mgpu(...same arguments as verify_intermediate...)

The caller owns `count` and the candidates (set count := 0, store new candidates, in XLA).
"""

from ._mgpu import MosaicConfig
from ._pallas import TuningConfig
from .decode import decode
from .decode_mgpu import check_config as check_mosaic_config
from .decode_mgpu import decode_mgpu
from .fold import fold
from .verify import verify_intermediate, verify_replay
from .verify_mgpu import verify_intermediate_mgpu, verify_replay_mgpu

__all__ = ["MosaicConfig", "TuningConfig", "check_mosaic_config", "decode", "decode_mgpu", "fold",
           "verify_intermediate", "verify_intermediate_mgpu", "verify_replay",
           "verify_replay_mgpu"]
