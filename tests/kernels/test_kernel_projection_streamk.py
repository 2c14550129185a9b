"""The stream-K projection kernel (`kernels.project_group_streamk`) against the float64 product.

Random bf16 / fp16 x and weights (never zeros: a column block no program stored, or a partial
sum the last program left out, leaves zeros or garbage where the reference is O(1)). As for
`kernels.project` (tests/kernels/test_kernel_projection.py): |y - ref| <= eps_dtype * |ref| +
K * 2**-23 * sum|x w| (one rounding of the output, fp32 sums in any order). The interpreter runs
the programs one after another, so the counters' last arrival is the block's last program there;
on the GPU (`gpu` marker) any program may finish a block, and the model's 128-row groups run at
the H100 / H200 grid of 132 programs, where most column blocks are summed by two programs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax import kernels
from gdn_jax.kernels import StreamKConfig
from gdn_jax.kernels import projection_streamk as streamk

EPS = {jnp.bfloat16: 2.0 ** -8, jnp.float16: 2.0 ** -11}
TRITON_CALL = "__gpu$xla.gpu.triton"


def _case(seed, M, K, widths, dtype):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((M, K)), dtype)
    ws = tuple(jnp.asarray(rng.standard_normal((K, n)) * K ** -0.5, dtype) for n in widths)
    return x, ws


def _assert_close(ys, x, ws, dtype):
    x64 = np.asarray(x, np.float64)
    assert len(ys) == len(ws)
    for y, w in zip(ys, ws):
        w64 = np.asarray(w, np.float64)
        ref = x64 @ w64
        bound = EPS[dtype] * np.abs(ref) + x64.shape[1] * 2.0 ** -23 * (np.abs(x64) @ np.abs(w64))
        err = np.abs(np.asarray(y, np.float64) - ref)
        assert y.shape == ref.shape and y.dtype == jnp.dtype(dtype)
        assert np.all(err <= bound), f"max excess {np.max(err - bound):.3g}"


# (M, K, widths, config): one program (every block whole), ranges inside a block and across
# blocks, one unit a program (a block summed by four), a narrow weight's blocks of its own width
CASES = [
    (5, 128, (64, 32), StreamKConfig(32, 32, 1, 4, 2)),
    (5, 128, (64, 32), StreamKConfig(32, 32, 5, 4, 2)),
    (5, 128, (64, 32), StreamKConfig(32, 32, 12, 4, 2)),
    (17, 256, (96, 64, 128), StreamKConfig(64, 64, 7, 4, 2)),
    (128, 128, (128,), StreamKConfig(64, 32, 3, 4, 2)),
    (1, 192, (256, 16), StreamKConfig(128, 64, 100, 4, 3)),  # programs > units: 9 of them
]


@pytest.mark.parametrize("M, K, widths, config", CASES,
                         ids=["whole", "ranges", "unit_each", "narrow", "128rows", "few_units"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
def test_streamk_matches_float64_interpret(M, K, widths, config, dtype):
    x, ws = _case(M + K, M, K, widths, dtype)
    _assert_close(kernels.project_group_streamk(x, ws, config=config, interpret=True), x, ws,
                  dtype)


def test_every_program_has_units_and_each_unit_one_program():
    """The ranges tile the units (what the counters' targets assume): program_of inverts
    first_unit, and no range is empty."""
    for units, programs in [(12, 5), (2560, 132), (400, 132), (9, 9), (1296, 132)]:
        firsts = [streamk._first_unit(p, units, programs) for p in range(programs + 1)]
        assert firsts[0] == 0 and firsts[-1] == units
        assert all(b > a for a, b in zip(firsts, firsts[1:]))
        for u in range(units):
            p = streamk._program_of(u, units, programs)
            assert firsts[p] <= u < firsts[p + 1]


@pytest.mark.parametrize("x_shape, w_shapes, dtype, match", [
    ((129, 64), ((64, 32),), jnp.bfloat16, r"M=129 rows is outside 1..128"),
    ((4, 64), ((64, 32),), jnp.float32, r"dtype float32 is not bf16 or fp16"),
    ((4, 96), ((96, 32),), jnp.bfloat16, r"block_k=64 does not divide K=96"),
    ((4, 64), ((64, 24),), jnp.bfloat16, r"N=24 has no power-of-two block"),
    ((4, 64), ((32, 32),), jnp.bfloat16, r"project_group_streamk"),
])
def test_bad_input_names_the_problem(x_shape, w_shapes, dtype, match):
    x = jnp.ones(x_shape, dtype)
    ws = tuple(jnp.ones(s, dtype) for s in w_shapes)
    with pytest.raises(ValueError, match=match):
        kernels.project_group_streamk(x, ws, config=StreamKConfig(block_k=64), interpret=True)


def test_shared_memory_over_the_limit_is_refused():
    x, ws = jnp.ones((128, 256), jnp.bfloat16), (jnp.ones((256, 128), jnp.bfloat16),)
    with pytest.raises(ValueError, match=r"3 stages of \[128 \+ 128, 128\] tiles take 196608 B"):
        kernels.project_group_streamk(x, ws, config=StreamKConfig(128, 128, num_stages=3),
                                      interpret=True)


@pytest.mark.parametrize("field, value", [("block_n", 24), ("block_k", 8), ("programs", 0)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"StreamKConfig: {field}"):
        StreamKConfig(**{field: value})


@pytest.mark.parametrize("kind", ["NVIDIA H100 80GB HBM3", "NVIDIA B200"], ids=["H100", "B200"])
def test_streamk_lowers_for_cuda(kind, cuda_lowering):
    x = jax.ShapeDtypeStruct((128, 2048), jnp.bfloat16)
    ws = tuple(jax.ShapeDtypeStruct((2048, n), jnp.bfloat16) for n in (12288, 64))
    with cuda_lowering(kind):
        text = kernels.project_group_streamk.trace(x, ws, config=StreamKConfig()).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count(TRITON_CALL) == 1


# The model's 128-row groups (a B = 32 verify) and lone weights, at the H100 / H200 grid
GPU_GROUPS = [(2048, (5120, 5120)), (2048, (12288, 64)), (2048, (8192, 512, 512)),
              (4096, (2048,)), (5120, (2048,))]


@pytest.mark.gpu
@pytest.mark.parametrize("M", [32, 100, 128])
@pytest.mark.parametrize("K, widths", GPU_GROUPS, ids=["gate_up", "gdn_in", "qkv", "out_proj",
                                                       "down_proj"])
def test_streamk_matches_float64_gpu(M, K, widths):
    x, ws = _case(M, M, K, widths, jnp.bfloat16)
    for _ in range(3):  # the counters start from zeros each call: repeated calls agree
        _assert_close(kernels.project_group_streamk(x, ws), x, ws, jnp.bfloat16)
