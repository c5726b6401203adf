"""Qwen3 / Qwen3-MoE decoder in Flax NNX.

Read top to bottom: pure math functions (norm, RoPE, attention, router, MoE) over explicit shapes, then thin
NNX modules that hold the parameters stacked over layers, then the decoder stack run by `nnx.scan`.

Shape letters: B batch, T query positions, S key positions, D hidden, H query heads, K kv heads,
G = H / K query heads per kv head, hd head dim, E experts, k top-k, F expert width, I dense MLP width,
V vocab, L layers, M = tokens x top-k routed rows.

Parameters are stored `[in, out]` (x @ W) with the layer axis first:
    embed_tokens [V, D]; lm_head [D, V] (absent when tied)
    layers.attn:  q_proj [L, D, H, hd], k_proj/v_proj [L, D, K, hd], o_proj [L, H, hd, D],
                  q_norm/k_norm [L, hd], input_layernorm/post_attention_layernorm [L, D]
    layers.moe:   router [Lm, D, E], gate_proj/up_proj [Lm, E, D, F], down_proj [Lm, E, F, D]
    layers.mlp:   gate_proj/up_proj [Ld, D, I], down_proj [Ld, I, D]
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import cpu_kernels
from .attention import causal_attention
from .config import Qwen3Config
from .gmm import grouped_swiglu



# ============================================================================ pure math
def rms_norm(x, w, eps):
    """HF Qwen3RMSNorm: normalise in fp32, cast back, then scale."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w.astype(x.dtype) * xf.astype(x.dtype)


