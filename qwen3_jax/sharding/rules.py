"""Placing a model's parameters on a mesh by the partition rules (qwen3_jax.partition), and the abstract model
on a mesh that the ahead-of-time programs lower."""

from __future__ import annotations

import jax
from flax import nnx

from qwen3_jax.params import abstract_model, param_shardings, split_model
from qwen3_jax.partition import place


def shard_model(model, mesh, rules=None):
    """Move an existing model's parameters onto `mesh` by the rules, in place; sets `model.mesh`.

    rules: None (qwen3_jax.partition.PARAM_RULES), a logical table {logical axis: mesh axes} (SERVE_PARAM_RULES), or
    a regex table ((path pattern, spec), ...): see qwen3_jax.params.param_specs. A parameter no rule covers, or a
    mesh axis that does not divide a parameter's dimension, is a ValueError naming the parameter and the mesh."""
    shardings = param_shardings(model.config, mesh, rules)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        var.set_value(place(var.get_value(), shardings[tuple(path)]))
    model.mesh = mesh
    return model


def sharded_abstract_model(cfg, runtime, *, dtype, param_dtype, rules=None):
    """(graphdef, abstract state, params) of the model on runtime.mesh with nothing allocated: params is the pure
    dict of ShapeDtypeStructs, each with the NamedSharding the rules give it."""
    model = abstract_model(cfg, param_dtype, dtype=dtype, runtime=runtime)
    graphdef, abstract_state, params = split_model(model)
    shardings = param_shardings(cfg, runtime.mesh, rules)

    def attach(kp, x):
        path = tuple(str(getattr(k, "key", k)) for k in kp)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings[path])

    return graphdef, abstract_state, jax.tree_util.tree_map_with_path(attach, params)
