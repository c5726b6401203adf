"""The model's parameters from the weight table (qwen3_jax.weights; no allocation): counts, shapes, partition specs
and shardings by the rules of qwen3_jax.partition, and the split of a model into graph, abstract state and a pure
dict."""

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
from .weights import weights


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
    total = active = 0
    for w in weights(cfg):
        n = math.prod(w.shape)
        total += n
        if "expert" in w.axes:
            n = n * cfg.num_experts_per_tok // cfg.num_experts  # only top-k experts per token
        active += n
    return {"total": int(total), "active": int(active)}


def param_shapes(cfg) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{parameter path: shape}, from the weight table (the shapes the model's modules create)."""
    return {w.path: w.shape for w in weights(cfg)}


def param_specs(cfg, mesh_shape: Mapping[str, int], rules=None) -> dict[tuple[str, ...], P]:
    """{parameter path: PartitionSpec}; needs only the mesh's axis sizes (no devices).

    rules: None (qwen3_jax.partition.PARAM_RULES), a logical table {logical axis: mesh axes} such as
    SERVE_PARAM_RULES, applied to each weight's logical axes (qwen3_jax.weights), or a regex table
    ((path pattern, spec), ...) matched against "layers/moe/gate_proj"-style paths, first match wins.
    A parameter no rule covers, or a mesh axis that does not divide a parameter's dimension (where the rule does not
    say IfDivides), is a ValueError naming the parameter and the mesh."""
    mesh_shape = dict(mesh_shape)
    check_experts(cfg.num_experts if cfg.is_moe else 0, mesh_shape)
    return {w.path: spec_for(w.path, w.shape, mesh_shape, rules, axes=w.axes) for w in weights(cfg)}


def param_shardings(cfg, mesh, rules=None) -> dict[tuple[str, ...], NamedSharding]:
    """{parameter path, e.g. ("layers", "moe", "gate_proj"): NamedSharding} for `from_pretrained`
    (rules: as `param_specs`)."""
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
