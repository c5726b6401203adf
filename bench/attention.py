"""Attention benchmark: our causal attention (query chunks, custom VJP from the log-sum-exp) vs
`jax.nn.dot_product_attention` (XLA implementation, autodiff) vs torch's `scaled_dot_product_attention`, on the
same causal GQA problem, forward and forward + backward, timed interleaved in one run.

    python bench/attention.py                       # B=4, T=512, 4 query / 2 kv heads of 64, fp32
    python bench/attention.py --seq 2048
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from qwen3_jax.kernels.attention import causal_attention
from qwen3_jax.hostmem import tune_malloc

from forward import timeit_interleaved  # bench/forward.py (this script's folder is on sys.path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    args = p.parse_args(argv)
    print(f"host malloc tuned for XLA:CPU (qwen3_jax.hostmem, both sides): {tune_malloc()}")
    import torch

    b, t, h, kh, hd = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((b, t, n, hd)).astype(np.float32) for n in (h, kh, kh))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    qj, kj, vj = map(jnp.asarray, (q, k, v))

    def ours(q, k, v):
        return causal_attention(q, k, v, mask)

    def xla(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) ** 2)

    fns = {name: (jax.jit(fn), jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))) for name, fn in
           (("ours", ours), ("jax.nn", xla))}
    err = float(jnp.max(jnp.abs(fns["ours"][0](qj, kj, vj) - fns["jax.nn"][0](qj, kj, vj))))
    qt, kt, vt = (torch.tensor(x).transpose(1, 2).contiguous() for x in (q, k, v))  # [B, heads, T, hd]

    def torch_fwd(grad):
        qq, kk, vv = (x.detach().requires_grad_(grad) for x in (qt, kt, vt))
        with torch.set_grad_enabled(grad):
            o = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)
            if grad:
                (o ** 2).sum().backward()

    block = jax.block_until_ready
    calls = {}
    for name, (f, g) in fns.items():
        calls[f"{name} fwd"] = lambda f=f: block(f(qj, kj, vj))
        calls[f"{name} fwd+bwd"] = lambda g=g: block(g(qj, kj, vj))
    calls["torch sdpa fwd"] = lambda: torch_fwd(False)
    calls["torch sdpa fwd+bwd"] = lambda: torch_fwd(True)
    times = timeit_interleaved(calls, warmup=2, iters=9)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores), torch threads "
          f"{torch.get_num_threads()}")
    print(f"causal GQA attention, B={b} T={t} {h} query / {kh} kv heads of {hd}, fp32; max |ours - jax.nn| {err:.1e}")
    for pass_ in ("fwd", "fwd+bwd"):
        row = "  ".join(f"{name} {times[f'{name} {pass_}'] * 1e3:7.2f} ms" for name in ("ours", "jax.nn", "torch sdpa"))
        print(f"  {pass_:8s} {row}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
