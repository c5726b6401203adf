"""qwen3-jax-routing: capture | report | compare | eval | prune.

    qwen3-jax-routing capture --model DIR --data in.jsonl --output OUT [--trace] [--report] [--mesh expert=8]
    qwen3-jax-routing report OUT                      # OUT/report/index.html, *.png, *.csv, summary.json
    qwen3-jax-routing report OUT --olmoe              # also OLMoE's definitions (olmoe_*.csv/png, summary "olmoe")
    qwen3-jax-routing compare OUT_A OUT_B             # router saturation: per-layer top-k overlap (both --trace)
    qwen3-jax-routing eval --model DIR --data held.jsonl --top-k 4 --disable 3,17@layer5
    qwen3-jax-routing prune --model DIR --data calib.jsonl --keep 64 --output PRUNED_DIR

Data lines (JSONL): {"text": ...} | {"prompt": ...} | {"messages": [...]} | {"input_ids": [...]} |
{"prompt_token_ids": [...]}, each with an optional "domain" (per-domain statistics and losses). Text needs the
model's tokenizer.json (or --tokenizer). A bad line is reported as `file:line: reason` and skipped (exit 1 at the
end); usage and setup errors are one line, exit 2.

Interventions (capture, eval, prune): --top-k K[@layerN], --disable E[,E...][@layerN], --force E[,E...][@layerN],
--temperature T[@layerN] (repeatable; without @layerN: every MoE layer). Layers are decoder layer indices.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from qwen3_jax.launch import ArgumentParser, add_launch_args, agree, default_platform, launch

from .stats import read_records

SPEC = re.compile(r"^(?P<value>[^@]+?)(?:@(?:layer)?(?P<layer>\d+))?$")


# ============================================================================ intervention flags
def _layer_value(text: str, flag: str):
    m = SPEC.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{flag} {text!r}: expected VALUE or VALUE@layerN")
    return (None if m["layer"] is None else int(m["layer"])), m["value"].strip()


def _ints(text, flag):
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{flag} {text!r}: expected expert ids like 3,17") from None
    if not vals:
        raise argparse.ArgumentTypeError(f"{flag} {text!r}: no expert ids")
    return vals


def build_intervention(top_k=(), disable=(), force=(), temperature=()):
    """An Intervention (or None) from lists of (layer or None, value) pairs; repeated layers merge."""
    from .intervention import Intervention

    dis, frc = {}, {}
    for table, pairs in ((dis, disable), (frc, force)):
        for layer, ids in pairs:
            table.setdefault(layer, []).extend(ids)
    tk = dict(top_k)
    tmp = dict(temperature)
    if not (tk or dis or frc or tmp):
        return None
    return Intervention(top_k=tk or None, disable=dis or None, force=frc or None, temperature=tmp or None)


def add_intervention_args(p, top_k: bool = True):
    g = p.add_argument_group("interventions (repeatable; @layerN: one decoder layer, else every MoE layer)")

    def at(conv, flag):
        def parse(text):
            layer, value = _layer_value(text, flag)
            try:
                return layer, conv(value, flag)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{flag} {text!r}: bad value {value!r}") from None
        return parse

    if top_k:
        g.add_argument("--top-k", dest="iv_top_k", action="append", default=[], metavar="K[@layerN]",
                       type=at(lambda v, f: int(v), "--top-k"), help="experts per token")
    g.add_argument("--disable", dest="iv_disable", action="append", default=[], metavar="E[,E...][@layerN]",
                   type=at(_ints, "--disable"), help="mask these experts' router logits (tokens take their next choices)")
    g.add_argument("--force", dest="iv_force", action="append", default=[], metavar="E[,E...][@layerN]",
                   type=at(_ints, "--force"), help="always route to these experts (weighted by their router probability)")
    g.add_argument("--temperature", dest="iv_temperature", action="append", default=[], metavar="T[@layerN]",
                   type=at(lambda v, f: float(v), "--temperature"), help="router softmax temperature")
    return g


def intervention_of(p, args, cfg):
    try:
        iv = build_intervention(getattr(args, "iv_top_k", []), args.iv_disable, args.iv_force, args.iv_temperature)
        return None if iv is None else iv.check(cfg)
    except ValueError as e:
        p.error(str(e))


# ============================================================================ data
def _tokenizer_fn(path):
    cache = {}

    def get():
        if "tok" not in cache:
            if path is None or not (Path(path) / "tokenizer.json").is_file():
                raise ValueError(f"text needs a tokenizer: no tokenizer.json in {path} (pass --tokenizer DIR, or "
                                 "use input_ids)")
            from qwen3_jax.infer import Tokenizer

            cache["tok"] = Tokenizer.from_pretrained(path)
        return cache["tok"]
    return get


# ============================================================================ model
def _add_model_args(p, data_required=True):
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--data", action="append", required=data_required, metavar="JSONL",
                   help="input records (repeatable)")
    p.add_argument("--tokenizer", help="directory with tokenizer.json (default: --model)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, ...; auto = the checkpoint's torch_dtype")
    p.add_argument("--mesh", metavar="AXIS=N,...", help="device mesh, e.g. expert=8 or data=2,expert=4")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    p.add_argument("--max-len", type=int, help="tokens per sequence (longer records run in pieces); default "
                   "min(max_position_embeddings, 4096)")


def _load(p, args):
    import jax.numpy as jnp

    import qwen3_jax
    from qwen3_jax.checkpoint import CheckpointError, check_checkpoint

    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.max_len is not None and args.max_len < 1:
        p.error("--max-len must be >= 1")
    for d in args.data or []:
        if not Path(d).is_file():
            p.error(f"--data {d}: no such file")
    if not (Path(args.model) / "config.json").is_file():
        p.error(f"--model {args.model}: no config.json there")
    try:
        cfg = qwen3_jax.Qwen3Config.from_pretrained(args.model)
        check_checkpoint(args.model, cfg)
    except (ValueError, KeyError, CheckpointError) as e:
        p.error(f"--model {args.model}: {e.args[0] if isinstance(e, KeyError) and e.args else e}")
    if not cfg.is_moe:
        p.error(f"--model {args.model}: not a MoE model (model_type {cfg.model_type})")
    try:
        dtype = jnp.dtype((cfg.torch_dtype or "float32") if args.dtype == "auto" else args.dtype).name
    except TypeError:
        p.error(f"--dtype {args.dtype}: not a dtype (float32, bfloat16, float16)")
    mesh = None
    if args.mesh:
        from qwen3_jax.sharding import check_experts, make_mesh
        from qwen3_jax.sharding.mesh import parse_mesh

        try:
            sizes = parse_mesh(args.mesh)
            check_experts(cfg.num_experts, sizes)
            mesh = make_mesh(**sizes)
        except ValueError as e:
            p.error(f"--mesh: {e}")
    return cfg, (lambda: qwen3_jax.from_pretrained(args.model, dtype=dtype, mesh=mesh))


def _records(p, args, cfg):
    recs, skipped = read_records(args.data, _tokenizer_fn(args.tokenizer or args.model), cfg.vocab_size, log=print)
    if not recs:
        p.error(f"--data: no usable records ({len(skipped)} bad lines)" if skipped else "--data: no records")
    return recs, skipped


# ============================================================================ subcommands
def cmd_capture(p, args) -> int:
    from .stats import TRACE_FILE, capture

    cfg, load = agree(lambda: _load(p, args), p)       # this host's files: every host stops with a failure
    iv = intervention_of(p, args, cfg)
    recs, skipped = agree(lambda: _records(p, args, cfg), p)
    model = agree(load, p)
    trace = os.path.join(args.output, TRACE_FILE) if args.trace else None
    stats = capture(model, recs, intervention=iv, batch_size=args.batch_size, max_len=args.max_len, trace=trace)
    stats.model_name = os.path.abspath(args.model)
    import jax

    if jax.process_index() == 0:
        path = stats.save(args.output)
        print(f"{stats.tokens} tokens from {len(recs)} records: {path}")
        if args.report:
            from .reporting import report

            print(report(args.output, tokenizer=_tokenizer_or_none(args.tokenizer or args.model)))
    return 1 if skipped else 0


def _tokenizer_or_none(path):
    if path and (Path(path) / "tokenizer.json").is_file():
        from qwen3_jax.infer import Tokenizer

        return Tokenizer.from_pretrained(path)
    return None


def cmd_report(p, args) -> int:
    from .reporting import report

    if not (Path(args.dir) / "stats.json").is_file():
        p.error(f"{args.dir}: no stats.json (a `qwen3-jax-routing capture --output` directory)")
    tok = args.tokenizer
    if tok is not None and not (Path(tok) / "tokenizer.json").is_file():
        p.error(f"--tokenizer {tok}: no tokenizer.json there")
    if args.olmoe_min_occurrences < 1:
        p.error(f"--olmoe-min-occurrences must be >= 1, got {args.olmoe_min_occurrences}")
    if args.definitions != "olmoe":
        for flag, value, default in (("--saturation-reference", args.saturation_reference, None),
                                     ("--olmoe-min-occurrences", args.olmoe_min_occurrences, 1)):
            if value != default:
                p.error(f"{flag} is read with --olmoe (--definitions olmoe) only")
    ref = args.saturation_reference
    if ref is not None and not (Path(ref) / "stats.json").is_file():
        p.error(f"--saturation-reference {ref}: no stats.json (a `qwen3-jax-routing capture --trace` directory)")
    try:
        print(report(args.dir, args.out, tokenizer=_tokenizer_or_none(tok), top_tokens=args.top_tokens,
                     min_count=args.min_count, definitions=args.definitions,
                     olmoe_min_occurrences=args.olmoe_min_occurrences, saturation_reference=ref))
    except (ValueError, OSError, KeyError) as e:
        p.error(e.args[0] if isinstance(e, KeyError) and e.args else str(e))
    return 0


def cmd_compare(p, args) -> int:
    from .reporting import compare

    out = args.out or os.path.join(args.dir_b, "compare")
    try:
        res = compare(args.dir_a, args.dir_b, out)
    except (ValueError, OSError, KeyError) as e:
        p.error(e.args[0] if isinstance(e, KeyError) and e.args else str(e))
    if res["note"]:
        print(f"{p.prog}: note: {res['note']}", file=sys.stderr)
    print(f"{'layer':>6} {'top-k overlap':>14} {'top-1 agree':>12}   ({res['tokens']} tokens)")
    for layer, o, t in zip(res["layers"], res["overlap"], res["top1_agreement"]):
        print(f"{layer:>6} {o:>14.4f} {t:>12.4f}")
    print(f"wrote {os.path.join(out, 'compare.json')} and {os.path.join(out, 'compare.png')}")
    return 0


def cmd_eval(p, args) -> int:
    import math

    from .intervention import Intervention
    from .stats import evaluate

    cfg, load = agree(lambda: _load(p, args), p)       # this host's files: every host stops with a failure
    iv = intervention_of(p, args, cfg)
    recs, skipped = agree(lambda: _records(p, args, cfg), p)
    model = agree(load, p)
    kw = dict(batch_size=args.batch_size, max_len=args.max_len)
    base = evaluate(model, recs, intervention=Intervention(), **kw)
    rows = {"baseline": base}
    if iv is not None:
        rows["intervention"] = evaluate(model, recs, intervention=iv, **kw)
    out = {"model": os.path.abspath(args.model), "intervention": None if iv is None else iv.to_json(), **rows}
    if iv is not None:       # None when there is no target token (every record one token long)
        li, lb = rows["intervention"]["loss"], base["loss"]
        out["delta_loss"] = None if li is None or lb is None else li - lb

    print(f"{'':<14} {'loss':>9} {'ppl':>10} {'tokens':>9}")
    for name, r in rows.items():
        print(f"{name:<14} {_num(r['loss'], 9, 4)} {_num(r['ppl'], 10, 3)} {r['tokens']:>9}")
        for d, rd in sorted(r["domains"].items()):
            print(f"  {d:<12} {_num(rd['loss'], 9, 4)} {_num(rd['ppl'], 10, 3)} {rd['tokens']:>9}")
    if base["loss"] is None:
        print("no target tokens: every record is one token long (loss needs a next token)", file=sys.stderr)
    if iv is not None and out["delta_loss"] is not None:
        d = out["delta_loss"]
        print(f"intervention {iv}: loss {d:+.4f}, ppl x{math.exp(d) if d < 700 else math.inf:.4f}")
    if args.output:
        from .stats import write_json

        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        write_json(os.fspath(args.output), out)
    return 1 if skipped else 0


def _num(x, width: int, digits: int) -> str:
    return f"{'n/a':>{width}}" if x is None else f"{x:>{width}.{digits}f}"


def cmd_prune(p, args) -> int:
    from .prune import keep_sets, prune_experts, reap_saliency, save_pruned

    cfg, load = agree(lambda: _load(p, args), p)       # this host's files: every host stops with a failure
    if not cfg.num_experts_per_tok <= args.keep <= cfg.num_experts:
        p.error(f"--keep {args.keep}: must be in [num_experts_per_tok={cfg.num_experts_per_tok}, "
                f"num_experts={cfg.num_experts}]")
    iv = intervention_of(p, args, cfg)
    recs, skipped = agree(lambda: _records(p, args, cfg), p)
    model = agree(load, p)
    if iv is not None:
        model.runtime = model.runtime.replace(routing=iv)
    sal = reap_saliency(model, recs, batch_size=args.batch_size, max_len=args.max_len)
    pruned = prune_experts(model, sal, kept=keep_sets(sal, args.keep))
    save_pruned(pruned, args.output, sal)
    from qwen3_jax.train.trainer import copy_tokenizer

    copy_tokenizer(args.tokenizer or args.model, args.output)
    print(f"kept {args.keep} of {cfg.num_experts} experts per MoE layer by REAP saliency "
          f"({int(sal['count'].sum() // max(len(cfg.moe_layers), 1))} routed token slots per layer): {args.output}")
    return 1 if skipped else 0


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="qwen3-jax-routing", description="MoE routing research: capture router statistics, "
                       "report them, compare checkpoints, evaluate interventions, prune experts (REAP).")
    sub = p.add_subparsers(dest="command", required=True, metavar="{capture,report,compare,eval,prune}")

    def sp(name, help):
        return sub.add_parser(name, help=help, description=help, formatter_class=p.formatter_class)

    c = sp("capture", "run the model over records and write OUT/stats.json + OUT/counts.npz (+ OUT/trace.npz)")
    _add_model_args(c)
    c.add_argument("--output", required=True, help="capture directory")
    c.add_argument("--trace", action="store_true", help="also write the routed experts per token (trace.npz, "
                   "[tokens, layers, top_k] as vLLM's routed experts): needed by compare")
    c.add_argument("--report", action="store_true", help="also write the report (OUT/report/index.html)")
    add_intervention_args(c)
    add_launch_args(c)
    r = sp("report", "write CSV/JSON, PNGs and index.html of a capture directory")
    r.add_argument("dir", help="a capture --output directory")
    r.add_argument("--out", help="report directory (default: DIR/report)")
    r.add_argument("--tokenizer", help="tokenizer directory, to show token strings")
    r.add_argument("--top-tokens", type=int, default=50, help="most frequent token ids listed per layer")
    r.add_argument("--min-count", type=int, default=5, help="token ids with fewer first-choice routings are left "
                   "out of the vocabulary specialization mean (qwen3-jax's definition)")
    r.add_argument("--definitions", choices=("qwen3-jax", "olmoe"), default="qwen3-jax",
                   help="olmoe: also write OLMoE's quantities (arXiv 2409.02060) under their own names: domain "
                   "specialization in percent (uniform 100k/E), vocabulary specialization (unweighted, top-1, current "
                   "and next token), rank-adjacent co-activation, router saturation (olmoe_*.csv/png, summary.json "
                   "\"olmoe\"); qwen3-jax's own numbers are written as always")
    r.add_argument("--olmoe", dest="definitions", action="store_const", const="olmoe",
                   help="the same as --definitions olmoe")
    r.add_argument("--olmoe-min-occurrences", type=int, default=1, metavar="N",
                   help="token ids with fewer occurrences are left out of OLMoE's vocabulary specialization "
                   "(default 1: every id, as OLMoE)")
    r.add_argument("--saturation-reference", metavar="DIR", help="with --olmoe: router saturation against this "
                   "capture of the same data (e.g. the final checkpoint's; both captured with --trace)")
    m = sp("compare", "router saturation: per-layer top-k overlap of two captures of the same data (--trace)")
    m.add_argument("dir_a")
    m.add_argument("dir_b")
    m.add_argument("--out", help="output directory (default: DIR_B/compare)")
    e = sp("eval", "next-token loss / perplexity with and without an intervention")
    _add_model_args(e)
    e.add_argument("--output", help="also write the result as JSON here")
    add_intervention_args(e)
    add_launch_args(e)
    pr = sp("prune", "keep the --keep most salient experts per layer (REAP) and save a transformers-loadable model")
    _add_model_args(pr)
    pr.add_argument("--keep", type=int, required=True, help="experts kept per MoE layer")
    pr.add_argument("--output", required=True, help="directory for the pruned checkpoint")
    add_intervention_args(pr, top_k=False)
    add_launch_args(pr)
    return p


COMMANDS = {"capture": cmd_capture, "report": cmd_report, "compare": cmd_compare, "eval": cmd_eval,
            "prune": cmd_prune}


def main(argv=None) -> int:
    p = parser()
    try:
        args = p.parse_args(argv)
        sub = p._subparsers._group_actions[0].choices[args.command]
        default_platform()
        if hasattr(args, "coordinator"):
            launch(sub, args)
        return COMMANDS[args.command](sub, args)
    except SystemExit as e:
        return int(e.code or 0)


if __name__ == "__main__":
    sys.exit(main())
