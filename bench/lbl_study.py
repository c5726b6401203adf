"""Micro-batch vs global-batch load-balancing loss: the same small MoE trained twice from one initialisation.

    python bench/lbl_study.py                          # the defaults (~8 min on 2 CPU cores)
    python bench/lbl_study.py --steps 40 --out /tmp/lbl   # a quick look

Qiu et al. 2025 ("Demons in the Detail: On Implementing Load Balancing Loss for Training Specialized
Mixture-of-Expert Models") report that computing the LBL over the global batch instead of each micro-batch gives
lower perplexity and stronger domain specialization: a micro-batch holds few sequences, often of one domain, so
balancing each micro-batch forbids the router to send one domain to a few experts.

Corpus (built here, nothing downloaded; byte-level tokens, so no tokenizer either), six domains:
    python      the source of standard-library modules (`inspect.getsource`), docstrings removed (ast.unparse)
    docstring   the docstrings of those modules, their classes and functions
    en, de, fr, zh   sentences from small grammars and word lists written below
Each training row (seq-len bytes) is cut from one domain's stream, rows are drawn with equal probability per
domain, and the held-out rows come from held-out documents (other modules, other random sentences).

Both runs: the same initial parameters, the same batches in the same order (equal tokens), the same LBL
coefficient; --batch-size rows per step as --grad-accum micro-batches (qwen3_jax/train/step.py: lbl_scope "micro" = the
LBL of each micro-batch, averaged; "global" = the LBL of the whole step's batch, exact under accumulation).
Reported per run: held-out loss per domain (nats/byte) and overall; per MoE layer over the held-out rows
(qwen3_jax.routing.capture): each domain's expert-share distribution (its top-k assignments per expert / all of
its assignments) -> entropy (nats; uniform = ln E) and top-expert share (uniform = 1/E), averaged over domains
and layers; load balance: the coefficient of variation of the expert loads over all held-out tokens (mean over
layers), and within one domain (mean over domains and layers).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import json
import math
import os
import sys
import time

import numpy as np

DOMAINS = ("python", "docstring", "en", "de", "fr", "zh")
EOS = 256  # between documents; bytes are 0..255
MODULES = (
    "argparse", "ast", "base64", "bisect", "calendar", "cmd", "codecs", "collections", "colorsys", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "dis", "email.message",
    "email.utils", "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt",
    "gettext", "glob", "gzip", "heapq", "hmac", "html.parser", "http.client", "http.cookies", "imaplib",
    "inspect", "ipaddress", "json.decoder", "json.encoder", "locale", "logging", "mailbox", "mimetypes",
    "numbers", "operator", "optparse", "os", "pathlib", "pdb", "pickle", "pickletools", "platform", "plistlib",
    "poplib", "pprint", "pstats", "py_compile", "queue", "quopri", "random", "reprlib", "sched", "secrets",
    "selectors", "shlex", "shutil", "smtplib", "socketserver", "statistics", "string", "subprocess", "symtable",
    "tabnanny", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback",
    "types", "typing", "unittest.case", "urllib.parse", "urllib.request", "uuid", "warnings", "wave",
    "weakref", "webbrowser", "xml.dom.minidom", "zipfile", "zipimport",
)


# ============================================================================ corpus
def python_documents() -> tuple[list[str], list[str]]:
    """(code documents, docstring documents), one of each per importable stdlib module above."""
    code, docs = [], []
    for name in MODULES:
        try:
            src = inspect.getsource(importlib.import_module(name))
            tree = ast.parse(src)
        except (ImportError, OSError, TypeError, SyntaxError):
            continue  # not on this machine's Python: the corpus is what every machine has
        strings = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body
                if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                        and isinstance(body[0].value.value, str):
                    strings.append(inspect.cleandoc(body[0].value.value))
                    node.body = body[1:] or [ast.Pass()]
        code.append(ast.unparse(tree))
        docs.append("\n\n".join(s for s in strings if s.strip()))
    return code, docs


LANG = {
    "en": dict(
        subj=["the old fisherman", "my sister", "a young doctor", "the teacher", "our neighbour", "the little girl",
              "a tired traveller", "the baker", "his grandfather", "the students"],
        verb=["reads", "buys", "paints", "finds", "carries", "forgets", "repairs", "sells", "describes", "writes"],
        obj=["a long letter", "the red bicycle", "fresh bread", "an old map", "the wooden table", "a small boat",
             "three apples", "the blue notebook", "a warm coat", "the broken clock"],
        where=["in the garden", "at the market", "near the river", "in the kitchen", "at the station",
               "behind the church", "in a quiet village", "on the mountain"],
        when=["every morning", "on Sunday", "after dinner", "in winter", "yesterday", "before the storm"],
        conj=["because", "although", "while", "and then"], end="."),
    "de": dict(
        subj=["der alte Fischer", "meine Schwester", "eine junge Ärztin", "der Lehrer", "unser Nachbar",
              "das kleine Mädchen", "ein müder Reisender", "der Bäcker", "sein Großvater", "die Studenten"],
        verb=["liest", "kauft", "malt", "findet", "trägt", "vergisst", "repariert", "verkauft", "beschreibt",
              "schreibt"],
        obj=["einen langen Brief", "das rote Fahrrad", "frisches Brot", "eine alte Karte", "den Holztisch",
             "ein kleines Boot", "drei Äpfel", "das blaue Heft", "einen warmen Mantel", "die kaputte Uhr"],
        where=["im Garten", "auf dem Markt", "am Fluss", "in der Küche", "am Bahnhof", "hinter der Kirche",
               "in einem stillen Dorf", "auf dem Berg"],
        when=["jeden Morgen", "am Sonntag", "nach dem Abendessen", "im Winter", "gestern", "vor dem Sturm"],
        conj=["weil", "obwohl", "während", "und dann"], end="."),
    "fr": dict(
        subj=["le vieux pêcheur", "ma sœur", "une jeune médecin", "le professeur", "notre voisin", "la petite fille",
              "un voyageur fatigué", "le boulanger", "son grand-père", "les étudiants"],
        verb=["lit", "achète", "peint", "trouve", "porte", "oublie", "répare", "vend", "décrit", "écrit"],
        obj=["une longue lettre", "le vélo rouge", "du pain frais", "une vieille carte", "la table en bois",
             "un petit bateau", "trois pommes", "le cahier bleu", "un manteau chaud", "l'horloge cassée"],
        where=["dans le jardin", "au marché", "près de la rivière", "dans la cuisine", "à la gare",
               "derrière l'église", "dans un village tranquille", "sur la montagne"],
        when=["chaque matin", "le dimanche", "après le dîner", "en hiver", "hier", "avant l'orage"],
        conj=["parce que", "bien que", "pendant que", "et puis"], end="."),
    "zh": dict(
        subj=["老渔夫", "我的姐姐", "一位年轻的医生", "老师", "我们的邻居", "小女孩", "疲倦的旅人", "面包师",
              "他的爷爷", "学生们"],
        verb=["读", "买", "画", "找到", "搬", "忘了", "修理", "卖", "描述", "写"],
        obj=["一封长信", "那辆红色的自行车", "新鲜的面包", "一张旧地图", "那张木桌", "一条小船", "三个苹果",
             "那本蓝色的笔记本", "一件暖和的外套", "那个坏了的钟"],
        where=["在花园里", "在市场上", "在河边", "在厨房里", "在车站", "在教堂后面", "在安静的村子里", "在山上"],
        when=["每天早上", "星期天", "晚饭后", "冬天", "昨天", "暴风雨之前"],
        conj=["因为", "虽然", "同时", "然后"], end="。"),
}


def sentence(lang: str, rng) -> str:
    w = LANG[lang]
    pick = lambda k: w[k][rng.integers(len(w[k]))]  # noqa: E731
    if lang == "zh":
        clause = lambda: f"{pick('subj')}{pick('when')}{pick('where')}{pick('verb')}{pick('obj')}"  # noqa: E731
        s = clause() if rng.random() < 0.6 else f"{clause()}，{pick('conj')}{clause()}"
        return s + w["end"]
    if lang == "de":  # verb second: the time phrase first, then the verb
        clause = lambda: f"{pick('when')} {pick('verb')} {pick('subj')} {pick('obj')} {pick('where')}"  # noqa: E731
    else:
        clause = lambda: f"{pick('subj')} {pick('verb')} {pick('obj')} {pick('where')} {pick('when')}"  # noqa: E731
    s = clause() if rng.random() < 0.6 else f"{clause()}, {pick('conj')} {clause()}"
    return s[0].upper() + s[1:] + w["end"]


def text_documents(lang: str, n_docs: int, seed: int) -> list[str]:
    rng = np.random.default_rng([seed, DOMAINS.index(lang)])
    return [" ".join(sentence(lang, rng) for _ in range(int(rng.integers(4, 12)))) for _ in range(n_docs)]


def rows_of(documents: list[str], seq_len: int) -> np.ndarray:
    """The documents as one byte stream (EOS between them) cut into rows of seq_len + 1 tokens."""
    stream = []
    for d in documents:
        stream.extend(d.encode("utf-8"))
        stream.append(EOS)
    n = len(stream) // (seq_len + 1)
    return np.asarray(stream[:n * (seq_len + 1)], np.int32).reshape(n, seq_len + 1)


def build_corpus(seq_len: int, seed: int = 0, held_out: float = 0.15) -> dict:
    """{domain: (train rows [n, seq_len + 1], held-out rows [m, seq_len + 1])}; held-out rows come from other
    documents (the last modules, other sentences)."""
    code, docs = python_documents()
    out = {}
    for name, documents in (("python", code), ("docstring", docs)):
        order = np.random.default_rng(seed).permutation(len(documents))
        k = max(1, int(len(documents) * held_out))
        out[name] = (rows_of([documents[i] for i in order[k:]], seq_len), rows_of([documents[i] for i in order[:k]],
                                                                                  seq_len))
    for lang in ("en", "de", "fr", "zh"):
        documents = text_documents(lang, 1500, seed)
        k = int(len(documents) * held_out)
        out[lang] = (rows_of(documents[k:], seq_len), rows_of(documents[:k], seq_len))
    return out


def batches(corpus: dict, steps: int, batch: int, seed: int):
    """steps x [batch, seq_len + 1] rows: each row one domain's (the domain drawn uniformly), rows of a domain in
    a shuffled order (reshuffled when used up)."""
    rng = np.random.default_rng(seed + 1)
    order = {d: rng.permutation(len(corpus[d][0])) for d in DOMAINS}
    pos = dict.fromkeys(DOMAINS, 0)
    for _ in range(steps):
        rows = []
        for d in rng.choice(DOMAINS, batch):
            if pos[d] == len(order[d]):
                order[d], pos[d] = rng.permutation(len(corpus[d][0])), 0
            rows.append(corpus[d][0][order[d][pos[d]]])
            pos[d] += 1
        yield np.stack(rows)


def as_batch(rows: np.ndarray) -> dict:
    b, t1 = rows.shape
    return {"inputs": rows[:, :-1], "targets": rows[:, 1:], "segment_ids": np.ones((b, t1 - 1), np.int32),
            "positions": np.broadcast_to(np.arange(t1 - 1, dtype=np.int32), (b, t1 - 1)).copy()}


# ============================================================================ runs
def train_run(scope: str, model, params0, corpus, args, log) -> dict:
    import jax
    import jax.numpy as jnp

    from qwen3_jax.train.step import (StepConfig, make_optimizer, make_schedule, make_train_step, model_from,
                                      split_model)

    graphdef, abstract, _ = split_model(model)
    params = jax.tree.map(jnp.copy, params0)  # the same initialisation (the step donates its inputs)
    schedule = make_schedule("cosine", args.lr, args.warmup, args.steps)
    tx = make_optimizer(params, schedule=schedule, weight_decay=0.01, clip=1.0)
    opt_state = tx.init(params)
    step = make_train_step(graphdef, abstract, tx, schedule,
                           StepConfig(grad_accum=args.grad_accum, lbl_coef=args.lbl_coef, lbl_scope=scope))
    t0, curve = time.perf_counter(), []
    for i, rows in enumerate(batches(corpus, args.steps, args.batch_size, args.seed)):
        params, opt_state, m = step(params, opt_state, as_batch(rows), jnp.int32(i))
        if (i + 1) % max(args.steps // 10, 1) == 0 or i + 1 == args.steps:
            curve.append({"step": i + 1, "lm_loss": float(m["lm_loss"]), "lbl": float(m["lbl"])})
            log(f"  {scope:6s} step {i + 1:4d}  lm_loss {curve[-1]['lm_loss']:.4f}  lbl {curve[-1]['lbl']:.4f}  "
                f"({time.perf_counter() - t0:.0f} s)")
    return {"model": model_from(graphdef, abstract, params), "curve": curve, "train_s": time.perf_counter() - t0}


def measure(model, corpus, args) -> dict:
    from qwen3_jax.routing import capture, evaluate

    held = {d: corpus[d][1][:args.eval_rows] for d in DOMAINS}
    recs = [r for d in DOMAINS for r in held[d]]
    doms = [d for d in DOMAINS for _ in held[d]]
    ev = evaluate(model, recs, domains=doms, batch_size=16, max_len=args.seq_len + 1)
    st = capture(model, recs, domains=doms, batch_size=16, max_len=args.seq_len + 1).to_json()
    n_e = st["num_experts"]
    ent, top, dom_cv = [], [], []
    per_domain = {}
    for d in DOMAINS:
        e_d, t_d, c_d = [], [], []
        for layer in st["domains"][d]["layers"]:
            load = np.asarray(layer["load"], np.float64)
            p = load / load.sum()
            e_d.append(float(-np.sum(p[p > 0] * np.log(p[p > 0]))))
            t_d.append(float(p.max()))
            c_d.append(float(load.std() / load.mean()))
        per_domain[d] = {"loss": ev["domains"][d]["loss"], "entropy": float(np.mean(e_d)),
                         "top_share": float(np.mean(t_d))}
        ent += e_d
        top += t_d
        dom_cv += c_d
    return {"loss": ev["loss"], "domains": per_domain, "entropy": float(np.mean(ent)), "top_share": float(np.mean(top)),
            "cv": float(np.mean([x["cv"] for x in st["layers"]])), "domain_cv": float(np.mean(dom_cv)),
            "max_min": [x["max_min_ratio"] for x in st["layers"]], "uniform_entropy": math.log(n_e),
            "uniform_share": 1 / n_e, "held_out_tokens": st["tokens"]}


def table(res: dict) -> str:
    runs = list(res)
    lines = ["| | " + " | ".join(runs) + " |", "| --- |" + " ---: |" * len(runs)]
    row = lambda name, f: lines.append(f"| {name} | " + " | ".join(f(res[r]) for r in runs) + " |")  # noqa: E731
    row("held-out loss, all (nats/byte)", lambda r: f"{r['loss']:.4f}")
    for d in DOMAINS:
        row(f"held-out loss, {d}", lambda r, d=d: f"{r['domains'][d]['loss']:.4f}")
    row("domain expert-share entropy (nats, uniform %.3f)" % next(iter(res.values()))["uniform_entropy"],
        lambda r: f"{r['entropy']:.3f}")
    row("domain top-expert share (uniform %.4f)" % next(iter(res.values()))["uniform_share"],
        lambda r: f"{r['top_share']:.4f}")
    for d in DOMAINS:
        row(f"  entropy / top share, {d}", lambda r, d=d: f"{r['domains'][d]['entropy']:.3f} / "
            f"{r['domains'][d]['top_share']:.3f}")
    row("load CV, all held-out tokens (mean over layers)", lambda r: f"{r['cv']:.3f}")
    row("load CV within a domain (mean)", lambda r: f"{r['domain_cv']:.3f}")
    row("final train lm_loss / lbl", lambda r: f"{r['curve'][-1]['lm_loss']:.4f} / {r['curve'][-1]['lbl']:.4f}")
    row("train time (s)", lambda r: f"{r['train_s']:.0f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=16, help="rows per step")
    p.add_argument("--grad-accum", type=int, default=8, help="micro-batches per step (rows / micro-batch = "
                   "batch-size / grad-accum)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lbl-coef", type=float, default=0.01)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--eval-rows", type=int, default=32, help="held-out rows per domain")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write results.json here")
    args = p.parse_args(argv)

    import jax
    from flax import nnx

    import qwen3_jax
    from qwen3_jax.train.step import split_model

    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    corpus = build_corpus(args.seq_len, args.seed)
    sizes = "corpus (train / held-out rows of %d bytes): %s" % (args.seq_len + 1, ", ".join(
        f"{d} {len(corpus[d][0])}/{len(corpus[d][1])}" for d in DOMAINS))
    log(sizes)
    cfg = qwen3_jax.Qwen3Config(
        vocab_size=384, hidden_size=args.hidden, intermediate_size=2 * args.hidden, moe_intermediate_size=args.hidden // 2,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2, head_dim=args.hidden // 4,
        num_experts=args.experts, num_experts_per_tok=args.top_k, norm_topk_prob=True,
        max_position_embeddings=max(256, args.seq_len + 1), torch_dtype="float32", router_aux_loss_coef=args.lbl_coef)
    model = qwen3_jax.Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(args.seed))
    _, _, params0 = split_model(model)
    res = {}
    for scope in ("micro", "global"):
        log(f"run: lbl_scope={scope}")
        run = train_run(scope, model, params0, corpus, args, log)
        res[scope] = {**measure(run["model"], corpus, args), "curve": run["curve"], "train_s": run["train_s"]}
    print(table(res))
    print(f"\n{args.steps} steps x {args.batch_size} rows x {args.seq_len} tokens per run "
          f"({args.steps * args.batch_size * args.seq_len} tokens), {args.grad_accum} micro-batches of "
          f"{args.batch_size // args.grad_accum} rows, lbl coefficient {args.lbl_coef}; "
          f"D={args.hidden}, L={args.layers}, E={args.experts}, k={args.top_k}; {jax.device_count()} device(s), "
          f"{time.perf_counter() - t0:.0f} s in all; Python {sys.version.split()[0]}, jax {jax.__version__}\n{sizes}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"args": vars(args), "corpus": sizes, "results": res}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
