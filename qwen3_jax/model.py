"""Qwen3 / Qwen3-MoE decoder in Flax NNX.

Read top to bottom: pure math functions (norm, RoPE, attention over a cache, router, MoE) over explicit shapes,
the layer ops (where the platform's kernels plug in, chosen once in qwen3_jax.kernels), then thin NNX modules
that hold the parameters stacked over layers, then the decoder stack (one `lax.scan` over the layers, or unrolled).

Shape letters: B batch, T query positions, S key positions, D hidden, H query heads, K kv heads,
G = H / K query heads per kv head, hd head dim, E experts, k top-k, F expert width, I dense MLP width,
V vocab, L layers, M = tokens x top-k routed rows.

Parameters are stored `[in, out]` (x @ W) with the layer axis first, each declared once in qwen3_jax.weights (shape,
init, logical axes, Hugging Face names); the modules below create them from that table:
    embed_tokens [V, D]; lm_head [D, V] (absent when tied)
    layers.attn:  q_proj [L, H, hd, D], k_proj/v_proj [L, K, hd, D] (output-major, as the hub stores them),
                  o_proj [L, H, hd, D],
                  q_norm/k_norm [L, hd], input_layernorm/post_attention_layernorm [L, D]
    layers.moe:   router [Lm, D, E], gate_proj/up_proj [Lm, E, D, F], down_proj [Lm, E, F, D]
    layers.mlp:   gate_proj/up_proj [Ld, D, I], down_proj [Ld, I, D]

How the model runs (mesh, remat, layer loop, MoE capacity, kernel overrides) is `model.runtime`, a
qwen3_jax.Runtime; the algorithms follow from the platform of its mesh's devices (qwen3_jax.kernels).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import Qwen3Config
from .kernels import attention as attention_kernels
from .kernels import cpu_decode
from .kernels.cpu_decode import cached_attention_kernel, stacked_head_proj, stacked_proj
from .moe import moe_layer
from .partition import constrain as constrain_activation
from .runtime import FIELDS as RUNTIME_FIELDS
from .runtime import Runtime
from .weights import Weight
from .weights import group as weight_group


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
    """Grouped-query softmax attention under a [B, T, S] mask (True = may attend); XLA (prefill into a cache)."""
    return jax.nn.dot_product_attention(q_bthd, k_bskd, v_bskd, mask=mask_bts[:, None])


def cached_attention(q_bthd, kc_bskd, vc_bskd, kn_btkd, vn_btkd, write_bt, old_bs, new_btt):
    """Attention of T new queries over the cache (old_bs [B,S]: slot holds an earlier token) and the T new keys
    (new_btt: causal and real). The cache is only read; the caller stores the new keys/values.

    T == 1 (decode): grouped heads -- each kv head's G queries against its cache keys ([B,K,G,hd] x [B,S,K,hd]),
    H x S x hd multiply-adds per row for scores and as many for values (no block-diagonal expansion over the kv
    heads), the new token joining the same fp32 softmax.
    T > 1 (prefill): the new keys are written into a copy of the layer's cache row, then masked attention."""
    b, t, h, hd = q_bthd.shape
    s_len, kh = kc_bskd.shape[1], kc_bskd.shape[2]
    g = h // kh
    dt = q_bthd.dtype
    f32 = jnp.float32
    if t > 1:
        rows = jnp.arange(b)[:, None]
        kc = kc_bskd.astype(dt).at[rows, write_bt].set(kn_btkd, mode="drop")
        vc = vc_bskd.astype(dt).at[rows, write_bt].set(vn_btkd, mode="drop")
        slot = jnp.arange(s_len, dtype=jnp.int32)
        end_b = write_bt[:, 0] + jnp.sum(new_btt[:, -1], -1)          # lengths + real new tokens
        mask_bts = (slot[None, None] <= write_bt[:, :, None]) & (slot[None, None] < end_b[:, None, None])
        return attention_core(q_bthd, kc, vc, mask_bts)
    q_bkgd = q_bthd[:, 0].reshape(b, kh, g, hd) * jnp.asarray(1.0 / math.sqrt(hd), dt)
    s_c = jnp.einsum("bkgd,bskd->bkgs", q_bkgd, kc_bskd.astype(dt), preferred_element_type=f32)
    s_c = jnp.where(old_bs[:, None, None, :], s_c, -jnp.inf)
    s_n = jnp.einsum("bkgd,bkd->bkg", q_bkgd, kn_btkd[:, 0].astype(dt), preferred_element_type=f32)[..., None]
    s_n = jnp.where(new_btt[:, 0, 0][:, None, None, None], s_n, -jnp.inf)
    m = jnp.maximum(jnp.max(s_c, -1, keepdims=True), s_n)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p_c, p_n = jnp.exp(s_c - m), jnp.exp(s_n - m)                       # [B,K,G,S], [B,K,G,1]
    denom = jnp.maximum(jnp.sum(p_c, -1, keepdims=True) + p_n, 1e-30)
    o = jnp.einsum("bkgs,bskd->bkgd", p_c.astype(dt), vc_bskd.astype(dt), preferred_element_type=f32)
    o = (o + p_n * vn_btkd[:, 0, :, None, :].astype(f32)) / denom
    return o.reshape(b, 1, h, hd).astype(dt)


