"""Training-step benchmark: our jitted step vs transformers + torch AdamW, same config and weights, in one run.

    python bench/train.py                       # both, ratio and peak memory
    python bench/train.py --batch 4 --seq 256 --steps 8

Config: 4 layers, hidden 256, 32 experts top-4 (expert width 256), vocab 4096, fp32, global-batch LBL
(coefficient 0.001) included on both sides; torch: Qwen3MoeForCausalLM(output_router_logits=True) loss,
backward, clip_grad_norm_(1.0), AdamW. Each side runs in its own child process so that its peak RSS
(ru_maxrss) is its own; tokens/s is the median over the timed steps (compilation / warm-up excluded) of
--rounds child runs per side, alternating (jax, torch, torch, jax, ...). Both children use the host malloc
settings of qwen3_jax.hostmem.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

SMALL = dict(
    model_type="qwen3_moe", vocab_size=4096, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=32,
    num_experts_per_tok=4, norm_topk_prob=True, max_position_embeddings=2048, torch_dtype="float32",
    router_aux_loss_coef=0.001,
)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_checkpoint(path, overrides=None):
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    spec = {k: v for k, v in {**SMALL, **(overrides or {})}.items() if k != "model_type"}
    Qwen3MoeForCausalLM(Qwen3MoeConfig(**spec)).save_pretrained(path)


def run_jax(path, batch, seq, steps, warmup):
    import jax
    import jax.numpy as jnp

    import qwen3_jax
    from qwen3_jax.sharding import make_mesh
    from qwen3_jax.train.step import StepConfig, make_optimizer, make_schedule, make_train_step, split_model
    from qwen3_jax.train.trainer import global_batch, init_opt_state

    mesh = make_mesh(data=-1)
    model = qwen3_jax.from_pretrained(path, mesh=mesh)
    graphdef, abstract, params = split_model(model)
    schedule = make_schedule("constant", 1e-4, 0, steps + warmup)
    tx = make_optimizer(params, schedule=schedule, weight_decay=0.01, clip=1.0, b2=0.999)
    opt_state = init_opt_state(tx, params, mesh)
    shardings = jax.tree.map(lambda x: x.sharding, (params, opt_state))
    step = make_train_step(graphdef, abstract, tx, schedule, StepConfig(lbl_coef=0.001), shardings)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, seq)).astype(np.int32)
    host = {"inputs": ids, "targets": np.concatenate([ids[:, 1:], np.full((batch, 1), -100, np.int32)], 1),
            "segment_ids": np.ones_like(ids), "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), ids.shape).copy()}
    b = global_batch(host, mesh)
    t0 = time.perf_counter()
    params, opt_state, m = step(params, opt_state, b, jnp.int32(0))
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times, faults, sys_s = [], [], []
    for i in range(1, steps + warmup):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        params, opt_state, m = step(params, opt_state, b, jnp.int32(i))
        jax.block_until_ready(m)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            faults.append(r1.ru_minflt - r0.ru_minflt)
            sys_s.append(r1.ru_stime - r0.ru_stime)
    return {"step_s": times, "first_step_s": compile_s, "faults": float(np.median(faults)), "sys_s": float(np.median(sys_s)),
            "loss": float(m["loss"]), "peak_rss_mb": peak_rss_mb(), "devices": len(jax.devices())}


def run_torch(path, batch, seq, steps, warmup):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    ids = torch.tensor(np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, seq)))
    times, loss = [], None
    for i in range(steps + warmup):
        t0 = time.perf_counter()
        out = model(ids, labels=ids, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = float(out.loss)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"step_s": times, "loss": loss, "peak_rss_mb": peak_rss_mb(),
            "threads": torch.get_num_threads(), "experts_impl": model.config._experts_implementation,
            "attn_impl": model.config._attn_implementation}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2,
                   help="child runs per side, alternating jax/torch (timings on a shared machine drift)")
    p.add_argument("--experts", type=int, default=SMALL["num_experts"])
    p.add_argument("--top-k", type=int, default=SMALL["num_experts_per_tok"])
    p.add_argument("--expert-width", type=int, default=SMALL["moe_intermediate_size"])
    p.add_argument("--child", choices=("jax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        from qwen3_jax.hostmem import tune_malloc

        tuned = tune_malloc()  # both children: XLA's and torch's large host buffers stay mapped between steps
        fn = run_jax if args.child == "jax" else run_torch
        print("RESULT " + json.dumps({**fn(args.path, args.batch, args.seq, args.steps, args.warmup),
                                      "malloc_tuned": tuned}))
        return 0
    with tempfile.TemporaryDirectory() as d:
        make_checkpoint(d, {"num_experts": args.experts, "num_experts_per_tok": args.top_k,
                            "moe_intermediate_size": args.expert_width})
        res = {"jax": [], "torch": []}
        for r in range(args.rounds):
            for which in ("jax", "torch") if r % 2 == 0 else ("torch", "jax"):
                cmd = [sys.executable, os.path.abspath(__file__), "--child", which, "--path", d, "--batch",
                       str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                res[which].append(json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:]))
    j, t = ({**runs[-1], "peak_rss_mb": max(x["peak_rss_mb"] for x in runs),
             "tokens_per_s": args.batch * args.seq / float(np.median([s for x in runs for s in x["step_s"]]))}
            for runs in (res["jax"], res["torch"]))
    print(f"train step, {args.batch} x {args.seq} tokens, 4 layers, hidden 256, {args.experts} experts top-{args.top_k} "
          f"(width {args.expert_width}), fp32, AdamW + clip + LBL")
    print(f"  jax   (jit, {j['devices']} device(s)): {j['tokens_per_s']:9.0f} tokens/s   peak RSS {j['peak_rss_mb']:7.0f} MB"
          f"   first step (compile) {j['first_step_s']:.1f} s   loss {j['loss']:.4f}")
    print(f"        per step: {j['faults']:.0f} page faults, {j['sys_s']:.2f} s system time "
          f"(host malloc {'tuned' if j['malloc_tuned'] else 'glibc defaults'}, qwen3_jax.hostmem)")
    print(f"  torch (transformers, experts {t['experts_impl']}, attn {t['attn_impl']}, {t['threads']} threads): "
          f"{t['tokens_per_s']:9.0f} tokens/s   peak RSS "
          f"{t['peak_rss_mb']:7.0f} MB   loss {t['loss']:.4f}")
    print(f"  ratio jax / torch: {j['tokens_per_s'] / t['tokens_per_s']:.2f}x (target >= 1x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
