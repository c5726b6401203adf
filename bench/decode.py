"""Decode benchmark: ratios measured in one run on this machine (same small Qwen3-MoE config and weights as
bench/forward.py: 4 layers, hidden 256, 32 experts top-4, vocab 4096, fp32).

    python bench/decode.py                 # everything
    python bench/decode.py --only hf       # one of: hf, prefill, position, batch

1. hf:       greedy decode tokens/s, batch 1, 32-token prompt, 128 new tokens: our engine (jitted prefill, on-device
             decode loop over the KV cache; on CPU the decode kernels of qwen3_jax.kernels.cpu_decode read experts, weights
             and cache in place, QWEN3_JAX_CPU_KERNELS=0 for the XLA path) vs transformers
             `generate(do_sample=False)` with its KV cache. Target >= 5x.
2. prefill:  prefill tokens/s (batch 1 x 2000 tokens into the cache).
3. position: per-token decode time at position ~2000 vs ~100 (the same 2112-slot cache, and ~100 in a 256-slot
             cache: a decode step reads the whole cache row, masked), and the 2000-token prefill (what a cache-less
             model recomputes for every token) / one decode token at ~2000. Target >= 20x.
4. batch:    decode throughput (new tokens/s over all rows) at batch 1 / 8 / 32.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax
import numpy as np
from flax import nnx

import qwen3_jax
from qwen3_jax import Qwen3Config, Qwen3ForCausalLM
from qwen3_jax.hostmem import tune_malloc
from qwen3_jax.infer import Request, SamplingParams, iter_generate
from qwen3_jax.infer.engine import Engine

from forward import timeit as _timeit, timeit_interleaved  # bench/forward.py (this script's folder is on sys.path)

SMALL = dict(
    model_type="qwen3_moe", vocab_size=4096, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=32,
    num_experts_per_tok=4, norm_topk_prob=True, max_position_embeddings=4096, torch_dtype="float32",
    eos_token_id=None,
)
GREEDY = SamplingParams(temperature=0.0)


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


def bench_hf(model):
    import torch
    from transformers import AutoModelForCausalLM

    cfg = model.config
    with tempfile.TemporaryDirectory() as d:
        qwen3_jax.save_pretrained(model, d)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    n_new = 128
    (prompt,) = prompts(cfg, 1, 32)
    reqs = [Request(prompt, GREEDY, n_new, stop_token_ids=[])]
    ours = {}

    def run_ours():
        ours["ids"] = next(iter_generate(model, reqs, batch_size=1, max_len=256))[1].token_ids

    def run_hf():
        with torch.inference_mode():
            out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new,
                              use_cache=True, pad_token_id=0)
        ours["hf"] = out[0, len(prompt):].tolist()

    t = timeit_interleaved({"ours": run_ours, "hf": run_hf}, warmup=1, iters=5)
    t_ours, t_hf = t["ours"], t["hf"]
    same = ours["ids"] == ours["hf"]
    print(f"[hf] greedy batch 1, 32-token prompt + {n_new} new tokens, fp32 (torch threads {torch.get_num_threads()})")
    print(f"[hf]   ours         {t_ours * 1e3:8.1f} ms  ({n_new / t_ours:8.1f} tok/s)")
    print(f"[hf]   transformers {t_hf * 1e3:8.1f} ms  ({n_new / t_hf:8.1f} tok/s)   same tokens: {same}")
    print(f"[hf]   speed-up = {t_hf / t_ours:.2f}x   (target >= 5)")


def engine_at(model, b, max_len, prompt_len):
    """(engine, slots) with b rows prefilled with prompt_len-token prompts; returns also the prefill time."""
    eng = Engine(model, chunk=32)
    slots = eng.new_slots(b, max_len, 16)
    ps = prompts(model.config, b, prompt_len, seed=prompt_len)
    slots = eng.prefill(slots, ps, list(range(b)), row_params(b))
    jax.block_until_ready(slots)
    return eng, slots, ps


def prefill_time(model, n):
    eng = Engine(model)
    ps = prompts(model.config, 1, n + 1)  # prefill writes n tokens (the last prompt token is the first decode input)
    state = {"slots": eng.new_slots(1, n + 64, 16)}

    def run():
        state["slots"] = eng.prefill(state["slots"], ps, [0], row_params(1))
        jax.block_until_ready(state["slots"])

    return median_time(run)


def decode_time(eng, slots, steps=32):
    """Seconds per decode step (one token per row) of a `steps`-token chunk; returns (time, slots)."""
    state = {"slots": slots}

    def run():
        state["slots"], toks, _ = eng.decode(state["slots"], steps, stop_on_finish=False, n_max=steps)
        assert toks.shape[1] == steps

    return median_time(run) / steps, state["slots"]


def bench_prefill(model):
    n = 2000
    t = prefill_time(model, n)
    print(f"[prefill] batch 1 x {n} tokens: {t * 1e3:8.1f} ms  ({n / t:8.0f} tok/s)")
    return t


def bench_position(model, t_prefill=None):
    max_len = 2112
    t_prefill = t_prefill or prefill_time(model, 2000)
    times = {}
    for pos, s in ((100, max_len), (2000, max_len), (100, 256)):
        eng, slots, _ = engine_at(model, 1, s, pos)
        times[pos, s], _ = decode_time(eng, slots, steps=16)
        print(f"[position] decode at ~{pos:4d} (cache of {s:4d} slots): {times[pos, s] * 1e3:7.2f} ms / token")
    print(f"[position]   token at ~2000 / token at ~100 = {times[2000, max_len] / times[100, max_len]:.2f}x (same cache), "
          f"{times[2000, max_len] / times[100, 256]:.2f}x (each in its own cache bucket)")
    times = {2000: times[2000, max_len]}
    print(f"[position]   2000-token recompute (prefill) / cached token at ~2000 = {t_prefill / times[2000]:.1f}x"
          f"   (target >= 20)")


def bench_batch(model):
    base = None
    for b in (1, 8, 32):
        eng, slots, _ = engine_at(model, b, 256, 32)
        t, _ = decode_time(eng, slots, steps=32)
        tps = b / t
        base = base or tps
        print(f"[batch] batch {b:2d}: {t * 1e3:7.2f} ms / step  {tps:9.1f} tok/s  ({tps / base:5.2f}x batch 1)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["hf", "prefill", "position", "batch"])
    args = ap.parse_args()
    print(f"host malloc tuned for XLA:CPU (qwen3_jax.hostmem, both sides): {tune_malloc()}")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores)")
    model = Qwen3ForCausalLM(Qwen3Config.from_dict(SMALL), rngs=nnx.Rngs(0))
    t_prefill = None
    if args.only in (None, "hf"):
        bench_hf(model)
    if args.only in (None, "prefill"):
        t_prefill = bench_prefill(model)
    if args.only in (None, "position"):
        bench_position(model, t_prefill)
    if args.only in (None, "batch"):
        bench_batch(model)


if __name__ == "__main__":
    main()
