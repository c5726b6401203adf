"""OLMoE's routing statistics, under their own names, from a capture directory.

The definitions of Muennighoff et al. 2024 ("OLMoE: Open Mixture-of-Experts Language Models", arXiv 2409.02060)
as its code computes them (allenai/OLMoE scripts/run_routing_analysis.py, scripts/run_moe_analysis.py,
scripts/plot_routing_analysis_v2*.ipynb), so that numbers can be put next to the paper's figures:

    res = analyze("cap/", min_occurrences=1, saturation_reference="cap_final/")   # `report --olmoe` writes it

domain_specialization_pct [L, E] per domain: 100 k x (the domain's top-k assignments to expert e) / (all its top-k
    assignments) = the percent of the domain's tokens that have e among their top-k. Uniform routing: 100 k / E
    (the paper's dashed line). domain_specialization_top1_pct: the same with first choices only (uniform 100 / E).
    qwen3-jax's own `specialization` is this divided by 100 k / E (uniform = 1).
vocab_specialization_pct (current / next token), per layer: for each token id, the percent of its occurrences
    whose first-choice expert is the id's most frequent one; the unweighted mean over the token ids with at least
    `min_occurrences` occurrences (OLMoE: every id, min_occurrences=1). Next token: the id of the record's
    following token, paired with this position's routing (the paper's "ground-truth output tokens"); a record's
    last token has none. qwen3-jax's own vocab_specialization is occurrence-weighted (the sum of the top counts
    over the sum of the counts) over the ids with >= --min-count routings.
coactivation_adjacent [L, E, E], P(j | i) = (tokens whose ranked top-k has j right before or after i) / (tokens
    with i in their top-k): the rank-adjacent pairs OLMoE's co-activation analysis counts (`pairwise` over the
    ranked expert ids). qwen3-jax's own co-activation counts every pair of a token's top-k.
router_saturation_pct, against a reference capture of the same tokens (e.g. the final checkpoint's): per layer
    the mean over tokens of |top-k(A) & top-k(B)| / k, and the top-1 agreement, in percent. Captures of different
    top-k compare the first min(k_A, k_B) experts of each (their top-min(k)); the result says so.

Ties. A token id's most frequent expert is the first seen among equals (OLMoE's collections.Counter keeps the
order of insertion); the shares do not depend on it, only which expert is named. The routing's own ties (equal
router probabilities) go to the lower expert id, as the model routes (jax.lax.top_k); OLMoE ranks the experts
with np.argsort of the logits, whose order of equal logits numpy leaves unspecified.
"""

from __future__ import annotations

import os

import numpy as np

from .stats import STATS_FILE, TRACE_FILE, RoutingStats

REFERENCE = ("Muennighoff et al. 2024, arXiv 2409.02060; allenai/OLMoE scripts/run_routing_analysis.py, "
             "scripts/run_moe_analysis.py")
TRACE_ARRAYS = ("routed_experts", "token_ids", "record", "position")


# ============================================================================ definitions (pure numpy)
def domain_specialization(stats: RoutingStats) -> dict:
    """{domain: {"tokens", "pct" [L, E] (top-k), "top1_pct" [L, E]}} (module docstring)."""
    k = np.asarray(stats.top_k, np.float64)[:, None]
    out = {}
    for name, tab in sorted(stats.domains.items()):
        load = tab["load"].astype(np.float64)
        top1 = tab["top1_load"].astype(np.float64)
        out[name] = {"tokens": int(tab["tokens"]),
                     "pct": 100.0 * k * load / np.maximum(load.sum(-1, keepdims=True), 1),
                     "top1_pct": 100.0 * top1 / np.maximum(top1.sum(-1, keepdims=True), 1)}
    return out


def uniform_pct(stats: RoutingStats) -> tuple[list[float], float]:
    """The uniform lines of domain specialization: 100 k / E per layer (top-k), 100 / E (top-1)."""
    return [100.0 * k / stats.num_experts for k in stats.top_k], 100.0 / stats.num_experts


