"""fla's fused_recurrent gated-delta-rule forward kernel (Triton), run from JAX through jax-triton.

The benchmark compares our Pallas kernels with fla's (fla-core 0.6.0). Called through torch, fla
runs in another framework with another timer; through `jax_triton.triton_call` the same Triton
kernel runs inside a jitted JAX program, beside ours (issue #4, "jax-triton").

On the GPU runner (jax 0.11.2, triton 3.6, jax-triton 0.3.1, fla-core 0.6.0 from .wheels):

    python -m pip install -q --no-deps .wheels/*.whl && python -m pip install -q --no-deps -e .
    python bench/fla_jax.py --cpu-checks --check             # config, lowering; vs the reference
    python bench/ncu_kernels.py --out $OUT --quick --fla --fla-jax --no-mosaic

(fla also imports `packaging`; einops comes from .wheels.)

On a CPU machine (no GPU: the jax-triton lowering still compiles the kernel to PTX for sm_90):

    python bench/fla_jax.py --cpu-checks

Why a wrapper kernel. `triton_call(*args, kernel=, out_shape=, **constexprs)` passes its positional
arguments (arrays, then Python scalars, in order) as the kernel's first parameters and appends one
pointer per output after them; constexprs go by name. fla's kernel cannot be called that way: its
output `o` sits between inputs (`..., dt_bias, o, h0, ht, cu_seqlens, scale, T`), and the pointers
we leave out (`gk`, `gv`, `cu_seqlens`: None) sit between arrays we pass. So we launch a small
@triton.jit kernel whose parameters are in triton_call's order (inputs, scalars, outputs,
constexprs) and whose body is one call of fla's kernel function (the JITFunction under its
@triton.heuristics): Triton inlines it, so the compiled code is fla's, with the same grid, BK/BV,
constexprs (the heuristics' values computed here, as fla's launcher would) and num_warps/stages.

Differences from fla's own launch that remain: jax-triton makes a scalar argument equal to 1 a
constexpr, so at T = 1 the token loop has a constant trip count (fla's launcher keeps T dynamic:
`do_not_specialize=['T']`); and jax-triton assumes every array is 16-byte aligned (torch tensors
from the caching allocator are, and fla's launcher then specialises the same way).
"""

import argparse
import functools
import math
import sys

# fla-core 0.6.0, fla/ops/gated_delta_rule/fused_recurrent.py, fused_recurrent_gated_delta_rule_fwd
FLA_NUM_WARPS, FLA_NUM_STAGES = 1, 3
KERNEL_NAME = "fused_recurrent_gated_delta_rule_fwd_jax"  # ncu's regex: gdn_|fused_recurrent


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def launch_config(B, T, H, HV, K, V, *, beta_headwise=True, use_g=True, use_gate_in_kernel=False,
                  has_dt_bias=False, use_initial_state=True, store_final_state=True,
                  use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False,
                  allow_neg_eigval=False, state_v_first=False):
    """What fla's launcher passes to its kernel, in pure Python (no triton, no GPU).

    Mirrors fused_recurrent_gated_delta_rule_fwd (fla-core 0.6.0) for fixed-length batches with
    no gk/gv/cu_seqlens: BK = next_pow2(K), BV = min(8, next_pow2(V)), grid = (cdiv(V, BV) * B *
    HV,), num_warps 1, num_stages 3; the constexprs include the heuristics' values.
    Returns dict(grid, num_warps, num_stages, constexprs) with every constexpr of fla's kernel.
    """
    if HV % H:
        raise ValueError(f"HV ({HV}) must be a multiple of H ({H})")
    BK = _next_power_of_2(K)
    BV = min(8, _next_power_of_2(V))  # gv is None (fla takes the whole V only for gv)
    NV = math.ceil(V / BV)
    constexprs = dict(
        H=H, HV=HV, K=K, V=V, BK=BK, BV=BV,
        # @triton.heuristics: from which pointers are None
        USE_G=use_g, USE_GK=False, USE_GV=False, USE_INITIAL_STATE=use_initial_state,
        STORE_FINAL_STATE=store_final_state, IS_VARLEN=False,
        USE_GATE_IN_KERNEL=use_gate_in_kernel, HAS_DT_BIAS=has_dt_bias,
        # the launcher's flags
        IS_BETA_HEADWISE=beta_headwise, USE_QK_L2NORM_IN_KERNEL=use_qk_l2norm_in_kernel,
        APPLY_BETA_SIGMOID=use_beta_sigmoid_in_kernel, ALLOW_NEG_EIGVAL=allow_neg_eigval,
        STATE_V_FIRST=state_v_first,
    )
    return dict(grid=(NV * B * HV,), num_warps=FLA_NUM_WARPS, num_stages=FLA_NUM_STAGES,
                constexprs=constexprs)


