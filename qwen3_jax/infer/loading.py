"""What the inference commands share (qwen3-jax-infer, qwen3-jax-chat, qwen3-jax-serve): their model and sampling
flags, the checks of those flags against the checkpoint (usage errors: one line, exit 2), loading the model (the
serving layout on a mesh) and the tokenizer, and the sampling defaults of a request."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty")


def mesh_arg(text: str) -> dict[str, int]:
    from qwen3_jax.sharding.mesh import parse_mesh

    try:
        return parse_mesh(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_model_args(p: argparse.ArgumentParser):
    """--model, --tokenizer, --adapter, --dtype, --mesh (checked by `setup`)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="Hugging Face checkpoint directory (config.json + safetensors)")
    g.add_argument("--tokenizer", help="directory with tokenizer.json (+ tokenizer_config.json); default: --model")
    g.add_argument("--adapter", metavar="DIR", help="a PEFT LoRA adapter (adapter_config.json + "
                   "adapter_model.safetensors, e.g. qwen3-jax-train --lora-rank's export), merged into the weights")
    g.add_argument("--dtype", default="auto",
                   help="compute/parameter dtype: float32, bfloat16, ...; 'auto' = the checkpoint's torch_dtype")
    g.add_argument("--mesh", type=mesh_arg, metavar="AXIS=N,...",
                   help="device mesh, e.g. data=2,expert=4 (axes data, fsdp, expert, tensor); default: one device, "
                   "or every device on 'tensor' when several processes run (qwen3-jax-infer's launch flags)")


def add_sampling_flags(g, top_k_flag: str = "--top-k"):
    """The SAMPLING_FLAGS (every generation command: qwen3-jax-infer, -chat, -serve)."""
    g.add_argument("--temperature", type=float, help="0 = greedy")
    g.add_argument("--top-p", type=float)
    g.add_argument(top_k_flag, dest="top_k", type=int, help="sampling top-k (0 = off)")
    g.add_argument("--min-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--presence-penalty", type=float)
    g.add_argument("--frequency-penalty", type=float)


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int, top_k_flag: str = "--top-k"):
    """The generation group of the batch CLI and the chat: --max-new-tokens, the SAMPLING_FLAGS, --thinking-budget,
    --stop-token-id, --enable-thinking / --no-thinking. Returns the group (for the command's own flags)."""
    g = p.add_argument_group("generation (defaults: the model's generation_config.json)")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help=f"default {max_new_tokens}; capped so that prompt + new tokens fit the context")
    add_sampling_flags(g, top_k_flag)
    g.add_argument("--thinking-budget", type=int, metavar="N",
                   help="after N thinking tokens without </think>, end the thinking and answer")
    g.add_argument("--stop-token-id", type=int, action="append", dest="stop_token_ids", metavar="ID",
                   help="also stop at this token id (repeatable; eos always stops)")
    think = g.add_mutually_exclusive_group()
    think.add_argument("--enable-thinking", dest="enable_thinking", action="store_true", default=True,
                       help="Qwen3 thinking mode (default)")
    think.add_argument("--no-thinking", dest="enable_thinking", action="store_false",
                       help="non-thinking mode: the chat template closes an empty <think></think> block")
    return g


