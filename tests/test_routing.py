"""Routing toolkit: interventions on every MoE path, capture counts, REAP pruning, reports, the CLIs."""

import json
import os
import shutil
import subprocess

import jax
import numpy as np
import pytest
from flax import nnx

import qwen3_jax
from qwen3_jax import Qwen3ForCausalLM
from qwen3_jax.model import KVCache
from qwen3_jax.routing import Intervention, RoutingStats, capture, evaluate
from qwen3_jax.sharding import make_mesh

NAME = "moe_mixed_yarn_tied"     # layers 0, 2, 3 MoE (1 dense), 10 experts top-3, norm_topk_prob False


def _ids(cfg, b, t, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t)).astype(np.int32)


def _routed(model, iv):
    view = nnx.merge(*nnx.split(model))
    view.runtime = view.runtime.replace(routing=iv)
    return view


def _np_topk(logits_ne, k, disabled=()):
    """Reference routing in numpy: softmax over the non-disabled experts, top-k ids (descending)."""
    x = np.asarray(logits_ne, np.float64).copy()
    x[:, list(disabled)] = -np.inf
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.argsort(-p, axis=-1, kind="stable")[:, :k], p


# ============================================================================ interventions
def test_top_k_override_equals_config_top_k_on_every_path(reference):
    _, path, model = reference(NAME)
    cfg = model.config
    ids = _ids(cfg, 2, 9)
    k2 = Qwen3ForCausalLM(cfg.replace(num_experts_per_tok=2), rngs=nnx.Rngs(0))
    nnx.update(k2, nnx.state(model, nnx.Param))
    want = np.asarray(k2(ids).logits)
    over = _routed(model, Intervention(top_k=2))
    np.testing.assert_array_equal(np.asarray(over(ids).logits), want)           # layer scan
    unrolled = _routed(model, Intervention(top_k=2))
    unrolled.runtime = unrolled.runtime.replace(scan_layers=False)
    np.testing.assert_allclose(np.asarray(unrolled(ids).logits), want, atol=1e-5, rtol=0)
    assert not np.allclose(np.asarray(model(ids).logits), want, atol=1e-3)     # top-2 differs from top-3
    # KV-cached: prefill 8 tokens, decode the 9th (the CPU decode kernels' path) == the full forward
    cache = KVCache.init(cfg, 2, 16)
    pre = over(ids[:, :8], cache=cache)
    step = over(ids[:, 8:], cache=pre.cache)
    np.testing.assert_allclose(np.asarray(step.logits[:, 0]), want[:, 8], atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(pre.logits), want[:, :8], atol=1e-4, rtol=0)
    # expert-parallel mesh (padded all-to-all on CPU), per-layer top-k with slots left empty in layer 0
    mesh_model = qwen3_jax.from_pretrained(path, mesh=make_mesh(data=2, expert=2, devices=jax.devices()[:4]))
    iv = Intervention(top_k={None: 2, 0: 1}, disable={3: [0, 9]}, force={2: [4]}, temperature={2: 0.7})
    ep = _routed(mesh_model, iv)(ids)
    one = _routed(model, iv)(ids)
    np.testing.assert_allclose(np.asarray(ep.logits), np.asarray(one.logits), atol=1e-4, rtol=0)
    assert int(np.sum(ep.dropped_tokens)) == 0     # empty slots are never counted as dropped


def test_disabled_expert_receives_no_tokens_and_forced_always_does(reference):
    _, _, model = reference(NAME)
    cfg = model.config
    ids = _ids(cfg, 3, 13, seed=3)
    base = capture(model, [ids])
    busiest = int(np.argmax(base.load[0]))
    iv = Intervention(disable={0: [busiest, 7], None: [1]}, force={3: [5]})
    st = capture(model, [ids], intervention=iv)
    n = ids.size
    assert st.load[0, busiest] == 0 and st.load[0, 7] == 0 and base.load[0, busiest] > 0
    assert (st.load[:, 1] == 0).all() and (st.top1_load[:, 1] == 0).all()
    assert st.load[2, 5] == n                           # forced at layer 3 (MoE index 2): every token
    assert (st.load.sum(-1) == n * cfg.num_experts_per_tok).all()   # the next choices take the slots
    # the routing equals the numpy reference: disabled logits masked, top-k of the rest
    out = model(ids)
    want, _ = _np_topk(np.asarray(out.router_logits[0]).reshape(n, -1), 3, disabled=(busiest, 7, 1))
    np.testing.assert_array_equal(st.load[0], np.bincount(want.ravel(), minlength=cfg.num_experts))
    with pytest.raises(ValueError, match="layer 1 is not a MoE layer"):
        capture(model, [ids], intervention=Intervention(disable={1: [0]}))
    with pytest.raises(ValueError, match="out of range"):
        capture(model, [ids], intervention=Intervention(disable=[10]))
    with pytest.raises(ValueError, match="top_k 3 > the 2 experts left"):
        Intervention(disable=list(range(8))).check(cfg)