# Constexprs the wrapper takes; the rest (USE_GK, USE_GV, IS_VARLEN) it fixes to False.
_WRAPPER_CONSTEXPRS = ("H", "HV", "K", "V", "BK", "BV", "USE_G", "USE_QK_L2NORM_IN_KERNEL",
                       "IS_BETA_HEADWISE", "USE_INITIAL_STATE", "STORE_FINAL_STATE",
                       "STATE_V_FIRST", "USE_GATE_IN_KERNEL", "HAS_DT_BIAS", "APPLY_BETA_SIGMOID",
                       "ALLOW_NEG_EIGVAL")


def why_unavailable():
    """None when jax-triton and fla import, else a one-line reason."""
    for mod in ("jax_triton", "triton", "fla.ops.gated_delta_rule.fused_recurrent"):
        try:
            __import__(mod)
        except Exception as e:  # noqa: BLE001 - any import failure (jax without GPU support too)
            return f"{mod} not importable: {type(e).__name__}: {str(e).splitlines()[0][:150]}"
    return None


@functools.cache
def fla_kernel():
    """fla's @triton.heuristics-wrapped kernel (a triton.runtime.Heuristics), imported lazily."""
    from fla.ops.gated_delta_rule import fused_recurrent as fr

    return fr.fused_recurrent_gated_delta_rule_fwd_kernel


@functools.cache
def wrapper_kernel():
    """The @triton.jit kernel, in triton_call's parameter order, whose body is fla's kernel
    (bench/_fla_jax_kernel.py: a module of its own, since Triton resolves the names in a kernel's
    annotations and body from its module's globals, and triton/fla must import lazily here)."""
    import _fla_jax_kernel

    return _fla_jax_kernel.fused_recurrent_gated_delta_rule_fwd_jax