def rope_inv_freq(cfg: Qwen3Config) -> tuple[np.ndarray, float]:
    """Inverse frequencies [hd/2] and the cos/sin scale, as transformers computes them (default, YaRN)."""
    dim = cfg.head_dim
    base = cfg.rope_theta
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    rs = cfg.rope_scaling
    if not rs:
        return (1.0 / pos_freqs).astype(np.float32), 1.0
    factor = float(rs["factor"])
    orig = rs["original_max_position_embeddings"]

    def get_mscale(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        ms, ms_all = rs.get("mscale"), rs.get("mscale_all_dim")
        attention_factor = get_mscale(factor, ms) / get_mscale(factor, ms_all) if ms and ms_all else get_mscale(factor)
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1

    def correction_dim(rot):
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1.0 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq.astype(np.float32), float(attention_factor)


def rope_cos_sin(positions_bt, inv_freq, scale, dtype):
    """cos, sin [B, T, hd] (halves repeated, HF layout), scaled by YaRN's attention factor."""
    freqs = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return (jnp.cos(emb) * scale).astype(dtype), (jnp.sin(emb) * scale).astype(dtype)


def apply_rope(x_bthd, cos_btd, sin_btd):
    half = x_bthd.shape[-1] // 2
    rot = jnp.concatenate([-x_bthd[..., half:], x_bthd[..., :half]], axis=-1)
    return x_bthd * cos_btd[:, :, None, :] + rot * sin_btd[:, :, None, :]


def attention_core(q_bthd, k_bskd, v_bskd, mask_bts):
    """Grouped-query softmax attention (fp32 logits and softmax), mask_bts True = may attend.

    jax.nn.dot_product_attention picks the implementation (cuDNN on GPU when it can, else XLA)."""
    return jax.nn.dot_product_attention(q_bthd, k_bskd, v_bskd, mask=mask_bts[:, None])


def cached_attention(q_bthd, kc_bskd, vc_bskd, kn_btkd, vn_btkd, write_bt, old_bs, new_btt):
    """Attention of T new queries over the cache (old_bs [B,S]: slot holds an earlier token) and the T new keys
    (new_btt: causal and real). The cache is only read; the caller stores the new keys/values.

    T == 1 (decode): one flat matmul over the cache row [S, K*hd] against a block-diagonal query [K*hd, K*G],
    layout-friendly on CPU (no per-head transposes of the cache), the new token joining the same softmax.
    T > 1 (prefill): the new keys are written into a copy of the layer's cache row, then masked attention."""
    b, t, h, hd = q_bthd.shape
    s_len, kh = kc_bskd.shape[1], kc_bskd.shape[2]
    g = h // kh
    dt = q_bthd.dtype
    if t > 1:
        rows = jnp.arange(b)[:, None]
        kc = kc_bskd.astype(dt).at[rows, write_bt].set(kn_btkd, mode="drop")
        vc = vc_bskd.astype(dt).at[rows, write_bt].set(vn_btkd, mode="drop")
        slot = jnp.arange(s_len, dtype=jnp.int32)
        end_b = write_bt[:, 0] + jnp.sum(new_btt[:, -1], -1)          # lengths + real new tokens
        mask_bts = (slot[None, None] <= write_bt[:, :, None]) & (slot[None, None] < end_b[:, None, None])
        return attention_core(q_bthd, kc, vc, mask_bts)
    eye = jnp.eye(kh, dtype=dt)
    q_bkgd = q_bthd[:, 0].reshape(b, kh, g, hd) * jnp.asarray(1.0 / math.sqrt(hd), dt)
    q_bxy = jnp.einsum("bkgd,kj->bkdjg", q_bkgd, eye).reshape(b, kh * hd, kh * g)     # block diagonal
    s_c = jnp.einsum("bsx,bxy->bsy", kc_bskd.reshape(b, s_len, kh * hd).astype(dt), q_bxy,
                     preferred_element_type=jnp.float32)                                 # [B, S, K*G]
    s_c = jnp.where(old_bs[:, :, None], s_c, -jnp.inf)
    s_n = jnp.einsum("bkgd,bkd->bkg", q_bkgd, kn_btkd[:, 0], preferred_element_type=jnp.float32).reshape(b, 1, kh * g)
    s_n = jnp.where(new_btt[:, :1, :1], s_n, -jnp.inf)
    m = jnp.maximum(jnp.max(s_c, 1, keepdims=True), s_n)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p_c, p_n = jnp.exp(s_c - m), jnp.exp(s_n - m)
    denom = jnp.maximum(jnp.sum(p_c, 1) + p_n[:, 0], 1e-30)                              # [B, K*G]
    o = jnp.einsum("bsy,bsx->byx", p_c.astype(dt), vc_bskd.reshape(b, s_len, kh * hd).astype(dt),
                   preferred_element_type=jnp.float32).reshape(b, kh, g, kh, hd)
    o = jnp.einsum("bkgjd,kj->bkgd", o, eye.astype(o.dtype))
    o = o + p_n[:, 0].reshape(b, kh, g)[..., None] * vn_btkd[:, 0, :, None, :].astype(jnp.float32)
    o = o / denom.reshape(b, kh, g)[..., None]
    return o.reshape(b, 1, h, hd).astype(dt)


def attention_qkv(x_btd, p, cos, sin, eps, proj=None):
    """Projections, per-head q/k RMSNorm, RoPE. Returns q [B,T,H,hd], k, v [B,T,K,hd].
    proj(name, x): the projection by weight `name` when it is computed elsewhere (the CPU decode kernels)."""
    dt = x_btd.dtype
    if proj is None:
        proj = lambda name, x: jnp.einsum("btd,dhk->bthk", x, p[name].astype(dt))  # noqa: E731
    q, k, v = (proj(n, x_btd).astype(dt) for n in ("q_proj", "k_proj", "v_proj"))
    q = apply_rope(rms_norm(q, p["q_norm"], eps), cos, sin)
    k = apply_rope(rms_norm(k, p["k_norm"], eps), cos, sin)
    return q, k, v


def attention_out(o_bthd, p, proj=None):
    if proj is not None:
        return proj("o_proj", o_bthd).astype(o_bthd.dtype)
    return jnp.einsum("bthk,hkd->btd", o_bthd, p["o_proj"].astype(o_bthd.dtype))


def swiglu_mlp(x, p):
    dt = x.dtype
    h = jax.nn.silu(x @ p["gate_proj"].astype(dt)) * (x @ p["up_proj"].astype(dt))
    return h @ p["down_proj"].astype(dt)


def route(x_td, router_de, top_k, norm_topk_prob):
    """fp32 router: logits [T,E], softmax, top-k, renormalise. Returns logits, weights [T,k], experts [T,k]."""
    logits_te = jnp.dot(x_td.astype(jnp.float32), router_de.astype(jnp.float32))
    return (logits_te, *route_topk(logits_te, top_k, norm_topk_prob))


def route_topk(logits_te, top_k, norm_topk_prob):
    """Router weights [T,k] and experts [T,k] from fp32 logits [T,E]."""
    probs_te = jax.nn.softmax(logits_te, axis=-1)
    w_tk, e_tk = jax.lax.top_k(probs_te, top_k)
    if norm_topk_prob:
        w_tk = w_tk / jnp.sum(w_tk, axis=-1, keepdims=True)
    return w_tk, e_tk


def moe_experts(x_td, w_tk, e_tk, p, *, num_experts=None, gmm_backend="auto", stacked=None):
    """Dropless expert computation: sort (token, slot) pairs by expert, grouped SwiGLU, unsort, combine.

    `e_tk` may name experts outside [0, num_experts) (expert-parallel callers drop them by giving them
    weight 0 and an index >= num_experts): those slots sort last and are not computed.
    stacked: (the MoE parameters stacked over layers, layer index) of which p is one layer (see grouped_swiglu).
    """
    t, d = x_td.shape
    k = e_tk.shape[1]
    n_exp = num_experts or p["gate_proj"].shape[0]
    dt = x_td.dtype
    flat_e = e_tk.reshape(-1)                                   # [M]
    order = jnp.argsort(flat_e, stable=True)                    # [M] sorted slot -> flat slot
    x_md = x_td[order // k]                                     # [M, D] token rows in expert order
    sizes_e = jnp.bincount(flat_e, length=n_exp).astype(jnp.int32)
    names = ("gate_proj", "up_proj", "down_proj")
    if stacked is not None:
        stacked = (tuple(stacked[0][n] for n in names), stacked[1])
    y_md = grouped_swiglu(x_md, *(p[n].astype(dt) for n in names), sizes_e, backend=gmm_backend,
                          stacked=stacked)                      # [M, D]
    unsort = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))  # inverse perm.
    y_tkd = y_md[unsort].reshape(t, k, d)                       # back to (token, slot) order
    return jnp.einsum("tkd,tk->td", y_tkd, w_tk.astype(dt))


