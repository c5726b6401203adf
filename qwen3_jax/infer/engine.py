"""KV-cached generation engine: jitted prefill into cache rows, jitted on-device decode chunks, continuous batching.

Device state (`slots`, a dict of arrays over B rows, donated to every call):
    cache      KVCache k, v [L, B, S, K, hd], lengths [B]
    tok_b      next input token per row (the last prompt token, then each sampled token)
    active_b   row is generating;  reason_b 0 running / 1 stop / 2 length;  n_gen_b, max_new_b
    temp_b, top_k_b, top_p_b, min_p_b, rep_b, pres_b, freq_b, key_b [B, 2]   per-row sampling
    stop_bs [B, NS]   stop ids (-1 pad);  seen_bv [B, V] prompt+output tokens;  counts_bv [B, V] output counts
    budget_b (-1 none), in_think_b, think_n_b, force_b (index into the forced `</think>` sequence, -1 none)

`prefill` writes new prompts into chosen rows: the prompt minus its last token goes through the model into a
fresh [P, T] cache that is copied into the rows; the last token becomes the row's next input, so the first
new token comes out of the decode loop like every other. `decode` runs up to `n_steps` model steps in a
`lax.while_loop` (sampling, penalties, stop and thinking-budget logic inside), stopping early when no row
is active or, with `stop_on_finish`, when some row finishes (the host then refills it). Shapes are bucketed
(P, T powers of two; B, S, N fixed per engine): no recompilation per token or per request.

`decode_ex` adds what a server needs: the log-probability of each emitted token and the TOP_LOGPROBS most
likely tokens (log_softmax of the raw model logits, before penalties, temperature and masks: vLLM's default),
and a per-row token bitmask (int32 [B, ceil(V / 32)], bit j of word w allows token 32 w + j: xgrammar's
layout) that constrains the first step's sampling; with `next_mask`, a host function called after every step (an
io_callback inside the decode loop) with the tokens just sampled returns the next step's mask, so grammar-constrained
rows decode whole chunks beside the others. `release` ends rows at once (a client went away).

With `routing_stats` (a qwen3_jax.routing.RoutingStats), prefill and decode also return the routing of every token
they run through the model (the prompt in prefill, each row's input token in each decode step), computed on device
from the router logits of that very forward (qwen3_jax.routing.stats.batch_stats, under the model's runtime.routing)
and added to the accumulator per row, with the row's `domain`: no second forward. Without it the programs are
unchanged (the statistics are a static variant of the compiled functions).
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from qwen3_jax.model import KVCache

from .sampling import apply_penalties, sample

TOP_LOGPROBS = 20  # top tokens reported per step when logprobs are asked for (OpenAI's maximum)

ROW_FIELDS = ("max_new_b", "temp_b", "top_k_b", "top_p_b", "min_p_b", "rep_b", "pres_b", "freq_b", "key_b",
              "stop_bs", "budget_b", "in_think_b")


def pow2(n: int, lo: int = 1) -> int:
    return max(lo, 1 << max(int(n) - 1, 0).bit_length())


def init_slots(cfg, batch: int, max_len: int, n_stop: int, cache_dtype, vocab: int):
    z = lambda dt, *s: jnp.zeros((batch, *s), dt)  # noqa: E731
    return dict(
        cache=KVCache.init(cfg, batch, max_len, cache_dtype),
        tok_b=z(jnp.int32), active_b=z(bool), reason_b=z(jnp.int32), n_gen_b=z(jnp.int32), max_new_b=z(jnp.int32),
        temp_b=z(jnp.float32), top_k_b=z(jnp.int32), top_p_b=jnp.ones((batch,), jnp.float32), min_p_b=z(jnp.float32),
        rep_b=jnp.ones((batch,), jnp.float32), pres_b=z(jnp.float32), freq_b=z(jnp.float32),
        key_b=z(jnp.uint32, 2), stop_bs=jnp.full((batch, n_stop), -1, jnp.int32),
        seen_bv=z(bool, vocab), counts_bv=z(jnp.int32, vocab),
        budget_b=jnp.full((batch,), -1, jnp.int32), in_think_b=z(bool), think_n_b=z(jnp.int32),
        force_b=jnp.full((batch,), -1, jnp.int32),
    )


class Engine:
    """Compiled prefill/decode for one model; `think_ids` = (<think>, </think>) ids or None (no budget);
    `forced_ids` the tokens forced when a thinking budget runs out (ends with </think>). The jitted functions
    are shared by every Engine of the same graph (parameters are arguments): a new Engine does not recompile."""

    def __init__(self, model, *, think_ids=None, forced_ids=None, chunk: int = 32, routing_stats=None):
        graphdef, self.params = nnx.split(model)
        self.cfg = model.config
        self.mesh = getattr(model, "mesh", None)
        self.cache_default = model.dtype
        think = tuple(int(i) for i in think_ids) if think_ids else (-1, -1)
        forced = tuple(int(i) for i in (forced_ids or ([think[1]] if think_ids else [-1])))
        self.chunk = chunk
        if routing_stats is not None and not model.config.is_moe:
            raise ValueError("routing_stats: the model has no MoE layers")
        self.routing_stats = routing_stats
        self._row_domain: dict[int, str | None] = {}
        self.fns = _compiled(graphdef, model.config, think, forced, routing_stats is not None)

    def new_slots(self, batch: int, max_len: int, n_stop: int, cache_dtype=None):
        dt = jnp.dtype(cache_dtype or self.cache_default)
        mesh = self.mesh if self.mesh is not None and self.mesh.size > 1 else None
        return _slots_init(self.cfg, batch, max_len, n_stop, dt, mesh)()

    # ------------------------------------------------------------------------------------------ host side
    def prefill(self, slots, prompts: list[list[int]], rows: list[int], row: dict, domains: list | None = None):
        """Write `prompts` into `rows` (buckets: P and T powers of two, T <= S); `domains`: each prompt's domain
        for the routing statistics (with `routing_stats`)."""
        b, s_max = slots["tok_b"].shape[0], slots["cache"].max_len
        p = min(pow2(len(prompts)), pow2(b))
        t = min(pow2(max(len(x) for x in prompts), 16), s_max)
        ids = np.zeros((p, t), np.int32)
        n_p = np.ones((p,), np.int32)
        rows_p = np.full((p,), b, np.int32)
        for j, (x, r) in enumerate(zip(prompts, rows)):
            ids[j, :len(x)] = x
            n_p[j], rows_p[j] = len(x), r
        row_p = {}
        for name, vals in row.items():
            arr = np.asarray(vals)
            pad = np.zeros((p - len(prompts), *arr.shape[1:]), arr.dtype)
            row_p[name] = np.concatenate([arr, pad]) if len(pad) else arr
        out = self.fns.prefill(self.params, slots, ids, n_p, rows_p, row_p)
        if self.routing_stats is None:
            return out
        slots, rs = out
        doms = list(domains) if domains is not None else [None] * len(prompts)
        for r, d in zip(rows, doms):
            self._row_domain[r] = d
        valid = np.arange(t)[None] < (n_p - 1)[:, None]       # the prompt minus its last token went through
        self.routing_stats.add(jax.device_get(rs), ids, valid, doms + [None] * (p - len(prompts)),
                               sequences=len(prompts))
        return slots

    def _add_decode_routing(self, rs):
        """The routing of a decode call's steps (host arrays), per row (with the row's domain)."""
        b = rs["ids_bn"].shape[0]
        self.routing_stats.add(rs, rs["ids_bn"], rs["valid_bn"], [self._row_domain.get(r) for r in range(b)],
                               sequences=0)

    def decode(self, slots, n_steps: int, stop_on_finish: bool, n_max: int | None = None):
        """Up to n_steps tokens; returns (slots, tokens [B, n] on host, -1 where a row emitted nothing, reason [B])."""
        n_max = n_max or self.chunk
        out = self.fns.decode(self.params, slots, np.int32(n_steps), np.bool_(stop_on_finish), n_max=n_max)
        slots, out_bn, n = out[:3]
        rs = out[-1] if self.routing_stats is not None else None
        out_bn, n, reason_b, rs = jax.device_get((out_bn, n, out[3], rs))
        if rs is not None:
            self._add_decode_routing(rs)
        return slots, out_bn[:, : int(n)], reason_b

    def decode_ex(self, slots, n_steps: int, stop_on_finish: bool, *, n_max: int | None = None, mask_bw=None,
                  logprobs: bool = False, next_mask=None) -> "DecodeOut":
        """`decode` with per-token logprobs (`logprobs=True`: logprob [B, n], top ids / logprobs [B, n, TOP_LOGPROBS])
        and a token bitmask `mask_bw` (int32 [B, ceil(V / 32)]) applied to the sampling of the first step. The mask
        of each later step comes from `next_mask(tokens_b, active_b)` (host arrays: the step's tokens, -1 where a
        row was not active; it returns the next int32 [B, W] mask, or (mask, halt): halt true ends the call after
        this step); without it, a mask needs n_steps == 1."""
        if mask_bw is not None and next_mask is None and n_steps != 1:
            raise ValueError(f"a token mask constrains one step (pass next_mask for more); got n_steps={n_steps}")
        if next_mask is not None and mask_bw is None:
            raise ValueError("next_mask needs the first step's mask_bw")
        n_max = n_max or self.chunk
        mask = None if mask_bw is None else np.asarray(mask_bw, np.int32)
        key = None
        if next_mask is not None:
            key = next(_MASK_KEYS)
            _MASK_FNS[key] = next_mask
        try:
            out = self.fns.decode(self.params, slots, np.int32(n_steps), np.bool_(stop_on_finish), mask,
                                  None if key is None else np.int32(key), n_max=n_max,
                                  n_top=TOP_LOGPROBS if logprobs else 0)
            jax.block_until_ready(out[1])
        finally:
            _MASK_FNS.pop(key, None)
        slots, lp = out[0], (out[3] if logprobs else None)
        rs = out[-1] if self.routing_stats is not None else None
        out_bn, n, reason_b, lp, rs = jax.device_get((out[1], out[2], out[4 if logprobs else 3], lp, rs))
        if rs is not None:
            self._add_decode_routing(rs)
        n = int(n)
        if lp is not None:
            lp = tuple(x[:, :n] for x in lp)
        return DecodeOut(slots, out_bn[:, :n], reason_b, *(lp or (None, None, None)))

    def release(self, slots, rows: list[int]):
        """End `rows` now (they emit nothing more; prefill can reuse them)."""
        b = slots["tok_b"].shape[0]
        rows_b = np.full((b,), b, np.int32)
        rows_b[: len(rows)] = rows
        return self.fns.release(slots, rows_b)


class DecodeOut(NamedTuple):
    slots: dict
    tokens_bn: np.ndarray             # int32 [B, n], -1 where a row emitted nothing
    reason_b: np.ndarray              # 0 running / 1 stop / 2 length
    logprob_bn: np.ndarray | None     # float32 [B, n]: the emitted token's logprob
    top_ids_bnk: np.ndarray | None    # int32 [B, n, TOP_LOGPROBS], most likely first
    top_logprobs_bnk: np.ndarray | None


def slot_shardings(cfg, batch, max_len, n_stop, dtype, mesh):
    """Shardings of the slots by the rules: the cache by 'kv_cache' ([L, B, S, K, hd]: batch over the data axes, kv
    heads over 'tensor'), per-row arrays over the batch axes of 'bt'."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from qwen3_jax.partition import activation_sharding

    def one(x):
        if x.ndim == 5:
            return activation_sharding("kv_cache", x.shape, mesh)
        spec = activation_sharding("bt", (x.shape[0], 1), mesh).spec
        return NamedSharding(mesh, P(spec[0], *([None] * (x.ndim - 1))))

    shapes = jax.eval_shape(functools.partial(init_slots, cfg, batch, max_len, n_stop, dtype, cfg.vocab_size))
    return jax.tree.map(one, shapes)


