"""Decode benchmark: what a user's `generate` call does, as ratios measured in one run on this machine (same small
Qwen3-MoE config and weights as bench/forward.py: 4 layers, hidden 256, 32 experts top-4, vocab 4096, fp32).

    python bench/decode.py                 # everything
    python bench/decode.py --only hf       # one of: hf, late, prefill, batch
    python bench/decode.py --ab            # the KV-cache strategies side by side (hf and late, interleaved)

1. hf:      greedy tokens/s of the public `generate`, batch 1, 32-token prompt, 128 new tokens (the call includes
            the prefill and the host loop; on CPU the decode kernels of qwen3_jax.kernels.cpu_decode read experts,
            weights and cache in place, QWEN3_JAX_CPU_KERNELS=0 for the XLA path) vs transformers
            `generate(do_sample=False)` with its KV cache. Target >= 5x.
2. late:    the cost of a late token through the public `generate`: a 1920-token prompt, 1 and 129 new tokens
            (the same 2048-slot cache: generate sizes it from prompt + new tokens), (t129 - t1) / 128 per token at
            positions 1920-2047, against the 2000-token forward without a cache that a cache-less model recomputes
            for every token. Target >= 100x.
3. prefill: prefill tokens/s (batch 1 x 2000 tokens into the cache, the engine's prefill call).
4. batch:   decode throughput of `generate` (new tokens/s over all rows, 32-token prompts, 64 new tokens) at
            batch 1 / 8 / 32.

--kv-cache carried|deferred runs the model with that KV-cache strategy (qwen3_jax.kernels `kv_cache`; default: the
platform's); --ab times hf and late for both in one run, the calls alternating.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import qwen3_jax
from qwen3_jax import Qwen3Config, Qwen3ForCausalLM
from qwen3_jax.hostmem import tune_malloc
from qwen3_jax.infer import SamplingParams, generate
from qwen3_jax.infer.engine import Engine, pow2
from qwen3_jax.kernels import KV_CACHE

from forward import jitted_forward, timeit as _timeit, timeit_interleaved  # bench/forward.py (this folder: sys.path)

SMALL = dict(
    model_type="qwen3_moe", vocab_size=4096, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=32,
    num_experts_per_tok=4, norm_topk_prob=True, max_position_embeddings=4096, torch_dtype="float32",
    eos_token_id=None,
)
GREEDY = SamplingParams(temperature=0.0)
LATE_PROMPT, LATE_NEW, RECOMPUTE = 1920, 128, 2000


def median_time(fn):
    return _timeit(fn, warmup=1, iters=3)


def row_params(n):
    """Greedy per-row parameters for Engine.prefill (no stop ids, no thinking budget)."""
    return dict(max_new_b=np.full(n, 10**6, np.int32), temp_b=np.zeros(n, np.float32), top_k_b=np.zeros(n, np.int32),
                top_p_b=np.ones(n, np.float32), min_p_b=np.zeros(n, np.float32), rep_b=np.ones(n, np.float32),
                pres_b=np.zeros(n, np.float32), freq_b=np.zeros(n, np.float32), key_b=np.zeros((n, 2), np.uint32),
                stop_bs=np.full((n, 16), -1, np.int32), budget_b=np.full(n, -1, np.int32), in_think_b=np.zeros(n, bool))


def prompts(cfg, b, n, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, n)).tolist()


def with_kv_cache(model, kv_cache):
    """A model sharing `model`'s parameters that runs with KV-cache strategy `kv_cache` (None: the platform's)."""
    graphdef, state = nnx.split(model)
    twin = nnx.merge(graphdef, state)
    twin.runtime = twin.runtime.replace(kv_cache=kv_cache or "auto")
    return twin


def generate_fn(model, ps, n_new, out=None, key=None):
    """A call of the public generate (greedy, no stop token: every row runs n_new tokens)."""
    def fn():
        res = generate(model, ps, GREEDY, max_new_tokens=n_new, stop_token_ids=[])
        assert all(len(r.token_ids) == n_new for r in res)
        if out is not None:
            out[key] = [r.token_ids for r in res]
    return fn


def bench_hf(models):
    import torch
    from transformers import AutoModelForCausalLM

    model = next(iter(models.values()))
    cfg = model.config
    with tempfile.TemporaryDirectory() as d:
        qwen3_jax.save_pretrained(model, d)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    n_new = 128
    (prompt,) = prompts(cfg, 1, 32)
    ids = {}

    def run_hf():
        with torch.inference_mode():
            out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new,
                              use_cache=True, pad_token_id=0)
        ids["hf"] = out[0, len(prompt):].tolist()

    fns = {name: generate_fn(m, [prompt], n_new, ids, name) for name, m in models.items()}
    t = timeit_interleaved({**fns, "hf": run_hf}, warmup=1, iters=5)
    print(f"[hf] greedy batch 1, public generate: 32-token prompt + {n_new} new tokens, fp32 "
          f"(torch threads {torch.get_num_threads()})")
    for name in models:
        print(f"[hf]   ours {name:9s} {t[name] * 1e3:8.1f} ms  ({n_new / t[name]:8.1f} tok/s)   "
              f"same tokens as transformers: {ids[name][0] == ids['hf']}")
    print(f"[hf]   transformers   {t['hf'] * 1e3:8.1f} ms  ({n_new / t['hf']:8.1f} tok/s)")
    for name in models:
        print(f"[hf]   speed-up ({name}) = {t['hf'] / t[name]:.2f}x   (target >= 5)")


def bench_late(models):
    """Per-token time at positions LATE_PROMPT.. through generate, and the cache-less forward of RECOMPUTE tokens."""
    model = next(iter(models.values()))
    (prompt,) = prompts(model.config, 1, LATE_PROMPT, seed=1)
    (long,) = prompts(model.config, 1, RECOMPUTE, seed=1)
    fwd = jitted_forward(model)
    ids = jnp.asarray([long])
    fns = {"forward": lambda: fwd(ids)}
    n = 1 + LATE_NEW
    for name, m in models.items():
        fns[f"{name}/1"] = generate_fn(m, [prompt], 1)
        fns[f"{name}/{n}"] = generate_fn(m, [prompt], n)
    t = timeit_interleaved(fns, warmup=1, iters=5)
    print(f"[late] public generate, batch 1, {LATE_PROMPT}-token prompt, 1 and {n} new tokens (generate's cache: "
          f"{pow2(LATE_PROMPT + n - 1, 64)} slots)")
    print(f"[late]   {RECOMPUTE}-token forward without a cache: {t['forward'] * 1e3:8.1f} ms")
    for name in models:
        t1, tn = t[f"{name}/1"], t[f"{name}/{n}"]
        per_tok = (tn - t1) / LATE_NEW
        print(f"[late]   {name:9s} 1 token {t1 * 1e3:7.1f} ms, {n} tokens {tn * 1e3:7.1f} ms: "
              f"{per_tok * 1e3:5.2f} ms / token at {LATE_PROMPT}-{LATE_PROMPT + LATE_NEW - 1}; "
              f"forward / late token = {t['forward'] / per_tok:6.1f}x   (target >= 100)")


def bench_prefill(model):
    n = 2000
    eng = Engine(model)
    ps = prompts(model.config, 1, n + 1)  # prefill writes n tokens (the last prompt token is the first decode input)
    state = {"slots": eng.new_slots(1, n + 64, 16)}

    def run():
        state["slots"] = eng.prefill(state["slots"], ps, [0], row_params(1))
        jax.block_until_ready(state["slots"])

    t = median_time(run)
    print(f"[prefill] batch 1 x {n} tokens: {t * 1e3:8.1f} ms  ({n / t:8.0f} tok/s)")


def bench_batch(model):
    base = None
    n_new = 64
    for b in (1, 8, 32):
        t = median_time(generate_fn(model, prompts(model.config, b, 32), n_new))
        tps = b * n_new / t
        base = base or tps
        print(f"[batch] generate, batch {b:2d}, 32-token prompts + {n_new} new tokens: {t * 1e3:8.1f} ms  "
              f"{tps:9.1f} tok/s  ({tps / base:5.2f}x batch 1)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["hf", "late", "prefill", "batch"])
    ap.add_argument("--kv-cache", choices=KV_CACHE, help="KV-cache strategy (default: the platform's)")
    ap.add_argument("--ab", action="store_true", help="hf and late for every KV-cache strategy, interleaved")
    args = ap.parse_args()
    print(f"host malloc tuned for XLA:CPU (qwen3_jax.hostmem, both sides): {tune_malloc()}")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores)")
    base = Qwen3ForCausalLM(Qwen3Config.from_dict(SMALL), rngs=nnx.Rngs(0))
    model = with_kv_cache(base, args.kv_cache)
    print(f"KV cache: {model.runtime.kernels.kv_cache}" + (" (the platform's)" if not args.kv_cache else ""))
    models = {k: with_kv_cache(base, k) for k in KV_CACHE} if args.ab else {model.runtime.kernels.kv_cache: model}
    if args.only in (None, "hf"):
        bench_hf(models)
    if args.only in (None, "late"):
        bench_late(models)
    if args.ab:
        return
    if args.only in (None, "prefill"):
        bench_prefill(model)
    if args.only in (None, "batch"):
        bench_batch(model)


if __name__ == "__main__":
    main()