def fused_recurrent_gdn_jax(q, k, v, g, beta, *, A_log=None, dt_bias=None, scale=None,
                            initial_state=None, output_final_state=True,
                            use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False,
                            allow_neg_eigval=False, state_v_first=False, alias_state=False,
                            compute_capability=None):
    """fla's fused_recurrent_gated_delta_rule forward, from JAX (jit-able; no autodiff, no vmap).

    Same arguments and semantics as fla's `fused_recurrent_gated_delta_rule` (equal-length rows):
      q, k: [B, T, H, K]; v: [B, T, HV, V] (HV a multiple of H; value head hv reads key head
        hv // (HV // H)); any float dtype, read as fp32 in the kernel.
      g: [B, T, HV] log decay, or the raw gate input when A_log is given (the kernel then computes
        g = -exp(A_log) * softplus(g + dt_bias): fla's use_gate_in_kernel=True).
      beta: [B, T, HV] (or [B, T, HV, V]); raw logits when use_beta_sigmoid_in_kernel.
      A_log, dt_bias: [HV] or None; scale: defaults to K ** -0.5.
      initial_state: None (zeros) or [B, HV, V, K] if state_v_first else [B, HV, K, V], any float
        dtype.
      alias_state: write the final state over initial_state's buffer (input_output_aliases; only
        when initial_state is fp32 of the final state's shape: donate it under jit to avoid a copy).
      compute_capability: e.g. 90, for lowering without a GPU; None asks the device.
    Returns (o [B, T, HV, V] in v's dtype, final state fp32 in the state layout, or None).
    """
    import jax
    import jax.numpy as jnp
    import jax_triton as jt
    import numpy as np

    B, T, H, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    if q.shape != k.shape or v.shape[:2] != (B, T) or g.shape != (B, T, HV):
        raise ValueError(f"shapes: q {q.shape}, k {k.shape}, v {v.shape}, g {g.shape}")
    state_shape = (B, HV, V, K) if state_v_first else (B, HV, K, V)
    if initial_state is not None and initial_state.shape != state_shape:
        raise ValueError(f"initial_state {initial_state.shape}, expected {state_shape}")
    if allow_neg_eigval and not use_beta_sigmoid_in_kernel:
        raise ValueError("allow_neg_eigval requires use_beta_sigmoid_in_kernel (as in fla)")
    cfg = launch_config(B, T, H, HV, K, V, beta_headwise=beta.ndim != v.ndim,
                        use_gate_in_kernel=A_log is not None,
                        has_dt_bias=A_log is not None and dt_bias is not None,
                        use_initial_state=initial_state is not None,
                        store_final_state=output_final_state,
                        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                        use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
                        allow_neg_eigval=allow_neg_eigval, state_v_first=state_v_first)
    dummy = jnp.zeros((1,), jnp.float32)  # a pointer the kernel never dereferences (flag off)
    arrays = (q, k, v, g, beta, dummy if A_log is None else A_log,
              dummy if A_log is None or dt_bias is None else dt_bias,
              dummy if initial_state is None else initial_state)
    # fla's launcher passes a Python float, which Triton types fp32; jax-triton would type a
    # float fp64 (and promote the kernel's q to fp64), so hand it an np.float32.
    scale = np.float32(K ** -0.5 if scale is None else scale)
    out_shape = [jax.ShapeDtypeStruct(v.shape, v.dtype)]  # o = torch.empty_like(v)
    if output_final_state:  # fla always writes the final state in fp32
        out_shape.append(jax.ShapeDtypeStruct(state_shape, jnp.float32))
    kwargs = {name: cfg["constexprs"][name] for name in _WRAPPER_CONSTEXPRS}
    if not output_final_state:
        kwargs["ht"] = None  # the last parameter: a constexpr None, as Triton makes of None
    aliases = None
    if alias_state:
        if not (output_final_state and initial_state is not None
                and initial_state.dtype == jnp.float32):
            raise ValueError("alias_state needs an fp32 initial_state and output_final_state")
        # Each program reads its [BV, BK] tile of h0 once before the loop and writes the same tile
        # of ht after it; tiles are disjoint, so writing in place is safe. Operand index 7 = h0
        # (scalars are not operands), output 1 = ht.
        aliases = {7: 1}
    outs = jt.triton_call(
        *arrays, scale, T, kernel=wrapper_kernel(), out_shape=out_shape, grid=cfg["grid"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], name=KERNEL_NAME,
        input_output_aliases=aliases, compute_capability=compute_capability, **kwargs)
    return outs[0], (outs[1] if output_final_state else None)


def fla_decode_jax(q, k, v, a, b, A_log, dt_bias, state, **kw):
    """The benchmark's configuration (the flags bench/ncu_kernels.py's --fla passes through torch):
    raw gate inputs a, b [B, T, HV] (gating, beta sigmoid and q/k l2norm fused in the kernel),
    state [B, HV, V, K] (V-first: our pool's layout) of any float dtype.
    Returns (o [B, T, HV, V] in v's dtype, final state [B, HV, V, K] fp32)."""
    return fused_recurrent_gdn_jax(q, k, v, a, b, A_log=A_log, dt_bias=dt_bias,
                                   initial_state=state, output_final_state=True,
                                   use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                                   state_v_first=True, **kw)


# ------------------------------------------------------------------------------------------------
# Checks


