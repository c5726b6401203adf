"""Sampling benchmark: sampled vs greedy decoding through the public `generate`, as a ratio measured in one run on
this machine. The small Qwen3-MoE of bench/decode.py (4 layers, hidden 256, 32 experts top-4, fp32) with Qwen3's
full 151,936-token vocabulary, so that the sampling filters see the real vocabulary.

    python bench/sampling.py                  # batch 1 and 8
    python bench/sampling.py --batch 8 --new 64

Per batch size: `generate(model, prompts, sampling, max_new_tokens=N, stop_token_ids=[])` (32-token prompts, every
row runs N tokens) with
- greedy:  temperature 0;
- qwen3:   Qwen3's recommended sampling, temperature 0.6, top-p 0.95, top-k 20 (seeded);
- top-p:   temperature 0.6, top-p 0.95, top-k off (informational: over this random model's nearly flat
           distribution top-p needs most of the vocabulary, so rows take the full sort; a trained model's peaked
           distribution mostly ends inside the candidates).
The calls alternate round-robin (the machine's speed drifts minute to minute); the speed ratio is greedy time /
sampled time. Target: qwen3 >= 0.8x greedy at batch 1 and 8.
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np
from flax import nnx

from qwen3_jax import Qwen3Config, Qwen3ForCausalLM
from qwen3_jax.hostmem import tune_malloc
from qwen3_jax.infer import SamplingParams, generate

from decode import SMALL, prompts  # bench/decode.py (this script's folder is on sys.path)
from forward import timeit_interleaved  # bench/forward.py

VOCAB = 151936
SETTINGS = {
    "greedy": SamplingParams(temperature=0.0),
    "qwen3": SamplingParams(temperature=0.6, top_p=0.95, top_k=20, seed=0),
    "top-p": SamplingParams(temperature=0.6, top_p=0.95, top_k=0, seed=0),
}


def bench(model, batch: int, n_new: int, iters: int, settings):
    ps = prompts(model.config, batch, 32)
    out = {}

    def run(name):
        def fn():
            res = generate(model, ps, SETTINGS[name], max_new_tokens=n_new, stop_token_ids=[], batch_size=batch)
            assert all(len(r.token_ids) == n_new for r in res)
            out[name] = [r.token_ids for r in res]
        return fn

    t = timeit_interleaved({name: run(name) for name in settings}, warmup=1, iters=iters)
    print(f"[batch {batch}] 32-token prompts + {n_new} new tokens, vocabulary {model.config.vocab_size}")
    for name in settings:
        tps = batch * n_new / t[name]
        ratio = t["greedy"] / t[name]
        target = "   (target >= 0.8)" if name == "qwen3" else ""
        print(f"[batch {batch}]   {name:7s} {t[name] * 1e3:8.1f} ms  {tps:8.1f} tok/s   {ratio:5.2f}x greedy{target}")
    return t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, action="append", help="batch sizes (default 1 and 8)")
    ap.add_argument("--new", type=int, default=64, help="new tokens per row (default 64)")
    ap.add_argument("--iters", type=int, default=7, help="timed rounds (default 7)")
    ap.add_argument("--no-top-p", action="store_true", help="leave out the top-p-only setting")
    args = ap.parse_args()
    print(f"host malloc tuned for XLA:CPU (qwen3_jax.hostmem): {tune_malloc()}")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores)")
    model = Qwen3ForCausalLM(Qwen3Config.from_dict(dict(SMALL, vocab_size=VOCAB)), rngs=nnx.Rngs(0))
    settings = [s for s in SETTINGS if not (args.no_top_p and s == "top-p")]
    for b in args.batch or (1, 8):
        bench(model, b, args.new, args.iters, settings)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