def setup(p: argparse.ArgumentParser, args):
    """Check the arguments (usage errors exit 2) and return the model config; sets args.dtype and args.mesh (a Mesh)."""
    import jax.numpy as jnp

    from qwen3_jax import Qwen3Config

    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    if args.thinking_budget is not None and args.thinking_budget < 0:
        p.error("--thinking-budget must be >= 0")
    if getattr(args, "batch_size", 1) < 1:
        p.error("--batch-size must be >= 1")
    if getattr(args, "max_len", None) is not None and args.max_len < 2:
        p.error("--max-len must be >= 2")
    if not (Path(args.model) / "config.json").is_file():
        p.error(f"--model {args.model}: no config.json there")
    if args.tokenizer is not None and not (Path(args.tokenizer) / "tokenizer.json").is_file():
        p.error(f"--tokenizer {args.tokenizer}: no tokenizer.json there")
    try:
        cfg = Qwen3Config.from_pretrained(args.model)
    except (ValueError, KeyError) as e:
        p.error(f"--model {args.model}: {e.args[0] if isinstance(e, KeyError) and e.args else e}")
    from qwen3_jax.checkpoint import CheckpointError, check_checkpoint

    try:  # every tensor's name and shape, and truncated files, from the headers: before anything is loaded
        check_checkpoint(args.model, cfg)
    except CheckpointError as e:
        p.error(f"--model: {e}")
    if getattr(args, "adapter", None) is not None:
        from qwen3_jax.lora import AdapterError, check_adapter

        try:
            check_adapter(args.adapter, cfg)
        except AdapterError as e:
            p.error(f"--adapter: {e}")
    try:
        args.dtype = jnp.dtype((cfg.torch_dtype or "float32") if args.dtype == "auto" else args.dtype).name
    except TypeError:
        p.error(f"--dtype {args.dtype}: not a dtype (float32, bfloat16, float16)")
    import jax

    if args.mesh is None and jax.process_count() > 1:
        args.mesh = {"tensor": -1}  # the model spread over every host, each running every row of the batch
    if args.mesh is not None:
        from qwen3_jax.sharding import check_experts, make_mesh

        try:
            check_experts(cfg.num_experts if cfg.is_moe else 0, args.mesh)
            args.mesh = make_mesh(**args.mesh)
        except ValueError as e:
            p.error(f"--mesh: {e}")
    return cfg


def load_tokenizer(args):
    """The tokenizer of --tokenizer (else --model), or None when the model directory has none."""
    from .tokenizer import Tokenizer

    path = Path(args.tokenizer or args.model)
    return Tokenizer.from_pretrained(path) if (path / "tokenizer.json").is_file() else None


def checked_tokenizer(p, args):
    """load_tokenizer, a tokenizer.json that does not load being a usage error (one line, exit 2)."""
    try:
        return load_tokenizer(args)
    except Exception as e:  # noqa: BLE001  (tokenizers raises a bare Exception for a malformed file)
        p.error(f"{'--tokenizer ' + args.tokenizer if args.tokenizer else '--model ' + args.model}: cannot load "
                f"tokenizer.json: {' '.join(str(e).split())[:300]}")


def load_model(args):
    """The model of --model (+ --adapter) in args.dtype, laid out for serving on args.mesh (as `setup` left them)."""
    import qwen3_jax

    from qwen3_jax.partition import SERVE_PARAM_RULES

    t0 = time.perf_counter()
    # the serving layout: no weight is gathered per decoded token (experts over 'expert', the rest over 'tensor')
    rules = SERVE_PARAM_RULES if args.mesh is not None else None
    adapter = getattr(args, "adapter", None)
    model = qwen3_jax.from_pretrained(args.model, dtype=args.dtype, mesh=args.mesh, rules=rules, adapter=adapter)
    with_adapter = f" with adapter {adapter}" if adapter else ""
    print(f"loaded {args.model}{with_adapter} ({args.dtype}) in {time.perf_counter() - t0:.1f}s", file=sys.stderr,
          flush=True)
    return model


class SamplingDefaults:
    """SamplingParams for a request: generation_config.json, then command-line flags, then the request's fields."""

    def __init__(self, model_dir, args):
        from .sampling import SamplingParams

        self._source = os.fspath(model_dir)  # its generation_config.json when present, else Qwen3's recommendations
        self._flags = {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k) is not None}
        self._make = SamplingParams.from_generation_config
        self._base = {}

    def __call__(self, enable_thinking: bool, **overrides):
        if enable_thinking not in self._base:
            self._base[enable_thinking] = self._make(self._source, enable_thinking=enable_thinking, **self._flags)
        return self._base[enable_thinking].replace(**overrides)
