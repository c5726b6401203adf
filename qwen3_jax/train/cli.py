"""qwen3-jax-train / python -m qwen3_jax.train, and qwen3-jax-export.

    qwen3-jax-train --model CKPT_DIR --data train.jsonl --output runs/a --steps 1000 --batch-size 32 \\
        --seq-len 2048 --mesh data=4,expert=8 --dtype bfloat16 --param-dtype float32 --export-hf runs/a/hf
    qwen3-jax-train --config run.yaml --lr 1e-5          # yaml keys = flag names; flags override the file
    qwen3-jax-export --checkpoint runs/a --out hf_dir    # latest step (or runs/a/checkpoints/<step>)
    # LoRA on a frozen bf16 base: the export is a PEFT adapter (peft, vLLM), or with --merge-lora a full checkpoint
    qwen3-jax-train --model CKPT_DIR ... --lora-rank 16 --lora-alpha 32 --lora-dropout 0.05 --export-hf runs/b/adapter
    # a pod slice / several hosts: the same command on every host (auto-detected on TPU pods and SLURM), or
    qwen3-jax-train ... --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0   # (1 on the other host)

`main(argv)` returns an exit code (it never calls sys.exit), so it can be called from Python: 0 done,
1 the run had bad records (skipped, or --strict stopped at one), 2 a usage or setup error (one line
`qwen3-jax-train: error: ...` on stderr, and no output directory made for a new run).
"""

from __future__ import annotations

import argparse

from qwen3_jax.hostmem import tune_malloc
from qwen3_jax.launch import (AT_LEAST_0, AT_LEAST_1, POSITIVE, ArgumentParser, add_launch_args, check_bounds,
                              default_platform, fail, launch)

from .step import FREEZE_GROUPS, SCHEDULES


