"""Command-line inference: `qwen3-jax-infer` (batch JSONL, resumable) and `qwen3-jax-chat` (interactive, streaming).

    qwen3-jax-infer --model DIR --input in.jsonl --output out.jsonl --batch-size 16 --temperature 0
    qwen3-jax-chat --model DIR --system "You are terse." --no-thinking

Input lines of `qwen3-jax-infer` (one JSON object each; blank lines are skipped):

    {"id": "a", "prompt": "raw text, no chat template"}
    {"id": "b", "messages": [{"role": "user", "content": "Hi"}], "tools": [...]}
    {"id": 3, "prompt_token_ids": [9707, 1879]}                  # needs no tokenizer
    {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
     "body": {"messages": [...], "max_tokens": 64, "temperature": 0.7, "tools": [...]}}   # OpenAI batch

Per-line overrides (the OpenAI body takes the same names, with `max_tokens`/`max_completion_tokens` for
`max_new_tokens`): max_new_tokens, temperature, top_p, top_k, min_p, seed, repetition_penalty, presence_penalty,
frequency_penalty, thinking_budget, stop_token_ids, enable_thinking, chat_template_kwargs. Sampling defaults come
from the model's generation_config.json (Qwen3's recommendations for thinking / non-thinking), command-line flags
override them and a line's own fields override both. A line may also carry a "domain" (per-domain routing statistics).

MoE routing (qwen3_jax.routing), for the whole run: `--top-k [LAYER:]K` (alias `--router-top-k`: the router's experts
per token; the sampling top-k is `--sampling-top-k K` or a line's "top_k"), `--disable-experts LAYER:E[,E...]`,
`--force-experts LAYER:E[,E...]`, `--router-temperature [LAYER:]T` (LAYER `*` or left out: every MoE layer), applied
in the KV-cached generation itself; `--routing-stats DIR` writes DIR/stats.json and DIR/counts.npz (the format of
`qwen3-jax-routing capture`) for the tokens the requests ran through the model, as the prefill and decode steps
routed them.

Output: one line per input line, written (and fsync'ed) as each request completes:
`{"id", "text", "token_ids", "finish_reason", "reasoning_content", "content", "tool_calls", "tool_call_errors",
"usage"}`, the OpenAI batch output object for OpenAI batch lines, and `{"line": N, "id": ..., "error": reason}` for a
line that cannot run. A rerun appends only what is missing: ids with a result and lines with an error line are
skipped, and a torn last line (the process was killed while writing it) is cut off. The exit status is 1 when some
line has an error line, 2 on a usage or setup error (one line `qwen3-jax-infer: error: ...`, no traceback, and no
output file made): a bad flag, a missing or damaged checkpoint (every tensor's name and shape is checked from the
safetensors headers before anything is loaded), a config key that is missing.

Several hosts (a pod slice): the same command on every host (`--coordinator HOST:PORT --num-processes N
--process-id I`, or auto-detected on TPU pods and SLURM). Every process reads the input and runs the same batches
over the model spread across all hosts (default mesh: every device on 'tensor'); process 0 reads and writes the
output file, so each id is written once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
import time
import uuid
from pathlib import Path

from qwen3_jax.hostmem import tune_malloc
from qwen3_jax.launch import ArgumentParser, add_launch_args, agree, allgather_json, default_platform, launch

from .chat import THINK_END, THINK_START

# ---------------------------------------------------------------------------------------------------------------
# Arguments shared by both commands

SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty")


def _mesh_arg(text: str) -> dict[str, int]:
    from qwen3_jax.sharding.plan import parse_mesh

    try:
        return parse_mesh(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_model_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="Hugging Face checkpoint directory (config.json + safetensors)")
    g.add_argument("--tokenizer", help="directory with tokenizer.json (+ tokenizer_config.json); default: --model")
    g.add_argument("--adapter", metavar="DIR", help="a PEFT LoRA adapter (adapter_config.json + "
                   "adapter_model.safetensors, e.g. qwen3-jax-train --lora-rank's export), merged into the weights")
    g.add_argument("--dtype", default="auto",
                   help="compute/parameter dtype: float32, bfloat16, ...; 'auto' = the checkpoint's torch_dtype")
    g.add_argument("--mesh", type=_mesh_arg, metavar="AXIS=N,...",
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


def _add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int, top_k_flag: str = "--top-k"):
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


def _setup(p: argparse.ArgumentParser, args):
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


def _load_tokenizer(args):
    """The tokenizer of --tokenizer (else --model), or None when the model directory has none."""
    from qwen3_jax.infer import Tokenizer

    path = Path(args.tokenizer or args.model)
    return Tokenizer.from_pretrained(path) if (path / "tokenizer.json").is_file() else None


def _checked_tokenizer(p, args):
    """_load_tokenizer, a tokenizer.json that does not load being a usage error (one line, exit 2)."""
    try:
        return _load_tokenizer(args)
    except Exception as e:  # noqa: BLE001  (tokenizers raises a bare Exception for a malformed file)
        p.error(f"{'--tokenizer ' + args.tokenizer if args.tokenizer else '--model ' + args.model}: cannot load "
                f"tokenizer.json: {' '.join(str(e).split())[:300]}")


def _load_model(args):
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


def _eos_ids(cfg, tokenizer) -> list[int]:
    """The ids that stop every request (the engine's default): the model's and the tokenizer's eos."""
    eos = [] if tokenizer is None or tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    return sorted({i for i in [*cfg.eos_token_ids, *eos] if 0 <= i < cfg.vocab_size})


class SamplingDefaults:
    """SamplingParams for a request: generation_config.json, then command-line flags, then the request's fields."""

    def __init__(self, model_dir, args):
        from qwen3_jax.infer import SamplingParams

        self._source = os.fspath(model_dir)  # its generation_config.json when present, else Qwen3's recommendations
        self._flags = {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k) is not None}
        self._make = SamplingParams.from_generation_config
        self._base = {}

    def __call__(self, enable_thinking: bool, **overrides):
        if enable_thinking not in self._base:
            self._base[enable_thinking] = self._make(self._source, enable_thinking=enable_thinking, **self._flags)
        return self._base[enable_thinking].replace(**overrides)


