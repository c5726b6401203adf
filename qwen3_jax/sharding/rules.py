"""Partition rules as data: parameter path pattern -> PartitionSpec, activation kind -> PartitionSpec.

A spec names, per dimension, a mesh axis, a tuple of axes, or None. `fit_spec` makes any spec legal for a
shape and a mesh: an axis whose size does not divide its dimension (or that is already used) is dropped,
so the dimension falls back to fewer axes / replication instead of failing. The layer axis of stacked
parameters is never sharded: `nnx.scan` slices it every layer.
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from .mesh import check_experts

BATCH = ("data", "fsdp", "expert")   # batch / token axes of activations (the MoE re-splits over 'expert')
FSDP = ("fsdp", "expert")            # non-expert weights: ZeRO-3 over every axis that splits the batch

# First match wins (re.fullmatch over the path joined by "/"); unmatched parameters are replicated.
PARAM_RULES: tuple[tuple[str, tuple], ...] = (
    (r"embed_tokens",              ("tensor", FSDP)),                      # [V, D]
    (r"lm_head",                   (FSDP, "tensor")),                      # [D, V]
    (r"norm",                      (None,)),                               # [D]
    (r"layers/attn/[qkv]_proj",    (None, "tensor", None, FSDP)),          # [L, H|K, hd, D]
    (r"layers/attn/o_proj",        (None, "tensor", None, FSDP)),          # [L, H, hd, D]
    (r"layers/attn/.*norm",        (None, None)),                          # [L, hd] | [L, D]
    (r"layers/moe/router",         (None, FSDP, None)),                    # [Lm, D, E]
    (r"layers/moe/(gate|up)_proj", (None, "expert", "fsdp", "tensor")),    # [Lm, E, D, F]
    (r"layers/moe/down_proj",      (None, "expert", "tensor", "fsdp")),    # [Lm, E, F, D]
    (r"layers/mlp/(gate|up)_proj", (None, FSDP, "tensor")),                # [Ld, D, I]
    (r"layers/mlp/down_proj",      (None, "tensor", FSDP)),                # [Ld, I, D]
)

# Serving (KV-cached decoding): no weight is gathered per token. Experts stay split over 'expert' (and their width
# over 'tensor'); attention, norms, the router and the embeddings are split over 'tensor' only (heads, vocab) and
# otherwise replicated, so a decode step moves activations (all-to-alls of a few rows), never weights.
SERVE_PARAM_RULES: tuple[tuple[str, tuple], ...] = (
    (r"embed_tokens",              ("tensor", None)),                      # [V, D]
    (r"lm_head",                   (None, "tensor")),                      # [D, V]
    (r"norm",                      (None,)),                               # [D]
    (r"layers/attn/[qkv]_proj",    (None, "tensor", None, None)),          # [L, H|K, hd, D]
    (r"layers/attn/o_proj",        (None, "tensor", None, None)),          # [L, H, hd, D]
    (r"layers/attn/.*norm",        (None, None)),                          # [L, hd] | [L, D]
    (r"layers/moe/router",         (None, None, None)),                    # [Lm, D, E]
    (r"layers/moe/(gate|up)_proj", (None, "expert", None, "tensor")),      # [Lm, E, D, F]
    (r"layers/moe/down_proj",      (None, "expert", "tensor", None)),      # [Lm, E, F, D]
    (r"layers/mlp/(gate|up)_proj", (None, None, "tensor")),                # [Ld, D, I]
    (r"layers/mlp/down_proj",      (None, "tensor", None)),                # [Ld, I, D]
)

# LoRA adapters (qwen3_jax.lora, paths target/a|b): rank-r matrices, replicated but for the head axes, which follow
# the weights they adapt over 'tensor'. A of q/k/v [L, r, D] and B of o_proj [L, D, r] stay whole on every device.
LORA_RULES: tuple[tuple[str, tuple], ...] = (
    (r"[qkv]_proj/b",              (None, "tensor", None, None)),          # [L, H|K, hd, r]
    (r"o_proj/a",                  (None, None, "tensor", None)),          # [L, r, H, hd]
)

ACTIVATION_RULES: dict[str, tuple] = {
    "bt":       (BATCH, None),                    # token ids, masks, positions
    "btd":      (BATCH, None, None),              # hidden states
    "btv":      (BATCH, None, "tensor"),          # logits
    "tokens":   (BATCH, None),                    # flattened tokens [B*T, D] entering the MoE
    "kv_cache": (None, BATCH, None, "tensor", None),  # [L, B, S, K, hd]
    "embed_table": ("tensor", None),              # [V, D] as the lookup reads it: FSDP shards gathered
}


def fit_spec(spec, shape, mesh_shape: Mapping[str, int]) -> P:
    """The largest legal sub-spec of `spec` for `shape`: per dim keep axes (in order) while they divide."""
    if len(spec) != len(shape):
        raise ValueError(f"partition spec {spec} has {len(spec)} entries for a {len(shape)}-d shape {tuple(shape)}")
    used, out = set(), []
    for dim, axes in zip(shape, spec):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        keep, size = [], 1
        for a in axes:
            n = mesh_shape.get(a, 1)
            if n > 1 and a not in used and dim % (size * n) == 0:
                keep.append(a)
                size *= n
                used.add(a)
        out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return P(*out)


def spec_for(path: tuple[str, ...], shape, mesh_shape, rules=None) -> P:
    name = "/".join(str(p) for p in path)
    for pattern, spec in rules or PARAM_RULES:
        if re.fullmatch(pattern, name):
            return fit_spec(spec, shape, mesh_shape)
    return P(*([None] * len(shape)))


def param_shapes(cfg) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{parameter path: shape} of the real module, from its abstract (unallocated) instance."""
    from qwen3_jax.params import abstract_model

    flat = nnx.to_flat_state(nnx.state(abstract_model(cfg), nnx.Param))
    return {tuple(path): tuple(var.get_value().shape) for path, var in flat}


