"""MTP speculative decoding for Qwen3-Next / Qwen3.5, as one `jax.jit` program.

    generate(model, prompts, prompt_lengths, num_draft=3, max_new_tokens=..., key=...)

runs, for a whole batch of right-padded prompts of different lengths, inside a single jitted
program: a ragged prefill of the target (and of the MTP head over the shifted prompt), then a
`lax.while_loop` over rounds. One round, for every live row:

    1. MTP extend: the pairs (target hidden h_t, token t+1) of the tokens accepted last round go
       through the MTP head in one call (its own KV cache, committed by count); the output at the
       last accepted pair gives draft 1 (the LM head reads that pair's row alone: `logits_at`).
    2. d - 1 chained MTP decode steps (hidden := the MTP's own output, token := the last draft);
       their KV entries are provisional and are overwritten by the next round's extend.
    3. Verify: the target runs [pending token, draft 1 .. draft d] (T = d + 1) through the GDN
       verify path, attention without advancing its length.
    4. Accept per row (greedy or speculative sampling), emit the accepted drafts plus one target
       token (the correction, or the bonus when every draft passed), and commit the target's GDN
       states, conv windows and KV caches to `num_accepted = accepted drafts + 1` tokens.
    5. Rows that hit a stop token or their max_new_tokens stop: from the next round on their slot
       is passed as padding (-1), so nothing of theirs is read or written any more.

With d = 0 the same entry point runs plain decoding (one target decode step per round, no MTP):
the baseline.

Invariant (per row, at the start of a round): the target cache holds L tokens, the MTP cache L - m,
where m = number of pairs waiting for the extend (1 after prefill; accepted + 1 after a round).
Positions follow vLLM: the MTP entry of pair (h_t, x_{t+1}) sits at position t.

Acceptance (`temperature > 0`): standard speculative sampling. With p the target's and q the
MTP's distribution after the same temperature / top-k / top-p processing, draft x is accepted with
probability min(1, p(x) / q(x)); at the first rejection the token is drawn from
normalise(max(p - q, 0)); when all d drafts pass, a bonus token is drawn from p at position d + 1.
The output follows the target's (processed) distribution exactly. `temperature == 0`: greedy; a
draft is accepted while it equals the target's argmax, and the output equals plain greedy decoding.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from gdn_jax._compat import concrete_value
from gdn_jax.models.qwen3_next import COMMIT_MODES, commit_mode_for

_F32 = jnp.float32
_I32 = jnp.int32


class GenerateOutput(NamedTuple):
    """What `generate` returns (device arrays).

    tokens:        [B, max_new_tokens] int32, generated tokens; positions >= lengths[i] hold pad_id
    lengths:       [B] int32, tokens generated per row (a stop token included, when one was hit)
    rounds:        [] int32, loop iterations run (the prefill's first token not counted)
    row_rounds:    [B] int32, rounds in which each row was live (verify forwards it took part in)
    accepted:      [B] int32, drafts accepted per row over all its rounds (before truncation at a
                   stop token or max_new_tokens)
    accept_length: [] fp32, tokens per round = (sum(accepted) + sum(row_rounds)) / sum(row_rounds),
                   in 1..d + 1 (sglang's avg_spec_accept_length); 1 for d = 0
    cache:         the model cache after the last round (the one passed in, or a fresh one)
    """

    tokens: jax.Array
    lengths: jax.Array
    rounds: jax.Array
    row_rounds: jax.Array
    accepted: jax.Array
    accept_length: jax.Array
    cache: object


@dataclasses.dataclass(frozen=True)
class SpecConfig:
    """Static settings of one compiled `generate` program (hashable; see `generate`)."""

    num_draft: int
    max_new_tokens: int  # the static bound (buffer width); rows may ask for fewer
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_tokens: tuple[int, ...] = ()
    pad_id: int = 0
    commit_mode: str = "replay"
    state_dtype: str = "bfloat16"
    max_len: int = 0
    # Benchmarks only (`round_step`; `generate` never sets it): each row keeps a number of drafts
    # drawn Binomial(d, (L - 1) / d) per round, whatever the target says, so that the mean accept
    # length is L: a real run's commits, folds and KV growth on a model that accepts nothing.
    forced_accept_length: float | None = None

    def __post_init__(self):
        L = self.forced_accept_length
        if L is not None and not 1.0 <= L <= self.num_draft + 1:
            raise ValueError(f"SpecConfig: forced_accept_length expected 1..num_draft + 1 = "
                             f"{self.num_draft + 1}, got {L}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# ----------------------------------------------------------------------------------------------
# Sampling


def sampling_probs(logits, temperature: float, top_k: int = 0, top_p: float = 1.0):
    """The distribution sampled from: softmax(logits / temperature), then top-k, then top-p
    (the smallest set of most likely tokens whose mass reaches top_p), renormalised.

    logits: [..., V] -> probs [..., V] fp32. temperature > 0; top_k = 0 and top_p = 1: off.
    """
    x = logits.astype(_F32) / temperature
    if top_k <= 0 and top_p >= 1.0:
        return jax.nn.softmax(x, axis=-1)
    V = x.shape[-1]
    order = jnp.argsort(-x, axis=-1)  # most likely first
    xs = jnp.take_along_axis(x, order, axis=-1)
    keep = jnp.ones(xs.shape, bool)
    if 0 < top_k < V:
        keep = keep & (jnp.arange(V) < top_k)
    ps = jax.nn.softmax(jnp.where(keep, xs, -jnp.inf), axis=-1)
    if top_p < 1.0:
        before = jnp.cumsum(ps, axis=-1) - ps  # mass of the more likely tokens
        keep = keep & (before < top_p)
        ps = jnp.where(keep, ps, 0.0)
        ps = ps / jnp.sum(ps, axis=-1, keepdims=True)
    inverse = jnp.argsort(order, axis=-1)
    return jnp.take_along_axis(ps, inverse, axis=-1)


def _categorical(key, probs):
    """One draw per row from probs [B, V] -> [B] int32."""
    return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(_I32)


def _pick(x, idx):
    """x[i, idx[i]] for x [B, T, ...], idx [B] -> [B, ...]."""
    return jnp.take_along_axis(x, idx.reshape((-1, 1) + (1,) * (x.ndim - 2)), axis=1)[:, 0]


def accept_drafts(target_logits, drafts, draft_probs, key, cfg: SpecConfig):
    """Acceptance for one round, per row.

    target_logits: [B, d + 1, V] fp32, the target's logits over [pending token, drafts];
    drafts: [B, d] int32; draft_probs: [B, d, V] fp32 (the MTP's processed q; unused when greedy).
    Returns (num_accepted_drafts [B] int32 in 0..d, next_token [B] int32): the correction at the
    first rejected draft, or the bonus token after d accepted drafts.
    """
    d = drafts.shape[1]
    if cfg.greedy:
        best = jnp.argmax(target_logits, axis=-1).astype(_I32)  # [B, d + 1]
        ok = drafts == best[:, :d]
        n = jnp.sum(jnp.cumprod(ok.astype(_I32), axis=1), axis=1).astype(_I32)
        return n, _pick(best, n)
    p = sampling_probs(target_logits, cfg.temperature, cfg.top_k, cfg.top_p)  # [B, d + 1, V]
    k_u, k_x = jax.random.split(key)
    pd = p[:, :d]
    px = jnp.take_along_axis(pd, drafts[..., None], axis=-1)[..., 0]  # [B, d]
    qx = jnp.take_along_axis(draft_probs, drafts[..., None], axis=-1)[..., 0]
    u = jax.random.uniform(k_u, px.shape, _F32)
    ok = u * qx < px  # probability min(1, p / q)
    n = jnp.sum(jnp.cumprod(ok.astype(_I32), axis=1), axis=1).astype(_I32)
    resid = jnp.concatenate([jnp.maximum(pd - draft_probs, 0.0), p[:, d:]], axis=1)
    r = _pick(resid, n)  # [B, V]
    total = jnp.sum(r, axis=-1, keepdims=True)
    r = jnp.where(total > 0, r / jnp.where(total > 0, total, 1.0), _pick(p, n))
    return n, _categorical(k_x, r)


def _forced_accepts(key, B: int, d: int, accept_length: float):
    """[B] int32 drafts kept, Binomial(d, (L - 1) / d): mean L - 1 (SpecConfig's benchmark knob)."""
    p = (accept_length - 1.0) / d
    return jnp.sum(jax.random.uniform(key, (B, d)) < p, axis=1).astype(_I32)


def _draw(logits, key, cfg: SpecConfig):
    """A token from logits [B, V]: (token [B] int32, its processed probs [B, V] or None)."""
    if cfg.greedy:
        return jnp.argmax(logits, axis=-1).astype(_I32), None
    q = sampling_probs(logits, cfg.temperature, cfg.top_k, cfg.top_p)
    return _categorical(key, q), q


# ----------------------------------------------------------------------------------------------
# The program


class _Carry(NamedTuple):
    cache: object
    buf: jax.Array        # [B, N + d + 1] int32 output buffer
    n_out: jax.Array      # [B] int32 tokens emitted
    done: jax.Array       # [B] bool
    pending: jax.Array    # [B] int32, the emitted token the target has not run yet
    mtp_tok: jax.Array    # [B, d + 1] int32, tokens of the pairs waiting for the MTP extend
    mtp_hid: jax.Array    # [B, d + 1, hidden], target hidden of those pairs
    mtp_n: jax.Array      # [B] int32, pairs waiting (1..d + 1)
    rounds: jax.Array     # [] int32
    row_rounds: jax.Array  # [B] int32
    accepted: jax.Array   # [B] int32


def _emit(carry: _Carry, emitted, count, max_new, cfg: SpecConfig):
    """Append emitted[:, :count] ([B, W] int32) to the live rows' output, truncated at the first
    stop token and at max_new; returns (buf, n_out, done, count kept [B] (0 for rows done))."""
    W = emitted.shape[1]
    live = ~carry.done
    idx = jnp.arange(W)[None, :]
    valid = idx < count[:, None]
    if cfg.stop_tokens:
        stop = jnp.isin(emitted, jnp.asarray(cfg.stop_tokens, _I32)) & valid
        first = jnp.min(jnp.where(stop, idx, W), axis=1)
        hit = first < W
        count = jnp.where(hit, jnp.minimum(count, first + 1), count)
    else:
        hit = jnp.zeros(count.shape, bool)
    room = max_new - carry.n_out
    count = jnp.where(live, jnp.minimum(count, room), 0)
    buf = jax.vmap(lambda row, e, s: lax.dynamic_update_slice_in_dim(row, e, s, axis=0))(
        carry.buf, emitted, carry.n_out)  # beyond n_out + count: overwritten later or masked
    n_out = carry.n_out + count
    done = carry.done | (live & hit) | (n_out >= max_new)
    return buf, n_out, done, count


def _round(model, c: _Carry, slots, max_new, key_loop, cfg: SpecConfig) -> _Carry:
    """One round of the loop (module docstring) for the rows not done; the while-loop body."""
    d, T = cfg.num_draft, cfg.num_draft + 1
    zeros = jnp.zeros(slots.shape, _I32)
    rkey = jax.random.fold_in(key_loop, c.rounds)
    live = ~c.done
    live_slots = jnp.where(live, slots, -1)
    cache = c.cache
    if d == 0:
        out = model(c.pending[:, None], cache, live_slots, mode="decode")
        nxt, _ = _draw(out.logits[:, 0], rkey, cfg)
        n_acc, cache = zeros, out.cache
        buf, n_out, done, _ = _emit(c, nxt[:, None], n_acc + 1, max_new, cfg)
    else:
        # 1. MTP extend over the pairs accepted last round; draft 1 from the last pair
        m = model.mtp_forward(c.mtp_tok, c.mtp_hid, cache, live_slots, mode="verify",
                              logits_at=c.mtp_n - 1)
        cache = model.commit_mtp(m.cache, live_slots, c.mtp_n)
        mtp_lengths = cache.mtp[0].lengths
        logits, h = m.logits[:, 0], _pick(m.hidden, c.mtp_n - 1)
        drafts, qs = [], []
        for j in range(d):
            if j > 0:  # 2. chained draft steps (provisional KV entries)
                m = model.mtp_forward(drafts[-1][:, None], h[:, None], cache, live_slots,
                                      mode="decode")
                logits, h, cache = m.logits[:, 0], m.hidden[:, 0], m.cache
            x, q = _draw(logits, jax.random.fold_in(rkey, j), cfg)
            drafts.append(x)
            qs.append(q)
        mtp = (cache.mtp[0].replace(lengths=mtp_lengths),) + cache.mtp[1:]
        cache = cache.replace(mtp=mtp)
        drafts = jnp.stack(drafts, axis=1)  # [B, d]
        q = None if cfg.greedy else jnp.stack(qs, axis=1)
        # 3. verify [pending, drafts] with the target
        out = model(jnp.concatenate([c.pending[:, None], drafts], axis=1), cache,
                    live_slots, mode="verify")
        # 4. accept, emit, commit what was kept (all n_acc + 1 tokens unless the row stopped
        #    inside the run: then exactly the tokens it emitted, so the final cache holds
        #    prompt + output[:-1] as plain decoding leaves it)
        n_acc, nxt = accept_drafts(out.logits, drafts, q, jax.random.fold_in(rkey, d), cfg)
        if cfg.forced_accept_length is not None:
            n_acc = _forced_accepts(jax.random.fold_in(rkey, d + 1), slots.shape[0], d,
                                    cfg.forced_accept_length)
            nxt = _pick(jnp.argmax(out.logits, axis=-1).astype(_I32), n_acc)
        emitted = jnp.where(jnp.arange(T)[None, :] < n_acc[:, None],
                            jnp.pad(drafts, ((0, 0), (0, 1))), nxt[:, None])
        buf, n_out, done, kept = _emit(c, emitted, n_acc + 1, max_new, cfg)
        cache = model.commit(out.cache, live_slots, kept)
        c = c._replace(mtp_tok=emitted, mtp_hid=out.hidden, mtp_n=n_acc + 1)
    return c._replace(
        cache=cache, buf=buf, n_out=n_out, done=done, pending=nxt, rounds=c.rounds + 1,
        row_rounds=c.row_rounds + live.astype(_I32),
        accepted=c.accepted + jnp.where(live, n_acc, 0))


def loop_state(cache, pending, hidden, cfg: SpecConfig) -> _Carry:
    """The loop's state at the start of the first round, after a prefill (what `round_step`
    takes and returns; its fields are the loop's business).

    cache: the model cache after the prefill (target and MTP); pending: [B] int32, the first
    token (drawn from the prefill, not yet run by the target); hidden: [B, hidden], the target's
    hidden at the last prompt token (the MTP pair waiting for the first extend). Nothing is
    emitted yet (`generate` emits `pending` itself); the output buffer holds
    cfg.max_new_tokens + num_draft + 1 tokens per row.
    """
    B = pending.shape[0]
    T = cfg.num_draft + 1
    zeros = jnp.zeros((B,), _I32)
    return _Carry(cache=cache, buf=jnp.full((B, cfg.max_new_tokens + T), cfg.pad_id, _I32),
                  n_out=zeros, done=jnp.zeros((B,), bool), pending=pending,
                  mtp_tok=jnp.zeros((B, T), _I32).at[:, 0].set(pending),
                  mtp_hid=jnp.zeros((B, T) + hidden.shape[1:], hidden.dtype).at[:, 0].set(hidden),
                  mtp_n=jnp.ones((B,), _I32), rounds=jnp.zeros((), _I32), row_rounds=zeros,
                  accepted=zeros)


def round_step(model, state: _Carry, slots, max_new, key, cfg: SpecConfig) -> _Carry:
    """One round of the loop (module docstring), exactly as `generate`'s while loop runs it: the
    public step for benchmarks and custom loops (chain it in a `lax.fori_loop` to time rounds).

    model: the Qwen3NextForCausalLM (merged, inside the traced function); state: from
    `loop_state` or the previous round; slots: [B] int32; max_new: [B] int32 tokens to emit per
    row; key: the loop's PRNG key (each round folds in its round number); cfg: the SpecConfig.
    Rows done (a stop token, max_new reached) are passed as padding. Returns the next state;
    `state.cache` and `state.pending` (the token the target runs next) are the useful fields.
    """
    return _round(model, state, slots, max_new, key, cfg)


def _core(graphdef, params, prompts, prompt_lengths, max_new, key, cache, slots, *,
          cfg: SpecConfig):
    model = nnx.merge(graphdef, params)
    B, P = prompts.shape
    d, N = cfg.num_draft, cfg.max_new_tokens
    T = d + 1
    rows = jnp.arange(B)
    if cache is None:
        cache = model.init_cache(B, cfg.max_len, t_max=T, state_dtype=jnp.dtype(cfg.state_dtype),
                                 commit_mode=cfg.commit_mode)
        slots = rows.astype(_I32)
    cache = model.reset(cache, slots)
    key_first, key_loop = jax.random.split(key)

    # ---- prefill: target over the prompts; MTP over the pairs (h_t, x_{t+1}), t < P_i - 1
    out = model(prompts, cache, slots, mode="prefill", lengths=prompt_lengths)
    last = prompt_lengths - 1
    first, _ = _draw(_pick(out.logits, last), key_first, cfg)
    cache = out.cache
    hidden_last = _pick(out.hidden, last)  # [B, hidden]
    if d > 0:
        shifted = jnp.concatenate([prompts[:, 1:], jnp.full((B, 1), cfg.pad_id, _I32)], axis=1)
        cache = model.mtp_forward(shifted, out.hidden, cache, slots, mode="prefill",
                                  lengths=prompt_lengths - 1).cache
    carry = loop_state(cache, first, hidden_last, cfg)
    buf, n_out, done, _ = _emit(carry, first[:, None], jnp.ones((B,), _I32), max_new, cfg)
    carry = carry._replace(buf=buf, n_out=n_out, done=done)

    def cond(c: _Carry):
        return jnp.any(~c.done) & (c.rounds < N)

    def body(c: _Carry):
        return round_step(model, c, slots, max_new, key_loop, cfg)

    c = lax.while_loop(cond, body, carry)
    tokens = jnp.where(jnp.arange(N)[None, :] < c.n_out[:, None], c.buf[:, :N], cfg.pad_id)
    total_rounds = jnp.sum(c.row_rounds)
    accept_length = jnp.where(
        total_rounds > 0,
        (jnp.sum(c.accepted) + total_rounds).astype(_F32) / jnp.maximum(total_rounds, 1), 1.0)
    return GenerateOutput(tokens, c.n_out, c.rounds, c.row_rounds, c.accepted, accept_length,
                          c.cache)


_core_jit = jax.jit(_core, static_argnames=("graphdef", "cfg"), donate_argnames=("cache",))


# ----------------------------------------------------------------------------------------------
# Public entry point


def _prepare(model, prompts, prompt_lengths, *, num_draft, max_new_tokens, temperature, top_k,
             top_p, stop_tokens, pad_id, key, cache, slots, commit_mode, state_dtype, max_len):
    """Check the arguments; return (cfg, graphdef, params, args)."""
    if not isinstance(num_draft, (int, np.integer)) or num_draft < 0:
        raise ValueError(f"generate: num_draft must be an int >= 0, got {num_draft!r}")
    d = int(num_draft)
    if d > 0 and getattr(model, "mtp", None) is None:
        raise ValueError("generate: num_draft > 0 needs a model with an MTP head (with_mtp=True); "
                         "use num_draft=0 for plain decoding")
    if d > 0 and len(model.mtp.layers) != 1:
        raise ValueError(f"generate: the draft loop reuses one MTP layer (Qwen3-Next / Qwen3.5); "
                         f"this model has {len(model.mtp.layers)}")
    prompts = jnp.asarray(prompts)
    if prompts.ndim != 2 or not jnp.issubdtype(prompts.dtype, jnp.integer):
        raise ValueError(f"generate: prompts must be [B, P] integers, got shape {prompts.shape} "
                         f"dtype {prompts.dtype}")
    prompts = prompts.astype(_I32)
    B, P = prompts.shape
    prompt_lengths = jnp.asarray(prompt_lengths)
    if prompt_lengths.shape != (B,):
        raise ValueError(f"generate: prompt_lengths must be [B] = [{B}], got shape "
                         f"{prompt_lengths.shape}")
    prompt_lengths = prompt_lengths.astype(_I32)
    pl = concrete_value(prompt_lengths)
    if pl is not None and (pl.min() < 1 or pl.max() > P):
        raise ValueError(f"generate: prompt_lengths must be in 1..P = {P}, got {pl.tolist()}")
    mn = concrete_value(max_new_tokens)
    if mn is None:
        raise ValueError("generate: max_new_tokens must be concrete (an int or a [B] array)")
    mn = np.broadcast_to(np.asarray(mn), (B,)) if np.ndim(mn) == 0 else np.asarray(mn)
    if mn.shape != (B,) or not np.issubdtype(mn.dtype, np.integer) or mn.min() < 1:
        raise ValueError(f"generate: max_new_tokens must be an int >= 1 or [B] ints >= 1, got "
                         f"{max_new_tokens!r}")
    N = int(mn.max())
    if not temperature >= 0:
        raise ValueError(f"generate: temperature must be >= 0 (0: greedy), got {temperature!r}")
    if not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValueError(f"generate: top_k must be an int >= 0 (0: off), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p!r}")
    stop_tokens = tuple(int(t) for t in np.atleast_1d(np.asarray(stop_tokens, np.int64)))
    if commit_mode not in COMMIT_MODES + ("auto",):
        raise ValueError(f"generate: commit_mode expected 'auto' or one of {COMMIT_MODES}, got "
                         f"{commit_mode!r}")
    need = P + N + d
    if cache is None:
        if slots is not None:
            raise ValueError("generate: slots are for a cache passed in (cache=...)")
        max_len = need if max_len is None else int(max_len)
        if max_len < need:
            raise ValueError(f"generate: max_len = {max_len} is too short for prompts of {P} "
                             f"tokens + max_new_tokens {N} + num_draft {d} (needs {need})")
        sd = jnp.dtype(state_dtype)
        if sd not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
            raise ValueError(f"generate: state_dtype must be bfloat16 or float32, got {sd}")
        state_dtype = sd.name
    else:
        if max_len is not None:
            raise ValueError("generate: max_len is for a cache made here (cache=None)")
        if slots is None:
            raise ValueError("generate: a cache passed in needs slots ([B] int32)")
        slots = jnp.asarray(slots).astype(_I32)
        if slots.shape != (B,):
            raise ValueError(f"generate: slots must be [B] = [{B}], got {slots.shape}")
        try:
            t_max, cache_len, modes = cache.t_max, cache.max_len, cache.commit_mode
        except ValueError as e:
            raise ValueError(f"generate: {e}") from None
        if t_max is not None and t_max < d + 1:
            raise ValueError(f"generate: num_draft + 1 = {d + 1} verify tokens exceed the cache's "
                             f"t_max = {t_max} (model.init_cache(t_max=...))")
        if cache_len is not None and cache_len < need:
            raise ValueError(f"generate: the cache holds {cache_len} tokens per slot; prompts "
                             f"of {P} + max_new_tokens {N} + num_draft {d} need {need}")
        if d > 0 and not cache.has_mtp:
            raise ValueError("generate: the cache has no MTP KV cache (init_cache of a model "
                             "with an MTP head)")
        commit_mode = modes or commit_mode
        state_dtype = cache.state_dtype or jnp.dtype(state_dtype).name
        max_len = 0
    if key is None:
        if temperature > 0:
            raise ValueError("generate: sampling (temperature > 0) needs a PRNG key (key=...)")
        key = jax.random.key(0)
    if commit_mode == "auto":
        commit_mode = commit_mode_for(B, d, state_dtype)
    cfg = SpecConfig(num_draft=d, max_new_tokens=N, temperature=float(temperature),
                     top_k=int(top_k), top_p=float(top_p), stop_tokens=stop_tokens,
                     pad_id=int(pad_id), commit_mode=commit_mode, state_dtype=state_dtype,
                     max_len=max_len)
    graphdef, params = nnx.split(model)
    args = (params, prompts, prompt_lengths, jnp.asarray(mn, _I32), key, cache, slots)
    return cfg, graphdef, args


def generate(model, prompts, prompt_lengths, *, num_draft: int = 3, max_new_tokens=64,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, stop_tokens=(),
             pad_id: int = 0, key=None, cache=None, slots=None, commit_mode: str = "auto",
             state_dtype=jnp.bfloat16, max_len: int | None = None) -> GenerateOutput:
    """Generate with MTP speculative decoding (num_draft > 0) or plainly (num_draft = 0), the
    whole loop in one jitted program (module docstring).

    model: Qwen3NextForCausalLM (with an MTP head when num_draft > 0).
    prompts: [B, P] int32, right-padded; prompt_lengths: [B] int32 in 1..P.
    num_draft: d, drafts per round (verify T = d + 1 tokens).
    max_new_tokens: int, or [B] ints (per row; concrete): tokens to generate, the first (from the
        prefill) included.
    temperature: 0 greedy; > 0 sampling with top_k (0: off) and top_p (1: off), applied the same
        to the target's p and the MTP's q.
    stop_tokens: ints (EOS and others); a row stops after emitting one (it is kept in its output).
    key: a jax PRNG key (needed when sampling); the result is a function of the key.
    cache, slots: a ModelCache from model.init_cache (t_max >= d + 1, max_len >= P +
        max_new_tokens + d) and the slot of each row, donated and returned; the rows' slots are
        reset first. None: a fresh cache for B slots in `state_dtype` (bf16 | fp32) and
        `commit_mode` (`ops.COMMIT_MODES`: "replay", "intermediate" or "ring"; "auto", the
        default: ring where it measured faster -- Hopper, bf16 state, B >= 32, num_draft > 0 --
        else replay, `gdn_jax.ops.dispatch.commit_mode_for`), max_len tokens (default P +
        max_new + d).
    Returns GenerateOutput(tokens [B, N], lengths [B], rounds, row_rounds [B], accepted [B],
    accept_length, cache), N = max(max_new_tokens).

    >>> out = generate(model, prompts, lengths, num_draft=3, max_new_tokens=128,
    ...                stop_tokens=(eos,), key=jax.random.key(0))  # doctest: +SKIP
    """
    cfg, graphdef, args = _prepare(
        model, prompts, prompt_lengths, num_draft=num_draft, max_new_tokens=max_new_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stop_tokens,
        pad_id=pad_id, key=key, cache=cache, slots=slots, commit_mode=commit_mode,
        state_dtype=state_dtype, max_len=max_len)
    return _core_jit(graphdef, *args, cfg=cfg)


# generate's keyword defaults, for the inspection entry points below.
_DEFAULTS = {name: p.default for name, p in inspect.signature(generate).parameters.items()
             if p.kind is inspect.Parameter.KEYWORD_ONLY}


def generate_jaxpr(model, prompts, prompt_lengths, **kwargs):
    """The ClosedJaxpr of the program `generate` runs for these arguments (for inspection: one
    while loop, no host callbacks)."""
    cfg, graphdef, args = _prepare(model, prompts, prompt_lengths, **{**_DEFAULTS, **kwargs})
    return jax.make_jaxpr(functools.partial(_core, graphdef, cfg=cfg))(*args)


def lower_generate(model, prompts, prompt_lengths, **kwargs):
    """The `jax.stages.Lowered` program `generate` runs for these arguments (`.compile()
    .as_text()` is the optimized HLO: its collectives on a mesh, its kernels)."""
    cfg, graphdef, args = _prepare(model, prompts, prompt_lengths, **{**_DEFAULTS, **kwargs})
    return _core_jit.lower(graphdef, *args, cfg=cfg)