# ============================================================================ capture
def test_captured_counts_equal_counts_recomputed_from_router_logits(reference, tmp_path):
    _, _, model = reference(NAME)
    cfg = model.config
    e, k = cfg.num_experts, cfg.num_experts_per_tok
    recs = [_ids(cfg, 1, n, seed=n)[0] for n in (5, 17, 9, 30, 2)]
    doms = ["py", "de", "py", "en", "de"]
    st = capture(model, recs, domains=doms, batch_size=2, max_len=16, trace=tmp_path / "trace.npz")
    # reference: each record alone (pieces of <= 16 tokens, as capture runs them), routed in numpy
    load = np.zeros((3, e), np.int64)
    top1 = np.zeros((3, e), np.int64)
    co = np.zeros((3, e, e), np.int64)
    adj = np.zeros((3, e, e), np.int64)
    ent = np.zeros(3)
    mass = np.zeros(3)
    dom_load = {d: np.zeros((3, e), np.int64) for d in set(doms)}
    tok_top1 = np.zeros((3, cfg.vocab_size, e), np.int64)
    trace_e = []
    for r, d in zip(recs, doms):
        for s in range(0, len(r), 16):
            piece = r[s:s + 16]
            rl = np.asarray(model(piece[None]).router_logits)[:, 0]             # [L, T, E]
            for li in range(3):
                top, p = _np_topk(rl[li], k)
                np.add.at(load[li], top.ravel(), 1)
                np.add.at(dom_load[d][li], top.ravel(), 1)
                np.add.at(top1[li], top[:, 0], 1)
                np.add.at(tok_top1[li], (piece, top[:, 0]), 1)
                for row in top:
                    for a in row:
                        for b in row:
                            co[li, a, b] += a != b
                    for a, b in zip(row, row[1:]):                 # rank-adjacent pairs, both orders
                        adj[li, a, b] += 1
                        adj[li, b, a] += 1
                ent[li] += float(-(p * np.log(p)).sum())
                mass[li] += float(np.take_along_axis(p, top, -1).sum())
            trace_e.append(np.stack([_np_topk(rl[li], k)[0] for li in range(3)], 1))
    n_tok = sum(len(r) for r in recs)
    assert st.tokens == n_tok and st.sequences == 5 + 2        # the 17- and 30-token records ran in two pieces
    np.testing.assert_array_equal(st.load, load)
    np.testing.assert_array_equal(st.top1_load, top1)
    np.testing.assert_array_equal(st.coactivation, co)
    np.testing.assert_array_equal(st.coactivation_adjacent, adj)
    np.testing.assert_allclose(st.entropy_sum, ent, rtol=1e-4)
    np.testing.assert_allclose(st.topk_mass_sum, mass, rtol=1e-4)
    for d in dom_load:
        np.testing.assert_array_equal(st.domains[d]["load"], dom_load[d])
    for li in range(3):
        np.testing.assert_array_equal(st.token_counts.dense(li), tok_top1[li])
    js = st.to_json()
    assert [layer["layer"] for layer in js["layers"]] == [0, 2, 3]
    assert js["layers"][1]["load"] == load[1].tolist() and sum(js["layers"][1]["load"]) == n_tok * k
    assert js["domains"]["py"]["tokens"] == 5 + 9
    tr = np.load(tmp_path / "trace.npz")
    assert tr["routed_experts"].shape == (n_tok, 3, k) and tr["routed_experts"].dtype == np.int16
    np.testing.assert_array_equal(tr["routed_experts"], np.concatenate(trace_e))
    np.testing.assert_array_equal(tr["token_ids"], np.concatenate(recs))
    np.testing.assert_array_equal(tr["record"], np.repeat(np.arange(5), [len(r) for r in recs]))
    np.testing.assert_array_equal(tr["position"], np.concatenate([np.arange(len(r)) for r in recs]))
    assert tr["routed_weights"].shape == (n_tok, 3, k)
    # saved and read back: the same numbers
    st.save(tmp_path / "cap")
    back = RoutingStats.load_dir(tmp_path / "cap")
    np.testing.assert_array_equal(back.load, st.load)
    np.testing.assert_array_equal(back.coactivation, st.coactivation)
    np.testing.assert_array_equal(back.coactivation_adjacent, adj)
    np.testing.assert_array_equal(back.token_counts.first, st.token_counts.first)
    np.testing.assert_array_equal(back.token_counts.dense(1), tok_top1[1])
    # on an expert-parallel mesh: the same counts
    mesh_model = qwen3_jax.from_pretrained(reference(NAME)[1], mesh=make_mesh(data=2, expert=2, devices=jax.devices()[:4]))
    st_ep = capture(mesh_model, recs, domains=doms, batch_size=2, max_len=16)
    np.testing.assert_array_equal(st_ep.load, st.load)
    np.testing.assert_array_equal(st_ep.coactivation, st.coactivation)
    np.testing.assert_array_equal(st_ep.coactivation_adjacent, adj)


