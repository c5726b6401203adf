"""Routing capture: streaming per-layer statistics of which experts the router picks.

    stats = capture(model, [ids_a, ids_b], domains=["python", "de"], trace="trace.npz")
    stats.load                 # [L_moe, E] top-k assignments over all real tokens
    stats["layers"][0]["load"] # the same, as written to stats.json
    stats.save("out/")         # out/stats.json, out/counts.npz

Per MoE layer (decoder layer ids in `stats.layers`), over every real token:
    load [E]          top-k assignments per expert;          top1_load [E]   first choices per expert
    entropy           sum over tokens of the router distribution's entropy (nats; mean in stats.json)
    topk_mass         sum over tokens of the probability mass of the chosen experts (before renormalising)
    coactivation      [E, E] tokens routed to both experts i and j (i != j, pairs within a token's top-k)
    coactivation_adjacent [E, E] tokens whose ranked top-k has i and j next to each other (either order; OLMoE's
                      pairs, qwen3_jax.routing.olmoe)
    per domain        tokens, load, top1_load, entropy, topk_mass of the records of each "domain"
    per token id      first-choice counts (token id, expert) -> n, and the index of the first token that made the
                      pair (ties between experts go to the first seen, as OLMoE's counters do)
The routing is recomputed from the model's router logits by the same function the model runs
(qwen3_jax.routing.intervention.route_topk), so an intervention on the model's runtime shows in the counts.

Memory does not grow with the data: all arrays are [L, E] or [L, E, E], the per-domain tables grow with the
number of domains, and the per-token-id counts hold at most one entry per (layer, token id, expert) seen --
bounded by L x V x E whatever the number of tokens (a sparse table, merged every few batches). The optional trace
(routed expert ids [tokens, layers, top_k] int16 and their weights, the layout of vLLM's routed experts) is
streamed to temporary files and written as one npz at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import tempfile
import zipfile
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .intervention import Intervention, route_topk

FORMAT = "qwen3-jax-routing-stats"
STATS_FILE, COUNTS_FILE, TRACE_FILE = "stats.json", "counts.npz", "trace.npz"


# ============================================================================ device side (pure)
def layer_routing(router_logits_lne, cfg, iv: Intervention | None):
    """(weights [L,N,k], experts [L,N,k], probs [L,N,E]) of every MoE layer, from raw logits [L_moe, N, E]."""
    layers = jnp.asarray(cfg.moe_layers, jnp.int32)
    return jax.vmap(lambda lg, layer: route_topk(lg, layer, cfg, iv))(router_logits_lne, layers)


def batch_stats(router_logits_lbte, valid_bt, cfg, iv: Intervention | None, trace: bool = False) -> dict:
    """Per-row counts of one batch (see the module docstring); fp32 router logits [L_moe, B, T, E], valid [B, T].
    Returns load/top1 [B, L, E] int32, entropy/topk_mass [B, L] fp32, tokens [B], coactivation and
    coactivation_adjacent [L, E, E] int32, top1_ids [B, T, L] int32 (E where padding), and with trace experts
    [B, T, L, k] and weights [B, T, L, k]."""
    n_l, b, t, e = router_logits_lbte.shape
    w, ids, probs = layer_routing(router_logits_lbte.reshape(n_l, b * t, e).astype(jnp.float32), cfg, iv)
    valid_n = valid_bt.reshape(-1)
    k = ids.shape[-1]
    ids = jnp.where(valid_n[None, :, None], ids, e)                       # padding: no expert
    li = jnp.arange(n_l)[:, None, None]
    ni = jnp.arange(b * t)[None, :, None]
    hot = jnp.zeros((n_l, b * t, e), jnp.int32).at[li, ni, ids].add(1, mode="drop")       # [L, N, E] multi-hot
    top1_n = ids[..., 0]                                                  # [L, N]
    hot1 = jnp.zeros((n_l, b * t, e), jnp.int32).at[li[..., 0], ni[..., 0], top1_n].add(1, mode="drop")
    vf = valid_n.astype(jnp.float32)
    ent_ln = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0), -1) * vf
    chosen = jnp.take_along_axis(probs, jnp.minimum(ids, e - 1), -1) * (ids < e)
    mass_ln = jnp.sum(chosen, -1) * vf
    hf = hot.astype(jnp.float32)
    co = jnp.einsum("lne,lnf->lef", hf, hf)                               # 0/1 products: exact in any precision
    co = (co * (1 - jnp.eye(e))).round().astype(jnp.int32)
    adj = jnp.zeros((n_l, e, e), jnp.int32)       # rank-adjacent pairs (r, r+1) of the ranked top-k, both orders
    if k > 1:
        a = jnp.concatenate([ids[..., :-1], ids[..., 1:]], -1)      # E (padding, an empty slot): dropped
        adj = adj.at[li, a, jnp.concatenate([ids[..., 1:], ids[..., :-1]], -1)].add(1, mode="drop")
    per_row = lambda x: jnp.moveaxis(x.reshape(n_l, b, t, *x.shape[2:]).sum(2), 0, 1)  # noqa: E731
    out = dict(load=per_row(hot), top1=per_row(hot1), entropy=per_row(ent_ln), topk_mass=per_row(mass_ln),
               tokens=jnp.sum(valid_bt, -1).astype(jnp.int32), coactivation=co, coactivation_adjacent=adj,
               top1_ids=jnp.moveaxis(top1_n.reshape(n_l, b, t), 0, -1))
    if trace:
        out["experts"] = jnp.moveaxis(ids.reshape(n_l, b, t, k), 0, 2)
        out["weights"] = jnp.moveaxis(w.reshape(n_l, b, t, k), 0, 2)
    return out


# ============================================================================ host accumulators
class TokenExpertCounts:
    """Sparse (layer, token id, expert) -> count, merged from a pending buffer (bounded by L x V x E entries).
    `first` [n] (aligned with `keys`): the index, in the order tokens were added, of the first token that made the
    pair (ties between experts: the first seen wins, as OLMoE's Counters do). first_known is False for counts read
    from a file written before that index existed (then all are 0: ties go to the lowest expert id)."""

    def __init__(self, num_layers: int, vocab: int, num_experts: int, flush_at: int = 1 << 21):
        self.shape = (num_layers, vocab, num_experts)
        self.keys = np.zeros((0,), np.int64)
        self.counts = np.zeros((0,), np.int64)
        self.first = np.zeros((0,), np.int64)
        self.first_known = True
        self.seen = 0                                # tokens added so far
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._n_pending = 0
        self.flush_at = flush_at

    def add(self, token_ids_n, experts_nl):
        """token ids [N] and each token's first-choice expert per layer [N, L] (E = none), in stream order."""
        n_l, v, e = self.shape
        tok = np.asarray(token_ids_n, np.int64)[:, None]
        ex = np.asarray(experts_nl, np.int64)
        ok = ex < e
        keys = ((np.arange(n_l, dtype=np.int64)[None] * v + tok) * e + ex)[ok]
        occ = np.broadcast_to(self.seen + np.arange(len(ex), dtype=np.int64)[:, None], ex.shape)[ok]
        self.seen += len(ex)
        self._pending.append((keys, occ))
        self._n_pending += keys.size
        if self._n_pending >= self.flush_at:
            self.flush()

    def _reduce(self, keys, counts, first):
        order = np.lexsort((first, keys))
        keys, counts, first = keys[order], counts[order], first[order]
        if keys.size == 0:
            self.keys, self.counts, self.first = keys, counts, first
            return
        starts = np.nonzero(np.r_[True, keys[1:] != keys[:-1]])[0]
        self.keys, self.counts, self.first = keys[starts], np.add.reduceat(counts, starts), first[starts]

    def flush(self):
        if not self._pending:
            return
        keys = np.concatenate([self.keys] + [k for k, _ in self._pending])
        first = np.concatenate([self.first] + [o for _, o in self._pending])
        counts = np.concatenate([self.counts, np.ones(keys.size - self.keys.size, np.int64)])
        self._pending, self._n_pending = [], 0
        self._reduce(keys, counts, first)

    def merge(self, other: "TokenExpertCounts"):
        """Add `other`'s counts, as if its tokens came after this one's."""
        other.flush()
        self.flush()
        self._reduce(np.concatenate([self.keys, other.keys]), np.concatenate([self.counts, other.counts]),
                     np.concatenate([self.first, other.first + self.seen]))
        self.seen += other.seen
        self.first_known = self.first_known and other.first_known

    def triples(self):
        """(layer index [n], token id [n], expert [n], count [n]) of every nonzero entry."""
        self.flush()
        _, v, e = self.shape
        return self.keys // (v * e), (self.keys // e) % v, self.keys % e, self.counts

    def dense(self, layer: int) -> np.ndarray:
        """[V, E] counts of one layer index (small vocabularies / tests)."""
        li, tok, ex, c = self.triples()
        out = np.zeros(self.shape[1:], np.int64)
        sel = li == layer
        np.add.at(out, (tok[sel], ex[sel]), c[sel])
        return out


def _zeros_tables(n_l, e):
    return dict(tokens=0, load=np.zeros((n_l, e), np.int64), top1_load=np.zeros((n_l, e), np.int64),
                entropy=np.zeros(n_l, np.float64), topk_mass=np.zeros(n_l, np.float64))


class RoutingStats:
    """The accumulated statistics (module docstring). Arrays are indexed by MoE layer index (0..L_moe-1); the
    decoder layer of each is `layers[i]`. `stats[key]` reads the stats.json dictionary (`to_json()`)."""

    def __init__(self, cfg, intervention: Intervention | None = None, model_name: str | None = None):
        self.cfg = cfg
        self.layers = list(cfg.moe_layers)
        self.num_experts = cfg.num_experts
        self.intervention = intervention if intervention is not None and intervention.changes_routing else None
        self.top_k = [self.intervention.layer_top_k(i, cfg) if self.intervention else cfg.num_experts_per_tok
                      for i in self.layers]
        self.model_name = model_name
        n_l, e = len(self.layers), self.num_experts
        t = _zeros_tables(n_l, e)
        self.tokens, self.load, self.top1_load = 0, t["load"], t["top1_load"]
        self.entropy_sum, self.topk_mass_sum = t["entropy"], t["topk_mass"]
        self.coactivation = np.zeros((n_l, e, e), np.int64)
        # None: some counts came without it (an older producer, or a counts.npz written before it existed)
        self.coactivation_adjacent: np.ndarray | None = np.zeros((n_l, e, e), np.int64)
        self.domains: dict[str, dict] = {}
        self.token_counts = TokenExpertCounts(n_l, cfg.vocab_size, e)
        self.sequences = 0

    # -- accumulation -------------------------------------------------------------------------
    def add(self, out: dict, input_ids_bt, valid_bt, domains: list | None = None, sequences: int | None = None):
        """One batch of `batch_stats` (host numpy) with its token ids and real-token mask [B, T]. sequences: how
        many sequences the batch starts (default: its rows with tokens; the engine's decode steps continue theirs)."""
        valid = np.asarray(valid_bt, bool)
        rows = [r for r in range(valid.shape[0]) if valid[r].any()]
        self.sequences += len(rows) if sequences is None else int(sequences)
        load, top1 = np.asarray(out["load"], np.int64), np.asarray(out["top1"], np.int64)
        ent, mass = np.asarray(out["entropy"], np.float64), np.asarray(out["topk_mass"], np.float64)
        toks = np.asarray(out["tokens"], np.int64)
        self.tokens += int(toks.sum())
        self.load += load.sum(0)
        self.top1_load += top1.sum(0)
        self.entropy_sum += ent.sum(0)
        self.topk_mass_sum += mass.sum(0)
        self.coactivation += np.asarray(out["coactivation"], np.int64)
        if self.coactivation_adjacent is not None:
            adj = out.get("coactivation_adjacent")
            self.coactivation_adjacent = None if adj is None else self.coactivation_adjacent + np.asarray(adj, np.int64)
        for r in rows:
            d = None if domains is None else domains[r]
            if d is None:
                continue
            tab = self.domains.setdefault(str(d), _zeros_tables(len(self.layers), self.num_experts))
            tab["tokens"] += int(toks[r])
            tab["load"] += load[r]
            tab["top1_load"] += top1[r]
            tab["entropy"] += ent[r]
            tab["topk_mass"] += mass[r]
        ids = np.asarray(input_ids_bt)[valid]
        self.token_counts.add(ids, np.asarray(out["top1_ids"])[valid])

    # -- derived ------------------------------------------------------------------------------
    def layer_summary(self, i: int) -> dict:
        load = self.load[i].astype(np.float64)
        mean = load.mean() if load.size else 0.0
        n = max(self.tokens, 1)
        return {
            "layer": self.layers[i], "top_k": self.top_k[i], "tokens": self.tokens,
            "load": self.load[i].tolist(), "top1_load": self.top1_load[i].tolist(),
            "entropy_mean": float(self.entropy_sum[i] / n), "topk_mass_mean": float(self.topk_mass_sum[i] / n),
            "cv": float(load.std() / mean) if mean > 0 else 0.0,
            "max_load": int(load.max()), "min_load": int(load.min()),
            "max_min_ratio": float(load.max() / load.min()) if load.min() > 0 else None,
            "vocab_specialization": vocab_specialization(self, i)["mean"],
        }

    def to_json(self) -> dict:
        doms = {}
        for name, tab in sorted(self.domains.items()):
            n = max(tab["tokens"], 1)
            doms[name] = {"tokens": tab["tokens"], "layers": [
                {"layer": layer, "load": tab["load"][i].tolist(), "top1_load": tab["top1_load"][i].tolist(),
                 "entropy_mean": float(tab["entropy"][i] / n), "topk_mass_mean": float(tab["topk_mass"][i] / n),
                 "specialization": domain_specialization(tab["load"][i], tab["tokens"], self.num_experts,
                                                         self.top_k[i]).tolist()}
                for i, layer in enumerate(self.layers)]}
        return {
            "format": FORMAT, "version": 1, "model": self.model_name,
            "num_experts": self.num_experts, "num_experts_per_tok": self.cfg.num_experts_per_tok,
            "top_k": max(self.top_k) if self.top_k else 0, "num_hidden_layers": self.cfg.num_hidden_layers,
            "moe_layers": self.layers, "tokens": self.tokens, "sequences": self.sequences,
            "intervention": None if self.intervention is None else self.intervention.to_json(),
            "layers": [self.layer_summary(i) for i in range(len(self.layers))],
            "domains": doms,
        }

    def __getitem__(self, key):
        return self.to_json()[key]

    # -- files --------------------------------------------------------------------------------
    def save(self, out_dir) -> str:
        """OUT/stats.json and OUT/counts.npz (co-activation, per-token-id counts, per-domain tables)."""
        os.makedirs(out_dir, exist_ok=True)
        li, tok, ex, c = self.token_counts.triples()
        arrays = dict(coactivation=self.coactivation, load=self.load, top1_load=self.top1_load,
                      token_layer=li.astype(np.int32), token_id=tok.astype(np.int32), token_expert=ex.astype(np.int32),
                      token_count=c, token_shape=np.asarray(self.token_counts.shape, np.int64),
                      layers=np.asarray(self.layers, np.int32))
        if self.token_counts.first_known:
            arrays["token_first"] = self.token_counts.first
        if self.coactivation_adjacent is not None:
            arrays["coactivation_adjacent"] = self.coactivation_adjacent
        tmp = os.path.join(out_dir, COUNTS_FILE + ".tmp")
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, os.path.join(out_dir, COUNTS_FILE))
        path = os.path.join(out_dir, STATS_FILE)
        write_json(path, self.to_json())
        return path

    @classmethod
    def load_dir(cls, out_dir) -> "RoutingStats":
        """Read back a capture directory (stats.json + counts.npz)."""
        from qwen3_jax.config import Qwen3Config

        path = os.path.join(out_dir, STATS_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{out_dir}: no {STATS_FILE} (run `qwen3-jax-routing capture` first)")
        with open(path) as f:
            js = json.load(f)
        if js.get("format") != FORMAT:
            raise ValueError(f"{path}: not a routing capture (format {js.get('format')!r})")
        n = js["num_hidden_layers"]
        cfg = Qwen3Config(num_hidden_layers=n, num_experts=js["num_experts"],
                          num_experts_per_tok=js["num_experts_per_tok"],
                          mlp_only_layers=[i for i in range(n) if i not in js["moe_layers"]],
                          vocab_size=1, num_attention_heads=1, num_key_value_heads=1, hidden_size=1)
        st = cls(cfg, model_name=js.get("model"))
        st.top_k = [layer["top_k"] for layer in js["layers"]]
        st.tokens, st.sequences = js["tokens"], js.get("sequences", 0)
        st.load = np.asarray([layer["load"] for layer in js["layers"]], np.int64)
        st.top1_load = np.asarray([layer["top1_load"] for layer in js["layers"]], np.int64)
        st.entropy_sum = np.asarray([layer["entropy_mean"] * st.tokens for layer in js["layers"]])
        st.topk_mass_sum = np.asarray([layer["topk_mass_mean"] * st.tokens for layer in js["layers"]])
        st.intervention_json = js.get("intervention")
        for name, d in js.get("domains", {}).items():
            st.domains[name] = dict(
                tokens=d["tokens"], load=np.asarray([x["load"] for x in d["layers"]], np.int64),
                top1_load=np.asarray([x["top1_load"] for x in d["layers"]], np.int64),
                entropy=np.asarray([x["entropy_mean"] * d["tokens"] for x in d["layers"]]),
                topk_mass=np.asarray([x["topk_mass_mean"] * d["tokens"] for x in d["layers"]]))
        cpath = os.path.join(out_dir, COUNTS_FILE)
        if os.path.isfile(cpath):
            with np.load(cpath) as z:
                st.coactivation = z["coactivation"].astype(np.int64)
                st.coactivation_adjacent = (z["coactivation_adjacent"].astype(np.int64)
                                            if "coactivation_adjacent" in z.files else None)
                _, v, e = (int(x) for x in z["token_shape"])
                tc = st.token_counts = TokenExpertCounts(len(st.layers), v, e)
                tc.keys = (z["token_layer"].astype(np.int64) * v + z["token_id"]) * e + z["token_expert"]
                tc.counts = z["token_count"].astype(np.int64)
                tc.first_known = "token_first" in z.files
                tc.first = z["token_first"].astype(np.int64) if tc.first_known else np.zeros_like(tc.counts)
                tc.seen = st.tokens
        else:
            st.coactivation_adjacent = None
        return st


def json_safe(obj):
    """obj with every non-finite float (NaN, inf) as None and numpy scalars / arrays as Python values."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path, obj, indent=1):
    """Strict JSON (json_safe; allow_nan=False), written through a temporary file."""
    with open(path + ".tmp", "w") as f:
        json.dump(json_safe(obj), f, indent=indent, allow_nan=False)
    os.replace(path + ".tmp", path)
    return os.path.basename(path)


def domain_specialization(load_e, tokens: int, num_experts: int, top_k: int) -> np.ndarray:
    """Share of a domain's tokens routed to each expert, scaled by E/k: 1 = the uniform share k/E."""
    return np.asarray(load_e, np.float64) / max(tokens, 1) * num_experts / max(top_k, 1)


def vocab_specialization(stats: RoutingStats, i: int, min_count: int = 1) -> dict:
    """Per token id (with >= min_count first-choice routings) at MoE layer index i: the share of its top-1
    routings that go to its most-used expert (ties: the first seen). Returns {"mean" (occurrence-weighted: the
    sum of the top counts over the sum of the counts), "mean_per_id" (the unweighted mean over token ids),
    "token_id" [n], "count" [n], "top_expert" [n], "share" [n]}; 1/E would be no specialization, 1 a fixed expert
    per token. OLMoE's definition (qwen3_jax.routing.olmoe) is the unweighted mean, over every token id."""
    li, tok, ex, c = stats.token_counts.triples()
    sel = li == i
    tok, ex, c, first = tok[sel], ex[sel], c[sel], stats.token_counts.first[sel]
    if tok.size == 0:
        return {"mean": None, "mean_per_id": None, "token_id": tok, "count": c, "top_expert": ex, "share": c * 0.0}
    order = np.lexsort((first, -c, tok))           # by token, largest count first, then the first seen
    tok, ex, c = tok[order], ex[order], c[order]
    first = np.r_[True, tok[1:] != tok[:-1]]
    starts = np.nonzero(first)[0]
    totals = np.add.reduceat(c, starts)
    ids, top, top_c = tok[starts], ex[starts], c[starts]
    keep = totals >= min_count
    share = top_c / totals
    return {"mean": float(top_c[keep].sum() / max(totals[keep].sum(), 1)) if keep.any() else None,
            "mean_per_id": float(share[keep].mean()) if keep.any() else None,
            "token_id": ids[keep], "count": totals[keep], "top_expert": top[keep], "share": share[keep]}


# ============================================================================ trace (npz, streamed)
class TraceWriter:
    """Routed experts per token, written as npz: routed_experts int16 [N, L_moe, k] (E: an empty slot of a
    smaller per-layer top-k), routed_weights float32 [N, L_moe, k], token_ids int32 [N], record int64 [N] (index
    of the input record), position int32 [N] (in the record), layers int32 [L_moe] (decoder layer ids). Rows are
    the real tokens in input order. Chunks go to temporary files until close(). schema: {name: (dtype, shape of
    one row)} of the arrays a trace with no tokens still holds (with 0 rows)."""

    def __init__(self, path, layers, schema: dict | None = None):
        self.path = os.fspath(path)
        self.layers = np.asarray(layers, np.int32)
        d = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(d, exist_ok=True)
        self._tmp = tempfile.mkdtemp(prefix=".trace-", dir=d)
        self._files: dict[str, Any] = {}
        self._meta: dict[str, tuple] = {name: (np.dtype(dt), tuple(tail))
                                        for name, (dt, tail) in (schema or {}).items()}
        self.n = 0

    def add(self, **arrays):
        for name, a in arrays.items():
            a = np.ascontiguousarray(a)
            if name not in self._files:
                self._files[name] = open(os.path.join(self._tmp, name), "wb")
                self._meta[name] = (a.dtype, a.shape[1:])
            self._files[name].write(a.tobytes())
        self.n += len(next(iter(arrays.values())))

    def close(self) -> str:
        for f in self._files.values():
            f.close()
        for name in self._meta:
            if name not in self._files:                 # no tokens: an empty array of the schema's shape
                open(os.path.join(self._tmp, name), "wb").close()
        out = self.path + ".tmp"
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, (dtype, tail) in self._meta.items():
                _zip_npy(zf, name, os.path.join(self._tmp, name), dtype, (self.n, *tail))
            _zip_array(zf, "layers", self.layers)
        os.replace(out, self.path)
        for name in self._meta:
            os.remove(os.path.join(self._tmp, name))
        os.rmdir(self._tmp)
        return self.path


def _zip_npy(zf, name, raw_path, dtype, shape):
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    with zf.open(name + ".npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_2_0(f, header)
        with open(raw_path, "rb") as src:
            while chunk := src.read(1 << 24):
                f.write(chunk)


def _zip_array(zf, name, a):
    with zf.open(name + ".npy", "w") as f:
        np.lib.format.write_array(f, np.asarray(a))


# ============================================================================ running the model
@dataclasses.dataclass
class Record:
    input_ids: np.ndarray     # [n] int
    domain: str | None = None
    index: int = 0            # position of the record in the input
    start: int = 0            # offset of these tokens in the record (a long record is run in pieces)


def as_records(batches, domains=None) -> Iterable[Record]:
    """Records from capture()'s inputs: 1-d id arrays (one record), 2-d [B, T] arrays (B records; with a
    dict's "attention_mask" only the masked-in tokens, which must be a prefix or suffix), dicts {"input_ids",
    "attention_mask"?, "domain"?}, or Record. domains: one per item (a name, or a list for 2-d items)."""
    dom_it = iter(domains) if domains is not None else None
    k = 0
    for item in batches:
        dom = next(dom_it, None) if dom_it is not None else None
        if isinstance(item, Record):
            yield dataclasses.replace(item, index=k, domain=item.domain if dom is None else dom)
            k += 1
            continue
        mask = None
        if isinstance(item, dict):
            dom = item.get("domain", dom)
            mask = item.get("attention_mask")
            item = item["input_ids"]
        ids = np.asarray(item)
        if ids.ndim == 1:
            ids, mask = ids[None], None if mask is None else np.asarray(mask)[None]
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"capture input {k}: expected integer token ids [T] or [B, T], got {ids.dtype} {ids.shape}")
        for r in range(ids.shape[0]):
            row = ids[r] if mask is None else ids[r][np.asarray(mask[r], bool)]
            d = dom[r] if isinstance(dom, (list, tuple)) else dom
            if row.size:
                yield Record(row, None if d is None else str(d), k)
            k += 1


def _bucket(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(n - 1, 0).bit_length())


def iter_batches(records: Iterable[Record], batch_size: int, max_len: int):
    """Fixed-shape batches (ids [B, T], valid [B, T], records): T a power of two (>= 16, <= max_len); a record
    longer than max_len is split into pieces of max_len tokens (each run as its own sequence)."""
    pending: list[Record] = []

    def emit(rs):
        t = min(_bucket(max(len(r.input_ids) for r in rs)), max_len)
        ids = np.zeros((batch_size, t), np.int32)
        valid = np.zeros((batch_size, t), bool)
        for j, r in enumerate(rs):
            ids[j, :len(r.input_ids)] = r.input_ids
            valid[j, :len(r.input_ids)] = True
        return ids, valid, rs + [None] * (batch_size - len(rs))

    for rec in records:
        for s in range(0, len(rec.input_ids), max_len):
            pending.append(dataclasses.replace(rec, input_ids=rec.input_ids[s:s + max_len], start=s))
            if len(pending) == batch_size:
                yield emit(pending)
                pending = []
    if pending:
        yield emit(pending)


@functools.lru_cache(maxsize=8)
def _stats_fn(graphdef, cfg, iv, trace: bool, out_sharding):
    def run(state, ids_bt, valid_bt):
        model = nnx.merge(graphdef, state)
        out = model(ids_bt, attention_mask=valid_bt.astype(jnp.int32))
        return batch_stats(out.router_logits, valid_bt, cfg, iv, trace)
    return jax.jit(run, out_shardings=out_sharding)


def batch_placer(model):
    """Host [B, T] arrays -> device arrays on the model's mesh (batch axes; every process passes the same)."""
    mesh = model.runtime.mesh
    if mesh is None:
        return jnp.asarray, None
    from jax.sharding import NamedSharding, PartitionSpec as P

    from qwen3_jax.partition import activation_sharding, place

    return (lambda a: place(a, activation_sharding("bt", a.shape, mesh))), NamedSharding(mesh, P())


def capture(model, batches, *, domains=None, intervention: Intervention | None = None, batch_size: int = 8,
            max_len: int | None = None, trace=None, stats: RoutingStats | None = None,
            progress=None) -> RoutingStats:
    """Run `model` over `batches` (see `as_records`) and return the routing statistics (RoutingStats).

    intervention: route under it (default: the model's runtime.routing). batch_size rows of at most max_len
    tokens (default: min(max_position_embeddings, 4096)) per forward. trace: a path, to also write the routed
    experts per token (TraceWriter). stats: add to an existing accumulator. Works on an expert-parallel mesh
    (the model's runtime.mesh); with several processes every process passes the same data."""
    cfg = model.config
    if not cfg.is_moe:
        raise ValueError("capture: the model has no MoE layers")
    iv = model.runtime.routing if intervention is None else intervention
    if iv is not None:
        iv.check(cfg)
        model = with_routing(model, iv)
    max_len = max_len or min(cfg.max_position_embeddings, 4096)
    stats = stats if stats is not None else RoutingStats(cfg, iv)
    put, out_sharding = batch_placer(model)
    graphdef, state = nnx.split(model)
    fn = _stats_fn(graphdef, cfg, iv, trace is not None, out_sharding)
    k_max = iv.max_top_k(cfg) if iv is not None and iv.changes_routing else cfg.num_experts_per_tok
    n_l = len(cfg.moe_layers)
    schema = dict(routed_experts=(np.int16, (n_l, k_max)), routed_weights=(np.float32, (n_l, k_max)),
                  token_ids=(np.int32, ()), record=(np.int64, ()), position=(np.int32, ()))
    writer = TraceWriter(trace, cfg.moe_layers, schema) if trace is not None else None
    try:
        for ids, valid, recs in iter_batches(as_records(batches, domains), batch_size, max_len):
            out = jax.device_get(fn(state, put(ids), put(valid)))
            stats.add(out, ids, valid, [None if r is None else r.domain for r in recs])
            if writer is not None:
                rec_bt = np.asarray([[-1 if r is None else r.index] for r in recs]) + np.zeros_like(ids)
                pos_bt = np.arange(ids.shape[1])[None] + np.asarray([[0 if r is None else r.start] for r in recs])
                writer.add(routed_experts=out["experts"][valid].astype(np.int16),
                           routed_weights=out["weights"][valid].astype(np.float32),
                           token_ids=ids[valid].astype(np.int32), record=rec_bt[valid].astype(np.int64),
                           position=pos_bt[valid].astype(np.int32))
            if progress is not None:
                progress(int(valid.sum()))
    finally:
        if writer is not None:
            writer.close()
    stats.token_counts.flush()
    return stats


def with_routing(model, iv):
    """A view of `model` (same parameters) whose runtime routes under iv."""
    if model.runtime.routing == iv:
        return model
    graphdef, state = nnx.split(model)
    view = nnx.merge(graphdef, state)
    view.runtime = view.runtime.replace(routing=iv)
    return view


# ============================================================================ evaluation
@functools.lru_cache(maxsize=8)
def _nll_fn(graphdef, out_sharding):
    from qwen3_jax.train.losses import cross_entropy_sum

    def run(state, ids_bt, valid_bt):
        model = nnx.merge(graphdef, state)
        out = model(ids_bt, attention_mask=valid_bt.astype(jnp.int32), return_hidden=True)
        tgt = jnp.concatenate([ids_bt[:, 1:], jnp.zeros_like(ids_bt[:, :1])], 1)
        w = (valid_bt & jnp.concatenate([valid_bt[:, 1:], jnp.zeros_like(valid_bt[:, :1])], 1)).astype(jnp.float32)
        row = lambda xs: cross_entropy_sum(model.unembed, xs[0][None], xs[1][None], xs[2][None])  # noqa: E731
        return jax.lax.map(row, (out.hidden_states, tgt, w)), jnp.sum(w, -1)    # per row: nll sum, targets
    return jax.jit(run, out_shardings=out_sharding)


def evaluate(model, batches, *, domains=None, intervention: Intervention | None = None, batch_size: int = 8,
             max_len: int | None = None) -> dict:
    """Next-token loss over the records (every token predicts the next one of its record): {"loss", "ppl",
    "tokens", "domains": {name: {"loss", "ppl", "tokens"}}}, under `intervention` (default: the model's
    runtime.routing; pass Intervention() for none). loss and ppl are None where there is no target (tokens 0);
    ppl also where it overflows a float."""
    cfg = model.config
    iv = model.runtime.routing if intervention is None else intervention
    if iv is not None:
        iv.check(cfg)
    model = with_routing(model, iv if iv is not None and (iv.changes_routing) else None)
    max_len = max_len or min(cfg.max_position_embeddings, 4096)
    put, out_sharding = batch_placer(model)
    graphdef, state = nnx.split(model)
    fn = _nll_fn(graphdef, out_sharding)
    tot = {}
    for ids, valid, recs in iter_batches(as_records(batches, domains), batch_size, max_len):
        s_b, n_b = jax.device_get(fn(state, put(ids), put(valid)))
        for r, s, n in zip(recs, s_b, n_b):
            if r is not None:
                acc = tot.setdefault(r.domain, [0.0, 0.0])
                acc[0] += float(s)
                acc[1] += float(n)
    loss_n = sum(v[0] for v in tot.values()), sum(v[1] for v in tot.values())

    def entry(s, n):       # no target token (one-token records): no loss (None, never NaN: JSON has no NaN)
        loss = s / n if n else None
        ppl = None if loss is None or loss > 700 else math.exp(loss)
        return {"loss": loss, "ppl": ppl, "tokens": int(n)}

    out = entry(*loss_n)
    out["domains"] = {str(d): entry(*v) for d, v in tot.items() if d is not None}
    return out


# ============================================================================ routing data files
def read_records(paths, tokenizer_fn, vocab_size: int, log=print):
    """(records, skipped): a Record per good line of the JSONL files (one of text, prompt, messages, input_ids,
    prompt_token_ids; an optional domain); bad lines `file:line: reason`, passed to log and skipped."""
    recs, skipped = [], []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    ids, dom = record_ids(json.loads(raw), tokenizer_fn, vocab_size)
                except (ValueError, TypeError) as e:
                    msg = f"{path}:{n}: {e}"
                    skipped.append(msg)
                    log(msg, file=sys.stderr)
                    continue
                recs.append(Record(np.asarray(ids, np.int32), dom, len(recs)))
    return recs, skipped


def record_ids(obj, tokenizer_fn, vocab_size):
    """(token ids, domain or None) of one JSONL object; ValueError naming what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    forms = [k for k in ("text", "prompt", "messages", "input_ids", "prompt_token_ids") if k in obj]
    if len(forms) != 1:
        raise ValueError("a line needs exactly one of text, prompt, messages, input_ids, prompt_token_ids"
                         + (f" (has {forms})" if forms else f" (keys: {sorted(obj)})"))
    dom = obj.get("domain")
    if dom is not None and not isinstance(dom, (str, int)):
        raise ValueError('"domain" must be a string')
    kind, value = forms[0], obj[forms[0]]
    if kind in ("input_ids", "prompt_token_ids"):
        if not isinstance(value, list) or not value or not all(isinstance(t, int) and not isinstance(t, bool)
                                                               for t in value):
            raise ValueError(f'"{kind}" must be a non-empty list of integers')
        ids = value
    elif kind in ("text", "prompt"):
        if not isinstance(value, str) or not value:
            raise ValueError(f'"{kind}" must be a non-empty string')
        ids = tokenizer_fn().encode(value, add_special_tokens=False)
    else:
        if not isinstance(value, list) or not value or not all(isinstance(m, dict) and "role" in m for m in value):
            raise ValueError('"messages" must be a non-empty list of {"role", "content"} objects')
        ids = tokenizer_fn().apply_chat_template(value, add_generation_prompt=False, tokenize=True)
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    if not ids:
        raise ValueError("no tokens")
    return ids, None if dom is None else str(dom)
