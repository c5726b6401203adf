"""qwen3-jax-train / python -m qwen3_jax.train, and qwen3-jax-export.

    qwen3-jax-train --model CKPT_DIR --data train.jsonl --output runs/a --steps 1000 --batch-size 32 \\
        --seq-len 2048 --mesh data=4,expert=8 --dtype bfloat16 --param-dtype float32 --export-hf runs/a/hf
    qwen3-jax-train --config run.yaml --lr 1e-5          # yaml keys = flag names; flags override the file
    qwen3-jax-export --checkpoint runs/a --out hf_dir    # latest step (or runs/a/checkpoints/<step>)

`main(argv)` returns an exit code (it never calls sys.exit), so it can be called from Python.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from qwen3_jax.hostmem import tune_malloc

from .step import FREEZE_GROUPS, SCHEDULES


def _csv(s):
    return [x.strip() for x in s.split(",") if x.strip()] if isinstance(s, str) else list(s)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen3-jax-train", description="Fine-tune Qwen3 / Qwen3-MoE (JAX, Flax NNX).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--config", help="yaml file of flag values (keys as the flag names, - or _); command-line flags override it")
    a("--model", help="Hugging Face checkpoint directory, or a preset name (random init)")
    a("--tokenizer", help="tokenizer directory (default: the model directory)")
    a("--data", action="append", help="training jsonl (repeatable): {text} | {messages} | {input_ids, labels?}")
    a("--eval-data", action="append", help="evaluation jsonl (repeatable); eval loss at each save and at the end")
    a("--output", help="run directory: checkpoints, metrics.jsonl; an existing run there is resumed")
    a("--steps", type=int, help="optimizer steps (overrides --epochs)")
    a("--epochs", type=float, default=1.0, help="passes over the packed data when --steps is not given")
    a("--batch-size", type=int, default=8, help="global batch in sequences (rows of seq-len)")
    a("--seq-len", type=int, default=1024)
    a("--grad-accum", type=int, default=1, help="micro-batches per step (batch-size must divide)")
    a("--lr", type=float, default=1e-5)
    a("--warmup", type=int, default=0, help="linear warmup steps")
    a("--schedule", choices=SCHEDULES, default="cosine")
    a("--weight-decay", type=float, default=0.0)
    a("--clip", type=float, default=1.0, help="clip by global gradient norm (0: off)")
    a("--lbl-coef", type=float, help="load-balancing loss coefficient (default: the config's router_aux_loss_coef)")
    a("--lbl-scope", choices=("global", "micro"), default="global",
      help="LBL statistics over the whole global batch, or per micro-batch")
    a("--z-loss-coef", type=float, default=0.0, help="router z-loss coefficient")
    a("--mesh", help="e.g. data=2,expert=4 (axes data, fsdp, expert, tensor; default: all devices on data)")
    a("--remat", choices=("none", "full", "dots"), default="none")
    a("--capacity-factor", type=float, help="expert-parallel capacity factor (default: dropless)")
    a("--dtype", default="float32", help="compute dtype, e.g. bfloat16")
    a("--param-dtype", default="float32", help="master weight dtype")
    a("--save-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    a("--stop-after-steps", type=int, help="end this invocation (with a checkpoint) after N steps; rerun to resume")
    a("--keep", type=int, default=3, help="checkpoints to keep")
    a("--export-hf", help="write a Hugging Face checkpoint here at the end")
    a("--seed", type=int, default=0)
    a("--freeze", type=_csv, default=[], help=f"comma-separated groups to freeze: {', '.join(FREEZE_GROUPS)}")
    a("--strict", action="store_true", help="fail on a malformed data line instead of skipping it")
    a("--overflow", choices=("split", "truncate"), default="split",
      help="a record longer than --seq-len: cut into seq-len pieces (every token trained on) or truncated")
    a("--peak-flops", type=float, help="peak FLOP/s of one device, for the MFU estimate (e.g. 459e12 TPU v5p)")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    if args.config:
        import yaml

        with open(args.config) as f:
            conf = yaml.safe_load(f) or {}
        known = {a.dest for a in p._actions}
        conf = {k.replace("-", "_"): v for k, v in conf.items()}
        bad = sorted(set(conf) - known)
        if bad:
            p.error(f"{args.config}: unknown keys {bad}")
        for k in ("data", "eval_data"):
            if isinstance(conf.get(k), str):
                conf[k] = [conf[k]]
        if "freeze" in conf:
            conf["freeze"] = _csv(conf["freeze"])
        p.set_defaults(**conf)
        cli_args = args
        args = p.parse_args(argv)  # command-line flags override the file
        for k in ("data", "eval_data"):  # appending flags replace the file's list instead of extending it
            if getattr(cli_args, k):
                setattr(args, k, getattr(cli_args, k))
    for req in ("model", "data", "output"):
        if not getattr(args, req):
            p.error(f"--{req} is required (flag or config file)")
    return args


def main(argv=None) -> int:
    tune_malloc()
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    from . import trainer
    from .data import DataError

    try:
        os.makedirs(args.output, exist_ok=True)
        with open(os.path.join(args.output, "train_args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
        result = trainer.train(args)
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"qwen3-jax-train: error: {e}", file=sys.stderr)
        return 1
    print(trainer.summary(result["rows"]))
    if result["skipped"]:
        print(f"{len(result['skipped'])} malformed records skipped")
    return 0


def export_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="qwen3-jax-export", description="Orbax training checkpoint -> HF safetensors")
    p.add_argument("--checkpoint", required=True, help="a training --output directory (latest step) or one step's dir")
    p.add_argument("--out", required=True, help="directory for config.json + model.safetensors (+ tokenizer files)")
    p.add_argument("--tokenizer", help="tokenizer files to copy (default: the run's tokenizer / model directory)")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    from . import trainer

    try:
        step = trainer.export_checkpoint(args.checkpoint, args.out, args.tokenizer)
    except (FileNotFoundError, ValueError) as e:
        print(f"qwen3-jax-export: error: {e}", file=sys.stderr)
        return 1
    print(f"exported step {step} to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
