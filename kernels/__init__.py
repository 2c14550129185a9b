"""Pallas GPU kernels for GDN decode and MTP verify (installed as `gdn_jax.kernels`).

Depends on jax only: no Flax, no model code, nothing from the rest of gdn_jax. Every kernel is
lowered through Pallas-Triton (`_pallas.py` is the one place that knows it).

    o, pool = decode(q, k, v, a, b, A_log, dt_bias, pool, cand_k, cand_v, cand_g, cand_beta,
                     count, slots)
    o, inter = verify_intermediate(...same arguments, T in 1..8...)   # pool untouched
    o, pool = verify_replay(...same arguments...)                     # pool := folded state
    pool = fold(pool, cand_k, cand_v, cand_g, cand_beta, count, slots)

The caller owns `count` and the candidates (set count := 0, store new candidates, in XLA).
"""

from ._pallas import TuningConfig
from .decode import decode
from .fold import fold
from .verify import verify_intermediate, verify_replay

__all__ = ["TuningConfig", "decode", "fold", "verify_intermediate", "verify_replay"]
