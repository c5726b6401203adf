"""Reports of a routing capture: CSV/JSON numbers, matplotlib PNGs and one static HTML page; router saturation
between two captures.

    report("cap/")                      # cap/report/index.html (+ *.png, *.csv, summary.json)
    report("cap/", definitions="olmoe") # also OLMoE's quantities under their own names (olmoe_*.csv/png)
    compare("cap_step1000/", "cap_final/")   # per-layer top-k overlap on the same tokens (both captured with a trace)

What the page shows (one section each, qwen3-jax's definitions, DEFINITIONS): the layers x experts load heatmap
(each expert's share of the layer's assignments, x E: 1 = uniform); per layer the coefficient of variation and the
max/min load; domain specialization (per layer, each domain's share of tokens routed to each expert scaled by E/k:
1 = uniform, the dashed line; plus each domain's expert-share entropy and top-expert share); vocabulary
specialization (per token id, the share of its first-choice routings that go to its most-used expert, weighted by
occurrences; 1/E would be none); the co-activation matrix per layer (P(j | i): of the tokens routed to i, the
fraction also routed to j; the numbers in coactivation_layerNNN.csv beside the PNG). With definitions="olmoe",
a section with OLMoE's definitions (qwen3_jax.routing.olmoe): domain specialization in percent with its uniform
line 100 k / E, vocabulary specialization (unweighted mean over token ids, top-1, current and next token),
rank-adjacent co-activation, and router saturation against a reference capture.

Every JSON file is strict JSON: a number that does not exist (no tokens, an idle expert) is null, never NaN.
"""

from __future__ import annotations

import csv
import html
import json
import math
import os

import numpy as np

from . import olmoe
from .stats import STATS_FILE, RoutingStats, domain_specialization, vocab_specialization, write_json

REPORT_DIR = "report"
DEFINITIONS_CHOICES = ("qwen3-jax", "olmoe")

