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


# --------------------------------------------------------------------------------------- fused SwiGLU
def grouped_swiglu(x_md, w_gate_edf, w_up_edf, w_down_efd, group_sizes_e, *, backend: str = "auto",
                   tile: int | None = None, stacked=None):
    """Experts' SwiGLU on rows sorted by expert: down(silu(x @ gate) * (x @ up)) per group -> [M, D].

    On CPU ("blocked") one loop per expert visits its row tiles and does all three matmuls there (one loop instead
    of three), with a custom VJP: the forward keeps the gate|up pre-activations [M, 2F] (fp32) so the backward does
    four matmuls per tile instead of five (recomputing them cost ~10% of forward + backward).
    Other backends compose three `gmm` calls.

    stacked: optional ((gate [L,E,D,F], up, down [L,E,F,D]), l) of which the w_* are layer l (a layer scan's
    slices). The CPU kernel then reads each expert's weights straight from the stack, forward and backward, so
    the scan's per-layer copies of all experts' weights are dead code; the gradients go to the w_*.
    """
    m = x_md.shape[0]
    if backend == "auto":
        backend = default_backend()
        # few rows: gather each row's weights -- unless the kernel can read the layer stack, which copies each
        # distinct expert once (a gather copies one per row)
        if backend == "blocked" and m <= 64 and stacked is None:
            backend = "gather"
    if backend != "blocked":
        kw = dict(backend=backend, tile=tile)
        h = jax.nn.silu(gmm(x_md, w_gate_edf, group_sizes_e, **kw)) * gmm(x_md, w_up_edf, group_sizes_e, **kw)
        return gmm(h, w_down_efd, group_sizes_e, **kw)
    tile = tile or swiglu_tile(m, w_gate_edf.shape[0])
    ws, sizes = (w_gate_edf, w_up_edf, w_down_efd), group_sizes_e.astype(jnp.int32)
    if stacked is None:
        return _swiglu_blocked(x_md, ws, sizes, tile)
    stack, layer = stacked
    return _swiglu_blocked_stacked(x_md, ws, sizes, jax.lax.stop_gradient(tuple(stack)), layer, tile,
                                   jnp.dtype(w_gate_edf.dtype))


FULL_TILE = 128   # the CPU kernel's largest row tile
TAIL_BRANCHES = 4  # a group's last, partial tile is rounded up to a multiple of tile / 4 rows (8 branches: 2% faster
                   # at tile 128, ~1 s more compile per MoE gradient)