def make_inputs(B, T, H, HV, K, V, state_dtype, seed=0):
    """bf16 q, k, v, a, b; fp32 A_log, dt_bias; a V-first state of state_dtype (as ncu_kernels)."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(seed), 8)
    bf = lambda i, *s: jax.random.normal(keys[i], s, jnp.float32).astype(jnp.bfloat16)
    return dict(q=bf(0, B, T, H, K), k=bf(1, B, T, H, K), v=bf(2, B, T, HV, V),
                a=bf(3, B, T, HV), b=bf(4, B, T, HV),
                A_log=jax.random.uniform(keys[5], (HV,), jnp.float32, -3.0, 0.5),
                dt_bias=jax.random.normal(keys[6], (HV,), jnp.float32),
                state=(0.3 * jax.random.normal(keys[7], (B, HV, V, K))).astype(state_dtype))


def check_against_reference(B=8, T=4, H=16, HV=32, K=128, V=128, state_dtype="float32",
                            tol_o=2e-2, tol_state=2e-3):
    """fla's kernel through jax-triton vs gdn_jax.ops.reference (XLA, fp32, HIGHEST precision) on
    the same bf16 inputs and state. Errors are max |diff| / max |ref|; o is compared after fla's
    cast to v's dtype (bf16), hence its looser bound. Raises AssertionError past the bounds.
    Returns dict(o_err, state_err, ...)."""
    import jax
    import jax.numpy as jnp

    from gdn_jax.ops import reference

    x = make_inputs(B, T, H, HV, K, V, jnp.dtype(state_dtype))
    o, ht = jax.jit(fla_decode_jax)(x["q"], x["k"], x["v"], x["a"], x["b"], x["A_log"],
                                    x["dt_bias"], x["state"])
    g, beta = reference.gating(x["a"], x["b"], x["A_log"], x["dt_bias"])
    o_ref, s_ref, _ = reference.recurrent_gated_delta_rule(x["q"], x["k"], x["v"], g, beta,
                                                           x["state"].astype(jnp.float32))
    rel = lambda a, r: float(jnp.max(jnp.abs(a.astype(jnp.float32) - r)) / jnp.max(jnp.abs(r)))
    out = dict(B=B, T=T, state_dtype=str(jnp.dtype(state_dtype)), o_err=rel(o, o_ref),
               state_err=rel(ht, s_ref), o_dtype=str(o.dtype), state_out_dtype=str(ht.dtype),
               tol_o=tol_o, tol_state=tol_state)
    assert ht.shape == s_ref.shape and o.shape == o_ref.shape, (ht.shape, o.shape)
    assert out["o_err"] < tol_o and out["state_err"] < tol_state, out
    return out


def config_from_fla_launcher(B, T, H, HV, K, V, **flags):
    """Run fla's own launcher (torch CPU tensors) with its kernel replaced by a recorder: the grid,
    num_warps/num_stages and constexprs it would launch with, heuristics applied. No GPU."""
    import torch
    from fla.ops.gated_delta_rule import fused_recurrent as fr

    real = fr.fused_recurrent_gated_delta_rule_fwd_kernel
    seen = {}

    class Recorder:
        def __getitem__(self, grid):
            def launch(**kw):
                seen.update(grid=tuple(grid), num_warps=kw.pop("num_warps"),
                            num_stages=kw.pop("num_stages"), kwargs=kw)
            return launch

    bf = torch.bfloat16
    state_v_first = flags.get("state_v_first", False)
    gate = flags.get("use_gate_in_kernel", False)
    fr.fused_recurrent_gated_delta_rule_fwd_kernel = Recorder()
    try:
        fr.fused_recurrent_gated_delta_rule_fwd(
            q=torch.zeros(B, T, H, K, dtype=bf), k=torch.zeros(B, T, H, K, dtype=bf),
            v=torch.zeros(B, T, HV, V, dtype=bf), g=torch.zeros(B, T, HV, dtype=bf),
            beta=torch.zeros(B, T, HV, dtype=bf),
            A_log=torch.zeros(HV) if gate else None, dt_bias=torch.zeros(HV) if gate else None,
            scale=K ** -0.5,
            initial_state=torch.zeros((B, HV, V, K) if state_v_first else (B, HV, K, V)),
            output_final_state=True,
            use_qk_l2norm_in_kernel=flags.get("use_qk_l2norm_in_kernel", False),
            use_beta_sigmoid_in_kernel=flags.get("use_beta_sigmoid_in_kernel", False),
            state_v_first=state_v_first)
    finally:
        fr.fused_recurrent_gated_delta_rule_fwd_kernel = real
    kw = seen["kwargs"]
    constexprs = {n: kw[n] for n in real.fn.arg_names if n in kw and n in _ALL_CONSTEXPRS}
    for name, heuristic in real.values.items():  # what @triton.heuristics adds at launch
        constexprs[name] = heuristic(kw)
    return dict(grid=seen["grid"], num_warps=seen["num_warps"], num_stages=seen["num_stages"],
                constexprs=constexprs)


_ALL_CONSTEXPRS = set(launch_config(1, 1, 1, 1, 1, 1)["constexprs"])


def cpu_checks():
    """No GPU needed: (1) launch_config equals what fla's launcher computes, for several shapes
    and flag sets; (2) the wrapper's constexprs are fla's kernel's; (3) jax.jit(...).lower for
    CUDA compiles the kernel to PTX for sm_90 (jax-triton's lowering runs Triton's compiler)."""
    import jax
    import jax.numpy as jnp

    flag_sets = [dict(), dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                              use_beta_sigmoid_in_kernel=True, state_v_first=True)]
    for shape in [(1, 1, 16, 32, 128, 128), (256, 4, 16, 32, 128, 128), (3, 2, 2, 4, 64, 32),
                  (2, 5, 1, 2, 100, 24)]:
        for flags in flag_sets:
            fla = config_from_fla_launcher(*shape, **flags)
            gate = flags.get("use_gate_in_kernel", False)
            ours = launch_config(*shape, use_gate_in_kernel=gate, has_dt_bias=gate,
                                 **{k: v for k, v in flags.items() if k != "use_gate_in_kernel"})
            assert fla == ours, (shape, flags, fla, ours)
    kernel = fla_kernel()
    fla_constexprs = {p.name for p in kernel.fn.params if p.is_constexpr}
    assert fla_constexprs == _ALL_CONSTEXPRS, (fla_constexprs ^ _ALL_CONSTEXPRS)
    assert set(_WRAPPER_CONSTEXPRS) | {"USE_GK", "USE_GV", "IS_VARLEN"} == fla_constexprs
    print("launch_config == fla's launcher (grid, num_warps, num_stages, constexprs): ok")

    B, T = 8, 4
    x = make_inputs(B, T, 16, 32, 128, 128, jnp.bfloat16)
    args = (x["q"], x["k"], x["v"], x["a"], x["b"], x["A_log"], x["dt_bias"], x["state"])
    for T_ in (1, T):
        a = tuple(y[:, :T_] if y.ndim == 4 or (y.ndim == 3 and y.shape[1] == T) else y
                  for y in args[:5]) + args[5:]
        f = functools.partial(fla_decode_jax, compute_capability=90)
        text = jax.jit(f).trace(*a).lower(lowering_platforms=("cuda",)).as_text()
        assert "triton_kernel_call" in text, text[:2000]
        print(f"T={T_}: lowers for cuda (sm_90 PTX compiled by Triton in jax-triton's lowering)")
    f = functools.partial(fla_decode_jax, compute_capability=90, alias_state=True)
    s32 = x["state"].astype(jnp.float32)
    text = jax.jit(f, donate_argnums=7).trace(*args[:7], s32).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "output_operand_alias" in text or "tf.aliasing_output" in text, "no alias"
    print("alias_state: h0 aliased to the final state: ok")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true",
                   help="GPU: compare with gdn_jax.ops.reference (fp32 and bf16 state, B=8 T=4)")
    p.add_argument("--cpu-checks", action="store_true",
                   help="no GPU: launch config vs fla's launcher; lowering to PTX for sm_90")
    args = p.parse_args(argv)
    why = why_unavailable()
    if why:
        print(f"fla through jax-triton unavailable: {why}")
        return 1
    if args.cpu_checks:
        cpu_checks()
    if args.check:
        for dtype in ("float32", "bfloat16"):
            print(check_against_reference(state_dtype=dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