def moe_experts_gather(x_td, w_tk, e_tk, p):
    """Few-token (decode) experts: gather each (token, slot)'s expert weights [M, D, F] (M = T x k) and multiply
    directly -- no sort, no grouping, no padding. Reads T x k expert matrices, so it pays off while T x k <= E.

    Each row is its own batch entry ([M, 1, D] @ [M, D, F]: batch dims leading, contraction on the weights' major
    dim), which XLA:CPU runs as one batched matmul over the gathered weights; an einsum over [T, k, D, F] with D
    in the middle made it transpose every gathered matrix first (decode step 0.77 -> 0.31 ms of MoE, 4 layers).
    The routing weights scale h before the down projection, so the k slots of a token sum inside one matmul
    ([T, 1, k*F] @ [T, k*F, D])."""
    t, d = x_td.shape
    k = e_tk.shape[1]
    dt = x_td.dtype
    e_m = e_tk.reshape(-1)                                        # [M]
    x_m1d = jnp.repeat(x_td, k, axis=0)[:, None, :]              # [M, 1, D]
    g_mdf = p["gate_proj"][e_m].astype(dt)
    u_mdf = p["up_proj"][e_m].astype(dt)
    d_mfd = p["down_proj"][e_m].astype(dt)
    h_m1f = jax.nn.silu(jnp.matmul(x_m1d, g_mdf)) * jnp.matmul(x_m1d, u_mdf)
    h_m1f = h_m1f * w_tk.reshape(-1, 1, 1).astype(dt)             # routing weight of each row
    f = h_m1f.shape[-1]
    y_t1d = jnp.matmul(h_m1f.reshape(t, 1, k * f), d_mfd.reshape(t, k * f, d))
    return y_t1d[:, 0]


