"""Routing statistics per forward (qwen3_jax.routing.stats.batch_stats, what `capture` and `--routing-stats` run
after each forward): this tree's function against a git revision's, jitted on Qwen3-30B-A3B routing shapes (48 MoE
layers, 128 experts, top-8), random router logits; the best of N calls each, interleaved, ratios in one run.

    python bench/routing_stats.py --against HEAD~1
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

import qwen3_jax
from qwen3_jax.routing import stats as this


def _module_at(rev: str):
    src = subprocess.run(["git", "show", f"{rev}:qwen3_jax/routing/stats.py"], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout
    path = os.path.join(tempfile.mkdtemp(), "stats_at_rev.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("qwen3_jax.routing._stats_at_rev", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", default="HEAD", help="git revision to compare with")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    other = _module_at(args.against)
    cfg = qwen3_jax.Qwen3Config(num_hidden_layers=48, num_experts=128, num_experts_per_tok=8, vocab_size=151936,
                                hidden_size=2048, num_attention_heads=32, num_key_value_heads=4)
    n_l, e = len(cfg.moe_layers), cfg.num_experts
    print(f"{jax.devices()[0].platform}: batch_stats, {n_l} layers, {e} experts, top-{cfg.num_experts_per_tok}; "
          f"{args.against} vs this tree")
    for b, t in ((8, 1), (64, 1), (1, 512)):
        logits = jax.random.normal(jax.random.PRNGKey(0), (n_l, b, t, e), jnp.float32)
        valid = jnp.ones((b, t), bool)
        fns = {name: jax.jit(lambda x, v, m=m: m.batch_stats(x, v, cfg, None)) for name, m in
               ((args.against, other), ("this", this))}
        best = {}
        for f in fns.values():
            jax.block_until_ready(f(logits, valid))
        for _ in range(args.repeats):
            for name, f in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(f(logits, valid))
                best[name] = min(best.get(name, 1e9), time.perf_counter() - t0)
        a, n = best[args.against], best["this"]
        print(f"B={b:<3} T={t:<4} {args.against}: {a * 1e3:8.2f} ms   this: {n * 1e3:8.2f} ms   ratio {n / a:.3f}")


if __name__ == "__main__":
    main()
