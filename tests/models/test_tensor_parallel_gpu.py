"""Tensor parallelism on the GPUs of one host (`-m gpu`; NCCL collectives): TP = 2 and 4 give the
TP = 1 logits and greedy tokens of the same machine, for a Qwen3-Next-shaped model (MoE, 2 KV
heads: split at TP = 2, replicated at TP = 4) and a Qwen3.5-shaped one (dense MLP), with the GDN
state pool sharded by value head and the Pallas kernels running per shard.

Shapes: the real GDN head dims (K = V = 128), fewer heads (H = 4, HV = 8), hidden 256, 4 layers
(3 GDN : 1 attention), one MTP layer. Tolerances:
- fp32 weights, activations and state (matrix products at Precision.HIGHEST, as the modules
  default): TP changes only the order of sums (the out_proj / o_proj / down_proj partial sums meet
  in the all-reduce), ~1e-7 relative per add; 1e-4 on logits of magnitude ~1 leaves room for a
  few thousand adds through 4 layers and stays far below any greedy margin, so tokens are equal.
- bf16 weights, activations and state: each shard's partial sum is rounded to bf16 before the
  all-reduce (2^-8 relative) and the rounding then propagates through the layers. Logits are
  compared teacher-forced (the same tokens fed to both: a flipped near-tie of bf16 greedy decoding
  would make every later token differ). Dense model: within 5e-2 normwise of bf16 TP = 1
  (measured ~2e-2 on host devices). MoE model: bf16 rounding flips top-k expert choices of single
  tokens, a discrete change (bf16 TP = 1 itself is ~0.1 normwise from fp32 at this seed, and a
  TP = 4 row that routes differently is ~0.3 from TP = 1), so both TP = 1 and TP = tp must stay
  within 0.25 normwise of the fp32 logits: a sharding error (a wrong head or column block) is O(1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gdn_jax.models import ModelConfig, shard_model
from gdn_jax.ops import dispatch
from gdn_jax.speculative import generate, lower_generate
from hlo import collectives
from tiny_models import random_model

pytestmark = pytest.mark.gpu

_LIN, _FULL = "linear_attention", "full_attention"
_COMMON = dict(vocab_size=512, hidden_size=256, num_hidden_layers=4,
               layer_types=(_LIN, _LIN, _LIN, _FULL), num_attention_heads=8,
               num_key_value_heads=2, head_dim=64, linear_num_key_heads=4,
               linear_num_value_heads=8, linear_key_head_dim=128, linear_value_head_dim=128,
               mtp_num_hidden_layers=1)
CONFIGS = {
    "qwen3_next": ModelConfig(model_type="qwen3_next", num_experts=8, num_experts_per_tok=2,
                              moe_intermediate_size=128, shared_expert_intermediate_size=128,
                              intermediate_size=512, **_COMMON),
    "qwen3_5": ModelConfig(model_type="qwen3_5_text", intermediate_size=512, **_COMMON),
}
NUM_SLOTS, MAX_LEN, T_MAX, STEPS = 6, 64, 4, 4
SLOTS = np.array([2, 0, 5, -1], np.int32)  # the last row is padding
B = len(SLOTS)
REAL = SLOTS >= 0
FP32_TOL, BF16_TOL, BF16_BAND = 1e-4, 5e-2, 0.25
# The custom calls of the Pallas kernels: Triton, and Mosaic GPU (mosaic_gpu / mosaic_gpu_v2).
_CUSTOM_CALL = {"triton": "__gpu$xla.gpu.triton", "mosaic": "mosaic_gpu"}
_HEADS = dict(K=_COMMON["linear_key_head_dim"], V=_COMMON["linear_value_head_dim"])


def _ran_kernel(hlo, op, **select):
    """`op`'s GDN kernel, as the dispatch picks it on this GPU, is a custom call of `hlo`."""
    backend = dispatch.select(op, **_HEADS, **select).backend
    assert backend in _CUSTOM_CALL, f"{op} dispatched to {backend}, not a kernel"
    assert _CUSTOM_CALL[backend] in hlo, f"{op}: no {backend} kernel in the compiled program"