def moe_block(x_btd, p, cfg: Qwen3Config, gmm_backend="auto", gather_max: int | None = None, stacked=None,
              kernels: bool = False):
    """Qwen3-MoE sparse block. Returns output [B,T,D] and router logits [B,T,E] (fp32).

    With gmm_backend "auto", few token copies (B*T*top_k <= gather_max; static shapes, i.e. KV-cached decode)
    take the gather path, the rest the sorted grouped matmul (stacked: see moe_experts). The gather copies one
    expert per token copy, the blocked grouped matmul reading the layer stack one per distinct expert: by default
    the gather serves up to num_experts / 2 copies when the stack is given (4 layers, 32 experts top-4 on CPU, per
    decode step: 16 rows gather 2.2 vs blocked 3.2 ms, 32 rows 5.5 vs 4.6 ms), up to num_experts otherwise.
    kernels (KV-cached inference on XLA:CPU, with `stacked`): up to 4 copies per expert, the router and the experts
    run in qwen3_jax.cpu_kernels, reading the layer's weights in place from the stack (moe_experts_kernel)."""
    b, t, d = x_btd.shape
    x_td = x_btd.reshape(b * t, d)
    copies = b * t * cfg.num_experts_per_tok
    if kernels and stacked is not None and gmm_backend == "auto" and copies <= 4 * cfg.num_experts:
        logits = stacked_proj(x_td.astype(jnp.float32), stacked[0]["router"], stacked[1])
        w_tk, e_tk = route_topk(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob)
        y = moe_experts_kernel(x_td, w_tk, e_tk, stacked)
        return y.reshape(b, t, d), logits.reshape(b, t, -1)
    logits, w_tk, e_tk = route(x_td, p["router"], cfg.num_experts_per_tok, cfg.norm_topk_prob)
    if gather_max is None:
        gather_max = cfg.num_experts // 2 if stacked is not None else cfg.num_experts
    if gmm_backend == "auto" and copies <= gather_max:
        y = moe_experts_gather(x_td, w_tk, e_tk, p)
    else:
        y = moe_experts(x_td, w_tk, e_tk, p, gmm_backend=gmm_backend, stacked=stacked)
    return y.reshape(b, t, d), logits.reshape(b, t, -1)


# ============================================================================ XLA:CPU decode kernels
# KV-cached inference on CPU reads layer l's weights and cache rows in place from their layer stacks through the
# FFI kernels of qwen3_jax.cpu_kernels: in a layer scan, XLA copies every slice it feeds to a matmul (a decode step
# of the bench config copied ~1 MB per layer) and a gather of the chosen experts copies them whole. Inference only
# (no gradients); the XLA functions above are the reference the tests hold them to.
def stacked_proj(x, w_stack, layer, n_in: int = 1):
    """x [..., *in] @ w_stack[layer] for w_stack [L, *in, *out] (n_in input dims) -> [..., *out] fp32."""
    lead, k = x.shape[: x.ndim - n_in], math.prod(x.shape[x.ndim - n_in:])
    out = w_stack.shape[1 + n_in:]
    y = cpu_kernels.stacked_matmul(x.reshape(1, -1, k), w_stack.reshape(w_stack.shape[0], 1, k, -1), layer)
    return y.reshape(*lead, *out)


def moe_experts_kernel(x_td, w_tk, e_tk, stacked):
    """moe_experts_gather of layer stacked[1], the chosen experts read in place from the stack stacked[0]."""
    stack = tuple(stacked[0][n] for n in ("gate_proj", "up_proj", "down_proj"))
    return cpu_kernels.moe_gather_swiglu(x_td, w_tk, e_tk, stack, stacked[1]).astype(x_td.dtype)


def cached_attention_kernel(q_bthd, k_stack, v_stack, layer, kn_btkd, vn_btkd, old_bs, new_btt):
    """cached_attention for T == 1 with layer `layer` of the cache k_stack/v_stack [L, B, S, K, hd] read in place
    (only the slots old_bs marks)."""
    o_bhd = cpu_kernels.decode_attention(q_bthd[:, 0], kn_btkd[:, 0], vn_btkd[:, 0], old_bs, new_btt[:, 0, 0],
                                         k_stack, v_stack, layer)
    return o_bhd[:, None].astype(q_bthd.dtype)


# ============================================================================ masks and positions
def positions_from_mask(mask_bt):
    """Left/right padding aware positions: cumsum(mask) - 1 (pads get 0)."""
    return jnp.maximum(jnp.cumsum(mask_bt.astype(jnp.int32), axis=-1) - 1, 0)


