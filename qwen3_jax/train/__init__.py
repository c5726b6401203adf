"""Fine-tuning (installed as qwen3_jax.train): `qwen3-jax-train`, `qwen3-jax-export`, `qwen3-jax-plot`.

    from qwen3_jax.train import load_balancing_loss
    load_balancing_loss(router_logits_lbte, top_k=8, mask=mask_bt)   # global-batch LBL, mean over layers
    load_balancing_loss(out.router_logits, routed_top_k(model), mask_bt)   # the routing the model ran (interventions)

Modules: losses (pure loss math), data (jsonl -> grain pipeline with packing), step (optimizer and the
jitted train step), trainer (run loop, orbax checkpoints, metrics, export), cli, plot.
"""

from .step import lower_train_step
from .losses import (Routed, cross_entropy_sum, expert_load, lbl_from_stats, lbl_stats, load_balancing_loss,
                     routed_top_k, router_z_loss_sum)

__all__ = ["load_balancing_loss", "lbl_stats", "lbl_from_stats", "routed_top_k", "Routed", "router_z_loss_sum",
           "expert_load", "cross_entropy_sum", "lower_train_step"]