def attention_qkv(x_btd, p, cos, sin, eps, proj=None):
    """Projections, per-head q/k RMSNorm, RoPE. Returns q [B,T,H,hd], k, v [B,T,K,hd].
    proj(name, x): the projection by weight `name` when it is computed elsewhere (the CPU decode kernels)."""
    dt = x_btd.dtype
    if proj is None:
        proj = functools.partial(_head_proj, p=p, dt=dt)
    q, k, v = (proj(n, x_btd).astype(dt) for n in ("q_proj", "k_proj", "v_proj"))
    q = apply_rope(rms_norm(q, p["q_norm"], eps), cos, sin)
    k = apply_rope(rms_norm(k, p["k_norm"], eps), cos, sin)
    return q, k, v


def _head_proj(name, x_btd, *, p, dt):
    """x [B,T,D] by w [N,hd,D] -> [B,T,N,hd], as one matmul with the [N*hd, D] weight. Output-major storage with D
    innermost is the layout the TPU decode matmul takes: stored [D,N,hd], XLA relaid the whole q/k/v stacks on
    every decode call (0.99 GiB of temporaries for Qwen3-30B-A3B decode on v5e-8; 0.05 GiB with this layout)."""
    w_nkd = p[name].astype(dt)
    n, hd, d = w_nkd.shape
    y = jnp.einsum("btd,nd->btn", x_btd, w_nkd.reshape(n * hd, d))
    return y.reshape(*x_btd.shape[:2], n, hd)


def attention_out(o_bthd, p, proj=None):
    if proj is not None:
        return proj("o_proj", o_bthd).astype(o_bthd.dtype)
    return jnp.einsum("bthk,hkd->btd", o_bthd, p["o_proj"].astype(o_bthd.dtype))


# ============================================================================ LoRA
# Low-rank adapters on the attention projections, in PEFT's orientation (lora_A [r, in], lora_B [out, r]) laid out
# like the weight they adapt: q/k/v  a [r, D], b [N, hd, r];  o  a [r, H, hd], b [D, r].
# A projection's output gains scale * B(A(dropout(x))) (PEFT: lora_B(lora_A(lora_dropout(x))) * scaling).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclasses.dataclass
class LoRA:
    """Adapters a forward adds: params {target: {"a": [L, ...], "b": [L, ...]}} stacked over the layers, the scale
    alpha / r, and the dropout on the adapters' input (active only with a key; each layer and target folds in its
    own, so the masks are a function of the key alone: remat and a resumed run draw the same ones)."""

    params: dict
    scale: float = 1.0
    dropout: float = 0.0
    key: jax.Array | None = None


jax.tree_util.register_dataclass(LoRA, data_fields=["params", "key"], meta_fields=["scale", "dropout"])


def lora_delta(name, x, ab, dt):
    """B(A(x)) of projection `name` for one layer's adapter ab = {"a", "b"}: x [B,T,D] -> [B,T,N,hd] for q/k/v,
    x = attention output [B,T,H,hd] -> [B,T,D] for o_proj."""
    a, b = ab["a"].astype(dt), ab["b"].astype(dt)
    if name == "o_proj":
        return jnp.einsum("btr,dr->btd", jnp.einsum("bthk,rhk->btr", x, a), b)
    return jnp.einsum("btr,nhr->btnh", jnp.einsum("btd,rd->btr", x, a), b)


