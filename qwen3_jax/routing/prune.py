"""Expert pruning by REAP saliency (Lasby et al. 2025, "REAP: Router-weighted Expert Activation Pruning").

    sal = reap_saliency(model, calibration_batches)        # {"saliency": [L_moe, E], "count": [L_moe, E]}
    pruned = prune_experts(model, sal, keep=64)             # a Qwen3ForCausalLM with num_experts=64
    qwen3_jax.save_pretrained(pruned, "pruned/")            # loads in transformers (Qwen3MoeForCausalLM)

Saliency of expert j at a layer: the mean over the tokens routed to j (its top-k set X_j) of the router weight
times the norm of the expert's output, S_j = 1/|X_j| sum_{x in X_j} g_j(x) ||f_j(x)||_2 (0 for an expert no
token chose). Each layer keeps the `keep` most salient experts (in their original order), the router's columns
with them; every layer keeps the same number, so the config stays a plain Qwen3-MoE config. The router's
softmax then runs over the kept experts only: the pruned model computes exactly what the original computes
with the other experts disabled (Intervention(disable=...)).
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .intervention import Intervention
from .stats import batch_placer, with_routing, as_records, iter_batches, layer_routing

PRUNING_FILE = "pruning.json"


@functools.lru_cache(maxsize=4)
def _saliency_fn(graphdef, cfg, iv, out_sharding):
    from qwen3_jax.model import param_arrays
    from qwen3_jax.moe import moe_experts

    def run(state, ids_bt, valid_bt):
        model = nnx.merge(graphdef, state)
        out = model(ids_bt, attention_mask=valid_bt.astype(jnp.int32))
        n_l, b, t, e = out.router_logits.shape
        w, ids, _ = layer_routing(out.router_logits.reshape(n_l, b * t, e), cfg, iv)
        k = ids.shape[-1]
        ids = jnp.where(valid_bt.reshape(1, -1, 1), ids, e)
        experts = {n: v for n, v in param_arrays(model.layers.moe).items() if n in ("gate_proj", "up_proj", "down_proj")}
        ks = model.runtime.kernels

        def one(xs):
            x_nd, w_nk, e_nk, p = xs
            x_md = jnp.repeat(x_nd, k, axis=0)                              # one row per (token, slot)
            y_md = moe_experts(x_md, jnp.ones((x_md.shape[0], 1), x_md.dtype), e_nk.reshape(-1, 1), p,
                               ks=ks)                                       # each slot's expert output f_j(x)
            norm_nk = jnp.linalg.norm(y_md.astype(jnp.float32), axis=-1).reshape(-1, k)
            sal = jnp.zeros((e,), jnp.float32).at[e_nk].add(w_nk * norm_nk, mode="drop")
            cnt = jnp.zeros((e,), jnp.float32).at[e_nk].add(1.0, mode="drop")
            return sal, cnt

        x = out.moe_inputs.reshape(n_l, b * t, -1)
        return jax.lax.map(one, (x, w, ids, experts))
    return jax.jit(run, out_shardings=out_sharding)


def reap_saliency(model, batches, *, domains=None, batch_size: int = 8, max_len: int | None = None) -> dict:
    """REAP saliency over calibration `batches` (as for capture): {"saliency": [L_moe, E] (mean router weight x
    output norm over the tokens routed to each expert), "count": [L_moe, E] (those tokens), "layers"}. Under the
    model's runtime.routing, if any."""
    cfg = model.config
    if not cfg.is_moe:
        raise ValueError("reap_saliency: the model has no MoE layers")
    base = model.runtime.routing or Intervention()
    iv = base.replace(moe_inputs=True)
    iv.check(cfg)
    model = with_routing(model, iv)
    put, out_sharding = batch_placer(model)
    graphdef, state = nnx.split(model)
    fn = _saliency_fn(graphdef, cfg, iv, out_sharding)
    n_l, e = len(cfg.moe_layers), cfg.num_experts
    sal, cnt = np.zeros((n_l, e)), np.zeros((n_l, e))
    max_len = max_len or min(cfg.max_position_embeddings, 4096)
    for ids, valid, _ in iter_batches(as_records(batches, domains), batch_size, max_len):
        s, c = jax.device_get(fn(state, put(ids), put(valid)))
        sal += s
        cnt += c
    return {"saliency": np.where(cnt > 0, sal / np.maximum(cnt, 1), 0.0), "count": cnt.astype(np.int64),
            "layers": list(cfg.moe_layers)}