# ---------------------------------------------------------------------------------------------------------------
# qwen3-jax-infer: input lines


class LineError(Exception):
    def __init__(self, reason: str, id=None):
        super().__init__(reason)
        self.reason, self.id = reason, id


@dataclasses.dataclass
class Job:
    line: int
    id: str | int
    request: object  # qwen3_jax.infer.Request
    openai_model: str | None = None  # set for OpenAI batch lines: the response's "model"
    domain: str | None = None        # the line's "domain" (per-domain routing statistics)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# per-line field -> (check, what it must be)
OVERRIDES = {
    "max_new_tokens": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "temperature": (_is_number, "a number"),
    "top_p": (_is_number, "a number"),
    "top_k": (_is_int, "an integer"),
    "min_p": (_is_number, "a number"),
    "repetition_penalty": (_is_number, "a number"),
    "presence_penalty": (_is_number, "a number"),
    "frequency_penalty": (_is_number, "a number"),
    "seed": (lambda v: v is None or _is_int(v), "an integer"),
    "thinking_budget": (lambda v: v is None or (_is_int(v) and v >= 0), "an integer >= 0 or null"),
    "stop_token_ids": (lambda v: isinstance(v, list) and all(_is_int(t) for t in v), "a list of integers"),
    "enable_thinking": (lambda v: isinstance(v, bool), "true or false"),
    "chat_template_kwargs": (lambda v: isinstance(v, dict), "an object"),
}
PROMPT_FIELDS = ("prompt", "messages", "prompt_token_ids")
LINE_FIELDS = {"id", "tools", "domain", *PROMPT_FIELDS, *OVERRIDES}
OPENAI_URL = "/v1/chat/completions"
OPENAI_BODY_FIELDS = {"messages", "tools", "tool_choice", "max_tokens", "max_completion_tokens", "model", "n",
                      "stream", "stop", "user", "metadata", "store", "parallel_tool_calls", "logprobs",
                      *OVERRIDES} - {"max_new_tokens"}