DEFINITIONS = {
    "qwen3-jax": {
        "specialization": "domains.csv / domain_layerNNN.png: a domain's top-k assignments to the expert / the "
                          "domain's tokens x E/k (uniform routing = 1) = OLMoE's domain_specialization_pct x E / "
                          "(100 k)",
        "domain_top_share": "domains.csv, summary.json domains.*.top_share: the share of the domain's top-k "
                            "assignments that go to its busiest expert (uniform 1/E, at most 1/k); neither OLMoE's "
                            "percent nor the E/k-scaled specialization",
        "domain_entropy": "the entropy (nats) of the domain's shares of top-k assignments over the experts (log E "
                          "= uniform)",
        "vocab_specialization": "layers.csv, summary.json: occurrence-weighted: the sum over token ids of the count "
                                "of each id's most frequent first-choice expert / the sum of their first-choice "
                                "routings, over the ids with >= min_count routings (OLMoE's is the unweighted mean "
                                "over ids)",
        "vocab_share": "vocab.csv share: one token id's count of its most frequent first-choice expert (ties: the "
                       "first seen) / its first-choice routings",
        "coactivation": "coactivation_layerNNN.csv / .png: P(j | i) = tokens with both i and j in their top-k "
                        "(every pair of the top-k) / tokens with i in their top-k (column n_i)",
    },
    "olmoe": {
        "domain_specialization_pct": "olmoe_domains.csv: 100 k x the domain's top-k assignments to the expert / "
                                     "all its top-k assignments (the percent of its tokens with the expert in their "
                                     "top-k); uniform routing = domain_uniform_pct = 100 k / E",
        "domain_specialization_top1_pct": "the same with first choices only; uniform 100 / E",
        "vocab_specialization_pct": "olmoe_layers.csv: per token id, the percent of its occurrences whose "
                                    "first-choice expert is its most frequent one; the unweighted mean over token ids "
                                    "with >= min_occurrences occurrences (OLMoE: 1). current: the token itself; next: "
                                    "the record's following token, paired with this position's routing",
        "coactivation_adjacent": "olmoe_coactivation_layerNNN.csv / .png: P(j | i) = tokens whose ranked top-k "
                                 "has j right before or after i / tokens with i in their top-k (column n_i)",
        "router_saturation_pct": "olmoe_layers.csv: against --saturation-reference (the same tokens): the mean over "
                                 "tokens of |top-k(A) & top-k(B)| / k, and the top-1 agreement, in percent",
    },
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    fig.savefig(path, dpi=90)
    _plt().close(fig)
    return os.path.basename(path)


def domain_metrics(stats: RoutingStats) -> dict:
    """{domain: {"tokens", "entropy" [L] (nats, of the domain's share of assignments over experts; log E =
    uniform), "top_share" [L] (the share of its assignments that go to its busiest expert: 1/E uniform, at most
    1/k), "specialization" [L, E] (E/k-scaled shares)}}."""
    out = {}
    for name, tab in sorted(stats.domains.items()):
        load = tab["load"].astype(np.float64)
        q = load / np.maximum(load.sum(-1, keepdims=True), 1)
        ent = -np.sum(np.where(q > 0, q * np.log(np.where(q > 0, q, 1)), 0), -1)
        spec = np.stack([domain_specialization(load[i], tab["tokens"], stats.num_experts, stats.top_k[i])
                         for i in range(len(stats.layers))]) if len(stats.layers) else np.zeros((0, stats.num_experts))
        out[name] = {"tokens": int(tab["tokens"]), "entropy": ent.tolist(), "top_share": q.max(-1).tolist(),
                     "specialization": spec}
    return out


def load_balance(stats: RoutingStats) -> dict:
    """Per layer: cv of the expert loads, max/min load ratio (None when some expert got nothing), max and min
    share of the assignments."""
    load = stats.load.astype(np.float64)
    share = load / np.maximum(load.sum(-1, keepdims=True), 1)
    mean = load.mean(-1)
    return {"cv": (load.std(-1) / np.maximum(mean, 1e-12)).tolist(),
            "max_min": [float(r.max() / r.min()) if r.min() > 0 else None for r in load],
            "max_share": share.max(-1).tolist(), "min_share": share.min(-1).tolist()}


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return os.path.basename(path)


def _token_text(tokenizer, ids):
    if tokenizer is None:
        return [""] * len(ids)
    return [tokenizer.decode([int(i)]) for i in ids]


def _matrix_csv(path, p_ij, n_i):
    """P(j | i) [E, E] beside its PNG: one row per expert i (its n_i tokens), one column per expert j."""
    e = p_ij.shape[0]
    return _write_csv(path, ["i", "n_i"] + [str(j) for j in range(e)],
                      [[i, int(n_i[i])] + [round(float(x), 6) for x in p_ij[i]] for i in range(e)])


def _fmt(x, nd=6):
    return "" if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(float(x), nd)


def report(capture_dir, out_dir=None, *, tokenizer=None, top_tokens: int = 50, min_count: int = 5,
           definitions: str = "qwen3-jax", olmoe_min_occurrences: int = 1, saturation_reference=None) -> str:
    """Write the report of a capture directory (stats.json + counts.npz); returns the path of index.html.
    tokenizer: a qwen3_jax.infer.Tokenizer (or a directory with tokenizer.json) to show token strings.
    definitions="olmoe": also OLMoE's quantities (qwen3_jax.routing.olmoe) under their own names: olmoe_*.csv,
    olmoe_*.png, summary.json "olmoe", their section of the page; olmoe_min_occurrences: token ids with fewer
    occurrences are left out of its vocabulary specialization (OLMoE: 1, every id); saturation_reference: a
    capture directory of the same tokens (both with a trace) to measure router saturation against."""
    if definitions not in DEFINITIONS_CHOICES:
        raise ValueError(f"definitions must be one of {', '.join(DEFINITIONS_CHOICES)}, got {definitions!r}")
    if saturation_reference is not None and definitions != "olmoe":
        raise ValueError("saturation_reference is read with definitions='olmoe' only")
    capture_dir = os.fspath(capture_dir)
    stats = RoutingStats.load_dir(capture_dir)
    if stats.tokens == 0:
        raise ValueError(f"{capture_dir}: the capture has no tokens ({STATS_FILE}: tokens 0): nothing to report")
    ol = None
    if definitions == "olmoe":
        ol = olmoe.analyze(capture_dir, stats, min_occurrences=olmoe_min_occurrences,
                           saturation_reference=saturation_reference)
    out_dir = os.fspath(out_dir or os.path.join(capture_dir, REPORT_DIR))
    os.makedirs(out_dir, exist_ok=True)
    if isinstance(tokenizer, (str, os.PathLike)):
        from qwen3_jax.infer import Tokenizer

        tokenizer = Tokenizer.from_pretrained(tokenizer)
    plt = _plt()
    layers, e = stats.layers, stats.num_experts
    n_l = len(layers)
    files: dict[str, list[str]] = {"csv": [], "png": []}
    bal = load_balance(stats)
    share = stats.load / np.maximum(stats.load.sum(-1, keepdims=True), 1)
    vocab = [vocab_specialization(stats, i, min_count=1) for i in range(n_l)]
    vocab_min = [vocab_specialization(stats, i, min_count=min_count) for i in range(n_l)]
    doms = domain_metrics(stats)

    # ---- numbers ------------------------------------------------------------------------------
    layer_rows = []
    for i, layer in enumerate(layers):
        n = max(stats.tokens, 1)
        layer_rows.append([layer, stats.top_k[i], stats.tokens, round(bal["cv"][i], 6),
                           "" if bal["max_min"][i] is None else round(bal["max_min"][i], 6),
                           int(stats.load[i].max()), int(stats.load[i].min()),
                           round(float(stats.entropy_sum[i] / n), 6), round(float(stats.topk_mass_sum[i] / n), 6),
                           "" if vocab_min[i]["mean"] is None else round(vocab_min[i]["mean"], 6)])
    layer_header = ["layer", "top_k", "tokens", "cv", "max_min_ratio", "max_load", "min_load", "entropy_mean",
                    "topk_mass_mean", f"vocab_specialization(min_count={min_count})"]
    files["csv"].append(_write_csv(os.path.join(out_dir, "layers.csv"), layer_header, layer_rows))
    files["csv"].append(_write_csv(
        os.path.join(out_dir, "load.csv"), ["layer", "expert", "load", "top1_load", "share_x_E"],
        [[layer, j, int(stats.load[i, j]), int(stats.top1_load[i, j]), round(float(share[i, j] * e), 6)]
         for i, layer in enumerate(layers) for j in range(e)]))
    if doms:
        files["csv"].append(_write_csv(
            os.path.join(out_dir, "domains.csv"),
            ["domain", "layer", "expert", "load", "specialization", "domain_entropy", "domain_top_share"],
            [[d, layer, j, int(stats.domains[d]["load"][i, j]), round(float(m["specialization"][i, j]), 6),
              round(m["entropy"][i], 6), round(m["top_share"][i], 6)]
             for d, m in doms.items() for i, layer in enumerate(layers) for j in range(e)]))
    vocab_rows = []
    for i, layer in enumerate(layers):
        v = vocab[i]
        order = np.argsort(-v["count"], kind="stable")[:top_tokens]
        texts = _token_text(tokenizer, v["token_id"][order])
        vocab_rows += [[layer, int(v["token_id"][o]), t, int(v["count"][o]), int(v["top_expert"][o]),
                        round(float(v["share"][o]), 6)] for o, t in zip(order, texts)]
    files["csv"].append(_write_csv(os.path.join(out_dir, "vocab.csv"),
                                   ["layer", "token_id", "token", "top1_count", "top_expert", "share"], vocab_rows))
    coact_p = stats.coactivation / np.maximum(stats.load[:, :, None], 1)
    coact_csvs = [_matrix_csv(os.path.join(out_dir, f"coactivation_layer{layer:03d}.csv"), coact_p[i], stats.load[i])
                  for i, layer in enumerate(layers)]
    files["csv"] += coact_csvs
    summary = {"capture": os.path.abspath(capture_dir), "model": stats.model_name, "tokens": stats.tokens,
               "num_experts": e, "top_k": stats.top_k, "layers": layers, "load_balance": bal,
               "entropy_mean": (stats.entropy_sum / max(stats.tokens, 1)).tolist(),
               "topk_mass_mean": (stats.topk_mass_sum / max(stats.tokens, 1)).tolist(),
               "vocab_specialization": [v["mean"] for v in vocab_min], "vocab_min_count": min_count,
               "domains": {d: {k: v for k, v in m.items() if k != "specialization"} for d, m in doms.items()},
               "coactivation_csv": coact_csvs,
               "definitions": {"qwen3-jax": DEFINITIONS["qwen3-jax"]}}
    if ol is not None:
        summary["definitions"]["olmoe"] = DEFINITIONS["olmoe"]
        summary["olmoe"], ol_files = _olmoe_numbers(ol, stats, out_dir, tokenizer, top_tokens)
        files["csv"] += ol_files
    write_json(os.path.join(out_dir, "summary.json"), summary)

    # ---- figures ------------------------------------------------------------------------------
    fig, ax = plt.subplots(figsize=(max(6.5, min(3 + 0.12 * e, 20)), 1.8 + 0.25 * n_l), constrained_layout=True)
    im = ax.imshow(share * e, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(n_l), [str(x) for x in layers])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title("expert load: share of assignments x E (1 = uniform)", fontsize=10)
    fig.colorbar(im, ax=ax)
    files["png"].append(_save(fig, os.path.join(out_dir, "load_heatmap.png")))

    fig, ax = plt.subplots(1, 2, figsize=(11, 3.5), constrained_layout=True)
    ax[0].plot(layers, bal["cv"], marker="o")
    ax[0].set_title("coefficient of variation of expert load")
    ax[0].set_xlabel("layer")
    mm = [np.nan if x is None else x for x in bal["max_min"]]
    ax[1].plot(layers, mm, marker="o", label="max/min load")
    ax[1].set_title("max / min expert load (gap: an idle expert)")
    ax[1].set_xlabel("layer")
    files["png"].append(_save(fig, os.path.join(out_dir, "balance.png")))

    domain_pngs = []
    if doms:
        names = list(doms)
        for i, layer in enumerate(layers):
            domain_pngs.append(_domain_bars(
                os.path.join(out_dir, f"domain_layer{layer:03d}.png"), {d: doms[d]["specialization"][i] for d in names},
                1.0, "uniform (k/E)", "share of domain's tokens x E/k", f"layer {layer}: domain specialization"))
        fig, ax = plt.subplots(1, 2, figsize=(11, 3.5), constrained_layout=True)
        for d in names:
            ax[0].plot(layers, doms[d]["entropy"], marker="o", label=d)
            ax[1].plot(layers, doms[d]["top_share"], marker="o", label=d)
        ax[0].axhline(np.log(e), color="k", ls="--", lw=1, label="uniform (log E)")
        ax[0].set_title("per-domain expert-share entropy (nats)")
        ax[1].axhline(1 / e, color="k", ls="--", lw=1, label="uniform (1/E)")
        ax[1].set_title("per-domain top-expert share")
        for a in ax:
            a.set_xlabel("layer")
            a.legend(fontsize=7)
        files["png"].append(_save(fig, os.path.join(out_dir, "domain_summary.png")))
        files["png"] += domain_pngs

    fig, ax = plt.subplots(1, 2, figsize=(11, 3.5), constrained_layout=True)
    ax[0].plot(layers, [np.nan if v["mean"] is None else v["mean"] for v in vocab_min], marker="o")
    ax[0].axhline(1 / e, color="k", ls="--", lw=1, label="no specialization (1/E)")
    ax[0].set_ylim(0, 1.05)
    ax[0].set_title(f"vocabulary specialization (token ids with >= {min_count} routings)")
    ax[0].set_xlabel("layer")
    ax[0].legend(fontsize=7)
    for i, layer in enumerate(layers):
        if vocab[i]["share"].size:
            ax[1].hist(vocab[i]["share"], bins=20, range=(0, 1), histtype="step", label=f"layer {layer}")
    ax[1].set_title("per token id: share of its top expert")
    if n_l <= 8:
        ax[1].legend(fontsize=7)
    files["png"].append(_save(fig, os.path.join(out_dir, "vocab.png")))

    coact_pngs = [_heatmap(os.path.join(out_dir, f"coactivation_layer{layer:03d}.png"), coact_p[i],
                           f"layer {layer}: co-activation P(j | i)") for i, layer in enumerate(layers)]
    files["png"] += coact_pngs
    ol_pngs = _olmoe_figures(ol, stats, out_dir) if ol is not None else None
    if ol_pngs:
        files["png"] += [p for v in ol_pngs.values() for p in ([v] if isinstance(v, str) else v)]

    # ---- the page -----------------------------------------------------------------------------
    esc = html.escape

    def table(header, rows):
        head = "".join(f"<th>{esc(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in r) + "</tr>" for r in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def img(name, alt, numbers=None):
        link = f' (<a href="{esc(numbers)}">numbers: {esc(numbers)}</a>)' if numbers else ""
        return f'<figure><img src="{esc(name)}" alt="{esc(alt)}"><figcaption>{esc(alt)}{link}</figcaption></figure>'

    ours = "<span class='def'>qwen3-jax definition</span>"
    parts = [f"<h1>Routing report: {esc(str(stats.model_name or capture_dir))}</h1>",
             f"<p>{stats.tokens} tokens, {n_l} MoE layers, {e} experts, top-k {sorted(set(stats.top_k))}."
             + (f" Intervention: <code>{esc(json.dumps(stats.intervention_json))}</code>."
                if getattr(stats, "intervention_json", None) else "") + "</p>",
             "<p>The sections below use qwen3-jax's definitions"
             + (" (then a section with OLMoE's, under their own names)" if ol is not None else "")
             + "; <a href='#definitions'>definitions</a>.</p>",
             "<h2>Expert load</h2>", img("load_heatmap.png", "layers x experts load heatmap"),
             img("balance.png", "per-layer coefficient of variation and max/min load"),
             table(layer_header, layer_rows)]
    if doms:
        parts += [f"<h2>Domain specialization ({ours})</h2>",
                  "<p>Per layer, each domain's share of tokens routed to each expert, scaled by E/k: 1 (dashed) is "
                  "the uniform share k/E; higher bars are experts the domain prefers.</p>",
                  img("domain_summary.png", "per-domain expert-share entropy and top-expert share"),
                  table(["domain", "tokens"] + [f"top share L{x}" for x in layers],
                        [[d, m["tokens"]] + [round(s, 4) for s in m["top_share"]] for d, m in doms.items()])]
        parts += ["<details open><summary>per layer</summary>"] + \
            [img(p, f"domain specialization, layer {x}") for p, x in zip(domain_pngs, layers)] + ["</details>"]
    parts += [f"<h2>Vocabulary specialization ({ours})</h2>",
              "<p>For each token id, the share of its first-choice routings that go to its most-used expert "
              "(1/E: none; 1: always the same expert); the per-layer number is weighted by occurrences.</p>",
              img("vocab.png", "vocabulary specialization"),
              "<details><summary>most frequent tokens (vocab.csv)</summary>",
              table(["layer", "token_id", "token", "top1_count", "top_expert", "share"], vocab_rows[:top_tokens * 2]),
              "</details>",
              f"<h2>Co-activation ({ours})</h2><p>Of the tokens routed to expert i, the fraction also routed to "
              "expert j (every pair of the top-k).</p>"]
    parts += [img(p, f"co-activation, layer {x}", c) for p, x, c in zip(coact_pngs, layers, coact_csvs)]
    if ol is not None:
        parts += _olmoe_section(summary["olmoe"], ol_pngs, layers, img, table)
    parts += ["<h2 id='definitions'>Definitions</h2>"]
    for name, defs in summary["definitions"].items():
        parts += [f"<h3>{esc(name)}</h3><dl>"
                  + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in defs.items()) + "</dl>"]
    parts += ["<h2>Files</h2><ul>" + "".join(f'<li><a href="{esc(f)}">{esc(f)}</a></li>'
                                              for f in files["csv"] + ["summary.json"]) + "</ul>"]
    style = ("body{font-family:sans-serif;max-width:1200px;margin:1em auto;padding:0 1em}"
             "img{max-width:100%}table{border-collapse:collapse;font-size:12px;margin:.5em 0}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}figure{margin:.5em 0}"
             ".def{font-size:70%;font-weight:normal;color:#555}dt{font-weight:bold}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Routing report</title><style>{style}</style>"
            f"</head><body>{''.join(parts)}</body></html>")
    path = os.path.join(out_dir, "index.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


def _heatmap(path, p_ij, title):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4.3), constrained_layout=True)
    im = ax.imshow(p_ij, cmap="magma", interpolation="nearest", vmin=0)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("expert j")
    ax.set_ylabel("expert i")
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def _domain_bars(path, values: dict, uniform, uniform_label, ylabel, title, ylim=None):
    plt = _plt()
    names = list(values)
    e = len(next(iter(values.values())))
    fig, ax = plt.subplots(figsize=(min(4 + 0.12 * e, 20), 3.2), constrained_layout=True)
    width = 0.8 / len(names)
    for j, d in enumerate(names):
        ax.bar(np.arange(e) + (j - (len(names) - 1) / 2) * width, values[d], width, label=d)
    ax.axhline(uniform, color="k", ls="--", lw=1, label=uniform_label)
    ax.set_xlabel("expert")
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=min(len(names) + 1, 6))
    return _save(fig, path)


