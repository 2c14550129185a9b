"""Random inputs and states for the op tests, and the oracle applied to a slot pool.

Everything is random (never zeros) and drawn from a seeded NumPy generator. Each array is made in
its storage dtype first; the oracle then sees exactly those (rounded) values as float64.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

import oracle
from gdn_jax.ops import GDNState

BF16_EPS = 2.0 ** -8  # bf16 unit roundoff (8 significand bits): one rounding is <= eps / 2 relative


def f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


@dataclasses.dataclass
class Tokens:
    q: jnp.ndarray  # [B, T, H, K]
    k: jnp.ndarray  # [B, T, H, K]
    v: jnp.ndarray  # [B, T, HV, V]
    a: jnp.ndarray  # [B, T, HV]
    b: jnp.ndarray  # [B, T, HV]
    A_log: jnp.ndarray  # [HV] fp32
    dt_bias: jnp.ndarray  # [HV] fp32

    def args(self):
        return (self.q, self.k, self.v, self.a, self.b, self.A_log, self.dt_bias)

    def gates64(self):
        return oracle.gates(f64(self.a), f64(self.b), f64(self.A_log), f64(self.dt_bias))


def tokens(rng, B, T, H, HV, K, V, dtype=jnp.float32, A_log=None, dt_bias=None) -> Tokens:
    n = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype)
    if A_log is None:
        A_log = jnp.asarray(rng.uniform(-3.0, 0.5, HV), jnp.float32)
        dt_bias = jnp.asarray(rng.standard_normal(HV), jnp.float32)
    return Tokens(n(B, T, H, K), n(B, T, H, K), n(B, T, HV, V), n(B, T, HV), n(B, T, HV),
                  A_log, dt_bias)


def random_state(rng, num_slots, H, HV, K, V, t_max, dtype=jnp.float32,
                 input_dtype=jnp.float32) -> GDNState:
    """A state with every buffer random: pool, candidates (valid gates) and counts in 0..t_max."""
    st = GDNState.create(num_slots, H, HV, K, V, t_max, dtype=dtype, input_dtype=input_dtype)
    cand = tokens(rng, num_slots, t_max, H, HV, K, V, input_dtype)
    g, beta = cand.gates64()
    return st.replace(
        pool=jnp.asarray(0.5 * rng.standard_normal(st.pool.shape), jnp.float32).astype(dtype),
        cand_k=cand.k, cand_v=cand.v,
        cand_g=jnp.asarray(g, jnp.float32), cand_beta=jnp.asarray(beta, jnp.float32),
        count=jnp.asarray(rng.integers(0, t_max + 1, num_slots), jnp.int32),
    )


def slot_batch(rng, B_real, num_slots):
    """Distinct real slots in random order, plus one negative and one out-of-range padding row."""
    real = rng.permutation(num_slots)[:B_real]
    slots = np.concatenate([real, [-1, num_slots + 3]])
    order = rng.permutation(len(slots))
    return jnp.asarray(slots[order], jnp.int32)


class OraclePool:
    """float64 mirror of a GDNState, driven token by token through the oracle."""

    def __init__(self, state: GDNState):
        self.pool = f64(state.pool)
        self.cand_k, self.cand_v = f64(state.cand_k), f64(state.cand_v)
        self.cand_g, self.cand_beta = f64(state.cand_g), f64(state.cand_beta)
        self.count = np.asarray(state.count).copy()

    def folded(self, slot):
        n = self.count[slot]
        _, S, _ = oracle.run(self.pool[slot], self.cand_k[slot, :n], self.cand_k[slot, :n],
                             self.cand_v[slot, :n], self.cand_g[slot, :n], self.cand_beta[slot, :n])
        return S

    def run(self, slot, tok: Tokens, row, length=None):
        """Fold pending, then the row's tokens: (o [T, HV, V], states [T, HV, V, K], S0)."""
        T = tok.q.shape[1] if length is None else length
        g, beta = tok.gates64()
        S0 = self.folded(slot)
        o, S, states = oracle.run(S0, f64(tok.q[row, :T]), f64(tok.k[row, :T]),
                                  f64(tok.v[row, :T]), g[row, :T], beta[row, :T])
        return o, S, states, S0


class RingMirror:
    """float64 mirror of a ring-mode GDNState."""

    def __init__(self, st: GDNState):
        self.W = st.ring_size
        self.true = f64(st.pool).copy()   # the state with the committed ring tokens applied
        self.pool = f64(st.pool).copy()   # what the pool holds (the state at the last fold)
        self.count = np.asarray(st.count).astype(int)
        assert not self.count.any(), "the mirror starts from an empty ring"
        self.pending = {}                 # slot -> states after each of the last call's tokens

    def call(self, slot, tok, row, reserve, decode=False):
        """A verify (or decode) on `slot`: (o [T, HV, V] float64, folded: bool)."""
        folded = self.count[slot] + reserve > self.W
        if folded:
            if self.count[slot]:
                self.pool[slot] = self.true[slot]
            self.count[slot] = 0
        g, beta = tok.gates64()
        o, S, states = oracle.run(self.true[slot], f64(tok.q[row]), f64(tok.k[row]),
                                  f64(tok.v[row]), g[row], beta[row])
        if decode:
            self.true[slot], self.count[slot] = S, self.count[slot] + 1
        else:
            self.pending[slot] = states
        return o, folded

    def commit(self, slot, n):
        if n:
            self.true[slot] = self.pending[slot][n - 1]
        self.count[slot] += n


def real_rows(slots, num_slots):
    """[(row, slot)] of the rows whose slot is real (0 <= slot < num_slots)."""
    return [(i, int(s)) for i, s in enumerate(np.asarray(slots)) if 0 <= s < num_slots]


STATE_FIELDS = ("pool", "cand_k", "cand_v", "cand_g", "cand_beta", "count")


def assert_untouched(before, after, slots, num_slots, fields=STATE_FIELDS):
    """Every slot no real row of `slots` names is bit-identical in each field of the state."""
    used = {s for _, s in real_rows(slots, num_slots)}
    other = [s for s in range(num_slots) if s not in used]
    for name in fields:
        x, y = np.asarray(getattr(before, name)), np.asarray(getattr(after, name))
        np.testing.assert_array_equal(x[other], y[other], err_msg=f"{name} of an unnamed slot")


def rel_err(x, ref):
    """max |x - ref| / max |ref|: the normwise relative error the tolerances are stated in."""
    x, ref = f64(x), np.asarray(ref, np.float64)
    scale = np.max(np.abs(ref))
    return float(np.max(np.abs(x - ref)) / (scale if scale > 0 else 1.0))
