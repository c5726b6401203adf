"""Expert-parallel MoE: tokens travel to the experts by all-to-all, expert weights never move.

In `jax.shard_map` over the whole mesh, each device holds n tokens (the batch split over
('data', 'fsdp', 'expert'), padded to a multiple of the device count) and E/ep experts (ep = size of
'expert'; their width F split over 'tensor'). Per MoE layer, per device:

  1. route its n tokens locally (the model's `route`): M = n*k token copies (slots);
  2. group the slots by destination shard  dest = expert // (E/ep);
  3. all-to-all over 'expert':
       padded  fixed buffers [ep, C, D]: C = ceil(capacity_factor * n*k / ep) slots per (source, dest)
               pair, first choices before second choices, overflow dropped (counted); dropless = the
               worst case C = n * min(k, E/ep). Runs everywhere (XLA:CPU included).
       ragged  `jax.lax.ragged_all_to_all` of exactly the routed rows (GPU / TPU, dropless);
  4. the model's grouped matmul (`moe_experts`) over the received rows and the local experts;
  5. the reverse all-to-all, then combine: y[t] = sum_j w[t, j] * out[slot(t, j)];
  6. with F split over 'tensor', a psum over 'tensor' finishes the down projection.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from qwen3_jax.model import moe_experts, route

from .mesh import check_experts
from .rules import BATCH, fit_spec

DISPATCH = ("auto", "padded", "ragged", "ragged_emulated")


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
    """Slots per (source, destination) buffer. None = dropless: the worst case n * min(k, E/ep)."""
    worst = n_local * min(top_k, experts_per_shard)
    if capacity_factor is None:
        return worst
    return max(1, min(worst, math.ceil(capacity_factor * n_local * top_k / ep)))


def padded_slots(e_nk, valid_n, ep: int, e_loc: int, cap: int):
    """Slot m = j*n + t (choice-major) -> flat index dest*cap + pos in the send buffer, or ep*cap (none).

    Returns the slot index [M], kept [M] and the number of valid slots dropped for lack of room.
    """
    n, k = e_nk.shape
    e_m = e_nk.T.reshape(-1)
    valid_m = jnp.tile(valid_n, k)
    dest_m = jnp.where(valid_m, e_m // e_loc, ep)                       # ep = padding token, goes nowhere
    pos_m = _rank_in_group(dest_m, ep + 1)
    kept = valid_m & (pos_m < cap)
    slot_m = jnp.where(kept, dest_m * cap + pos_m, ep * cap)
    return slot_m, kept, jnp.sum(valid_m & ~kept).astype(jnp.int32)


# ============================================================================ dispatch variants
def _experts(x_rd, id_r, p_loc, e_loc, gmm_backend):
    """The model's grouped SwiGLU over received rows; ids >= e_loc are empty rows (output 0)."""
    ones = jnp.ones((x_rd.shape[0], 1), x_rd.dtype)
    return moe_experts(x_rd, ones, id_r[:, None], p_loc, num_experts=e_loc, gmm_backend=gmm_backend)


def _moe_padded(x_nd, w_nk, e_nk, valid_n, p_loc, *, ep, e_loc, cap, gmm_backend):
    n, k = e_nk.shape
    d = x_nd.shape[1]
    slot_m, _, dropped = padded_slots(e_nk, valid_n, ep, e_loc, cap)
    tok_m = jnp.tile(jnp.arange(n), k)
    send_x = jnp.zeros((ep * cap, d), x_nd.dtype).at[slot_m].set(x_nd[tok_m], mode="drop")
    send_id = jnp.full((ep * cap,), e_loc, jnp.int32).at[slot_m].set(e_nk.T.reshape(-1) % e_loc, mode="drop")
    a2a = functools.partial(jax.lax.all_to_all, axis_name="expert", split_axis=0, concat_axis=0, tiled=True)
    y_rd = _experts(a2a(send_x), a2a(send_id), p_loc, e_loc, gmm_backend)    # [ep*cap, D], source-major
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


