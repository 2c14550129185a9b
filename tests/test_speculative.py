"""MTP speculative decoding (`gdn_jax.speculative.generate`) on tiny random fp32 models, CPU.

- greedy speculative output == plain greedy output (d in 1, 3, 5; replay and intermediate; fp32
  state), and the share of identical tokens with a bf16 state;
- an oracle MTP head that always agrees gives d + 1 tokens per round, one that never agrees 1;
- speculative sampling leaves the target's distribution unchanged (chi-square, tiny vocabulary);
- a stop token inside an accepted run stops its row there, other rows go on;
- rollback: the cache after generation equals plain decoding's (GDN state, conv window, KV);
- MTP verify + commit_mtp equal step-by-step MTP decode;
- the program is one while loop with no host callbacks and runs under transfer_guard("disallow");
- layering: the loop imports only gdn_jax.models (and _compat), asking the model's cache what it
  needs (t_max, max_len, commit mode, state dtype, MTP).

Programs compile with XLA's backend optimisation off (CPU compile time dominates these tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from gdn_jax import ops
from gdn_jax.ops import dispatch
from gdn_jax import speculative as S
from gdn_jax.models import ModelConfig, Qwen3NextForCausalLM
from gdn_jax.modules.cache import GDNCache
from tiny_models import randomize

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_COMPILED = {}


def _config(vocab=64, **kw):
    return ModelConfig(
        model_type="qwen3_5_text", vocab_size=vocab, hidden_size=32, num_hidden_layers=3,
        layer_types=("linear_attention", "full_attention", "linear_attention"),
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
        intermediate_size=48, mtp_num_hidden_layers=1, **kw)


def _model(config, seed=0, cls=Qwen3NextForCausalLM, **kw):
    model = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0), **kw))
    return randomize(model, seed, scale=0.3)


def gen(model, prompts, lengths, **kw):
    """generate() through a compile cache (one XLA compile per model graph, config and shapes)."""
    kw = {**S._DEFAULTS, "max_new_tokens": 16, "state_dtype": jnp.float32, **kw}
    cfg, graphdef, args = S._prepare(model, prompts, lengths, **kw)
    sig = (graphdef, cfg, jax.tree.map(lambda x: (x.shape, x.dtype), args[1:]))
    if sig not in _COMPILED:
        _COMPILED[sig] = S._core_jit.lower(graphdef, *args, cfg=cfg).compile(FAST)
    return jax.device_get(_COMPILED[sig](*args))


RNG = np.random.default_rng(1)
PROMPTS = jnp.asarray(RNG.integers(0, 64, (3, 7)), jnp.int32)
LENGTHS = jnp.array([7, 2, 5], jnp.int32)
N_NEW = 14


@pytest.fixture(scope="module")
def model():
    return _model(_config(), seed=0)


@pytest.fixture(scope="module")
def plain(model):
    return gen(model, PROMPTS, LENGTHS, num_draft=0, max_new_tokens=N_NEW)


def _flushed_pool(cache: GDNCache):
    st = cache.state
    return np.asarray(ops.flush(st, jnp.arange(st.num_slots, dtype=jnp.int32)).pool, np.float32)


@pytest.fixture(scope="module")
def table(model):
    """The reference sequences (prompt + plain greedy output), long enough for every draft."""
    longer = gen(model, PROMPTS, LENGTHS, num_draft=0, max_new_tokens=N_NEW + 8)
    table = np.zeros((3, PROMPTS.shape[1] + N_NEW + 8), np.int32)
    for b, n in enumerate(np.asarray(LENGTHS)):
        table[b, :n] = np.asarray(PROMPTS[b, :n])
        table[b, n:n + N_NEW + 8] = longer.tokens[b]
    return table


def _assert_same_cache(got, want, lengths):
    """Every layer's cache, rows' committed contents only (KV up to each slot's length)."""
    assert len(got.layers) == len(want.layers)
    for i in range(len(got.layers)):
        g, w = got.layer(i), want.layer(i)
        if isinstance(g, GDNCache):
            width = g.conv.shape[1] - g.t_max
            # the window holds in_proj's fp32 outputs, which a verify computes T rows at a time
            # and a decode one: the dot may sum in another order (jax 0.12's CPU dots do: 4e-6
            # apart), so the state's fp32 tolerance, not bit equality
            np.testing.assert_allclose(np.asarray(g.conv[:, :width]), np.asarray(w.conv[:, :width]),
                                       rtol=1e-4, atol=1e-5, err_msg=f"layer {i} conv window")
            np.testing.assert_allclose(_flushed_pool(g), _flushed_pool(w), rtol=1e-4, atol=1e-5,
                                       err_msg=f"layer {i} GDN state")
        else:
            np.testing.assert_array_equal(np.asarray(g.lengths), np.asarray(w.lengths))
            np.testing.assert_array_equal(np.asarray(g.lengths), lengths)
            for s, n in enumerate(lengths):
                for a, b in ((g.k, w.k), (g.v, w.v)):
                    np.testing.assert_allclose(np.asarray(a[s, :n]), np.asarray(b[s, :n]),
                                               rtol=1e-4, atol=1e-5, err_msg=f"layer {i} KV")


# ---- greedy: identical to plain decoding; rollback; bf16 share


@pytest.mark.parametrize("commit_mode", ["replay", "intermediate"])
@pytest.mark.parametrize("d", [1, 3, 5])
@pytest.mark.slow
def test_greedy_matches_plain(model, plain, table, d, commit_mode):
    """An MTP head right at about 2/3 of the positions: partial acceptance in most rounds."""
    out = gen(_oracle(model, table, "mixed"), PROMPTS, LENGTHS, num_draft=d, max_new_tokens=N_NEW, commit_mode=commit_mode)
    np.testing.assert_array_equal(out.tokens, plain.tokens)
    np.testing.assert_array_equal(out.lengths, [N_NEW] * 3)
    assert out.rounds <= plain.rounds and out.row_rounds.max() == out.rounds
    assert 1.0 <= out.accept_length <= d + 1
    np.testing.assert_allclose(out.accept_length,
                               (out.accepted.sum() + out.row_rounds.sum()) / out.row_rounds.sum())
    # rollback: whatever was drafted and rejected, the target cache is plain decoding's over the
    # same tokens (prompt + output[:-1])
    assert 0 < out.accepted.sum() < d * out.row_rounds.sum()
    _assert_same_cache(out.cache, plain.cache, np.asarray(LENGTHS) + N_NEW - 1)


@pytest.mark.parametrize("d", [1, 3])
def test_greedy_matches_plain_in_ring_mode(model, plain, table, d):
    """Ring commit mode: the GDN layers keep committed tokens in their rings (folding every few
    rounds) and the tokens are plain decoding's. A broken ring raises acceptance rather than
    lowering it, so the tokens are checked, not the accept length."""
    out = gen(_oracle(model, table, "mixed"), PROMPTS, LENGTHS, num_draft=d,
              max_new_tokens=N_NEW, commit_mode="ring")
    np.testing.assert_array_equal(out.tokens, plain.tokens)
    np.testing.assert_array_equal(out.lengths, [N_NEW] * 3)
    assert out.cache.commit_mode == "ring"
    assert 0 < out.accepted.sum() < d * out.row_rounds.sum()


@pytest.mark.slow
def test_greedy_real_mtp_head_matches_plain(model, plain):
    """The model's own (random) MTP head drafts: same output, same cache."""
    out = gen(model, PROMPTS, LENGTHS, num_draft=3, max_new_tokens=N_NEW)
    np.testing.assert_array_equal(out.tokens, plain.tokens)
    _assert_same_cache(out.cache, plain.cache, np.asarray(LENGTHS) + N_NEW - 1)
    # per-row max_new_tokens (same compiled program: the bound is max(max_new_tokens))
    limits = np.array([N_NEW, 5, 9])
    out = gen(model, PROMPTS, LENGTHS, num_draft=3, max_new_tokens=limits, pad_id=-1)
    np.testing.assert_array_equal(out.lengths, limits)
    for b, n in enumerate(limits):
        np.testing.assert_array_equal(out.tokens[b, :n], plain.tokens[b, :n])
        assert (out.tokens[b, n:] == -1).all()


@pytest.mark.slow
def test_bf16_state_identical_share(model):
    """bf16 pools: plain decoding rounds the state once per token, replay once per round, so
    greedy outputs may part after a near tie. The share of identical tokens must stay high."""
    prompts = jnp.asarray(np.random.default_rng(5).integers(0, 64, (8, 6)), jnp.int32)
    lengths = jnp.array([6, 3, 5, 1, 6, 4, 2, 6], jnp.int32)
    base = gen(model, prompts, lengths, num_draft=0, max_new_tokens=24, state_dtype=jnp.bfloat16)
    spec = gen(model, prompts, lengths, num_draft=3, max_new_tokens=24, state_dtype=jnp.bfloat16)
    share = float(np.mean(base.tokens == spec.tokens))
    prefix = np.mean([np.argmin(np.append(r, False)) for r in (base.tokens == spec.tokens)]) / 24
    print(f"\nbf16 state, d=3 replay vs plain: identical-token share {share:.3f}, "
          f"mean identical-prefix share {prefix:.3f}")
    assert share >= 0.9


# ---- oracle MTP heads: always / never agree


class OracleMTP(Qwen3NextForCausalLM):
    """A model whose MTP head 'drafts' from a table: at MTP position t of row b it predicts
    table[b, t + 2] + shift[b, t + 2] (mod vocab), where table is the reference continuation:
    shift 0 everywhere always agrees, 1 everywhere never, a mix agrees in part. The real MTP
    head still runs (its cache follows the loop); only its logits are replaced."""

    def __init__(self, config, *, rngs):
        super().__init__(config, rngs=rngs)

    def mtp_forward(self, next_tokens, hidden, cache, slots, *, mode="decode", lengths=None,
                    layer=0, logits_at=None):
        out = super().mtp_forward(next_tokens, hidden, cache, slots, mode=mode, lengths=lengths,
                                  layer=layer, logits_at=logits_at)
        B, T = next_tokens.shape
        table = self.table[...] + self.shift[...]
        start = cache.mtp[layer].lengths[jnp.clip(slots, 0, cache.mtp[layer].num_slots - 1)]
        pos = jnp.clip(start[:, None] + jnp.arange(T)[None, :] + 2, 0, table.shape[1] - 1)
        tok = jnp.take_along_axis(table, pos, axis=1) % self.config.vocab_size
        if logits_at is not None:
            tok = jnp.take_along_axis(tok, logits_at[:, None], axis=1)
        logits = 30.0 * jax.nn.one_hot(tok, self.config.vocab_size, dtype=jnp.float32)
        return out._replace(logits=logits)


def _oracle(model, table, shift):
    """An OracleMTP with `model`'s weights drafting from `table`; shift: 0, 1, or "mixed" (wrong
    at a random third of the positions)."""
    if shift == "mixed":
        shift = np.random.default_rng(7).random(table.shape) < 0.35
    oracle = nnx.eval_shape(lambda: OracleMTP(_config(), rngs=nnx.Rngs(0)))
    nnx.update(oracle, nnx.state(model, nnx.Param))
    oracle.table = nnx.Variable(jnp.asarray(table))
    oracle.shift = nnx.Variable(jnp.broadcast_to(jnp.asarray(shift, jnp.int32), table.shape))
    return oracle


@pytest.mark.parametrize("shift,per_round", [(0, "d+1"), (1, "1")])
def test_oracle_accept_length(model, plain, table, shift, per_round):
    d = 3
    out = gen(_oracle(model, table, shift), PROMPTS, LENGTHS, num_draft=d, max_new_tokens=N_NEW)
    np.testing.assert_array_equal(out.tokens, plain.tokens)
    if shift == 0:
        np.testing.assert_array_equal(out.accepted, d * out.row_rounds)
        assert out.accept_length == d + 1
        assert out.rounds == -(-(N_NEW - 1) // (d + 1))  # first token from the prefill
    else:
        np.testing.assert_array_equal(out.accepted, 0)
        assert out.accept_length == 1.0 and out.rounds == N_NEW - 1


@pytest.mark.slow
def test_stop_token_inside_accepted_run(model, plain, table):
    """Row 0 stops exactly at a stop token met in the middle of a fully accepted run (always-
    agreeing MTP, d = 3: rounds emit output[1:5], [5:9], ...); the other rows go on."""
    ref = plain.tokens
    k = next(k for k in (6, 7, 10, 11, 2, 3) if ref[0, k] not in ref[0, :k])
    stop = int(ref[0, k])
    out = gen(_oracle(model, table, 0), PROMPTS, LENGTHS, num_draft=3, max_new_tokens=N_NEW,
              stop_tokens=(stop,), pad_id=-1)
    for b in range(3):
        hits = np.flatnonzero(ref[b] == stop)
        n = hits[0] + 1 if hits.size else N_NEW
        assert out.lengths[b] == n
        np.testing.assert_array_equal(out.tokens[b, :n], ref[b, :n])
        assert (out.tokens[b, n:] == -1).all()
    assert out.lengths[0] == k + 1 and out.lengths.max() > k + 1
    # and the cache holds prompt + output[:-1] of every row, as plain decoding leaves it
    base = gen(model, PROMPTS, LENGTHS, num_draft=0, max_new_tokens=N_NEW, stop_tokens=(stop,),
               pad_id=-1)
    np.testing.assert_array_equal(base.tokens, out.tokens)
    _assert_same_cache(out.cache, base.cache, np.asarray(LENGTHS) + out.lengths - 1)


# ---- sampling keeps the target distribution


def _chi2_critical(df, z=3.09):  # Wilson-Hilferty, one-sided p ~ 0.001
    return df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.8, 6, 0.9)])
