"""Per-tile operation counts of the matrix-form kernels' per-row algebra (no GPU needed).

    python bench/wy_opcount.py [--block-v 64] [--cases ring:4:16,ring:8:16,replay:4:3]

The Mosaic ring and replay kernels (`kernels._ring_wy_mgpu`, `kernels._replay_wy_mgpu`) run, per
tile, `_wy_mgpu.solve` (and the ring's `ring_scales` / `after_ring`) on fp32 scalars read from the
Gram in SMEM and on [block_v] vectors (rows of the state's products, values). This traces that
math as plain JAX and counts its operations by shape: vector ops ([block_v]: 2 registers a
thread in the WGMMA row layout at block_v = 64), group ops ([block_v, 8], 8 columns of PT^T: 4
registers a thread in the WGMMA layout), scalar arithmetic, and scalar reads (each a
shared-memory load in the kernel); `bench/ptxas_report.py --sass` counts what they compile to.
Set against the kernel's time per tile (ncu), it says how much of a tile is this instruction
stream and how much is waiting.
"""

from __future__ import annotations

import argparse
import collections

K = 128


def count(kind: str, T: int, W: int, block_v: int) -> dict:
    """Operation counts of one tile's algebra: ring (T tokens, a ring of W, all committed) or
    replay (T tokens after W candidates)."""
    import jax
    import jax.numpy as jnp

    from gdn_jax.kernels import _ring_wy_mgpu as ring
    from gdn_jax.kernels import _wy_mgpu as wy

    def algebra(gram, PT, V, U, cand_g, g, beta, n):
        gates = [(g[j], beta[j]) for j in range(T)]
        if kind == "ring":
            R = ring.x_rows(T).pending
            c, e_n = ring.ring_scales(n, [cand_g[l] for l in range(W)],
                                      lambda l: gram[R + l, R + l])
            w = [cl * U[l] for l, cl in enumerate(c)]
            row = ring.token_rows_after_ring(
                PT[:R].T, e_n, w, lambda first, l: gram[R + l, first:first + wy.GROUP])
            return wy.solve(jnp.int32(0), gates, [], lambda r, cc: gram[r, cc], row,
                            lambda j: V[j], K, x_rows=ring.x_rows(T))
        cand = [(cand_g[j], beta[0]) for j in range(W)]
        return wy.solve(n, gates, cand, lambda r, cc: gram[r, cc], lambda r: PT[r],
                        lambda j: V[j], K, select=wy.zeros_already)

    args = (jnp.zeros((64, 64)), jnp.zeros((64, block_v)), jnp.zeros((T + W, block_v)),
            jnp.zeros((max(W, 1), block_v)), jnp.zeros((max(W, 1),)), jnp.zeros((T,)),
            jnp.zeros((T,)), jnp.int32(W))
    counts = collections.Counter()
    for eqn in jax.make_jaxpr(algebra)(*args).jaxpr.eqns:
        shape = eqn.outvars[0].aval.shape
        if eqn.primitive.name in ("slice", "broadcast_in_dim", "transpose"):
            continue  # a scalar read's index arithmetic (counted as the read: squeeze), or
            # register moves (a group's columns, a broadcast of a vector or scalar)
        if eqn.primitive.name == "squeeze":
            counts["scalar reads" if shape == () else "vector reads"] += 1
        elif shape == (block_v, wy.GROUP):
            counts["group ops"] += 1
        elif shape == (block_v,):
            counts["vector ops"] += 1
        elif shape == ():
            counts["scalar ops"] += 1
    return dict(counts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--block-v", type=int, default=64)
    p.add_argument("--cases", default="ring:1:16,ring:4:16,ring:8:16,ring:4:32,replay:4:3",
                   help="kind:T:W (W: the ring's size, or replay's pending candidates), "
                        "comma-separated")
    args = p.parse_args(argv)
    print(f"{'case':<14} {'vector ops':>10} {'group ops':>9} {'vector reads':>12} "
          f"{'scalar ops':>10} {'scalar reads':>12}")
    for case in args.cases.split(","):
        kind, T, W = case.split(":")
        c = count(kind, int(T), int(W), args.block_v)
        print(f"{case:<14} {c.get('vector ops', 0):>10} {c.get('group ops', 0):>9} "
              f"{c.get('vector reads', 0):>12} "
              f"{c.get('scalar ops', 0):>10} {c.get('scalar reads', 0):>12}")


if __name__ == "__main__":
    main()