def test_evaluate_with_and_without_intervention(reference):
    _, _, model = reference(NAME)
    cfg = model.config
    recs = [_ids(cfg, 1, n, seed=n)[0] for n in (7, 12)]
    res = evaluate(model, recs, domains=["a", "b"], batch_size=2)
    logits = [np.asarray(model(r[None]).logits[0], np.float64) for r in recs]
    nll = [-(lg[:-1] - np.log(np.exp(lg[:-1]).sum(-1, keepdims=True)))[np.arange(len(r) - 1), r[1:]]
           for lg, r in zip(logits, recs)]
    assert res["tokens"] == 6 + 11
    np.testing.assert_allclose(res["loss"], np.concatenate(nll).mean(), rtol=1e-5)
    np.testing.assert_allclose(res["domains"]["b"]["loss"], nll[1].mean(), rtol=1e-5)
    off = evaluate(model, recs, intervention=Intervention(top_k=1), batch_size=2)
    assert off["tokens"] == res["tokens"] and abs(off["loss"] - res["loss"]) > 1e-4


# ============================================================================ pruning
def test_reap_pruned_model_saves_and_loads_in_transformers_with_equal_logits(reference, tmp_path):
    from transformers import Qwen3MoeForCausalLM

    from qwen3_jax.routing import prune_experts, reap_saliency
    from qwen3_jax.routing.prune import save_pruned
    from tests.hf_ref import hf_forward

    _, _, model = reference(NAME)
    cfg = model.config
    calib = [_ids(cfg, 1, n, seed=10 + n)[0] for n in (11, 20, 7)]
    sal = reap_saliency(model, calib, batch_size=2)
    # saliency by hand for one layer: mean over routed tokens of weight x ||expert output||
    rl = [np.asarray(model(c[None]).router_logits)[1, 0] for c in calib]
    routed = np.concatenate([_np_topk(x, 3)[0] for x in rl])
    np.testing.assert_array_equal(sal["count"][1], np.bincount(routed.ravel(), minlength=cfg.num_experts))
    assert (sal["saliency"] >= 0).all() and (sal["saliency"][sal["count"] > 0] > 0).all()
    view = _routed(model, Intervention(moe_inputs=True))
    x = np.concatenate([np.asarray(view(c[None]).moe_inputs)[1, 0] for c in calib], dtype=np.float64)
    p = {n: np.asarray(getattr(model.layers.moe, n)[...])[1] for n in ("gate_proj", "up_proj", "down_proj")}
    probs = np.concatenate([_np_topk(r, 3)[1] for r in rl])
    for j in range(cfg.num_experts):
        rows = np.nonzero((routed == j).any(-1))[0]
        h = x[rows] @ p["gate_proj"][j]
        f = (h / (1 + np.exp(-h)) * (x[rows] @ p["up_proj"][j])) @ p["down_proj"][j]
        want = (probs[rows, j] * np.linalg.norm(f, axis=-1)).mean() if rows.size else 0.0
        np.testing.assert_allclose(sal["saliency"][1, j], want, rtol=1e-4)
    pruned = prune_experts(model, sal, keep=6)
    kept = pruned.pruned_experts
    assert pruned.config.num_experts == 6 and all(len(k) == 6 for k in kept)
    for li, k in enumerate(kept):   # the most salient six of each layer
        assert set(k) == set(np.argsort(-sal["saliency"][li], kind="stable")[:6].tolist())
    out_dir = tmp_path / "pruned"
    save_pruned(pruned, out_dir, sal)
    assert json.loads((out_dir / "config.json").read_text())["num_experts"] == 6
    assert json.loads((out_dir / "pruning.json").read_text())["kept_experts"] == [list(k) for k in kept]
    hf = Qwen3MoeForCausalLM.from_pretrained(out_dir).eval()
    ids = _ids(cfg, 2, 10, seed=5)
    ref, ref_router = hf_forward(hf, ids)
    out = pruned(ids)
    np.testing.assert_allclose(np.asarray(out.logits), ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(out.router_logits), ref_router, atol=1e-4, rtol=0)
    # pruning == disabling the other experts in the original model
    off = {layer: sorted(set(range(cfg.num_experts)) - set(k)) for layer, k in zip(cfg.moe_layers, kept)}
    masked = _routed(model, Intervention(disable=off))(ids)
    np.testing.assert_allclose(np.asarray(masked.logits), np.asarray(out.logits), atol=1e-4, rtol=0)
    assert qwen3_jax.from_pretrained(out_dir).config.num_experts == 6


# ============================================================================ CLI, report, browser
BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")
PROBE = ("<script>window.addEventListener('load',()=>{const i=[...document.images];"
         "document.title='images '+i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'+i.length;});</script>")