def vocab_from_counts(token_id, expert, count, first, min_occurrences: int = 1) -> dict:
    """OLMoE's vocabulary specialization of one layer from sparse (token id, expert) -> count entries and the
    stream index of each pair's first occurrence (ties: the first seen). Returns {"mean_pct" (None without ids),
    "token_id" [n], "occurrences" [n], "top_expert" [n], "share_pct" [n]} over the ids with >= min_occurrences."""
    tok, ex = np.asarray(token_id, np.int64), np.asarray(expert, np.int64)
    c, first = np.asarray(count, np.int64), np.asarray(first, np.int64)
    if tok.size == 0:
        e = np.zeros((0,), np.int64)
        return {"mean_pct": None, "token_id": e, "occurrences": e, "top_expert": e, "share_pct": np.zeros((0,))}
    order = np.lexsort((first, -c, tok))           # by token id; the largest count first, then the first seen
    tok, ex, c = tok[order], ex[order], c[order]
    starts = np.nonzero(np.r_[True, tok[1:] != tok[:-1]])[0]
    totals = np.add.reduceat(c, starts)
    share = 100.0 * c[starts] / totals
    keep = totals >= min_occurrences
    return {"mean_pct": float(share[keep].mean()) if keep.any() else None, "token_id": tok[starts][keep],
            "occurrences": totals[keep], "top_expert": ex[starts][keep], "share_pct": share[keep]}


def vocab_from_pairs(token_ids, experts, min_occurrences: int = 1) -> dict:
    """vocab_from_counts of (token id, first-choice expert) pairs given in stream order."""
    tok, ex = np.asarray(token_ids, np.int64), np.asarray(experts, np.int64)
    if tok.size == 0:
        return vocab_from_counts(tok, ex, tok, tok, min_occurrences)
    ne = int(ex.max()) + 1
    keys = tok * ne + ex
    order = np.argsort(keys, kind="stable")        # within a pair: stream order, so its first row is the first seen
    ks = keys[order]
    starts = np.nonzero(np.r_[True, ks[1:] != ks[:-1]])[0]
    counts = np.diff(np.r_[starts, ks.size])
    return vocab_from_counts(ks[starts] // ne, ks[starts] % ne, counts, order[starts], min_occurrences)


def next_token_pairs(trace: dict, layer_index: int):
    """(next token ids, first-choice experts) of one layer: each position with a following token in its record."""
    rec, pos = trace["record"], trace["position"]
    has_next = (rec[1:] == rec[:-1]) & (pos[1:] == pos[:-1] + 1)
    return trace["token_ids"][1:][has_next], trace["routed_experts"][:-1, layer_index, 0][has_next]


def coactivation_adjacent_p(stats: RoutingStats):
    """[L, E, E] P(j | i) of rank-adjacent pairs (module docstring), None when the capture has no such counts."""
    if stats.coactivation_adjacent is None:
        return None
    return stats.coactivation_adjacent / np.maximum(stats.load[:, :, None], 1)


def router_saturation(experts_a, experts_b, top_k_a, top_k_b) -> dict:
    """Per layer, for the routed experts [N, L, k_max] of the same N tokens (ranked; trace `routed_experts`) and
    the per-layer top-k of each: {"top_k" (min of the two), "overlap" (mean over tokens of |top-k(A) & top-k(B)|
    / k), "top1_agreement"} as fractions, lists over layers. Symmetric in A and B."""
    ea, eb = np.asarray(experts_a, np.int64), np.asarray(experts_b, np.int64)
    ks, overlap, top1 = [], [], []
    for li in range(ea.shape[1]):
        k = int(min(top_k_a[li], top_k_b[li]))
        a, b = ea[:, li, :k], eb[:, li, :k]
        hit = (a[:, :, None] == b[:, None, :]).any(-1).sum(-1)
        ks.append(k)
        overlap.append(float(hit.mean() / k))
        top1.append(float((ea[:, li, 0] == eb[:, li, 0]).mean()))
    return {"top_k": ks, "overlap": overlap, "top1_agreement": top1}


# ============================================================================ files
def load_trace(capture_dir) -> dict:
    """The arrays of DIR/trace.npz that the analyses read; FileNotFoundError / ValueError with one clear line."""
    d = os.fspath(capture_dir)
    p = os.path.join(d, TRACE_FILE)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"{d}: no {TRACE_FILE}: capture with --trace (trace= in the Python API)")
    with np.load(p) as z:
        missing = [n for n in TRACE_ARRAYS if n not in z.files]
        if missing:
            raise ValueError(f"{p}: no {', '.join(missing)} (a trace of a capture with no tokens, written by an older "
                             "version): nothing to read")
        out = {n: z[n] for n in TRACE_ARRAYS + ("layers",)}
    if out["routed_experts"].shape[0] == 0:
        raise ValueError(f"{p}: the trace has no tokens (a capture of no records)")
    return out