@pytest.mark.slow
def test_sampling_keeps_target_distribution(temperature, top_k, top_p):
    V, d, n = 16, 2, 2000
    model = _model(_config(vocab=V), seed=3)
    prompt = np.array([3, 7, 1], np.int32)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    prompts = jnp.asarray(np.tile(prompt, (n, 1)))
    lengths = jnp.full((n,), len(prompt), jnp.int32)
    out = gen(model, prompts, lengths, num_draft=d, max_new_tokens=3, key=jax.random.key(11),
              **kw)
    again = gen(model, prompts, lengths, num_draft=d, max_new_tokens=3, key=jax.random.key(11),
                **kw)
    np.testing.assert_array_equal(out.tokens, again.tokens)  # reproducible for a key
    assert 1.05 < out.accept_length < d + 1 - 0.05  # acceptance and rejection both exercised

    # exact target marginals of tokens 2 and 3 by enumeration of tokens 1 (and 2), one prefill
    graphdef, params = nnx.split(model)
    P = len(prompt)
    s1 = np.pad(prompt[None], ((0, 0), (0, 2)))
    s2 = np.concatenate([np.tile(prompt, (V, 1)), np.arange(V)[:, None], np.zeros((V, 1), int)], 1)
    s3 = np.concatenate([np.tile(prompt, (V * V, 1)), np.repeat(np.arange(V), V)[:, None],
                         np.tile(np.arange(V), V)[:, None]], 1)
    seqs = jnp.asarray(np.concatenate([s1, s2, s3]), jnp.int32)
    lens = jnp.asarray([P] + [P + 1] * V + [P + 2] * V * V, jnp.int32)

    def probs(params, seqs, lens):
        m = nnx.merge(graphdef, params)
        cache = m.init_cache(seqs.shape[0], seqs.shape[1], t_max=1, state_dtype=jnp.float32)
        o = m(seqs, cache, jnp.arange(seqs.shape[0], dtype=jnp.int32), mode="prefill",
              lengths=lens)
        return S.sampling_probs(o.logits[jnp.arange(seqs.shape[0]), lens - 1], temperature,
                                top_k, top_p)

    pr = np.asarray(jax.jit(probs).lower(params, seqs, lens).compile(FAST)(params, seqs, lens),
                    np.float64)
    p1, p2, p3 = pr[0], pr[1:V + 1], pr[V + 1:].reshape(V, V, V)
    marg2 = p1 @ p2
    marg3 = np.einsum("a,ab,abc->c", p1, p2, p3)
    for pos, marg in ((1, marg2), (2, marg3)):
        counts = np.bincount(out.tokens[:, pos], minlength=V)
        expected = n * marg
        assert counts[expected == 0].sum() == 0, "a token the target cannot produce"
        big = expected >= 5
        obs = np.append(counts[big], counts[~big].sum())
        exp = np.append(expected[big], expected[~big].sum())
        keep = exp > 0
        chi2 = np.sum((obs[keep] - exp[keep]) ** 2 / exp[keep])
        df = keep.sum() - 1
        assert chi2 < _chi2_critical(df), f"token {pos + 1}: chi2 {chi2:.1f} with df {df}"