@functools.lru_cache(maxsize=16)
def _slots_init(cfg, batch, max_len, n_stop, dtype, mesh):
    """Jitted allocation of the slots, placed by the sharding rules when a mesh is given (slot_shardings)."""
    fn = functools.partial(init_slots, cfg, batch, max_len, n_stop, dtype, cfg.vocab_size)
    if mesh is None:
        return jax.jit(fn)
    return jax.jit(fn, out_shardings=slot_shardings(cfg, batch, max_len, n_stop, dtype, mesh))


class _Compiled:
    """The jitted device functions (prefill and the decode loop) of one model graph."""

    def __init__(self, graphdef, cfg, think_ids, forced, routing: bool = False):
        self.graphdef, self.cfg, self.think_ids, self.forced = graphdef, cfg, think_ids, forced
        self.routing = routing   # also return the routing statistics of the tokens run (Engine.routing_stats)
        self.prefill = jax.jit(self._prefill_fn, donate_argnums=(1,))
        self.decode = jax.jit(self._decode_fn, donate_argnums=(1,), static_argnames=("n_max", "n_top"))
        self.release = jax.jit(self._release_fn, donate_argnums=(0,))

    @staticmethod
    def _release_fn(slots, rows_b):
        """rows_b [B]: rows to end (B = padding, dropped)."""
        s = dict(slots)
        s["active_b"] = s["active_b"].at[rows_b].set(False, mode="drop")
        return s

    def _prefill_fn(self, params, slots, ids_pt, n_p, rows_p, row):
        """Prompts ids_pt [P, T] (right-padded, n_p real tokens each) into rows rows_p (B = padding row, dropped)."""
        model = nnx.merge(self.graphdef, params)
        p, t = ids_pt.shape
        cache = slots["cache"]
        mask_pt = jnp.arange(t)[None] < (n_p - 1)[:, None]
        small = KVCache.init(self.cfg, p, t, cache.k.dtype)
        out = model(ids_pt, attention_mask=mask_pt.astype(jnp.int32), cache=small)
        k = cache.k.at[:, rows_p, :t].set(out.cache.k, mode="drop")
        v = cache.v.at[:, rows_p, :t].set(out.cache.v, mode="drop")
        s = dict(slots)
        s["cache"] = KVCache(k, v, cache.lengths.at[rows_p].set(n_p - 1, mode="drop"))
        put = lambda name, val: s[name].at[rows_p].set(val, mode="drop")  # noqa: E731
        s["tok_b"] = put("tok_b", jnp.take_along_axis(ids_pt, (n_p - 1)[:, None], 1)[:, 0])
        s["active_b"] = put("active_b", True)
        for name in ("reason_b", "n_gen_b", "think_n_b"):
            s[name] = put(name, 0)
        for name in ROW_FIELDS:
            s[name] = put(name, row[name])
        s["force_b"] = put("force_b", jnp.where(row["in_think_b"] & (row["budget_b"] == 0), 0, -1))
        seen_pv = jnp.zeros((p, self.cfg.vocab_size), bool).at[jnp.arange(p)[:, None], ids_pt].max(
            jnp.arange(t)[None] < n_p[:, None])
        s["seen_bv"] = put("seen_bv", seen_pv)
        s["counts_bv"] = put("counts_bv", 0)
        if self.routing:
            return s, _replicated(model, _routing_out(model, out.router_logits, mask_pt))
        return s

    def _decode_fn(self, params, slots, n_steps, stop_on_finish, mask_bw=None, mask_key=None, *, n_max: int,
                   n_top: int = 0):
        """mask_bw: None or an int32 token bitmask [B, W] for the first step; mask_key: None, or the key of the
        host function (`_MASK_FNS`) that gives each later step's mask (see `Engine.decode_ex`); n_top > 0: also
        return (logprob [B, n_max], top ids [B, n_max, n_top], top logprobs [B, n_max, n_top])."""
        model = nnx.merge(self.graphdef, params)
        b = slots["tok_b"].shape[0]
        v = self.cfg.vocab_size
        rows = jnp.arange(b)
        think_start, think_end = self.think_ids
        forced = jnp.asarray(self.forced, jnp.int32)
        n_forced = len(self.forced)

        def step(carry):
            i, s, out_bn, lp, _, rs, mask = carry
            act = s["active_b"]
            o = model(s["tok_b"][:, None], attention_mask=act[:, None].astype(jnp.int32), cache=s["cache"])
            if self.routing:  # this step's input token of each active row, routed as the model just did
                st = _routing_out(model, o.router_logits, act[:, None])
                rs = {**{k: rs[k] + st[k] for k in _SUMMED},
                      "top1_ids": rs["top1_ids"].at[:, i].set(st["top1_ids"][:, 0]),
                      "ids_bn": rs["ids_bn"].at[:, i].set(s["tok_b"]), "valid_bn": rs["valid_bn"].at[:, i].set(act)}
            logits = o.logits[:, 0].astype(jnp.float32)
            penalised = jax.lax.cond(
                jnp.any(act & ((s["rep_b"] != 1) | (s["pres_b"] != 0) | (s["freq_b"] != 0))),
                lambda l: apply_penalties(l, s["seen_bv"], s["counts_bv"], s["rep_b"], s["pres_b"], s["freq_b"]),
                lambda l: l, logits)
            if mask is not None:
                bits = (mask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
                penalised = jnp.where(bits.reshape(b, -1)[:, :v].astype(bool), penalised, -jnp.inf)
            keys = jax.vmap(jax.random.fold_in)(s["key_b"], s["n_gen_b"])
            temp = jnp.where(act, s["temp_b"], 0.0)  # finished rows must not push an all-greedy batch off argmax
            tok = sample(penalised, keys, temp, s["top_k_b"], s["top_p_b"], s["min_p_b"])
            # thinking budget: forced tokens replace the sample
            forcing = s["force_b"] >= 0
            tok = jnp.where(forcing, forced[jnp.clip(s["force_b"], 0, n_forced - 1)], tok)
            force = jnp.where(forcing, s["force_b"] + 1, -1)
            force = jnp.where(force >= n_forced, -1, force)
            in_think = jnp.where(tok == think_start, True, jnp.where(tok == think_end, False, s["in_think_b"]))
            think_n = jnp.where(tok == think_start, 0, s["think_n_b"] + in_think.astype(jnp.int32))
            start = act & in_think & (force < 0) & (s["budget_b"] >= 0) & (think_n >= s["budget_b"])
            force = jnp.where(start, 0, force)
            # bookkeeping and stop detection
            n_gen = s["n_gen_b"] + act
            cache = o.cache
            hit_stop = jnp.any(tok[:, None] == s["stop_bs"], axis=-1)
            full = (n_gen >= s["max_new_b"]) | (cache.lengths >= cache.max_len)
            done = act & (hit_stop | full)
            n = dict(s)
            n.update(cache=cache, n_gen_b=n_gen, active_b=act & ~done,
                     tok_b=jnp.where(act, tok, s["tok_b"]),
                     reason_b=jnp.where(done, jnp.where(hit_stop, 1, 2), s["reason_b"]),
                     in_think_b=jnp.where(act, in_think, s["in_think_b"]),
                     think_n_b=jnp.where(act, think_n, s["think_n_b"]),
                     force_b=jnp.where(act, force, s["force_b"]),
                     counts_bv=s["counts_bv"].at[rows, tok].add(act.astype(jnp.int32)),
                     seen_bv=s["seen_bv"].at[rows, tok].max(act))
            out_bn = out_bn.at[:, i].set(jnp.where(act, tok, -1))
            if n_top:
                logp_bv = jax.nn.log_softmax(logits, axis=-1)
                top_lp, top_id = jax.lax.top_k(logp_bv, n_top)
                lp = (lp[0].at[:, i].set(jnp.take_along_axis(logp_bv, tok[:, None], 1)[:, 0]),
                      lp[1].at[:, i].set(top_id.astype(jnp.int32)), lp[2].at[:, i].set(top_lp))
            halt = jnp.bool_(False)
            if mask_key is not None:  # the host takes the tokens and gives the next mask (and may end the call)
                mask, halt = io_callback(_next_mask, (jax.ShapeDtypeStruct(mask.shape, jnp.int32),
                                                      jax.ShapeDtypeStruct((), jnp.bool_)),
                                         mask_key, jnp.where(act, tok, -1), act)
            return i + 1, n, out_bn, lp, (stop_on_finish & jnp.any(done)) | halt, rs, mask

        def cond(carry):
            i, s, _, _, stop, _, _ = carry
            return (i < jnp.minimum(n_steps, n_max)) & jnp.any(s["active_b"]) & ~stop

        lp0 = ()
        if n_top:
            lp0 = (jnp.zeros((b, n_max), jnp.float32), jnp.zeros((b, n_max, n_top), jnp.int32),
                   jnp.zeros((b, n_max, n_top), jnp.float32))
        rs0 = ()
        if self.routing:
            n_l, e = len(self.cfg.moe_layers), self.cfg.num_experts
            rs0 = dict(load=jnp.zeros((b, n_l, e), jnp.int32), top1=jnp.zeros((b, n_l, e), jnp.int32),
                       entropy=jnp.zeros((b, n_l), jnp.float32), topk_mass=jnp.zeros((b, n_l), jnp.float32),
                       tokens=jnp.zeros((b,), jnp.int32), coactivation=jnp.zeros((n_l, e, e), jnp.int32),
                       coactivation_adjacent=jnp.zeros((n_l, e, e), jnp.int32),
                       top1_ids=jnp.full((b, n_max, n_l), e, jnp.int32), ids_bn=jnp.zeros((b, n_max), jnp.int32),
                       valid_bn=jnp.zeros((b, n_max), bool))
        init = (jnp.int32(0), slots, jnp.full((b, n_max), -1, jnp.int32), lp0, jnp.bool_(False), rs0, mask_bw)
        n, slots, out_bn, lp, _, rs, _ = jax.lax.while_loop(cond, step, init)
        # what the host fetches leaves the program replicated (the slots keep their layout): with the batch split
        # across processes, every process reads every row's tokens, logprobs and finish reason
        out_bn, n, lp, reason_b = _replicated(model, (out_bn, n, lp, slots["reason_b"]))
        out = ((slots, out_bn, n, lp) if n_top else (slots, out_bn, n)) + (reason_b,)
        return out + (_replicated(model, rs),) if self.routing else out


_SUMMED = ("load", "top1", "entropy", "topk_mass", "tokens", "coactivation", "coactivation_adjacent")

# host functions giving a decode loop's next token mask (Engine.decode_ex's next_mask), by the key the call passes
# (the compiled decode is shared by every Engine of a graph)
_MASK_FNS: dict = {}
_MASK_KEYS = itertools.count(1)


def _next_mask(key, tokens_b, active_b):
    out = _MASK_FNS[int(key)](np.asarray(tokens_b), np.asarray(active_b))
    mask, halt = out if isinstance(out, tuple) else (out, False)
    return np.ascontiguousarray(mask, np.int32), np.bool_(halt)


def _routing_out(model, router_logits_lbte, valid_bt):
    """Routing statistics of one forward's tokens (qwen3_jax.routing.stats.batch_stats, under the model's
    runtime.routing)."""
    from qwen3_jax.routing.stats import batch_stats

    return batch_stats(router_logits_lbte, valid_bt, model.config, model.runtime.routing)


def _replicated(model, tree):
    """Arrays a program returns to the host (statistics, tokens), replicated so that every process can read them."""
    mesh = model.runtime.mesh
    if mesh is None or mesh.size == 1:
        return tree
    from jax.sharding import NamedSharding, PartitionSpec as P

    return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, P()))