def swiglu_tile(m: int, e: int) -> int:
    """Full row tile of the CPU kernel for m rows over e groups: twice the mean group, as a power of two in
    [8, FULL_TILE] (mean 128 -> 128; a 32-token prefill, mean 4 -> 8: no 32-row tile per 4-row group)."""
    return int(min(FULL_TILE, max(8, _pow2_at_least(2 * -(-m // e)))))


def _swiglu_tile(x_tk, w_gu, f):
    """gate|up in one matmul [t, 2F] (fp32) and h = silu(gate) * up [t, F]."""
    gu = jnp.dot(x_tk, w_gu, preferred_element_type=jnp.float32)
    return gu, (jax.nn.silu(gu[:, :f]) * gu[:, f:]).astype(x_tk.dtype)


def _for_each_group_tile(sizes, tile, group_init, tile_fn, accumulate, group_done, carry):
    """for g in groups: (local, w) = group_init(g, carry); for each tile of g's rows starting at row r0:
    local = accumulate(local, r0, *tile_fn(w, r0, rows, keep)); carry = group_done(g, local, carry).

    A group's rows [start, end) are covered by floor(size / tile) full tiles of `tile` rows (`keep` None), then
    one tail tile of the remainder rounded up to a multiple of step = tile / TAIL_BRANCHES rows (`keep` masks the
    excess): padding stays below `step` rows per group while every matmul has a static shape (the tail's row
    count is static in each branch of a `lax.switch`). tile_fn returns (row-wise part [rows, N], per-group part); the tail's row-wise
    part is zero-padded to `tile` rows so that `accumulate` (outside the switch: the branches never see the
    big carry, which a conditional would copy) has one shape. `w`, the expert's weights sliced once per group,
    is closed over, not carried. Row inputs must be padded by `tile` rows (no clamped slice).
    """
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    step = max(tile // TAIL_BRANCHES, 1)

    def per_group(g, carry):
        local, w = group_init(g, carry)
        n_full = sizes[g] // tile
        full = lambda i, loc: accumulate(loc, starts[g] + i * tile, *tile_fn(w, starts[g] + i * tile, tile, None))
        local = jax.lax.fori_loop(0, n_full, full, local)
        r0 = starts[g] + n_full * tile

        def tail(rows):
            rows_out, per_group_out = tile_fn(w, r0, rows, r0 + jnp.arange(rows, dtype=jnp.int32) < ends[g])
            return jax.tree.map(lambda a: jnp.pad(a, ((0, tile - rows), (0, 0))), rows_out), per_group_out

        shapes = jax.eval_shape(functools.partial(tail, tile))
        nothing = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # noqa: E731
        branches = [nothing] + [functools.partial(tail, rows) for rows in range(step, tile + 1, step)]
        local = accumulate(local, r0, *jax.lax.switch((ends[g] - r0 + step - 1) // step, branches))
        return group_done(g, local, carry)

    # only the groups that have rows: an empty expert costs nothing (not even the copy of its weights)
    live = jnp.nonzero(sizes > 0, size=sizes.shape[0], fill_value=0)[0]
    return jax.lax.fori_loop(0, jnp.sum(sizes > 0), lambda i, c: per_group(live[i], c), carry)


def _masked(keep, x_t):
    """Rows of a tile outside its group set to zero (keep None: a full tile, all rows kept)."""
    return x_t if keep is None else jnp.where(keep[:, None], x_t, 0).astype(x_t.dtype)


def _pad_for_tiles(x, tile):
    return jnp.pad(x, ((0, tile), (0, 0)))


def _add_rows(a, r0, rows_t):
    """a[r0 : r0 + len(rows_t)] += rows_t."""
    cur = jax.lax.dynamic_slice_in_dim(a, r0, rows_t.shape[0])
    return jax.lax.dynamic_update_slice_in_dim(a, cur + rows_t, r0, 0)


def _group_weights(ws, g, layer=None):
    """Expert g's weights (of layer `layer` when ws are stacked over layers), in the compute dtype: gate|up
    concatenated [D, 2F] (one matmul for both) and down [F, D]."""
    idx = g if layer is None else (layer, g)
    w_g, w_u, w_d = (w[idx] for w in ws)
    return jnp.concatenate([w_g, w_u], axis=-1), w_d


def _swiglu_fwd_loop(x_md, ws, sizes, tile, layer=None, save_gu=False):
    """Forward; with save_gu also the gate|up pre-activations [M + tile, 2F] (fp32, rows as x) for the backward."""
    m, d = x_md.shape
    f = ws[2].shape[-2]
    x_p = _pad_for_tiles(x_md, tile)

    def tile_fn(w, r0, rows, keep):
        gu, h = _swiglu_tile(jax.lax.dynamic_slice_in_dim(x_p, r0, rows), w[0], f)
        y = _masked(keep, jnp.dot(h, w[1], preferred_element_type=jnp.float32))
        return ((y, _masked(keep, gu)) if save_gu else y), ()

    def group_init(g, out):
        return out, tuple(w.astype(x_md.dtype) for w in _group_weights(ws, g, layer))

    def accumulate(out, r0, rows_out, _):
        if not save_gu:
            return _add_rows(out, r0, rows_out)
        return _add_rows(out[0], r0, rows_out[0]), _add_rows(out[1], r0, rows_out[1])

    out0 = jnp.zeros((x_p.shape[0], d), jnp.float32)
    if save_gu:
        out0 = (out0, jnp.zeros((x_p.shape[0], 2 * f), jnp.float32))
    out = _for_each_group_tile(sizes, tile, group_init, tile_fn, accumulate, lambda g, local, _: local, out0)
    if save_gu:
        return out[0][:m].astype(x_md.dtype), out[1]
    return out[:m].astype(x_md.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _swiglu_blocked(x_md, ws, sizes, tile):
    return _swiglu_fwd_loop(x_md, ws, sizes, tile)


def _swiglu_blocked_fwd(x_md, ws, sizes, tile):
    y, gu = _swiglu_fwd_loop(x_md, ws, sizes, tile, save_gu=True)
    return y, (x_md, ws, sizes, gu)


def _swiglu_blocked_bwd(tile, res, dy_md, layer=None, dw_dtype=None):
    """d(x), d(ws) of the fused SwiGLU from the forward's gate|up rows; with `layer`, ws are stacked over layers
    and d(ws) is layer `layer`'s."""
    x_md, ws, sizes, gu_p = res
    m, d = x_md.shape
    f = ws[2].shape[-2]
    x_p = _pad_for_tiles(x_md, tile)
    dy_p = _pad_for_tiles(dy_md.astype(x_md.dtype), tile)
    f32 = jnp.float32

    def group_init(g, carry):
        w = tuple(w.astype(x_md.dtype) for w in _group_weights(ws, g, layer))
        return (carry[0], jnp.zeros((d, 2 * f), f32), jnp.zeros((f, d), f32)), w

    def tile_fn(w, r0, rows, keep):
        x_tk = _masked(keep, jax.lax.dynamic_slice_in_dim(x_p, r0, rows))
        dy_t = _masked(keep, jax.lax.dynamic_slice_in_dim(dy_p, r0, rows))
        gu = jax.lax.dynamic_slice_in_dim(gu_p, r0, rows)                       # saved by the forward, [t, 2F]
        gate, up = gu[:, :f], gu[:, f:]
        h = (jax.nn.silu(gate) * up).astype(x_md.dtype)
        dh = jnp.dot(dy_t, w[1].T, preferred_element_type=f32)                 # [t, F]
        sig = jax.nn.sigmoid(gate)
        # d silu(g) = s (1 + g (1 - s));  dgu = [dgate | dup]: one matmul each for d(x) and d(w_gate|w_up)
        dgu = jnp.concatenate([dh * up * (sig * (1 + gate * (1 - sig))), dh * gate * sig], axis=1).astype(x_md.dtype)
        dw_d = jnp.dot(h.T, dy_t, preferred_element_type=f32)
        dw_gu = jnp.dot(x_tk.T, dgu, preferred_element_type=f32)
        return jnp.dot(dgu, w[0].T, preferred_element_type=f32), (dw_gu, dw_d)

    def accumulate(local, r0, dx_t, dws):
        dx, dw_gu, dw_d = local
        return _add_rows(dx, r0, dx_t), dw_gu + dws[0], dw_d + dws[1]

    def group_done(g, local, carry):
        dx, dw_gu, dw_d = local
        dwg, dwu, dwd = carry[1:]
        return (dx, dwg.at[g].set(dw_gu[:, :f].astype(dwg.dtype)), dwu.at[g].set(dw_gu[:, f:].astype(dwu.dtype)),
                dwd.at[g].set(dw_d.astype(dwd.dtype)))

    skip = 0 if layer is None else 1
    carry = (jnp.zeros((x_p.shape[0], d), f32),) + tuple(jnp.zeros(w.shape[skip:], dw_dtype or w.dtype) for w in ws)
    dx, *dws = _for_each_group_tile(sizes, tile, group_init, tile_fn, accumulate, group_done, carry)
    return dx[:m].astype(x_md.dtype), tuple(dws), None


_swiglu_blocked.defvjp(_swiglu_blocked_fwd, _swiglu_blocked_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _swiglu_blocked_stacked(x_md, ws, sizes, stack, layer, tile, dw_dtype):
    """_swiglu_blocked reading the weights from `stack` at `layer`, both forward and backward: ws (= stack[layer],
    only its cotangent is produced) is never read, so the layer scan's per-layer weight copies are dead code.
    `stack` is constant (stop_gradient): the gradient flows to ws."""
    return _swiglu_fwd_loop(x_md, stack, sizes, tile, layer)


def _swiglu_blocked_stacked_fwd(x_md, ws, sizes, stack, layer, tile, dw_dtype):
    y, gu = _swiglu_fwd_loop(x_md, stack, sizes, tile, layer, save_gu=True)
    return y, (x_md, stack, sizes, layer, gu)


def _swiglu_blocked_stacked_bwd(tile, dw_dtype, res, dy_md):
    x_md, stack, sizes, layer, gu = res
    dx, dws, _ = _swiglu_blocked_bwd(tile, (x_md, stack, sizes, gu), dy_md, layer, dw_dtype)
    return dx, dws, None, None, None


_swiglu_blocked_stacked.defvjp(_swiglu_blocked_stacked_fwd, _swiglu_blocked_stacked_bwd)