def _csv(s):
    return [x.strip() for x in s.split(",") if x.strip()] if isinstance(s, str) else list(s)


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="qwen3-jax-train", description="Fine-tune Qwen3 / Qwen3-MoE (JAX, Flax NNX).")
    a = p.add_argument
    a("--config", help="yaml file of flag values (keys as the flag names, - or _); command-line flags override it")
    a("--model", help="Hugging Face checkpoint directory, or a preset name (random init)")
    a("--tokenizer", help="tokenizer directory (default: the model directory)")
    a("--data", action="append", help="training jsonl (repeatable): {text} | {messages} | {input_ids, labels?}")
    a("--eval-data", action="append", help="evaluation jsonl (repeatable); eval loss at each save and at the end")
    a("--output", help="run directory: checkpoints, metrics.jsonl; an existing run there is resumed")
    a("--routing-stats-every", type=int, default=0, metavar="N",
      help="every N steps and at the end, write the routing statistics of the held-out set (--routing-data, else "
      "--eval-data) to OUTPUT/routing/step_<step>/ (stats.json + counts.npz, as qwen3-jax-routing capture)")
    a("--routing-data", action="append", metavar="JSONL", help="held-out records for --routing-stats-every "
      "(repeatable): {text} | {prompt} | {messages} | {input_ids} | {prompt_token_ids}, each with an optional "
      "\"domain\" (as qwen3-jax-routing capture --data)")
    a("--steps", type=int, help="optimizer steps (overrides --epochs)")
    a("--epochs", type=float, default=1.0, help="passes over the packed data when --steps is not given")
    a("--batch-size", "--batch", type=int, default=8, help="global batch in sequences (rows of seq-len)")
    a("--seq-len", "--seq", type=int, default=1024,
      help="tokens per training row (sequence length): records are packed into rows of this length")
    a("--grad-accum", type=int, default=1, help="micro-batches per step (batch-size must divide)")
    a("--lr", type=float, default=1e-5, help="peak learning rate (AdamW), reached after --warmup steps")
    a("--warmup", type=int, default=0, help="linear warmup steps")
    a("--schedule", choices=SCHEDULES, default="cosine", help="learning-rate decay after the warmup")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay (not on norm scales)")
    a("--clip", type=float, default=1.0, help="clip by global gradient norm (0: off)")
    a("--lbl-coef", type=float, help="load-balancing loss coefficient (default: the config's router_aux_loss_coef)")
    a("--lbl-scope", choices=("global", "micro"), default="global",
      help="LBL statistics over the whole global batch, or per micro-batch")
    a("--z-loss-coef", type=float, default=0.0, help="router z-loss coefficient")
    a("--mesh", help="e.g. data=2,expert=4 (axes data, fsdp, expert, tensor; default: all devices on data)")
    a("--remat", choices=("none", "full", "dots"), default="full",
      help="recompute activations in the backward: every layer (full), all but matmul outputs (dots), or none")
    a("--capacity-factor", type=float, help="expert parallelism: fixed per-(source, destination) buffers of this "
      "factor x the mean routed rows (padded dispatch; default: the platform's dispatch)")
    a("--ep-buffer-factor", type=float, default=1.25, help="expert parallelism on GPU/TPU: the ragged dispatch "
      "receives at most this factor x the mean routed rows per device, the overflow is dropped and counted "
      "(0: the worst case, never drops)")
    a("--dtype", default="float32", help="compute dtype, e.g. bfloat16")
    a("--param-dtype", help="master weight dtype: float32 unless given; with --lora-rank the frozen base's dtype, "
      "bfloat16 unless given (the adapters are float32)")
    a("--save-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    a("--stop-after-steps", type=int, help="end this invocation (with a checkpoint) after N steps; rerun to resume")
    a("--keep", type=int, default=3, help="checkpoints to keep")
    a("--export-hf", help="write a Hugging Face checkpoint here at the end (with --lora-rank: a PEFT adapter)")
    lo = p.add_argument_group("LoRA (low-rank adapters on the frozen model; the optimizer state covers the adapters "
                              "only)")
    lo.add_argument("--lora-rank", type=int, metavar="R", help="train rank-R adapters instead of the weights")
    lo.add_argument("--lora-alpha", type=float, metavar="A", help="adapter scale A / R (default A = R)")
    lo.add_argument("--lora-dropout", type=float, metavar="P", help="dropout on the adapters' input (default 0)")
    lo.add_argument("--lora-targets", type=_csv, metavar="q_proj,k_proj,v_proj,o_proj",
                    help="projections to adapt (default: all four attention projections)")
    lo.add_argument("--merge-lora", action="store_true", help="--export-hf writes the base with the adapters merged "
                    "in (a full checkpoint) instead of the PEFT adapter")
    a("--seed", type=int, default=0, help="data shuffling (and the random init of a preset)")
    a("--freeze", type=_csv, default=[], help=f"comma-separated groups to freeze: {', '.join(FREEZE_GROUPS)}")
    a("--strict", action="store_true", help="fail on a malformed data line instead of skipping it")
    a("--overflow", choices=("split", "truncate"), default="split",
      help="a record longer than --seq-len: cut into seq-len pieces (every token trained on) or truncated")
    a("--peak-flops", type=float, help="peak FLOP/s of one device, for the MFU estimate (e.g. 459e12 TPU v5p)")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_launch_args(p)
    return p


def parse_args(argv=None, p: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    p = p or parser()
    args = p.parse_args(argv)
    if args.config:
        import yaml

        try:
            with open(args.config) as f:
                conf = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            p.error(f"--config {args.config}: {' '.join(str(e).split())}")
        if not isinstance(conf, dict):
            p.error(f"--config {args.config}: expected a mapping of flag names to values")
        known = {a.dest for a in p._actions}
        conf = {k.replace("-", "_"): v for k, v in conf.items()}
        bad = sorted(set(conf) - known)
        if bad:
            p.error(f"{args.config}: unknown keys {bad}")
        for k in ("data", "eval_data", "routing_data"):
            if isinstance(conf.get(k), str):
                conf[k] = [conf[k]]
        for k in ("freeze", "lora_targets"):
            if k in conf:
                conf[k] = _csv(conf[k])
        p.set_defaults(**conf)
        cli_args = args
        args = p.parse_args(argv)  # command-line flags override the file
        for k in ("data", "eval_data", "routing_data"):  # appending flags replace the file's list instead of extending it
            if getattr(cli_args, k):
                setattr(args, k, getattr(cli_args, k))
    for req in ("model", "data", "output"):
        if not getattr(args, req):
            p.error(f"--{req} is required (flag or config file)")
    if args.routing_stats_every < 0:
        p.error("--routing-stats-every must be >= 0 (0: off)")
    check_bounds(p, args, steps=AT_LEAST_1, epochs=POSITIVE, batch_size=AT_LEAST_1, seq_len=AT_LEAST_1,
                 grad_accum=AT_LEAST_1, lr=POSITIVE, warmup=AT_LEAST_0, weight_decay=AT_LEAST_0, clip=AT_LEAST_0,
                 lbl_coef=AT_LEAST_0, z_loss_coef=AT_LEAST_0, capacity_factor=POSITIVE, ep_buffer_factor=AT_LEAST_0,
                 save_every=AT_LEAST_0, stop_after_steps=AT_LEAST_1, keep=AT_LEAST_1, peak_flops=POSITIVE)
    if args.batch_size % args.grad_accum:
        p.error(f"--batch-size {args.batch_size} is not divisible by --grad-accum {args.grad_accum}")
    if args.routing_stats_every and not (args.routing_data or args.eval_data):
        p.error("--routing-stats-every needs a held-out set: --routing-data JSONL (or --eval-data)")
    if args.routing_data and not args.routing_stats_every:
        p.error("--routing-data is read by --routing-stats-every N only")
    _check_lora(p, args)
    return args


def _check_lora(p, args):
    """LoRA flags: usage errors exit 2; resolves --param-dtype (float32, or bfloat16 for the frozen base)."""
    if args.lora_rank is None:
        for flag in ("lora_alpha", "lora_dropout", "lora_targets"):
            if getattr(args, flag) is not None:
                p.error(f"--{flag.replace('_', '-')} needs --lora-rank R")
        if args.merge_lora:
            p.error("--merge-lora needs --lora-rank R")
        if args.param_dtype is None:
            args.param_dtype = "float32"
        return
    from qwen3_jax.lora import LoRAConfig

    if args.freeze:
        p.error("--freeze: with --lora-rank the whole model is frozen (only the adapters train)")
    if args.merge_lora and not args.export_hf:
        p.error("--merge-lora writes --export-hf DIR: give it")
    try:
        LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout or 0.0,
                   **({"targets": args.lora_targets} if args.lora_targets is not None else {}))
    except ValueError as e:
        p.error(f"--lora-*: {e}")
    if args.param_dtype is None:
        args.param_dtype = "bfloat16"


def main(argv=None) -> int:
    tune_malloc()
    p = parser()
    try:
        args = parse_args(argv, p)
        default_platform()
        launch(p, args)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2, its one line already printed)
        return int(e.code or 0)
    from . import trainer
    from .data import DataError

    try:
        result = trainer.train(args)
    except DataError as e:  # a bad record (--strict), or none usable
        return fail(p.prog, e, 1)
    except trainer.SetupError as e:
        return fail(p.prog, e, 2)
    import jax

    n_bad = result["skipped_total"]
    if jax.process_index() == 0:
        print(trainer.summary(result["rows"]))
        if n_bad:
            print(f"{n_bad} malformed records skipped (each named above as file:line: reason)")
    return 1 if n_bad else 0


