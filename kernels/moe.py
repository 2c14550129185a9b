"""The routed experts of a MoE block for decode and verify token counts: a grouped matmul that
reads each chosen expert's weights once.

XLA's GPU `ragged_dot` computes every expert whatever the routing; gathering the chosen experts'
weights per (token, expert) pair re-reads an expert once per token that picked it. Here the
pairs are grouped by expert (in pair order) and cut into blocks of `block_m` rows, each block
one expert's (`plan`); program (g, n, s) multiplies block g's rows by the column block n of its
expert's weight (a K slice of it: `MoEConfig.splits`), streaming that weight once for all of
the block's rows. A decode step of B tokens and top-k experts has P = B k pairs in at most
P / block_m + min(E, P) blocks; those past the used ones (`block_expert` = -1) write zeros and
read nothing. For few pairs the plan costs more launches than the weights it saves (a decode
step at B = 1 has k distinct experts; measured when `plan` sorted): `plan_pairs` gives every
pair a block of its own instead, from index arithmetic alone, and an expert two tokens chose is
read twice.

    blocks = plan(ids, num_experts, block_m)                    # XLA: rank by expert, pad
    h = grouped_matmul(x, w_gate, blocks.block_expert, w_up=w_up, row_token=blocks.row_token,
                       config=...)                              # block rows gathered from x
    y = grouped_matmul(h, w_down, blocks.block_expert, config=...)
    out = blocks.combine(y, weights, num_tokens)                 # XLA: gather the pairs' rows, sum

With `row_token` the first call reads each block's rows from the tokens x [num_tokens, K] by
index (a padding row reads nothing and is zeros), where `blocks.rows(x)` would write the blocked
copy first: G * block_m rows, most of them padding when experts get a pair or two.

With `w_up` the kernel computes silu(x @ w_gate) * (x @ w_up) (SwiGLU's first half) in one pass.
x, weights: bf16 or fp16 (exact products, fp32 accumulation; each call rounds its result to the
weights' dtype once, so h is rounded between the two calls, and `combine` sums in fp32 and
rounds again).

Few blocks (a decode step's pairs) leave most SMs with one program streaming a thin column block:
`MoEConfig.splits` cuts K into slices, a program each, and the calls pass fp32 partial sums on
(the gated call's gate and up sums; the down call's silu(gate) * up formed from them on load, its
own sums added in `combine`):

    h = grouped_matmul(x, w_gate, ..., w_up=w_up, config=split)    # [S, rows, 2I] fp32
    y = grouped_matmul(h, w_down, blocks.block_expert, swiglu=True, config=...)
"""

from __future__ import annotations

import dataclasses
import functools
import operator

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from . import _pallas
from ._common import check_launch_fields, column_index

