"""Every weight of the model declared once: `weights(cfg)` lists, per parameter, its path in the module, shape,
initialisation, logical axes, and its Hugging Face tensor name(s) with the transform between our layout and the
hub's. The NNX modules (qwen3_jax.model) create their parameters from this table, the checkpoint reader and writer
(qwen3_jax.checkpoint) map tensors through it, and the partition specs (qwen3_jax.params.param_specs) follow from its
logical axes by the tables in qwen3_jax.partition.

Our layout is `[in, out]` (x @ W) with the layer axis first; the hub stores `[out, in]` per layer (and per expert):

    embed_tokens [V, D]                     = model.embed_tokens.weight [V, D]
    lm_head [D, V] (absent when tied)       = lm_head.weight [V, D] transposed
    norm [D]                                = model.norm.weight
    layers/attn/q_proj [L, H, hd, D]        = self_attn.q_proj.weight [H*hd, D], heads split out (k, v: K heads)
    layers/attn/o_proj [L, H, hd, D]        = self_attn.o_proj.weight [D, H*hd] transposed, heads split out
    layers/attn/{q,k}_norm [L, hd], input_layernorm / post_attention_layernorm [L, D]: as stored
    layers/moe/router [Lm, D, E]            = mlp.gate.weight [E, D] transposed
    layers/moe/{gate,up}_proj [Lm, E, D, F] = mlp.experts.{j}.{gate,up}_proj.weight [F, D] each, transposed
                                              (transformers 5: mlp.experts.gate_up_proj [E, 2F, D], gate rows first)
    layers/moe/down_proj [Lm, E, F, D]      = mlp.experts.{j}.down_proj.weight [D, F] each, transposed
                                              (transformers 5: mlp.experts.down_proj [E, D, F])
    layers/mlp/{gate,up}_proj [Ld, D, I], down_proj [Ld, I, D]: mlp.*.weight transposed

Logical axes (what a dimension is; qwen3_jax.partition maps them to mesh axes): "layer", "vocab", "embed" (the
hidden size D of a matrix), "norm" (D of a norm scale), "heads", "kv_heads", "head_dim", "expert" (the expert
weights' expert axis), "router_experts" (the router's outputs), "mlp" (expert or dense MLP width).

The hub is read in blocks: `Weight.read(i, idx, read)` returns the block `idx` (slices of our layout of stack index
i) reading only the hub slices it needs, so each process reads just what its devices hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .config import Qwen3Config

# read(requests) -> arrays: requests are (k, index) with k the position of a tensor in Weight.hf_names(i) (or 0
# for the fused tensor) and index a tuple of slices of that hub tensor.
ReadFn = Callable[[list[tuple[int, tuple[slice, ...]]]], list[np.ndarray]]


def _c(x):
    return np.ascontiguousarray(x)


# ============================================================================ layouts: ours <-> hub
class Layout:
    """How one stack index of a weight (shape `shape` in our layout) sits in its hub tensor(s)."""

    def hub_shapes(self, shape) -> list[tuple[int, ...]]:
        raise NotImplementedError

    def to_hf(self, x: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError

    def read(self, shape, idx: tuple[slice, ...], read: ReadFn) -> np.ndarray:
        raise NotImplementedError


class AsStored(Layout):
    """Ours is the hub tensor (embeddings, norm scales)."""

    def hub_shapes(self, shape):
        return [tuple(shape)]

    def to_hf(self, x):
        return [x]

    def read(self, shape, idx, read):
        return read([(0, idx)])[0]


class Transposed(Layout):
    """Ours [in, out] is the hub's [out, in] transposed (lm_head, router, dense MLP)."""

    def hub_shapes(self, shape):
        return [tuple(shape[::-1])]

    def to_hf(self, x):
        return [_c(x.T)]

    def read(self, shape, idx, read):
        return _c(read([(0, idx[::-1])])[0].T)


class HeadsOut(Layout):
    """Ours [N, hd, D] is the hub's [N*hd, D] with the heads split out (q/k/v projections)."""

    def hub_shapes(self, shape):
        n, hd, d = shape
        return [(n * hd, d)]

    def to_hf(self, x):
        n, hd, d = x.shape
        return [_c(x.reshape(n * hd, d))]

    def read(self, shape, idx, read):
        hd = shape[1]
        sn, sh, sd = idx
        (w,) = read([(0, (slice(sn.start * hd, sn.stop * hd), sd))])
        return _c(w.reshape(-1, hd, w.shape[1])[:, sh, :])


