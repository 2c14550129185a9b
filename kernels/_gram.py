"""The "gram" form of a verify call: every reduction against the loaded state S0 in one product.

The sequential form (`_recurrence.py`) runs n = P + T dependent token steps, each a reduction
over K, a rank-1 update and, for new tokens, a second reduction. Unrolling the recurrence from
the state S0 the program loaded (DESIGN.md's per-token rule; G_j = g_1 + ... + g_j, G_0 = 0,
r(j, i) = exp(G_j - G_i) <= 1 for i <= j):

    u_j = beta_j * (v_j - exp(G_j) S0 k_j - sum_{i<j} r(j,i) (k_i . k_j) u_i)
    o_j = exp(G_j) S0 q_j + sum_{i<=j} r(j,i) (k_i . q_j) u_i
    S_m = exp(G_m) S0 + sum_{i<=m} r(m,i) u_i k_i^T

(by induction: exp(g_j) S_{j-1} = exp(G_j) S0 + sum_{i<j} r(j,i) u_i k_i^T, which is what the
sequential step multiplies by k_j and q_j.) So S0 meets the tokens only in W = X S0^T (one
[NP, K] x [K, BV] product for all k's and q's), the in-chunk interactions are [NP, NP] scalars,
and a state is S0 scaled plus one [BV, NP] x [NP, K] product.

Rows of a chunk (NP >= 16, a power of two: Triton's `dot` wants 2-D operands >= 16):

    rows [0, T)               q of the T new tokens (prepared: l2norm, * K**-0.5)
    rows [T, T + P)           k of the P = T_max pending candidate slots (l2norm); slots at or
                              past count[slot] are identity steps: k = v = g = beta = 0
    rows [T + P, 2T + P)      k of the T new tokens
    rows beyond               zero

`tok[r]` is the row's token position (0..P+T-1; a q row carries the position of its token, so
q row t and k row T + P + t share tok = P + t). The q rows first make the outputs rows 0..T-1.

The triangular solve for u: with M[r, i] = r(r, i) (x_r . k_i) on the pairs (k column i, token
tok[i] < tok[r] for a k row r, <= tok[r] for a q row r), and N = -diag(beta) M (strictly lower:
only k rows have beta != 0, and their columns come earlier), (I - N) U = diag(beta) (V - e W)
with U's rows the u_j. N is nilpotent (N^n = 0 for n k rows), so
(I - N)^-1 = (I + N)(I + N^2)(I + N^4)... with ceil(log2 n) factors: small products only.
Then Y = e W + M U holds o_t in its q rows (and v_j - u_j / beta_j in its k rows).

Numerics: every exponent is G_r - G_i <= 0 or G_r <= 0 (g <= 0), so nothing overflows; strong
decays underflow to exact zeros. Masked-out pairs take exp(0) and are then zeroed.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32
HIGHEST = lax.Precision.HIGHEST
DEFAULT = lax.Precision.DEFAULT
MIN_ROWS = 16  # Triton's dot: every dimension >= 16


def num_rows(T: int, t_max: int) -> int:
    """NP: q rows + pending k rows + new k rows, padded to a power of two >= 16."""
    n = 2 * T + t_max
    return max(MIN_ROWS, 1 << (n - 1).bit_length())


def state_precision(pool_dtype, out_dtype):
    """Precision of the two products that touch the state: W = X S0^T and the state update.

    TF32 (DEFAULT on the GPU) rounds each operand to 11 significant bits (relative 2**-11):
    S0 loaded from a bf16 pool is exact in TF32, so only the prepared k / q rows and u are
    rounded, and the result carries a relative error of order 2**-11 -- four times below bf16's
    own rounding (2**-9 relative, the stored result's one-ulp tolerance is 2**-7). That holds
    only where everything the call returns is bf16: the state (pool dtype) and o (q's dtype).
    Anything in fp32 (or fp16, 2**-11 itself) must match to ~1e-5, which TF32 breaks
    (pallas-gpu.md section 10: 8.5e-4), so it gets HIGHEST (IEEE fp32).
    """
    bf16 = jnp.dtype(jnp.bfloat16)
    if jnp.dtype(pool_dtype) == bf16 and jnp.dtype(out_dtype) == bf16:
        return DEFAULT
    return HIGHEST


def _dot(a, b, precision, *, contract=(1, 0)):
    """2-D product in fp32, contracting a's dim contract[0] with b's dim contract[1]."""
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                           precision=precision, preferred_element_type=_F32)


class Layout(NamedTuple):
    """The static row structure of a chunk, as [NP] arrays (iota-built inside a kernel)."""

    tok: object   # int32: token position of the row (q rows: their token's)
    is_q: object  # bool
    is_k: object  # bool (pending and new k rows)
    is_p: object  # bool (pending k rows)
    is_n: object  # bool (new k rows)


def layout(T: int, t_max: int, NP: int) -> Layout:
    rows = jnp.arange(NP, dtype=jnp.int32)
    is_q = rows < T
    is_p = (rows >= T) & (rows < T + t_max)
    is_n = (rows >= T + t_max) & (rows < 2 * T + t_max)
    tok = jnp.where(is_q, rows + t_max, rows - T)
    return Layout(tok, is_q, is_p | is_n, is_p, is_n)


def prepare_rows(X_raw, lay: Layout):
    """Raw rows [NP, K] (zeros where unused) -> q rows l2-normalised and scaled by K**-0.5, k rows
    l2-normalised (DESIGN.md; the same rsqrt(sum + 1e-6) as `_recurrence.l2norm`)."""
    K = X_raw.shape[-1]
    inv = lax.rsqrt(jnp.sum(X_raw * X_raw, axis=1) + 1e-6)
    inv = jnp.where(lay.is_q, inv * (K ** -0.5), inv)
    return X_raw * inv[:, None]


def cumulative_decay(g, lay: Layout):
    """G [NP]: G[r] = sum of g over the k rows whose token is at or before the row's token."""
    upto = lay.is_k[None, :] & (lay.tok[None, :] <= lay.tok[:, None])
    return jnp.sum(jnp.where(upto, g[None, :], 0.0), axis=1)


def interactions(X, G, lay: Layout):
    """M [NP, NP]: M[r, i] = exp(G_r - G_i) (x_r . k_i) for k columns i strictly before a k row r,
    or at or before a q row r; zero elsewhere. The gram product is tiny: always IEEE fp32."""
    gram = _dot(X, X, HIGHEST, contract=(1, 1))
    lim = lay.tok + lay.is_q.astype(jnp.int32)           # q rows include their own token
    pair = lay.is_k[None, :] & (lay.tok[None, :] < lim[:, None])
    decay = jnp.exp(jnp.where(pair, G[:, None] - G[None, :], 0.0))
    return jnp.where(pair, decay * gram, 0.0)


def unit_lower_inverse(N, n_factors: int):
    """(I - N)^-1 = sum_k N^k for a nilpotent N with N^(2**n_factors) = 0, as the product
    (I + N)(I + N^2)(I + N^4)... of n_factors factors (IEEE fp32 [NP, NP] products)."""
    NP = N.shape[0]
    eye = (jnp.arange(NP)[:, None] == jnp.arange(NP)[None, :]).astype(_F32)
    inv, P = eye + N, N
    for _ in range(n_factors - 1):
        P = _dot(P, P, HIGHEST)
        inv = inv + _dot(inv, P, HIGHEST)
    return inv


def solve_factors(n_tokens: int) -> int:
    """Factors of `unit_lower_inverse` for n k rows: 2**f >= n (a chain has at most n - 1 links)."""
    return max(1, (n_tokens - 1).bit_length())


class Solved(NamedTuple):
    U: object   # [NP, BV]: u_j in k rows, zero elsewhere
    Y: object   # [NP, BV]: o_t in q row t
    G: object   # [NP]


def solve(S0, X, V, g, beta, lay: Layout, *, n_tokens: int, precision):
    """The chunk against the state S0 [BV, K] (fp32).

    X [NP, K] prepared rows, V [NP, BV] (v in k rows, zero elsewhere), g, beta [NP] (zero outside
    live k rows). `precision`: of W = X S0^T (see `state_precision`).
    """
    W = _dot(X, S0, precision, contract=(1, 1))           # [NP, BV]: S0 x_r for every row
    G = cumulative_decay(g, lay)
    e = jnp.exp(G)[:, None]
    M = interactions(X, G, lay)
    N = -beta[:, None] * M
    U = _dot(unit_lower_inverse(N, solve_factors(n_tokens)), beta[:, None] * (V - e * W),
             HIGHEST)
    Y = e * W + _dot(M, U, HIGHEST)
    return Solved(U, Y, G)


def state_after(S0, X, U, g, G, lay: Layout, last_tok, *, precision):
    """S_m [BV, K] after every k row with token <= last_tok (static or traced int):
    exp(G_m) S0 + sum_i exp(G_m - G_i) u_i k_i^T, as one [BV, NP] x [NP, K] product.
    g, G: the chunk's log decays and `Solved.G`."""
    upto = lay.is_k & (lay.tok <= last_tok)
    Gm = jnp.sum(jnp.where(upto, g, 0.0))
    c = jnp.where(upto, jnp.exp(jnp.where(upto, Gm - G, 0.0)), 0.0)
    return jnp.exp(Gm) * S0 + _dot(U * c[:, None], X, precision, contract=(0, 0))


def chunk_from_arrays(q_new, k_new, v_new, g_new, beta_new, k_pend, v_pend, g_pend, beta_pend,
                      count):
    """The chunk rows from plain arrays (tests; the kernels build the same rows with masked
    loads): raw q_new, k_new [T, K], v_new [T, BV], g_new, beta_new [T]; the T_max pending
    slots k_pend [P, K], v_pend [P, BV], g_pend, beta_pend [P], of which the first `count` are
    live. Returns (X prepared [NP, K], V [NP, BV], g [NP], beta [NP], Layout)."""
    T, K = q_new.shape
    P, BV = v_pend.shape
    NP = num_rows(T, P)
    lay = layout(T, P, NP)
    live = jnp.arange(P) < count
    pad = lambda x, n: jnp.zeros((n,) + x.shape[1:], _F32)
    zero_k = jnp.where(live[:, None], k_pend, 0.0)
    X = jnp.concatenate([q_new, zero_k, k_new, pad(q_new, NP - 2 * T - P)]).astype(_F32)
    V = jnp.concatenate([pad(v_new, T), jnp.where(live[:, None], v_pend, 0.0), v_new,
                         pad(v_new, NP - 2 * T - P)]).astype(_F32)
    z = jnp.zeros((T,), _F32)
    zt = jnp.zeros((NP - 2 * T - P,), _F32)
    g = jnp.concatenate([z, jnp.where(live, g_pend, 0.0), g_new, zt]).astype(_F32)
    beta = jnp.concatenate([z, jnp.where(live, beta_pend, 0.0), beta_new, zt]).astype(_F32)
    return prepare_rows(X, lay), V, g, beta, lay
