import sys, jax, jax.numpy as jnp, numpy as np
from gdn_jax import kernels
from gdn_jax.ops import projection as P
which, M = sys.argv[1], int(sys.argv[2])
K, widths = 2048, (5120, 5120)
r = np.random.default_rng(0)
x = jnp.asarray(r.standard_normal((M, K)), jnp.bfloat16)
ws = tuple(jnp.asarray(r.standard_normal((K, n)) * .02, jnp.bfloat16) for n in widths)
if which == "triton":
    cfg = P.config_for(M, K, widths)
    f = jax.jit(lambda x, ws: kernels.project_group(x, ws, config=cfg))
else:
    cfg = kernels.MosaicProjectionConfig(block_n=128, stages=4, ctas=132)
    f = jax.jit(lambda x, ws: kernels.project_group_mgpu(x, ws, config=cfg))
print(which, M, cfg)
for _ in range(8):
    jax.block_until_ready(f(x, ws))
