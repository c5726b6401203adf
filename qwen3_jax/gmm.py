"""Grouped matrix multiplication for dropless MoE: rows of `lhs` sorted by group, group g times `rhs[g]`.

    gmm(lhs [M, K], rhs [G, K, N], group_sizes [G]) -> [M, N]
    out[r] = lhs[r] @ rhs[g(r)]  for rows r of group g; rows past sum(group_sizes) are zero.

Backends (one interface, the cost follows the rows actually routed, never G x M):
- "blocked":   XLA:CPU. A `while_loop` over (row tile, group) visits in the style of megablox: each visit
               multiplies one tile of rows by its group's weights and keeps the rows of that group. The trip
               count is dynamic (tiles + non-empty groups - 1), so empty experts cost nothing. Custom VJP with
               the same loop for d(lhs) and a transposed loop (tgmm) for d(rhs).
- "gather":    few rows (decode): gather each row's weight matrix, cost = M x K x N.
- "ragged_dot": `jax.lax.ragged_dot`, a grouped kernel on GPU/TPU (XLA:CPU expands it densely over G).
- "megablox":  the Pallas TPU kernel MaxText uses (`interpret=True` off TPU, slow; for testing).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

BACKENDS = ("auto", "blocked", "gather", "ragged_dot", "megablox")


def default_backend() -> str:
    platform = jax.default_backend()
    return "blocked" if platform == "cpu" else "ragged_dot"


def gmm(lhs_mk, rhs_gkn, group_sizes_g, *, backend: str = "auto", tile: int | None = None,
        preferred_element_type=None):
    """Grouped matmul; see the module docstring. Output dtype = lhs dtype unless preferred_element_type."""
    m, _ = lhs_mk.shape
    g = rhs_gkn.shape[0]
    out_dtype = preferred_element_type or lhs_mk.dtype
    group_sizes_g = group_sizes_g.astype(jnp.int32)
    if backend == "auto":
        backend = default_backend()
        if backend == "blocked" and m <= 64:
            backend = "gather"
    if backend == "gather":
        return _gmm_gather(lhs_mk, rhs_gkn, group_sizes_g).astype(out_dtype)
    if backend == "ragged_dot":
        return jax.lax.ragged_dot(lhs_mk, rhs_gkn, group_sizes_g, preferred_element_type=out_dtype)
    if backend == "megablox":
        from jax.experimental.pallas.ops.tpu.megablox import gmm as mb_gmm

        interpret = jax.default_backend() != "tpu"
        tm = min(128, _pow2_at_least(m))
        m_pad = m + (-m) % tm
        # megablox leaves rows past the groups unwritten: give them to the last group as zero rows.
        valid = jnp.arange(m_pad) < jnp.sum(group_sizes_g)
        lhs_p = jnp.where(valid[:, None], jnp.pad(lhs_mk, ((0, m_pad - m), (0, 0))), 0)
        sizes = group_sizes_g.at[-1].add(m_pad - jnp.sum(group_sizes_g))
        out = mb_gmm(lhs_p, rhs_gkn, sizes, preferred_element_type=out_dtype,
                     tiling=(tm, min(128, rhs_gkn.shape[1]), min(128, rhs_gkn.shape[2])), interpret=interpret)
        return out[:m]
    if backend != "blocked":
        raise ValueError(f"gmm: unknown backend {backend!r}; choose from {BACKENDS}")
    tile = tile or default_tile(m, g)
    return _gmm_blocked(lhs_mk, rhs_gkn, group_sizes_g, tile, False).astype(out_dtype)


def default_tile(m: int, g: int) -> int:
    """Row tile for the blocked backend: large tiles, but a group's ragged edge (< 1 tile per group)
    should stay a small fraction of the work: tile ~ M / (4 G), clipped to [8, 128]."""
    t = _pow2_at_most(max(m // (4 * g), 1))
    return int(min(128, max(8, t)))


def _pow2_at_most(x: int) -> int:
    return 1 << (max(int(x), 1).bit_length() - 1)


def _pow2_at_least(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


# --------------------------------------------------------------------------------------- gather
def _row_groups(group_sizes_g, m, g):
    """[M] group of each row; rows past sum(group_sizes) get group G (masked)."""
    ends = jnp.cumsum(group_sizes_g)
    rows = jnp.arange(m, dtype=jnp.int32)
    return jnp.searchsorted(ends, rows, side="right").astype(jnp.int32)


def _gmm_gather(lhs_mk, rhs_gkn, group_sizes_g):
    m = lhs_mk.shape[0]
    g = rhs_gkn.shape[0]
    row_g = _row_groups(group_sizes_g, m, g)
    w_mkn = rhs_gkn[jnp.minimum(row_g, g - 1)]
    out = jnp.einsum("mk,mkn->mn", lhs_mk, w_mkn, preferred_element_type=jnp.float32)
    return jnp.where((row_g < g)[:, None], out, 0.0)


# --------------------------------------------------------------------------------------- blocked
def _schedule(group_sizes_g, m, tile):
    """Visits (tile t, group g) in tile order: every tile that holds rows of group g, for each g.

    Returns visit_group [V], visit_tile [V], num_visits (dynamic), group starts/ends [G]; V is the static
    bound tiles + min(G, M) - 1.
    """
    g = group_sizes_g.shape[0]
    num_tiles = -(-m // tile)
    ends = jnp.cumsum(group_sizes_g)
    starts = ends - group_sizes_g
    first = starts // tile
    last = (ends - 1) // tile
    tiles_per_group = jnp.where(group_sizes_g > 0, last - first + 1, 0)
    max_visits = num_tiles + min(g, m) - 1
    visit_group = jnp.repeat(jnp.arange(g, dtype=jnp.int32), tiles_per_group, total_repeat_length=max_visits)
    first_visit = jnp.cumsum(tiles_per_group) - tiles_per_group
    visit_tile = first[visit_group] + jnp.arange(max_visits, dtype=jnp.int32) - first_visit[visit_group]
    visit_tile = jnp.clip(visit_tile, 0, num_tiles - 1)
    return visit_group, visit_tile, jnp.sum(tiles_per_group), starts, ends


def _pad_rows(x, tile):
    pad = (-x.shape[0]) % tile
    return jnp.pad(x, ((0, pad), (0, 0))) if pad else x


def _visit_rows(v, sched, tile):
    visit_group, visit_tile, _, starts, ends = sched
    grp, t = visit_group[v], visit_tile[v]
    rows = t * tile + jnp.arange(tile, dtype=jnp.int32)
    keep = (rows >= starts[grp]) & (rows < ends[grp])
    return grp, t * tile, keep


def _blocked_fwd_loop(lhs_mk, rhs_gkn, group_sizes_g, tile, transpose_rhs):
    """out[rows of g] = lhs[rows] @ rhs[g] (or rhs[g].T); fp32 result."""
    m = lhs_mk.shape[0]
    n = rhs_gkn.shape[1] if transpose_rhs else rhs_gkn.shape[2]
    sched = _schedule(group_sizes_g, m, tile)
    lhs_p = _pad_rows(lhs_mk, tile)
    out0 = jnp.zeros((lhs_p.shape[0], n), jnp.float32)

    def body(v, out):
        grp, r0, keep = _visit_rows(v, sched, tile)
        x_tk = jax.lax.dynamic_slice_in_dim(lhs_p, r0, tile)
        w = rhs_gkn[grp]
        dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
        y_tn = jax.lax.dot_general(x_tk, w, dims, preferred_element_type=jnp.float32)
        cur = jax.lax.dynamic_slice_in_dim(out, r0, tile)
        return jax.lax.dynamic_update_slice_in_dim(out, cur + jnp.where(keep[:, None], y_tn, 0.0), r0, 0)

    out = jax.lax.fori_loop(0, sched[2], body, out0)
    return out[:m]


def _blocked_tgmm_loop(lhs_mk, dy_mn, group_sizes_g, num_groups, tile):
    """d_rhs[g] = lhs[rows of g].T @ dy[rows of g]  -> [G, K, N] fp32."""
    m, k = lhs_mk.shape
    n = dy_mn.shape[1]
    sched = _schedule(group_sizes_g, m, tile)
    lhs_p = _pad_rows(lhs_mk, tile)
    dy_p = _pad_rows(dy_mn, tile)
    acc0 = jnp.zeros((num_groups, k, n), jnp.float32)

    def body(v, acc):
        grp, r0, keep = _visit_rows(v, sched, tile)
        x_tk = jnp.where(keep[:, None], jax.lax.dynamic_slice_in_dim(lhs_p, r0, tile), 0)
        dy_tn = jax.lax.dynamic_slice_in_dim(dy_p, r0, tile)
        upd = jax.lax.dot_general(x_tk, dy_tn, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return acc.at[grp].add(upd)

    return jax.lax.fori_loop(0, sched[2], body, acc0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm_blocked(lhs_mk, rhs_gkn, group_sizes_g, tile, transpose_rhs):
    return _blocked_fwd_loop(lhs_mk, rhs_gkn, group_sizes_g, tile, transpose_rhs)


def _gmm_blocked_fwd(lhs_mk, rhs_gkn, group_sizes_g, tile, transpose_rhs):
    out = _blocked_fwd_loop(lhs_mk, rhs_gkn, group_sizes_g, tile, transpose_rhs)
    return out, (lhs_mk, rhs_gkn, group_sizes_g)


def _gmm_blocked_bwd(tile, transpose_rhs, res, dout_mn):
    lhs_mk, rhs_gkn, group_sizes_g = res
    g = rhs_gkn.shape[0]
    dout = dout_mn.astype(lhs_mk.dtype)
    # y = x @ W  =>  dx = dy @ W.T, dW = x.T @ dy ;  y = x @ W.T  =>  dx = dy @ W, dW = dy.T @ x
    dlhs = _blocked_fwd_loop(dout, rhs_gkn, group_sizes_g, tile, not transpose_rhs)
    if transpose_rhs:
        drhs = _blocked_tgmm_loop(dout, lhs_mk, group_sizes_g, g, tile)
    else:
        drhs = _blocked_tgmm_loop(lhs_mk, dout, group_sizes_g, g, tile)
    return dlhs.astype(lhs_mk.dtype), drhs.astype(rhs_gkn.dtype), None


_gmm_blocked.defvjp(_gmm_blocked_fwd, _gmm_blocked_bwd)