class HeadsIn(Layout):
    """Ours [H, hd, D] is the hub's [D, H*hd] transposed, heads split out (o_proj)."""

    def hub_shapes(self, shape):
        n, hd, d = shape
        return [(d, n * hd)]

    def to_hf(self, x):
        n, hd, d = x.shape
        return [_c(x.reshape(n * hd, d).T)]

    def read(self, shape, idx, read):
        hd = shape[1]
        sn, sh, sd = idx
        (w,) = read([(0, (sd, slice(sn.start * hd, sn.stop * hd)))])
        return _c(w.T.reshape(-1, hd, w.shape[0])[:, sh, :])


class PerExpert(Layout):
    """Ours [E, in, out] is E hub tensors [out, in], one per expert (the hub's expert names)."""

    def hub_shapes(self, shape):
        e, a, b = shape
        return [(b, a)] * e

    def to_hf(self, x):
        return [_c(x[j].T) for j in range(x.shape[0])]

    def read(self, shape, idx, read):
        se, s1, s2 = idx
        ws = read([(j, (s2, s1)) for j in range(se.start, se.stop)])
        return _c(np.stack([w.T for w in ws]))


@dataclass(frozen=True)
class Fused:
    """transformers 5's fused expert tensor that also holds a weight: `name` (template with {layer}), hub shape
    [E, rows, in], our [E, in, out] being rows [offset, offset + out) transposed (gate_up_proj [E, 2F, D]: gate rows
    first, up after; down_proj [E, D, F])."""

    name: str
    shape: tuple[int, ...]
    offset: int = 0

    def read(self, idx, read: ReadFn) -> np.ndarray:
        se, s1, s2 = idx
        (w,) = read([(0, (se, slice(s2.start + self.offset, s2.stop + self.offset), s1))])
        return _c(w.transpose(0, 2, 1))


AS_STORED, TRANSPOSED, HEADS_OUT, HEADS_IN, PER_EXPERT = AsStored(), Transposed(), HeadsOut(), HeadsIn(), PerExpert()


# ============================================================================ the table
@dataclass(frozen=True)
class Weight:
    """One parameter: path in the module, shape (layer axis first when stacked), init, logical axes, hub name
    template ({layer}: the hub layer of a stack index, {expert}: each expert) and layout."""

    path: tuple[str, ...]
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init: str                                # "normal" (std) | "ones"
    hf: str
    layout: Layout
    std: float = 0.0
    layers: tuple[int, ...] | None = None    # stack index -> hub layer number; None: not stacked
    fused: Callable[[int], Fused] | None = None  # stack index -> transformers 5's fused source (experts)

    def __post_init__(self):
        if len(self.axes) != len(self.shape):
            raise ValueError(f"weight {self.name}: {len(self.axes)} logical axes {self.axes} for shape {self.shape}")

    @property
    def name(self) -> str:
        return "/".join(self.path)

    @property
    def stacked(self) -> bool:
        return self.layers is not None

    @property
    def count(self) -> int:
        """Stack indices (1 when not stacked)."""
        return len(self.layers) if self.stacked else 1

    @property
    def block_shape(self) -> tuple[int, ...]:
        """The shape of one stack index."""
        return self.shape[1:] if self.stacked else self.shape

    def hf_names(self, i: int = 0) -> list[str]:
        layer = self.layers[i] if self.stacked else None
        if "{expert}" in self.hf:
            n = self.shape[self.axes.index("expert")]
            return [self.hf.format(layer=layer, expert=j) for j in range(n)]
        return [self.hf.format(layer=layer)]

    def hub_shapes(self) -> list[tuple[int, ...]]:
        return self.layout.hub_shapes(self.block_shape)

    def to_hf(self, x: np.ndarray) -> list[np.ndarray]:
        """One stack index of ours -> its hub tensors, in hf_names order."""
        return self.layout.to_hf(x)

    def read(self, idx: tuple[slice, ...], read: ReadFn, fused: Fused | None = None) -> np.ndarray:
        """The block `idx` (slices of one stack index in our layout) from the hub tensors (or from `fused`)."""
        if fused is not None:
            return fused.read(idx, read)
        return self.layout.read(self.block_shape, idx, read)