def _olmoe_numbers(ol: dict, stats: RoutingStats, out_dir, tokenizer, top_tokens) -> tuple[dict, list[str]]:
    """OLMoE's quantities as summary.json's "olmoe" block, and the olmoe_*.csv files."""
    layers, e = stats.layers, stats.num_experts
    files = []
    doms, sat = ol["domains"], ol["router_saturation"]
    cur, nxt = ol["vocab_current"], ol["vocab_next"]
    rows = []
    for i, layer in enumerate(layers):
        rows.append([layer, stats.top_k[i], _fmt(ol["uniform_pct"][i]), _fmt(ol["uniform_top1_pct"]),
                     _fmt(cur[i]["mean_pct"]), len(cur[i]["token_id"]),
                     "" if nxt is None else _fmt(nxt[i]["mean_pct"]), "" if nxt is None else len(nxt[i]["token_id"]),
                     "" if sat is None else _fmt(100 * sat["overlap"][i]),
                     "" if sat is None else _fmt(100 * sat["top1_agreement"][i])])
    files.append(_write_csv(os.path.join(out_dir, "olmoe_layers.csv"),
                            ["layer", "top_k", "domain_uniform_pct", "domain_uniform_top1_pct",
                             "vocab_specialization_current_pct", "vocab_token_ids_current",
                             "vocab_specialization_next_pct", "vocab_token_ids_next", "router_saturation_topk_pct",
                             "router_saturation_top1_pct"], rows))
    if doms:
        files.append(_write_csv(
            os.path.join(out_dir, "olmoe_domains.csv"),
            ["domain", "layer", "expert", "tokens", "topk_count", "domain_specialization_pct", "top1_count",
             "domain_specialization_top1_pct"],
            [[d, layer, j, m["tokens"], int(stats.domains[d]["load"][i, j]), _fmt(m["pct"][i, j]),
              int(stats.domains[d]["top1_load"][i, j]), _fmt(m["top1_pct"][i, j])]
             for d, m in doms.items() for i, layer in enumerate(layers) for j in range(e)]))
    vrows = []
    for kind, vs in (("current", cur), ("next", nxt)):
        for i, layer in enumerate(layers if vs is not None else []):
            v = vs[i]
            order = np.argsort(-v["occurrences"], kind="stable")[:top_tokens]
            vrows += [[layer, kind, int(v["token_id"][o]), t, int(v["occurrences"][o]), int(v["top_expert"][o]),
                       _fmt(v["share_pct"][o])] for o, t in zip(order, _token_text(tokenizer, v["token_id"][order]))]
    files.append(_write_csv(os.path.join(out_dir, "olmoe_vocab.csv"),
                            ["layer", "position", "token_id", "token", "occurrences", "top_expert", "share_pct"],
                            vrows))
    adj_csvs = None
    if ol["coactivation_adjacent"] is not None:
        adj_csvs = [_matrix_csv(os.path.join(out_dir, f"olmoe_coactivation_layer{layer:03d}.csv"),
                                ol["coactivation_adjacent"][i], stats.load[i]) for i, layer in enumerate(layers)]
        files += adj_csvs
    block = {
        "definitions": "olmoe", "reference": olmoe.REFERENCE, "layers": layers, "top_k": stats.top_k,
        "num_experts": e,
        "domain_uniform_pct": ol["uniform_pct"], "domain_uniform_top1_pct": ol["uniform_top1_pct"],
        "domain_specialization_pct": {d: m["pct"] for d, m in doms.items()},
        "domain_specialization_top1_pct": {d: m["top1_pct"] for d, m in doms.items()},
        "domain_tokens": {d: m["tokens"] for d, m in doms.items()},
        "vocab_min_occurrences": ol["min_occurrences"],
        "vocab_specialization_current_pct": [v["mean_pct"] for v in cur],
        "vocab_token_ids_current": [len(v["token_id"]) for v in cur],
        "vocab_specialization_next_pct": None if nxt is None else [v["mean_pct"] for v in nxt],
        "vocab_token_ids_next": None if nxt is None else [len(v["token_id"]) for v in nxt],
        "coactivation_adjacent_csv": adj_csvs,
        "router_saturation": None if sat is None else {
            "reference": sat["reference"], "tokens": sat["tokens"], "top_k": sat["top_k"],
            "topk_pct": [100 * x for x in sat["overlap"]], "top1_pct": [100 * x for x in sat["top1_agreement"]]},
        "notes": ol["notes"],
    }
    return block, files