def param_specs(cfg, mesh_shape: Mapping[str, int], rules=None) -> dict[tuple[str, ...], P]:
    """{parameter path: PartitionSpec}; needs only the mesh's axis sizes (no devices)."""
    mesh_shape = dict(mesh_shape)
    check_experts(cfg.num_experts if cfg.is_moe else 0, mesh_shape)
    return {path: spec_for(path, shape, mesh_shape, rules) for path, shape in param_shapes(cfg).items()}


def param_shardings(cfg, mesh, rules=None) -> dict[tuple[str, ...], NamedSharding]:
    """{parameter path, e.g. ("layers", "moe", "gate_proj"): NamedSharding} for `from_pretrained`."""
    return {path: NamedSharding(mesh, spec) for path, spec in param_specs(cfg, mesh.shape, rules).items()}


def shard_bytes(shape, dtype, spec: P, mesh_shape: Mapping[str, int]) -> int:
    """Bytes of one device's shard of an array with `spec` (ceil-divided per sharded dim)."""
    n = 1
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        n *= -(-dim // math.prod(mesh_shape.get(a, 1) for a in axes))
    return n * np.dtype(dtype).itemsize


def activation_sharding(kind: str, shape, mesh) -> NamedSharding:
    return NamedSharding(mesh, fit_spec(ACTIVATION_RULES[kind], shape, mesh.shape))


def constrain(x, mesh, kind: str):
    """`with_sharding_constraint` of an activation by its kind (no mesh context needed)."""
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, activation_sharding(kind, x.shape, mesh))


def place(x, sharding: NamedSharding):
    """Put one array onto its shards (multi-process: every process passes the same host value)."""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.jit(lambda a: a, out_shardings=sharding)(x)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def shard_model(model, mesh, rules=None):
    """Move an existing model's parameters onto `mesh` by the rules, in place; sets `model.mesh`."""
    shardings = param_shardings(model.config, mesh, rules)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        var.set_value(place(var.get_value(), shardings[tuple(path)]))
    model.mesh = mesh
    return model