class LineParser:
    """Turns one input line into a `Job` (a `Request` with its id), or raises `LineError`."""

    def __init__(self, args, cfg, tokenizer, sampling: SamplingDefaults):
        self.args, self.tokenizer, self.sampling = args, tokenizer, sampling
        self.vocab_size = cfg.vocab_size
        self.context = min(cfg.max_position_embeddings, args.max_len or cfg.max_position_embeddings)
        self.model_name = Path(args.model).resolve().name
        self.tokenizer_dir = args.tokenizer or args.model
        self.eos_ids = _eos_ids(cfg, tokenizer)

    def __call__(self, n: int, raw: str) -> Job:
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise LineError(f"invalid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise LineError(f"expected a JSON object, got {type(obj).__name__}")
        if "custom_id" in obj or "body" in obj:
            return self._openai(n, obj)
        id = self._id(obj, "id")
        unknown = sorted(set(obj) - LINE_FIELDS)
        if unknown:
            raise LineError(f"unknown field(s) {unknown}; allowed: {sorted(LINE_FIELDS)}", id)
        if obj.get("domain") is not None and not isinstance(obj["domain"], str):
            raise LineError('"domain" must be a string', id)
        req = dataclasses.replace(self._request(n, obj, id), domain=obj.get("domain"))
        return Job(n, id, req, domain=obj.get("domain"))

    @staticmethod
    def _id(obj, key):
        if key not in obj:
            raise LineError(f'missing "{key}"')
        id = obj[key]
        if not (isinstance(id, str) or _is_int(id)):
            raise LineError(f'"{key}" must be a string or an integer, got {json.dumps(id)}')
        return id

    def _openai(self, n, obj) -> Job:
        id = self._id(obj, "custom_id")
        if obj.get("method", "POST") != "POST" or obj.get("url") != OPENAI_URL:
            raise LineError(f'OpenAI batch lines must be "method": "POST", "url": "{OPENAI_URL}"', id)
        body = obj.get("body")
        if not isinstance(body, dict):
            raise LineError('missing "body" object', id)
        unknown = sorted(set(body) - OPENAI_BODY_FIELDS)
        if unknown:
            raise LineError(f"unsupported body field(s) {unknown}", id)
        if body.get("n", 1) != 1 or body.get("stream", False) or body.get("logprobs", False):
            raise LineError('only "n": 1 without "stream" or "logprobs" is supported', id)
        if body.get("stop"):
            raise LineError('"stop" strings are not supported; use "stop_token_ids"', id)
        if "messages" not in body:
            raise LineError('missing "body.messages"', id)
        line = {k: v for k, v in body.items() if k in OVERRIDES or k in ("messages", "tools")}
        if body.get("tool_choice", "auto") not in ("auto", "none"):
            raise LineError('"tool_choice" must be "auto" or "none"', id)
        if body.get("tool_choice") == "none":
            line.pop("tools", None)
        for key in ("max_completion_tokens", "max_tokens"):
            if body.get(key) is not None:
                line["max_new_tokens"] = body[key]
        return Job(n, id, self._request(n, line, id), openai_model=body.get("model") or self.model_name)

    def _request(self, n: int, obj: dict, id):
        from qwen3_jax.infer import Request

        for key, (check, must) in OVERRIDES.items():
            if key in obj and not check(obj[key]):
                raise LineError(f'"{key}" must be {must}, got {json.dumps(obj[key])}', id)
        template_kwargs = dict(obj.get("chat_template_kwargs") or {})
        enable_thinking = obj.get("enable_thinking", template_kwargs.pop("enable_thinking", self.args.enable_thinking))
        ids = self._prompt_ids(obj, id, enable_thinking, template_kwargs)
        if len(ids) >= self.context:
            raise LineError(f"prompt has {len(ids)} tokens; the context is {self.context} tokens "
                            "(max_position_embeddings / --max-len) and must leave room for one new token", id)
        stops = obj.get("stop_token_ids", self.args.stop_token_ids)  # in addition to eos, as in vLLM
        if stops is not None:
            from .generate import MAX_STOP_IDS

            stops = sorted({*self.eos_ids, *stops})
            if len(stops) > MAX_STOP_IDS or not all(0 <= t < self.vocab_size for t in stops):
                raise LineError(f"stop token ids {stops}: at most {MAX_STOP_IDS} (with eos), each in "
                                f"[0, {self.vocab_size})", id)
        overrides = {k: obj[k] for k in SAMPLING_FLAGS if k in obj}
        if obj.get("seed") is not None:
            overrides["seed"] = obj["seed"]
        elif self.args.seed is not None:
            overrides["seed"] = self.args.seed + n - 1
        try:
            sampling = self.sampling(bool(enable_thinking), **overrides)
        except (TypeError, ValueError) as e:
            raise LineError(f"sampling parameters: {e}", id) from None
        max_new = min(obj.get("max_new_tokens", self.args.max_new_tokens), self.context - len(ids))
        return Request(prompt_ids=ids, sampling=sampling, max_new_tokens=max_new, stop_token_ids=stops,
                       thinking_budget=obj.get("thinking_budget", self.args.thinking_budget))

    def _prompt_ids(self, obj, id, enable_thinking, template_kwargs) -> list[int]:
        given = [k for k in PROMPT_FIELDS if k in obj]
        if len(given) != 1:
            raise LineError(f"expected exactly one of {list(PROMPT_FIELDS)}, got {given or 'none'}", id)
        (kind,) = given
        value = obj[kind]
        if kind == "prompt_token_ids":
            if not isinstance(value, list) or not value or not all(_is_int(t) for t in value):
                raise LineError('"prompt_token_ids" must be a non-empty list of integers', id)
            bad = [t for t in value if not 0 <= t < self.vocab_size]
            if bad:
                raise LineError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})", id)
            if "tools" in obj:
                raise LineError('"tools" needs "messages"', id)
            return value
        if self.tokenizer is None:
            raise LineError(f'no tokenizer in {self.tokenizer_dir}: "{kind}" needs tokenizer.json '
                            '(use "prompt_token_ids", or pass --tokenizer DIR)', id)
        if kind == "prompt":
            if not isinstance(value, str) or not value:
                raise LineError('"prompt" must be a non-empty string', id)
            if "tools" in obj:
                raise LineError('"tools" needs "messages"', id)
            return self.tokenizer.encode(value)
        if not isinstance(value, list) or not value or not all(isinstance(m, dict) and "role" in m for m in value):
            raise LineError('"messages" must be a non-empty list of {"role", "content"} objects', id)
        tools = obj.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise LineError('"tools" must be a list', id)
        value = [_text_content(m, id) for m in value]
        try:
            return self.tokenizer.apply_chat_template(value, tools=tools, add_generation_prompt=True,
                                                      enable_thinking=bool(enable_thinking), **template_kwargs)
        except Exception as e:  # noqa: BLE001  (jinja2 errors and raise_exception() in templates)
            raise LineError(f"chat template: {type(e).__name__}: {e}", id) from None


