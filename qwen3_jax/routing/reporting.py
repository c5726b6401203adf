"""Reports of a routing capture: CSV/JSON numbers, matplotlib PNGs and one static HTML page; router saturation
between two captures.

    report("cap/")                      # cap/report/index.html (+ *.png, *.csv, summary.json)
    compare("cap_step1000/", "cap_final/")   # per-layer top-k overlap on the same tokens (both captured with a trace)

What the page shows (one section each): the layers x experts load heatmap (each expert's share of the layer's
assignments, x E: 1 = uniform); per layer the coefficient of variation and the max/min load; domain
specialization (per layer, each domain's share of tokens routed to each expert scaled by E/k: 1 = uniform, the
dashed line; plus each domain's expert-share entropy and top-expert share); vocabulary specialization (per
token id, the share of its first-choice routings that go to its most-used expert; 1/E would be none); the
co-activation matrix per layer (P(j | i): of the tokens routed to i, the fraction also routed to j).
"""

from __future__ import annotations

import csv
import html
import json
import os

import numpy as np

from .stats import TRACE_FILE, RoutingStats, domain_specialization, vocab_specialization

REPORT_DIR = "report"


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
    uniform), "top_share" [L] (the share of its busiest expert; k/E... spread, 1 = one expert), "specialization"
    [L, E] (E/k-scaled shares)}}."""
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


def report(capture_dir, out_dir=None, *, tokenizer=None, top_tokens: int = 50, min_count: int = 5) -> str:
    """Write the report of a capture directory (stats.json + counts.npz); returns the path of index.html.
    tokenizer: a qwen3_jax.infer.Tokenizer (or a directory with tokenizer.json) to show token strings."""
    capture_dir = os.fspath(capture_dir)
    stats = RoutingStats.load_dir(capture_dir)
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
    summary = {"capture": os.path.abspath(capture_dir), "model": stats.model_name, "tokens": stats.tokens,
               "num_experts": e, "top_k": stats.top_k, "layers": layers, "load_balance": bal,
               "entropy_mean": (stats.entropy_sum / max(stats.tokens, 1)).tolist(),
               "topk_mass_mean": (stats.topk_mass_sum / max(stats.tokens, 1)).tolist(),
               "vocab_specialization": [v["mean"] for v in vocab_min], "vocab_min_count": min_count,
               "domains": {d: {k: v for k, v in m.items() if k != "specialization"} for d, m in doms.items()}}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)

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
            fig, ax = plt.subplots(figsize=(min(4 + 0.12 * e, 20), 3.2), constrained_layout=True)
            width = 0.8 / len(names)
            for j, d in enumerate(names):
                ax.bar(np.arange(e) + (j - (len(names) - 1) / 2) * width, doms[d]["specialization"][i], width,
                       label=d)
            ax.axhline(1.0, color="k", ls="--", lw=1, label="uniform (k/E)")
            ax.set_xlabel("expert")
            ax.set_ylabel("share of domain's tokens x E/k")
            ax.set_title(f"layer {layer}: domain specialization")
            ax.legend(fontsize=7, ncol=min(len(names) + 1, 6))
            domain_pngs.append(_save(fig, os.path.join(out_dir, f"domain_layer{layer:03d}.png")))
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

    coact_pngs = []
    for i, layer in enumerate(layers):
        co = stats.coactivation[i].astype(np.float64)
        cond = co / np.maximum(stats.load[i][:, None], 1)
        fig, ax = plt.subplots(figsize=(5, 4.3), constrained_layout=True)
        im = ax.imshow(cond, cmap="magma", interpolation="nearest", vmin=0)
        ax.set_title(f"layer {layer}: co-activation P(j | i)")
        ax.set_xlabel("expert j")
        ax.set_ylabel("expert i")
        fig.colorbar(im, ax=ax)
        coact_pngs.append(_save(fig, os.path.join(out_dir, f"coactivation_layer{layer:03d}.png")))
    files["png"] += coact_pngs

    # ---- the page -----------------------------------------------------------------------------
    esc = html.escape

    def table(header, rows):
        head = "".join(f"<th>{esc(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in r) + "</tr>" for r in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def img(name, alt):
        return f'<figure><img src="{esc(name)}" alt="{esc(alt)}"><figcaption>{esc(alt)}</figcaption></figure>'

    parts = [f"<h1>Routing report: {esc(str(stats.model_name or capture_dir))}</h1>",
             f"<p>{stats.tokens} tokens, {n_l} MoE layers, {e} experts, top-k {sorted(set(stats.top_k))}."
             + (f" Intervention: <code>{esc(json.dumps(stats.intervention_json))}</code>."
                if getattr(stats, "intervention_json", None) else "") + "</p>",
             "<h2>Expert load</h2>", img("load_heatmap.png", "layers x experts load heatmap"),
             img("balance.png", "per-layer coefficient of variation and max/min load"),
             table(layer_header, layer_rows)]
    if doms:
        parts += ["<h2>Domain specialization</h2>",
                  "<p>Per layer, each domain's share of tokens routed to each expert, scaled by E/k: 1 (dashed) is "
                  "the uniform share k/E; higher bars are experts the domain prefers.</p>",
                  img("domain_summary.png", "per-domain expert-share entropy and top-expert share"),
                  table(["domain", "tokens"] + [f"top share L{x}" for x in layers],
                        [[d, m["tokens"]] + [round(s, 4) for s in m["top_share"]] for d, m in doms.items()])]
        parts += ["<details open><summary>per layer</summary>"] + \
            [img(p, f"domain specialization, layer {x}") for p, x in zip(domain_pngs, layers)] + ["</details>"]
    parts += ["<h2>Vocabulary specialization</h2>",
              "<p>For each token id, the share of its first-choice routings that go to its most-used expert "
              "(1/E: none; 1: always the same expert).</p>", img("vocab.png", "vocabulary specialization"),
              "<details><summary>most frequent tokens (vocab.csv)</summary>",
              table(["layer", "token_id", "token", "top1_count", "top_expert", "share"], vocab_rows[:top_tokens * 2]),
              "</details>",
              "<h2>Co-activation</h2><p>Of the tokens routed to expert i, the fraction also routed to expert j.</p>"]
    parts += [img(p, f"co-activation, layer {x}") for p, x in zip(coact_pngs, layers)]
    parts += ["<h2>Files</h2><ul>" + "".join(f'<li><a href="{esc(f)}">{esc(f)}</a></li>'
                                              for f in files["csv"] + ["summary.json"]) + "</ul>"]
    style = ("body{font-family:sans-serif;max-width:1200px;margin:1em auto;padding:0 1em}"
             "img{max-width:100%}table{border-collapse:collapse;font-size:12px;margin:.5em 0}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}figure{margin:.5em 0}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Routing report</title><style>{style}</style>"
            f"</head><body>{''.join(parts)}</body></html>")
    path = os.path.join(out_dir, "index.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


def compare(dir_a, dir_b, out_dir=None) -> dict:
    """Router saturation between two captures of the same tokens (each captured with a trace): per MoE layer,
    the mean over tokens of |top-k(A) & top-k(B)| / k. Writes compare.json and compare.png to out_dir
    (default: dir_b/compare) and returns {"layers", "overlap", "top1_agreement", "tokens"}."""
    traces = []
    for d in (dir_a, dir_b):
        p = os.path.join(os.fspath(d), TRACE_FILE)
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{d}: no {TRACE_FILE}: capture both with --trace (the same data)")
        traces.append(np.load(p))
    a, b = traces
    if a["layers"].tolist() != b["layers"].tolist():
        raise ValueError(f"{dir_a} and {dir_b}: different MoE layers ({a['layers'].tolist()} vs {b['layers'].tolist()})")
    if a["token_ids"].shape != b["token_ids"].shape or not np.array_equal(a["token_ids"], b["token_ids"]):
        raise ValueError(f"{dir_a} and {dir_b} were captured on different tokens: capture the same data")
    ea, eb = a["routed_experts"].astype(np.int64), b["routed_experts"].astype(np.int64)   # [N, L, k]
    e = _num_experts(dir_a)
    va, vb = ea < e, eb < e                                  # slots naming an expert (E: an empty slot)
    hit = ((ea[..., :, None] == eb[..., None, :]) & va[..., :, None] & vb[..., None, :]).any(-1).sum(-1)  # [N, L]
    overlap = (hit / np.maximum(va.sum(-1), 1)).mean(0)
    top1 = (ea[..., 0] == eb[..., 0]).mean(0)
    layers = a["layers"].tolist()
    res = {"a": os.path.abspath(dir_a), "b": os.path.abspath(dir_b), "tokens": int(ea.shape[0]), "layers": layers,
           "overlap": overlap.tolist(), "top1_agreement": top1.tolist()}
    out_dir = os.fspath(out_dir or os.path.join(os.fspath(dir_b), "compare"))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "compare.json"), "w") as f:
        json.dump(res, f, indent=1)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5), constrained_layout=True)
    ax.plot(layers, overlap, marker="o", label="top-k overlap")
    ax.plot(layers, top1, marker="s", label="top-1 agreement")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("layer")
    ax.set_title("router saturation: routing of A vs B on the same tokens")
    ax.legend()
    _save(fig, os.path.join(out_dir, "compare.png"))
    return res


def _num_experts(capture_dir) -> int:
    p = os.path.join(os.fspath(capture_dir), "stats.json")
    if not os.path.isfile(p):
        raise FileNotFoundError(f"{capture_dir}: no stats.json")
    with open(p) as f:
        return int(json.load(f)["num_experts"])