_F32 = jnp.float32
MOE_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Launch parameters of `grouped_matmul` (hashable: a static argument).

    block_m: pair rows per block (>= 16, the tensor cores' smallest tile; a power of two). Each
             block re-reads its expert's weights, so more rows per block suit more tokens.
    block_n, block_k: the weight tile [block_k, block_n] (powers of two >= 16).
    num_warps, num_stages: Triton's; the stages pipeline the loop over K.
    splits: K is cut into this many slices, a program each (split-K): more programs, and more
            loads in flight, where the blocks are few (a decode step's 8-80 pairs); the call
            then returns fp32 partial sums (`grouped_matmul`).
    """

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3
    splits: int = 1

    def __post_init__(self):
        check_launch_fields(self, tiles=("block_m", "block_n", "block_k"), counts=("splits",))

    def misfit(self, K: int, N: int) -> str | None:
        """Why this config cannot take an [E, K, N] expert weight, or None."""
        if N % self.block_n:
            return f"block_n={self.block_n} does not divide N={N}"
        if K % (self.splits * self.block_k):
            return (f"K={K} is not a multiple of splits * block_k = {self.splits} * "
                    f"{self.block_k}")
        return None


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["block_expert", "row_token", "pair_row"],
                   meta_fields=["shared_blocks"])
@dataclasses.dataclass(frozen=True)
class Blocks:
    """The (token, expert) pairs placed in blocks of `block_m` rows, each block one expert's
    (`plan`, `plan_pairs`); a pytree whose shared_blocks is static (a jitted plan keeps it an
    int, as `grouped_matmul` takes it).

    block_expert: [G] int32, the expert of each block (-1: unused).
    row_token:    [(G + shared_blocks) * block_m] int32, the token of each row (num_tokens on
                  padding rows).
    pair_row:     [P] int32, the row of each pair (pair p = token * k + j: token's j-th expert;
                  with a shared expert token * (k + 1) + j, j = k the shared one).
    shared_blocks: blocks after the G whose expert is the shared one (`plan_pairs(shared=)`;
                  `grouped_matmul`'s shared_blocks): numbered by position, not stored.
    """

    block_expert: jax.Array
    row_token: jax.Array
    pair_row: jax.Array
    shared_blocks: int = 0

    def rows(self, x: jax.Array) -> jax.Array:
        """x [num_tokens, K] -> [(G + shared_blocks) * block_m, K]: each row's token, zeros on
        padding rows."""
        return jnp.take(x, self.row_token, axis=0, mode="fill", fill_value=0)

    def combine(self, y: jax.Array, weights: jax.Array, num_tokens: int,
                dtype=None) -> jax.Array:
        """y [G * block_m, N] (or its split-K partial sums [S, G * block_m, N], fp32), weights
        [num_tokens, k] -> [num_tokens, N] in dtype (default y's): each token's k rows times
        their routing weights, summed in fp32 (`combine_rows` of `token_rows`)."""
        return combine_rows(y, self.token_rows(weights, num_tokens), weights, dtype)

    def token_rows(self, weights: jax.Array, num_tokens: int) -> jax.Array:
        """[num_tokens, k] int32: the rows of the output that hold each token's k pairs, in
        the order of weights' columns (weights [num_tokens, k]: checked against the plan)."""
        T, k = weights.shape
        if T != num_tokens or T * k != self.pair_row.shape[0]:
            raise ValueError(f"combine: weights expected [num_tokens, k] = [{num_tokens}, "
                             f"{self.pair_row.shape[0] // max(num_tokens, 1)}], got "
                             f"{list(weights.shape)}")
        return self.pair_row.reshape(T, k)


def combine_rows(y: jax.Array, rows: jax.Array, weights: jax.Array, dtype=None) -> jax.Array:
    """y [R, N] (or split-K partial sums [S, R, N], fp32), rows [M, k] int32 in 0..R-1, weights
    [M, k] -> [M, N] in dtype (default y's): sum_j weights[m, j] * y[rows[m, j]] in fp32, rounded
    once. Only the M * k rows named are gathered (the padding rows, most of y where experts get a
    pair or two, are never read) and summed in one reduce: no scatter into a zeroed output."""
    M, k = rows.shape
    lead = jnp.take(y, rows.reshape(-1), axis=-2).astype(_F32)
    if lead.ndim == 3:
        lead = lead.sum(0)
    lead = lead.reshape(M, k, y.shape[-1])
    # a product and a sum over k, which XLA fuses with the gather (an einsum may become a
    # batched GEMM launch of its own)
    out = (lead * weights.astype(_F32)[:, :, None]).sum(1)
    return out.astype(y.dtype if dtype is None else dtype)


def num_blocks(pairs: int, num_experts: int, block_m: int) -> int:
    """The most blocks `pairs` pairs can take: every used expert's last block may be partial."""
    return -(-pairs // block_m) + min(num_experts, pairs)


# Up to this many pairs (decode and verify token counts) `plan` is compare-and-sum fusions: a
# pair's rank among its expert's pairs by comparing it with every other pair, a row's token by
# comparing the row with every pair's; O(P (P + rows)) comparisons that XLA fuses into a few
# small kernels, where the sort and its scatters take a dozen launches and buffer copies a layer.
# Beyond (prefill), a sort.
_COMPARE_MAX_PAIRS = 2048


def plan(ids: jax.Array, num_experts: int, block_m: int) -> Blocks:
    """ids: [num_tokens, k] int32, each token's experts (in 0..num_experts - 1) -> `Blocks`:
    each expert's pairs in the order of their index (token * k + j), in blocks of their own."""
    T, k = ids.shape
    P = T * k
    G = num_blocks(P, num_experts, block_m)
    flat = ids.reshape(-1).astype(jnp.int32)
    pair = jnp.arange(P, dtype=jnp.int32)
    compare = P <= _COMPARE_MAX_PAIRS
    sizes = (jnp.sum(flat[:, None] == jnp.arange(num_experts, dtype=jnp.int32)[None, :], axis=0,
                     dtype=jnp.int32) if compare
             else jnp.bincount(flat, length=num_experts).astype(jnp.int32))
    blocks = -(-sizes // block_m)
    block_end = jnp.cumsum(blocks)                              # one past each expert's blocks
    first_row = (block_end - blocks) * block_m                  # each expert's first row
    g = jnp.arange(G, dtype=jnp.int32)
    block_expert = jnp.sum(block_end[None, :] <= g[:, None], axis=1, dtype=jnp.int32)
    block_expert = jnp.where(g < block_end[-1], block_expert, -1)
    if compare:
        before = (flat[None, :] == flat[:, None]) & (pair[None, :] < pair[:, None])
        pair_row = first_row[flat] + jnp.sum(before, axis=1, dtype=jnp.int32)
        hit = pair_row[None, :] == jnp.arange(G * block_m, dtype=jnp.int32)[:, None]
        row_token = jnp.where(jnp.any(hit, axis=1),
                              jnp.sum(jnp.where(hit, pair[None, :] // k, 0), axis=1,
                                      dtype=jnp.int32), T)
    else:
        order = jnp.argsort(flat, stable=True).astype(jnp.int32)  # sorted position -> pair
        expert = flat[order]
        first = jnp.cumsum(sizes) - sizes                       # first sorted position per expert
        row = first_row[expert] + pair - first[expert]
        row_token = jnp.full((G * block_m,), T, jnp.int32).at[row].set(order // k)
        pair_row = jnp.zeros((P,), jnp.int32).at[order].set(row)
    return Blocks(block_expert, row_token, pair_row)


def plan_pairs(ids: jax.Array, block_m: int, *, shared: bool = False) -> Blocks:
    """ids: [num_tokens, k] int32 -> `Blocks` of one pair each (row 0 of block p is pair p; the
    other rows are padding): no sort, nothing but index arithmetic on a static layout.

    shared: every token takes a shared expert as its k + 1-th: its T pairs fill
    shared_blocks = ceil(T / block_m) blocks of their own after the routed pairs' (its weights
    read once per block_m tokens, not once per token); the pairs are then
    p = token * (k + 1) + j, j = k the shared one (`combine`'s weights [T, k + 1])."""
    T, k = ids.shape
    P = T * k
    r = jnp.arange(P * block_m, dtype=jnp.int32)
    block_expert = ids.reshape(-1).astype(jnp.int32)
    row_token = jnp.where(r % block_m == 0, r // (block_m * k), T)
    pair_row = jnp.arange(P, dtype=jnp.int32) * block_m
    if not shared:
        return Blocks(block_expert, row_token, pair_row)
    # The shared blocks are numbered past block_expert's end, not stored in it: its G entries
    # are the router's ids as they come (a concatenation was a launch a layer).
    G = -(-T // block_m)
    t = jnp.arange(G * block_m, dtype=jnp.int32)
    pair_row = jnp.concatenate([pair_row.reshape(T, k),
                                P * block_m + jnp.arange(T, dtype=jnp.int32)[:, None]], axis=1)
    return Blocks(block_expert, jnp.concatenate([row_token, jnp.where(t < T, t, T)]),
                  pair_row.reshape(-1), shared_blocks=G)


def _kernel(block_expert_ref, *refs, block_m, block_n, block_k, k_split, gated, gather, swiglu,
            num_tokens, shared, shared_blocks):
    """Program (g, n, s): rows of block g times column block n of w[block_expert[g]], over the
    K slice s (k_split rows of w from s * k_split). With gather (refs: row_token first) the rows
    are x's rows row_token[g * block_m + i], zeros where that is no token (padding); with swiglu
    x is [S', rows, 2K] partial sums of gate | up and a row is silu(gate) * up (fp32, rounded to
    w's dtype), rows whose row_token is no token (num_tokens given) zeros, never loaded. With
    shared, the refs after w (and w_up) hold one more expert's [K, N] weights, expert E (E = w's
    experts), as are the shared_blocks blocks past block_expert's. o: [rows, N] in its dtype,
    or [S, rows, N] fp32 partial sums (split; gated: [S, rows, 2N], gate's then up's)."""
    row_token_ref, x_ref, *rest = refs if gather or num_tokens is not None else (None, *refs)
    weights, o_ref = rest[:-1], rest[-1]
    stack, lone = (weights[:len(weights) // 2], weights[len(weights) // 2:]) if shared else \
        (weights, ())
    g, n, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = pl.ds(g * block_m, block_m)
    E, K, N = stack[0].shape
    G = block_expert_ref.shape[0]
    # a shared block's index is past block_expert's end: read in range, then replaced (the
    # interpreter clamps an out-of-range read: only a GPU run would show a missing guard)
    e = block_expert_ref[g] if not shared_blocks else \
        jnp.where(g < G, block_expert_ref[jnp.minimum(g, G - 1)], E)
    split = len(o_ref.shape) == 3

    def store(col, value):
        cols = pl.ds(col + n * block_n, block_n)
        if split:
            o_ref[s, rows, cols] = value
        else:
            o_ref[rows, cols] = value.astype(o_ref.dtype)

    def x_rows(k0, token, real):  # x's tile of the block's rows, in w's dtype
        if gather:  # indices on both axes: the interpreter takes no array-and-slice mix
            return plgpu.load(x_ref.at[token[:, None], column_index(k0, block_k)],
                              mask=real[:, None], other=0)
        if swiglu:  # with row_token only the real rows load: most rows are padding
            def summed(col):
                cs = pl.ds(col, block_k)
                parts = [(x_ref[j, rows, cs] if row_token_ref is None else plgpu.load(
                    x_ref.at[jnp.int32(j), rows, cs], mask=real[:, None], other=0))
                    .astype(_F32) for j in range(x_ref.shape[0])]
                return functools.reduce(lambda a, b: a + b, parts)
            return _silu_mul(summed(k0), summed(K + k0)).astype(stack[0].dtype)
        return x_ref[rows, pl.ds(k0, block_k)]

    def run(tile):  # tile(ref, ks, cols): this block's expert's tile
        token, real = None, None
        if row_token_ref is not None:  # a padding row's address: masked, never read
            token = row_token_ref[rows]
            real = (token >= 0) & (token < (x_ref.shape[0] if gather else num_tokens))
            token = jnp.where(real, token, 0)

        def step(i, accs):
            k0 = s * k_split + i * block_k
            x, ks, cols = x_rows(k0, token, real), pl.ds(k0, block_k), pl.ds(n * block_n, block_n)
            dot = lambda ref: lax.dot_general(x, tile(ref, ks, cols), (((1,), (0,)), ((), ())),
                                              preferred_element_type=_F32)
            return tuple(a + dot(j) for j, a in enumerate(accs))

        zero = jnp.zeros((block_m, block_n), _F32)
        accs = lax.fori_loop(0, k_split // block_k, step, (zero, zero) if gated else (zero,))
        if gated and split:  # the gate needs its whole sum: silu waits for the consumer
            store(0, accs[0])
            store(N, accs[1])
        else:
            store(0, _silu_mul(*accs) if gated else accs[0])

    pl.when((e >= 0) & (e < E))(lambda: run(lambda j, ks, cols: stack[j][e, ks, cols]))
    if shared:
        pl.when(e == E)(lambda: run(lambda j, ks, cols: lone[j][ks, cols]))

    @pl.when((e < 0) | (e >= E + int(shared)))
    def _():
        zero = jnp.zeros((block_m, block_n), o_ref.dtype)
        for col in ((0, N) if gated and split else (0,)):
            store(col, zero)


def _silu_mul(gate, up):
    return jax.nn.silu(gate) * up


@functools.partial(jax.jit, static_argnames=("config", "swiglu", "num_tokens", "shared_blocks",
                                             "interpret", "name"))
def grouped_matmul(x: jax.Array, w: jax.Array, block_expert: jax.Array, *,
                   w_up: jax.Array | None = None, row_token: jax.Array | None = None,
                   swiglu: bool = False, num_tokens: int | None = None,
                   w_shared: jax.Array | None = None, w_up_shared: jax.Array | None = None,
                   shared_blocks: int = 0,
                   config: MoEConfig = MoEConfig(), interpret: bool = False,
                   name: str | None = None) -> jax.Array:
    """x: [G * block_m, K], w (and w_up): [E, K, N], block_expert: [G] int32 -> [G * block_m, N]
    in w's dtype (x's but with swiglu): block g's rows @ w[block_expert[g]] (with w_up:
    silu(x @ w) * (x @ w_up)); zeros for blocks whose expert is outside 0..E - 1 (0..E with
    w_shared; -1 marks the unused ones). With row_token
    ([G * block_m] int32, `Blocks`), x is [num_tokens, K] and row i of the blocks is
    x[row_token[i]], zeros where row_token[i] is not in 0..num_tokens - 1.

    config.splits > 1: the K slices' fp32 partial sums [splits, G * block_m, N] come back
    unadded; with w_up [splits, G * block_m, 2N], the gate's sums then the up's, for a
    swiglu call to finish. swiglu: x is such a gated call's [S, G * block_m, 2K] (fp32) and the
    rows are silu(gate) * up of its sums, rounded to w's dtype; with row_token and num_tokens
    (the gated call's), only the rows of a token load (the sums are [S, 2K] fp32 a row, and at
    a decode step 15 of a block's 16 rows are padding), the others are zeros. name: the
    kernel's (what a profile shows; default gdn_moe_gate_up with w_up, else gdn_moe_down).

    w_shared (and w_up_shared, with w_up): [K, N], one more expert, numbered E (w's experts):
    a block whose expert is E multiplies by it (a MoE block's shared expert, run as the k + 1-th
    expert of every token). shared_blocks (with w_shared): that many blocks more after
    block_expert's, the shared expert's (`Blocks.shared_blocks`): G counts them in the shapes
    above, block_expert is then [G - shared_blocks]."""
    _check(x, w, w_up, block_expert, row_token, swiglu, num_tokens, config, shared_blocks)
    _check_shared(w, w_up, w_shared, w_up_shared, shared_blocks)
    shared = w_shared is not None
    N = w.shape[2]
    G, S = block_expert.shape[0] + shared_blocks, config.splits
    cols = 2 * N if w_up is not None and S > 1 else N
    shape, dtype = ((S, G * config.block_m, cols), _F32) if S > 1 else \
        ((G * config.block_m, N), w.dtype)
    if G == 0:  # no pairs: nothing to launch (a grid of size 0 may not launch on a GPU)
        return jnp.zeros(shape, dtype)
    gated, gather = w_up is not None, row_token is not None and not swiglu
    if block_expert.shape[0] == 0:  # only shared blocks: an array to index all the same
        block_expert = jnp.full((1,), w.shape[0], jnp.int32)
    return _pallas.pallas_call(
        functools.partial(_kernel, block_m=config.block_m, block_n=config.block_n,
                          block_k=config.block_k, k_split=w.shape[1] // S, gated=gated,
                          gather=gather, swiglu=swiglu, num_tokens=num_tokens if swiglu else None,
                          shared=shared, shared_blocks=shared_blocks),
        name=name or ("gdn_moe_gate_up" if gated else "gdn_moe_down"),
        config=config,  # pallas_call reads num_warps and num_stages
        interpret=interpret,
        grid=(G, N // config.block_n, S),
        out_shape=jax.ShapeDtypeStruct(shape, dtype),
    )(block_expert, *((row_token,) if row_token is not None else ()), x, w,
      *((w_up,) if gated else ()), *((w_shared,) if shared else ()),
      *((w_up_shared,) if shared and gated else ()))


def _check_shared(w, w_up, w_shared, w_up_shared, shared_blocks):
    op = "grouped_matmul"
    if shared_blocks and w_shared is None:
        raise ValueError(f"{op}: shared_blocks={shared_blocks} needs w_shared (their expert)")
    if w_shared is None:
        if w_up_shared is not None:
            raise ValueError(f"{op}: w_up_shared goes with w_shared, got w_shared None")
        return
    if (w_up is None) != (w_up_shared is None):
        raise ValueError(f"{op}: w_up_shared expected with w_up and only then, got w_up "
                         f"{'None' if w_up is None else 'given'}, w_up_shared "
                         f"{'None' if w_up_shared is None else 'given'}")
    for name, a in (("w_shared", w_shared), ("w_up_shared", w_up_shared)):
        if a is not None and (a.shape != w.shape[1:] or a.dtype != w.dtype):
            raise ValueError(f"{op}: {name} expected one expert of w, {w.dtype}"
                             f"{list(w.shape[1:])}, got {a.dtype}{list(a.shape)}")


def _check(x, w, w_up, block_expert, row_token, swiglu, num_tokens, config, shared_blocks):
    op = "grouped_matmul"
    try:  # a Python or NumPy int, not a bool
        count = -1 if isinstance(shared_blocks, bool) else operator.index(shared_blocks)
    except TypeError:
        count = -1
    if count < 0:
        raise ValueError(f"{op}: shared_blocks expected an int >= 0, got {shared_blocks!r}")
    K = w.shape[1] if w.ndim == 3 else None
    if (num_tokens is not None) != (swiglu and row_token is not None):
        raise ValueError(f"{op}: num_tokens goes with swiglu and row_token (the real rows), got "
                         f"num_tokens={num_tokens}, swiglu={swiglu}, row_token "
                         f"{'given' if row_token is not None else 'None'}")
    if num_tokens is not None and (not isinstance(num_tokens, int) or num_tokens < 1):
        raise ValueError(f"{op}: num_tokens expected an int >= 1 (the gated call's tokens), got "
                         f"{num_tokens!r}")
    if swiglu:
        if w_up is not None:
            raise ValueError(f"{op}: swiglu's x holds the gated call's rows: w_up expected None")
        if x.ndim != 3 or w.ndim != 3 or x.shape[2] != 2 * K or x.dtype != _F32:
            raise ValueError(f"{op}: swiglu: x expected fp32 [S, rows, 2K] partial sums and w "
                             f"[E, K, N], got x {x.dtype}{list(x.shape)} and w{list(w.shape)}")
    elif w.ndim != 3 or x.ndim != 2 or x.shape[1] != K:
        raise ValueError(f"{op}: x [rows, K] and w [E, K, N] expected, got x{list(x.shape)} and "
                         f"w{list(w.shape)}")
    if w_up is not None and w_up.shape != w.shape:
        raise ValueError(f"{op}: w_up expected w's shape {list(w.shape)}, got {list(w_up.shape)}")
    if swiglu:  # x is fp32 sums: w's dtype is the compute dtype
        if jnp.dtype(w.dtype) not in MOE_DTYPES:
            raise ValueError(f"{op}: w expected one of {[str(d) for d in MOE_DTYPES]}, got "
                             f"{w.dtype}")
    else:
        for name, a in (("w", w), ("w_up", w_up)):
            if a is not None and a.dtype != x.dtype:
                raise ValueError(f"{op}: {name} expected x's dtype {x.dtype}, got {a.dtype}")
        if jnp.dtype(x.dtype) not in MOE_DTYPES:
            raise ValueError(f"{op}: x expected one of {[str(d) for d in MOE_DTYPES]}, got "
                             f"{x.dtype}")
    if block_expert.ndim != 1 or block_expert.dtype != jnp.int32:
        raise ValueError(f"{op}: block_expert expected int32 [G], got {block_expert.dtype}"
                         f"{list(block_expert.shape)}")
    rows = (block_expert.shape[0] + shared_blocks) * config.block_m
    if row_token is not None:
        if row_token.shape != (rows,) or row_token.dtype != jnp.int32:
            raise ValueError(f"{op}: row_token expected int32 [G * block_m] = [{rows}], got "
                             f"{row_token.dtype}{list(row_token.shape)}")
    if (row_token is None or swiglu) and x.shape[-2] != rows:
        less = " - shared_blocks" if shared_blocks else ""
        raise ValueError(f"{op}: block_expert expected int32 [rows / block_m{less}] = "
                         f"[{x.shape[-2] // config.block_m - shared_blocks}], got "
                         f"{block_expert.dtype}{list(block_expert.shape)}")
    why = config.misfit(w.shape[1], w.shape[2])
    if why:
        raise ValueError(f"{op}: w{list(w.shape)}: {why}")