def _text_content(message: dict, id) -> dict:
    """OpenAI content parts `[{"type": "text", "text": ...}, ...]` joined into one string (as vLLM does)."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        raise LineError('only {"type": "text"} content parts are supported', id)
    return {**message, "content": "\n".join(p["text"] for p in content)}


# ---------------------------------------------------------------------------------------------------------------
# qwen3-jax-infer: output file (resume)


def scan_output(path: Path) -> tuple[set, set[int]]:
    """(ids with a result, line numbers with an error line) of an existing output file. An unterminated last line
    (the previous run was killed while writing it) is truncated away; a complete line that is not a JSON object raises
    ValueError."""
    done_ids, error_lines = set(), set()
    if not path.exists():
        return done_ids, error_lines
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        print(f"{path}: removing a torn last line ({len(data) - end} bytes)", file=sys.stderr)
        with open(path, "r+b") as f:
            f.truncate(end)
            os.fsync(f.fileno())
    for k, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {k} is not JSON ({e}): fix or remove it") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path} line {k} is not an output record: fix or remove it")
        if rec.get("line") is not None and rec.get("error") is not None:
            error_lines.add(rec["line"])
        elif "custom_id" in rec:
            done_ids.add(rec["custom_id"])
        elif "id" in rec:
            done_ids.add(rec["id"])
    return done_ids, error_lines


def _usage(res) -> dict:
    return {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
            "total_tokens": res.prompt_tokens + res.completion_tokens}


def result_record(job: Job, res) -> dict:
    if job.openai_model is None:
        return {"id": job.id, "text": res.text, "token_ids": list(res.token_ids), "finish_reason": res.finish_reason,
                "reasoning_content": res.reasoning_content, "content": res.content, "tool_calls": res.tool_calls,
                "tool_call_errors": res.tool_call_errors, "usage": _usage(res)}
    message = {"role": "assistant", "content": res.content, "reasoning_content": res.reasoning_content,
               "tool_calls": res.tool_calls or []}
    choice = {"index": 0, "message": message, "logprobs": None,
              "finish_reason": "tool_calls" if res.tool_calls else res.finish_reason}
    body = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": job.openai_model, "choices": [choice], "usage": _usage(res)}
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": job.id,
            "response": {"status_code": 200, "request_id": f"req_{uuid.uuid4().hex}", "body": body}, "error": None}


def _write(f, record: dict):
    if f is None:  # not process 0: its lines are process 0's to write
        return
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------------------------
# qwen3-jax-infer


def batch_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="qwen3-jax-infer", description="Batch inference over a JSONL file (resumable; see the module docstring "
        "of qwen3_jax.infer.cli for the line formats).")
    p.add_argument("--input", required=True, help="input JSONL")
    p.add_argument("--output", required=True, help="output JSONL (appended to: a rerun skips what is done)")
    _add_model_args(p)
    # --top-k is the router's (issue contract: `qwen3-jax-infer --top-k K` changes routing); sampling's is renamed
    g = _add_sampling_args(p, max_new_tokens=256, top_k_flag="--sampling-top-k")
    g.add_argument("--seed", type=int, help="the request on input line N samples with seed SEED+N-1 (unless the "
                   "line sets its own), so results do not depend on batching or resuming")
    g.add_argument("--batch-size", type=int, default=8, help="rows decoded together (continuous batching)")
    g.add_argument("--max-len", type=int, help="KV cache length per row (prompt + new tokens); default: fitted to "
                   "the requests. Prompts must be shorter than it and than max_position_embeddings")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar (as qwen3-jax-train)")
    _add_routing_args(p)
    add_launch_args(p)
    return p


def _layer_spec(conv, what):
    """'[LAYER:]VALUE' or qwen3-jax-routing's 'VALUE[@layerN]' -> (layer or None, value); LAYER may be * (every
    MoE layer)."""
    def parse(text):
        if "@" in text and ":" not in text:
            from qwen3_jax.routing.cli import SPEC

            m = SPEC.match(text.strip())
            layer, sep, value = (m["layer"] or "", ":", m["value"]) if m else ("-1", ":", "")
        else:
            layer, sep, value = text.rpartition(":") if ":" in text else ("", "", text)
        try:
            key = None if not sep or layer.strip() in ("*", "") else int(layer)
            if key is not None and key < 0:
                raise ValueError
            return key, conv(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {what}") from None
    return parse


def _expert_ids(text):
    ids = [int(x) for x in text.split(",") if x.strip()]
    if not ids:
        raise ValueError
    return ids


def _add_routing_args(p):
    g = p.add_argument_group(
        "MoE routing (qwen3_jax.routing; LAYER: a decoder layer index, * or none: every MoE layer; repeatable; "
        "qwen3-jax-routing's VALUE@layerN form works too, e.g. --disable-experts 3,17@layer5)")
    g.add_argument("--top-k", "--router-top-k", dest="routing_top_k", action="append", default=[],
                   metavar="[LAYER:]K", type=_layer_spec(int, "K or LAYER:K"),
                   help="experts per token (the router's top-k) instead of the config's num_experts_per_tok; the "
                   "sampling top-k is --sampling-top-k (or a line's \"top_k\")")
    g.add_argument("--disable-experts", action="append", default=[], metavar="LAYER:E[,E...]",
                   type=_layer_spec(_expert_ids, "LAYER:E[,E...]"),
                   help="mask these experts' router logits (tokens go to their next choices); repeatable")
    g.add_argument("--force-experts", action="append", default=[], metavar="LAYER:E[,E...]",
                   type=_layer_spec(_expert_ids, "LAYER:E[,E...]"), help="always route to these experts; repeatable")
    g.add_argument("--router-temperature", action="append", default=[], metavar="[LAYER:]T",
                   type=_layer_spec(float, "T or LAYER:T"), help="router softmax temperature")
    g.add_argument("--routing-stats", metavar="DIR", help="write the routing statistics of the generation "
                   "(DIR/stats.json + counts.npz, as qwen3-jax-routing capture): every token the requests run through "
                   "the model (prompt, then all but the last new token), as the KV-cached prefill and decode steps "
                   "routed them (a resumed run counts the requests it runs)")


def _routing_setup(p, args, cfg):
    """The Intervention of the routing flags (None: none), checked against the config (usage errors exit 2)."""
    from qwen3_jax.routing.cli import build_intervention

    for _, k in args.routing_top_k:
        if cfg.is_moe and not 1 <= k <= cfg.num_experts:
            p.error(f"--top-k {k}: the router's top-k (experts per token) must be in 1..{cfg.num_experts}; the "
                    "sampling top-k is --sampling-top-k")
    try:
        iv = build_intervention(args.routing_top_k, args.disable_experts, args.force_experts, args.router_temperature)
        if iv is not None and not cfg.is_moe:
            p.error("the routing flags need a MoE model" + (
                " (--top-k is the router's top-k here; the sampling top-k is --sampling-top-k)"
                if args.routing_top_k else ""))
        iv = None if iv is None else iv.check(cfg)
    except ValueError as e:
        p.error(str(e))
    if args.routing_top_k:  # users of vLLM-style commands may mean sampling: say what it does
        ks = ", ".join(f"{k} (layer {layer})" if layer is not None else str(k) for layer, k in args.routing_top_k)
        print(f"{p.prog}: --top-k routes each token to {ks} experts (the model's num_experts_per_tok is "
              f"{cfg.num_experts_per_tok}); the sampling top-k is --sampling-top-k", file=sys.stderr)
    return iv


def main(argv=None) -> int:
    tune_malloc()
    p = batch_parser()
    args = p.parse_args(argv)
    default_platform()
    if not Path(args.input).is_file():
        p.error(f"--input {args.input}: no such file")
    if Path(args.output).resolve() == Path(args.input).resolve():
        p.error("--output must not be the --input file")
    launch(p, args)
    cfg = agree(lambda: _setup(p, args), p)
    routing = _routing_setup(p, args, cfg)
    if args.routing_stats and not cfg.is_moe:
        p.error("--routing-stats: the model has no MoE layers")

    import jax
    from tqdm import tqdm

    from qwen3_jax.infer import iter_generate

    writer = jax.process_index() == 0  # the output file is process 0's: it scans it and writes every line
    if jax.process_count() > 1 and args.seed is None:  # the processes must sample alike: one random base seed
        args.seed = allgather_json(int.from_bytes(os.urandom(4), "little"))[0]
    # every step that reads this host's files (tokenizer, output, input, checkpoint) is agreed on by all processes
    # before the next collective: a failure on one host stops every host with its error
    tokenizer = agree(lambda: _checked_tokenizer(p, args), p)
    parser = LineParser(args, cfg, tokenizer, SamplingDefaults(args.model, args))
    out_path = Path(args.output)

    def scan():
        try:
            return scan_output(out_path) if writer else (set(), set())
        except ValueError as e:
            p.error(str(e))

    done_ids, error_lines = agree(scan, p)
    if jax.process_count() > 1:  # what process 0 found: [ids], [lines] (ids keep their JSON type)
        done, lines = allgather_json([sorted(done_ids, key=json.dumps), sorted(error_lines)])[0]
        done_ids, error_lines = set(done), set(lines)

    def plan():
        try:
            return _plan(parser, done_ids, error_lines)
        except (OSError, UnicodeDecodeError) as e:
            p.error(f"--input {args.input}: {e}")

    def _plan(parser, done_ids, error_lines):
        """(jobs to run, error records to write, failed lines, skipped lines) of the input file."""
        jobs, errors, first_line, failed, skipped = [], [], {}, 0, 0
        with open(args.input, encoding="utf-8") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    job = parser(n, raw)
                    if job.id in first_line:
                        where = f"first on line {first_line[job.id]}"
                        raise LineError(f"duplicate id {json.dumps(job.id)} ({where})", job.id)
                except LineError as e:
                    if e.id is not None and e.id in done_ids and e.id not in first_line:
                        first_line[e.id] = n  # done in an earlier run: not validated again (e.g. other flags)
                        skipped += 1
                        continue
                    failed += 1
                    if e.id is not None:
                        first_line.setdefault(e.id, n)
                    if n not in error_lines:
                        errors.append({"line": n, **({"id": e.id} if e.id is not None else {}), "error": e.reason})
                    continue
                first_line[job.id] = n
                if n in error_lines:  # an earlier run could not run this line (e.g. a smaller --max-len)
                    failed += 1
                elif job.id in done_ids:
                    skipped += 1
                else:
                    jobs.append(job)
        return jobs, errors, failed, skipped

    jobs, errors, failed, skipped = agree(plan, p)
    model = agree(lambda: _load_model(args), p) if jobs else None

    def open_output():
        if not writer:
            return contextlib.nullcontext()
        out_path.parent.mkdir(parents=True, exist_ok=True)
        return open(out_path, "a", encoding="utf-8")

    with agree(open_output, p) as out:
        for record in errors:
            _write(out, record)
        if failed and writer:
            print(f"{failed} input line(s) failed (error lines in {out_path})", file=sys.stderr)
        if skipped and writer:
            print(f"resuming: {skipped} request(s) already in {out_path}", file=sys.stderr)
        if jobs:
            if routing is not None:
                model.runtime = model.runtime.replace(routing=routing)
            stats = None
            if args.routing_stats:  # collected by the generation's own forwards (prefill and decode steps)
                from qwen3_jax.routing import RoutingStats

                stats = RoutingStats(cfg, model.runtime.routing, model_name=os.path.abspath(args.model))
            tokens, t0 = 0, time.perf_counter()
            with tqdm(total=len(jobs), unit="req", file=sys.stderr, dynamic_ncols=True,
                      disable=not (args.progress and writer)) as bar:
                results = iter_generate(model, [j.request for j in jobs], tokenizer=tokenizer,
                                        batch_size=args.batch_size, max_len=args.max_len, routing_stats=stats)
                for i, res in results:
                    _write(out, result_record(jobs[i], res))
                    tokens += res.completion_tokens
                    bar.set_postfix_str(f"{tokens / max(time.perf_counter() - t0, 1e-9):.1f} tok/s", refresh=False)
                    bar.update(1)
            if stats is not None and writer:
                path = stats.save(args.routing_stats)
                print(f"routing statistics of {stats.tokens} tokens: {path}", file=sys.stderr)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------------------------
# qwen3-jax-chat

COMMANDS = {"/think": "thinking mode on (default: --enable-thinking)", "/no_think": "thinking mode off",
            "/reset": "forget the conversation (keeps --system)", "/exit": "quit", "/help": "this list"}
NOTICES = {"/think": "thinking mode on", "/no_think": "thinking mode off", "/reset": "conversation reset"}


class ReasoningPrinter:
    """Writes streamed text deltas: the reasoning between <think> and </think> under a 'Thinking...' header (dimmed
    on a terminal), then the answer. Empty reasoning (non-thinking turns) prints nothing."""

    def __init__(self, out, color: bool):
        self.out, self.color = out, color
        self.section = "answer"  # "answer" | "reasoning"
        self.strip = False  # drop the newlines that follow a tag
        self.shown = False  # the Thinking... header was printed

    def feed(self, delta: str):
        for part in re.split(f"({re.escape(THINK_START)}|{re.escape(THINK_END)})", delta):
            if part == THINK_START:
                self.section, self.strip = "reasoning", True
            elif part == THINK_END:
                if self.shown:
                    self.out.write(("\x1b[0m" if self.color else "") + "\n...done thinking.\n\n")
                self.section, self.strip, self.shown = "answer", True, False
            else:
                if self.strip:
                    part = part.lstrip("\n")
                    self.strip = not part
                if part and self.section == "reasoning" and not self.shown:
                    self.out.write("Thinking...\n" + ("\x1b[2m" if self.color else ""))
                    self.shown = True
                self.out.write(part)
        self.out.flush()

    def close(self):
        self.out.write(("\x1b[0m" if self.color and self.shown else "") + "\n")
        self.out.flush()


def chat_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="qwen3-jax-chat", description="Interactive streaming chat. Commands: "
        + ", ".join(f"{k} ({v})" for k, v in COMMANDS.items())
        + ". /think and /no_think inside a message are Qwen3's soft switches for that turn.")
    _add_model_args(p)
    g = _add_sampling_args(p, max_new_tokens=2048)
    g.add_argument("--seed", type=int, help="seed of the first reply (the n-th reply uses SEED+n-1)")
    p.add_argument("--system", help="system message")
    t = p.add_argument_group("tools (MCP)")
    t.add_argument("--mcp", action="append", default=[], metavar="COMMAND",
                   help='start this MCP server over stdio (e.g. "python tools.py"), offer its tools to the model and '
                        "run the calls it makes (repeatable)")
    t.add_argument("--tool-choice", default="auto", metavar="auto|required|none|NAME",
                   help="first model turn of each reply: auto (default), required (must call a tool), none, or a "
                        "tool name (must call it); later turns are auto")
    t.add_argument("--max-tool-rounds", type=int, default=8, help="model turns per reply (the last one answers)")
    return p


def _chat_tools(p, args, model, tokenizer, cfg):
    """The MCP tool host of `--mcp` (None without it)."""
    if not args.mcp:
        return None
    from .mcp_client import ChatTools, MCPError

    choice = args.tool_choice
    if choice not in ("auto", "required", "none"):
        choice = {"type": "function", "function": {"name": choice}}
    if args.max_tool_rounds < 1:
        p.error("--max-tool-rounds must be >= 1")
    try:
        return ChatTools(args.mcp, model, tokenizer, max_len=cfg.max_position_embeddings, tool_choice=choice,
                         max_tool_rounds=args.max_tool_rounds)
    except MCPError as e:
        p.error(str(e))


def _read_line(interactive: bool) -> str | None:
    if interactive:
        try:
            return input(">>> ")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D / Ctrl-C at the prompt: quit
            print(file=sys.stderr)
            return None
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


def chat_main(argv=None) -> int:
    tune_malloc()
    p = chat_parser()
    args = p.parse_args(argv)
    default_platform()
    cfg = _setup(p, args)

    from qwen3_jax import infer

    tokenizer = _load_tokenizer(args)
    if tokenizer is None:
        p.error(f"no tokenizer in {args.tokenizer or args.model}: the chat needs tokenizer.json (--tokenizer DIR)")
    sampling = SamplingDefaults(args.model, args)
    model = _load_model(args)
    tools = _chat_tools(p, args, model, tokenizer, cfg)
    interactive = sys.stdin.isatty()
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    system = [{"role": "system", "content": args.system}] if args.system else []
    history, thinking, turn = list(system), args.enable_thinking, 0
    stops = None if args.stop_token_ids is None else sorted({*_eos_ids(cfg, tokenizer), *args.stop_token_ids})
    if interactive:
        print("commands: " + ", ".join(COMMANDS), file=sys.stderr)
    while (line := _read_line(interactive)) is not None:
        text = line.strip()
        if not text:
            continue
        if re.fullmatch(r"/\w+", text):
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                history = list(system)
            elif text in ("/think", "/no_think"):
                thinking = text == "/think"
            else:
                unknown = [] if text == "/help" else [f"[unknown command {text}]"]
                print("\n".join(unknown + [f"  {k:10} {v}" for k, v in COMMANDS.items()]))
                continue
            print(f"[{NOTICES[text]}]", flush=True)
            continue
        messages = history + [{"role": "user", "content": text}]
        n_prompt = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=thinking))
        if n_prompt >= cfg.max_position_embeddings:
            print(f"[the conversation has {n_prompt} tokens, the context is {cfg.max_position_embeddings}: "
                  "/reset to start over]", flush=True)
            continue
        turn += 1
        seed = {} if args.seed is None else {"seed": args.seed + turn - 1}
        if tools is not None:
            printer = ReasoningPrinter(sys.stdout, color)
            try:
                history = messages + tools.turn(messages, printer, sys.stdout, enable_thinking=thinking,
                                                sampling=sampling(thinking, **seed), max_new_tokens=args.max_new_tokens,
                                                stop_token_ids=args.stop_token_ids, thinking_budget=args.thinking_budget)
            except KeyboardInterrupt:
                print("[interrupted]", flush=True)
            printer.close()
            continue
        deltas = infer.stream(model, messages, sampling=sampling(thinking, **seed), tokenizer=tokenizer,
                              max_new_tokens=min(args.max_new_tokens, cfg.max_position_embeddings - n_prompt),
                              stop_token_ids=stops, enable_thinking=thinking, thinking_budget=args.thinking_budget)
        printer, chunks = ReasoningPrinter(sys.stdout, color), []
        try:
            for delta in deltas:
                chunks.append(delta)
                printer.feed(delta)
        except KeyboardInterrupt:  # Ctrl-C stops this reply; the turn is dropped from the history
            printer.close()
            print("[interrupted]", flush=True)
            continue
        printer.close()
        _, content = infer.split_reasoning("".join(chunks))
        history = messages + [{"role": "assistant", "content": content}]
    if tools is not None:
        tools.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