def causal_mask(positions_bt, mask_bt=None, segment_ids_bt=None):
    """[B, T, T] bool: key index <= query index, key is real, same segment."""
    t = positions_bt.shape[1]
    m = jnp.tril(jnp.ones((t, t), bool))[None]
    if mask_bt is not None:
        m = m & mask_bt.astype(bool)[:, None, :]
    if segment_ids_bt is not None:
        m = m & (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :])
    return m


# ============================================================================ modules
def _normal(rngs, shape, std, dtype):
    return (jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype)


class Attention(nnx.Module):
    """Stacked over `n` layers: GQA projections and per-head q/k RMSNorm, plus the two layer norms."""

    def __init__(self, cfg: Qwen3Config, n: int, *, rngs: nnx.Rngs, param_dtype):
        d, h, kv, hd, std = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.initializer_range
        self.q_proj = nnx.Param(_normal(rngs, (n, d, h, hd), std, param_dtype))
        self.k_proj = nnx.Param(_normal(rngs, (n, d, kv, hd), std, param_dtype))
        self.v_proj = nnx.Param(_normal(rngs, (n, d, kv, hd), std, param_dtype))
        self.o_proj = nnx.Param(_normal(rngs, (n, h, hd, d), std, param_dtype))
        self.q_norm = nnx.Param(jnp.ones((n, hd), param_dtype))
        self.k_norm = nnx.Param(jnp.ones((n, hd), param_dtype))
        self.input_layernorm = nnx.Param(jnp.ones((n, d), param_dtype))
        self.post_attention_layernorm = nnx.Param(jnp.ones((n, d), param_dtype))


class MoE(nnx.Module):
    """Stacked over `n` MoE layers: router and the experts' SwiGLU weights."""

    def __init__(self, cfg: Qwen3Config, n: int, *, rngs: nnx.Rngs, param_dtype):
        d, e, f, std = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size, cfg.initializer_range
        self.router = nnx.Param(_normal(rngs, (n, d, e), std, param_dtype))
        self.gate_proj = nnx.Param(_normal(rngs, (n, e, d, f), std, param_dtype))
        self.up_proj = nnx.Param(_normal(rngs, (n, e, d, f), std, param_dtype))
        self.down_proj = nnx.Param(_normal(rngs, (n, e, f, d), std, param_dtype))


class MLP(nnx.Module):
    """Stacked over `n` dense layers: SwiGLU MLP."""

    def __init__(self, cfg: Qwen3Config, n: int, *, rngs: nnx.Rngs, param_dtype):
        d, i, std = cfg.hidden_size, cfg.intermediate_size, cfg.initializer_range
        self.gate_proj = nnx.Param(_normal(rngs, (n, d, i), std, param_dtype))
        self.up_proj = nnx.Param(_normal(rngs, (n, d, i), std, param_dtype))
        self.down_proj = nnx.Param(_normal(rngs, (n, i, d), std, param_dtype))


class DecoderLayers(nnx.Module):
    """All decoder layers, parameters stacked on a leading layer axis."""

    def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs, param_dtype):
        n_moe, n_dense = len(cfg.moe_layers), len(cfg.dense_layers)
        self.attn = Attention(cfg, cfg.num_hidden_layers, rngs=rngs, param_dtype=param_dtype)
        self.moe = MoE(cfg, n_moe, rngs=rngs, param_dtype=param_dtype) if n_moe else None
        self.mlp = MLP(cfg, n_dense, rngs=rngs, param_dtype=param_dtype) if n_dense else None


@dataclasses.dataclass
class CausalLMOutput:
    logits: jax.Array                 # [B, T, V]
    router_logits: jax.Array | None   # [L_moe, B, T, E] fp32, or None for a dense model
    hidden_states: jax.Array | None = None  # final normed hidden [B, T, D]
    dropped_tokens: jax.Array | None = None  # [L_moe] int32 token copies dropped (EP with a capacity)
    cache: "KVCache | None" = None           # the updated KV cache when one was passed in


jax.tree_util.register_dataclass(
    CausalLMOutput, data_fields=["logits", "router_logits", "hidden_states", "dropped_tokens", "cache"], meta_fields=[]
)


