"""Sharding as data, at the bottom of the package: the partition rules (a parameter's logical axes -> mesh axes,
activation kind -> PartitionSpec) and the pure functions that resolve them for a shape and a mesh's axis sizes.

The mesh axes are ('data', 'fsdp', 'expert', 'tensor') (qwen3_jax.sharding.make_mesh builds the mesh). A spec
names, per dimension, a mesh axis, a tuple of axes, or None.

Parameters are strict: each names its logical axes in qwen3_jax.weights, PARAM_RULES / SERVE_PARAM_RULES map every
logical axis to mesh axes, and a mesh axis that does not divide a parameter's dimension is a ValueError naming the
parameter, the dimension, the axis and the mesh (`param_spec`) -- except where a rule says `IfDivides(...)`: that
dimension is split where the axes divide it and replicated otherwise (vocab and kv heads over 'tensor', as MaxText
does). A mesh axis already used by an earlier dimension of the same parameter is skipped (the 'expert' of FSDP on
the experts' own D). Activations are lenient: `fit_spec` drops an axis that does not divide (a decode batch of one on
data=2 is normal). The layer axis of stacked parameters is never sharded: `nnx.scan` slices it every layer.
The model, the checkpoint reader and the MoE read these tables; qwen3_jax.sharding places a model's parameters by
them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

BATCH = ("data", "fsdp", "expert")   # batch / token axes of activations (the MoE re-splits over 'expert')
FSDP = ("fsdp", "expert")            # non-expert weights: ZeRO-3 over every axis that splits the batch


@dataclass(frozen=True)
class IfDivides:
    """A rule entry: split the dimension over `axes` (kept in order while they divide it), else replicate it."""

    axes: str | tuple[str, ...]


# Training: logical axis -> mesh axes. Experts over 'expert', widths (heads, MLP, vocab) over 'tensor', and the
# hidden size of every weight ZeRO-3 sharded over the axes that split the batch (FSDP; on the experts that is
# 'fsdp' alone, their 'expert' being used by the expert axis). Vocab and kv heads split only where 'tensor' divides
# them (GQA: 4 kv heads on tensor=8 are replicated, each device computing its query heads' group).
PARAM_RULES: dict[str, object] = {
    "layer":          None,                   # nnx.scan slices it every layer
    "vocab":          IfDivides("tensor"),    # embed_tokens [V, D], lm_head [D, V]
    "embed":          FSDP,                   # D of every matrix
    "norm":           None,                   # norm scales [D]
    "heads":          "tensor",               # q_proj, o_proj [L, H, hd, D]
    "kv_heads":       IfDivides("tensor"),    # k_proj, v_proj [L, K, hd, D]
    "head_dim":       None,
    "router_experts": None,                   # router [Lm, D, E]
    "expert":         "expert",               # experts [Lm, E, D, F] / [Lm, E, F, D]
    "mlp":            "tensor",               # expert F, dense I
}

# Serving (KV-cached decoding): no weight is gathered per token. Experts stay split over 'expert' (and their width
# over 'tensor'); attention, norms, the router and the embeddings are split over 'tensor' only (heads, vocab) and
# otherwise replicated, so a decode step moves activations (all-to-alls of a few rows), never weights. Query heads
# too split only where 'tensor' divides them: qwen3-jax-infer's multi-process default mesh puts every device on
# 'tensor', whatever the head count.
SERVE_PARAM_RULES: dict[str, object] = {**PARAM_RULES, "embed": None, "heads": IfDivides("tensor")}

# LoRA adapters (qwen3_jax.lora, paths target/a|b): rank-r matrices, replicated but for the head axes, which follow
# the weights they adapt over 'tensor'. A of q/k/v [L, r, D] and B of o_proj [L, D, r] stay whole on every device.
LORA_RULES: tuple[tuple[str, tuple], ...] = (
    (r"[qkv]_proj/a",              (None, None, None)),                    # [L, r, D]
    (r"[qkv]_proj/b",              (None, IfDivides("tensor"), None, None)),  # [L, H|K, hd, r]: as q/k/v
    (r"o_proj/a",                  (None, None, "tensor", None)),          # [L, r, H, hd]
    (r"o_proj/b",                  (None, None, None)),                    # [L, D, r]
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
    """The largest legal sub-spec of `spec` for `shape`: per dim keep axes (in order) while they divide (activations;
    parameters go through the strict `param_spec`)."""
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


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _mesh_text(mesh_shape) -> str:
    return "mesh (" + ", ".join(f"{a}={n}" for a, n in dict(mesh_shape).items()) + ")"


def param_spec(name: str, spec, shape, mesh_shape: Mapping[str, int], axes_names=None) -> P:
    """The PartitionSpec of parameter `name` (shape `shape`) for `spec` (entries: mesh axis, tuple of axes, None, or
    IfDivides). Mesh axes of size 1 and axes an earlier dimension uses are skipped; an axis that does not divide its
    dimension is a ValueError naming the parameter, the dimension, the axis and the mesh (IfDivides: replicated).
    spec None: replicated."""
    if spec is None:
        spec = (None,) * len(shape)
    if len(spec) != len(shape):
        raise ValueError(f"parameter {name}: partition spec {tuple(spec)} has {len(spec)} entries for its "
                         f"{len(shape)}-d shape {tuple(shape)}")
    mesh_shape = dict(mesh_shape)
    used, out = set(), []
    for k, (dim, entry) in enumerate(zip(shape, spec)):
        lenient = isinstance(entry, IfDivides)
        keep, size = [], 1
        for a in _axes(entry.axes if lenient else entry):
            n = mesh_shape.get(a, 1)
            if n == 1 or a in used:
                continue
            if dim % (size * n):
                if lenient:
                    break
                what = f" ({axes_names[k]})" if axes_names else ""
                raise ValueError(
                    f"parameter {name} {tuple(shape)}: dimension {k}{what} of size {dim} is not divisible by mesh "
                    f"axis {a!r} (size {n}{f', after {keep} of size {size}' if keep else ''}) of the "
                    f"{_mesh_text(mesh_shape)}; choose a mesh whose axes divide it, or rules that leave it whole")
            keep.append(a)
            size *= n
        used.update(keep)
        out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return P(*out)


def spec_for(path: tuple[str, ...], shape, mesh_shape, rules=None, axes: tuple[str, ...] | None = None) -> P:
    """The PartitionSpec of the parameter at `path` by `rules` (default PARAM_RULES), either of:

    - a logical table {logical axis: mesh axes} (PARAM_RULES, SERVE_PARAM_RULES): needs the parameter's logical
      `axes` (qwen3_jax.weights); a logical axis the table lacks is a ValueError;
    - a regex table ((pattern, spec), ...): the first pattern that re.fullmatch-es the path joined by "/" gives the
      spec (None: replicated); a parameter no pattern matches is a ValueError.

    Either way an axis that does not divide its dimension is a ValueError (`param_spec`), unless the rule says
    IfDivides."""
    name = "/".join(str(p) for p in path)
    rules = PARAM_RULES if rules is None else rules
    if isinstance(rules, Mapping):
        if axes is None:
            raise ValueError(f"parameter {name}: a logical rule table needs the parameter's logical axes")
        missing = [a for a in axes if a not in rules]
        if missing:
            raise ValueError(f"parameter {name} {tuple(shape)}: no partition rule for its logical axes {missing} "
                             f"(axes {tuple(axes)}; rules cover {sorted(rules)}) on the {_mesh_text(mesh_shape)}")
        return param_spec(name, tuple(rules[a] for a in axes), shape, mesh_shape, axes)
    for pattern, spec in rules:
        if re.fullmatch(pattern, name):
            return param_spec(name, spec, shape, mesh_shape, axes)
    raise ValueError(f"parameter {name} {tuple(shape)}: no partition rule matches it (patterns "
                     f"{[p for p, _ in rules]}) on the {_mesh_text(mesh_shape)}")


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
