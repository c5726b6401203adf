"""Expert parallelism on 8 simulated CPU devices: step time against one device, all-to-all bytes against
the analytic figure.

    python bench/ep.py [--batch 8 --seq 128 --layers 2 --experts 32 --top-k 4 --hidden 256 --dtype float32]

1. forward + backward (value_and_grad of a token loss) of a small Qwen3-MoE: one device vs the same model
   on make_mesh(expert=8) (all-to-all EP), median of --iters runs after compilation;
2. bytes all-to-all moves for one MoE layer's forward + backward (read from the compiled HLO: result
   shapes x devices), against tokens x top_k x hidden x dtype bytes per direction (4 directions:
   dispatch, combine and their transposes), for dropless (worst-case buffers on CPU) and capacity modes.

On a CPU host the 8 "devices" share the same cores, so the time ratio measures overhead (dispatch
bookkeeping, padded buffers, collectives emulated in memory), not a speed-up.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from qwen3_jax import Qwen3Config, Qwen3ForCausalLM, Runtime  # noqa: E402
from qwen3_jax.sharding import ep_moe, make_mesh, shard_model  # noqa: E402

BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1}


def all_to_all_bytes(hlo: str) -> dict[str, int]:
    """Per-device bytes received by all-to-all ops in a compiled HLO module, by element type."""
    out: dict[str, int] = {}
    for m in re.finditer(r"= (.*?) all-to-all(?:-start)?\(", hlo):
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
            n = int(np.prod([int(x) for x in dims.split(",") if x])) if dims else 1
            out[dtype] = out.get(dtype, 0) + n * BYTES[dtype]
    return out


def timed(fn, *args, iters=5):
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--iters", type=int, default=5)
    a = ap.parse_args(argv)
    assert jax.device_count() >= 8, "needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)"
    cfg = Qwen3Config(vocab_size=2048, hidden_size=a.hidden, moe_intermediate_size=a.hidden // 2,
                      num_hidden_layers=a.layers, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                      num_experts=a.experts, num_experts_per_tok=a.top_k, max_position_embeddings=4096)
    dt = jnp.dtype(a.dtype)
    tokens = a.batch * a.seq
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (a.batch, a.seq)).astype(np.int32)

    def loss(model, ids):
        logits = model(ids).logits.astype(jnp.float32)
        return -jnp.mean(jax.nn.log_softmax(logits[:, :-1])[..., 0])

    step = nnx.jit(nnx.value_and_grad(loss))
    build = lambda: Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=dt, param_dtype=dt)  # noqa: E731
    mesh = make_mesh(expert=8)
    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}, {os.cpu_count()} host cores; "
          f"model: {a.layers} MoE layers, hidden {a.hidden}, {a.experts} experts top-{a.top_k}, {a.dtype}; "
          f"batch {a.batch} x seq {a.seq} = {tokens} tokens")
    t1 = timed(step, build(), ids, iters=a.iters)
    t8 = timed(step, shard_model(build(), mesh), ids, iters=a.iters)
    print(f"\nforward+backward step   1 device {t1 * 1e3:8.1f} ms   EP expert=8 {t8 * 1e3:8.1f} ms   "
          f"ratio EP/1 = {t8 / t1:.2f}")

    # all-to-all bytes of one MoE layer, forward + backward, from the compiled program
    rng = np.random.default_rng(1)
    e, d, f = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    p = {"router": rng.normal(size=(d, e)), "gate_proj": rng.normal(size=(e, d, f)) * 0.05,
         "up_proj": rng.normal(size=(e, d, f)) * 0.05, "down_proj": rng.normal(size=(e, f, d)) * 0.05}
    p = {k: jnp.asarray(v, dt) for k, v in p.items()}
    x = jnp.asarray(rng.normal(size=(a.batch, a.seq, d)), dt)
    analytic = tokens * cfg.num_experts_per_tok * d * dt.itemsize * 4
    print(f"\nall-to-all bytes, one MoE layer fwd+bwd, all {mesh.size} devices "
          f"(analytic: {tokens} tokens x top-{a.top_k} x {d} x {dt.itemsize} B x 4 directions = {analytic / 2**20:.2f} MiB)")
    print(f"  {'mode':<22}{'hidden states MiB':>18}{'expert ids MiB':>16}{'ratio to analytic':>19}{'dropped':>9}")
    for label, cf in (("dropless (worst case)", None), ("capacity 2.0", 2.0), ("capacity 1.25", 1.25),
                      ("capacity 1.0", 1.0)):
        def layer_loss(x, p, cf=cf):
            y, _, dropped = ep_moe(x, None, p, cfg, Runtime(mesh=mesh, capacity_factor=cf, ep_dispatch="padded"))
            return jnp.sum(y.astype(jnp.float32) ** 2), dropped

        fn = jax.jit(jax.grad(layer_loss, argnums=(0, 1), has_aux=True))
        hlo = fn.lower(x, p).compile().as_text()
        by_type = all_to_all_bytes(hlo)
        act = sum(v for k, v in by_type.items() if k in ("f32", "bf16", "f16")) * mesh.size
        ids_b = sum(v for k, v in by_type.items() if k in ("s32", "u32")) * mesh.size
        dropped = int(fn(x, p)[1])
        print(f"  {label:<22}{act / 2**20:>18.2f}{ids_b / 2**20:>16.2f}{act / analytic:>19.2f}{dropped:>9}")
    print(f"  per training step: x {a.layers} layers (the scan runs the same layer program per layer)")


if __name__ == "__main__":
    main()