def _browser_images(html_path) -> tuple[int, int]:
    """(images loaded, images) of a page opened in a headless Chromium (installed by .ci/run from apt)."""
    exe = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    assert exe, "no headless Chromium: apt-get install chromium-headless-shell (.ci/run does)"
    probe = os.path.join(os.path.dirname(html_path), "_probe.html")
    with open(html_path, encoding="utf-8") as f:
        page = f.read()
    with open(probe, "w", encoding="utf-8") as f:
        f.write(page.replace("</body>", PROBE + "</body>"))
    try:
        dom = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                              "--virtual-time-budget=10000", "--dump-dom", "file://" + os.path.abspath(probe)],
                             capture_output=True, text=True, timeout=120).stdout
    finally:
        os.remove(probe)
    import re

    m = re.search(r"<title>images (\d+)/(\d+)</title>", dom)
    assert m, f"the page did not load in {exe}: {dom[:300]!r}"
    return int(m[1]), int(m[2])


def test_capture_report_compare_eval_cli_and_the_html_opens_in_a_browser(reference, tmp_path, capsys):
    from qwen3_jax.routing.cli import main

    _, path, model = reference(NAME)
    cfg = model.config
    data = tmp_path / "in.jsonl"
    lines = [json.dumps({"input_ids": _ids(cfg, 1, n, seed=n)[0].tolist(), "domain": d})
             for n, d in ((9, "code"), (14, "prose"), (6, "code"), (11, "math"))]
    data.write_text("\n".join(lines[:2] + ['{"input_ids": [1, 2, 9999]}', "not json"] + lines[2:]) + "\n")
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    assert main(["capture", "--model", path, "--data", str(data), "--output", str(out_a), "--trace", "--report",
                 "--batch-size", "2"]) == 1                      # two bad lines: reported, skipped, exit 1
    err = capsys.readouterr().err
    assert f"{data}:3: token ids [9999]" in err and f"{data}:4:" in err
    stats = json.loads((out_a / "stats.json").read_text())
    n_tok = 9 + 14 + 6 + 11
    assert [x["layer"] for x in stats["layers"]] == cfg.moe_layers and stats["tokens"] == n_tok
    assert all(len(x["load"]) == cfg.num_experts and sum(x["load"]) == 3 * n_tok for x in stats["layers"])
    assert set(stats["domains"]) == {"code", "prose", "math"} and stats["domains"]["code"]["tokens"] == 15
    # the same statistics as the Python API
    api = capture(model, [json.loads(x)["input_ids"] for x in lines], domains=[json.loads(x)["domain"] for x in lines])
    assert [x["load"] for x in stats["layers"]] == api.load.tolist()
    report_dir = out_a / "report"
    for f in ("index.html", "load_heatmap.png", "balance.png", "domain_summary.png", "vocab.png", "layers.csv",
              "load.csv", "domains.csv", "vocab.csv", "summary.json", "domain_layer002.png",
              "coactivation_layer003.png"):
        assert (report_dir / f).is_file(), f
    loaded, total = _browser_images(str(report_dir / "index.html"))
    assert total == 4 + 2 * len(cfg.moe_layers) and loaded == total
    # a broken image is seen as not loaded (the check can fail)
    (report_dir / "vocab.png").unlink()
    assert _browser_images(str(report_dir / "index.html")) == (total - 1, total)
    # compare: the same model is saturated (overlap 1); top-2 vs top-3 compares the first two experts of each
    assert main(["capture", "--model", path, "--data", str(data), "--output", str(out_b), "--trace",
                 "--top-k", "2", "--disable", "0,1@layer3"]) == 1
    assert main(["compare", str(out_a), str(out_a), "--out", str(tmp_path / "same")]) == 0
    same = json.loads((tmp_path / "same" / "compare.json").read_text())
    assert same["overlap"] == [1.0] * 3 and same["tokens"] == n_tok
    assert main(["compare", str(out_a), str(out_b)]) == 0
    cmp_ = json.loads((out_b / "compare" / "compare.json").read_text())
    assert cmp_["top_k"] == {"a": [3, 3, 3], "b": [2, 2, 2], "compared": [2, 2, 2]} and "min(k)" in cmp_["note"]
    assert cmp_["overlap"][0] == cmp_["top1_agreement"][0] == 1.0     # layer 0: the same router, its top-2
    assert 0.5 < cmp_["overlap"][1] <= 1 and cmp_["overlap"][2] < 1  # layer 3: experts 0 and 1 disabled in B
    b_stats = json.loads((out_b / "stats.json").read_text())
    assert b_stats["layers"][2]["load"][0] == b_stats["layers"][2]["load"][1] == 0
    assert b_stats["intervention"]["disable"] == {"3": [0, 1]}
    # eval: loss with and without the intervention
    res_path = tmp_path / "eval.json"
    assert main(["eval", "--model", path, "--data", str(data), "--top-k", "1", "--disable", "3,7@layer2",
                 "--output", str(res_path)]) == 1
    res = json.loads(res_path.read_text())
    assert res["baseline"]["tokens"] == n_tok - 4 and res["intervention"]["tokens"] == n_tok - 4
    assert res["delta_loss"] == pytest.approx(res["intervention"]["loss"] - res["baseline"]["loss"])
    assert set(res["baseline"]["domains"]) == {"code", "prose", "math"}
    # usage errors: one line, exit 2
    capsys.readouterr()
    assert main(["eval", "--model", path, "--data", str(data), "--disable", "3@layer1"]) == 2
    assert "layer 1 is not a MoE layer" in capsys.readouterr().err
    assert main(["capture", "--model", path, "--data", str(data), "--output", str(tmp_path / "c"),
                 "--top-k", "x"]) == 2
    assert main(["compare", str(out_a), str(tmp_path)]) == 2


