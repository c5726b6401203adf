"""Attention of T queries over the same T keys (training, full forward, prefill without a cache), by platform.

    attention(q [B,T,H,hd], k [B,T,K,hd], v [B,T,K,hd], seg_bt [B,T] | None, ks=Kernels, mesh=None) -> [B,T,H,hd]

Causal, grouped-query (H = K * G); seg_bt keeps packed documents (and padding, segment 0) apart: a query sees the
keys at or before it of its own segment. Softmax in fp32.
- "splash" (TPU): the Pallas splash-attention kernel (causal mask + segment ids), in `jax.shard_map` over the
  batch (and heads over 'tensor') when a mesh is given; interpret mode when not compiled for a TPU (tests).
- "cudnn" (GPU): `jax.nn.dot_product_attention(implementation="cudnn")` for bf16/fp16; "xla" otherwise.
- "chunked" (CPU): query chunks over batched matmuls with a flash-style custom VJP (below).

The chunked attention: q, k, v are transposed once to [B,K,T,G,hd] (scaled), [B,K,hd,S] and [B,K,S,hd], so every
matmul is a plain batched (B,K) product with no per-chunk transposes (XLA:CPU runs `x @ w.T` forms about half as
fast). Query chunk i of `chunk` rows attends to keys [0, end of chunk i) only -- a causal mask never lets it see
later keys -- so the chunks do (1 + chunk / T) / 2 of the full T x T work. The custom VJP keeps only the output and
each row's log-sum-exp (no [T, S] probabilities are stored) and recomputes the probabilities chunk by chunk in the
backward, the flash-attention recipe:
    dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),  dQ = dS K,  dK = dS^T Q.
`python bench/attention.py` times it against `jax.nn.dot_product_attention` with autodiff (figures in
bench/README.md).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from qwen3_jax.partition import BATCH, fit_spec


def segment_mask(seg_bt, t: int, b: int):
    """[B, T, T] bool: key index <= query index and (with seg_bt) the same segment."""
    m = jnp.tril(jnp.ones((t, t), bool))[None]
    if seg_bt is not None:
        m = m & (seg_bt[:, :, None] == seg_bt[:, None, :])
    return jnp.broadcast_to(m, (b, t, t))


def attention(q_bthd, k_bthd, v_bthd, seg_bt, *, ks, mesh=None):
    """See the module docstring; ks: the qwen3_jax.kernels choices, mesh: the mesh of a sharded program."""
    b, t, h, hd = q_bthd.shape
    impl = ks.attention_for(t, q_bthd.dtype)
    if impl == "splash":
        return splash_attention(q_bthd, k_bthd, v_bthd, seg_bt, mesh=mesh, interpret=ks.interpret)
    if impl == "chunked":
        return causal_attention(q_bthd, k_bthd, v_bthd, segment_mask(seg_bt, t, b))
    if impl in ("xla", "cudnn"):
        mask = None if seg_bt is None else segment_mask(seg_bt, t, b)[:, None]
        return jax.nn.dot_product_attention(q_bthd, k_bthd.astype(q_bthd.dtype), v_bthd.astype(q_bthd.dtype),
                                            mask=mask, is_causal=True, implementation=impl)
    raise ValueError(f"attention implementation {impl!r}")


# ============================================================================ splash (TPU)
def splash_block(t: int) -> int:
    """Sequence block of the splash kernel: the largest of 512, 256, 128 that divides T."""
    return next(bs for bs in (512, 256, 128) if t % bs == 0)


def _splash_local(q_bthd, k_bthd, v_bthd, seg_bt, *, interpret):
    """Splash on one device's rows: kernel over [H, T, hd] per row (vmapped over the batch)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, t, h, hd = q_bthd.shape
    bs = splash_block(t)
    blocks = sa.BlockSizes(block_q=bs, block_kv=bs, block_kv_compute=bs, block_q_dkv=bs, block_kv_dkv=bs,
                           block_kv_dkv_compute=bs, block_q_dq=bs, block_kv_dq=bs)
    mask = sa.MultiHeadMask([sa.CausalMask((t, t)) for _ in range(h)])
    kernel = sa.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)
    dt = q_bthd.dtype
    q = (q_bthd * jnp.asarray(1.0 / math.sqrt(hd), dt)).transpose(0, 2, 1, 3)       # [B, H, T, hd]
    k = k_bthd.astype(dt).transpose(0, 2, 1, 3)                                       # [B, K, T, hd]
    v = v_bthd.astype(dt).transpose(0, 2, 1, 3)
    if seg_bt is None:
        o = jax.vmap(kernel)(q, k, v)
    else:
        seg = seg_bt.astype(jnp.int32)
        o = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sa.SegmentIds(q=s, kv=s)))(q, k, v, seg)
    return o.transpose(0, 2, 1, 3).astype(dt)