def analyze(capture_dir, stats: RoutingStats | None = None, *, min_occurrences: int = 1,
            saturation_reference=None) -> dict:
    """OLMoE's quantities of a capture directory (module docstring). Returns {"domains" {name: {"tokens", "pct"
    [L, E], "top1_pct" [L, E]}}, "uniform_pct" [L], "uniform_top1_pct", "vocab_current" [L] and "vocab_next" [L]
    (vocab_from_counts dicts; vocab_next None without a trace), "coactivation_adjacent" [L, E, E] P(j | i) or None,
    "router_saturation" (router_saturation's dict + "reference", "tokens"; None without a reference), "notes"}.
    The current-token numbers come from counts.npz, the next-token ones from trace.npz."""
    d = os.fspath(capture_dir)
    stats = stats if stats is not None else RoutingStats.load_dir(d)
    if min_occurrences < 1:
        raise ValueError(f"min_occurrences must be >= 1, got {min_occurrences}")
    n_l = len(stats.layers)
    notes = []
    tc = stats.token_counts
    li, tok, ex, c = tc.triples()
    current = [vocab_from_counts(tok[li == i], ex[li == i], c[li == i], tc.first[li == i], min_occurrences)
               for i in range(n_l)]
    if not tc.first_known:
        notes.append("counts.npz has no first-seen index (written by an older version): among experts with equal "
                     "counts, a token id's most frequent expert is the lowest id")
    nxt = None
    has_trace = os.path.isfile(os.path.join(d, TRACE_FILE))
    if has_trace:
        trace = load_trace(d)
        nxt = [vocab_from_pairs(*next_token_pairs(trace, i), min_occurrences) for i in range(n_l)]
    else:
        notes.append(f"next-token vocabulary specialization needs {TRACE_FILE}: capture with --trace")
    adj = coactivation_adjacent_p(stats)
    if adj is None:
        notes.append("counts.npz has no rank-adjacent co-activation counts (written by an older version): "
                     "capture again")
    sat = None
    if saturation_reference is not None:
        ref = os.fspath(saturation_reference)
        if not os.path.isfile(os.path.join(ref, STATS_FILE)):
            raise FileNotFoundError(f"{ref}: no {STATS_FILE} (the saturation reference must be a capture directory)")
        if not has_trace:
            raise FileNotFoundError(f"{d}: no {TRACE_FILE}: router saturation needs both captures with --trace")
        ref_trace, ref_stats = load_trace(ref), RoutingStats.load_dir(ref)
        check_same_tokens(d, trace, ref, ref_trace)
        sat = router_saturation(trace["routed_experts"], ref_trace["routed_experts"], stats.top_k, ref_stats.top_k)
        sat.update(reference=os.path.abspath(ref), tokens=int(trace["token_ids"].shape[0]))
        if stats.top_k != ref_stats.top_k:
            notes.append(f"router saturation: top-k {stats.top_k} vs the reference's {ref_stats.top_k}: compared the "
                         f"first min(k) experts of each ({sat['top_k']})")
    u, u1 = uniform_pct(stats)
    return {"domains": domain_specialization(stats), "uniform_pct": u, "uniform_top1_pct": u1,
            "vocab_current": current, "vocab_next": nxt, "coactivation_adjacent": adj, "router_saturation": sat,
            "min_occurrences": min_occurrences, "notes": notes}


def check_same_tokens(dir_a, a: dict, dir_b, b: dict):
    """ValueError unless two traces hold the same MoE layers and the same tokens."""
    if a["layers"].tolist() != b["layers"].tolist():
        raise ValueError(f"{dir_a} and {dir_b}: different MoE layers ({a['layers'].tolist()} vs "
                         f"{b['layers'].tolist()})")
    if a["token_ids"].shape != b["token_ids"].shape or not np.array_equal(a["token_ids"], b["token_ids"]):
        raise ValueError(f"{dir_a} and {dir_b} were captured on different tokens: capture the same data")
