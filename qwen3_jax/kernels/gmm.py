"""Grouped SwiGLU for dropless MoE: rows of `x` sorted by expert, expert e's rows through its SwiGLU.

    grouped_swiglu(x_md [M, D], w_gate [E, D, F], w_up [E, D, F], w_down [E, F, D], group_sizes [E], impl=)
      -> [M, D];  rows past sum(group_sizes) are zero, and no gradient reaches them

Implementations (qwen3_jax.kernels picks one from the platform; the cost follows the rows actually routed):
- "megablox":   the Pallas TPU grouped matmul (`gmm`, with `tgmm` for the weight gradient), as MaxText trains;
                interpret mode when the program is not compiled for a TPU (tests).
- "tokamax":    tokamax's Mosaic GPU grouped matmul (SM90+: Hopper, Blackwell), as MaxText trains on GPU; its
                backward runs the same kernel family for d(x) and d(w). "tokamax_triton": its Triton kernel (Ampere
                and up). Both compile to one custom call per pass, whose FLOPs XLA's cost analysis cannot see
                (qwen3_jax.aot adds them from the kernels' shapes). On a non-GPU platform (tests) they run
                tokamax's portable XLA implementation through the same API and backward.
- "ragged_dot": `jax.lax.ragged_dot`. XLA:GPU rewrites it densely over the groups (forward, d(x) and d(w): E times
                the FLOPs, with a masked [E, M, N] temporary); on TPU its weight gradient compiles dense.
- "cpu":        XLA:CPU. One loop over the experts that have rows, each visiting its row tiles and doing all three
                matmuls there, with a custom VJP (see `_for_each_group_tile`); XLA:CPU expands ragged_dot densely.
The accelerator implementations do not promise zeros past the groups: those rows are masked on the way in (no
cotangent reaches them) and on the way out.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import logging

IMPLS = ("megablox", "tokamax", "tokamax_triton", "ragged_dot", "cpu")
TOKAMAX = {"tokamax": "mosaic_gpu", "tokamax_triton": "triton"}   # our name -> tokamax's implementation


def grouped_swiglu(x_md, w_gate_edf, w_up_edf, w_down_efd, group_sizes_e, *, impl: str, interpret: bool = False,
                   tile: int | None = None, stacked=None, device=None):
    """See the module docstring. stacked (impl "cpu" only): ((gate [L,E,D,F], up, down [L,E,F,D]), l) of which
    the w_* are layer l (a layer scan's slices): the kernel then reads each expert's weights straight from the
    stack, forward and backward, so the scan's per-layer copies of all experts' weights are dead code; the
    gradients go to the w_*. interpret: the kernel's platform is not the program's (tests): megablox in Pallas
    interpret mode, tokamax's portable XLA implementation. device: a device of the program's platform (tokamax
    picks its kernel from the default device's compute capability; ahead of time that is an abstract GPU)."""
    sizes = group_sizes_e.astype(jnp.int32)
    if impl == "cpu":
        m = x_md.shape[0]
        tile = tile or swiglu_tile(m, w_gate_edf.shape[0])
        ws = (w_gate_edf, w_up_edf, w_down_efd)
        if stacked is None:
            return _swiglu_blocked(x_md, ws, sizes, tile)
        stack, layer = stacked
        return _swiglu_blocked_stacked(x_md, ws, sizes, jax.lax.stop_gradient(tuple(stack)), layer, tile,
                                       jnp.dtype(w_gate_edf.dtype))
    if impl == "ragged_dot":
        mm = functools.partial(_ragged_dot, sizes=sizes)
    elif impl == "megablox":
        mm = functools.partial(_megablox, sizes=sizes, interpret=interpret)
    elif impl in TOKAMAX:
        mm = functools.partial(_tokamax, sizes=sizes, implementation="xla" if interpret else TOKAMAX[impl],
                               device=device)
    else:
        raise ValueError(f"grouped matmul {impl!r}: choose from {IMPLS}")
    live = (jnp.arange(x_md.shape[0]) < jnp.sum(sizes))[:, None]
    x = jnp.where(live, x_md, 0).astype(x_md.dtype)         # no cotangent reaches the rows past the groups
    h = jax.nn.silu(mm(x, w_gate_edf)) * mm(x, w_up_edf)
    return jnp.where(live, mm(h.astype(x.dtype), w_down_efd), 0).astype(x_md.dtype)


def _ragged_dot(x_mk, w_gkn, sizes):
    return jax.lax.ragged_dot(x_mk, w_gkn.astype(x_mk.dtype), sizes, preferred_element_type=jnp.float32)


def megablox_tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
    """(tm, tk, tn) for megablox: row tiles of up to 512 (fewer rows: a multiple of 16 covering them), k and n
    tiles of up to 512 (multiples of 128 when the dimension is larger)."""
    tm = min(512, -(-m // 16) * 16)
    return tm, min(k, 512), min(n, 512)


def megablox_tile_problem(k: int, n: int, backward: bool) -> tuple[str, int, str] | None:
    """None when the TPU compiler accepts megablox's blocks for x [m, k] @ w [E, k, n] with `megablox_tiling`'s
    tiles, else (the tile's dimension "k" or "n", its size, the dimension it fails to span: "k" or "n"). A block's
    last dimension must be a multiple of 128 or the whole array dimension. The backward (gmm with w transposed,
    and tgmm) keeps the tiling, so there the k tile also spans n and the n tile spans k. (Checked against the TPU
    compiler for v5e with k in {64, 96, 128, 192, 256, 640} x n in {64, 128, 192, 768}, forward and backward.)"""
    _, tk, tn = megablox_tiling(8, k, n)
    dims = {"k": k, "n": n}
    spans = [("k", tk, "k"), ("n", tn, "n")] + ([("k", tk, "n"), ("n", tn, "k")] if backward else [])
    for which, tile, spanned in spans:
        if tile % 128 and tile != dims[spanned]:
            return which, tile, spanned
    return None


def _megablox(x_mk, w_gkn, sizes, interpret):
    """megablox gmm (custom VJP: gmm for d(x), tgmm for d(w)); rows padded to the row tile."""
    from jax.experimental.pallas.ops.tpu.megablox import gmm

    m, k = x_mk.shape
    tiling = megablox_tiling(m, k, w_gkn.shape[2])
    pad = (-m) % tiling[0]
    x = jnp.pad(x_mk, ((0, pad), (0, 0))) if pad else x_mk
    out = gmm(x, w_gkn.astype(x_mk.dtype), sizes, jnp.float32, tiling, interpret=interpret)
    return out[:m]


def _tokamax(x_mk, w_gkn, sizes, implementation, device):
    return _tokamax_mm(x_mk, w_gkn.astype(x_mk.dtype), sizes, implementation, device)


def _tokamax_call(x_mk, w_gkn, sizes, implementation, out_dtype):
    import tokamax

    return tokamax.ragged_dot(x_mk, w_gkn, sizes, preferred_element_type=out_dtype, implementation=implementation)


class _OnDevice:
    """Trace with `device` as the default device, and without tokamax's per-call log line for shapes it has no
    tuned config for (it then uses its heuristic tiling)."""

    def __init__(self, device):
        self.ctx = jax.default_device(device) if device is not None else None

    def __enter__(self):
        _quiet_tokamax()
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


@functools.cache
def _quiet_tokamax():
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()      # tokamax's options read absl flags: never parse the user's sys.argv
    logging.getLogger("absl").addFilter(
        lambda r: not (isinstance(r.msg, str) and r.msg.startswith("Autotuning cache miss")))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _tokamax_mm(x_mk, w_gkn, sizes, implementation, device):
    """x @ w per group, fp32 out. The kernels take one input dtype, so the backward runs tokamax's own VJP (its
    grouped matmul for d(x), the transposed grouped matmul for d(w)) on the cotangent cast to x's dtype."""
    with _OnDevice(device):
        return _tokamax_call(x_mk, w_gkn, sizes, implementation, jnp.float32)


def _tokamax_mm_fwd(x_mk, w_gkn, sizes, implementation, device):
    return _tokamax_mm(x_mk, w_gkn, sizes, implementation, device), (x_mk, w_gkn, sizes)


def _tokamax_mm_bwd(implementation, device, res, dy_mn):
    x_mk, w_gkn, sizes = res
    with _OnDevice(device):
        _, vjp = jax.vjp(lambda x, w: _tokamax_call(x, w, sizes, implementation, x_mk.dtype), x_mk, w_gkn)
        dx, dw = vjp(dy_mn.astype(x_mk.dtype))
    return dx, dw, None


_tokamax_mm.defvjp(_tokamax_mm_fwd, _tokamax_mm_bwd)


# --------------------------------------------------------------------------------------- the CPU kernel
FULL_TILE = 128   # the CPU kernel's largest row tile
TAIL_BRANCHES = 4  # a group's last, partial tile is rounded up to a multiple of tile / 4 rows (8 branches: 2% faster
                   # at tile 128, ~1 s more compile per MoE gradient)


def _pow2_at_least(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


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
    count is static in each branch of a `lax.switch`). tile_fn returns (row-wise part [rows, N], per-group part); the
    tail's row-wise part is zero-padded to `tile` rows so that `accumulate` (outside the switch: the branches never see the
    big carry, which a conditional would copy) has one shape. `w`, the expert's weights sliced once per group,
    is closed over, not carried. Row inputs must be padded by `tile` rows (no clamped slice).
    """
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    step = max(tile // TAIL_BRANCHES, 1)

    def per_group(g, carry):
        local, w = group_init(g, carry)
        n_full = sizes[g] // tile
        def full(i, loc):
            return accumulate(loc, starts[g] + i * tile, *tile_fn(w, starts[g] + i * tile, tile, None))

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
