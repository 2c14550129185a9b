"""The one place that binds the kernels to the Pallas-Triton backend.

Every kernel goes through `pallas_call` below, which always passes `pltriton.CompilerParams`:
without them jax 0.10.x lowers `pl.pallas_call` with Mosaic GPU and 0.11.2+ with Triton. JAX
deprecated the Triton lowering in 0.11 (its exits are raw Triton through jax-triton, or Mosaic
GPU); swapping the backend should only touch this file.

The deprecation warning is raised when XLA lowers the kernel, which happens inside whatever
`jax.jit` the caller wraps around us, long after our functions have returned. So the filter is
installed for the whole process when this module is imported (`warnings.filterwarnings` puts it
first, so it also wins over `-W error`). It matches that one message and nothing else.
"""

from __future__ import annotations

import dataclasses
import warnings

from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from ._common import is_pow2

TRITON_DEPRECATION = "The Pallas Triton backend is deprecated"
warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """Launch parameters of one kernel call (hashable: a static argument of `jax.jit`).

    block_v:    rows of the [V, K] state that one program owns (its tile is [block_v, K] fp32);
                a power of two dividing V. The grid is (B, HV, V // block_v).
    num_warps:  warps per program (power of two, 1..32).
    num_stages: Triton software-pipelining depth; only loops (the pending-candidate fold) use it.
    """

    block_v: int = 32
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self):
        if not is_pow2(self.block_v):
            raise ValueError(f"TuningConfig: block_v must be a power of two, got {self.block_v=}")
        if not is_pow2(self.num_warps) or self.num_warps > 32:
            raise ValueError(f"TuningConfig: num_warps must be a power of two in 1..32, "
                             f"got {self.num_warps=}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"TuningConfig: num_stages must be an int >= 1, got {self.num_stages=}")

    def check_head_dim(self, op: str, V: int) -> None:
        """block_v must tile V exactly (no masked tail: every load is a power-of-two block)."""
        if self.block_v > V or V % self.block_v:
            raise ValueError(f"{op}: block_v must divide V, got {self.block_v=}, {V=}")


def pallas_call(kernel, *, name: str, config, interpret: bool, **kwargs):
    """`pl.pallas_call` with the Triton compiler params of `config` (never Mosaic GPU): its
    num_warps and num_stages (a TuningConfig, or any kernel's config that has them)."""
    return pl.pallas_call(
        kernel,
        name=name,
        interpret=interpret,
        compiler_params=pltriton.CompilerParams(num_warps=config.num_warps,
                                                num_stages=config.num_stages),
        **kwargs,
    )