def _olmoe_figures(ol: dict, stats: RoutingStats, out_dir) -> dict:
    plt = _plt()
    layers = stats.layers
    out = {"domain": [], "coactivation": []}
    if ol["domains"]:
        for i, layer in enumerate(layers):
            out["domain"].append(_domain_bars(
                os.path.join(out_dir, f"olmoe_domain_layer{layer:03d}.png"),
                {d: m["pct"][i] for d, m in ol["domains"].items()}, ol["uniform_pct"][i],
                f"uniform (100 k/E = {ol['uniform_pct'][i]:.3g}%)", "domain specialization (%)",
                f"layer {layer}: domain specialization (OLMoE)", ylim=(0, 100)))
    fig, ax = plt.subplots(figsize=(6.5, 3.5), constrained_layout=True)
    cur = [np.nan if v["mean_pct"] is None else v["mean_pct"] for v in ol["vocab_current"]]
    ax.plot(layers, cur, marker="o", label="input token (current)")
    if ol["vocab_next"] is not None:
        nxt = [np.nan if v["mean_pct"] is None else v["mean_pct"] for v in ol["vocab_next"]]
        ax.plot(layers, nxt, marker="s", label="ground-truth output token (next)")
    ax.set_ylim(0, 105)
    ax.set_xticks(layers if len(layers) <= 24 else layers[::4])
    ax.set_xlabel("layer")
    ax.set_ylabel("vocabulary specialization (%)")
    ax.set_title(f"vocabulary specialization (OLMoE, top-1, ids with >= {ol['min_occurrences']} occurrences)",
                 fontsize=9)
    ax.legend(fontsize=7)
    out["vocab"] = _save(fig, os.path.join(out_dir, "olmoe_vocab.png"))
    if ol["coactivation_adjacent"] is not None:
        out["coactivation"] = [
            _heatmap(os.path.join(out_dir, f"olmoe_coactivation_layer{layer:03d}.png"), ol["coactivation_adjacent"][i],
                     f"layer {layer}: rank-adjacent co-activation P(j | i) (OLMoE)") for i, layer in enumerate(layers)]
    sat = ol["router_saturation"]
    if sat is not None:
        fig, ax = plt.subplots(figsize=(6.5, 3.5), constrained_layout=True)
        ax.plot(layers, [100 * x for x in sat["overlap"]], marker="o", label="top-k")
        ax.plot(layers, [100 * x for x in sat["top1_agreement"]], marker="s", label="top-1")
        ax.set_ylim(0, 105)
        ax.set_xticks(layers if len(layers) <= 24 else layers[::4])
        ax.set_xlabel("layer")
        ax.set_ylabel("router saturation (%)")
        ax.set_title("router saturation against the reference (OLMoE)", fontsize=10)
        ax.legend(fontsize=7)
        out["saturation"] = _save(fig, os.path.join(out_dir, "olmoe_router_saturation.png"))
    return out