def lora_proj(proj, p, lo, lora: LoRA, layer):
    """proj(name, x) -> the projection plus its adapter's scale * B(A(dropout(x))). proj: the base projection (None:
    the XLA einsums over p); lo: this layer's slices of lora.params; layer: its index (for the dropout keys)."""
    def run(name, x):
        dt = x.dtype
        y = proj(name, x) if proj is not None else (
            _head_proj(name, x, p=p, dt=dt) if name != "o_proj" else attention_out(x, p))
        if name not in lo:
            return y
        if lora.dropout > 0 and lora.key is not None:
            key = jax.random.fold_in(jax.random.fold_in(lora.key, layer), LORA_TARGETS.index(name))
            keep = jax.random.bernoulli(key, 1.0 - lora.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - lora.dropout), 0).astype(dt)
        return y.astype(dt) + jnp.asarray(lora.scale, dt) * lora_delta(name, x, lo[name], dt)
    return run


def swiglu_mlp(x, p):
    dt = x.dtype
    h = jax.nn.silu(x @ p["gate_proj"].astype(dt)) * (x @ p["up_proj"].astype(dt))
    return h @ p["down_proj"].astype(dt)


# ============================================================================ layer ops
class LayerOps:
    """How the pieces of one decoder layer run, from the runtime's kernel choices (qwen3_jax.kernels): the layer
    body calls these with its layer index and parameter slices and never asks which platform it runs on.

    - attention: the platform's attention without a cache; with one, `cached_attention` (grouped heads) or the
      CPU kernel reading the cache in place;
    - projections: einsums over the layer's slices, or (CPU decode kernels) x @ W[l] read in place;
    - MoE: qwen3_jax.moe.moe_layer, which chooses (expert parallelism on a mesh, the CPU experts kernel, the
      gather or the grouped matmul). It returns (y, router logits, token copies dropped).
    """

    def __init__(self, model, attn_stack, moe_stack, kv, n_rows: int):
        rt = model.runtime
        self.cfg, self.runtime, self.ks = model.config, rt, rt.kernels
        if rt.routing is not None:
            rt.routing.check(model.config)
        self.mesh = rt.mesh if model._sharded() else None
        self.attn_stack, self.moe_stack, self.kv = attn_stack, moe_stack, kv
        arrays = [] if kv is None else [attn_stack[n] for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + list(kv[:2])
        if kv is not None and moe_stack is not None:
            arrays += [moe_stack[n] for n in ("router", "gate_proj", "up_proj", "down_proj")]
        # the XLA:CPU decode kernels serve KV-cached inference on one CPU device (weights, cache in their dtypes)
        self.in_place = (kv is not None and self.ks.decode_kernels and self.mesh is None
                         and all(cpu_decode.available(x.dtype) for x in arrays))
        self.proj_in_place = self.in_place and n_rows <= 32     # projections of up to 32 rows

    def proj(self, layer):
        if not self.proj_in_place:
            return None
        return lambda name, x: (stacked_proj(x, self.attn_stack[name], layer, n_in=2) if name == "o_proj"
                                else stacked_head_proj(x, self.attn_stack[name], layer))

    def attend(self, q, k, v, layer, kv_c, seg_bt):
        """kv_c: the cache stacks (k, v) [L,B,S,K,hd] before this layer's write, or None (no cache)."""
        if self.kv is None:
            return attention_kernels.attention(q, k, v, seg_bt, ks=self.ks, mesh=self.mesh)
        _, _, write_bt, old_bs, new_btt = self.kv
        if self.in_place and q.shape[1] == 1:
            return cached_attention_kernel(q, kv_c[0], kv_c[1], layer, k, v, old_bs, new_btt)
        return cached_attention(q, kv_c[0][layer], kv_c[1][layer], k, v, write_bt, old_bs, new_btt)

    def moe(self, x_btd, p, layer, valid_bt, in_stack: bool):
        """in_stack: p is layer `layer` of self.moe_stack (all-MoE stacks), which CPU kernels may read in place."""
        return moe_layer(x_btd, p, self.cfg, self.runtime, layer=layer, valid_bt=valid_bt,
                         stacked=self.moe_stack if in_stack else None, mesh=self.mesh, inference=self.kv is not None,
                         in_place=self.in_place)


# ============================================================================ masks and positions
def positions_from_mask(mask_bt):
    """Left/right padding aware positions: cumsum(mask) - 1 (pads get 0)."""
    return jnp.maximum(jnp.cumsum(mask_bt.astype(jnp.int32), axis=-1) - 1, 0)


# ============================================================================ modules
def init_param(w: Weight, rngs: nnx.Rngs, dtype) -> nnx.Param:
    """A parameter's initial value by its entry in the weight table (qwen3_jax.weights)."""
    if w.init == "ones":
        return nnx.Param(jnp.ones(w.shape, dtype))
    if w.init == "normal":
        return nnx.Param((jax.random.normal(rngs.params(), w.shape, jnp.float32) * w.std).astype(dtype))
    raise ValueError(f"weight {w.name}: unknown init {w.init!r}")


def _declare(module: nnx.Module, cfg: Qwen3Config, prefix: tuple[str, ...], rngs: nnx.Rngs, param_dtype) -> None:
    """Create the module's parameters from the weight table's entries under `prefix`, in table order."""
    for w in weight_group(cfg, prefix):
        setattr(module, w.path[-1], init_param(w, rngs, param_dtype))


class Attention(nnx.Module):
    """Stacked over the layers: GQA projections and per-head q/k RMSNorm, plus the two layer norms."""

    def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs, param_dtype):
        _declare(self, cfg, ("layers", "attn"), rngs, param_dtype)


