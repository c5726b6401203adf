"""Sharding as data, at the bottom of the package: the partition rules (parameter path pattern -> PartitionSpec,
activation kind -> PartitionSpec) and the pure functions that fit a spec to a shape and a mesh's axis sizes.

The mesh axes are ('data', 'fsdp', 'expert', 'tensor') (qwen3_jax.sharding.make_mesh builds the mesh). A spec
names, per dimension, a mesh axis, a tuple of axes, or None. `fit_spec` makes any spec legal for a shape and a
mesh: an axis whose size does not divide its dimension (or that is already used) is dropped, so the dimension
falls back to fewer axes / replication instead of failing. The layer axis of stacked parameters is never
sharded: `nnx.scan` slices it every layer. The model, the checkpoint reader and the MoE read these tables;
qwen3_jax.sharding places a model's parameters by them.
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

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


def check_experts(num_experts: int, mesh_shape) -> None:
    """Expert parallelism needs whole experts per shard: num_experts divisible by the 'expert' size."""
    ep = dict(mesh_shape).get("expert", 1)
    if num_experts and num_experts % ep:
        raise ValueError(
            f"expert parallelism: num_experts={num_experts} is not divisible by the mesh's expert axis size {ep}; "
            f"choose expert in {[d for d in range(1, num_experts + 1) if num_experts % d == 0]}"
        )
    if not num_experts and ep > 1:
        raise ValueError(f"expert parallelism: the model is dense (no experts) but the mesh has expert={ep}; "
                         "put those devices on 'data' or 'fsdp'")
