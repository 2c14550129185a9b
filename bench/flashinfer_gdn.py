"""FlashInfer's GDN kernels beside ours: its bf16-state decode, MTP verify and ring verify, from torch.

For bench/ncu_kernels.py --flashinfer, on the GPU runner (SM90+; FlashInfer's CuTe DSL kernels need
K = V = 128 and a bf16 state). FlashInfer is carried there by bench/flashinfer_carry.py; nothing of it
is imported by gdn_jax. The three entry points are the modules sglang calls:

  decode        flashinfer.gdn_kernels.gdn_decode_bf16_state.gated_delta_rule (T = 1; the path
                gdn_decode.gated_delta_rule_decode_pretranspose takes for a bf16 K = V = 128 pool)
  intermediate  ...gdn_decode_bf16_state.gated_delta_rule_mtp with an intermediate-states buffer
                [B, T, HV, V, K] bf16 and disable_state_update=True (sglang's verify)
  ring          ...gdn_decode_bf16_wy_ucache_flush.gated_delta_rule_mtp_ucache_flush: the WY-form
                verify against the checkpoint state plus a 32-slot ring of (normalised k, corrected
                u, cumulative log decay) per slot; rows whose ring holds >= flush_min (13 at T = 4)
                tokens fold it into the state in the same launch. Cursor commits are the caller's.

`check_against_oracle` runs all three on one shape against tests/oracle.py (float64 loops, no shared
code with gdn_jax or FlashInfer) before anything is timed. FlashInfer maps slot -1 to slot 0, so no
padding rows are used here.
"""

from __future__ import annotations

import os
import sys

import numpy as np

H, HV, K, V = 16, 32, 128, 128
RING_SLOTS = 32  # FlashInfer's ring rows per slot (the window it reads is <= 16 of them)


def why_unavailable() -> str | None:
    """None when FlashInfer's GDN kernels import and a SM90+ GPU is there, else why not."""
    try:
        import torch

        if not torch.cuda.is_available():
            return "torch sees no CUDA device"
        if torch.cuda.get_device_capability()[0] < 9:
            return f"needs SM90+, found {torch.cuda.get_device_capability()}"
        _modules()
    except Exception as e:  # noqa: BLE001 - report any import failure as the reason
        return f"{type(e).__name__}: {str(e)[:300]}"
    return None


def _modules():
    from flashinfer.gdn_kernels import gdn_decode_bf16_state as bf16_state
    from flashinfer.gdn_kernels import gdn_decode_bf16_wy_ucache_flush as ring

    return bf16_state, ring


