"""Routing interventions: one frozen description, applied by one pure function where the router's top-k is taken.

    from qwen3_jax.routing import Intervention
    iv = Intervention(top_k=4, disable={5: [3, 17]}, force={7: [0]}, temperature={None: 1.0, 2: 0.5})
    model.runtime = model.runtime.replace(routing=iv)      # every path: dense, expert-parallel, KV-cached, CPU kernels

Layers are decoder layer indices (`model.layers.{i}` in the Hugging Face names); the key None means every MoE
layer. A layer's own top-k or temperature wins over the global one; its disabled / forced experts add to the
global ones. Semantics, per token and MoE layer l:

- temperature T_l: the router's softmax is taken over logits / T_l;
- disable: the experts' logits are -inf, so their probability is 0 and the token goes to its next choices (the
  softmax renormalises over the remaining experts, as if the experts were pruned);
- force: the experts are always among the token's choices (selected first), weighted by their own router
  probability; the remaining slots go to the best other experts;
- top_k k_l: the number of experts per token. Under the layer scan every layer takes the same number of
  slots, k_max = the largest k_l; a layer with k_l < k_max keeps its best k_l slots and the others get weight 0
  and expert id E (no expert: such a slot is never computed, takes no expert-parallel capacity and is not
  counted as routed). Renormalisation (norm_topk_prob) is over the kept slots.

Router logits reported by the model (`out.router_logits`) stay the raw ones; `route_topk` below recomputes the
routing from them exactly as the model did (qwen3_jax.routing.capture does).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from qwen3_jax.moe import topk_weights


def _layer_key(k):
    if k is None or k in ("*", "all"):
        return None
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"Intervention: layer {k!r} must be a decoder layer index >= 0 or None (every layer)")
    return int(k)


def _per_layer(value, what, conv) -> tuple:
    """A global value or {layer or None: value} -> sorted ((layer or -1, value), ...) (hashable)."""
    if value is None:
        return ()
    items = value.items() if isinstance(value, Mapping) else [(None, value)]
    out = {}
    for k, v in items:
        key = _layer_key(k)
        out[-1 if key is None else key] = conv(v, what)
    return tuple(sorted(out.items()))


def _experts(v, what):
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        v = [v]
    try:
        ids = tuple(sorted({int(e) for e in v}))
    except (TypeError, ValueError):
        raise ValueError(f"Intervention: {what} needs expert ids, got {v!r}") from None
    if any(e < 0 for e in ids):
        raise ValueError(f"Intervention: {what} expert ids must be >= 0, got {list(ids)}")
    return ids


def _pos_int(v, what):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"Intervention: {what} must be an integer >= 1, got {v!r}")
    return int(v)


def _pos_float(v, what):
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"Intervention: {what} must be a number > 0, got {v!r}") from None
    if not f > 0 or not np.isfinite(f):
        raise ValueError(f"Intervention: {what} must be a number > 0, got {v!r}")
    return f


@dataclasses.dataclass(frozen=True)
class Intervention:
    """What to change in the routing (see the module docstring). Each field is a global value or a dict
    {decoder layer (None = every MoE layer): value}; stored normalised as sorted tuples (hashable: it is part of
    the model's static runtime).

    moe_inputs: also return each MoE layer's input (the post-attention-normed hidden state) in
    `out.moe_inputs` [L_moe, B, T, D] (expert saliency for pruning, qwen3_jax.routing.reap_saliency)."""

    top_k: Any = None
    disable: Any = None
    force: Any = None
    temperature: Any = None
    moe_inputs: bool = False

    def __post_init__(self):
        set_ = lambda name, v: object.__setattr__(self, name, v)  # noqa: E731
        if not _is_normal(self.top_k):
            set_("top_k", _per_layer(self.top_k, "top_k", _pos_int))
        if not _is_normal(self.disable):
            set_("disable", _per_layer(self.disable, "disable", _experts))
        if not _is_normal(self.force):
            set_("force", _per_layer(self.force, "force", _experts))
        if not _is_normal(self.temperature):
            set_("temperature", _per_layer(self.temperature, "temperature", _pos_float))
        set_("moe_inputs", bool(self.moe_inputs))

    def replace(self, **kw) -> "Intervention":
        return dataclasses.replace(self, **kw)

    @property
    def changes_routing(self) -> bool:
        return bool(self.top_k or self.disable or self.force or self.temperature)

    # -- per layer ------------------------------------------------------------------------------
    @staticmethod
    def _at(table, layer, default):
        d = dict(table)
        return d.get(layer, d.get(-1, default))

    @staticmethod
    def _experts_at(table, layer) -> tuple:
        d = dict(table)
        return tuple(sorted(set(d.get(-1, ())) | set(d.get(layer, ()))))

    def layer_top_k(self, layer: int, cfg) -> int:
        return self._at(self.top_k, layer, cfg.num_experts_per_tok)

    def max_top_k(self, cfg) -> int:
        """The slots every MoE layer takes (k_max)."""
        return max(self.layer_top_k(i, cfg) for i in cfg.moe_layers) if cfg.moe_layers else cfg.num_experts_per_tok

    def check(self, cfg) -> "Intervention":
        """ValueError naming the field when this does not fit the model config."""
        moe = set(cfg.moe_layers)
        e = cfg.num_experts
        for name in ("top_k", "disable", "force", "temperature"):
            for layer, _ in getattr(self, name):
                if layer >= 0 and layer not in moe:
                    raise ValueError(f"Intervention {name}: layer {layer} is not a MoE layer (MoE layers: "
                                     f"{_ranges(sorted(moe))})")
        for name in ("disable", "force"):
            for layer, ids in getattr(self, name):
                bad = [i for i in ids if i >= e]
                if bad:
                    raise ValueError(f"Intervention {name}: expert ids {bad} out of range: the model has {e} experts")
        for layer in cfg.moe_layers:
            k = self.layer_top_k(layer, cfg)
            off = set(self._experts_at(self.disable, layer))
            on = set(self._experts_at(self.force, layer))
            if on & off:
                raise ValueError(f"Intervention: layer {layer}: experts {sorted(on & off)} are both forced and disabled")
            if k > e - len(off):
                raise ValueError(f"Intervention: layer {layer}: top_k {k} > the {e - len(off)} experts left "
                                 f"({len(off)} of {e} disabled)")
            if len(on) > k:
                raise ValueError(f"Intervention: layer {layer}: {len(on)} forced experts > top_k {k}")
        return self

    def tables(self, num_layers: int, num_experts: int, default_top_k: int):
        """Per decoder layer numpy tables: top-k [L] int32, disabled [L, E] bool, forced [L, E] bool,
        temperature [L] float32 (layers without an entry take the global value, else the defaults)."""
        k = np.array([self._at(self.top_k, i, default_top_k) for i in range(num_layers)], np.int32)
        off = np.zeros((num_layers, num_experts), bool)
        on = np.zeros((num_layers, num_experts), bool)
        for i in range(num_layers):
            off[i, list(self._experts_at(self.disable, i))] = True
            on[i, list(self._experts_at(self.force, i))] = True
        temp = np.array([self._at(self.temperature, i, 1.0) for i in range(num_layers)], np.float32)
        return k, off, on, temp

    def route_topk(self, logits_te, layer, cfg):
        """(weights [T, k_max], experts [T, k_max]) from fp32 router logits [T, E] of decoder layer `layer`
        (an int or a traced int32 scalar): the routing the model runs under this intervention."""
        return route_topk(logits_te, layer, cfg, self)[:2]

    def to_json(self) -> dict:
        def out(table):
            return {("*" if k < 0 else str(k)): (list(v) if isinstance(v, tuple) else v) for k, v in table}
        return {"top_k": out(self.top_k), "disable": out(self.disable), "force": out(self.force),
                "temperature": out(self.temperature)}

    def __str__(self):
        return json.dumps(self.to_json(), separators=(",", ":"))


def _is_normal(v) -> bool:
    return isinstance(v, tuple) and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], int) for x in v)


def _ranges(xs) -> str:
    return ", ".join(map(str, xs)) if len(xs) < 12 else f"{xs[0]}..{xs[-1]}"


def route_topk(logits_te, layer, cfg, iv: Intervention | None):
    """The routing of `cfg` under intervention `iv` (None: none): (weights [T, k], experts [T, k], probs [T, E]).

    probs are the router probabilities the routing used (after temperature and disabling). k = iv.max_top_k(cfg);
    slots past a layer's own top-k have weight 0 and expert id E."""
    e = logits_te.shape[-1]
    if iv is None or not iv.changes_routing:
        probs = jax.nn.softmax(logits_te, axis=-1)
        return (*topk_weights(probs, cfg.num_experts_per_tok, cfg.norm_topk_prob), probs)
    n_layers = max(cfg.num_hidden_layers, 1)
    k_l, off_le, on_le, temp_l = iv.tables(n_layers, e, cfg.num_experts_per_tok)
    k_max = iv.max_top_k(cfg)
    x = logits_te
    if (temp_l != 1).any():
        x = x / jnp.asarray(temp_l)[layer]
    if off_le.any():
        x = jnp.where(jnp.asarray(off_le)[layer][None], -jnp.inf, x)
    probs = jax.nn.softmax(x, axis=-1)
    score = probs
    if on_le.any():  # forced experts first (probabilities are <= 1)
        score = probs + 2.0 * jnp.asarray(on_le)[layer][None].astype(probs.dtype)
    _, ids = jax.lax.top_k(score, k_max)
    w = jnp.take_along_axis(probs, ids, axis=-1)
    moe_k = k_l[cfg.moe_layers] if cfg.moe_layers else k_l
    if (moe_k != k_max).any():
        keep = jnp.arange(k_max)[None] < jnp.asarray(k_l)[layer]
        w = jnp.where(keep, w, 0.0)
        ids = jnp.where(keep, ids, e)
    if cfg.norm_topk_prob:
        w = w / jnp.sum(w, axis=-1, keepdims=True)
    return w, ids, probs