def splash_attention(q_bthd, k_bthd, v_bthd, seg_bt, *, mesh=None, interpret=False):
    """Splash attention; with a mesh, in shard_map: rows over the batch axes, heads over 'tensor' when it divides
    both head counts (Mosaic kernels are not auto-partitioned)."""
    fn = functools.partial(_splash_local, interpret=interpret)
    if mesh is None or mesh.size == 1:
        return fn(q_bthd, k_bthd, v_bthd, seg_bt)
    b, _, h, _ = q_bthd.shape
    kh = k_bthd.shape[2]
    rows = fit_spec((BATCH,), (b,), mesh.shape)[0]
    tp = mesh.shape.get("tensor", 1)
    heads = "tensor" if tp > 1 and h % tp == 0 and kh % tp == 0 else None
    spec = P(rows, None, heads, None)
    if seg_bt is None:
        return jax.shard_map(lambda q, k, v: fn(q, k, v, None), mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
                             check_vma=False)(q_bthd, k_bthd, v_bthd)
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec, P(rows, None)), out_specs=spec,
                         check_vma=False)(q_bthd, k_bthd, v_bthd, seg_bt)


# ============================================================================ chunked (CPU)
NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # masked logit: a fully masked row gets a uniform softmax


def default_chunk(t: int) -> int:
    """Query chunk: 128 rows (less work than 256 and 12% faster backward on CPU at T=512), at most 16 chunks."""
    return max(128, -(-t // 16))


def _chunks(t: int, chunk: int):
    return [(s0, min(s0 + chunk, t)) for s0 in range(0, t, chunk)]


def _scores(q_bktgd, kT_bkds, mask_btt, s0, e):
    """Masked fp32 logits of queries [s0, e) against keys [0, e): [B, K, Tc, G, e]."""
    s = jnp.einsum("bktgd,bkds->bktgs", q_bktgd[:, :, s0:e], kT_bkds[..., :e], preferred_element_type=jnp.float32)
    return jnp.where(mask_btt[:, None, s0:e, None, :e], s, NEG)


def _forward(q, kT, v, mask_btt, chunk):
    """Output [B,K,T,G,hd] and per chunk the rows' log-sum-exp [B,K,Tc,G,1]."""
    outs, lses = [], []
    for s0, e in _chunks(q.shape[2], chunk):
        s = _scores(q, kT, mask_btt, s0, e)
        m = jnp.max(s, -1, keepdims=True)
        p = jnp.exp(s - m)
        l_ = jnp.sum(p, -1, keepdims=True)
        o = jnp.einsum("bktgs,bksd->bktgd", p.astype(q.dtype), v[:, :, :e], preferred_element_type=jnp.float32)
        outs.append((o / l_).astype(q.dtype))
        lses.append(m + jnp.log(l_))
    return jnp.concatenate(outs, axis=2), lses


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, kT, v, mask_btt, chunk):
    return _forward(q, kT, v, mask_btt, chunk)[0]


def _attention_fwd(q, kT, v, mask_btt, chunk):
    o, lses = _forward(q, kT, v, mask_btt, chunk)
    return o, (q, kT, v, mask_btt, o, lses)


def _attention_bwd(chunk, res, do):
    q, kT, v, mask_btt, o, lses = res
    f32, dt = jnp.float32, q.dtype
    dq = []
    dkT, dv = jnp.zeros(kT.shape, f32), jnp.zeros(v.shape, f32)
    for (s0, e), lse in zip(_chunks(q.shape[2], chunk), lses):
        q_i, do_i = q[:, :, s0:e], do[:, :, s0:e]
        p = jnp.exp(_scores(q, kT, mask_btt, s0, e) - lse)                               # [B,K,Tc,G,e]
        dv = dv.at[:, :, :e].add(jnp.einsum("bktgs,bktgd->bksd", p.astype(dt), do_i, preferred_element_type=f32))
        dp = jnp.einsum("bktgd,bksd->bktgs", do_i, v[:, :, :e], preferred_element_type=f32)
        delta = jnp.sum(do_i.astype(f32) * o[:, :, s0:e].astype(f32), -1, keepdims=True)
        ds = (p * (dp - delta)).astype(dt)
        dq.append(jnp.einsum("bktgs,bkds->bktgd", ds, kT[..., :e], preferred_element_type=f32).astype(dt))
        dkT = dkT.at[..., :e].add(jnp.einsum("bktgs,bktgd->bkds", ds, q_i, preferred_element_type=f32))
    return jnp.concatenate(dq, axis=2), dkT.astype(kT.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def causal_attention(q_bthd, k_bthd, v_bthd, mask_btt, chunk: int | None = None):
    """Grouped-query attention of T queries over the same T keys; mask_btt [B,T,T] True = may attend, and it must
    be causal (key index <= query index; padding and document boundaries may remove more). See the module doc."""
    b, t, h, hd = q_bthd.shape
    kh = k_bthd.shape[2]
    dt = q_bthd.dtype
    q = (q_bthd * jnp.asarray(1.0 / math.sqrt(hd), dt)).reshape(b, t, kh, h // kh, hd).transpose(0, 2, 1, 3, 4)
    kT = k_bthd.astype(dt).transpose(0, 2, 3, 1)                                          # [B, K, hd, S]
    v = v_bthd.astype(dt).transpose(0, 2, 1, 3)                                           # [B, K, S, hd]
    o = _attention(q, kT, v, mask_btt, chunk or default_chunk(t))                         # [B, K, T, G, hd]
    return o.transpose(0, 2, 1, 3, 4).reshape(b, t, h, hd)