def _olmoe_section(block: dict, pngs: dict, layers, img, table) -> list[str]:
    esc = html.escape
    tag = "<span class='def'>OLMoE definition</span>"
    sat = block["router_saturation"]
    parts = ["<h2>OLMoE's definitions</h2>",
             f"<p>The quantities of {esc(block['reference'])}, under their own names (olmoe_*.csv, summary.json "
             "\"olmoe\"), to put next to the paper's figures.</p>"]
    parts += [f"<p><b>Note:</b> {esc(n)}</p>" for n in block["notes"]]
    header = ["layer", "top_k", "domain uniform %", "vocab spec. current %", "vocab spec. next %"]
    nxt = block["vocab_specialization_next_pct"]
    rows = [[x, block["top_k"][i], _fmt(block["domain_uniform_pct"][i], 3),
             _fmt(block["vocab_specialization_current_pct"][i], 3), "" if nxt is None else _fmt(nxt[i], 3)]
            for i, x in enumerate(layers)]
    if sat is not None:
        header += ["router saturation top-k %", "router saturation top-1 %"]
        rows = [r + [_fmt(sat["topk_pct"][i], 3), _fmt(sat["top1_pct"][i], 3)] for i, r in enumerate(rows)]
    parts.append(table(header, rows))
    if pngs["domain"]:
        parts += [f"<h3>Domain specialization ({tag})</h3>",
                  "<p>The percent of each domain's tokens that have the expert among their top-k; the dashed line is "
                  "uniform routing, 100 k / E.</p>"]
        parts += [img(p, f"domain specialization (%), layer {x}") for p, x in zip(pngs["domain"], layers)]
    parts += [f"<h3>Vocabulary specialization ({tag})</h3>",
              f"<p>Per token id, the percent of its occurrences routed (first choice) to its most frequent expert; "
              f"the unweighted mean over the ids with >= {block['vocab_min_occurrences']} occurrences, for the "
              "input token and for the next (ground-truth output) token.</p>",
              img(pngs["vocab"], "vocabulary specialization (%)")]
    if pngs["coactivation"]:
        parts += [f"<h3>Co-activation, rank-adjacent pairs ({tag})</h3>",
                  "<p>Of the tokens routed to expert i, the fraction whose ranked top-k has j right before or after "
                  "i.</p>"]
        parts += [img(p, f"rank-adjacent co-activation, layer {x}", c)
                  for p, x, c in zip(pngs["coactivation"], layers, block["coactivation_adjacent_csv"])]
    if sat is not None:
        parts += [f"<h3>Router saturation ({tag})</h3>",
                  f"<p>Against {esc(sat['reference'])} on the same {sat['tokens']} tokens, top-k {sat['top_k']}.</p>",
                  img(pngs["saturation"], "router saturation (%)")]
    return parts