def keep_sets(saliency, keep: int) -> list[list[int]]:
    """Per MoE layer, the `keep` most salient experts (ties: lower id first), in ascending id order."""
    s = np.asarray(saliency["saliency"] if isinstance(saliency, dict) else saliency, np.float64)
    if not 1 <= keep <= s.shape[-1]:
        raise ValueError(f"keep={keep}: must be in [1, {s.shape[-1]}] (the experts per layer)")
    return [sorted(np.argsort(-row, kind="stable")[:keep].tolist()) for row in s]


def prune_experts(model, saliency, keep: int | None = None, *, kept: list[list[int]] | None = None):
    """A new model with only the kept experts per MoE layer (the `keep` most salient by `saliency`, from
    reap_saliency or a [L_moe, E] array; or the explicit per-layer lists `kept`). Its config has
    num_experts = keep; router columns and expert weights are sliced per layer; `model.pruned_experts` is the
    list of original expert ids kept per MoE layer (save_pruned writes it)."""
    from qwen3_jax.model import Qwen3ForCausalLM

    cfg = model.config
    if kept is None:
        if keep is None:
            raise ValueError("prune_experts: give keep= (with saliency) or kept=")
        kept = keep_sets(saliency, keep)
    n = len(kept[0]) if kept else 0
    if len(kept) != len(cfg.moe_layers) or any(len(k) != n for k in kept):
        raise ValueError(f"prune_experts: need one list of the same length per MoE layer ({len(cfg.moe_layers)})")
    if any(len(set(k)) != n or min(k) < 0 or max(k) >= cfg.num_experts for k in kept):
        raise ValueError(f"prune_experts: expert ids must be distinct and in [0, {cfg.num_experts})")
    if n < cfg.num_experts_per_tok:
        raise ValueError(f"prune_experts: keeping {n} experts < num_experts_per_tok={cfg.num_experts_per_tok}")
    new_cfg = cfg.replace(num_experts=n)
    runtime = model.runtime.replace(routing=None)
    abstract = nnx.eval_shape(lambda: Qwen3ForCausalLM(new_cfg, rngs=nnx.Rngs(0), dtype=model.dtype,
                                                       param_dtype=model.param_dtype, runtime=runtime))
    graphdef, state = nnx.split(abstract)
    old = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    idx = jnp.asarray(np.asarray(kept, np.int32))
    rows = jnp.arange(len(kept))[:, None]
    flat = dict(nnx.to_flat_state(state))
    for path, var in flat.items():
        value = old[path][...]
        if path[:2] == ("layers", "moe"):
            value = value[rows, :, idx].transpose(0, 2, 1) if path[-1] == "router" else value[rows, idx]
        var.set_value(value) if hasattr(var, "set_value") else setattr(var, "value", value)
    pruned = nnx.merge(graphdef, nnx.from_flat_state(flat))
    pruned.pruned_experts = tuple(tuple(int(e) for e in k) for k in kept)
    return pruned


def save_pruned(model, path, saliency: dict | None = None) -> str:
    """save_pretrained of a pruned model (config.json with the new num_experts, safetensors) plus pruning.json:
    per MoE layer the original ids of the kept experts (and their saliency)."""
    from qwen3_jax.checkpoint import save_pretrained

    save_pretrained(model, path)
    if jax.process_index() == 0:
        info = {"method": "reap", "layers": list(model.config.moe_layers),
                "kept_experts": [list(k) for k in getattr(model, "pruned_experts", ())] or None}
        if saliency is not None:
            info["saliency"] = np.asarray(saliency["saliency"]).tolist()
            info["count"] = np.asarray(saliency["count"]).tolist()
        with open(os.path.join(path, PRUNING_FILE), "w") as f:
            json.dump(info, f)
    return os.fspath(path)
