"""GPU benchmark: Qwen3-30B-A3B (random bf16 weights) on one GPU, against the chip's own ceilings, in one run.

    python bench/gpu.py                    # on the GPU machine (one H100/H200): the figures below, JSON to --out
    python bench/gpu.py --only check       # the numerics alone (seconds)
    python bench/gpu.py --smoke            # a tiny config on whatever device there is (CPU): every path runs

0. check: the grouped SwiGLU of each GPU grouped matmul (tokamax Mosaic GPU, the default; tokamax Triton; XLA's
   ragged_dot) against a per-group fp32 reference, values and gradients (x, w_gate, w_up, w_down), bf16, with
   empty experts and unrouted rows, at the 30B-A3B expert shapes; and the whole model's logits with the default
   kernels against ragged_dot's. Fails (exit 1) past the tolerance.
1. decode: greedy tokens/s of the engine (prefill, then the on-device decode loop over the KV cache) at batch 1 and
   64, a 4096-slot cache, against the HBM ceiling: the bytes one decode step must read (the attention, router,
   norms and lm_head weights; the experts the batch's tokens pick, expected distinct count E (1 - (1 - k/E)^b) per
   layer; the cache rows, every slot of the row as the step reads them) over the chip's HBM bandwidth.
2. train: a few layers of the 30B model (the same layer shapes; --train-layers) through the real train step
   (chunked CE, global-batch LBL, AdamW, bf16 compute, fp32 master weights, remat full): tokens/s and MFU =
   model FLOPs (6 N_active tokens + causal attention, qwen3_jax.aot.model_flops) / step time / peak bf16 FLOP/s.
3. the kernels the runtime chose for this device (qwen3_jax.kernels.select).

Figures are appended to bench/README.md by hand, dated, with this command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from qwen3_jax import Qwen3Config, Qwen3ForCausalLM, Runtime  # noqa: E402
from qwen3_jax.aot import model_flops  # noqa: E402

# device kind -> (HBM bytes/s, dense bf16 FLOP/s), from the vendors' data sheets (SXM parts)
PEAKS = {"NVIDIA H200": (4.8e12, 989e12), "NVIDIA H100 80GB HBM3": (3.35e12, 989e12),
         "NVIDIA A100-SXM4-80GB": (2.0e12, 312e12)}
SMOKE = dict(model_type="qwen3_moe", vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
             num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=512)


def random_model(cfg, dtype, param_dtype, runtime=None):
    """The model with random weights, initialised on the device in one jitted program."""
    @nnx.jit
    def make():
        return Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, runtime=runtime)
    return make()


def param_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def decode_bytes(cfg, batch: int, max_len: int, itemsize: int = 2) -> float:
    """Bytes one decode step reads (see the module docstring)."""
    d, e, k, f = cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    attn = d * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim \
        + cfg.num_attention_heads * cfg.head_dim * d + 2 * d + 2 * cfg.head_dim
    distinct = e * (1 - (1 - k / e) ** batch)
    per_layer = attn + d * e + distinct * 3 * d * f
    cache = batch * max_len * 2 * cfg.num_key_value_heads * cfg.head_dim
    return itemsize * (cfg.num_hidden_layers * (per_layer + cache) + d * cfg.vocab_size + batch * d)


def _swiglu_reference(x, ws, sizes):
    """Per-group fp32 SwiGLU: group g's rows through expert g; rows past the groups zero."""
    ends = np.cumsum(np.asarray(sizes))
    x32 = x.astype(jnp.float32)
    out = jnp.zeros((x.shape[0], ws[2].shape[-1]), jnp.float32)
    start = 0
    for g, end in enumerate(ends):
        if end > start:
            xg = x32[start:end]
            h = jax.nn.silu(xg @ ws[0][g].astype(jnp.float32)) * (xg @ ws[1][g].astype(jnp.float32))
            out = out.at[start:end].set(h @ ws[2][g].astype(jnp.float32))
        start = end
    return out