class MoE(nnx.Module):
    """Stacked over the MoE layers: router and the experts' SwiGLU weights."""

    def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs, param_dtype):
        _declare(self, cfg, ("layers", "moe"), rngs, param_dtype)


class MLP(nnx.Module):
    """Stacked over the dense layers: SwiGLU MLP."""

    def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs, param_dtype):
        _declare(self, cfg, ("layers", "mlp"), rngs, param_dtype)


class DecoderLayers(nnx.Module):
    """All decoder layers, parameters stacked on a leading layer axis."""

    def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs, param_dtype):
        self.attn = Attention(cfg, rngs=rngs, param_dtype=param_dtype)
        self.moe = MoE(cfg, rngs=rngs, param_dtype=param_dtype) if cfg.moe_layers else None
        self.mlp = MLP(cfg, rngs=rngs, param_dtype=param_dtype) if cfg.dense_layers else None


@dataclasses.dataclass
class CausalLMOutput:
    logits: jax.Array                 # [B, T, V]
    router_logits: jax.Array | None   # [L_moe, B, T, E] fp32, or None for a dense model
    hidden_states: jax.Array | None = None  # final normed hidden [B, T, D]
    dropped_tokens: jax.Array | None = None  # [L_moe] int32 token copies dropped (expert-parallel; None on one device)
    cache: "KVCache | None" = None           # the updated KV cache when one was passed in
    moe_inputs: jax.Array | None = None      # [L_moe, B, T, D] each MoE layer's input (runtime.routing.moe_inputs)


