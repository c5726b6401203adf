"""Small random transformers reference models (the tests write their own checkpoints: no hub)."""

from __future__ import annotations

import numpy as np
import torch
from transformers import Qwen3Config as HFQwen3Config
from transformers import Qwen3ForCausalLM as HFQwen3ForCausalLM
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

# Small configs covering the features the Qwen3 family uses. Non-power-of-two sizes throughout.
CONFIGS = {
    # mixed dense/MoE via mlp_only_layers, norm_topk_prob false, tied embeddings, YaRN, head_dim != D/H
    "moe_mixed_yarn_tied": dict(
        kind="moe", vocab_size=97, hidden_size=48, intermediate_size=80, moe_intermediate_size=24,
        num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2, head_dim=20, num_experts=10,
        num_experts_per_tok=3, norm_topk_prob=False, mlp_only_layers=[1], rope_theta=10000.0,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        max_position_embeddings=64, tie_word_embeddings=True,
    ),
    # all-MoE stack like Qwen3-30B-A3B: norm_topk_prob, untied, default RoPE
    "moe_uniform": dict(
        kind="moe", vocab_size=131, hidden_size=40, intermediate_size=72, moe_intermediate_size=28,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=12, num_experts=12,
        num_experts_per_tok=4, norm_topk_prob=True, rope_theta=1_000_000.0, max_position_embeddings=128,
        tie_word_embeddings=False,
    ),
    # decoder_sparse_step 2: every other layer sparse
    "moe_sparse_step": dict(
        kind="moe", vocab_size=89, hidden_size=36, intermediate_size=52, moe_intermediate_size=20,
        num_hidden_layers=4, num_attention_heads=3, num_key_value_heads=1, head_dim=16, num_experts=6,
        num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=2, rope_theta=500000.0,
        max_position_embeddings=64, tie_word_embeddings=False,
    ),
    # dense Qwen3 with YaRN (no truncate) and tied embeddings
    "dense_yarn": dict(
        kind="dense", vocab_size=113, hidden_size=56, intermediate_size=92, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, rope_theta=1_000_000.0,
        rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32, "truncate": False},
        max_position_embeddings=64, tie_word_embeddings=True,
    ),
}


def hf_model(name: str, seed: int = 0):
    """A transformers model of CONFIGS[name] with random weights large enough to exercise routing."""
    spec = dict(CONFIGS[name])
    kind = spec.pop("kind")
    torch.manual_seed(seed)
    if kind == "moe":
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**spec))
    else:
        model = HFQwen3ForCausalLM(HFQwen3Config(**spec))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.2)
    return model.eval()


def hf_forward(model, ids: np.ndarray, attention_mask: np.ndarray | None = None, position_ids=None):
    """(logits [B,T,V], router logits [L_moe,B,T,E] or None) as numpy fp32."""
    kw = {}
    if attention_mask is not None:
        kw["attention_mask"] = torch.tensor(attention_mask)
    if position_ids is not None:
        kw["position_ids"] = torch.tensor(position_ids)
    is_moe = isinstance(model, Qwen3MoeForCausalLM)
    with torch.no_grad():
        out = model(torch.tensor(ids), output_router_logits=is_moe, **kw)
    b, t = ids.shape
    rl = None
    if is_moe:
        rl = np.stack([r.float().numpy().reshape(b, t, -1) for r in out.router_logits])
    return out.logits.float().numpy(), rl