def tokens(B, T, seed=0, device="cuda"):
    """Fresh random bf16 q, k [B, T, H, K], v [B, T, HV, V], a, b [B, T, HV]; fp32 A_log, dt_bias [HV]."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    bf = lambda x: x.to(device=device, dtype=torch.bfloat16)
    return dict(q=bf(r(B, T, H, K)), k=bf(r(B, T, H, K)), v=bf(r(B, T, HV, V)), a=bf(r(B, T, HV)),
                b=bf(r(B, T, HV)),
                A_log=(torch.rand(HV, generator=g) * 3.5 - 3.0).to(device),  # U(-3, 0.5), as ours
                dt_bias=r(HV).to(device))


def decode(x, pool, slots):
    """One token per row; pool [P, HV, V, K] bf16 updated in place. Returns o [B, 1, HV, V] bf16."""
    bf16_state, _ = _modules()
    return bf16_state.gated_delta_rule(x["A_log"], x["a"], x["dt_bias"], q=x["q"], k=x["k"],
                                       v=x["v"], b=x["b"], initial_state_source=pool,
                                       initial_state_indices=slots)


def intermediate(x, pool, slots, inter):
    """T tokens, the pool only read; inter [B, T, HV, V, K] bf16 gets the state after each token."""
    bf16_state, _ = _modules()
    return bf16_state.gated_delta_rule_mtp(x["A_log"], x["a"], x["dt_bias"], q=x["q"], k=x["k"],
                                           v=x["v"], b=x["b"], initial_state_source=pool,
                                           initial_state_indices=slots,
                                           intermediate_states_buffer=inter,
                                           disable_state_update=True)


def new_ring(P, device="cuda"):
    """Zeroed ring tensors for a pool of P slots (FlashInfer requires zero at allocation)."""
    import torch

    return dict(k_cache=torch.zeros(P, H, RING_SLOTS, K, dtype=torch.bfloat16, device=device),
                u_cache=torch.zeros(P, HV, RING_SLOTS, V, dtype=torch.bfloat16, device=device),
                g_cache=torch.zeros(P, HV, RING_SLOTS, dtype=torch.float32, device=device))


def ring_verify(x, pool, slots, rings, hist_len, cache_base, flush_min=None):
    """T in {4, 8} tokens against the checkpoint pool[slot] plus the ring window
    [cache_base, cache_base + hist_len) mod 32; rows with hist_len >= flush_min fold the window into
    the pool first. The T new entries go after the window; hist_len and cache_base are not moved."""
    _, ring = _modules()
    return ring.gated_delta_rule_mtp_ucache_flush(
        x["A_log"], x["a"], x["dt_bias"], q=x["q"], k=x["k"], v=x["v"], b=x["b"],
        initial_state_source=pool, initial_state_indices=slots, hist_len=hist_len,
        cache_base=cache_base, flush_min=flush_min, restart_hist_on_flush=False, **rings)


def fill_ring(rings, hist_len, cache_base, slots, seed=0):
    """Plausible ring contents for timing (never zeros): unit keys, small corrections, cumulative
    log decays falling by 0.05 a token from each row's cache_base."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    kc, uc, gc = rings["k_cache"], rings["u_cache"], rings["g_cache"]
    k = torch.randn(kc.shape, generator=g)
    kc.copy_((k / k.norm(dim=-1, keepdim=True)).to(kc.dtype))
    uc.copy_((0.1 * torch.randn(uc.shape, generator=g)).to(uc.dtype))
    pos = (torch.arange(RING_SLOTS)[None, :] - cache_base.cpu()[:, None]) % RING_SLOTS  # [B, 32]
    cum = -0.05 * (pos + 1).float()
    gc.zero_()
    gc[slots.long()] = cum[:, None, :].expand(-1, HV, -1).to(gc.device)


def _oracle():
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.join(os.path.dirname(here), "tests"))
    import oracle

    return oracle


def _sync(device):
    import torch

    if device != "cpu":
        torch.cuda.synchronize()


def _row(x, i):
    """Row i of a tokens() dict (the per-head A_log and dt_bias as they are)."""
    return {key: val[i] if val.ndim > 1 else val for key, val in x.items()}


def _np(t):
    return t.float().cpu().numpy().astype(np.float64)


