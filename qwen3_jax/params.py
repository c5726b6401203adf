"""Parameter counts from the real module's abstract shapes (no allocation)."""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from .config import Qwen3Config
from .model import Qwen3ForCausalLM


def abstract_model(cfg: Qwen3Config, param_dtype=jnp.bfloat16) -> Qwen3ForCausalLM:
    """The model with `jax.ShapeDtypeStruct` leaves: shapes without memory."""
    return nnx.eval_shape(lambda: Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype))


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