jax.tree_util.register_dataclass(
    CausalLMOutput, data_fields=["logits", "router_logits", "hidden_states", "dropped_tokens", "cache", "moe_inputs"],
    meta_fields=[]
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


def _fit_cache(n_new_b, cache: KVCache, t: int):
    """The new tokens per row that the cache takes: an error where shapes or (eager) values show that they do not
    fit, else clamped to the free slots (under jit)."""
    if t > cache.max_len:
        raise ValueError(f"KVCache: {t} new tokens per row do not fit a cache of max_len {cache.max_len} slots")
    room_b = cache.max_len - cache.lengths
    if not isinstance(n_new_b, jax.core.Tracer) and not isinstance(room_b, jax.core.Tracer):
        over = np.nonzero(np.asarray(n_new_b) > np.asarray(room_b))[0]
        if over.size:
            lengths, n_new = np.asarray(cache.lengths), np.asarray(n_new_b)
            rows = ", ".join(f"row {r}: {lengths[r]} cached + {n_new[r]} new" for r in over[:4])
            raise ValueError(f"KVCache: {rows} > max_len {cache.max_len} slots (a longer cache: KVCache.init(cfg, "
                             f"batch, max_len))")
    return jnp.minimum(n_new_b, room_b)


def param_arrays(module) -> Any:
    """Parameter arrays of a module as a nested dict (None-safe)."""
    if module is None:
        return None
    return jax.tree.map(lambda v: v[...], nnx.state(module, nnx.Param), is_leaf=lambda v: isinstance(v, nnx.Variable))


class Qwen3ForCausalLM(nnx.Module):
    """Qwen3 / Qwen3-MoE causal LM. `model(input_ids, attention_mask=None, positions=None)`.

    runtime: how it runs (qwen3_jax.Runtime); its fields may also be given as keywords (remat="full",
    capacity_factor=1.25, ...)."""

    def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 runtime: Runtime | None = None, **runtime_kw):
        unknown = sorted(set(runtime_kw) - set(RUNTIME_FIELDS))
        if unknown:
            raise TypeError(f"Qwen3ForCausalLM: unknown arguments {unknown} (runtime fields: {RUNTIME_FIELDS})")
        self.config = config
        self.runtime = (runtime or Runtime()).replace(**runtime_kw)
        self.dtype = jnp.dtype(dtype)
        self.param_dtype = jnp.dtype(param_dtype)
        top = {w.path[0]: w for w in weight_group(config, ())}  # embed_tokens, norm, lm_head (absent when tied)
        self.embed_tokens = init_param(top["embed_tokens"], rngs, param_dtype)
        self.layers = DecoderLayers(config, rngs=rngs, param_dtype=param_dtype)
        self.norm = init_param(top["norm"], rngs, param_dtype)
        self.lm_head = init_param(top["lm_head"], rngs, param_dtype) if "lm_head" in top else None
        inv_freq, scale = rope_inv_freq(config)
        self._rope = (tuple(float(f) for f in inv_freq), scale)  # static, hashable

    @property
    def mesh(self):
        """The mesh the parameters live on (runtime.mesh), set by shard_model / from_pretrained(mesh=)."""
        return self.runtime.mesh

    @mesh.setter
    def mesh(self, mesh):
        self.runtime = self.runtime.replace(mesh=mesh)

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
        mesh = self.runtime.mesh
        return mesh is not None and mesh.size > 1

    def _shard(self, x, kind):
        """Sharding constraint of an activation by the rules in qwen3_jax.partition (no-op without a mesh)."""
        if not self._sharded():
            return x
        return constrain_activation(x, self.runtime.mesh, kind)

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None,
                 return_hidden: bool = False, cache: KVCache | None = None, lora: LoRA | None = None) -> CausalLMOutput:
        """Logits for `input_ids` [B, T].

        Without `cache`: attention_mask [B, T] marks real tokens (left or right padding); positions default
        to cumsum(mask) - 1. segment_ids [B, T] keep packed documents apart (0 = padding).
        With `cache`: the new tokens go to slots lengths[b] + t; attention_mask then marks the real new tokens
        as a prefix of each row (right padding), positions default to lengths[b] + t; `out.cache` is the
        updated cache. The cache never advances past its slots: more new tokens than it has slots (T > max_len)
        is a ValueError, and so is a row's lengths + new tokens > max_len when the lengths are known (an eager
        call); under jit such a row's tokens past the last slot are not cached and not routed, out.cache.lengths
        stops at max_len (the flag: it advanced by fewer than the row's new tokens) and their logits mean nothing.
        Padding (mask 0, segment 0) takes no expert: it is not routed, so it uses no expert capacity and is
        never counted as dropped.
        lora: low-rank adapters added to the attention projections (LoRA; training keeps them apart from the frozen
        weights, `from_pretrained(..., adapter=)` merges a PEFT adapter into them instead).
        """
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        b, t = input_ids.shape
        kv = None
        if cache is None:
            if positions is None:
                positions = positions_from_mask(attention_mask) if attention_mask is not None else \
                    jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            seg_bt = segment_ids if segment_ids is not None else attention_mask
            seg_bt = None if seg_bt is None else jnp.asarray(seg_bt).astype(jnp.int32)
            valid_bt = None if seg_bt is None else seg_bt > 0
        else:
            write_bt = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
            n_new = jnp.sum(attention_mask, -1).astype(jnp.int32) if attention_mask is not None else jnp.full((b,), t, jnp.int32)
            n_new = _fit_cache(n_new, cache, t)
            if positions is None:
                positions = write_bt
            slot = jnp.arange(cache.max_len, dtype=jnp.int32)
            old_bs = slot[None] < cache.lengths[:, None]                  # cached tokens: every new token sees them
            idx = jnp.arange(t, dtype=jnp.int32)
            new_btt = (idx[None, :, None] >= idx[None, None, :]) & (idx[None, None, :] < n_new[:, None, None])
            seg_bt = None
            valid_bt = idx[None, :] < n_new[:, None]                     # finished / padded rows: no expert
            kv = (cache.k, cache.v, write_bt, old_bs, new_btt)
        cos, sin = self.rope(positions)
        h = self.embed(input_ids)
        h, router_logits, dropped, kv_out, moe_x = self.decoder(h, cos, sin, seg_bt, valid_bt, kv, lora)
        new_cache = None if cache is None else KVCache(kv_out[0], kv_out[1], cache.lengths + n_new)
        h = rms_norm(h, self.norm[...], self.config.rms_norm_eps)
        logits = self.unembed(h)
        return CausalLMOutput(logits=logits, router_logits=router_logits, hidden_states=h if return_hidden else None,
                              dropped_tokens=dropped, cache=new_cache, moe_inputs=moe_x)

    def decoder(self, h_btd, cos, sin, seg_bt, valid_bt, kv=None, lora: LoRA | None = None):
        """Run the layer stack: one `lax.scan` (a single compiled layer body whatever the depth), or unrolled
        (runtime.scan_layers False: per-layer cost figures, see qwen3_jax.aot).

        seg_bt: segment ids of a forward without a cache (None: plain causal); valid_bt: real tokens (None: all).
        kv: None, or (k [L,B,S,K,hd], v [L,B,S,K,hd], write slots [B,T], cached-slot mask [B,S], new-token mask
        [B,T,T]). Each layer attends over its cached tokens plus its new keys/values; the kernels' `kv_cache`
        choice (qwen3_jax.kernels) says how those are stored: "carried", the stacks carried through the layer loop
        and each layer's slots written in place (a donated cache is updated without a copy of the stack); or
        "deferred", the loop only reads the stacks and the new keys/values come out of it [L,B,T,K,hd], scattered
        into the cache once after it. lora: adapters, sliced per layer with the attention weights.
        Returns (h, router logits [L_moe,B,T,E] or None, dropped token copies [L_moe] or None (one device),
        (k, v) or None, the MoE layers' inputs [L_moe,B,T,D] (runtime.routing.moe_inputs) or None).
        """
        cfg, rt = self.config, self.runtime
        eps = cfg.rms_norm_eps
        attn_p = param_arrays(self.layers.attn)
        if lora is not None:
            attn_p = {**attn_p, "lora": lora.params}
        moe_p, dense_p = param_arrays(self.layers.moe), param_arrays(self.layers.mlp)
        n_layers = cfg.num_hidden_layers
        is_moe = np.array([cfg.is_moe_layer(i) for i in range(n_layers)])
        mixed = 0 < is_moe.sum() < n_layers
        moe_idx = np.maximum(np.cumsum(is_moe) - 1, 0).astype(np.int32)      # layer -> index in its stack
        dense_idx = np.maximum(np.cumsum(~is_moe) - 1, 0).astype(np.int32)
        ops = LayerOps(self, attn_p, moe_p, kv, h_btd.shape[0] * h_btd.shape[1])
        b, t, _ = h_btd.shape
        keep_x = rt.routing is not None and rt.routing.moe_inputs
        carried = kv is not None and ops.ks.kv_cache == "carried"
        kv_read = None if kv is None else (kv[0], kv[1])          # "deferred": read in the loop, never carried

        def mlp(x, kind, moe_l, dense_l, layer):
            """(y, router logits, dropped); kind 'moe' / 'dense' (static) or a traced bool (mixed stacks)."""
            run_moe = lambda x: ops.moe(x, moe_l, layer, valid_bt, in_stack=not mixed)  # noqa: E731
            run_dense = lambda x: (swiglu_mlp(x, dense_l), jnp.zeros((b, t, cfg.num_experts), jnp.float32),  # noqa: E731
                                   jnp.int32(0))
            if isinstance(kind, str):
                return run_moe(x) if kind == "moe" else run_dense(x)
            return jax.lax.cond(kind, run_moe, run_dense, x)

        def layer_fn(kind: str):
            """The layer body for layers of `kind` ('moe', 'dense', or 'mixed': a traced flag in xs picks).
            carry = (h, cache stacks or None)."""
            def body(carry, xs):
                h, kvc = carry
                layer, a, flag, moe_l, dense_l = xs
                x = rms_norm(h, a["input_layernorm"], eps)
                proj = ops.proj(layer)
                if lora is not None:
                    proj = lora_proj(proj, a, a["lora"], lora, layer)
                q, k, v = attention_qkv(x, a, cos, sin, eps, proj)
                o = ops.attend(q, k, v, layer, kvc if carried else kv_read, seg_bt)
                new_kv = None
                if carried:
                    kvc = write_cache(kvc, layer, k, v, kv[2])
                elif kv is not None:
                    new_kv = (k, v)
                h = h + attention_out(o, a, proj)
                x = self._shard(rms_norm(h, a["post_attention_layernorm"], eps), "btd")
                y, rl, dropped = mlp(x, flag if kind == "mixed" else kind, moe_l, dense_l, layer)
                h = h + self._shard(y, "btd")
                return (h, kvc), (rl, dropped, x if keep_x else None, new_kv)

            if rt.remat == "none":
                return body
            return jax.checkpoint(body, policy=remat_policy(rt.remat), prevent_cse=not rt.scan_layers)

        carry = (h_btd, kv_read if carried else None)
        take = lambda tree, i: jax.tree.map(lambda w: w[i], tree)  # noqa: E731
        if rt.scan_layers:
            if mixed:
                body = layer_fn("mixed")
                scanned = lambda c, xs: body(c, (xs[0], xs[1], xs[2], take(moe_p, xs[3]), take(dense_p, xs[4])))  # noqa: E731
                extra = (jnp.asarray(is_moe), jnp.asarray(moe_idx), jnp.asarray(dense_idx))
            elif is_moe.all():
                body = layer_fn("moe")
                scanned = lambda c, xs: body(c, (xs[0], xs[1], None, xs[2], None))  # noqa: E731
                extra = (moe_p,)
            else:
                body = layer_fn("dense")
                scanned = lambda c, xs: body(c, (xs[0], xs[1], None, None, xs[2]))  # noqa: E731
                extra = (dense_p,)
            (h, kv_out), (rl, dropped, moe_x, new_kv) = jax.lax.scan(scanned, carry,
                                                                     (jnp.arange(n_layers), attn_p, *extra))
            if mixed:
                sel = jnp.asarray(np.nonzero(is_moe)[0])
                rl, dropped = rl[sel], dropped[sel]
                moe_x = None if moe_x is None else moe_x[sel]
            elif not is_moe.any():
                rl = dropped = moe_x = None
        else:  # unrolled: static layer kinds, no cond
            outs = []
            bodies = {"moe": layer_fn("moe"), "dense": layer_fn("dense")}
            for i in range(n_layers):
                moe_l = take(moe_p, moe_idx[i]) if is_moe[i] else None
                dense_l = None if is_moe[i] else take(dense_p, dense_idx[i])
                carry, out = bodies["moe" if is_moe[i] else "dense"](carry, (i, take(attn_p, i), None, moe_l, dense_l))
                outs.append(out)
            h, kv_out = carry
            moe_outs = [o for o, m in zip(outs, is_moe) if m]
            rl = jnp.stack([o[0] for o in moe_outs]) if moe_outs else None
            dropped = jnp.stack([o[1] for o in moe_outs]) if moe_outs else None
            moe_x = jnp.stack([o[2] for o in moe_outs]) if moe_outs and keep_x else None
            new_kv = None if outs[0][3] is None else jax.tree.map(lambda *a: jnp.stack(a), *[o[3] for o in outs])
        if dropped is not None and not self._sharded():
            dropped = None        # one device never drops
        if kv is not None and not carried:
            kv_out = write_cache(kv_read, slice(None), *new_kv, kv[2])
        return h, rl, dropped, kv_out, moe_x


def write_cache(kv_c, layer, k_btkd, v_btkd, write_bt):
    """Store layer `layer`'s new keys/values in slots write_bt [B,T] of the stacks (k [L,B,S,K,hd], v); slots past
    the cache are dropped. Inside the layer loop, on the carried stacks: XLA updates them in place. layer =
    slice(None): every layer's, k/v [L,B,T,K,hd] (the "deferred" write after the loop)."""
    rows = jnp.arange(write_bt.shape[0])[:, None]
    ck = kv_c[0].at[layer, rows, write_bt].set(k_btkd.astype(kv_c[0].dtype), mode="drop")
    cv = kv_c[1].at[layer, rows, write_bt].set(v_btkd.astype(kv_c[1].dtype), mode="drop")
    return ck, cv


def remat_policy(name: str):
    policies = {
        "full": jax.checkpoint_policies.nothing_saveable,  # recompute all in the layer
        "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }
    if name not in policies:
        raise ValueError(f"remat policy {name!r}: choose none, {', '.join(policies)}")
    return policies[name]
