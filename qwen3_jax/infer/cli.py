"""`qwen3-jax-infer`: batch inference over a JSONL file, resumable (the chat is qwen3_jax.infer.chat_cli).

    qwen3-jax-infer --model DIR --input in.jsonl --output out.jsonl --batch-size 16 --temperature 0

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
import sys
import time
import uuid
from pathlib import Path

from qwen3_jax.hostmem import tune_malloc
from qwen3_jax.launch import ArgumentParser, add_launch_args, agree, allgather_json, default_platform, launch

from .chat_cli import main as chat_main  # noqa: F401  (qwen3-jax-chat, importable from here too)
from .loading import (SAMPLING_FLAGS, SamplingDefaults, add_model_args, add_sampling_args, checked_tokenizer,
                      load_model, setup)

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
        from .generate import eos_token_ids

        self.args, self.tokenizer, self.sampling = args, tokenizer, sampling
        self.vocab_size = cfg.vocab_size
        self.context = min(cfg.max_position_embeddings, args.max_len or cfg.max_position_embeddings)
        self.model_name = Path(args.model).resolve().name
        self.tokenizer_dir = args.tokenizer or args.model
        self.eos_ids = eos_token_ids(cfg, tokenizer)

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
        from .generate import Request, stop_token_ids

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
            try:
                stops = stop_token_ids(stops, self.eos_ids, self.vocab_size)
            except ValueError as e:
                raise LineError(str(e), id) from None
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
    add_model_args(p)
    # --top-k is the router's (issue contract: `qwen3-jax-infer --top-k K` changes routing); sampling's is renamed
    g = add_sampling_args(p, max_new_tokens=256, top_k_flag="--sampling-top-k")
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
    cfg = agree(lambda: setup(p, args), p)
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
    tokenizer = agree(lambda: checked_tokenizer(p, args), p)
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
    model = agree(lambda: load_model(args), p) if jobs else None

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


if __name__ == "__main__":
    sys.exit(main())