def _gpus(n):
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if len(gpus) < n:
        pytest.skip(f"needs {n} GPUs of one host, jax sees {len(gpus)}")
    return gpus[:n]


def _mesh(tp):
    return jax.make_mesh((tp,), ("tp",), devices=_gpus(tp))


def _model(family, dtype, tp):
    model = random_model(CONFIGS[family], seed=1, scale=0.1, dtype=dtype)  # on the first GPU
    return model if tp == 1 else shard_model(model, _mesh(tp))


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    vocab = _COMMON["vocab_size"]
    prompts = rng.integers(0, vocab, (B, 12)).astype(np.int32)
    lengths = np.array([12, 7, 3, 5], np.int32)
    forced = rng.integers(0, vocab, (B, STEPS + T_MAX)).astype(np.int32)
    return prompts, lengths, forced


def _program(graphdef, greedy: bool):
    """Prefill, STEPS decode steps, a verify of T_MAX tokens, a commit, a decode and an MTP step,
    in one jit. greedy: feed back the argmax; else feed `forced` (teacher forcing)."""

    @jax.jit
    def run(params, prompts, lengths, forced, cache, slots):
        m = nnx.merge(graphdef, params)
        out = m(prompts, cache, slots, mode="prefill", lengths=lengths)
        first = jnp.argmax(out.logits[jnp.arange(B), lengths - 1], -1).astype(jnp.int32)
        tok = first if greedy else forced[:, 0]

        def step(carry, i):
            tok, cache = carry
            o = m(tok[:, None], cache, slots, mode="decode")
            nxt = (jnp.argmax(o.logits[:, 0], -1).astype(jnp.int32) if greedy
                   else forced[:, i + 1])
            return (nxt, o.cache), (nxt, o.logits[:, 0])

        (tok, cache), (toks, dec) = jax.lax.scan(step, (tok, out.cache), jnp.arange(STEPS))
        drafts = jnp.concatenate([tok[:, None], forced[:, STEPS + 1:]], axis=1)  # [B, T_MAX]
        ver = m(drafts, cache, slots, mode="verify")
        cache = m.commit(ver.cache, slots, jnp.array([4, 2, 1, 0], jnp.int32))
        last = m(drafts[:, -1:], cache, slots, mode="decode")
        mtp = m.mtp_forward(forced[:, :1], last.hidden, last.cache, slots, mode="decode")
        logits = dict(prefill=out.logits, decode=dec, verify=ver.logits, last=last.logits,
                      mtp=mtp.logits)
        return logits, jnp.concatenate([first[:, None], toks.T], 1), mtp.cache

    return run


def _run(model, state_dtype, greedy):
    prompts, lengths, forced = _inputs()
    cache = model.init_cache(NUM_SLOTS, MAX_LEN, t_max=T_MAX, state_dtype=state_dtype)
    graphdef, params = nnx.split(model)
    args = (params, jnp.asarray(prompts), jnp.asarray(lengths), jnp.asarray(forced), cache,
            jnp.asarray(SLOTS))
    run = _program(graphdef, greedy).lower(*args).compile()
    logits, toks, cache = run(*args)
    return jax.tree.map(np.asarray, logits), np.asarray(toks), cache, run.as_text()


def _real(name, x):
    """The real rows (the padding row's outputs are unspecified); decode logits are [STEPS, B, V]."""
    return x[:, REAL] if name == "decode" else x[REAL]


