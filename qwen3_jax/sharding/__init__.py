"""Device mesh, placing a model on it, and the sharded abstract model (installed as qwen3_jax.sharding).

    mesh = make_mesh(data=4, expert=8)                    # axes ('data', 'fsdp', 'expert', 'tensor')
    model = qwen3_jax.from_pretrained(path, mesh=mesh)    # every tensor straight into its shards
    model(input_ids)                                      # MoE layers: all-to-all expert parallelism

The partition rules are data at the bottom of the package (qwen3_jax.partition: each weight's logical axes, declared
in qwen3_jax.weights, -> mesh axes), the expert-parallel MoE block is the model's (qwen3_jax.moe); both are
re-exported here.
"""

from qwen3_jax.moe import ep_moe
from qwen3_jax.params import param_shardings, param_specs
from qwen3_jax.partition import (ACTIVATION_RULES, LORA_RULES, PARAM_RULES, SERVE_PARAM_RULES, IfDivides,
                                 activation_sharding, check_experts, constrain, fit_spec, spec_for)

from .mesh import AXES, MeshLayoutWarning, initialize, make_mesh
from .rules import shard_model

__all__ = [
    "AXES", "make_mesh", "MeshLayoutWarning", "initialize", "check_experts",
    "PARAM_RULES", "SERVE_PARAM_RULES", "LORA_RULES", "ACTIVATION_RULES", "IfDivides", "fit_spec", "spec_for",
    "param_specs", "param_shardings",
    "activation_sharding", "constrain", "shard_model", "ep_moe",
]