def export_main(argv=None) -> int:
    p = ArgumentParser(prog="qwen3-jax-export", description="Orbax training checkpoint -> HF safetensors")
    p.add_argument("--checkpoint", required=True, help="a training --output directory (latest step) or one step's dir")
    p.add_argument("--out", required=True, help="directory for config.json + model.safetensors (+ tokenizer files)")
    p.add_argument("--tokenizer", help="tokenizer files to copy (default: the run's tokenizer / model directory)")
    p.add_argument("--merge-lora", action="store_true", help="a LoRA run: write its base with the adapters merged in "
                   "(config.json + model.safetensors) instead of the PEFT adapter (adapter_config.json + "
                   "adapter_model.safetensors)")
    p.add_argument("--base", help="with --merge-lora: the base checkpoint directory (default: the run's --model)")
    add_launch_args(p)
    try:
        args = p.parse_args(argv)
        if args.base and not args.merge_lora:
            p.error("--base is the checkpoint to merge into: it needs --merge-lora")
        default_platform()
        launch(p, args)
    except SystemExit as e:
        return int(e.code or 0)
    from . import trainer

    try:
        step = trainer.export_checkpoint(args.checkpoint, args.out, args.tokenizer, merge_lora=args.merge_lora,
                                         base=args.base)
    except (OSError, ValueError, KeyError) as e:
        return fail(p.prog, e, 2)
    import jax

    if jax.process_index() == 0:
        print(f"exported step {step} to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
