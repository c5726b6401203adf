"""The MoE block: one entry point, `moe_layer`, which the model calls for every MoE layer and where the choice
of computation happens (from the runtime's kernel choices, qwen3_jax.kernels):

  - on a mesh with devices: expert parallelism (`ep_moe`, below);
  - KV-cached inference on one CPU device with few token copies: the XLA:CPU FFI experts kernel, reading the
    chosen experts from the layer stack in place (qwen3_jax.kernels.cpu_decode);
  - few token copies on CPU: each copy's expert weights gathered (`moe_experts_gather`);
  - else: (token, slot) pairs sorted by expert and the platform's grouped SwiGLU (`moe_experts`).

Every path routes the same way (`router_choice`: the config's top-k, or the runtime's routing intervention) and
sends padding nowhere (`mask_padding`).

Expert parallelism: tokens travel to the experts by all-to-all, expert weights never move.

In `jax.shard_map` over the whole mesh, each device holds n tokens (the batch split over
('data', 'fsdp', 'expert'), padded to a multiple of the device count) and E/ep experts (ep = size of
'expert'; their width F split over 'tensor'). Per MoE layer, per device:

  1. route its n tokens locally (the model's `route`): M = n*k token copies (slots); padding routes nowhere;
  2. group the slots by destination shard  dest = expert // (E/ep);
  3. all-to-all over 'expert' (the dispatch is chosen by qwen3_jax.kernels from the platform):
       ragged  `jax.lax.ragged_all_to_all` of the routed rows (GPU / TPU) into a receive buffer of
               R = ep_buffer_factor x n*k rows (the mean a device receives, with slack; None: the worst case
               ep*n*min(k, E/ep)). Every device knows every device's row counts per (destination, choice rank,
               local expert) (one all_gather of [k, E] counts), so all agree which rows are sent. Training (a
               differentiable program) runs one round and keeps, per destination, at most R rows (`kept_rows`):
               whole choice ranks in order (every first choice, then second choices, ...), the rank that does
               not fit shared max-min fairly between the (source, local expert) pairs, each keeping its first
               rows in token order; the rest is dropped and counted. KV-cached inference repeats rounds until
               every row was sent (never drops; in a balanced batch one round).
       padded  fixed buffers [ep, C, D]: C = ceil(capacity_factor * n*k / ep) slots per (source, dest)
               pair, taken by choice rank (every first choice, then second choices, ...; in token order within a
               rank), overflow dropped (counted); dropless = the worst case C = n * min(k, E/ep). Runs everywhere
               (XLA:CPU, which has no ragged all-to-all; TPU slices with limited ICI routing, v5e over 16 chips,
               where a training step's C then follows ep_buffer_factor).
       ragged_emulated  the ragged algorithm with all_gather + scatter in place of ragged_all_to_all (CPU tests).
  4. the model's grouped matmul (`moe_experts`) over the received rows and the local experts;
  5. the reverse all-to-all, then combine: y[t] = sum_j w[t, j] * out[slot(t, j)];
  6. with F split over 'tensor', a psum over 'tensor' finishes the down projection.

Dropping is a training matter. A dropped choice contributes zero and the kept choices keep their router weights
(no renormalisation over the kept slots: GShard's and MaxText's semantics; a token whose every choice was dropped
passes through the layer on its residual). KV-cached inference never drops: the ragged dispatch sends in further
rounds, the padded one takes the worst case, whatever capacity_factor / ep_buffer_factor say.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from .config import Qwen3Config
from .kernels import cpu_decode
from .kernels.gmm import grouped_swiglu
from .partition import BATCH, check_experts, fit_spec


# ============================================================================ routing and the experts
def route_topk(logits_te, top_k, norm_topk_prob):
    """Router weights [T,k] and experts [T,k] from fp32 logits [T,E]."""
    return topk_weights(jax.nn.softmax(logits_te, axis=-1), top_k, norm_topk_prob)


def topk_weights(probs_te, top_k, norm_topk_prob):
    """The top-k of router probabilities [T,E]: weights [T,k] (renormalised over the k with norm_topk_prob), ids."""
    w_tk, e_tk = jax.lax.top_k(probs_te, top_k)
    if norm_topk_prob:
        w_tk = w_tk / jnp.sum(w_tk, axis=-1, keepdims=True)
    return w_tk, e_tk


def router_choice(logits_te, cfg: Qwen3Config, routing=None, layer=None):
    """The routing every MoE path runs: `route_topk` of the config, or under an intervention (runtime.routing, a
    qwen3_jax.routing.Intervention: top-k, disabled / forced experts, temperature) its routing of decoder layer
    `layer` (int or traced). Slots an intervention leaves empty name expert E (weight 0), as padding does."""
    if routing is None:
        return route_topk(logits_te, cfg.num_experts_per_tok, cfg.norm_topk_prob)
    return routing.route_topk(logits_te, layer, cfg)


def mask_padding(e_tk, valid_t, num_experts):
    """Padding tokens (valid_t False) route nowhere: expert id num_experts, which no grouped matmul computes
    (they take no expert capacity and their output is zero)."""
    if valid_t is None:
        return e_tk
    return jnp.where(valid_t[:, None], e_tk, num_experts)


def moe_experts(x_td, w_tk, e_tk, p, *, ks, num_experts=None, stacked=None):
    """Dropless expert computation: sort (token, slot) pairs by expert, grouped SwiGLU, unsort, combine.

    `e_tk` may name experts outside [0, num_experts) (padding, or expert-parallel rows that are not this shard's):
    those slots sort last, are not computed and contribute zero. ks: the kernel choices (qwen3_jax.kernels.Kernels:
    the grouped matmul, and whether it runs in its own platform's program).
    stacked: (the MoE parameters stacked over layers, layer index) of which p is one layer (impl "cpu" reads the
    experts' weights from the stack in place)."""
    t, d = x_td.shape
    k = e_tk.shape[1]
    n_exp = num_experts or p["gate_proj"].shape[0]
    dt = x_td.dtype
    flat_e = e_tk.reshape(-1)                                   # [M]
    order = jnp.argsort(flat_e, stable=True)                    # [M] sorted slot -> flat slot
    x_md = x_td[order // k]                                     # [M, D] token rows in expert order
    sizes_e = jnp.bincount(flat_e, length=n_exp).astype(jnp.int32)
    names = ("gate_proj", "up_proj", "down_proj")
    if stacked is not None:
        stacked = (tuple(stacked[0][n] for n in names), stacked[1])
    y_md = grouped_swiglu(x_md, *(p[n].astype(dt) for n in names), sizes_e, impl=ks.gmm,
                          interpret=ks.off_platform(ks.gmm), stacked=stacked if ks.gmm == "cpu" else None,
                          device=ks.device)   # [M, D], rows past the groups zero
    unsort = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))  # inverse perm.
    y_tkd = y_md[unsort].reshape(t, k, d)                       # back to (token, slot) order
    return jnp.einsum("tkd,tk->td", y_tkd, w_tk.astype(dt))


def moe_experts_gather(x_td, w_tk, e_tk, p):
    """Few-token (decode) experts: gather each (token, slot)'s expert weights [M, D, F] (M = T x k) and multiply
    directly -- no sort, no grouping, no padding. Reads T x k expert matrices, so it pays off while T x k <= E
    (a CPU heuristic, see qwen3_jax.kernels). Slots naming no expert (>= E: padding) contribute zero.

    Each row is its own batch entry ([M, 1, D] @ [M, D, F]: batch dims leading, contraction on the weights' major
    dim), which XLA:CPU runs as one batched matmul over the gathered weights; an einsum over [T, k, D, F] with D
    in the middle makes XLA:CPU transpose every gathered matrix first.
    The routing weights scale h before the down projection, so the k slots of a token sum inside one matmul
    ([T, 1, k*F] @ [T, k*F, D])."""
    t, d = x_td.shape
    k = e_tk.shape[1]
    n_exp = p["gate_proj"].shape[0]
    dt = x_td.dtype
    w_tk = jnp.where(e_tk < n_exp, w_tk, 0)
    e_m = jnp.minimum(e_tk.reshape(-1), n_exp - 1)                # [M]
    x_m1d = jnp.repeat(x_td, k, axis=0)[:, None, :]              # [M, 1, D]
    g_mdf = p["gate_proj"][e_m].astype(dt)
    u_mdf = p["up_proj"][e_m].astype(dt)
    d_mfd = p["down_proj"][e_m].astype(dt)
    h_m1f = jax.nn.silu(jnp.matmul(x_m1d, g_mdf)) * jnp.matmul(x_m1d, u_mdf)
    h_m1f = h_m1f * w_tk.reshape(-1, 1, 1).astype(dt)             # routing weight of each row
    f = h_m1f.shape[-1]
    y_t1d = jnp.matmul(h_m1f.reshape(t, 1, k * f), d_mfd.reshape(t, k * f, d))
    return y_t1d[:, 0]


def moe_block(x_btd, p, cfg: Qwen3Config, ks, valid_bt=None, stacked=None, routing=None, layer=None):
    """Qwen3-MoE sparse block on one device. Returns output [B,T,D] and router logits [B,T,E] (fp32).

    ks: the kernel choices (qwen3_jax.kernels.Kernels, e.g. `Runtime().kernels`). Few token copies
    (B*T*top_k <= ks.gather_rows: a CPU heuristic, KV-cached decode) take the gather path, the rest the sorted
    grouped matmul. valid_bt: False for padding tokens, which take no expert. stacked: see moe_experts.
    routing, layer: an intervention and the decoder layer (router_choice)."""
    b, t, d = x_btd.shape
    x_td = x_btd.reshape(b * t, d)
    logits = jnp.dot(x_td.astype(jnp.float32), p["router"].astype(jnp.float32))
    w_tk, e_tk = router_choice(logits, cfg, routing, layer)
    e_tk = mask_padding(e_tk, None if valid_bt is None else valid_bt.reshape(-1), cfg.num_experts)
    if b * t * e_tk.shape[1] <= ks.gather_rows(cfg.num_experts, stacked is not None):
        y = moe_experts_gather(x_td, w_tk, e_tk, p)
    else:
        y = moe_experts(x_td, w_tk, e_tk, p, ks=ks, stacked=stacked)
    return y.reshape(b, t, d), logits.reshape(b, t, -1)


# ============================================================================ the entry point
def moe_layer(x_btd, p, cfg: Qwen3Config, runtime, *, layer, valid_bt=None, stacked=None, mesh=None,
              inference: bool = False, in_place: bool = False):
    """One MoE layer: y [B, T, D], router logits [B, T, E] fp32 and the token copies dropped (int32).

    p: the layer's MoE params; layer: the decoder layer (an int or traced: the routing intervention's layer and
    the stack index); valid_bt: real tokens (None: all); stacked: the MoE params stacked over layers, of which p
    is layer `layer` (CPU kernels read it in place); mesh: the mesh to run expert-parallel on (None: this device);
    inference: KV-cached (never drops); in_place: the XLA:CPU decode kernels serve this call."""
    ks, routing = runtime.kernels, runtime.routing
    if mesh is not None:
        return ep_moe(x_btd, valid_bt, p, cfg, runtime, inference=inference, layer=layer)
    b, t, d = x_btd.shape
    copies = b * t * cfg.num_experts_per_tok
    if in_place and stacked is not None and copies <= ks.in_place_moe_rows(cfg.num_experts):
        x_td = x_btd.reshape(b * t, d)
        logits = cpu_decode.stacked_proj(x_td.astype(jnp.float32), stacked["router"], layer)
        w_tk, e_tk = router_choice(logits, cfg, routing, layer)
        e_tk = mask_padding(e_tk, None if valid_bt is None else valid_bt.reshape(-1), cfg.num_experts)
        y = cpu_decode.moe_experts_kernel(x_td, w_tk, e_tk, (stacked, layer))
        return y.reshape(b, t, d), logits.reshape(b, t, -1), jnp.int32(0)
    y, logits = moe_block(x_btd, p, cfg, ks, valid_bt, None if stacked is None else (stacked, layer), routing, layer)
    return y, logits, jnp.int32(0)


# ============================================================================ slot bookkeeping
def _rank_in_group(group_m, num_groups):
    """Position of each element among those of its group, in index order (stable)."""
    m = group_m.shape[0]
    order = jnp.argsort(group_m, stable=True)
    counts = jnp.bincount(group_m, length=num_groups)
    starts = jnp.cumsum(counts) - counts
    rank_sorted = jnp.arange(m, dtype=jnp.int32) - starts[group_m[order]]
    return jnp.zeros((m,), jnp.int32).at[order].set(rank_sorted.astype(jnp.int32))


def capacity(n_local: int, top_k: int, ep: int, experts_per_shard: int, capacity_factor: float | None) -> int:
    """Slots per (source, destination) buffer of the padded dispatch. None = dropless: the worst case
    n * min(k, E/ep)."""
    worst = n_local * min(top_k, experts_per_shard)
    if capacity_factor is None:
        return worst
    return max(1, min(worst, math.ceil(capacity_factor * n_local * top_k / ep)))


def receive_rows(n_local: int, top_k: int, ep: int, experts_per_shard: int, buffer_factor: float | None) -> int:
    """Rows of the ragged dispatch's receive buffer: buffer_factor x the mean n*k (a multiple of 8), at most the
    worst case ep * n * min(k, E/ep) (None: the worst case)."""
    worst = ep * n_local * min(top_k, experts_per_shard)
    if buffer_factor is None:
        return worst
    return min(worst, -(-math.ceil(buffer_factor * n_local * top_k) // 8) * 8)


def padded_slots(e_nk, valid_n, ep: int, e_loc: int, cap: int):
    """Slot m = j*n + t (choice-major) -> flat index dest*cap + pos in the send buffer, or ep*cap (none).

    Returns the slot index [M], kept [M] and the number of valid slots dropped for lack of room.
    """
    n, k = e_nk.shape
    e_m = e_nk.T.reshape(-1)
    valid_m = jnp.tile(valid_n, k) & (e_m < ep * e_loc)                # slots an intervention left empty: none
    dest_m = jnp.where(valid_m, e_m // e_loc, ep)                       # ep = padding token, goes nowhere
    pos_m = _rank_in_group(dest_m, ep + 1)
    kept = valid_m & (pos_m < cap)
    slot_m = jnp.where(kept, dest_m * cap + pos_m, ep * cap)
    return slot_m, kept, jnp.sum(valid_m & ~kept).astype(jnp.int32)


# ============================================================================ dispatch variants
def _experts(x_rd, id_r, p_loc, e_loc, ks):
    """The model's grouped SwiGLU over received rows; ids >= e_loc are empty rows (output 0)."""
    ones = jnp.ones((x_rd.shape[0], 1), x_rd.dtype)
    return moe_experts(x_rd, ones, id_r[:, None], p_loc, num_experts=e_loc, ks=ks)


def _moe_padded(x_nd, w_nk, e_nk, valid_n, p_loc, *, ep, e_loc, cap, ks):
    n, k = e_nk.shape
    d = x_nd.shape[1]
    slot_m, _, dropped = padded_slots(e_nk, valid_n, ep, e_loc, cap)
    tok_m = jnp.tile(jnp.arange(n), k)
    send_x = jnp.zeros((ep * cap, d), x_nd.dtype).at[slot_m].set(x_nd[tok_m], mode="drop")
    send_id = jnp.full((ep * cap,), e_loc, jnp.int32).at[slot_m].set(e_nk.T.reshape(-1) % e_loc, mode="drop")
    a2a = functools.partial(jax.lax.all_to_all, axis_name="expert", split_axis=0, concat_axis=0, tiled=True)
    y_rd = _experts(a2a(send_x), a2a(send_id), p_loc, e_loc, ks)            # [ep*cap, D], source-major
    y_md = jnp.take(a2a(y_rd), slot_m, axis=0, mode="fill", fill_value=0)    # back in slot order
    y_nd = jnp.einsum("knd,nk->nd", y_md.reshape(k, n, d), w_nk.astype(x_nd.dtype))
    return y_nd, dropped


def _ragged_emulated(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
    """`ragged_all_to_all` semantics from all_gather + scatter (compiles on CPU; for testing the ragged path)."""
    me = jax.lax.axis_index(axis_name)
    ops, ins, sends, outs = (jax.lax.all_gather(a, axis_name) for a in (operand, input_offsets, send_sizes, output_offsets))
    rows = jnp.arange(operand.shape[0])
    for src in range(ops.shape[0]):
        start, size, at = ins[src, me], sends[src, me], outs[src, me]
        dst = jnp.where((rows >= start) & (rows < start + size), at + rows - start, output.shape[0])
        output = output.at[dst].set(ops[src], mode="drop")
    return output


def _excl(a, axis):
    """Exclusive prefix sum."""
    return jnp.cumsum(a, axis=axis) - a


def round_allocation(remaining, r: int):
    """Rows each (source, destination) pair sends in one round [src, dst]: every destination takes up to r rows,
    from source 0 upward (every device computes the same from the all-gathered counts)."""
    return jnp.clip(r - _excl(remaining, 0), 0, remaining)


def kept_rows(counts_sdje, r: int):
    """The rows a one-round ragged dispatch keeps when every destination receives at most r of them.

    counts_sdje [src, dst, k, e_loc]: the rows each source routes to each destination's local experts, by choice
    rank j (a token's first choice is rank 0). Every destination keeps whole ranks in order (all first choices,
    then all second choices, ...); the rank that does not fit is shared max-min fairly between the (source, local
    expert) pairs that hold it: each keeps min(its rows, a common level), the few rows left over going one each to
    the pairs above the level (in an order that starts at the destination's own source). So no source and no
    expert is always the one cut, and a pair's kept rows are its first ones (in token order). Every device
    computes the same table from the all-gathered counts. Returns the kept rows [src, dst, k, e_loc]."""
    ep_s, ep_d, k, e_loc = counts_sdje.shape
    n_pairs = ep_s * e_loc
    c = jnp.transpose(counts_sdje, (1, 2, 0, 3)).reshape(ep_d, k, n_pairs)   # [dst, j, pair = (src, local expert)]
    tot = jnp.sum(c, -1)                                                                      # [dst, j]
    budget = jnp.clip(r - _excl(tot, 1), 0, tot)                                              # rows of rank j kept
    # the level: the largest L with sum(min(c, L)) <= budget, by binary search in [0, min(max c, r)] (L <= budget)
    def search(_, lo_hi):
        lo, hi = lo_hi
        mid = (lo + hi + 1) // 2
        fits = jnp.sum(jnp.minimum(c, mid[..., None]), -1) <= budget
        return jnp.where(fits, mid, lo), jnp.where(fits, hi, mid - 1)

    hi = jnp.minimum(jnp.max(c, -1), r)
    level, _ = jax.lax.fori_loop(0, max(int(r), 1).bit_length() + 1, search, (jnp.zeros_like(hi), hi))
    kept = jnp.minimum(c, level[..., None])
    # one more row each for `left` of the pairs above the level, counted from the destination's own source
    left = budget - jnp.sum(kept, -1)
    shift = (jnp.arange(ep_d) * e_loc)[:, None, None]
    rot = (jnp.arange(n_pairs)[None, None, :] + shift) % n_pairs                              # rotated -> pair
    above = jnp.take_along_axis(c > level[..., None], jnp.broadcast_to(rot, c.shape), -1)
    extra = above & (jnp.cumsum(above, -1) <= left[..., None])
    unrot = (jnp.arange(n_pairs)[None, None, :] - shift) % n_pairs                            # pair -> rotated
    kept = kept + jnp.take_along_axis(extra, jnp.broadcast_to(unrot, c.shape), -1)
    return jnp.transpose(kept.reshape(ep_d, k, ep_s, e_loc), (2, 0, 1, 3))                    # [src, dst, j, e]


def _moe_ragged(x_nd, w_nk, e_nk, valid_n, p_loc, *, ep, e_loc, r, rounds, ks, emulate=False):
    """rounds: 1 (one round: the rows of `kept_rows`, the rest dropped) or None (rounds until all rows were sent)."""
    n, k = e_nk.shape
    d = x_nd.shape[1]
    n_exp = ep * e_loc
    a2a = functools.partial(_ragged_emulated if emulate else jax.lax.ragged_all_to_all, axis_name="expert")
    # slots choice-major (m = j*n + t); the group of a slot is (destination, rank j, local expert), none for
    # padding and the slots an intervention leaves empty
    e_m = mask_padding(e_nk, valid_n, n_exp).T.reshape(-1)
    none = ep * k * e_loc
    j_m = jnp.repeat(jnp.arange(k, dtype=jnp.int32), n)
    g_m = jnp.where(e_m < n_exp, (e_m // e_loc) * (k * e_loc) + j_m * e_loc + e_m % e_loc, none)
    counts = jnp.bincount(g_m, length=none).astype(jnp.int32)                      # [dst * k * e_loc]
    all_counts = jax.lax.all_gather(counts, "expert").reshape(ep, ep, k, e_loc)    # [src, dst, j, local expert]
    kept = all_counts if rounds is None else kept_rows(all_counts, r)
    me = jax.lax.axis_index("expert")
    # send order: the kept rows by group (= by destination), each group's first rows in token order; the rest last
    keep_m = (g_m < none) & (_rank_in_group(g_m, none + 1) < kept[me].reshape(-1)[jnp.minimum(g_m, none - 1)])
    order = jnp.argsort(jnp.where(keep_m, g_m, none), stable=True)
    x_md = x_nd[order % n]                                                         # my rows in send order
    sizes = jnp.sum(kept, (-2, -1))                                                # [src, dst] rows
    starts = _excl(sizes, 1)                                                       # chunk (src, dst) in src's order
    cum_g = jnp.cumsum(kept.reshape(ep, ep, k * e_loc), -1)                        # group ends in chunk (src, dst)
    rows_r = jnp.arange(r, dtype=jnp.int32)

    def one_round(sent, y_md):
        alloc = round_allocation(sizes - sent, r)                       # [src, dst]
        recv_off = _excl(alloc, 0)                                      # chunk (src, dst) in dst's buffer
        x_rd = a2a(x_md, jnp.zeros((r, d), x_md.dtype), starts[me] + sent[me], alloc[me], recv_off[me],
                   alloc[:, me])
        # local expert of each received row: the buffer holds each source's rows grouped by (rank, local
        # expert), so the groups' ends in this round's buffer, in order, place every row
        ends = recv_off[:, me, None] + jnp.clip(cum_g[:, me] - sent[:, me, None], 0, alloc[:, me, None])
        group_r = jnp.searchsorted(ends.reshape(-1), rows_r, side="right")        # source * k * e_loc + group
        id_r = jnp.where(rows_r < alloc[:, me].sum(), group_r % e_loc, e_loc).astype(jnp.int32)
        y_rd = _experts(x_rd, id_r, p_loc, e_loc, ks)
        y_md = a2a(y_rd, y_md, recv_off[:, me], alloc[:, me], starts[:, me] + sent[:, me], alloc[me])
        return sent + alloc, y_md

    sent0 = jnp.zeros((ep, ep), jnp.int32)
    y0 = jnp.zeros((n * k, d), x_nd.dtype)
    if rounds == 1:  # the kept rows fit the receive buffers: one round sends them all
        sent, y_md = one_round(sent0, y0)
    else:
        sent, y_md = jax.lax.while_loop(lambda c: jnp.any(c[0] < sizes), lambda c: one_round(*c), (sent0, y0))
    dropped = (jnp.sum(g_m < none) - jnp.sum(sent[me])).astype(jnp.int32)  # my routed rows that were never sent
    unsort = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    y_knd = y_md[unsort].reshape(k, n, d)                                  # dropped slots: 0, no renormalisation
    return jnp.einsum("knd,nk->nd", y_knd, w_nk.astype(x_nd.dtype)), dropped


# ============================================================================ the layer
def _local_moe(x_nd, valid_n, p, layer, *, cfg, routing, ep, e_loc, cap, r, rounds, ks, tensor_split, token_axes):
    logits_ne = jnp.dot(x_nd.astype(jnp.float32), p["router"].astype(jnp.float32))
    w_nk, e_nk = router_choice(logits_ne, cfg, routing, layer)
    experts = {k: p[k] for k in ("gate_proj", "up_proj", "down_proj")}
    if ep == 1:
        y_nd = moe_experts(x_nd, w_nk, mask_padding(e_nk, valid_n, e_loc), experts, num_experts=e_loc, ks=ks)
        dropped = jnp.int32(0)
    elif ks.ep_dispatch == "padded":
        y_nd, dropped = _moe_padded(x_nd, w_nk, e_nk, valid_n, experts, ep=ep, e_loc=e_loc, cap=cap, ks=ks)
    else:
        y_nd, dropped = _moe_ragged(x_nd, w_nk, e_nk, valid_n, experts, ep=ep, e_loc=e_loc, r=r, rounds=rounds,
                                    ks=ks, emulate=ks.ep_dispatch == "ragged_emulated")
    if tensor_split:
        y_nd = jax.lax.psum(y_nd, "tensor")
    if token_axes:
        dropped = jax.lax.psum(dropped, token_axes)
    return y_nd, logits_ne, dropped


def token_layout(n: int, mesh):
    """(mesh axes splitting the tokens, padded token count, tokens per device)."""
    token_axes = tuple(a for a in BATCH if mesh.shape[a] > 1)
    shards = math.prod(mesh.shape[a] for a in token_axes)
    n_pad = -(-n // shards) * shards
    return token_axes, n_pad, n_pad // shards


def ep_moe(x_btd, valid_bt, p, cfg, runtime, *, inference: bool = False, layer=None):
    """Expert-parallel MoE block on runtime.mesh. p: one layer's MoE params; valid_bt: real tokens (None: all).
    inference: KV-cached decoding / prefill, which never drops: the ragged dispatch sends overflow in further rounds
    (a while loop: not differentiable), the padded one takes the worst-case capacity (runtime.capacity_factor is
    a training option). layer: the decoder layer, for runtime.routing (an intervention: its top-k sets the slots
    per token; slots it leaves empty are sent nowhere and never counted as dropped).

    Returns y [B, T, D], router logits [B, T, E] fp32 and the number of (real) token copies dropped (int32, over
    the whole batch; 0 when nothing overflowed).
    """
    mesh, ks = runtime.mesh, runtime.kernels
    b, t, d = x_btd.shape
    n_exp, k = cfg.num_experts, cfg.num_experts_per_tok
    if runtime.routing is not None:
        k = runtime.routing.max_top_k(cfg)
    p = {name: p[name] for name in ("router", "gate_proj", "up_proj", "down_proj")}
    check_experts(n_exp, mesh.shape)
    ep = mesh.shape["expert"]
    e_loc = n_exp // ep
    token_axes, n_pad, n_loc = token_layout(b * t, mesh)
    # a capacity is a training option: KV-cached inference takes the worst case (never drops)
    cf = None if inference else runtime.capacity_factor
    if cf is None and not inference:
        cf = ks.padded_capacity           # where the padded dispatch stands in for the ragged one
    cap = capacity(n_loc, k, ep, e_loc, cf)
    r = receive_rows(n_loc, k, ep, e_loc, runtime.ep_buffer_factor)

    # compute layout of the weights: experts over 'expert', width over 'tensor' (fsdp shards gathered)
    up_spec = fit_spec((None, None, "tensor"), p["gate_proj"].shape, mesh.shape)
    tensor_split = up_spec[2] is not None
    ex = "expert" if ep > 1 else None
    specs = {"router": P(), "gate_proj": P(ex, None, up_spec[2]), "up_proj": P(ex, None, up_spec[2]),
             "down_proj": P(ex, up_spec[2], None)}
    tok = P(token_axes or None)
    x_nd = jnp.pad(x_btd.reshape(b * t, d), ((0, n_pad - b * t), (0, 0)))
    valid_n = jnp.arange(n_pad) < b * t
    if valid_bt is not None:
        valid_n = valid_n & jnp.pad(valid_bt.reshape(-1), (0, n_pad - b * t))
    fn = functools.partial(_local_moe, cfg=cfg, routing=runtime.routing, ep=ep, e_loc=e_loc, cap=cap, r=r,
                           rounds=None if inference else 1, ks=ks, tensor_split=tensor_split, token_axes=token_axes)
    # check_vma=False: the CPU grouped-matmul loops and the Pallas kernels carry unvarying values into varying
    # results; collectives and their transposes are checked by the tests.
    y, logits, dropped = jax.shard_map(
        fn, mesh=mesh, in_specs=(P(token_axes or None, None), tok, specs, P()),
        out_specs=(P(token_axes or None, None), P(token_axes or None, None), P()), check_vma=False,
    )(x_nd, valid_n, p, jnp.asarray(0 if layer is None else layer, jnp.int32))
    return y[: b * t].reshape(b, t, d), logits[: b * t].reshape(b, t, n_exp), dropped
