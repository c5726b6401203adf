"""Forward-pass benchmark: ratios measured in one run on this machine.

    python bench/forward.py            # all three
    python bench/forward.py --only hf  # one of: hf, experts, compile

1. jitted JAX forward vs transformers' Qwen3MoeForCausalLM (its default attention and experts implementations)
   on the same small config and the same weights: 4 layers, hidden 256, 32 experts top-4, 2 x 512 tokens, fp32.
2. MoE cost follows active parameters: E=128 vs E=8 experts at equal top-k and expert width, 16 x 256 tokens.
3. compile time of the whole forward at 48 vs 4 layers (the layer stack is scanned, not unrolled).
The two sides of each ratio are timed interleaved (round-robin calls, medians).
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import qwen3_jax
from qwen3_jax import Qwen3Config, Qwen3ForCausalLM
from qwen3_jax.hostmem import tune_malloc

SMALL = dict(
    model_type="qwen3_moe", vocab_size=4096, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=32,
    num_experts_per_tok=4, norm_topk_prob=True, max_position_embeddings=2048, torch_dtype="float32",
)


def timeit(fn, warmup=2, iters=5):
    """Median seconds of fn() (fn must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def timeit_interleaved(fns, warmup=2, iters=9):
    """Median seconds of each fn in `fns` (a dict), calls interleaved round-robin so that both sides of a ratio
    see the same machine load (timings on a shared machine drift by tens of percent between seconds)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def jitted_forward(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(state, ids):
        return nnx.merge(graphdef, state)(ids).logits

    return lambda ids: fwd(state, ids).block_until_ready()


def bench_vs_transformers():
    import torch
    from transformers import AutoModelForCausalLM

    cfg = Qwen3Config.from_dict(SMALL)
    model = Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0))
    with tempfile.TemporaryDirectory() as d:
        qwen3_jax.save_pretrained(model, d)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 512))
    fwd = jitted_forward(model)
    tids = torch.tensor(ids)

    def hf_fwd():
        with torch.inference_mode():
            hf(tids)

    t = timeit_interleaved({"jax": lambda: fwd(jnp.asarray(ids)), "hf": hf_fwd})
    t_jax, t_hf = t["jax"], t["hf"]
    err = np.abs(np.asarray(fwd(jnp.asarray(ids))) - hf(tids).logits.detach().numpy()).max()
    tokens = ids.size
    print(f"[hf] forward 2x512 tokens, fp32, 4 layers, 32 experts top-4 (torch threads {torch.get_num_threads()}, "
          f"experts impl {hf.config._experts_implementation}, attn {hf.config._attn_implementation})")
    print(f"[hf]   jax {t_jax * 1e3:8.1f} ms  ({tokens / t_jax:8.0f} tok/s)")
    print(f"[hf]   transformers {t_hf * 1e3:8.1f} ms  ({tokens / t_hf:8.0f} tok/s)   max |dlogits| {err:.1e}")
    print(f"[hf]   speed-up jax / transformers = {t_hf / t_jax:.2f}x   (target >= 1.0)")
    return t_hf / t_jax


def bench_experts():
    ids = np.random.default_rng(1).integers(0, SMALL["vocab_size"], (16, 256))
    fwds = {}
    for e in (8, 128):
        cfg = Qwen3Config.from_dict(dict(SMALL, num_experts=e, num_hidden_layers=2))
        fwds[e] = functools.partial(jitted_forward(Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0))), jnp.asarray(ids))
    times = timeit_interleaved(fwds)
    for e in fwds:
        print(f"[experts] E={e:3d} top-4, 16x256 tokens: {times[e] * 1e3:8.1f} ms")
    ratio = times[128] / times[8]
    print(f"[experts]   time E=128 / E=8 = {ratio:.2f}x   (total params 16x, active equal; target <= 1.3)")
    return ratio


def bench_compile():
    times = {}
    for layers in (4, 48):
        cfg = Qwen3Config.from_dict(dict(SMALL, num_hidden_layers=layers))
        graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0))))
        fwd = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids).logits)
        t0 = time.perf_counter()
        fwd.lower(state, jax.ShapeDtypeStruct((2, 512), jnp.int32)).compile()
        times[layers] = time.perf_counter() - t0
        print(f"[compile] {layers:2d} layers: {times[layers]:6.2f} s (trace + lower + compile)")
    ratio = times[48] / times[4]
    print(f"[compile]   48 / 4 layers = {ratio:.2f}x   (target <= 1.5)")
    return ratio


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["hf", "experts", "compile"])
    args = ap.parse_args()
    print(f"host malloc tuned for XLA:CPU (qwen3_jax.hostmem, both sides): {tune_malloc()}")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores)")
    runs = {"hf": bench_vs_transformers, "experts": bench_experts, "compile": bench_compile}
    for name, fn in runs.items():
        if args.only in (None, name):
            fn()


if __name__ == "__main__":
    main()
