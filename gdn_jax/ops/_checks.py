"""Argument checks for the ops: run at trace time, before anything is computed.

Every failure is a ValueError naming the op, the argument, what was expected and what was given.
Shapes and dtypes are static, so they are always checked; slot and count values are data, so they
are checked only where concrete (an eager call): under jit a bad value cannot raise.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from gdn_jax import _compat
from gdn_jax.kernels import Dims
from gdn_jax.ops.state import INPUT_DTYPES, POOL_DTYPES, GDNState

_MIN_HEAD_DIM, _MAX_HEAD_DIM = 16, 256


def fail(op: str, arg: str, expected: str, given) -> None:
    raise ValueError(f"{op}: {arg} expected {expected}, got {given}")


def _shape(x):
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _dtype(x):
    return jnp.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


def _check_shape(op, arg, x, expected: tuple, names: str):
    if _shape(x) != tuple(expected):
        fail(op, arg, f"shape {names} = {tuple(expected)}", f"shape {_shape(x)}")


def _check_rank(op, arg, x, rank: int, names: str):
    if len(_shape(x)) != rank:
        fail(op, arg, f"rank {rank} {names}", f"shape {_shape(x)}")


def _check_head_dim(op, arg, d: int):
    if d < _MIN_HEAD_DIM or d > _MAX_HEAD_DIM or d & (d - 1):
        fail(op, arg, f"a power of two in [{_MIN_HEAD_DIM}, {_MAX_HEAD_DIM}]", d)


def _check_float(op, arg, x, allowed=None):
    dt = _dtype(x)
    if allowed is not None:
        if dt not in allowed:
            fail(op, arg, f"dtype in {[str(d) for d in allowed]}", f"dtype {dt}")
    elif not jnp.issubdtype(dt, jnp.floating):
        fail(op, arg, "a floating dtype", f"dtype {dt}")


def check_state(op: str, state, *, H=None, HV=None, K=None, V=None) -> None:
    """The state is a GDNState whose buffers agree with each other (and with the inputs' dims)."""
    if not isinstance(state, GDNState):
        fail(op, "state", "a GDNState", type(state).__name__)
    pool = state.pool
    _check_rank(op, "state.pool", pool, 4, "[num_slots, HV, V, K]")
    S, hv, v, k = _shape(pool)
    if _dtype(pool) not in POOL_DTYPES:
        fail(op, "state.pool", "dtype bfloat16 or float32", f"dtype {_dtype(pool)}")
    for name, want, got in (("HV", HV, hv), ("V", V, v), ("K", K, k)):
        if want is not None and want != got:
            fail(op, "state.pool", f"{name} = {want} from the inputs ([num_slots, HV, V, K])",
                 f"shape {_shape(pool)}")
    _check_rank(op, "state.cand_k", state.cand_k, 4, "[num_slots, T_max, H, K]")
    Tm, h = _shape(state.cand_k)[1], _shape(state.cand_k)[2]
    if H is not None and h != H:
        fail(op, "state.cand_k", f"H = {H} from the inputs ([num_slots, T_max, H, K])",
             f"shape {_shape(state.cand_k)}")
    _check_shape(op, "state.cand_k", state.cand_k, (S, Tm, h, k), "[num_slots, T_max, H, K]")
    _check_shape(op, "state.cand_v", state.cand_v, (S, Tm, hv, v), "[num_slots, T_max, HV, V]")
    _check_shape(op, "state.cand_g", state.cand_g, (S, Tm, hv), "[num_slots, T_max, HV]")
    _check_shape(op, "state.cand_beta", state.cand_beta, (S, Tm, hv), "[num_slots, T_max, HV]")
    _check_shape(op, "state.count", state.count, (S,), "[num_slots]")
    for name in ("cand_g", "cand_beta") + (("cand_v",) if state.commit_mode == "ring" else ()):
        if _dtype(getattr(state, name)) != jnp.float32:
            fail(op, f"state.{name}", "dtype float32" + " (ring mode: the corrected values u)" * (
                name == "cand_v"), f"dtype {_dtype(getattr(state, name))}")
    if _dtype(state.count) != jnp.int32:
        fail(op, "state.count", "dtype int32", f"dtype {_dtype(state.count)}")


def batch_size(op: str, slots) -> int:
    """B from a [B] slots array."""
    _check_rank(op, "slots", slots, 1, "[B]")
    return _shape(slots)[0]


def check_slots(op: str, slots, B: int, num_slots: int) -> None:
    """slots: [B] integers; duplicates among real slots raise when the values are concrete."""
    _check_shape(op, "slots", slots, (B,), "[B]")
    if not jnp.issubdtype(_dtype(slots), jnp.integer):
        fail(op, "slots", "an integer dtype (int32)", f"dtype {_dtype(slots)}")
    values = _compat.concrete_value(slots)
    if values is not None:
        real = values[(values >= 0) & (values < num_slots)]
        uniq, counts = np.unique(real, return_counts=True)
        if (counts > 1).any():
            fail(op, "slots", "distinct slots for distinct rows (padding slots may repeat)",
                 f"slot(s) {uniq[counts > 1].tolist()} named more than once")


def check_counts(op: str, arg: str, x, B: int, lo: int, hi: int) -> None:
    """x: [B] integers in lo..hi (values checked when concrete)."""
    _check_shape(op, arg, x, (B,), "[B]")
    if not jnp.issubdtype(_dtype(x), jnp.integer):
        fail(op, arg, "an integer dtype (int32)", f"dtype {_dtype(x)}")
    values = _compat.concrete_value(x)
    if values is not None and ((values < lo) | (values > hi)).any():
        fail(op, arg, f"values in {lo}..{hi}", values.tolist())


def check_tokens(op: str, q, k, v, a, b, A_log, dt_bias, state, slots, *, t_min: int = 1,
                 t_max: int | None = None) -> Dims:
    """Check the token inputs of decode / verify / prefill against each other and the state."""
    _check_rank(op, "q", q, 4, "[B, T, H, K]")
    B, T, H, K = _shape(q)
    _check_shape(op, "k", k, (B, T, H, K), "[B, T, H, K]")
    _check_rank(op, "v", v, 4, "[B, T, HV, V]")
    if _shape(v)[:2] != (B, T):
        fail(op, "v", f"shape [B, T, HV, V] with B, T = {(B, T)} (from q)", f"shape {_shape(v)}")
    HV, V = _shape(v)[2:]
    if HV % H:
        fail(op, "v", f"HV (v.shape[2]) a multiple of H = {H} (q.shape[2])", f"HV = {HV}")
    _check_head_dim(op, "K (q.shape[3])", K)
    _check_head_dim(op, "V (v.shape[3])", V)
    _check_shape(op, "a", a, (B, T, HV), "[B, T, HV]")
    _check_shape(op, "b", b, (B, T, HV), "[B, T, HV]")
    _check_shape(op, "A_log", A_log, (HV,), "[HV]")
    _check_shape(op, "dt_bias", dt_bias, (HV,), "[HV]")
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_float(op, name, x, INPUT_DTYPES)
    if not (_dtype(q) == _dtype(k) == _dtype(v)):
        fail(op, "q, k, v", "one dtype", f"{_dtype(q)}, {_dtype(k)}, {_dtype(v)}")
    for name, x in (("a", a), ("b", b), ("A_log", A_log), ("dt_bias", dt_bias)):
        _check_float(op, name, x)
    check_state(op, state, H=H, HV=HV, K=K, V=V)
    if T < t_min or (t_max is not None and T > t_max):
        # Name where the bound comes from: decode's single token is the op's own limit, not the
        # state's T_max (which only bounds verify).
        if t_max is None:
            expected = f"{t_min} or more"
        elif t_min == t_max == 1:
            expected = f"{t_max} ({op} takes one token per row; verify takes 1..{state.t_max}, " \
                       "the state's T_max)"
        else:
            expected = f"{t_min}..{t_max}" + (" (the state's T_max)"
                                              if t_max == state.t_max else "")
        fail(op, "T (q.shape[1])", expected, T)
    check_slots(op, slots, B, state.num_slots)
    return Dims(B, T, H, HV, K, V, state.num_slots, state.t_max)
