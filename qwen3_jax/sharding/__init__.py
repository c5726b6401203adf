"""Device mesh, partition rules and expert parallelism (installed as qwen3_jax.sharding).

    mesh = make_mesh(data=4, expert=8)                    # axes ('data', 'fsdp', 'expert', 'tensor')
    model = qwen3_jax.from_pretrained(path, mesh=mesh)    # every tensor straight into its shards
    model(input_ids)                                      # MoE layers: all-to-all expert parallelism
"""

from .ep import ep_moe
from .mesh import AXES, MeshLayoutWarning, check_experts, initialize, make_mesh
from .rules import (ACTIVATION_RULES, PARAM_RULES, SERVE_PARAM_RULES, activation_sharding, constrain, fit_spec, param_shardings,
                    param_specs, shard_model)

__all__ = [
    "AXES", "make_mesh", "MeshLayoutWarning", "initialize", "check_experts",
    "PARAM_RULES", "SERVE_PARAM_RULES", "ACTIVATION_RULES", "fit_spec", "param_specs", "param_shardings", "activation_sharding",
    "constrain", "shard_model", "ep_moe",
]