def test_sampling_probs_filters():
    logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    np.testing.assert_allclose(S.sampling_probs(logits, 1.0), [[0.5, 0.2, 0.15, 0.1, 0.05]],
                               rtol=1e-6)
    np.testing.assert_allclose(S.sampling_probs(logits, 1.0, top_k=2), [[5 / 7, 2 / 7, 0, 0, 0]],
                               rtol=1e-6)
    np.testing.assert_allclose(S.sampling_probs(logits, 1.0, top_p=0.8),
                               [[0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0]], rtol=1e-6)


# ---- MTP verify + commit_mtp == MTP decode step by step


@pytest.mark.parametrize("n", [0, 2, 4])
def test_mtp_verify_commit_matches_stepwise(model, n):
    B, T = 2, 4
    rng = np.random.default_rng(n)
    graphdef, params = nnx.split(model)
    slots = jnp.array([1, 0], jnp.int32)
    hidden = jnp.asarray(rng.standard_normal((B, T + 3, 32)), jnp.float32)
    toks = jnp.asarray(rng.integers(0, 64, (B, T + 3)), jnp.int32)

    @jax.jit
    def run(params):
        m = nnx.merge(graphdef, params)
        cache = m.init_cache(2, 16, t_max=T, state_dtype=jnp.float32)
        cache = m.mtp_forward(toks[:, :3], hidden[:, :3], cache, slots, mode="prefill").cache
        v = m.mtp_forward(toks[:, 3:], hidden[:, 3:], cache, slots, mode="verify")
        spec = m.commit_mtp(v.cache, slots, jnp.full((B,), n, jnp.int32))
        full, step, logits = cache, cache, []
        for t in range(T):
            o = m.mtp_forward(toks[:, 3 + t:4 + t], hidden[:, 3 + t:4 + t], full, slots,
                              mode="decode")
            logits.append(o.logits[:, 0])
            full = o.cache
            step = full if t + 1 == n else step
        # one more decode step from each: same next logits
        nxt = (toks[:, :1], hidden[:, :1])
        a = m.mtp_forward(*nxt, spec, slots, mode="decode").logits
        b = m.mtp_forward(*nxt, step, slots, mode="decode").logits
        return v.logits, jnp.stack(logits, 1), spec.mtp[0], step.mtp[0], a, b

    v_logits, s_logits, kv_spec, kv_step, a, b = run(params)
    np.testing.assert_allclose(v_logits, s_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(kv_spec.lengths, kv_step.lengths)
    np.testing.assert_array_equal(kv_spec.lengths, [3 + n] * 2)
    np.testing.assert_allclose(kv_spec.k[:, :3 + n], kv_step.k[:, :3 + n], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kv_spec.v[:, :3 + n], kv_step.v[:, :3 + n], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# ---- one program, no host round trip


def _primitives(jaxpr, out):
    """Names of every primitive in jaxpr and the jaxprs nested in its equations."""
    for eqn in jaxpr.eqns:
        out.append(eqn.primitive.name)
        for sub in _subjaxprs(eqn.params):
            _primitives(sub, out)
    return out


def _subjaxprs(params):
    for v in params.values():
        for x in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(x, jax.extend.core.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, jax.extend.core.Jaxpr):
                yield x


def test_one_program_no_host_round_trip(model, plain):
    jaxpr = S.generate_jaxpr(model, PROMPTS, LENGTHS, num_draft=3, max_new_tokens=N_NEW,
                             state_dtype=jnp.float32)
    top = [e.primitive.name for e in jaxpr.jaxpr.eqns]
    assert top.count("while") == 1
    names = _primitives(jaxpr.jaxpr, [])
    assert len(names) > 3 * len(top)  # the loop body was walked
    assert not [p for p in names if "callback" in p or "infeed" in p or "outfeed" in p]
    # the compiled program runs with every host <-> device transfer disallowed
    kw = dict(num_draft=3, max_new_tokens=N_NEW, temperature=0.0, top_k=0, top_p=1.0,
              stop_tokens=(), pad_id=0, key=None, cache=None, slots=None, commit_mode="replay",
              state_dtype=jnp.float32, max_len=None)
    cfg, graphdef, args = S._prepare(model, PROMPTS, LENGTHS, **kw)
    compiled = S._core_jit.lower(graphdef, *args, cfg=cfg).compile(FAST)
    args = jax.device_put(args)
    jax.block_until_ready(args)
    with jax.transfer_guard("disallow"):
        out = compiled(*args)
        jax.block_until_ready(out)
    np.testing.assert_array_equal(jax.device_get(out.tokens), plain.tokens)


# ---- argument checks


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="num_draft"):
        S.generate(model, PROMPTS, LENGTHS, num_draft=-1)
    with pytest.raises(ValueError, match="prompt_lengths"):
        S.generate(model, PROMPTS, jnp.array([8, 1, 1]))
    with pytest.raises(ValueError, match="max_new_tokens"):
        S.generate(model, PROMPTS, LENGTHS, max_new_tokens=0)
    with pytest.raises(ValueError, match="key"):
        S.generate(model, PROMPTS, LENGTHS, temperature=1.0)
    with pytest.raises(ValueError, match="top_p"):
        S.generate(model, PROMPTS, LENGTHS, temperature=1.0, top_p=0.0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="max_len"):
        S.generate(model, PROMPTS, LENGTHS, max_len=10)
    cache = model.init_cache(3, 64, t_max=3)
    with pytest.raises(ValueError, match="t_max"):
        S.generate(model, PROMPTS, LENGTHS, num_draft=3, cache=cache, slots=jnp.arange(3))
    cache = model.init_cache(3, 12, t_max=4)
    with pytest.raises(ValueError, match="need"):
        S.generate(model, PROMPTS, LENGTHS, num_draft=3, cache=cache, slots=jnp.arange(3))
    no_mtp = nnx.eval_shape(lambda: Qwen3NextForCausalLM(_config(), with_mtp=False,
                                                         rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="MTP head"):
        S.generate(no_mtp, PROMPTS, LENGTHS, num_draft=2)


# ---- layering: the loop talks to the models layer only


def test_loop_imports_only_models():
    """gdn_jax.speculative imports nothing of gdn_jax.modules / ops / kernels directly: only
    gdn_jax.models and gdn_jax._compat (its source's import statements)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(S))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
            if node.module == "gdn_jax":
                imported |= {f"gdn_jax.{a.name}" for a in node.names}
    ours = {m for m in imported if m.split(".")[0] == "gdn_jax"}
    assert ours, imported
    bad = {m for m in ours if not m.startswith(("gdn_jax.models", "gdn_jax._compat"))}
    assert not bad, f"gdn_jax.speculative imports {sorted(bad)} (only gdn_jax.models, _compat)"


def test_cache_answers_the_loop(model):
    """ModelCache says what the loop checks: verify limit, KV length, commit mode, state dtype,
    MTP caches; mixed commit modes are an error naming both."""
    cache = model.init_cache(2, 20, t_max=3, state_dtype=jnp.float32, commit_mode="intermediate")
    assert (cache.t_max, cache.max_len, cache.commit_mode, cache.state_dtype, cache.has_mtp) == (
        3, 20, "intermediate", "float32", True)
    other = model.init_cache(2, 20, t_max=3, commit_mode="replay")
    assert (other.commit_mode, other.state_dtype) == ("replay", "bfloat16")
    mixed = cache.replace(layers=(other.layers[0],) + cache.layers[1:])
    with pytest.raises(ValueError, match=r"mixed commit modes \['intermediate', 'replay'\]"):
        mixed.commit_mode
    with pytest.raises(ValueError, match="generate: .*mixed commit modes"):
        S.generate(model, PROMPTS[:2], LENGTHS[:2], num_draft=1, max_new_tokens=2, cache=mixed,
                   slots=jnp.arange(2))
    assert cache.replace(mtp=()).has_mtp is False
    assert S._DEFAULTS["num_draft"] == 3 and S._DEFAULTS["commit_mode"] == "auto"
    # "auto" resolves where the cache is made: replay off Hopper (here), ring on it from
    # RING_FROM_BATCH rows (tests/ops/test_dispatch.py); a cache passed in keeps its own mode
    cfg, _, _ = S._prepare(model, PROMPTS[:2], LENGTHS[:2], **{**S._DEFAULTS, "max_new_tokens": 2})
    assert cfg.commit_mode == dispatch.commit_mode_for(2, 3, jnp.bfloat16)
    cfg, _, _ = S._prepare(model, PROMPTS[:2], LENGTHS[:2], **{
        **S._DEFAULTS, "num_draft": 2, "max_new_tokens": 2, "cache": cache,
        "slots": jnp.arange(2)})
    assert cfg.commit_mode == "intermediate"
    with pytest.raises(ValueError, match="generate: commit_mode expected 'auto' or one of"):
        S.generate(model, PROMPTS[:2], LENGTHS[:2], max_new_tokens=2, commit_mode="fifo")


@pytest.mark.parametrize("commit_mode", ["replay", "ring"])
def test_forced_accept_length(model, commit_mode):
    """SpecConfig(forced_accept_length=L), the benchmarks' knob: rounds keep Binomial(d, (L-1)/d)
    drafts per row whatever the target says, so the mean accept length is L, and the target's KV
    caches grow by exactly the tokens kept."""
    B, d, L, rounds, context = 8, 3, 3.39, 40, 5
    cfg = S.SpecConfig(num_draft=d, max_new_tokens=rounds * (d + 1), forced_accept_length=L,
                       commit_mode=commit_mode)
    cache = model.init_cache(B, context + rounds * (d + 1) + d + 1, t_max=d + 1,
                             state_dtype=jnp.float32, commit_mode=commit_mode)
    cache = cache.replace(lengths=jnp.full_like(cache.lengths, context), mtp=tuple(
        c.replace(lengths=jnp.full_like(c.lengths, context)) for c in cache.mtp))
    slots = jnp.arange(B, dtype=jnp.int32)
    pending = jnp.asarray(np.random.default_rng(0).integers(0, 64, B), jnp.int32)
    state = S.loop_state(cache, pending, jnp.zeros((B, model.config.hidden_size), model.dtype),
                         cfg)
    max_new = jnp.full((B,), rounds * (d + 1), jnp.int32)
    graphdef, params = nnx.split(model)

    @jax.jit
    def run(params, state):
        m = nnx.merge(graphdef, params)
        return lax.fori_loop(0, rounds, lambda _, c: S.round_step(m, c, slots, max_new,
                                                                  jax.random.key(3), cfg), state)

    out = run(params, state)
    accepted, row_rounds = np.asarray(out.accepted), np.asarray(out.row_rounds)
    assert (row_rounds == rounds).all()
    mean = (accepted.sum() + row_rounds.sum()) / row_rounds.sum()
    # 320 draws of a Binomial(3, 0.797): the mean's standard error is about 0.04
    assert abs(mean - L) < 0.2, mean
    np.testing.assert_array_equal(np.asarray(out.cache.lengths), context + accepted + rounds)
    with pytest.raises(ValueError, match="forced_accept_length expected 1..num_draft"):
        S.SpecConfig(num_draft=2, max_new_tokens=4, forced_accept_length=3.5)