def _moe_ragged(x_nd, w_nk, e_nk, valid_n, p_loc, *, ep, e_loc, gmm_backend, emulate=False):
    n, k = e_nk.shape
    d = x_nd.shape[1]
    n_exp = ep * e_loc
    ragged = _ragged_emulated if emulate else jax.lax.ragged_all_to_all
    e_m = jnp.where(valid_n[:, None], e_nk, n_exp).reshape(-1)          # token-major slots; pads -> E
    order = jnp.argsort(e_m, stable=True)                               # by expert = by (dest, local expert)
    counts_e = jnp.bincount(e_m, length=n_exp).astype(jnp.int32)        # [E] this shard's rows per expert
    all_counts = jax.lax.all_gather(counts_e, "expert").reshape(ep, ep, e_loc)  # [src, dst, local expert]
    sizes = all_counts.sum(-1)                                          # [src, dst] rows
    me = jax.lax.axis_index("expert")
    excl = lambda a, ax: jnp.cumsum(a, axis=ax) - a                     # noqa: E731  exclusive prefix sum
    send_sizes, recv_sizes = sizes[me], sizes[:, me]
    in_off = excl(send_sizes, 0)                                        # my chunk for dst, in my buffer
    out_off = excl(sizes, 0)[me]                                        # my chunk for dst, in dst's buffer
    recv_off = excl(recv_sizes, 0)
    back_off = excl(sizes, 1)[:, me]                                    # src's chunk for me, in src's buffer
    r = ep * n * min(k, e_loc)                                          # worst case rows received
    x_rd = ragged(x_nd[order // k], jnp.zeros((r, d), x_nd.dtype), in_off, send_sizes, out_off, recv_sizes,
                  axis_name="expert")
    # received rows: source-major, sorted by local expert within a source
    mine = all_counts[:, me]                                            # [src, local expert]
    id_r = jnp.repeat(jnp.tile(jnp.arange(e_loc, dtype=jnp.int32), ep), mine.reshape(-1), total_repeat_length=r)
    id_r = jnp.where(jnp.arange(r) < mine.sum(), id_r, e_loc)
    y_rd = _experts(x_rd, id_r, p_loc, e_loc, gmm_backend)
    y_md = ragged(y_rd, jnp.zeros((n * k, d), y_rd.dtype), recv_off, recv_sizes, back_off, send_sizes,
                  axis_name="expert")
    y_nkd = y_md[jnp.argsort(order)].reshape(n, k, d)
    return jnp.einsum("nkd,nk->nd", y_nkd, w_nk.astype(x_nd.dtype)), jnp.int32(0)


# ============================================================================ the layer
def _local_moe(x_nd, valid_n, p, *, cfg, ep, e_loc, cap, dispatch, tensor_split, token_axes, gmm_backend):
    logits_ne, w_nk, e_nk = route(x_nd, p["router"], cfg.num_experts_per_tok, cfg.norm_topk_prob)
    experts = {k: p[k] for k in ("gate_proj", "up_proj", "down_proj")}
    if ep == 1:
        y_nd = moe_experts(x_nd, w_nk, jnp.where(valid_n[:, None], e_nk, e_loc), experts,
                           num_experts=e_loc, gmm_backend=gmm_backend)
        dropped = jnp.int32(0)
    elif dispatch == "padded":
        y_nd, dropped = _moe_padded(x_nd, w_nk, e_nk, valid_n, experts, ep=ep, e_loc=e_loc, cap=cap,
                                    gmm_backend=gmm_backend)
    else:
        y_nd, dropped = _moe_ragged(x_nd, w_nk, e_nk, valid_n, experts, ep=ep, e_loc=e_loc,
                                    gmm_backend=gmm_backend, emulate=dispatch == "ragged_emulated")
    if tensor_split:
        y_nd = jax.lax.psum(y_nd, "tensor")
    if token_axes:
        dropped = jax.lax.psum(dropped, token_axes)
    return y_nd, logits_ne, dropped


def resolve_dispatch(dispatch: str, capacity_factor) -> str:
    if dispatch not in DISPATCH:
        raise ValueError(f"EP dispatch {dispatch!r}: choose from {DISPATCH}")
    if dispatch == "auto":
        ragged_ok = jax.default_backend() in ("gpu", "tpu", "cuda", "rocm")
        return "ragged" if capacity_factor is None and ragged_ok else "padded"
    if dispatch.startswith("ragged") and capacity_factor is not None:
        raise ValueError("EP dispatch 'ragged' is dropless: use capacity_factor=None, or dispatch='padded'")
    return dispatch


def token_layout(n: int, mesh):
    """(mesh axes splitting the tokens, padded token count, tokens per device)."""
    token_axes = tuple(a for a in BATCH if mesh.shape[a] > 1)
    shards = math.prod(mesh.shape[a] for a in token_axes)
    n_pad = -(-n // shards) * shards
    return token_axes, n_pad, n_pad // shards


def ep_moe(x_btd, p, cfg, mesh, *, capacity_factor: float | None = None, dispatch: str = "auto",
           gmm_backend: str = "auto"):
    """Expert-parallel MoE block (drop-in for `model.moe_block`). p: one layer's MoE params.

    Returns y [B, T, D], router logits [B, T, E] fp32 and the number of token copies dropped (int32,
    over the whole batch; 0 when dropless).
    """
    b, t, d = x_btd.shape
    n_exp, k = cfg.num_experts, cfg.num_experts_per_tok
    p = {name: p[name] for name in ("router", "gate_proj", "up_proj", "down_proj")}
    check_experts(n_exp, mesh.shape)
    ep = mesh.shape["expert"]
    e_loc = n_exp // ep
    dispatch = resolve_dispatch(dispatch, capacity_factor)
    token_axes, n_pad, n_loc = token_layout(b * t, mesh)
    cap = capacity(n_loc, k, ep, e_loc, capacity_factor)

    # compute layout of the weights: experts over 'expert', width over 'tensor' (fsdp shards gathered)
    up_spec = fit_spec((None, None, "tensor"), p["gate_proj"].shape, mesh.shape)
    tensor_split = up_spec[2] is not None
    ex = "expert" if ep > 1 else None
    specs = {"router": P(), "gate_proj": P(ex, None, up_spec[2]), "up_proj": P(ex, None, up_spec[2]),
             "down_proj": P(ex, up_spec[2], None)}
    tok = P(token_axes or None)
    x_nd = jnp.pad(x_btd.reshape(b * t, d), ((0, n_pad - b * t), (0, 0)))
    valid_n = jnp.arange(n_pad) < b * t
    fn = functools.partial(_local_moe, cfg=cfg, ep=ep, e_loc=e_loc, cap=cap, dispatch=dispatch,
                           tensor_split=tensor_split, token_axes=token_axes, gmm_backend=gmm_backend)
    # check_vma=False: the CPU grouped-matmul loops carry unvarying zeros into varying results (their
    # fori_loop carries are not vma-typed); collectives and their transposes are checked by the tests.
    y, logits, dropped = jax.shard_map(
        fn, mesh=mesh, in_specs=(P(token_axes or None, None), tok, specs),
        out_specs=(P(token_axes or None, None), P(token_axes or None, None), P()), check_vma=False,
    )(x_nd, valid_n, p)
    return y[: b * t].reshape(b, t, d), logits[: b * t].reshape(b, t, n_exp), dropped


def count_dropped(router_logits_lbte, cfg, mesh, capacity_factor):
    """Token copies the padded dispatch dropped per MoE layer [L_moe] int32, recomputed from the router
    logits the model returns (same routing, same per-device token layout, same capacity)."""
    n_layers, b, t, n_exp = router_logits_lbte.shape
    k, ep = cfg.num_experts_per_tok, mesh.shape["expert"]
    e_loc = n_exp // ep
    token_axes, n_pad, n_loc = token_layout(b * t, mesh)
    if ep == 1 or capacity_factor is None:
        return jnp.zeros((n_layers,), jnp.int32)
    cap = capacity(n_loc, k, ep, e_loc, capacity_factor)
    logits = jnp.pad(router_logits_lbte.reshape(n_layers, b * t, n_exp), ((0, 0), (0, n_pad - b * t), (0, 0)))
    valid_n = jnp.arange(n_pad) < b * t

    def local(logits_lne, valid):
        def one(lg):
            _, e_nk = jax.lax.top_k(jax.nn.softmax(lg, axis=-1), k)
            return padded_slots(e_nk, valid, ep, e_loc, cap)[2]
        dropped = jax.vmap(one)(logits_lne)
        return jax.lax.psum(dropped, token_axes) if token_axes else dropped

    return jax.shard_map(local, mesh=mesh, in_specs=(P(None, token_axes or None, None), P(token_axes or None)),
                         out_specs=P())(logits, valid_n)
