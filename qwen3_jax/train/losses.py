"""Pure loss math: load-balancing loss (global-batch definition), router z-loss, chunked cross-entropy.

Shape letters: L MoE layers, B batch, T positions, E experts, k top-k, V vocab, N tokens.

Load-balancing loss (Switch / Qwen3-MoE form, normalised so that a perfectly balanced router gives 1):

    LBL = N_E * sum_i f_i * P_i        (per MoE layer, then the mean over layers)
    f_i = (token slots routed to expert i) / (k * N)     -- top-k of the softmax, not differentiated
    P_i = (sum over tokens of softmax prob of expert i) / N

over all N (unmasked) tokens given. transformers' `load_balancing_loss_func` is top_k x this on one layer.
The pieces are sums (`lbl_stats`), so the value over a global batch can be assembled from any split of it:
`lbl_from_stats` takes the global counts for f and any partial probability sums for P, divided by the
global N -- the train step uses this to make the global-batch LBL exact under gradient accumulation.

f counts the experts the model routed to. Under a routing intervention (runtime.routing: its top-k per layer,
disabled / forced experts, temperature) `top_k` is a `Routed`: f counts that routing's choices over its k per
layer, and P is the probability that routing used (after temperature and disabling).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Routed:
    """The routing a model ran, in place of a plain top_k: k per MoE layer, and
    route(logits [N, E] fp32, MoE layer index (traced int32)) -> (experts [N, max k] (E: no expert), probs [N, E])."""

    k: tuple
    route: Callable


def _k_of(top_k):
    """k as an fp32 [L, 1] (per MoE layer) or [1, 1] array."""
    return jnp.asarray(top_k.k if isinstance(top_k, Routed) else top_k, jnp.float32).reshape(-1, 1)


def _layered(router_logits, mask):
    """-> (logits [L, N, E] fp32, mask [L, N] fp32). Leading axes beyond the mask's are MoE layers."""
    x = jnp.asarray(router_logits, jnp.float32)
    e = x.shape[-1]
    if mask is None:
        n_layer_axes = 1 if x.ndim == 4 else 0     # [L, B, T, E]; [B, T, E] and [N, E] are one layer
        lead = x.shape[n_layer_axes:-1]
        mask = jnp.ones(lead, jnp.float32)
    else:
        mask = jnp.asarray(mask)
        n_layer_axes = x.ndim - 1 - mask.ndim
        if n_layer_axes < 0:
            raise ValueError(f"mask {mask.shape} has more dims than router_logits {x.shape} minus the expert axis")
        mask = jnp.broadcast_to(mask, x.shape[n_layer_axes:-1])
    n_layers = 1
    for s in x.shape[:n_layer_axes]:
        n_layers *= s
    x = x.reshape(n_layers, -1, e)
    m = jnp.broadcast_to(mask.reshape(1, -1).astype(jnp.float32), x.shape[:2])
    return x, m


def lbl_stats(router_logits, top_k, mask=None):
    """Sufficient statistics of the LBL: (slot counts [L, E] (no gradient), prob sums [L, E], tokens N).

    router_logits [..., E]; `mask` (1 = real token) broadcastable to the leading dims it names. Axes of
    router_logits before those of the mask are layer axes (flattened); without a mask a 4-d [L, B, T, E] has
    one layer axis and a 2-d / 3-d input is one layer. top_k: an int (the top-k of the softmax), or a `Routed`
    (the routing the model ran; slots it leaves empty are not counted).
    """
    x_lne, m_ln = _layered(router_logits, mask)
    if isinstance(top_k, Routed):
        idx_lnk, probs = jax.vmap(top_k.route)(x_lne, jnp.arange(x_lne.shape[0], dtype=jnp.int32))
    else:
        probs = jax.nn.softmax(x_lne, axis=-1)
        _, idx_lnk = jax.lax.top_k(jax.lax.stop_gradient(probs), top_k)
    counts = jnp.sum(jax.nn.one_hot(idx_lnk, x_lne.shape[-1], dtype=jnp.float32) * m_ln[..., None, None], axis=(1, 2))
    prob_sums = jnp.sum(probs * m_ln[..., None], axis=1)
    n_tokens = jnp.sum(m_ln[0])
    return jax.lax.stop_gradient(counts), prob_sums, n_tokens


