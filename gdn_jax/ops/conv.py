"""The GDN layer's short causal conv (depthwise, width W, then SiLU) over slot-indexed windows.

    y = causal_conv(xp, weight)                      # xp [B, W - 1 + T, C]: window, then T inputs
    (q, k, v), conv = conv_step(x, conv, weight, slots, widths=(HK, HK, HVV), keep="window")

`conv_step` is T tokens per row (decode, verify): the outputs split into `widths`, and each row's
conv rows updated: keep="window" shifts the window (`conv[slot, :W - 1]`) by the tokens (decode),
keep="all" stores the window and the tokens (verify: `commit` picks the accepted count's
window). On an SM80+ GPU with Triton it is one launch of `gdn_jax.kernels.conv_step` (the conv
window read and written in place; XLA spends five or six launches on it: that module's
docstring); elsewhere XLA as `causal_conv` and the caches' writes.
GDN_JAX_CONV=xla keeps XLA, "pallas" is the default "auto" spelled out, "interpret" runs the
kernel in the Pallas interpreter (tests). Unset, GDN_JAX_BACKEND=xla or =interpret steers it as
it steers the ops. Read when a program is traced.

    outs, conv = project_conv_step(x, (w_qkvz, w_ba), conv, weight, slots, widths=...) or (None)

is a decode or verify step's in_proj and conv in one launch (`gdn_jax.kernels.project_conv`:
each column block's program convolves its own channels): by default where a decode or verify
has at most 32 rows, B x T (GDN_JAX_CONV_EPILOGUE: auto, on, off).

Slots as the caches': negative or >= num_slots is padding (nothing written). A padding row's
outputs are zeros from the kernel and the conv of slot 0's window from XLA: the GDN ops ignore
them (zero output for the row).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gdn_jax import kernels
from gdn_jax.ops._slots import slot_index
from gdn_jax.ops.dispatch import kernel_mode
from gdn_jax.ops.projection import Partials, epilogue_asked, epilogue_config
from gdn_jax.ops.scatter import write_positions, write_slots

ENV_VAR = "GDN_JAX_CONV"
# GDN_JAX_CONV_EPILOGUE runs a decode or verify step's conv inside its in_proj launch where the
# kernel takes both (`project_conv_step`): "auto" (the default) where the step has at most
# `gdn_jax.ops.projection.AUTO_MAX_M` (32) rows, B x T, "on" wherever the few-row kernel runs
# (up to `kernels.PROJECTION_MAX_M` rows), "off" never. Measured on an H100 (48-layer dense
# step, kernel time, side by side: bench/results/profile_step-h100-qwen3_5_text-b1_b32-
# epilogues-2026-12-05.json): in_proj with the conv against the two launches, B = 1 decode 20.5
# against 19.2 + 2.5 us a GDN layer (step 3556.5 -> 3506.8 us), B = 32 decode 22.2 against
# 21.2 + 3.4 (5052.5 -> 4937.5), B = 1 verify (4 rows) faster too; B = 8 verify (32 rows) 4414.7
# -> 4367.9 us a step (...-h100-qwen3_5_text-b8-epilogues-2026-12-05.json); but a B = 32
# verify's 128 rows 41.7 against 24.3 + 4.0 (6583.5 -> 7053.0: the unsplit 128-row launch and
# its barrier; on an H200 5841.9 -> 6313.6 us, ...-h200-qwen3_5_text-b1_b32-verify_glu128_shift-
# 2026-12-05.json).
EPILOGUE_VAR = "GDN_JAX_CONV_EPILOGUE"
_BLOCKS = (512, 256, 128, 64, 32, 16)


def causal_conv(xp, weight):
    """Depthwise causal conv over a window-prefixed input, then SiLU, in fp32.

    xp: [B, W - 1 + T, C] (the W - 1 previous inputs, then T new ones); weight: [W, C] with
    weight[W - 1] multiplying the current token (PyTorch's conv1d weight[:, 0, :] transposed).
    Returns [B, T, C] fp32.
    """
    W = weight.shape[0]
    T = xp.shape[1] - (W - 1)
    xp, w = xp.astype(jnp.float32), weight.astype(jnp.float32)
    y = sum(xp[:, j:j + T] * w[j] for j in range(W))
    return jax.nn.silu(y)


def conv_step(x, conv, weight, slots, *, widths, keep="window", dtype=None, sides=()):
    """x: [B, T, C] the rows' tokens (or a `gdn_jax.ops.projection.Partials` view of them, lead
    (B, T): the kernel adds the projection's partial sums as it reads them); conv: [N, L, C] the
    slots' windows in rows 0..W-2 (oldest first); weight: [W, C]; slots: [B] int32; widths:
    output widths summing to C; keep: "window" (decode: each slot keeps its last W - 1 inputs) or
    "all" (verify: the window and the T tokens, zero-padded to L rows); dtype: the outputs'
    (default x's). Returns (outs, conv):
    outs[i] [B, T, widths[i]] the channel range i of silu(conv) (x cast to conv's dtype first).
    sides: more `Partials` views of the projection x is a view of (the GDN layer's b and a):
    returned as their values after conv, (outs, conv, sides), read by the conv's own launch
    where it reads x's partial sums in place."""
    widths = tuple(int(n) for n in widths)
    dtype = jnp.dtype(dtype or x.dtype)
    slots = jnp.asarray(slots).astype(jnp.int32)
    mode, block = _mode(widths)
    view = isinstance(x, Partials)
    if view and (len(x.lead) != 2 or x.width != sum(widths) or x.start % max(block, 1)):
        mode = None  # a view the kernel cannot read in place: its value, through XLA below
    if mode is not None:
        if view:  # the projection's partial sums, added in the kernel
            S, _, N = x.parts.shape
            parts = x.parts.reshape(S, *x.lead, N)
            inside = tuple(v for v in sides if _same_source(v, x))
            out = kernels.conv_step(parts, conv, weight, slots, widths=widths, keep=keep,
                                    dtype=dtype, config=kernels.ConvConfig(block=block),
                                    interpret=mode == "interpret", x_col=x.start,
                                    parts_dtype=x.dtype,
                                    sides=tuple((v.start, v.width) for v in inside))
            if not sides:
                return out
            read = iter(out[2] if inside else ())
            return out[0], out[1], tuple(next(read) if _same_source(v, x) else v.value()
                                         for v in sides)
        out = kernels.conv_step(x, conv, weight, slots, widths=widths, keep=keep, dtype=dtype,
                                config=kernels.ConvConfig(block=block),
                                interpret=mode == "interpret")
        return (*out, tuple(v.value() for v in sides)) if sides else out
    if view:
        x = x.value()
    W, T, L = weight.shape[0], x.shape[1], conv.shape[1]
    gather, _, scatter = slot_index(slots, conv.shape[0])
    xp = jnp.concatenate([conv[gather, :W - 1], x.astype(conv.dtype)], axis=1)
    y = causal_conv(xp, weight).astype(dtype)
    outs, lo = [], 0
    for n in widths:
        outs.append(y[..., lo:lo + n])
        lo += n
    if keep == "window":
        conv = write_positions(conv, scatter, xp[:, T:])
    else:
        conv = write_slots(conv, scatter, jnp.pad(xp, [(0, 0), (0, L - xp.shape[1]), (0, 0)]))
    return (tuple(outs), conv, tuple(v.value() for v in sides)) if sides else (tuple(outs), conv)


def project_conv_step(x, ws, conv, weight, slots, *, widths, keep: str = "window",
                      backend: str | None = None):
    """A decode or verify step's in_proj and conv in one launch (`gdn_jax.kernels.project_conv`),
    where GDN_JAX_CONV_EPILOGUE asks for it (`gdn_jax.ops.projection.epilogue_asked`: by default
    up to AUTO_MAX_M rows, B x T, decode or verify), the conv's kernel runs (`GDN_JAX_CONV`) and
    the few-row projection kernel takes the group unsplit (`gdn_jax.ops.projection.
    epilogue_config`); else None (run the projection, then `conv_step`).

    x: [B, T, K] T tokens a row; ws: weights [K, N_i] in x's dtype; conv: [N, L, C]; weight:
    [W, C]; slots: [B] int32; widths: the outputs the weights' columns are cut into, the first
    summing to C the conv's channels; keep: as `conv_step`'s ("window": T = 1). Returns (outs,
    conv): outs[i] [B, T, widths[i]] in x's dtype, the conv's `silu(conv)` and the others the
    projection."""
    B, T, K = x.shape
    asked = epilogue_asked(EPILOGUE_VAR, B * T)
    mode = kernel_mode(ENV_VAR)
    widths = tuple(int(n) for n in widths)
    ws_widths = tuple(w.shape[1] for w in ws)
    if (not asked or mode is None or (keep == "window" and T != 1)
            or any(w.dtype != x.dtype or w.shape[0] != K for w in ws)):
        return None
    choice = epilogue_config(B * T, K, ws_widths, x.dtype, backend)
    if not choice or choice[1] != (mode == "interpret") or kernels.projection_conv_misfit(
            B * T, K, ws_widths, widths, weight.shape[1], x.dtype, choice[0]):
        return None
    outs, conv = kernels.project_conv(x.reshape(B * T, K), tuple(ws), conv, weight,
                                      jnp.asarray(slots).astype(jnp.int32), widths=widths,
                                      tokens=T, keep=keep, config=choice[0],
                                      interpret=choice[1])
    return tuple(o.reshape(B, T, o.shape[1]) for o in outs), conv


def _same_source(view, x) -> bool:
    """Whether the conv kernel reading x's partial sums can read `view` too: the same launch's
    output, a power-of-two width."""
    return (view.parts is x.parts and view.lead == x.lead and view.dtype == x.dtype
            and view.width >= 1 and view.width & (view.width - 1) == 0)


def _mode(widths) -> tuple[str | None, int]:
    """("compiled" | "interpret", block) where the kernel is asked for and tiles the widths, else
    (None, 0): XLA."""
    mode = kernel_mode(ENV_VAR)
    block = next((b for b in _BLOCKS if all(n % b == 0 for n in widths)), 0)
    return (mode, block) if mode and block else (None, 0)