@functools.lru_cache(maxsize=16)
def _compiled(graphdef, cfg, think_ids, forced, routing: bool = False) -> _Compiled:
    return _Compiled(graphdef, cfg, think_ids, forced, routing)


def lower_decode_step(cfg, mesh, *, batch_size: int, max_len: int, dtype="bfloat16", scan_layers: bool = True,
                      n_stop: int = 16, ep_buffer_factor="default", gmm: str = "auto"):
    """One decode step of the engine (one token per row: the model over the cache, sampling, stop and thinking-budget
    bookkeeping; the engine's decode loop with at most one step) for `batch_size` rows of a `max_len`-slot cache,
    lowered for `mesh` (e.g. abstract TPU chips, see qwen3_jax.aot) with abstract parameters in `dtype`, placed by
    the serving rules (no per-token weight gathers), and the slots donated. Returns a jax.stages.Lowered.
    scan_layers=False unrolls the layers; gmm overrides the platform's grouped matmul (qwen3_jax.kernels)."""
    from qwen3_jax.sharding.rules import sharded_abstract_model
    from qwen3_jax.runtime import Runtime
    from qwen3_jax.partition import SERVE_PARAM_RULES

    rt_kw = {} if ep_buffer_factor == "default" else {"ep_buffer_factor": ep_buffer_factor}
    runtime = Runtime(mesh=mesh, scan_layers=scan_layers, gmm=gmm, **rt_kw)
    graphdef, abstract_state, params = sharded_abstract_model(cfg, runtime, dtype=dtype, param_dtype=dtype,
                                                      rules=SERVE_PARAM_RULES)
    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, params)
    dt = jnp.dtype(dtype)
    shapes = jax.eval_shape(functools.partial(init_slots, cfg, batch_size, max_len, n_stop, dt, cfg.vocab_size))
    shard = slot_shardings(cfg, batch_size, max_len, n_stop, dt, mesh)
    slots = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shard)
    fns = _Compiled(graphdef, cfg, (-1, -1), (-1,))
    return fns.decode.lower(state, slots, jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.bool_),
                            n_max=1)