def compare(dir_a, dir_b, out_dir=None) -> dict:
    """Router saturation between two captures of the same tokens (each captured with a trace): per MoE layer,
    the mean over tokens of |top-k(A) & top-k(B)| / k. Captures of different top-k compare the first
    min(k_A, k_B) experts of each (their top-min(k)) and say so in "note"; the result is symmetric in A and B.
    Writes compare.json and compare.png to out_dir (default: dir_b/compare) and returns {"layers", "overlap",
    "top1_agreement", "tokens", "top_k" {"a", "b", "compared"}, "note"}. One clear error (FileNotFoundError /
    ValueError) for a missing trace, an empty capture, or different tokens."""
    traces, top_ks = [], []
    for d in (dir_a, dir_b):
        top_ks.append(_top_k(d))
        traces.append(olmoe.load_trace(d))
    a, b = traces
    olmoe.check_same_tokens(dir_a, a, dir_b, b)
    sat = olmoe.router_saturation(a["routed_experts"], b["routed_experts"], *top_ks)
    layers = a["layers"].tolist()
    note = None
    if top_ks[0] != top_ks[1]:
        note = (f"different top-k (A {top_ks[0]}, B {top_ks[1]}): compared the first min(k) experts of each, "
                f"top-{sat['top_k']}")
    res = {"a": os.path.abspath(dir_a), "b": os.path.abspath(dir_b), "tokens": int(a["token_ids"].shape[0]),
           "layers": layers, "overlap": sat["overlap"], "top1_agreement": sat["top1_agreement"],
           "top_k": {"a": top_ks[0], "b": top_ks[1], "compared": sat["top_k"]}, "note": note,
           "definitions": {"overlap": "mean over tokens of |top-k(A) & top-k(B)| / k: OLMoE's router saturation "
                                      "(a fraction; the paper writes percent)",
                           "top1_agreement": "the fraction of tokens with the same first choice (OLMoE's top-1 "
                                             "router saturation)"}}
    out_dir = os.fspath(out_dir or os.path.join(os.fspath(dir_b), "compare"))
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "compare.json"), res)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5), constrained_layout=True)
    ax.plot(layers, sat["overlap"], marker="o", label="top-k overlap")
    ax.plot(layers, sat["top1_agreement"], marker="s", label="top-1 agreement")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("layer")
    ax.set_title("router saturation: routing of A vs B on the same tokens")
    ax.legend()
    _save(fig, os.path.join(out_dir, "compare.png"))
    return res


def _top_k(capture_dir) -> list[int]:
    p = os.path.join(os.fspath(capture_dir), STATS_FILE)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"{capture_dir}: no {STATS_FILE}")
    with open(p) as f:
        js = json.load(f)
    return [int(x["top_k"]) for x in js["layers"]]
