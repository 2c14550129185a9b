"""The grouped MoE kernel (`kernels.grouped_matmul`) and its block plan (`kernels.moe.plan`).

The plan is checked exactly: every (token, expert) pair lands in one row of a block of its own
expert, padding rows point nowhere, blocks past the used ones are -1. The kernel is checked per
block against the float64 product of the block's rows and its expert's weight; rows are random
(never zeros), and unused blocks must come back as zeros, so a block or column block the kernel
skips fails. Tolerance: the products of bf16 / fp16 inputs are exact in the fp32 accumulator, so
the result is the float64 value rounded once (eps of the dtype, relative) up to the fp32 sums
(K * 2**-23 * sum |x w|); the gated form rounds silu(x w_gate) * (x w_up) once as well, from fp32
values: 2 eps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax import kernels
from gdn_jax.kernels import MoEConfig
from gdn_jax.kernels import moe

EPS = {jnp.bfloat16: 2.0 ** -8, jnp.float16: 2.0 ** -11}
TRITON_CALL = "__gpu$xla.gpu.triton"


def _ids(rng, T, k, E):
    ids = np.stack([rng.choice(E, k, replace=False) for _ in range(T)])
    if T > 1:
        ids[1] = ids[0]  # two tokens on the same experts
    return jnp.asarray(ids, jnp.int32)


@pytest.mark.parametrize("T, k, E, block_m", [(1, 10, 64, 16), (7, 3, 8, 16), (40, 4, 8, 16),
                                               (33, 2, 4, 64)])
@pytest.mark.parametrize("sort", [False, True], ids=["compare", "sort"])
def test_plan_places_every_pair_once(T, k, E, block_m, sort, monkeypatch):
    if sort:
        monkeypatch.setattr(moe, "_COMPARE_MAX_PAIRS", 0)
    ids = _ids(np.random.default_rng(T), T, k, E)
    b = moe.plan(ids, E, block_m)
    G, P = moe.num_blocks(T * k, E, block_m), T * k
    assert b.block_expert.shape == (G,) and b.row_token.shape == (G * block_m,)
    assert b.pair_row.shape == (P,)
    row, token, expert = (np.asarray(a) for a in (b.pair_row, b.row_token, b.block_expert))
    assert len(set(row)) == P and row.min() >= 0 and row.max() < G * block_m  # a row each
    assert np.all(token[row] == np.arange(P) // k)                # the pair's token
    padding = np.ones(G * block_m, bool)
    padding[row] = False
    assert np.all(token[padding] == T)                            # other rows: nowhere
    row_expert = np.repeat(expert, block_m)
    assert np.all(row_expert[row] == np.asarray(ids).reshape(-1))  # in a block of its expert
    used = int((expert >= 0).sum())
    assert np.all(expert[:used] >= 0) and np.all(expert[used:] == -1)
    assert used == sum(-(-int(n) // block_m) for n in np.bincount(np.asarray(ids).ravel(),
                                                                   minlength=E))


def _numpy_plan(ids, E, block_m):
    """The plan's contract, by loops: experts in order, each expert's pairs in pair order from
    its first block's first row, blocks past the used ones -1, padding rows token T."""
    ids = np.asarray(ids)
    T, k = ids.shape
    flat = ids.reshape(-1)
    G = moe.num_blocks(T * k, E, block_m)
    block_expert, row_token = np.full(G, -1), np.full(G * block_m, T)
    pair_row = np.zeros(T * k, int)
    g = 0
    for e in range(E):
        pairs = np.flatnonzero(flat == e)
        for i, p in enumerate(pairs):
            pair_row[p] = g * block_m + i
            row_token[g * block_m + i] = p // k
        n = -(-len(pairs) // block_m)
        block_expert[g:g + n] = e
        g += n
    return block_expert, row_token, pair_row


@pytest.mark.parametrize("T, k, E, block_m", [(1, 10, 64, 16), (7, 3, 8, 16), (40, 4, 8, 16),
                                               (33, 2, 4, 64), (64, 8, 256, 16), (5, 1, 3, 16),
                                               (0, 2, 8, 16)])
@pytest.mark.parametrize("sort", [False, True], ids=["compare", "sort"])
def test_plan_matches_its_contract(T, k, E, block_m, sort, monkeypatch):
    """Few pairs are planned by comparisons, many by a sort: both give the loop-built plan of
    `_numpy_plan` exactly (int32), ties, empty experts and no pairs included."""
    if sort:
        monkeypatch.setattr(moe, "_COMPARE_MAX_PAIRS", 0)
    ids = _ids(np.random.default_rng(T + E), T, k, E) if T else jnp.zeros((0, k), jnp.int32)
    assert T * k <= moe._COMPARE_MAX_PAIRS or sort
    b = moe.plan(ids, E, block_m)
    assert b.shared_blocks == 0
    for got, want in zip((b.block_expert, b.row_token, b.pair_row),
                         _numpy_plan(ids, E, block_m)):
        assert got.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("T, k, block_m", [(1, 8, 16), (5, 3, 16), (2, 2, 32)])
def test_plan_pairs_gives_each_pair_a_block(T, k, block_m):
    ids = _ids(np.random.default_rng(T), T, k, 64)
    b = moe.plan_pairs(ids, block_m)
    P = T * k
    row, token, expert = (np.asarray(a) for a in (b.pair_row, b.row_token, b.block_expert))
    assert expert.shape == (P,) and token.shape == (P * block_m,)
    assert np.all(row == np.arange(P) * block_m)
    lead = np.arange(P * block_m) % block_m == 0
    assert np.all(token[lead] == np.arange(P) // k) and np.all(token[~lead] == T)
    assert np.all(expert == np.asarray(ids).reshape(-1))


@pytest.mark.parametrize("T, k, block_m", [(1, 8, 16), (5, 3, 4), (20, 2, 16)])
def test_plan_pairs_puts_a_shared_expert_in_blocks_of_its_own(T, k, block_m):
    """shared: the routed pairs as without it (block_expert the ids as they are), then
    shared_blocks = ceil(T / block_m) blocks past them whose rows are the tokens in order; pair
    t * (k + 1) + k (the shared one) is token t's row there."""
    ids = _ids(np.random.default_rng(T), T, k, 8)
    plain, b = moe.plan_pairs(ids, block_m), moe.plan_pairs(ids, block_m, shared=True)
    P, G = T * k, -(-T // block_m)
    expert, token, row = (np.asarray(a) for a in (b.block_expert, b.row_token, b.pair_row))
    assert b.shared_blocks == G and plain.shared_blocks == 0
    assert expert.shape == (P,) and token.shape == ((P + G) * block_m,)
    np.testing.assert_array_equal(expert, np.asarray(plain.block_expert))
    np.testing.assert_array_equal(token[:P * block_m], np.asarray(plain.row_token))
    shared_rows = token[P * block_m:]
    assert np.all(shared_rows[:T] == np.arange(T)) and np.all(shared_rows[T:] == T)
    row = row.reshape(T, k + 1)
    np.testing.assert_array_equal(row[:, :k].reshape(-1), np.asarray(plain.pair_row))
    assert np.all(token[row[:, k]] == np.arange(T)) and np.all(row[:, k] // block_m >= P)
    jitted = jax.jit(lambda i: moe.plan_pairs(i, block_m, shared=True))(ids)
    assert type(jitted.shared_blocks) is int and jitted.shared_blocks == G  # static: a launch's


@pytest.mark.parametrize("planner", ["plan", "plan_pairs"])
@pytest.mark.parametrize("T, k, block_m", [(1, 8, 16), (5, 3, 16), (6, 2, 32)])
def test_combine_matches_float64(T, k, block_m, planner):
    """Each token's rows times its weights, summed: against float64 over the pairs' rows; the
    padding rows, poisoned with NaN, are never read. Bound per element: the fp32 sum of k
    products, (k + 1) * 2**-24 of the sum of their magnitudes, then one rounding to y's dtype
    (none for fp32; 2**-9 relative for bf16, 2**-8 allowed)."""
    rng = np.random.default_rng(10 + T)
    ids = _ids(rng, T, k, 8)
    b = moe.plan(ids, 8, block_m) if planner == "plan" else moe.plan_pairs(ids, block_m)
    rows, N = b.row_token.shape[0], 48
    y = rng.standard_normal((rows, N)).astype(np.float32)
    y[np.asarray(b.row_token) == T] = np.nan
    weights = rng.random((T, k)).astype(np.float32)
    ref = np.einsum("tkn,tk->tn", y.astype(np.float64)[np.asarray(b.pair_row)].reshape(T, k, N),
                    weights.astype(np.float64))
    for dtype, rounding in ((jnp.float32, 0.0), (jnp.bfloat16, 2.0 ** -8)):
        yd = jnp.asarray(y, dtype)
        out = b.combine(yd, jnp.asarray(weights), T)
        got = np.asarray(out, np.float64)
        lead = np.asarray(yd, np.float64)[np.asarray(b.pair_row)].reshape(T, k, N)
        exact = np.einsum("tkn,tk->tn", lead, weights.astype(np.float64))
        magnitude = np.einsum("tkn,tk->tn", np.abs(lead), np.abs(weights.astype(np.float64)))
        bound = (k + 1) * 2.0 ** -24 * magnitude + rounding * np.abs(exact)
        assert out.dtype == dtype and np.isfinite(got).all()
        assert np.all(np.abs(got - exact) <= bound)
        np.testing.assert_allclose(got, ref, rtol=0, atol=2.0 ** -7 * np.abs(ref).max())


def _blocks_case(seed, G, block_m, E, K, N, dtype, used):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((G * block_m, K)), dtype)
    w = jnp.asarray(rng.standard_normal((E, K, N)) * K ** -0.5, dtype)
    w2 = jnp.asarray(rng.standard_normal((E, K, N)) * K ** -0.5, dtype)
    expert = np.where(np.arange(G) < used, rng.integers(0, E, G), -1)
    return x, w, w2, jnp.asarray(expert, jnp.int32)


def _reference(x, w, w2, expert, block_m):
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    out, scale = [], []
    for g, e in enumerate(np.asarray(expert)):
        rows = f(x[g * block_m:(g + 1) * block_m])
        if e < 0:
            out.append(np.zeros((block_m, w.shape[2])))
            scale.append(np.zeros((block_m, w.shape[2])))
            continue
        a = rows @ f(w[e])
        if w2 is None:
            out.append(a)
            scale.append(np.abs(rows) @ np.abs(f(w[e])))
        else:
            b = rows @ f(w2[e])
            out.append(a / (1 + np.exp(-a)) * b)
            scale.append((np.abs(rows) @ np.abs(f(w[e]))) * (np.abs(rows) @ np.abs(f(w2[e]))))
    return np.concatenate(out), np.concatenate(scale)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("config", [MoEConfig(16, 16, 16, 4, 1), MoEConfig(32, 32, 64, 2, 2)],
                         ids=["bm16", "bm32"])
def test_grouped_matmul_matches_float64_interpret(gated, dtype, config):
    G, E, K, N = 5, 4, 128, 64
    x, w, w2, expert = _blocks_case(G + config.block_m, G, config.block_m, E, K, N, dtype, used=4)
    y = kernels.grouped_matmul(x, w, expert, w_up=w2 if gated else None, config=config,
                               interpret=True)
    ref, scale = _reference(x, w, w2 if gated else None, expert, config.block_m)
    err = np.abs(np.asarray(y, np.float64) - ref)
    bound = (2 if gated else 1) * EPS[dtype] * np.abs(ref) + K * 2.0 ** -23 * scale * (
        3 if gated else 1)
    assert y.shape == ref.shape and y.dtype == jnp.dtype(dtype)
    assert np.all(err <= bound), f"max excess {np.max(err - bound):.3g}"
    assert np.all(np.asarray(y[4 * config.block_m:]) == 0)  # the unused block: zeros


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("splits", [2, 4])
def test_grouped_matmul_split_k_partials_interpret(gated, splits):
    """splits > 1: fp32 partial sums [S, rows, N] (gated: gate's then up's, [S, rows, 2N]) whose
    sum is the float64 product up to the fp32 sums (K * 2**-23 * sum |x w|; no rounding to the
    dtype); an unused block's partials are zeros."""
    G, E, K, N, bm = 5, 4, 128, 64, 16
    config = MoEConfig(bm, 32, 16, splits=splits)
    x, w, w2, expert = _blocks_case(30 + splits, G, bm, E, K, N, jnp.bfloat16, used=4)
    y = kernels.grouped_matmul(x, w, expert, w_up=w2 if gated else None, config=config,
                               interpret=True)
    assert y.shape == (splits, G * bm, 2 * N if gated else N) and y.dtype == jnp.float32
    total = np.asarray(y, np.float64).sum(0)
    for part, weight in zip((total[:, :N], total[:, N:]), (w, w2) if gated else (w,)):
        ref, scale = _reference(x, weight, None, expert, bm)
        assert np.all(np.abs(part - ref) <= K * 2.0 ** -23 * scale)
    assert not np.asarray(y)[:, 4 * bm:].any()  # the unused block


@pytest.mark.parametrize("down_splits", [1, 2])
def test_grouped_matmul_swiglu_from_partials_interpret(down_splits):
    """swiglu: the down call forms silu(gate) * up from the gate / up call's partial sums and
    rounds it once to the weights' dtype, as the unsplit gated call does: against float64, h
    within one rounding (2 eps with the fp32 sums) times |W_down|, then the down's own sum."""
    G, E, K, N, bm = 4, 4, 128, 64, 16
    x, wg, wu, expert = _blocks_case(40, G, bm, E, K, N, jnp.bfloat16, used=3)
    wd = jnp.asarray(np.random.default_rng(41).standard_normal((E, N, K)) * N ** -0.5,
                     jnp.bfloat16)
    parts = kernels.grouped_matmul(x, wg, expert, w_up=wu, config=MoEConfig(bm, 32, 32, splits=2),
                                   interpret=True)
    y = kernels.grouped_matmul(parts, wd, expert, swiglu=True,
                               config=MoEConfig(bm, 32, 16, splits=down_splits), interpret=True)
    y = np.asarray(y, np.float64)
    if down_splits > 1:
        y = y.sum(0)
    h, _ = _reference(x, wg, wu, expert, bm)
    ref, scale = _reference(h, wd, None, expert, bm)
    rounding = 0.0 if down_splits > 1 else EPS[jnp.bfloat16] * np.abs(ref)
    bound = 2 * EPS[jnp.bfloat16] * scale + rounding + N * 2.0 ** -23 * scale
    assert np.all(np.abs(y - ref) <= bound), f"max excess {np.max(np.abs(y - ref) - bound):.3g}"
    assert np.abs(ref[:3 * bm]).min() > 0 and not y[3 * bm:].any()


def test_grouped_matmul_swiglu_loads_only_token_rows_interpret():
    """With row_token and num_tokens the down call loads the rows of a token only: padding rows
    of the partial sums, poisoned with NaN, are never read (zeros out); the token rows are bit
    for bit the unmasked call's."""
    T, k, E, K, N = 3, 2, 8, 128, 64
    rng = np.random.default_rng(50)
    b = moe.plan_pairs(_ids(rng, T, k, E), 16)
    x = jnp.asarray(rng.standard_normal((T, K)), jnp.bfloat16)
    wg, wu = (jnp.asarray(rng.standard_normal((E, K, N)) * K ** -0.5, jnp.bfloat16)
              for _ in range(2))
    wd = jnp.asarray(rng.standard_normal((E, N, K)) * N ** -0.5, jnp.bfloat16)
    parts = kernels.grouped_matmul(x, wg, b.block_expert, w_up=wu, row_token=b.row_token,
                                   config=MoEConfig(16, 32, 32, splits=2), interpret=True)
    cfg = MoEConfig(16, 32, 16)
    want = np.asarray(kernels.grouped_matmul(parts, wd, b.block_expert, swiglu=True, config=cfg,
                                             interpret=True))
    pad = np.asarray(b.row_token) == T
    poisoned = jnp.asarray(np.where(pad[None, :, None], np.nan, np.asarray(parts)), jnp.float32)
    got = np.asarray(kernels.grouped_matmul(poisoned, wd, b.block_expert, swiglu=True,
                                            row_token=b.row_token, num_tokens=T, config=cfg,
                                            interpret=True))
    np.testing.assert_array_equal(got[~pad], want[~pad])
    assert not got[pad].any() and np.abs(want[~pad]).min() > 0


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_grouped_matmul_shared_expert_is_expert_e_interpret(gated):
    """w_shared: blocks numbered E (one past w's experts) multiply by it; blocks past E, like
    those of -1, are zeros; the other blocks as without it, bit for bit."""
    G, E, K, N, bm = 6, 4, 64, 32, 16
    x, w, w2, expert = _blocks_case(60, G, bm, E, K, N, jnp.bfloat16, used=G)
    rng = np.random.default_rng(61)
    ws, ws2 = (jnp.asarray(rng.standard_normal((K, N)) * K ** -0.5, jnp.bfloat16)
               for _ in range(2))
    expert = jnp.asarray([0, E, 2, E, E + 1, -1], jnp.int32)
    cfg = MoEConfig(bm, 32, 32)
    y = np.asarray(kernels.grouped_matmul(x, w, expert, w_up=w2 if gated else None, w_shared=ws,
                                          w_up_shared=ws2 if gated else None, config=cfg,
                                          interpret=True), np.float64)
    routed_only = jnp.where(expert == E, -1, expert)
    plain = np.asarray(kernels.grouped_matmul(x, w, routed_only, w_up=w2 if gated else None,
                                              config=cfg, interpret=True), np.float64)
    as_expert = jnp.where(expert == E, 0, -1)  # the shared weights as expert 0 of a stack
    lone = np.asarray(kernels.grouped_matmul(x, ws[None], as_expert,
                                             w_up=ws2[None] if gated else None, config=cfg,
                                             interpret=True), np.float64)
    rows = np.repeat(np.asarray(expert), bm)
    np.testing.assert_array_equal(y[rows == E], lone[rows == E])
    np.testing.assert_array_equal(y[rows != E], plain[rows != E])
    assert np.abs(y[rows == E]).min() > 0 and not y[rows > E].any() and not y[rows < 0].any()


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("G", [4, 0])
def test_grouped_matmul_shared_blocks_are_expert_e_interpret(gated, G):
    """shared_blocks: the blocks past block_expert's G multiply by w_shared, bit for bit as
    blocks numbered E do; the first G as their experts say (a -1 among them zeros); every row
    compared, G = 0 (only shared blocks) too."""
    E, K, N, bm, extra = 4, 64, 32, 16, 2
    x, w, w2, _ = _blocks_case(62, G + extra, bm, E, K, N, jnp.bfloat16, used=G + extra)
    rng = np.random.default_rng(63)
    ws, ws2 = (jnp.asarray(rng.standard_normal((K, N)) * K ** -0.5, jnp.bfloat16)
               for _ in range(2))
    routed = jnp.asarray([1, -1, 3, 0][:G], jnp.int32)
    cfg, up = MoEConfig(bm, 32, 32), dict(w_up=w2, w_up_shared=ws2) if gated else {}
    y = np.asarray(kernels.grouped_matmul(x, w, routed, w_shared=ws, shared_blocks=extra,
                                          config=cfg, interpret=True, **up))
    numbered = jnp.concatenate([routed, jnp.full((extra,), E, jnp.int32)])
    want = np.asarray(kernels.grouped_matmul(x, w, numbered, w_shared=ws, config=cfg,
                                             interpret=True, **up))
    assert y.shape == ((G + extra) * bm, N)
    np.testing.assert_array_equal(y, want)
    assert np.abs(y[G * bm:]).min() > 0


def test_grouped_matmul_rejects_bad_shared_expert():
    x, w = jnp.ones((32, 64), jnp.bfloat16), jnp.ones((4, 64, 32), jnp.bfloat16)
    expert, cfg = jnp.zeros((2,), jnp.int32), MoEConfig(16, 32, 32)
    with pytest.raises(ValueError, match=r"w_shared expected one expert of w, bfloat16\[64, 32\]"
                                         r", got bfloat16\[32, 64\]"):
        kernels.grouped_matmul(x, w, expert, w_shared=jnp.ones((32, 64), jnp.bfloat16),
                               config=cfg, interpret=True)
    with pytest.raises(ValueError, match="w_up_shared expected with w_up and only then"):
        kernels.grouped_matmul(x, w, expert, w_up=w, w_shared=w[0], config=cfg, interpret=True)
    with pytest.raises(ValueError, match="w_up_shared goes with w_shared"):
        kernels.grouped_matmul(x, w, expert, w_up=w, w_up_shared=w[0], config=cfg,
                               interpret=True)
    with pytest.raises(ValueError, match="shared_blocks=1 needs w_shared"):
        kernels.grouped_matmul(jnp.ones((48, 64), jnp.bfloat16), w, expert, shared_blocks=1,
                               config=cfg, interpret=True)
    for bad in (-1, True, 1.0):
        with pytest.raises(ValueError, match=f"shared_blocks expected an int >= 0, got {bad}"):
            kernels.grouped_matmul(x, w, expert, w_shared=w[0], shared_blocks=bad, config=cfg,
                                   interpret=True)
    with pytest.raises(ValueError, match=r"block_expert expected int32 \[rows / block_m - "
                                         r"shared_blocks\] = \[1\]"):
        kernels.grouped_matmul(x, w, expert, w_shared=w[0], shared_blocks=1, config=cfg,
                               interpret=True)


def test_grouped_matmul_rejects_bad_swiglu_input():
    w = jnp.ones((4, 32, 64), jnp.bfloat16)
    expert = jnp.zeros((2,), jnp.int32)
    cfg = MoEConfig(16, 32, 32)
    with pytest.raises(ValueError, match=r"swiglu: x expected fp32 \[S, rows, 2K\]"):
        kernels.grouped_matmul(jnp.ones((2, 32, 64), jnp.bfloat16), w, expert, swiglu=True,
                               config=cfg, interpret=True)
    with pytest.raises(ValueError, match=r"swiglu: x expected fp32 \[S, rows, 2K\]"):
        kernels.grouped_matmul(jnp.ones((2, 32, 32), jnp.float32), w, expert, swiglu=True,
                               config=cfg, interpret=True)
    with pytest.raises(ValueError, match="w_up expected None"):
        kernels.grouped_matmul(jnp.ones((2, 32, 64), jnp.float32), w, expert, w_up=w,
                               swiglu=True, config=cfg, interpret=True)
    with pytest.raises(ValueError, match="num_tokens goes with swiglu and row_token"):
        kernels.grouped_matmul(jnp.ones((2, 32, 64), jnp.float32), w, expert, swiglu=True,
                               row_token=jnp.zeros((32,), jnp.int32), config=cfg, interpret=True)
    with pytest.raises(ValueError, match="num_tokens goes with swiglu and row_token"):
        kernels.grouped_matmul(jnp.ones((32, 32), jnp.bfloat16), w, expert, num_tokens=2,
                               config=cfg, interpret=True)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=r"num_tokens expected an int >= 1"):
            kernels.grouped_matmul(jnp.ones((2, 32, 64), jnp.float32), w, expert, swiglu=True,
                                   row_token=jnp.zeros((32,), jnp.int32), num_tokens=bad,
                                   config=cfg, interpret=True)
    with pytest.raises(ValueError, match=r"w expected one of \['bfloat16', 'float16'\], got "
                                         r"float32"):
        kernels.grouped_matmul(jnp.ones((2, 32, 64), jnp.float32), w.astype(jnp.float32), expert,
                               swiglu=True, config=cfg, interpret=True)
    with pytest.raises(ValueError, match=r"block_expert expected int32 \[rows / block_m\]"):
        kernels.grouped_matmul(jnp.ones((2, 48, 64), jnp.float32), w, expert, swiglu=True,
                               config=cfg, interpret=True)
    with pytest.raises(ValueError, match=r"K=32 is not a multiple of splits \* block_k = 2 \* 32"):
        kernels.grouped_matmul(jnp.ones((32, 32), jnp.bfloat16), w, expert,
                               config=MoEConfig(16, 32, 32, splits=2), interpret=True)


@pytest.mark.parametrize("planner", ["plan", "plan_pairs"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_grouped_matmul_gathers_rows_by_token_interpret(gated, planner):
    """row_token: the kernel reads each block row's token from x [T, K] itself; the same result,
    bit for bit, as the blocked copy `Blocks.rows` of x, padding rows (and unused blocks) zeros,
    against the same float64 bound."""
    T, k, E, K, N = 6, 3, 8, 128, 64
    rng = np.random.default_rng(5)
    ids = _ids(rng, T, k, E)
    config = MoEConfig(16, 32, 64, 4, 1)
    b = moe.plan(ids, E, 16) if planner == "plan" else moe.plan_pairs(ids, 16)
    x = jnp.asarray(rng.standard_normal((T, K)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((E, K, N)) * K ** -0.5, jnp.bfloat16)
    w2 = jnp.asarray(rng.standard_normal((E, K, N)) * K ** -0.5, jnp.bfloat16) if gated else None
    got = kernels.grouped_matmul(x, w, b.block_expert, w_up=w2, row_token=b.row_token,
                                 config=config, interpret=True)
    want = kernels.grouped_matmul(b.rows(x), w, b.block_expert, w_up=w2, config=config,
                                  interpret=True)
    assert got.shape == want.shape == (b.row_token.shape[0], N)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    ref, scale = _reference(b.rows(x), w, w2, b.block_expert, 16)
    err = np.abs(np.asarray(got, np.float64) - ref)
    bound = (2 if gated else 1) * EPS[jnp.bfloat16] * np.abs(ref) + K * 2.0 ** -23 * scale * 3
    assert np.all(err <= bound) and np.abs(ref[np.asarray(b.pair_row)]).min() > 0
    assert not np.asarray(got)[np.asarray(b.row_token) == T].any()  # padding rows: zeros
    # a token outside 0..T - 1 (negative, past the end) is padding too: a zero row, no read
    token = np.asarray(b.row_token).copy()
    pad = np.flatnonzero(token == T)[:2]
    token[pad] = (-1, T + 5)
    odd = kernels.grouped_matmul(x, w, b.block_expert, w_up=w2, row_token=jnp.asarray(token),
                                 config=config, interpret=True)
    np.testing.assert_array_equal(np.asarray(odd), np.asarray(got))


def test_grouped_matmul_rejects_bad_row_token():
    x, w = jnp.ones((3, 64), jnp.bfloat16), jnp.ones((4, 64, 32), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"row_token expected int32 \[G \* block_m\] = \[32\], "
                                         r"got int32\[16\]"):
        kernels.grouped_matmul(x, w, jnp.zeros((2,), jnp.int32),
                               row_token=jnp.zeros((16,), jnp.int32),
                               config=MoEConfig(16, 32, 32), interpret=True)


def test_combine_rejects_weights_of_other_pairs():
    b = moe.plan_pairs(jnp.zeros((2, 3), jnp.int32), 16)
    y = jnp.zeros((6 * 16, 32), jnp.bfloat16)
    with pytest.raises(ValueError,
                       match=r"weights expected \[num_tokens, k\] = \[2, 3\], got \[2, 2\]"):
        b.combine(y, jnp.zeros((2, 2)), 2)
    with pytest.raises(ValueError, match=r"= \[3, 2\], got \[2, 3\]"):
        b.combine(y, jnp.zeros((2, 3)), 3)


def test_no_pairs_launch_nothing():
    b = moe.plan(jnp.zeros((0, 2), jnp.int32), 8, 16)
    assert b.block_expert.shape == (0,)
    y = kernels.grouped_matmul(jnp.zeros((0, 64), jnp.bfloat16),
                               jnp.ones((8, 64, 32), jnp.bfloat16),
                               b.block_expert, config=MoEConfig(16, 32, 32), interpret=True)
    assert y.shape == (0, 32)
    assert b.combine(y, jnp.zeros((0, 2)), 0).shape == (0, 32)


@pytest.mark.parametrize("kwargs, match", [
    (dict(x=(32, 64), w=(4, 32, 64)), r"x \[rows, K\] and w \[E, K, N\]"),
    (dict(x=(32, 64), w=(4, 64, 64), w_up=(4, 64, 32)), r"w_up expected w's shape"),
    (dict(x=(32, 64), w=(4, 64, 64), dtype=jnp.float32), r"x expected one of"),
    (dict(x=(48, 64), w=(4, 64, 64)), r"block_expert expected int32 \[rows / block_m\] = \[3\]"),
    (dict(x=(32, 64), w=(4, 64, 48)), r"block_n=16 does not divide N=48|block_n=32"),
])
def test_grouped_matmul_rejects_bad_input(kwargs, match):
    dtype = kwargs.get("dtype", jnp.bfloat16)
    x, w = jnp.ones(kwargs["x"], dtype), jnp.ones(kwargs["w"], dtype)
    w_up = jnp.ones(kwargs["w_up"], dtype) if "w_up" in kwargs else None
    with pytest.raises(ValueError, match=match):
        kernels.grouped_matmul(x, w, jnp.zeros((2,), jnp.int32), w_up=w_up,
                               config=MoEConfig(16, 32, 32), interpret=True)


@pytest.mark.parametrize("kind", ["NVIDIA H100 80GB HBM3", "NVIDIA B200"], ids=["H100", "B200"])
@pytest.mark.parametrize("gated", [False, True], ids=["down", "gate_up"])
def test_grouped_matmul_lowers_for_cuda(kind, gated, cuda_lowering):
    S = jax.ShapeDtypeStruct
    x, w = S((20 * 16, 2048), jnp.bfloat16), S((64, 2048, 512), jnp.bfloat16)
    with cuda_lowering(kind):
        text = kernels.grouped_matmul.trace(
            x, w, S((20,), jnp.int32), w_up=w if gated else None,
            config=MoEConfig(16, 64, 128)).lower(lowering_platforms=("cuda",)).as_text()
    assert TRITON_CALL in text


@pytest.mark.parametrize("kind", ["NVIDIA H100 80GB HBM3", "NVIDIA B200"], ids=["H100", "B200"])
def test_grouped_matmul_gather_lowers_for_cuda(kind, cuda_lowering):
    S = jax.ShapeDtypeStruct
    x, w = S((32, 2048), jnp.bfloat16), S((256, 2048, 512), jnp.bfloat16)
    with cuda_lowering(kind):
        text = kernels.grouped_matmul.trace(
            x, w, S((272,), jnp.int32), w_up=w, row_token=S((272 * 16,), jnp.int32),
            config=MoEConfig(16, 64, 128)).lower(lowering_platforms=("cuda",)).as_text()
    assert TRITON_CALL in text


@pytest.mark.parametrize("kind", ["NVIDIA H100 80GB HBM3", "NVIDIA B200"], ids=["H100", "B200"])
def test_grouped_matmul_split_k_lowers_for_cuda(kind, cuda_lowering):
    """A decode step's split gate / up (rows by token) and the down call's swiglu prologue."""
    S = jax.ShapeDtypeStruct
    w, wd = S((256, 2048, 512), jnp.bfloat16), S((256, 512, 2048), jnp.bfloat16)
    split = MoEConfig(16, 64, 128, splits=2)
    with cuda_lowering(kind):
        up = kernels.grouped_matmul.trace(
            S((1, 2048), jnp.bfloat16), w, S((8,), jnp.int32), w_up=w,
            row_token=S((8 * 16,), jnp.int32), config=split).lower(
                lowering_platforms=("cuda",)).as_text()
        down = kernels.grouped_matmul.trace(
            S((2, 8 * 16, 1024), jnp.float32), wd, S((8,), jnp.int32), swiglu=True,
            row_token=S((8 * 16,), jnp.int32), num_tokens=1,
            config=MoEConfig(16, 64, 128)).lower(lowering_platforms=("cuda",)).as_text()
    assert TRITON_CALL in up and TRITON_CALL in down


@pytest.mark.parametrize("kind", ["NVIDIA H100 80GB HBM3", "NVIDIA B200"], ids=["H100", "B200"])
def test_grouped_matmul_shared_expert_lowers_for_cuda(kind, cuda_lowering):
    S = jax.ShapeDtypeStruct
    w, wd = S((256, 2048, 512), jnp.bfloat16), S((256, 512, 2048), jnp.bfloat16)
    one, one_d = S((2048, 512), jnp.bfloat16), S((512, 2048), jnp.bfloat16)
    cfg = MoEConfig(16, 32, 128)
    with cuda_lowering(kind):
        up = kernels.grouped_matmul.trace(
            S((1, 2048), jnp.bfloat16), w, S((8,), jnp.int32), w_up=w,
            row_token=S((9 * 16,), jnp.int32), w_shared=one, w_up_shared=one, shared_blocks=1,
            config=cfg).lower(lowering_platforms=("cuda",)).as_text()
        down = kernels.grouped_matmul.trace(
            S((9 * 16, 512), jnp.bfloat16), wd, S((8,), jnp.int32), w_shared=one_d,
            shared_blocks=1, config=cfg).lower(lowering_platforms=("cuda",)).as_text()
        numbered = kernels.grouped_matmul.trace(  # the grouped plan's: expert E in block_expert
            S((9 * 16, 512), jnp.bfloat16), wd, S((9,), jnp.int32), w_shared=one_d,
            config=cfg).lower(lowering_platforms=("cuda",)).as_text()
        only = kernels.grouped_matmul.trace(  # no routed block: the index array stands in
            S((16, 512), jnp.bfloat16), wd, S((0,), jnp.int32), w_shared=one_d,
            shared_blocks=1, config=cfg).lower(lowering_platforms=("cuda",)).as_text()
    assert all(TRITON_CALL in text for text in (up, down, numbered, only))


@pytest.mark.gpu
@pytest.mark.parametrize("gated", [False, True], ids=["down", "gate_up"])
@pytest.mark.parametrize("G, used", [(10, 10), (60, 37)])
def test_grouped_matmul_matches_float64_gpu(gated, G, used, on_gpu):
    E, K, N = 64, (2048 if gated else 512), (512 if gated else 2048)
    config = MoEConfig(16, 64, 128)
    x, w, w2, expert = _blocks_case(G, G, 16, E, K, N, jnp.bfloat16, used)
    y = kernels.grouped_matmul(x, w, expert, w_up=w2 if gated else None, config=config)
    ref, scale = _reference(x, w, w2 if gated else None, expert, 16)
    err = np.abs(np.asarray(y, np.float64) - ref)
    bound = (2 if gated else 1) * EPS[jnp.bfloat16] * np.abs(ref) + K * 2.0 ** -23 * scale * 3
    assert np.all(err <= bound), f"max excess {np.max(err - bound):.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("T, k", [(32, 8), (128, 8), (1, 8)])
def test_grouped_matmul_gathers_rows_gpu(T, k, on_gpu):
    """The 35B's gate / up at decode and verify token counts, rows read by token in the kernel:
    equal to the kernel on the blocked copy of x (the same products, summed in the same order)."""
    E, K, N = 256, 2048, 512
    rng = np.random.default_rng(T)
    ids = _ids(rng, T, k, E)
    b = moe.plan(ids, E, 16) if 4 * T * k > E else moe.plan_pairs(ids, 16)
    x = jnp.asarray(rng.standard_normal((T, K)), jnp.bfloat16)
    w, w2 = (jnp.asarray(rng.standard_normal((E, K, N)) * K ** -0.5, jnp.bfloat16)
             for _ in range(2))
    config = MoEConfig(16, 64, 128)
    got = kernels.grouped_matmul(x, w, b.block_expert, w_up=w2, row_token=b.row_token,
                                 config=config)
    want = kernels.grouped_matmul(b.rows(x), w, b.block_expert, w_up=w2, config=config)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert np.abs(np.asarray(got, np.float32)[np.asarray(b.pair_row)]).max() > 0
