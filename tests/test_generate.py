"""KV-cached generation: parity with full recompute and transformers generate, sampling math, penalties, stop
tokens, thinking budget, tool calls, streaming, continuous batching.

Deterministic text tests use a "table model": a 1-layer Qwen3 whose attention and MLP outputs are zeroed, so the
logits depend only on the current token (embed row = one-hot, lm_head row = the wanted next-token logits). With
the real Qwen tokenizer it emits any chosen text, split into tokens of our choice."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from qwen3_jax import Qwen3Config, Qwen3ForCausalLM, Runtime
from qwen3_jax.infer import Request, SamplingParams, Tokenizer, generate, iter_generate, stream
from qwen3_jax.infer.sampling import apply_penalties, filter_logits, sample
from qwen3_jax.moe import moe_experts, moe_experts_gather, route_topk

GREEDY = SamplingParams(temperature=0.0)


def _rand_prompts(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


# ---------------------------------------------------------------------------------------------- decode MoE path
def test_gather_moe_equals_sorted_grouped_matmul():
    rng = np.random.default_rng(0)
    t, d, f, e, k = 5, 24, 16, 12, 3
    p = {n: jnp.asarray(rng.normal(size=s), jnp.float32) for n, s in
         [("router", (d, e)), ("gate_proj", (e, d, f)), ("up_proj", (e, d, f)), ("down_proj", (e, f, d))]}
    x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
    w_tk, e_tk = route_topk(x @ p["router"], k, True)
    np.testing.assert_allclose(moe_experts_gather(x, w_tk, e_tk, p), moe_experts(x, w_tk, e_tk, p, ks=Runtime().kernels),
                               rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------- parity
def test_cached_decode_equals_full_recompute_argmax_every_step(reference):
    """Ragged prompts; every generated token is the argmax of a full (uncached) forward over prompt + output."""
    _, _, model = reference("moe_mixed_yarn_tied")
    prompts = _rand_prompts(model.config.vocab_size, [3, 11, 6])
    res = generate(model, prompts, GREEDY, max_new_tokens=9, stop_token_ids=[])
    full = np.zeros((len(prompts), 11 + 9), np.int32)  # prompt + output, right-padded: one uncached forward
    for i, (p, r) in enumerate(zip(prompts, res)):
        assert r.finish_reason == "length" and len(r.token_ids) == 9 and r.text is None
        full[i, :len(p) + 9] = p + r.token_ids
    mask = (np.arange(full.shape[1])[None] < np.array([[len(p) + 9] for p in prompts])).astype(np.int32)
    logits = np.asarray(model(jnp.asarray(full), attention_mask=jnp.asarray(mask)).logits)
    for i, (p, r) in enumerate(zip(prompts, res)):
        np.testing.assert_array_equal(logits[i, len(p) - 1:len(p) + 8].argmax(-1), r.token_ids)


@pytest.mark.parametrize("name,kv_cache,scan", [
    ("moe_uniform", "carried", True), ("moe_uniform", "deferred", True), ("moe_mixed_yarn_tied", "carried", True),
    ("moe_mixed_yarn_tied", "deferred", True), ("moe_mixed_yarn_tied", "carried", False),
    ("moe_mixed_yarn_tied", "deferred", False)])
def test_cache_in_chunks_equals_full_forward(reference, name, kv_cache, scan):
    """Model-level cache contract: ragged prefill, a ragged multi-token append onto a non-empty cache (T > 1 path),
    then single-token steps (T == 1 path): logits equal the uncached forward at the same positions. For both
    KV-cache strategies of the kernel seam (qwen3_jax.kernels `kv_cache`), the layers scanned or unrolled."""
    from qwen3_jax.model import KVCache

    _, _, model = reference(name)
    model = nnx.merge(*nnx.split(model))
    model.runtime = model.runtime.replace(kv_cache=kv_cache, scan_layers=scan)
    assert model.runtime.kernels.kv_cache == kv_cache
    ids = np.asarray(_rand_prompts(model.config.vocab_size, [12, 12], seed=5), np.int32)
    full = np.asarray(model(jnp.asarray(ids)).logits)
    cache = KVCache.init(model.config, 2, 16)
    n1, n2 = np.array([5, 3]), np.array([4, 6])  # chunk sizes per row
    chunk1 = np.stack([np.pad(ids[b, :n1[b]], (0, 5 - n1[b])) for b in range(2)])
    out = model(jnp.asarray(chunk1), attention_mask=jnp.asarray(np.arange(5)[None] < n1[:, None]), cache=cache)
    chunk2 = np.stack([np.pad(ids[b, n1[b]:n1[b] + n2[b]], (0, 6 - n2[b])) for b in range(2)])
    out2 = model(jnp.asarray(chunk2), attention_mask=jnp.asarray(np.arange(6)[None] < n2[:, None]), cache=out.cache)
    for b in range(2):
        np.testing.assert_allclose(np.asarray(out.logits[b, :n1[b]]), full[b, :n1[b]], atol=1e-4)
        np.testing.assert_allclose(np.asarray(out2.logits[b, :n2[b]]), full[b, n1[b]:n1[b] + n2[b]], atol=1e-4)
    cache, pos = out2.cache, n1 + n2
    np.testing.assert_array_equal(np.asarray(cache.lengths), pos)
    for _ in range(2):
        step = model(jnp.asarray(ids[np.arange(2), pos][:, None]), cache=cache)
        np.testing.assert_allclose(np.asarray(step.logits[:, 0]), full[np.arange(2), pos], atol=1e-4)
        cache, pos = step.cache, pos + 1


def test_cache_refuses_to_advance_past_its_slots(reference):
    """More new tokens than a cache has slots is an error (T > max_len at trace time; a row past its slots when the
    lengths are known, eagerly); under jit a row takes the slots it has left and its lengths stop at max_len."""
    from qwen3_jax.model import KVCache

    _, _, model = reference("moe_uniform")
    ids = jnp.asarray(_rand_prompts(model.config.vocab_size, [9, 9], seed=7), jnp.int32)
    six = model(ids[:, :6], cache=KVCache.init(model.config, 2, 8)).cache
    with pytest.raises(ValueError, match=r"KVCache: row 0: 6 cached \+ 3 new, row 1: 6 cached \+ 3 new > max_len 8"):
        model(ids[:, 6:], cache=six)
    step = nnx.jit(lambda m, x, mask, c: m(x, attention_mask=mask, cache=c))
    with pytest.raises(ValueError, match="9 new tokens per row do not fit a cache of max_len 8"):
        step(model, ids, jnp.ones((2, 9), jnp.int32), KVCache.init(model.config, 2, 8))
    out = step(model, ids[:, 6:], jnp.asarray([[1, 1, 1], [1, 0, 0]]), six)     # row 0: 2 of its 3 tokens fit
    np.testing.assert_array_equal(np.asarray(out.cache.lengths), [8, 7])
    fit = model(ids[:, 6:], attention_mask=jnp.asarray([[1, 1, 0], [1, 0, 0]]), cache=six)
    np.testing.assert_array_equal(np.asarray(out.cache.k), np.asarray(fit.cache.k))
    np.testing.assert_allclose(np.asarray(out.logits[0, :2]), np.asarray(fit.logits[0, :2]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.logits[1, :1]), np.asarray(fit.logits[1, :1]), atol=1e-5)


@pytest.mark.parametrize("name", ["moe_mixed_yarn_tied", "moe_uniform", "dense_yarn"])
def test_greedy_equals_transformers_generate_ragged_batch(reference, name):
    hf, _, model = reference(name)
    n_new = 10
    prompts = _rand_prompts(model.config.vocab_size, [7, 2, 12], seed=1)
    width = max(map(len, prompts))
    ids = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as transformers generates batches
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                          max_new_tokens=n_new, pad_token_id=0, eos_token_id=None)
    ref = out[:, width:].numpy()
    res = generate(model, prompts, GREEDY, max_new_tokens=n_new, stop_token_ids=[], batch_size=4)
    np.testing.assert_array_equal(np.array([r.token_ids for r in res]), ref)


def test_continuous_batching_equals_one_by_one(reference):
    _, _, model = reference("moe_uniform")
    lengths, news = [5, 1, 9, 3, 14, 2, 6], [4, 9, 2, 7, 3, 8, 5]
    prompts = _rand_prompts(model.config.vocab_size, lengths, seed=2)
    reqs = [Request(p, GREEDY, n, stop_token_ids=[]) for p, n in zip(prompts, news)]
    batched = list(iter_generate(model, reqs, batch_size=2, chunk=4))
    assert sorted(i for i, _ in batched) == list(range(len(reqs)))
    order = [i for i, _ in batched]
    assert order != sorted(order)  # short requests overtake long ones: rows were refilled as they finished
    by_idx = dict(batched)
    for i, r in enumerate(reqs):
        (alone,) = [res for _, res in iter_generate(model, [r], batch_size=1)]
        assert by_idx[i].token_ids == alone.token_ids and len(alone.token_ids) == news[i]
        assert by_idx[i].prompt_tokens == lengths[i] and by_idx[i].completion_tokens == news[i]


def test_seeded_sampling_reproducible_across_batch_composition(reference):
    _, _, model = reference("moe_uniform")
    prompts = _rand_prompts(model.config.vocab_size, [6, 4, 9], seed=3)
    sp = SamplingParams(temperature=1.5, top_k=50, top_p=0.98, seed=1234)
    a = generate(model, prompts[:1], sp, max_new_tokens=12, stop_token_ids=[])[0].token_ids
    b = generate(model, prompts[:1], sp, max_new_tokens=12, stop_token_ids=[])[0].token_ids
    reqs = [Request(prompts[1], sp.replace(seed=7), 12, []), Request(prompts[0], sp, 12, []),
            Request(prompts[2], GREEDY, 12, [])]
    c = dict(iter_generate(model, reqs, batch_size=4))[1].token_ids
    assert a == b == c
    other = generate(model, prompts[:1], sp.replace(seed=99), max_new_tokens=12, stop_token_ids=[])[0].token_ids
    greedy = generate(model, prompts[:1], GREEDY, max_new_tokens=12, stop_token_ids=[])[0].token_ids
    assert other != a and greedy != a


# ---------------------------------------------------------------------------------------------- sampling math
P5 = np.array([0.5, 0.2, 0.15, 0.1, 0.05])


def _kept(**kw):
    logits = jnp.asarray(np.log(P5)[None, ::-1].copy(), jnp.float32)  # reversed vocab order: the sort matters
    args = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) | kw
    out = filter_logits(logits, *(jnp.asarray([args[n]]) for n in ("temperature", "top_k", "top_p", "min_p")))
    return sorted(4 - i for i in np.nonzero(np.isfinite(np.asarray(out[0])))[0])  # back to P5 indices


def test_argmax_equals_jnp_argmax_ties_infs_nans():
    from qwen3_jax.infer.sampling import argmax

    rng = np.random.default_rng(3)
    x = rng.integers(-3, 3, (64, 37)).astype(np.float32)  # many ties
    x[5, :] = -np.inf
    x[6, 4] = np.inf
    x[7, [3, 9]] = np.nan
    x[8, :] = np.nan
    np.testing.assert_array_equal(np.asarray(jax.jit(argmax)(x)), np.argmax(x, -1))
    np.testing.assert_array_equal(np.asarray(argmax(jnp.asarray(x, jnp.bfloat16))), np.argmax(x, -1))


def test_top_k_top_p_min_p_masks_on_known_distribution():
    assert _kept() == [0, 1, 2, 3, 4]
    assert _kept(top_k=2) == [0, 1]
    assert _kept(top_p=0.6) == [0, 1]          # 0.5 < 0.6 -> also keep the next one
    assert _kept(top_p=0.45) == [0]
    assert _kept(top_p=0.71) == [0, 1, 2]
    assert _kept(min_p=0.29) == [0, 1, 2]      # p >= 0.29 * 0.5
    assert _kept(top_k=3, top_p=0.7) == [0, 1]  # top-p over the top-k renormalised: .5/.85 < .7 < .7/.85
    assert _kept(top_k=1, min_p=0.9) == [0]


def test_sampling_frequencies_follow_filtered_distribution():
    n = 20000
    logits = jnp.asarray(np.broadcast_to(np.log(P5), (n, 5)), jnp.float32)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(n))

    def freq(t=1.0, k=0, p=1.0, m=0.0):
        full = lambda v, dt: jnp.full((n,), v, dt)  # noqa: E731
        toks = sample(logits, keys, full(t, jnp.float32), full(k, jnp.int32), full(p, jnp.float32), full(m, jnp.float32))
        return np.bincount(np.asarray(toks), minlength=5) / n

    np.testing.assert_allclose(freq(), P5, atol=0.015)
    np.testing.assert_allclose(freq(k=3), np.r_[P5[:3] / P5[:3].sum(), 0, 0], atol=0.015)
    np.testing.assert_allclose(freq(p=0.6), np.r_[P5[:2] / P5[:2].sum(), 0, 0, 0], atol=0.015)
    np.testing.assert_allclose(freq(m=0.25), np.r_[P5[:3] / P5[:3].sum(), 0, 0], atol=0.015)
    sq = P5 ** 2 / (P5 ** 2).sum()
    np.testing.assert_allclose(freq(t=0.5), sq, atol=0.015)
    assert (freq(t=0.0) == np.r_[1.0, 0, 0, 0, 0]).all()


def test_penalties_vllm_semantics():
    logits = jnp.asarray([[4.0, -2.0, 1.0, 3.0]])
    seen = jnp.asarray([[True, True, False, True]])
    counts = jnp.asarray([[2, 0, 0, 1]])
    out = apply_penalties(logits, seen, counts, jnp.asarray([2.0]), jnp.asarray([0.3]), jnp.asarray([0.5]))
    np.testing.assert_allclose(out[0], [4 / 2 - 1.0 - 0.3, -2 * 2, 1.0, 3 / 2 - 0.5 - 0.3], rtol=1e-6)


# ---------------------------------------------------------------------------------------------- table models
def table_model(table: dict[int, dict[int, float]], vocab: int, max_len: int = 256):
    """Logits at a position depend only on its token: token a -> {next token: logit}; other tokens -> all zeros."""
    keys = sorted(table)
    d = len(keys) + 1
    cfg = Qwen3Config.from_dict(dict(model_type="qwen3", vocab_size=vocab, hidden_size=d, intermediate_size=8,
                                     num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, head_dim=8,
                                     tie_word_embeddings=False, max_position_embeddings=max_len, eos_token_id=None))
    m = Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0))
    emb, head = np.zeros((vocab, d), np.float32), np.zeros((d, vocab), np.float32)
    for j, a in enumerate(keys):
        emb[a, j] = 1.0
        for b, v in table[a].items():
            head[j, b] = v
    m.embed_tokens[...] = jnp.asarray(emb)
    m.lm_head[...] = jnp.asarray(head) / np.sqrt(d)  # rms_norm(one-hot) = sqrt(d) * one-hot
    m.layers.attn.o_proj[...] = jnp.zeros_like(m.layers.attn.o_proj[...])
    m.layers.mlp.down_proj[...] = jnp.zeros_like(m.layers.mlp.down_proj[...])
    return m


def chain(ids, last=None) -> dict[int, dict[int, float]]:
    t = {a: {b: 10.0} for a, b in zip(ids, ids[1:])}
    if last is not None:
        t[ids[-1]] = {last: 10.0}
    return t


def test_stop_tokens_and_length():
    m = table_model(chain([10, 11, 12, 13, 14, 15, 16]), vocab=40)
    r_stop, r_len, r_cfg = generate(m, [[10]], GREEDY, max_new_tokens=4, stop_token_ids=[13]) + \
        generate(m, [[10]], GREEDY, max_new_tokens=4, stop_token_ids=[30]) + \
        generate(m, [[12]], GREEDY, max_new_tokens=20, stop_token_ids=[15, 16])
    assert (r_stop.token_ids, r_stop.finish_reason) == ([11, 12, 13], "stop")   # the stop id ends the row (kept, as vLLM)
    assert (r_len.token_ids, r_len.finish_reason) == ([11, 12, 13, 14], "length")
    assert (r_cfg.token_ids, r_cfg.finish_reason, r_cfg.completion_tokens) == ([13, 14, 15], "stop", 3)


def test_penalties_in_the_engine():
    # 20 -> 20 (self loop, logit 10) or 21 (logit 9); tokens 0.. have all-zero logits
    m = table_model({20: {20: 10.0, 21: 9.0}, 21: {20: 10.0, 21: 9.0}}, vocab=32)
    run = lambda prompt, **kw: generate(m, [prompt], SamplingParams(temperature=0.0, **kw), 4, [])[0].token_ids  # noqa
    assert run([20]) == [20, 20, 20, 20]
    assert run([20], presence_penalty=100.0) == [20, 21, 0, 1]       # each output token is penalised once seen
    assert run([20], frequency_penalty=0.6) == [20, 20, 21, 20]      # 10 - .6 n vs 9 - .6 m
    assert run([20], repetition_penalty=2.0)[0] == 21                 # prompt token 20: 10 / 2 < 9
    assert run([21, 20], repetition_penalty=2.0)[0] == 20             # both seen: 10 / 2 > 9 / 2


@pytest.fixture(scope="module")
def qwen_tok(tmp_path_factory):
    return Tokenizer.build_qwen(cache_dir=tmp_path_factory.mktemp("qwen_tok"))


@pytest.fixture(scope="module")
def byte_tokens(qwen_tok):
    """{bytes: id} of the ordinary tokens up to 6 bytes."""
    out = {}
    for i in range(qwen_tok.vocab_size):
        if not qwen_tok.is_special_id(i):
            b = qwen_tok.token_bytes(i)
            if 0 < len(b) <= 6 and b not in out:
                out[b] = i
    return out


def distinct_tokens(tok, byte_tokens, pieces, used, shortest=False):
    """Token ids spelling the pieces (a special token string is one id), no id twice (the table model's
    next token must be a function of the current one)."""
    ids = []
    for piece in pieces:
        if piece in ("<think>", "</think>", "<tool_call>", "</tool_call>"):
            tid = tok.convert_tokens_to_ids(piece)
            assert tid not in used
            used.add(tid)
            ids.append(tid)
            continue
        data = piece.encode()

        def seg(pos):
            if pos == len(data):
                return []
            lens = range(1, min(6, len(data) - pos) + 1) if shortest else range(min(6, len(data) - pos), 0, -1)
            for n in lens:
                t = byte_tokens.get(data[pos:pos + n])
                if t is None or t in used:
                    continue
                used.add(t)
                rest = seg(pos + n)
                if rest is not None:
                    return [t] + rest
                used.discard(t)
            return None

        part = seg(0)
        assert part is not None, piece
        ids += part
    return ids


def _text_model(tok, byte_tokens, pieces, start=None, shortest=False, extra=None):
    """Table model whose greedy output after the prompt [start] is `pieces` then <|im_end|>."""
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    used = {eos} | ({start} if start else set())
    ids = distinct_tokens(tok, byte_tokens, pieces, used, shortest)
    start = start or byte_tokens[b"@@"]
    table = chain([start] + ids, last=eos)
    table.update(extra or {})
    return table_model(table, len(tok)), start, ids, eos


def test_reasoning_and_tool_calls(qwen_tok, byte_tokens):
    call = '{"name":"get_weather","arguments":{"city":"Paris"}}'
    pieces = ["<think>", "\nNeed the weather.\n", "</think>", "\n\nChecking.", "<tool_call>", call, "</tool_call>"]
    m, start, ids, eos = _text_model(qwen_tok, byte_tokens, pieces)
    (r,) = generate(m, [[start]], GREEDY, max_new_tokens=200, tokenizer=qwen_tok)
    assert r.token_ids == ids + [eos] and r.finish_reason == "stop"
    assert r.text == "".join(pieces)
    assert r.reasoning_content == "Need the weather." and r.content == "Checking."
    (tc,) = r.tool_calls
    assert tc["type"] == "function" and tc["id"].startswith("call_") and tc["function"]["name"] == "get_weather"
    assert json.loads(tc["function"]["arguments"]) == {"city": "Paris"}
    assert r.tool_call_errors == []
    # a malformed block stays in the content and is flagged
    bad = ["Sure.", "<tool_call>", '{"name": oops}', "</tool_call>"]
    m, start, ids, eos = _text_model(qwen_tok, byte_tokens, bad)
    (r,) = generate(m, [[start]], GREEDY, max_new_tokens=200, tokenizer=qwen_tok)
    assert r.tool_calls == [] and len(r.tool_call_errors) == 1
    assert r.content == "".join(bad) and r.reasoning_content is None


def test_thinking_budget_forces_end_of_thinking(qwen_tok, byte_tokens):
    think, end_think = qwen_tok.convert_tokens_to_ids("<think>"), qwen_tok.convert_tokens_to_ids("</think>")
    eos = qwen_tok.convert_tokens_to_ids("<|im_end|>")
    t1, t2, t3, nn, ans, start = (byte_tokens[b] for b in (b" alpha", b" beta", b" gamma", b"\n\n", b"Answer", b"@@"))
    forced = qwen_tok.encode("\n</think>\n\n", add_special_tokens=False)
    assert forced[1] == end_think and forced[-1] == nn
    # the model thinks forever (</think> is never likely), then answers once </think>\n\n is in its input
    table = {start: {think: 10.0}, think: {t1: 10.0}, t1: {t2: 10.0}, t2: {t3: 10.0}, t3: {t1: 10.0},
             nn: {ans: 10.0}, ans: {eos: 10.0}}
    m = table_model(table, len(qwen_tok))
    reqs = [Request([start], GREEDY, 30, thinking_budget=4),     # model opens <think> itself
            Request([start, think], GREEDY, 30, thinking_budget=2),  # prompt ends inside <think>
            Request([start, think], GREEDY, 30, thinking_budget=0),
            Request([start], GREEDY, 12)]                          # no budget: thinks until the length limit
    res = dict(iter_generate(m, reqs, tokenizer=qwen_tok, batch_size=4))
    assert res[0].token_ids == [think, t1, t2, t3, t1] + forced + [ans, eos]
    assert res[0].reasoning_content == " alpha beta gamma alpha" and res[0].content == "Answer"
    assert res[0].finish_reason == "stop"
    assert res[1].token_ids == [t1, t2] + forced + [ans, eos] and res[1].content == "Answer"
    assert res[1].reasoning_content == " alpha beta"
    assert res[2].token_ids == forced + [ans, eos]
    assert end_think not in res[3].token_ids and res[3].finish_reason == "length"
    assert res[3].content == "" and res[3].reasoning_content.startswith(" alpha beta")


def test_stream_deltas_concatenate_and_never_split_utf8(qwen_tok, byte_tokens):
    pieces = ["Hi 🤖你é", "! ok"]
    m, start, ids, eos = _text_model(qwen_tok, byte_tokens, pieces, shortest=True)
    for ch in "🤖你é":  # no token holds a whole multi-byte character: every one is split across tokens
        assert all(ch.encode() not in qwen_tok.token_bytes(i) for i in ids)
    deltas = list(stream(m, [start], GREEDY, 100, tokenizer=qwen_tok))
    full = generate(m, [[start]], GREEDY, 100, tokenizer=qwen_tok)[0].text
    assert "".join(deltas) == full == "Hi 🤖你é! ok"
    assert len(deltas) > 5 and all("\ufffd" not in d for d in deltas)
    assert "🤖" in deltas and "你" in deltas  # each arrives whole, once its last byte is out


def test_chat_messages_and_text_prompts(qwen_tok, byte_tokens):
    """Message prompts go through the chat template (enable_thinking, tools), strings are encoded as they are."""
    m, start, ids, eos = _text_model(qwen_tok, byte_tokens, ["Fine."], start=qwen_tok.encode("\n\n")[0])
    msgs = [{"role": "user", "content": "How are you?"}]
    prompt = qwen_tok.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False)
    assert prompt[-1] == start  # the non-thinking template ends with "<think>\n\n</think>\n\n"
    (r,) = generate(m, [msgs], GREEDY, 20, tokenizer=qwen_tok, enable_thinking=False)
    assert r.content == "Fine." and r.reasoning_content is None and r.prompt_tokens == len(prompt)
    (r,) = generate(m, ["x\n\n"], GREEDY, 20, tokenizer=qwen_tok)
    assert r.text == "Fine." and r.prompt_tokens == 2


def test_sampling_params_from_generation_config(tmp_path):
    assert SamplingParams.from_generation_config(None) == SamplingParams(0.6, 20, 0.95)
    assert SamplingParams.from_generation_config(tmp_path, enable_thinking=False) == SamplingParams(0.7, 20, 0.8)
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "top_k": 5, "do_sample": True}))
    sp = SamplingParams.from_generation_config(tmp_path, top_p=0.5, seed=None)
    assert (sp.temperature, sp.top_k, sp.top_p, sp.seed) == (0.3, 5, 0.5, None)
    assert SamplingParams.from_generation_config({"do_sample": False}).temperature == 0.0
    assert sp.replace(seed=3).seed == 3


def test_generate_on_a_mesh_equals_single_device():
    """Expert-parallel model on a (data 2, expert 2) mesh: the cache is placed by the sharding rules, same tokens."""
    from qwen3_jax.infer.engine import Engine
    from qwen3_jax.sharding import make_mesh, shard_model
    from tests.hf_ref import CONFIGS

    spec = {k: v for k, v in CONFIGS["moe_uniform"].items() if k != "kind"}
    m = Qwen3ForCausalLM(Qwen3Config.from_dict(dict(spec, model_type="qwen3_moe")), rngs=nnx.Rngs(0))
    prompts = _rand_prompts(m.config.vocab_size, [5, 9, 3, 7], seed=4)
    ref = [r.token_ids for r in generate(m, prompts, GREEDY, 5, stop_token_ids=[])]
    shard_model(m, make_mesh(data=2, expert=2, devices=jax.devices()[:4]))
    assert [r.token_ids for r in generate(m, prompts, GREEDY, 5, stop_token_ids=[])] == ref
    m.runtime = m.runtime.replace(capacity_factor=0.1)          # a training option: inference never drops
    assert [r.token_ids for r in generate(m, prompts, GREEDY, 5, stop_token_ids=[])] == ref
    slots = Engine(m).new_slots(4, 64, 16)
    assert slots["cache"].k.sharding.spec[1] == ("data", "expert") and slots["tok_b"].sharding.spec[0] is not None