def test_infer_cli_top_k_and_disable_experts_change_routing_at_generation(reference, tmp_path):
    from qwen3_jax.infer import cli as infer_cli

    _, path, model = reference(NAME)
    cfg = model.config
    prompts = [_ids(cfg, 1, n, seed=20 + n)[0].tolist() for n in (5, 8, 3)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt_token_ids": p, "domain": "d%d" % (i % 2)}) + "\n"
                           for i, p in enumerate(prompts)))
    stats_dir = tmp_path / "rstats"
    args = ["--model", path, "--input", str(inp), "--dtype", "float32", "--temperature", "0", "--max-new-tokens", "4",
            "--batch-size", "2", "--no-progress"]
    assert infer_cli.main(args + ["--output", str(tmp_path / "out.jsonl"), "--routing-stats", str(stats_dir),
                                  "--top-k", "1", "--disable-experts", "*:0,1,2", "--disable-experts", "3:5"]) == 0
    out = {r["id"]: r for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    st = json.loads((stats_dir / "stats.json").read_text())
    n_tok = sum(len(p) + len(out[i]["token_ids"]) - 1 for i, p in enumerate(prompts))
    assert st["tokens"] == n_tok and st["top_k"] == 1
    assert all(sum(layer["load"]) == n_tok and layer["load"][:3] == [0, 0, 0] for layer in st["layers"])
    assert st["layers"][2]["layer"] == 3 and st["layers"][2]["load"][5] == 0
    assert set(st["domains"]) == {"d0", "d1"}
    # the KV-cached generation routed as the intervention says: greedy ids == argmax of full forwards under it
    iv_model = _routed(model, Intervention(top_k=1, disable={None: [0, 1, 2], 3: [5]}))
    for i, p in enumerate(prompts):
        seq = list(p)
        for _ in range(len(out[i]["token_ids"])):
            seq.append(int(np.argmax(np.asarray(iv_model(np.asarray([seq])).logits[0, -1]))))
        assert out[i]["token_ids"] == seq[len(p):]
    # the statistics are the generation's own routing (prefill and decode steps), equal to a full-forward capture
    # of the same tokens under the intervention, per domain too
    fed = [np.asarray(p + out[i]["token_ids"][:-1]) for i, p in enumerate(prompts)]
    ref = capture(iv_model, fed, domains=["d%d" % (i % 2) for i in range(3)])
    np.testing.assert_array_equal([x["load"] for x in st["layers"]], ref.load)
    np.testing.assert_array_equal([x["top1_load"] for x in st["layers"]], ref.top1_load)
    assert st["sequences"] == 3 and st["tokens"] == ref.tokens
    for name, dom in st["domains"].items():
        np.testing.assert_array_equal([x["load"] for x in dom["layers"]], ref.domains[name]["load"])
    got = RoutingStats.load_dir(stats_dir)
    np.testing.assert_array_equal(got.coactivation, ref.coactivation)
    for li in range(len(ref.layers)):
        np.testing.assert_array_equal(got.token_counts.dense(li), ref.token_counts.dense(li))
    np.testing.assert_allclose([x["entropy_mean"] for x in st["layers"]],
                               [x["entropy_mean"] for x in ref["layers"]], rtol=1e-5)
    base = tmp_path / "base.jsonl"
    assert infer_cli.main(args + ["--output", str(base), "--routing-stats", str(tmp_path / "base_stats")]) == 0
    base_ids = [r["token_ids"] for r in map(json.loads, base.read_text().splitlines())]
    assert base_ids != [out[i]["token_ids"] for i in range(3)]           # the intervention changed the text
    st0 = json.loads((tmp_path / "base_stats" / "stats.json").read_text())
    assert st0["top_k"] == 3 and all(sum(x["load"]) == 3 * st0["tokens"] for x in st0["layers"])
    # top-3: the rank-adjacent co-activation of the generation's prefill and decode steps == a full-forward capture
    ref0 = capture(model, [np.asarray(p + base_ids[i][:-1]) for i, p in enumerate(prompts)])
    got0 = RoutingStats.load_dir(tmp_path / "base_stats")
    assert got0.coactivation_adjacent.sum() > 0
    np.testing.assert_array_equal(got0.coactivation_adjacent, ref0.coactivation_adjacent)
    np.testing.assert_array_equal(got0.coactivation, ref0.coactivation)
    for bad in (["--top-k", "11"], ["--disable-experts", "1:0"], ["--disable-experts", "2:x"]):
        with pytest.raises(SystemExit) as e:
            infer_cli.main(args + ["--output", str(tmp_path / "never.jsonl"), *bad])
        assert e.value.code == 2
    assert not (tmp_path / "never.jsonl").exists()


# ============================================================================ OLMoE's definitions
def _olmoe_reference(trace, recs, doms, top_k_layers, num_experts, min_occ):
    """OLMoE's definitions, written again from the trace with Python loops and Counters as the OLMoE scripts do
    (run_routing_analysis.py, run_moe_analysis.py, plot_routing_analysis_v2.ipynb); independent of
    qwen3_jax.routing.olmoe."""
    from collections import Counter, defaultdict

    ex = trace["routed_experts"].tolist()                          # [N][L][k]
    n_l = len(top_k_layers)
    rows, start = [], 0                                            # the trace's rows of each record
    for r in recs:
        rows.append(range(start, start + len(r)))
        start += len(r)
    out = {"domain_pct": {}, "domain_top1_pct": {}, "vocab_current": [], "vocab_next": [], "top_current": [],
           "adjacent": []}
    for d in sorted(set(doms)):
        pct, pct1 = [], []
        for li in range(n_l):
            k = top_k_layers[li]
            topk, top1 = Counter(), Counter()
            for r, rd in zip(rows, doms):
                if rd == d:
                    for t in r:
                        topk.update(ex[t][li][:k])
                        top1[ex[t][li][0]] += 1
            tot, tot1 = sum(topk.values()), sum(top1.values())
            pct.append([topk[j] / tot * 100 * k for j in range(num_experts)])       # the notebook: x k
            pct1.append([top1[j] / tot1 * 100 for j in range(num_experts)])
        out["domain_pct"][d], out["domain_top1_pct"][d] = pct, pct1

    def print_avg(id_to_exp):                                      # run_moe_analysis.py do_token_analysis
        probs, top = [], {}
        for _id, exp_ids in id_to_exp.items():
            most_freq_id, val = sorted(Counter(exp_ids).items(), key=lambda x: -x[1])[0]
            if len(exp_ids) >= min_occ:
                probs.append(val / len(exp_ids))
                top[_id] = most_freq_id
        return 100 * float(np.mean(probs)), top

    for li in range(n_l):
        cur, nxt = defaultdict(list), defaultdict(list)
        for r, rec in zip(rows, recs):
            exp_ids = [ex[t][li][0] for t in r]
            for _id, e in zip(rec.tolist(), exp_ids):
                cur[_id].append(e)
            for _id, e in zip(rec.tolist()[1:], exp_ids):
                nxt[_id].append(e)
        mean_cur, top_cur = print_avg(cur)
        out["vocab_current"].append(mean_cur)
        out["top_current"].append(top_cur)
        out["vocab_next"].append(print_avg(nxt)[0])
        pair, single = Counter(), Counter()                        # do_coactivation_analysis
        for t in range(len(ex)):
            indices = [e for e in ex[t][li] if e < num_experts]
            for i in indices:
                single[i] += 1
            for a, b in zip(indices, indices[1:]):
                pair[(a, b)] += 1
                pair[(b, a)] += 1
        out["adjacent"].append([[pair[(a, b)] / single[a] if single[a] else 0.0 for b in range(num_experts)]
                                for a in range(num_experts)])
    return out


def _strict_json(path):
    def no_constant(name):
        raise AssertionError(f"{path}: {name} is not JSON")
    with open(path) as f:
        return json.loads(f.read(), parse_constant=no_constant)


def _csv(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_report_olmoe_definitions_equal_an_independent_implementation(reference, tmp_path, capsys):
    from qwen3_jax.routing.cli import main

    _, _, model = reference(NAME)
    cfg = model.config
    e, k = cfg.num_experts, cfg.num_experts_per_tok
    rng = np.random.default_rng(7)
    ranges = {"code": (0, 12), "math": (10, 25), "prose": (20, cfg.vocab_size)}
    doms = ["code", "math", "prose", "math", "code", "prose", "code", "prose", "math"]
    lens = [13, 30, 9, 1, 21, 17, 5, 11, 26]                       # 30, 21, 17, 26: two pieces of <= 16 tokens
    recs = [rng.integers(*ranges[d], n).astype(np.int32) for d, n in zip(doms, lens)]
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    capture(model, recs, domains=doms, batch_size=2, max_len=16, trace=a_dir / "trace.npz").save(a_dir)
    iv = Intervention(top_k=2, disable={3: [0, 1]})
    capture(model, recs, domains=doms, intervention=iv, batch_size=3, max_len=16,
            trace=b_dir / "trace.npz").save(b_dir)
    assert main(["report", str(a_dir), "--olmoe", "--saturation-reference", str(b_dir), "--top-tokens", "1000"]) == 0
    rep = a_dir / "report"
    summ = _strict_json(rep / "summary.json")
    ol = summ["olmoe"]
    assert ol["definitions"] == "olmoe" and set(summ["definitions"]) == {"qwen3-jax", "olmoe"}
    trace = dict(np.load(a_dir / "trace.npz"))
    want = _olmoe_reference(trace, recs, doms, [k] * 3, e, min_occ=1)

    # domain specialization in percent, its uniform line 100 k / E
    assert ol["domain_uniform_pct"] == [pytest.approx(100 * k / e)] * 3 and ol["domain_uniform_top1_pct"] == 10.0
    for d in ranges:
        np.testing.assert_allclose(ol["domain_specialization_pct"][d], want["domain_pct"][d], rtol=1e-12)
        np.testing.assert_allclose(ol["domain_specialization_top1_pct"][d], want["domain_top1_pct"][d], rtol=1e-12)
    csv_dom = {(r["domain"], int(r["layer"]), int(r["expert"])): float(r["domain_specialization_pct"])
               for r in _csv(rep / "olmoe_domains.csv")}
    assert csv_dom[("prose", 3, 4)] == pytest.approx(want["domain_pct"]["prose"][2][4], abs=1e-5)
    # ours is left as it was: E/k-scaled (uniform = 1) = OLMoE's percent x E / (100 k)
    ours = _strict_json(a_dir / "stats.json")["domains"]["math"]["layers"][1]["specialization"]
    np.testing.assert_allclose(ours, np.asarray(want["domain_pct"]["math"][1]) * e / (100 * k), rtol=1e-9)

    # vocabulary specialization: unweighted mean over token ids, top-1, current and next token
    np.testing.assert_allclose(ol["vocab_specialization_current_pct"], want["vocab_current"], rtol=1e-12)
    np.testing.assert_allclose(ol["vocab_specialization_next_pct"], want["vocab_next"], rtol=1e-12)
    assert ol["vocab_token_ids_current"][0] == len({t for r in recs for t in r.tolist()})
    vocab_rows = [r for r in _csv(rep / "olmoe_vocab.csv") if r["position"] == "current"]
    got_top = {(int(r["layer"]), int(r["token_id"])): int(r["top_expert"]) for r in vocab_rows}
    ties_not_lowest = 0
    for li, layer in enumerate(cfg.moe_layers):
        for tok, top in want["top_current"][li].items():
            assert got_top[(layer, tok)] == top, (layer, tok)      # ties: the first seen, as OLMoE's Counter
        for tok in want["top_current"][li]:
            c = np.bincount(trace["routed_experts"][trace["token_ids"] == tok, li, 0], minlength=e)
            ties_not_lowest += int((c == c.max()).sum() > 1 and want["top_current"][li][tok] != int(np.argmax(c)))
    assert ties_not_lowest > 0                                     # the data has ties where first seen != lowest id
    # ours is occurrence-weighted (and different here)
    assert summ["vocab_specialization"][0] != pytest.approx(ol["vocab_specialization_current_pct"][0] / 100)
    # a minimum number of occurrences
    assert main(["report", str(a_dir), "--definitions", "olmoe", "--olmoe-min-occurrences", "4",
                 "--out", str(tmp_path / "rep4")]) == 0
    ol4 = _strict_json(tmp_path / "rep4" / "summary.json")["olmoe"]
    want4 = _olmoe_reference(trace, recs, doms, [k] * 3, e, min_occ=4)
    np.testing.assert_allclose(ol4["vocab_specialization_current_pct"], want4["vocab_current"], rtol=1e-12)
    np.testing.assert_allclose(ol4["vocab_specialization_next_pct"], want4["vocab_next"], rtol=1e-12)
    assert ol4["vocab_token_ids_current"][0] < ol["vocab_token_ids_current"][0] and ol4["router_saturation"] is None

    # co-activation: OLMoE's rank-adjacent pairs, and ours (every pair), as numbers beside the PNGs
    st = RoutingStats.load_dir(a_dir)
    for li, layer in enumerate(cfg.moe_layers):
        adj = _csv(rep / f"olmoe_coactivation_layer{layer:03d}.csv")
        got = np.asarray([[float(r[str(j)]) for j in range(e)] for r in adj])
        np.testing.assert_allclose(got, want["adjacent"][li], atol=1e-6)
        assert [int(r["n_i"]) for r in adj] == st.load[li].tolist()
        mine = _csv(rep / f"coactivation_layer{layer:03d}.csv")
        np.testing.assert_allclose([[float(r[str(j)]) for j in range(e)] for r in mine],
                                   st.coactivation[li] / np.maximum(st.load[li][:, None], 1), atol=1e-6)
        assert (rep / f"coactivation_layer{layer:03d}.png").is_file()
    assert not np.allclose(got, np.asarray([[float(r[str(j)]) for j in range(e)] for r in mine]))

    # router saturation against a capture with top-2: the first min(k) = 2 experts of each
    tb = np.load(b_dir / "trace.npz")["routed_experts"]
    ea = trace["routed_experts"]
    sat_top = [100 * np.mean([len(set(ea[t, li, :2].tolist()) & set(tb[t, li, :2].tolist())) / 2
                              for t in range(len(ea))]) for li in range(3)]
    sat_1 = [100 * np.mean([ea[t, li, 0] == tb[t, li, 0] for t in range(len(ea))]) for li in range(3)]
    sat = ol["router_saturation"]
    assert sat["top_k"] == [2, 2, 2] and sat["tokens"] == sum(lens)
    np.testing.assert_allclose(sat["topk_pct"], sat_top, rtol=1e-12)
    np.testing.assert_allclose(sat["top1_pct"], sat_1, rtol=1e-12)
    assert sat["topk_pct"][0] == 100.0 and any("min(k)" in n for n in ol["notes"])
    layers_csv = _csv(rep / "olmoe_layers.csv")
    assert float(layers_csv[2]["router_saturation_topk_pct"]) == pytest.approx(sat_top[2], abs=1e-5)
    # compare: the same numbers (fractions), symmetric, with a note
    capsys.readouterr()
    assert main(["compare", str(a_dir), str(b_dir), "--out", str(tmp_path / "ab")]) == 0
    assert "note: different top-k" in capsys.readouterr().err
    assert main(["compare", str(b_dir), str(a_dir), "--out", str(tmp_path / "ba")]) == 0
    ab, ba = _strict_json(tmp_path / "ab" / "compare.json"), _strict_json(tmp_path / "ba" / "compare.json")
    assert ab["overlap"] == ba["overlap"] and ab["top1_agreement"] == ba["top1_agreement"]
    np.testing.assert_allclose(np.asarray(ab["overlap"]) * 100, sat_top, rtol=1e-12)
    assert ab["top_k"] == {"a": [3, 3, 3], "b": [2, 2, 2], "compared": [2, 2, 2]} and ab["note"]

    # the page names which definition is which, and its images load
    page = (rep / "index.html").read_text()
    assert "OLMoE definition" in page and "qwen3-jax definition" in page and "coactivation_layer002.csv" in page
    loaded, total = _browser_images(str(rep / "index.html"))
    assert total == (4 + 2 * 3) + (2 * 3 + 2) and loaded == total


def test_empty_captures_one_token_eval_and_usage_errors_are_one_line(reference, tmp_path, capsys):
    from qwen3_jax.routing.cli import main

    _, path, model = reference(NAME)
    empty = tmp_path / "empty"
    st = capture(model, [], trace=empty / "trace.npz")
    st.save(empty)
    assert st.tokens == 0
    tr = np.load(empty / "trace.npz")
    assert tr["routed_experts"].shape == (0, 3, 3) and tr["token_ids"].shape == (0,)
    full = tmp_path / "full"
    capture(model, [_ids(model.config, 1, 7)[0]], trace=full / "trace.npz").save(full)
    capsys.readouterr()
    for argv in (["compare", str(empty), str(full)], ["compare", str(full), str(empty)], ["report", str(empty)],
                 ["report", str(empty), "--olmoe"], ["report", str(full), "--saturation-reference", str(full)],
                 ["report", str(full), "--olmoe", "--saturation-reference", str(empty)],
                 ["report", str(full), "--olmoe-min-occurrences", "0"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"qwen3-jax-routing {argv[0]}: error: "), (argv, err)
        assert "Traceback" not in err[0] and "KeyError" not in err[0]
    assert main(["compare", str(empty), str(full)]) == 2 and "no tokens" in capsys.readouterr().err
    # a trace without routed experts (an empty capture written before the schema): one line too
    (tmp_path / "old").mkdir()
    np.savez(tmp_path / "old" / "trace.npz", layers=np.arange(3))
    (tmp_path / "old" / "stats.json").write_text((empty / "stats.json").read_text())
    assert main(["compare", str(tmp_path / "old"), str(full)]) == 2
    assert "no routed_experts" in capsys.readouterr().err
    # without a trace, --olmoe still writes what it can and says what needs the trace
    (full / "trace.npz").unlink()
    assert main(["report", str(full), "--olmoe"]) == 0
    ol = _strict_json(full / "report" / "summary.json")["olmoe"]
    assert ol["vocab_specialization_next_pct"] is None and ol["vocab_specialization_current_pct"][0] is not None
    assert any("--trace" in n for n in ol["notes"])
    # eval on a one-token file: strict JSON, null loss
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"input_ids": [5], "domain": "x"}) + "\n")
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", path, "--data", str(one), "--top-k", "1", "--output", str(out)]) == 0
    res = _strict_json(out)
    assert res["baseline"]["loss"] is None and res["baseline"]["ppl"] is None and res["baseline"]["tokens"] == 0
    assert res["delta_loss"] is None and res["intervention"]["domains"]["x"]["loss"] is None