def check_kernels(cfg, impls=("tokamax", "tokamax_triton", "ragged_dot"), rows=(4096, 512), tol=2e-2):
    """Section 0 of the module docstring. Returns {impl: {rows: relative errors}} and whether all passed."""
    from qwen3_jax.kernels.gmm import grouped_swiglu

    d, f, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    rng = np.random.default_rng(0)
    out, ok = {}, True
    for m in rows:
        p = rng.dirichlet(np.full(e, 0.5))
        p[: e // 16] = 0                                         # some experts get no rows
        sizes_np = rng.multinomial(m - m // 64, p / p.sum())      # and m // 64 rows are routed nowhere
        sizes = jnp.asarray(sizes_np, jnp.int32)
        x = jnp.asarray(rng.normal(size=(m, d)), jnp.bfloat16)
        ws = [jnp.asarray(rng.normal(size=s) / np.sqrt(s[1]), jnp.bfloat16) for s in [(e, d, f), (e, d, f), (e, f, d)]]
        proj = jnp.asarray(rng.normal(size=(m, d)), jnp.float32)

        def loss(fn):
            return lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * proj)

        ref_fn = lambda x, *w: _swiglu_reference(x, w, sizes_np)  # noqa: E731
        want = [ref_fn(x, *ws)] + list(jax.grad(loss(ref_fn), (0, 1, 2, 3))(x, *ws))
        for impl in impls:
            fn = jax.jit(lambda x, *w, impl=impl: grouped_swiglu(x, *w, sizes, impl=impl))
            try:
                got = [fn(x, *ws)] + list(jax.jit(jax.grad(loss(fn), (0, 1, 2, 3)))(x, *ws))
            except Exception as err:  # noqa: BLE001 -- a kernel this GPU lacks (e.g. Mosaic GPU before Hopper)
                print(f"[check] {impl:15s} rows {m:5d}: not available here: {str(err).splitlines()[0][:160]}")
                out.setdefault(impl, {})[m] = None
                if impl == Runtime().kernels.gmm:
                    ok = False
                continue
            errs = {name: float(jnp.max(jnp.abs(g.astype(jnp.float32) - w)) / (float(jnp.max(jnp.abs(w))) or 1.0))
                    for name, g, w in zip(("y", "dx", "dw_gate", "dw_up", "dw_down"), got, want)}
            unrouted_zero = bool(jnp.all(got[0][m - m // 64:] == 0))
            passed = max(errs.values()) <= tol and unrouted_zero
            ok &= passed
            out.setdefault(impl, {})[m] = dict(errs, unrouted_zero=unrouted_zero, passed=passed)
            print(f"[check] {impl:15s} rows {m:5d}: max relative error " +
                  " ".join(f"{k} {v:.1e}" for k, v in errs.items()) + f" -> {'ok' if passed else 'FAIL'}", flush=True)
    return out, ok


def check_model(tol=3e-2):
    """A small MoE's logits with this device's default kernels against the same model with gmm=ragged_dot and XLA
    attention (bf16)."""
    cfg = Qwen3Config.from_dict(dict(SMOKE, hidden_size=256, moe_intermediate_size=128, head_dim=64, num_experts=16,
                                     num_experts_per_tok=4))
    model = random_model(cfg, jnp.bfloat16, jnp.bfloat16)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 128)), jnp.int32)
    fwd = nnx.jit(lambda m, ids: m(ids).logits.astype(jnp.float32))
    got = fwd(model, ids)
    model.runtime = model.runtime.replace(gmm="ragged_dot", attention="xla")
    want = fwd(model, ids)
    # mean, not max: in bf16 a near-tie in the router can send a token to another expert in one of the two runs
    err = float(jnp.mean(jnp.abs(got - want)) / jnp.mean(jnp.abs(want)))
    agree = float(jnp.mean(jnp.argmax(got, -1) == jnp.argmax(want, -1)))
    passed = err <= tol and agree >= 0.95
    print(f"[check] model logits, default kernels vs ragged_dot + XLA attention: mean relative error {err:.1e}, "
          f"argmax agrees on {agree:.1%} of tokens -> {'ok' if passed else 'FAIL'}")
    return {"logits_mean_rel_err": err, "argmax_agree": agree, "passed": passed}


def bench_decode(cfg, dtype, batches, max_len, prompt_len, steps, peaks):
    from decode import decode_time, engine_at   # bench/decode.py

    model = random_model(cfg, dtype, dtype)
    n_bytes = param_bytes(nnx.state(model, nnx.Param))
    out = {"weights_gib": n_bytes / 2**30, "rows": []}
    print(f"[decode] weights {n_bytes / 2**30:.1f} GiB ({jnp.dtype(dtype).name}), cache {max_len} slots, "
          f"{prompt_len}-token prompts, {steps}-step chunks")
    for b in batches:
        eng, slots, _ = engine_at(model, b, max_len, prompt_len)
        t, _ = decode_time(eng, slots, steps=steps)
        tps = b / t
        row = {"batch": b, "ms_per_step": t * 1e3, "tok_s": tps}
        if peaks:
            ceiling = b / (decode_bytes(cfg, b, max_len, jnp.dtype(dtype).itemsize) / peaks[0])
            row.update(ceiling_tok_s=ceiling, of_ceiling=tps / ceiling)
        out["rows"].append(row)
        extra = f"   HBM ceiling {row['ceiling_tok_s']:9.1f} tok/s -> {row['of_ceiling']:.0%}" if peaks else ""
        print(f"[decode]   batch {b:3d}: {t * 1e3:8.2f} ms / step {tps:9.1f} tok/s{extra}", flush=True)
        del eng, slots
    return out


def bench_train(cfg, batch, seq, steps, peaks):
    from qwen3_jax.train.step import StepConfig, make_optimizer, make_schedule, make_train_step, split_model

    model = random_model(cfg, jnp.bfloat16, jnp.float32, Runtime(remat="full"))
    graphdef, abstract, params = split_model(model)
    del model
    sched = make_schedule("constant", 1e-5, 0, 1000)
    tx = make_optimizer(params, schedule=sched, weight_decay=0.0, clip=1.0)
    opt_state = jax.jit(tx.init)(params)
    step = make_train_step(graphdef, abstract, tx, sched, StepConfig(lbl_coef=0.001))
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32)
    b = {"inputs": ids, "targets": np.concatenate([ids[:, 1:], np.full((batch, 1), -100, np.int32)], 1),
         "segment_ids": np.ones_like(ids), "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), ids.shape).copy()}
    b = jax.device_put(b)
    t0 = time.perf_counter()
    params, opt_state, m = step(params, opt_state, b, jnp.int32(0))
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(1, steps + 1):
        t0 = time.perf_counter()
        params, opt_state, m = step(params, opt_state, b, jnp.int32(i))
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    t = float(np.median(times))
    fl = model_flops(cfg, "train", batch, seq)["total"]
    out = {"layers": cfg.num_hidden_layers, "batch": batch, "seq": seq, "first_step_s": compile_s, "step_s": t,
           "tok_s": batch * seq / t, "model_tflops": fl / t / 1e12, "loss": float(m["loss"])}
    if peaks:
        out["mfu"] = fl / t / peaks[1]
    print(f"[train] {cfg.num_hidden_layers} layers, {batch} x {seq} tokens, bf16 / fp32 master, remat full: "
          f"{t * 1e3:.1f} ms / step, {out['tok_s']:.0f} tok/s, {out['model_tflops']:.1f} model TFLOP/s"
          + (f", MFU {out['mfu']:.1%}" if peaks else "") + f" (first step {compile_s:.1f} s, loss {out['loss']:.3f})")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="a tiny config (CPU): check that every path runs")
    ap.add_argument("--only", choices=("check", "decode", "train"))
    ap.add_argument("--batches", default="1,64", help="decode batch sizes")
    ap.add_argument("--max-len", type=int, default=4096, help="decode cache slots")
    ap.add_argument("--train-layers", type=int, default=4)
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--train-seq", type=int, default=4096)
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu.json")
    a = ap.parse_args(argv)
    dev = jax.devices()[0]
    peaks = PEAKS.get(dev.device_kind)
    if a.smoke:
        cfg = Qwen3Config.from_dict(SMOKE)
        a.max_len, a.train_seq, a.train_batch, prompt_len, steps, train_steps = 128, 64, 2, 16, 4, 2
        batches = [1, 4]
    else:
        cfg = Qwen3Config.preset("Qwen3-30B-A3B")
        prompt_len, steps, train_steps = 128, 32, 5
        batches = [int(x) for x in a.batches.split(",")]
    ks = Runtime().kernels
    res = {"device": dev.device_kind, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
           "kernels": {"platform": ks.platform, "gmm": ks.gmm, "attention": ks.attention,
                       "ep_dispatch": ks.ep_dispatch}, "peaks": peaks}
    print(f"jax {jax.__version__} on {dev.device_kind} ({dev.platform}); kernels {res['kernels']}; "
          f"peaks (HBM B/s, bf16 FLOP/s) {peaks}")
    ok = True
    if a.only in (None, "check"):
        impls = ("tokamax", "tokamax_triton", "ragged_dot") if ks.platform == "gpu" else (ks.gmm, "ragged_dot")
        res["check"], ok = check_kernels(cfg, impls=impls, rows=(256,) if a.smoke else (4096, 512))
        res["check"]["model"] = check_model()
        ok &= res["check"]["model"]["passed"]
    if a.only in (None, "decode"):
        res["decode"] = bench_decode(cfg, jnp.bfloat16, batches, a.max_len, prompt_len, steps, peaks)
    if a.only in (None, "train"):
        tcfg = cfg.replace(num_hidden_layers=min(a.train_layers, cfg.num_hidden_layers), mlp_only_layers=[])
        res["train"] = bench_train(tcfg, a.train_batch, a.train_seq, train_steps, peaks)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "gpu.json"), "w") as f:
            json.dump(res, f, indent=1)
    return res, ok


if __name__ == "__main__":
    sys.exit(0 if main()[1] else 1)