def check_against_oracle(B=4, seed=0, tol_o=2e-2, tol_state=1e-2, device="cuda"):
    """All three entry points against the float64 oracle on fresh random inputs, outputs poisoned
    (NaN) first. Errors are max |diff| / max |ref|. Bounds: the pool and the outputs are bf16
    (2^-9 relative rounding each), FlashInfer rounds the normalised q and k to bf16 for its tensor
    core products (ring) and uses approximate exp/rsqrt, so a few bf16 ulps: 1e-2 on states,
    2e-2 on o. Raises AssertionError past them; returns the errors."""
    import torch

    orc = _oracle()
    dev = device
    P = B + 3
    slots = torch.tensor(np.random.default_rng(seed).permutation(P)[:B], dtype=torch.int32,
                         device=dev)
    rel = lambda a, r: float(np.max(np.abs(a - r)) / np.max(np.abs(r)))
    out = {}

    def ref(S, calls):
        """calls: [(row's tokens, n)] in order, n = tokens kept (None: all). The last call's o."""
        for x, n in calls:
            g, beta = orc.gates(_np(x["a"]), _np(x["b"]), _np(x["A_log"]), _np(x["dt_bias"]))
            q, k, v = (_np(x[key])[:n] for key in "qkv")
            o, S, states = orc.run(S, q, k, v, g[:n], beta[:n])
        return o, S, states

    def fresh_pool():
        return (0.3 * torch.randn(P, HV, V, K, device=dev)).to(torch.bfloat16)

    # decode: o and the updated slots; other slots bit-identical
    pool = fresh_pool()
    before = pool.clone()
    x = tokens(B, 1, seed + 1, dev)
    o = decode(x, pool, slots)
    _sync(dev)
    eo, es = [], []
    for i in range(B):
        xi = _row(x, i)
        o_ref, S_ref, _ = ref(_np(before[slots[i]]), [(xi, None)])
        eo.append(rel(_np(o[i]), o_ref))
        es.append(rel(_np(pool[slots[i]]), S_ref))
    untouched = [s for s in range(P) if s not in slots.tolist()]
    assert torch.equal(pool[untouched], before[untouched]), "decode wrote a slot it was not given"
    out["decode"] = dict(o_err=max(eo), state_err=max(es))

    # intermediate T = 4: o, each token's state; the pool unchanged
    pool = fresh_pool()
    before = pool.clone()
    x = tokens(B, 4, seed + 2, dev)
    inter = torch.full((B, 4, HV, V, K), float("nan"), dtype=torch.bfloat16, device=dev)
    o = intermediate(x, pool, slots, inter)
    _sync(dev)
    eo, es = [], []
    for i in range(B):
        xi = _row(x, i)
        o_ref, _, states = ref(_np(before[slots[i]]), [(xi, None)])
        eo.append(rel(_np(o[i]), o_ref))
        es.append(rel(_np(inter[i]), states))
    assert torch.equal(pool, before), "intermediate verify wrote the pool"
    out["intermediate"] = dict(o_err=max(eo), state_err=max(es))

    # ring: three verify calls with caller-side commits of n accepted tokens, the third folding
    pool = fresh_pool()
    S0 = pool.clone()
    rings = new_ring(P, dev)
    hist = torch.zeros(B, dtype=torch.int32, device=dev)
    base = torch.zeros(B, dtype=torch.int32, device=dev)
    rng = np.random.default_rng(seed + 3)
    xs = [tokens(B, 4, seed + 10 + c, dev) for c in range(3)]
    acc = [rng.integers(1, 5, B) for _ in range(2)]
    eo = []
    for c in range(3):
        fold = c == 2
        o = ring_verify(xs[c], pool, slots, rings, hist, base, flush_min=1 if fold else None)
        _sync(dev)
        for i in range(B):
            seq = [(_row(xs[j], i), int(acc[j][i])) for j in range(c)]
            xi = _row(xs[c], i)
            o_ref, _, _ = ref(_np(S0[slots[i]]), seq + [(xi, None)])
            eo.append(rel(_np(o[i]), o_ref))
        if c < 2:
            hist += torch.as_tensor(acc[c], dtype=torch.int32, device=dev)
    es = []
    for i in range(B):  # after the fold the pool holds the committed tokens of calls 0 and 1
        seq = [(_row(xs[j], i), int(acc[j][i])) for j in range(2)]
        _, S_ref, _ = ref(_np(S0[slots[i]]), seq)
        es.append(rel(_np(pool[slots[i]]), S_ref))
    out["ring"] = dict(o_err=max(eo), state_err=max(es), accepted=[a.tolist() for a in acc])
    out.update(B=B, tol_o=tol_o, tol_state=tol_state)
    for name in ("decode", "intermediate", "ring"):
        e = out[name]
        assert e["o_err"] < tol_o and e["state_err"] < tol_state, (name, out)
    return out
