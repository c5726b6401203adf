"""`qwen3-jax` command: `qwen3-jax demo` (the whole pipeline on a small model, no download) and
`qwen3-jax params PRESET` (parameter counts of a published config)."""

from __future__ import annotations

import argparse
import os
import sys
import time

DEMO_CONFIG = dict(
    model_type="qwen3_moe", vocab_size=151936, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=16,
    num_experts_per_tok=4, norm_topk_prob=True, max_position_embeddings=4096, tie_word_embeddings=True,
    rope_theta=1_000_000.0, torch_dtype="float32",
)


def _say(msg: str):
    print(msg, flush=True)


def demo(args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import qwen3_jax
    from qwen3_jax import Qwen3Config, Qwen3ForCausalLM

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    ckpt = os.path.join(out, "random-init")
    cfg = Qwen3Config.from_dict(DEMO_CONFIG)
    _say(f"[1] building a random Qwen3-MoE ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
         f"{cfg.num_experts} experts top-{cfg.num_experts_per_tok}) and writing it as a Hugging Face checkpoint: {ckpt}")
    qwen3_jax.save_pretrained(Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(args.seed)), ckpt)
    _say(f"    files: {', '.join(sorted(os.listdir(ckpt)))}")

    _say("[2] loading it back (streamed safetensors) and running a jitted forward")
    model = qwen3_jax.from_pretrained(ckpt)
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids))
    ids = jnp.asarray(np.random.default_rng(args.seed).integers(0, cfg.vocab_size, (2, 64)), jnp.int32)
    res = fwd(state, ids)
    load = np.asarray(jax.nn.one_hot(jax.lax.top_k(res.router_logits, cfg.num_experts_per_tok)[1],
                                     cfg.num_experts).sum((1, 2, 3)))  # [L_moe, E] token copies per expert
    _say(f"    logits {tuple(res.logits.shape)}, router logits {tuple(res.router_logits.shape)}; "
         f"tokens per expert, layer 0: {load[0].astype(int).tolist()}")

    _say("[3] parameter counts (abstract shapes, nothing allocated)")
    for name in ("Qwen3-30B-A3B", "Qwen3-235B-A22B"):
        c = qwen3_jax.param_count(name)
        _say(f"    {name}: total {c['total'] / 1e9:.2f}B, active {c['active'] / 1e9:.2f}B per token")
    _say(f"done in {time.perf_counter() - t0:.1f}s; outputs in {out}")
    return 0


def params(args) -> int:
    import qwen3_jax

    for name in args.preset or qwen3_jax.Qwen3Config.presets():
        c = qwen3_jax.param_count(name)
        print(f"{name:32s} total {c['total'] / 1e9:8.2f}B   active {c['active'] / 1e9:7.2f}B")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="qwen3-jax", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="build, load, run a small random Qwen3-MoE (no download)")
    d.add_argument("--out", default="qwen3-jax-demo", help="output directory (default ./qwen3-jax-demo)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=demo)
    p = sub.add_parser("params", help="parameter counts of published configs")
    p.add_argument("preset", nargs="*", help="preset names (default: all)")
    p.set_defaults(fn=params)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
