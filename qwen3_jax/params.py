"""The model's parameters from its abstract shapes (no allocation): counts, shapes, partition specs and
shardings by the rules of qwen3_jax.partition, and the split of a model into graph, abstract state and a pure dict."""

from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from .config import Qwen3Config
from .model import Qwen3ForCausalLM
from .partition import check_experts, spec_for


def abstract_model(cfg: Qwen3Config, param_dtype=jnp.bfloat16, *, dtype=None, runtime=None) -> Qwen3ForCausalLM:
    """The model with `jax.ShapeDtypeStruct` leaves: shapes without memory (dtype: the compute dtype, default
    param_dtype; runtime: its qwen3_jax.Runtime)."""
    kw = {} if runtime is None else {"runtime": runtime}
    return nnx.eval_shape(lambda: Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.dtype(dtype or param_dtype),
                                                   param_dtype=jnp.dtype(param_dtype), **kw))


def param_count(cfg: Qwen3Config | str) -> dict[str, int]:
    """{"total": all parameters, "active": parameters one token uses (top-k of the experts)}.

    Embedding and lm_head both count (once when tied), as Qwen's published figures do.
    """
    if isinstance(cfg, str):
        cfg = Qwen3Config.preset(cfg)
    flat = nnx.to_flat_state(nnx.state(abstract_model(cfg), nnx.Param))
    total = active = 0
    for path, var in flat:
        n = math.prod(var.get_value().shape)
        total += n
        if path[:2] == ("layers", "moe") and path[2] != "router":
            n = n * cfg.num_experts_per_tok // cfg.num_experts  # only top-k experts per token
        active += n
    return {"total": int(total), "active": int(active)}


def param_shapes(cfg) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{parameter path: shape} of the real module, from its abstract (unallocated) instance."""
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


def split_model(model):
    """(graphdef, abstract state, params as a pure dict) of an nnx model."""
    graphdef, state = nnx.split(model, nnx.Param)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    return graphdef, abstract, nnx.to_pure_dict(state)


def model_from(graphdef, abstract_state, params):
    """The nnx model with `params` (pure dict; None = the abstract shapes) in place."""
    state = jax.tree.map(lambda x: x, abstract_state)
    if params is not None:
        nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)