def weights(cfg: Qwen3Config) -> list[Weight]:
    """Every parameter of the model for `cfg`, in the order the model draws their initial values."""
    d, h, kv, hd, std = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, \
        cfg.initializer_range
    L, V = cfg.num_hidden_layers, cfg.vocab_size
    E, F, I = cfg.num_experts, cfg.moe_intermediate_size, cfg.intermediate_size
    out = [Weight(("embed_tokens",), (V, d), ("vocab", "embed"), "normal", "model.embed_tokens.weight", AS_STORED, std)]

    every = tuple(range(L))
    lay = "model.layers.{layer}."

    def attn(name, shape, axes, init, hf, layout):
        out.append(Weight(("layers", "attn", name), (L, *shape), ("layer", *axes), init, lay + hf, layout, std, every))

    attn("q_proj", (h, hd, d), ("heads", "head_dim", "embed"), "normal", "self_attn.q_proj.weight", HEADS_OUT)
    attn("k_proj", (kv, hd, d), ("kv_heads", "head_dim", "embed"), "normal", "self_attn.k_proj.weight", HEADS_OUT)
    attn("v_proj", (kv, hd, d), ("kv_heads", "head_dim", "embed"), "normal", "self_attn.v_proj.weight", HEADS_OUT)
    attn("o_proj", (h, hd, d), ("heads", "head_dim", "embed"), "normal", "self_attn.o_proj.weight", HEADS_IN)
    attn("q_norm", (hd,), ("head_dim",), "ones", "self_attn.q_norm.weight", AS_STORED)
    attn("k_norm", (hd,), ("head_dim",), "ones", "self_attn.k_norm.weight", AS_STORED)
    attn("input_layernorm", (d,), ("norm",), "ones", "input_layernorm.weight", AS_STORED)
    attn("post_attention_layernorm", (d,), ("norm",), "ones", "post_attention_layernorm.weight", AS_STORED)

    moe_layers, dense_layers = tuple(cfg.moe_layers), tuple(cfg.dense_layers)
    if moe_layers:
        Lm, ml = len(moe_layers), lay + "mlp."

        def fused(part):
            def source(i):
                name = ml.format(layer=moe_layers[i]) + "experts." + ("down_proj" if part == "down" else "gate_up_proj")
                return Fused(name, (E, d, F)) if part == "down" else Fused(name, (E, 2 * F, d), F if part == "up" else 0)
            return source

        out += [
            Weight(("layers", "moe", "router"), (Lm, d, E), ("layer", "embed", "router_experts"), "normal",
                   ml + "gate.weight", TRANSPOSED, std, moe_layers),
            Weight(("layers", "moe", "gate_proj"), (Lm, E, d, F), ("layer", "expert", "embed", "mlp"), "normal",
                   ml + "experts.{expert}.gate_proj.weight", PER_EXPERT, std, moe_layers, fused("gate")),
            Weight(("layers", "moe", "up_proj"), (Lm, E, d, F), ("layer", "expert", "embed", "mlp"), "normal",
                   ml + "experts.{expert}.up_proj.weight", PER_EXPERT, std, moe_layers, fused("up")),
            Weight(("layers", "moe", "down_proj"), (Lm, E, F, d), ("layer", "expert", "mlp", "embed"), "normal",
                   ml + "experts.{expert}.down_proj.weight", PER_EXPERT, std, moe_layers, fused("down")),
        ]
    if dense_layers:
        Ld = len(dense_layers)
        for proj, shape, axes in (("gate_proj", (d, I), ("embed", "mlp")), ("up_proj", (d, I), ("embed", "mlp")),
                                  ("down_proj", (I, d), ("mlp", "embed"))):
            out.append(Weight(("layers", "mlp", proj), (Ld, *shape), ("layer", *axes), "normal",
                              lay + f"mlp.{proj}.weight", TRANSPOSED, std, dense_layers))

    out.append(Weight(("norm",), (d,), ("norm",), "ones", "model.norm.weight", AS_STORED))
    if not cfg.tie_word_embeddings:
        out.append(Weight(("lm_head",), (d, V), ("embed", "vocab"), "normal", "lm_head.weight", TRANSPOSED, std))
    return out


def group(cfg: Qwen3Config, prefix: tuple[str, ...]) -> list[Weight]:
    """The weights directly under module path `prefix` (e.g. ("layers", "moe")), in table order."""
    return [w for w in weights(cfg) if w.path[:-1] == tuple(prefix)]