def _normwise(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("family", sorted(CONFIGS))
@pytest.mark.parametrize("tp", [2, 4])
def test_fp32_tp_equals_one_gpu(family, tp):
    ref_logits, ref_toks, _, _ = _run(_model(family, jnp.float32, 1), jnp.float32, greedy=True)
    logits, toks, cache, hlo = _run(_model(family, jnp.float32, tp), jnp.float32, greedy=True)
    np.testing.assert_array_equal(toks[REAL], ref_toks[REAL])
    for name, ref in ref_logits.items():
        np.testing.assert_allclose(_real(name, logits[name]), _real(name, ref), rtol=FP32_TOL,
                                   atol=FP32_TOL, err_msg=f"{family} TP={tp} {name}")
    _ran_kernel(hlo, "decode", B=B)
    _ran_kernel(hlo, "verify", T=T_MAX, B=B, mode="replay")
    pool = cache.layers[0].state.pool
    assert {s.data.shape[1] for s in pool.addressable_shards} == {
        CONFIGS[family].linear_num_value_heads // tp}


@pytest.mark.parametrize("family", sorted(CONFIGS))
@pytest.mark.parametrize("tp", [2, 4])
def test_bf16_tp_close_to_one_gpu(family, tp):
    fp32, _, _, _ = _run(_model(family, jnp.float32, 1), jnp.float32, greedy=False)
    one, _, _, _ = _run(_model(family, jnp.bfloat16, 1), jnp.bfloat16, greedy=False)
    logits, _, cache, hlo = _run(_model(family, jnp.bfloat16, tp), jnp.bfloat16, greedy=False)
    for name, ref in fp32.items():
        got = _real(name, logits[name])
        assert np.isfinite(got).all()
        for label, x in ((f"TP={tp}", got), ("TP=1", _real(name, one[name]))):
            err = _normwise(x, _real(name, ref))
            assert err <= BF16_BAND, f"{family} bf16 {label} {name}: {err:.3g} from fp32"
        if CONFIGS[family].num_experts == 0:
            err = _normwise(got, _real(name, one[name]))
            assert err <= BF16_TOL, f"{family} TP={tp} {name}: {err:.3g} from bf16 TP=1"
    _ran_kernel(hlo, "decode", B=B)
    _ran_kernel(hlo, "verify", T=T_MAX, B=B, mode="replay")
    pool = cache.layers[0].state.pool
    assert pool.dtype == jnp.bfloat16 and len(pool.addressable_shards) == tp


@pytest.mark.parametrize("tp", [2, 4])
def test_speculative_loop_tokens(tp):
    """generate() (3 drafts, greedy, bf16 state pool sharded) on TP = tp gives the TP = 1 tokens
    (fp32 weights: the tokens are a function of near-exact logits)."""
    prompts, lengths, _ = _inputs(1)
    kw = dict(num_draft=3, max_new_tokens=24, state_dtype=jnp.float32)
    ref = generate(_model("qwen3_next", jnp.float32, 1), prompts, lengths, **kw)
    out = generate(_model("qwen3_next", jnp.float32, tp), prompts, lengths, **kw)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(ref.lengths))


@pytest.mark.parametrize("tp", [2, 4])
def test_collectives_in_the_compiled_programs(tp):
    """The decode step: 2 all-reduces per decoder layer + 1 (the vocab-split embedding), no other
    collective. The whole speculative loop (bf16 state): no collective moves a state-pool-sized
    tensor (nothing [.., V, K]: the pool and the intermediate states stay sharded)."""
    config = CONFIGS["qwen3_next"]
    model = _model("qwen3_next", jnp.bfloat16, tp)
    cache = model.init_cache(NUM_SLOTS, MAX_LEN, t_max=T_MAX, state_dtype=jnp.bfloat16)
    graphdef, params = nnx.split(model)

    def decode(params, tok, cache, slots):
        return nnx.merge(graphdef, params)(tok, cache, slots, mode="decode")

    hlo = jax.jit(decode).lower(params, jnp.zeros((B, 1), jnp.int32), cache,
                                jnp.asarray(SLOTS)).compile().as_text()
    ops = [op for op, _ in collectives(hlo)]
    assert ops.count("all-reduce") == 2 * config.num_hidden_layers + 1, ops
    assert set(ops) == {"all-reduce"}, ops
    _ran_kernel(hlo, "decode", B=B)

    prompts, lengths, _ = _inputs()
    loop = lower_generate(model, prompts, lengths, num_draft=3, max_new_tokens=16,
                          state_dtype=jnp.bfloat16).compile().as_text()
    vk = (config.linear_value_head_dim, config.linear_key_head_dim)
    big = [(op, s) for op, shapes in collectives(loop) for s in shapes if s[-2:] == vk]
    assert not big, f"collectives of state-sized tensors in the loop: {big}"
    _ran_kernel(loop, "verify", T=4, B=B, mode="replay")  # 3 drafts + the pending token