def lbl_from_stats(counts_le, prob_sums_le, n_tokens, top_k):
    """Mean over layers of N_E * sum_i f_i P_i with f = counts / (k N), P = prob_sums / N (k: top_k, an int or a
    `Routed`'s k per layer)."""
    n = jnp.maximum(n_tokens, 1.0)
    f = counts_le / (_k_of(top_k) * n)
    p = prob_sums_le / n
    return jnp.mean(counts_le.shape[-1] * jnp.sum(f * p, axis=-1))


def routed_top_k(model):
    """The `top_k` of the LBL of `model`'s router logits: the config's num_experts_per_tok, or under an intervention
    (model.runtime.routing) a `Routed`: its top-k per MoE layer and its choices (qwen3_jax.routing)."""
    cfg, iv = model.config, model.runtime.routing
    if iv is None or not iv.changes_routing:
        return cfg.num_experts_per_tok
    import numpy as np

    from qwen3_jax.routing.intervention import route_topk

    layers = np.asarray(cfg.moe_layers, np.int32)       # MoE layer index -> decoder layer

    def route(x_ne, moe_layer):
        _, experts, probs = route_topk(x_ne, jnp.asarray(layers)[moe_layer], cfg, iv)
        return experts, probs

    return Routed(tuple(iv.layer_top_k(int(i), cfg) for i in layers), route)


def load_balancing_loss(router_logits, top_k, mask=None):
    """Load-balancing loss over all the (unmasked) tokens given: N_E * sum_i f_i * P_i, mean over layers.

    router_logits: [L, B, T, E] (mean over the L MoE layers), [B, T, E] or [N, E] (one layer); with a mask,
    every axis before the mask's dims is a layer axis (e.g. logits [L, B, T, E] with mask [B, T]).
    mask: 1/True = real token, broadcastable to the token dims. A perfectly balanced router gives 1.
    top_k: an int, or a `Routed` (the routing a model ran under an intervention: `routed_top_k(model)`).
    """
    counts, prob_sums, n = lbl_stats(router_logits, top_k, mask)
    return lbl_from_stats(counts, prob_sums, n, top_k)


def router_z_loss_sum(router_logits, mask=None):
    """Sum over tokens (mean over layers) of logsumexp(router logits)^2 (ST-MoE); divide by the token count."""
    x_lne, m_ln = _layered(router_logits, mask)
    z = jax.nn.logsumexp(x_lne, axis=-1)
    return jnp.mean(jnp.sum(z * z * m_ln, axis=-1))


def expert_load(counts_le):
    """Per layer: fraction of routed slots of the busiest / idlest expert and the coefficient of variation."""
    frac = counts_le / jnp.maximum(jnp.sum(counts_le, axis=-1, keepdims=True), 1.0)
    mean = jnp.mean(frac, axis=-1)
    return {"max": jnp.max(frac, -1), "min": jnp.min(frac, -1), "cv": jnp.std(frac, -1) / jnp.maximum(mean, 1e-12)}


def cross_entropy_sum(unembed, h_btd, targets_bt, weights_bt, chunk: int = 512):
    """Sum over positions of weights * -log p(target), computing logits `unembed(h)` [B, c, V] one chunk of
    positions at a time (recomputed in the backward pass), so [B, T, V] fp32 logits never exist at once.
    T <= chunk (or T not a multiple of it): one plain chunk, no recomputation."""
    b, t, d = h_btd.shape
    c = chunk if (t > chunk and t % chunk == 0) else t
    n = t // c

    def one(h_bcd, y_bc, w_bc):
        logits = unembed(h_bcd).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, jnp.maximum(y_bc, 0)[..., None], axis=-1)[..., 0]
        return jnp.sum((lse - tgt) * w_bc)

    if n == 1:
        return one(h_btd, targets_bt, weights_bt)
    one = jax.checkpoint(one)
    split = lambda a: jnp.moveaxis(a.reshape(b, n, c, *a.shape[2:]), 1, 0)  # noqa: E731
    total, _ = jax.lax.scan(lambda acc, xs: (acc + one(*xs), None), jnp.float32(0),
                            (split(h_btd), split(targets_bt), split(weights_bt)))
    return total