@dataclasses.dataclass
class KVCache:
    """Preallocated KV cache. Row b holds its tokens in slots [0, lengths[b]) (no padding inside)."""

    k: jax.Array        # [L, B, S, K, hd]
    v: jax.Array        # [L, B, S, K, hd]
    lengths: jax.Array  # [B] int32 tokens already cached per row

    @classmethod
    def init(cls, cfg: Qwen3Config, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


jax.tree_util.register_dataclass(KVCache, data_fields=["k", "v", "lengths"], meta_fields=[])


def _pure(module) -> Any:
    """Parameter arrays of a module as a nested dict (None-safe)."""
    if module is None:
        return None
    return jax.tree.map(lambda v: v[...], nnx.state(module, nnx.Param), is_leaf=lambda v: isinstance(v, nnx.Variable))


class Qwen3ForCausalLM(nnx.Module):
    """Qwen3 / Qwen3-MoE causal LM. `model(input_ids, attention_mask=None, positions=None)`."""

    def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 gmm_backend: str = "auto", remat: str = "none", capacity_factor: float | None = None,
                 ep_dispatch: str = "auto"):
        self.config = config
        # expert parallelism (qwen3_jax.sharding): the mesh the parameters live on (set by shard_model /
        # from_pretrained(mesh=)); capacity_factor None = dropless; ep_dispatch: auto, padded, ragged.
        self.mesh = None
        self.capacity_factor = capacity_factor
        self.ep_dispatch = ep_dispatch
        self.dtype = jnp.dtype(dtype)
        self.param_dtype = jnp.dtype(param_dtype)
        self.gmm_backend = gmm_backend
        self.remat = remat
        # KV-cached decode on XLA:CPU through qwen3_jax.cpu_kernels (False: XLA only)
        self.use_cpu_kernels = True
        v, d, std = config.vocab_size, config.hidden_size, config.initializer_range
        self.embed_tokens = nnx.Param(_normal(rngs, (v, d), std, param_dtype))
        self.layers = DecoderLayers(config, rngs=rngs, param_dtype=param_dtype)
        self.norm = nnx.Param(jnp.ones((d,), param_dtype))
        self.lm_head = None if config.tie_word_embeddings else nnx.Param(_normal(rngs, (d, v), std, param_dtype))
        inv_freq, scale = rope_inv_freq(config)
        self._rope = (tuple(float(f) for f in inv_freq), scale)  # static, hashable

    # -- pieces reused by the KV-cached engine and the trainer --------------------------------
    def embed(self, input_ids_bt):
        table = self._shard(self.embed_tokens[...], "embed_table")  # FSDP: gather D, keep vocab split
        return self._shard(table[input_ids_bt].astype(self.dtype), "btd")

    def rope(self, positions_bt):
        inv_freq, scale = self._rope
        return rope_cos_sin(positions_bt, np.asarray(inv_freq, np.float32), scale, self.dtype)

    def unembed(self, h_btd):
        w = self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]
        return self._shard(h_btd @ w.astype(h_btd.dtype), "btv")

    def _sharded(self) -> bool:
        return getattr(self, "mesh", None) is not None and self.mesh.size > 1

    def _shard(self, x, kind):
        """Sharding constraint of an activation by the rules in qwen3_jax.sharding (no-op without a mesh)."""
        if not self._sharded():
            return x
        from qwen3_jax.sharding.rules import constrain

        return constrain(x, self.mesh, kind)

    def mlp_fn(self, h_btd, moe_p, dense_p, layer_kind, moe_stacked=None, kernels: bool = False):
        """MLP of one layer. layer_kind: 'moe', 'dense' or a traced bool (True = MoE) for mixed stacks.
        moe_stacked: (all MoE layers' parameters, this layer's index), see moe_experts; kernels: see moe_block."""
        cfg = self.config
        b, t, _ = h_btd.shape
        e = cfg.num_experts
        h_btd = self._shard(h_btd, "btd")

        def run_moe(h):
            if self._sharded():  # expert-parallel: all-to-all over the mesh's 'expert' axis
                from qwen3_jax.sharding.ep import ep_moe

                y, logits, _ = ep_moe(h, moe_p, cfg, self.mesh, capacity_factor=self.capacity_factor,
                                      dispatch=self.ep_dispatch, gmm_backend=self.gmm_backend)
                return self._shard(y, "btd"), logits
            return moe_block(h, moe_p, cfg, self.gmm_backend, stacked=moe_stacked, kernels=kernels)

        def run_dense(h):
            return swiglu_mlp(h, dense_p), jnp.zeros((b, t, e), jnp.float32)

        if layer_kind == "moe":
            return run_moe(h_btd)
        if layer_kind == "dense":
            return run_dense(h_btd)[0], None
        return jax.lax.cond(layer_kind, run_moe, run_dense, h_btd)

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None,
                 return_hidden: bool = False, cache: KVCache | None = None) -> CausalLMOutput:
        """Logits for `input_ids` [B, T].

        Without `cache`: attention_mask [B, T] marks real tokens (left or right padding); positions default
        to cumsum(mask) - 1. segment_ids [B, T] keep packed documents apart.
        With `cache`: the new tokens go to slots lengths[b] + t; attention_mask then marks the real new tokens
        as a prefix of each row (right padding), positions default to lengths[b] + t; `out.cache` is the
        updated cache.
        """
        cfg = self.config
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        b, t = input_ids.shape
        kv = None
        if cache is None:
            if positions is None:
                positions = positions_from_mask(attention_mask) if attention_mask is not None else \
                    jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            mask_bts = causal_mask(positions, attention_mask, segment_ids)
        else:
            write_bt = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
            n_new = jnp.sum(attention_mask, -1).astype(jnp.int32) if attention_mask is not None else jnp.full((b,), t, jnp.int32)
            if positions is None:
                positions = write_bt
            slot = jnp.arange(cache.max_len, dtype=jnp.int32)
            old_bs = slot[None] < cache.lengths[:, None]                  # cached tokens: every new token sees them
            idx = jnp.arange(t, dtype=jnp.int32)
            new_btt = (idx[None, :, None] >= idx[None, None, :]) & (idx[None, None, :] < n_new[:, None, None])
            mask_bts = None
            kv = (cache.k, cache.v, write_bt, old_bs, new_btt)
        cos, sin = self.rope(positions)
        h = self.embed(input_ids)
        h, router_logits, kv_out = self.decoder(h, cos, sin, mask_bts, kv)
        new_cache = None if cache is None else KVCache(kv_out[0], kv_out[1], cache.lengths + n_new)
        h = rms_norm(h, self.norm[...], cfg.rms_norm_eps)
        logits = self.unembed(h)
        dropped = None
        if self._sharded() and router_logits is not None and self.capacity_factor is not None:
            from qwen3_jax.sharding.ep import count_dropped

            dropped = count_dropped(router_logits, cfg, self.mesh, self.capacity_factor)
        return CausalLMOutput(logits=logits, router_logits=router_logits, hidden_states=h if return_hidden else None,
                              dropped_tokens=dropped, cache=new_cache)

    def _kernels_serve(self, attn_p, moe_p, kv) -> bool:
        """The CPU decode kernels serve this model: one device, weights and cache in dtypes they know."""
        if self._sharded() or not self.use_cpu_kernels:
            return False
        arrays = [attn_p[n] for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + [kv[0], kv[1]]
        if moe_p is not None:
            arrays += [moe_p[n] for n in ("router", "gate_proj", "up_proj", "down_proj")]
        return all(cpu_kernels.available(x.dtype) for x in arrays)

    def decoder(self, h_btd, cos, sin, mask_bts, kv=None):
        """Run the layer stack with `nnx.scan`: one compiled layer body whatever the depth.

        kv: None, or (k [L,B,S,K,hd], v [L,B,S,K,hd], write slots [B,T], cached-slot mask [B,S], new-token mask
        [B,T,T]): each layer reads its cache slice (scan input, never copied or carried) and attends over the cached
        tokens plus its new keys/values (`cached_attention`); the new keys/values come out of the scan [L,B,T,K,hd]
        and are scattered into the (donatable) cache once, after the layer loop.
        Returns (h, router logits [L_moe,B,T,E] or None, (k, v) or None).
        """
        cfg = self.config
        eps = cfg.rms_norm_eps
        attn_p = _pure(self.layers.attn)
        moe_p, dense_p = _pure(self.layers.moe), _pure(self.layers.mlp)
        n_layers = cfg.num_hidden_layers
        is_moe = np.array([cfg.is_moe_layer(i) for i in range(n_layers)])
        mixed = 0 < is_moe.sum() < n_layers

        if mixed:
            # per-layer kind and index into the MoE / dense stacks; lax.cond picks the branch.
            moe_idx = np.maximum(np.cumsum(is_moe) - 1, 0).astype(np.int32)
            dense_idx = np.maximum(np.cumsum(~is_moe) - 1, 0).astype(np.int32)
            xs = (attn_p, jnp.asarray(is_moe), jnp.asarray(moe_idx), jnp.asarray(dense_idx))

            def select(xs_l):
                a, kind, mi, di = xs_l
                return a, kind, jax.tree.map(lambda w: w[mi], moe_p), jax.tree.map(lambda w: w[di], dense_p)
        elif is_moe.all():
            xs = (attn_p, moe_p)
            select = lambda xs_l: (xs_l[0], "moe", xs_l[1], None)  # noqa: E731
        else:
            xs = (attn_p, dense_p)
            select = lambda xs_l: (xs_l[0], "dense", None, xs_l[1])  # noqa: E731

        # KV-cached inference of few rows on XLA:CPU: layer l's weights and cache rows are read in place from the
        # stacks by the FFI kernels (see "XLA:CPU decode kernels")
        # (projections of up to 32 rows, cached attention of one new token per row, experts up to 4 copies each)
        kernels = kv is not None and self._kernels_serve(attn_p, moe_p, kv)
        proj_kernel = kernels and h_btd.shape[0] * h_btd.shape[1] <= 32

        def body(h, xs_l):
            l, xs_l, kv_l = xs_l
            a, kind, moe_l, dense_l = select(xs_l)
            proj = None
            if proj_kernel:
                proj = lambda name, x: stacked_proj(x, attn_p[name], l, n_in=2 if name == "o_proj" else 1)  # noqa: E731
            x = rms_norm(h, a["input_layernorm"], eps)
            q, k, v = attention_qkv(x, a, cos, sin, eps, proj)
            if kv is None:
                o = causal_attention(q, k, v, mask_bts)
            elif kernels and q.shape[1] == 1:
                o = cached_attention_kernel(q, kv[0], kv[1], l, k, v, kv[3], kv[4])
            else:
                o = cached_attention(q, kv_l[0], kv_l[1], k, v, kv[2], kv[3], kv[4])
            h = h + attention_out(o, a, proj)
            x = rms_norm(h, a["post_attention_layernorm"], eps)
            # all-MoE stacks: the CPU experts kernel reads this layer's experts from the stack (no per-layer copy)
            stacked = (moe_p, l) if isinstance(kind, str) and kind == "moe" else None
            y, rl = self.mlp_fn(x, moe_l, dense_l, kind, stacked, kernels)
            h = h + y
            return h, (rl, None if kv is None else (k, v))

        if self.remat != "none":
            body = jax.checkpoint(body, policy=remat_policy(self.remat), prevent_cse=False)
        kv_xs = None if kv is None else (kv[0], kv[1])
        h, (rl, new_kv) = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))(
            h_btd, (jnp.arange(n_layers), xs, kv_xs))
        if mixed:
            rl = rl[jnp.asarray(np.nonzero(is_moe)[0])]
        if kv is None:
            return h, rl, None
        rows = jnp.arange(h.shape[0])[:, None]
        ck = kv[0].at[:, rows, kv[2]].set(new_kv[0].astype(kv[0].dtype), mode="drop")
        cv = kv[1].at[:, rows, kv[2]].set(new_kv[1].astype(kv[1].dtype), mode="drop")
        return h, rl, (ck, cv)


def remat_policy(name: str):
    policies = {
        "full": jax.checkpoint_policies.nothing_saveable,  # recompute all in the layer
        "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }
    if name not in policies:
        raise ValueError(f"remat policy {name!r}: choose none, {', '.join(policies)}")
    return policies[name]
