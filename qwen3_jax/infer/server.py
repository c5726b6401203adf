"""`qwen3-jax-serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching engine.

    qwen3-jax-serve --model DIR [--host 127.0.0.1 --port 8000 --mesh data=2,expert=4 --max-batch 8
                    --max-queue 256 --served-model-name NAME --api-key KEY --mcp "python tools.py"]

Endpoints: POST /v1/chat/completions and /v1/completions (SSE with "stream": true), GET /v1/models, GET /health,
POST /tokenize and /detokenize, GET /metrics (Prometheus). Requests to /v1/*, /tokenize and /detokenize need
`Authorization: Bearer KEY` when --api-key (or $QWEN3_JAX_API_KEY) is set. The wire format is vLLM's for Qwen3:
`reasoning_content` and `reasoning`, `chat_template_kwargs.enable_thinking`, `include_reasoning`,
`thinking_token_budget`, tool-call deltas with `index` (and `id`, `type`, `function.name` on a call's first chunk).
Errors are `{"error": {"message", "type", "param", "code"}}`, as vLLM sends them: 400 for a bad field (named in
`param` and the message; `param` null for a body that is no JSON), 401 without the key, 404 for a `model` the
server does not serve, 408 past --request-timeout, 413 for a body past --max-body-bytes (answered from its
Content-Length, before it is read), 429 when the waiting queue (or the worker pool) is full, 500 when generation
failed (the details go to the log, not to the client), 503 when the engine thread has died (/health too).

Blocking work of a request (parsing a large body, tokenization, chat templates, grammar compilation, prompt
logprobs) runs in a bounded worker pool with a timeout, so the event loop keeps answering (/health among others).
A client that disconnects has its sequences cancelled at once (their rows freed). Chat templates sent by
requests are refused unless --trust-request-chat-template. The port is bound before the model loads (a port in
use: one usage error, exit 2). SIGTERM stops accepting connections, lets the requests in flight finish, then
exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import sys
import time
import traceback
import uuid
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen3_jax.hostmem import tune_malloc
from qwen3_jax.launch import ArgumentParser, default_platform

from . import protocol as P
from .loading import (SAMPLING_FLAGS, SamplingDefaults, add_model_args, add_sampling_flags, checked_tokenizer, load_model,
                      setup)
from .scheduler import EngineDead, QueueFull
from .serving import (RESERVED_TEMPLATE_KWARGS, BadRequest, ChatPlan, ChatRun, ChoiceOutput, EngineService,
                      GenParams, ToolRun, WorkerPool)

log = logging.getLogger("qwen3_jax.serve")


# ---------------------------------------------------------------------------------------------------------------
# metrics


class Metrics:
    """Prometheus metrics (own registry): requests by endpoint and status, finished sequences by reason, prompt and
    generated tokens, running / waiting sequences (queue depth), time to first token, inter-token latency and
    end-to-end latency."""

    def __init__(self, scheduler_ref):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("qwen3_jax_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.finished = Counter("qwen3_jax_request_success", "Finished sequences", ["finished_reason"], registry=r)
        self.prompt_tokens = Counter("qwen3_jax_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("qwen3_jax_generation_tokens", "Tokens generated", registry=r)
        running = Gauge("qwen3_jax_num_requests_running", "Sequences in a batch row", registry=r)
        waiting = Gauge("qwen3_jax_num_requests_waiting", "Sequences in the waiting queue", registry=r)
        calls = Gauge("qwen3_jax_decode_calls", "Engine decode calls so far (each serves every running row)",
                      registry=r)
        running.set_function(lambda: scheduler_ref().num_running)
        waiting.set_function(lambda: scheduler_ref().num_waiting)
        calls.set_function(lambda: scheduler_ref().steps)
        buckets = (.001, .005, .01, .02, .04, .06, .08, .1, .25, .5, .75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
        self.ttft = Histogram("qwen3_jax_time_to_first_token_seconds", "Time to first token", buckets=buckets,
                              registry=r)
        self.itl = Histogram("qwen3_jax_inter_token_latency_seconds", "Time between tokens of a sequence",
                             buckets=buckets, registry=r)
        self.e2e = Histogram("qwen3_jax_e2e_request_latency_seconds", "Submit to last token", buckets=buckets,
                             registry=r)

    def on_submit(self, prompt_tokens: int, n_seqs: int):
        self.prompt_tokens.inc(prompt_tokens)

    def on_event(self, seq, ev, state):
        """On the scheduler thread, for each event of a sequence."""
        n = len(ev.token_ids)
        if n:
            self.generation_tokens.inc(n)
            if state["last"] is None:
                self.ttft.observe(ev.time - seq.submitted)
                for _ in range(n - 1):
                    self.itl.observe(0.0)
            else:
                per = (ev.time - state["last"]) / n
                for _ in range(n):
                    self.itl.observe(per)
            state["last"] = ev.time
        if ev.finish_reason is not None:
            self.finished.labels(ev.finish_reason).inc()
            self.e2e.observe(ev.time - seq.submitted)


# ---------------------------------------------------------------------------------------------------------------
# request -> plan


class Defaults:
    """Server-side defaults: sampling (generation_config.json, then the command line), thinking mode and budget."""

    def __init__(self, sampling: SamplingDefaults, enable_thinking: bool = True, thinking_budget: int | None = None,
                 max_tool_rounds: int = 8):
        self.sampling, self.enable_thinking = sampling, enable_thinking
        self.thinking_budget, self.max_tool_rounds = thinking_budget, max_tool_rounds


def _gen_params(req, service: EngineService, defaults: Defaults, enable_thinking: bool, max_tokens,
                logprobs: bool, top_logprobs: int = 0, thinking_budget=None) -> GenParams:
    overrides = {k: getattr(req, k) for k in SAMPLING_FLAGS if getattr(req, k, None) is not None}
    if overrides.get("top_k") == -1:
        overrides["top_k"] = 0
    if req.seed is not None:
        overrides["seed"] = req.seed
    try:
        sampling = defaults.sampling(enable_thinking, **overrides)
    except ValueError as e:
        raise BadRequest(f"sampling parameters: {e}") from None
    if req.stop and service.tokenizer is None:
        raise BadRequest("stop strings need a tokenizer; this model has none (use stop_token_ids)", "stop")
    return GenParams(sampling, max_tokens, list(req.stop or []), service.stop_ids(req.stop_token_ids, req.ignore_eos),
                     thinking_budget, logprobs, top_logprobs)


def request_template(req, trust: bool) -> str | None:
    """The chat template a request sends (`chat_template`, or `chat_template_kwargs.chat_template`), or None;
    refused (400) unless the server trusts request templates (--trust-request-chat-template)."""
    template = req.chat_template
    inner = (req.chat_template_kwargs or {}).get("chat_template")
    if template is None and inner is None:
        return None
    param = "chat_template" if template is not None else "chat_template_kwargs.chat_template"
    if not trust:
        raise BadRequest("The request sends a chat template, but the server does not render request templates "
                         "(start it with --trust-request-chat-template to allow them).", param)
    template = template if template is not None else inner
    if not isinstance(template, str):
        raise BadRequest(f"{param} must be a string", param)
    return template


def chat_plan(req, service: EngineService, defaults: Defaults, *, mcp_tools: bool = False,
              trust_templates: bool = False) -> ChatPlan:
    """mcp_tools: the server has MCP tools (a tool_choice without tools then applies to them)."""
    kwargs = dict(req.chat_template_kwargs or {})
    thinking = kwargs.pop("enable_thinking", defaults.enable_thinking)
    if not isinstance(thinking, bool):
        raise BadRequest("chat_template_kwargs.enable_thinking must be true or false",
                         "chat_template_kwargs.enable_thinking")
    template = request_template(req, trust_templates)
    if req.stream_options is not None and not req.stream:
        raise BadRequest("stream_options can only be set when stream is true", "stream_options")
    choice = req.tool_choice
    if choice is not None and choice != "none" and (req.tools == [] or (req.tools is None and not mcp_tools)):
        raise BadRequest("When using `tool_choice`, `tools` must be set (and not empty).", "tool_choice")
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    if hasattr(choice, "model_dump"):
        choice = choice.model_dump()
        if tools and choice["function"]["name"] not in {t["function"]["name"] for t in tools}:
            raise BadRequest(f"tool_choice names the function {choice['function']['name']!r}, which is not in tools",
                             "tool_choice")
    if req.top_logprobs and not req.logprobs:
        raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
    if req.max_tokens is not None and req.max_completion_tokens is not None and req.max_tokens != req.max_completion_tokens:
        raise BadRequest("max_tokens and max_completion_tokens differ; send one", "max_completion_tokens")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    budget = req.thinking_token_budget if req.thinking_token_budget is not None else defaults.thinking_budget
    params = _gen_params(req, service, defaults, thinking, max_tokens, req.logprobs, req.top_logprobs or 0, budget)
    rf = None
    if req.response_format is not None and req.response_format.type != "text":
        rf = {"type": req.response_format.type}
        if req.response_format.type == "json_schema":
            spec = req.response_format.json_schema
            if spec is None or spec.json_schema is None:
                raise BadRequest("response_format.json_schema.schema is required", "response_format.json_schema")
            rf["json_schema"] = {"name": spec.name, "schema": spec.json_schema}
    return ChatPlan(messages=[m.for_template() for m in req.messages], tools=tools, tool_choice=choice or "auto",
                    enable_thinking=thinking, template_kwargs=kwargs, params=params, n=req.n, response_format=rf,
                    parallel_tool_calls=req.parallel_tool_calls, max_tool_rounds=defaults.max_tool_rounds,
                    chat_template=template)


# ---------------------------------------------------------------------------------------------------------------
# formatting


def _token_str(tokenizer, t: int) -> str:
    return tokenizer.decode([t]) if tokenizer is not None else f"token_id:{t}"


def _token_bytes(tokenizer, t: int) -> list[int]:
    return list(tokenizer.token_bytes(t)) if tokenizer is not None else []


def chat_logprobs(tokenizer, token_ids, lps, top: int) -> list[dict]:
    out = []
    for t, (lp, tops) in zip(token_ids, lps):
        out.append({"token": _token_str(tokenizer, t), "logprob": lp, "bytes": _token_bytes(tokenizer, t),
                    "top_logprobs": [{"token": _token_str(tokenizer, i), "logprob": v, "bytes": _token_bytes(tokenizer, i)}
                                     for i, v in tops[:top]]})
    return out


def completion_logprobs(tokenizer, token_ids, lps, top: int, offset: int, prompt: bool = False) -> dict:
    """The completions `logprobs` object: per token its text, logprob, offset and top_logprobs: the sampled token
    and the `top` most likely ones (OpenAI returns the sampled token even with logprobs 0, so up to top + 1).
    prompt: token_ids are an echoed prompt and lps has one entry fewer (the first token has no logprob: null)."""
    if prompt:
        lps = [None] + list(lps)
    tokens, offsets = [], []
    for t in token_ids:
        s = _token_str(tokenizer, t)
        tokens.append(s)
        offsets.append(offset)
        offset += len(s)
    tops = []
    for t, x in zip(token_ids, lps):
        if x is None:
            tops.append(None)
            continue
        d = {_token_str(tokenizer, t): x[0]}
        for i, v in x[1][:top]:
            d.setdefault(_token_str(tokenizer, i), v)
        tops.append(d)
    return {"tokens": tokens, "token_logprobs": [None if x is None else x[0] for x in lps], "text_offset": offsets,
            "top_logprobs": tops}


def _join_logprobs(a: dict | None, b: dict) -> dict:
    if a is None:
        return b
    return {k: a[k] + b[k] for k in ("tokens", "token_logprobs", "text_offset", "top_logprobs")}


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


_KINDS = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "MethodNotAllowedError",
          408: "TimeoutError", 413: "RequestTooLargeError", 429: "RateLimitError", 503: "ServiceUnavailableError"}


def _error_body(message: str, status: int, param: str | None = None, kind: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind or _KINDS.get(status, "InternalServerError"), "param": param,
                      "code": status}}


def _error(message: str, status: int, param: str | None = None, kind: str | None = None, headers=None):
    return JSONResponse(_error_body(message, status, param, kind), status, headers=headers)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


GENERATION_FAILED = "The engine failed while generating this response; the server log has the details."
TIMED_OUT = "The request took longer than the server's --request-timeout ({:g} s); what was left of it was cancelled."
MAX_BODY_BYTES = 4 << 20
INLINE_BODY_BYTES = 64 << 10  # smaller bodies are parsed on the event loop (a thread hop costs more)


class EventStream(Response):
    """Server-sent events from an async generator of str. `on_close` (cancel the request's sequences) runs as
    soon as the client disconnects (a watcher on `receive`), or a send fails, or the body ends, whichever is
    first: rows are freed then, not when the generator happens to be closed."""

    media_type = "text/event-stream"

    def __init__(self, gen, on_close):
        self.gen, self.on_close = gen, on_close
        self.status_code, self.background = 200, None
        self.init_headers({"cache-control": "no-cache"})

    async def __call__(self, scope, receive, send):
        gone = asyncio.Event()

        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            self.on_close()

        watcher = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self.gen:
                if gone.is_set():
                    break
                await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
            if not gone.is_set():
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away while we sent
            pass
        finally:
            watcher.cancel()
            self.on_close()
            await self.gen.aclose()


class Guard:
    """ASGI middleware in front of every route: the API key on /v1/*, /tokenize and /detokenize (401); a body
    whose Content-Length passes `max_body` is answered 413 before it is read; requests counted by path and status."""

    def __init__(self, app, *, api_key: str | None, max_body: int, metrics):
        self.app, self.api_key, self.max_body, self.metrics = app, api_key, max_body, metrics
        self._key = f"Bearer {api_key}".encode() if api_key is not None else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = dict(scope["headers"])
        status = [500]

        async def counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self._key is not None and (path.startswith("/v1") or path in ("/tokenize", "/detokenize")):
                if not secrets.compare_digest(headers.get(b"authorization", b""), self._key):
                    return await _error("Unauthorized: send the API key as 'Authorization: Bearer <key>'",
                                        401)(scope, receive, counted)
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                return await _error(f"The request body is larger than the server's limit of {self.max_body} bytes "
                                    "(--max-body-bytes).", 413, headers={"connection": "close"})(scope, receive, counted)
            await self.app(scope, receive, counted)
        finally:
            if self.metrics is not None and path != "/metrics":
                self.metrics.requests.labels(path, str(status[0])).inc()


# ---------------------------------------------------------------------------------------------------------------
# the app


class ServerContext:
    """What the routes share: the engine service, the served names, the request defaults, the MCP tools, the worker
    pool and the server's limits."""

    def __init__(self, service: EngineService, *, names: list[str], accepted: set[str], defaults: Defaults,
                 pool: WorkerPool, mcp=None, max_body_bytes: int = MAX_BODY_BYTES,
                 request_timeout: float | None = None, trust_request_chat_template: bool = False):
        self.service, self.names, self.accepted, self.defaults = service, names, accepted, defaults
        self.pool, self.mcp, self.max_body_bytes = pool, mcp, max_body_bytes
        self.request_timeout, self.trust_request_chat_template = request_timeout, trust_request_chat_template
        self.shown = names[0]  # the name in responses
        self.tokenizer = service.tokenizer

    def deadline(self) -> float | None:
        return None if self.request_timeout is None else asyncio.get_running_loop().time() + self.request_timeout

    async def read(self, request: Request, cls):
        """The body (at most max_body_bytes, else 413) -> cls (400 naming the field); large bodies are parsed in
        the pool."""
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > self.max_body_bytes:
                raise BadRequest(f"The request body is larger than the server's limit of {self.max_body_bytes} bytes "
                                 "(--max-body-bytes).", None, 413)
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            if len(raw) <= INLINE_BODY_BYTES:
                return P.parse_body(raw, cls)
            return await self.pool.run(P.parse_body, raw, cls)
        except P.BodyError as e:
            raise BadRequest(e.message, e.param) from None

    def check_model(self, model):
        if model is not None and model not in self.accepted:
            raise BadRequest(f"The model `{model}` does not exist.", "model", 404)

    def chunk(self, rid, created, choices, obj="chat.completion.chunk", usage=False, **extra) -> str:
        """One SSE event of a stream (`usage` False: no usage field)."""
        out = {"id": rid, "object": obj, "created": created, "model": self.shown, "choices": choices}
        if usage is not False:
            out["usage"] = usage
        out.update(extra)
        return _sse(out)


def stream_error(message, status) -> str:
    return _sse(_error_body(message, status))


async def until_disconnect(request: Request, coro, on_cancel):
    """Await `coro`; if the client disconnects first, cancel it (freeing its rows) and answer nothing."""
    task = asyncio.ensure_future(coro)

    async def watch():
        while True:
            if (await request.receive())["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    on_cancel()
    return Response(status_code=499)


def status_router(ctx: ServerContext) -> APIRouter:
    """GET /health, /metrics (Prometheus) and /v1/models."""
    router = APIRouter()

    @router.get("/health")
    async def health():
        if not ctx.service.scheduler.alive:
            return _error("The engine has stopped; the server cannot generate (see its log).", 503)
        return JSONResponse({"status": "ok"})

    @router.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(ctx.service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @router.get("/v1/models")
    async def models():
        created = int(time.time())
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "qwen3-jax",
                                            "root": ctx.shown, "parent": None, "max_model_len": ctx.service.context}
                                           for name in ctx.names]}

    return router


def tokenize_router(ctx: ServerContext) -> APIRouter:
    """POST /tokenize and /detokenize (vLLM's)."""
    service, tok, defaults, pool = ctx.service, ctx.tokenizer, ctx.defaults, ctx.pool
    router = APIRouter()

    def _tokenize(req):
        if req.prompt is not None:
            return tok.encode_fast(req.prompt, add_special_tokens=req.add_special_tokens)
        kwargs = {k: v for k, v in (req.chat_template_kwargs or {}).items() if k not in RESERVED_TEMPLATE_KWARGS}
        thinking = (req.chat_template_kwargs or {}).get("enable_thinking", defaults.enable_thinking)
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        template = request_template(req, ctx.trust_request_chat_template)
        try:
            return tok.apply_chat_template([m.for_template() for m in req.messages], tools=tools,
                                           add_generation_prompt=req.add_generation_prompt,
                                           enable_thinking=bool(thinking), chat_template=template, **kwargs)
        except BadRequest:
            raise
        except Exception as e:  # noqa: BLE001
            raise BadRequest(f"chat template: {type(e).__name__}: {e}", "messages") from None

    @router.post("/tokenize")
    async def tokenize(request: Request):
        req = await ctx.read(request, P.TokenizeRequest)
        ctx.check_model(req.model)
        if tok is None:
            raise BadRequest("this model has no tokenizer", "prompt")
        if (req.prompt is None) == (req.messages is None):
            raise BadRequest("send exactly one of prompt and messages", "prompt")
        request_template(req, ctx.trust_request_chat_template)  # refused before any work
        ids = await pool.run(_tokenize, req)
        return {"count": len(ids), "max_model_len": service.context, "tokens": ids}

    @router.post("/detokenize")
    async def detokenize(request: Request):
        req = await ctx.read(request, P.DetokenizeRequest)
        ctx.check_model(req.model)
        if tok is None:
            raise BadRequest("this model has no tokenizer", "tokens")
        bad = [t for t in req.tokens if not 0 <= t < len(tok)]
        if bad:
            raise BadRequest(f"tokens {bad[:5]}: not in the vocabulary [0, {len(tok)})", "tokens")
        return {"prompt": await pool.run(tok.decode, req.tokens)}

    return router


def chat_router(ctx: ServerContext) -> APIRouter:
    """POST /v1/chat/completions (SSE with "stream": true)."""
    service, tok, defaults, pool, mcp = ctx.service, ctx.tokenizer, ctx.defaults, ctx.pool, ctx.mcp
    router = APIRouter()

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        until = ctx.deadline()
        req = await ctx.read(request, P.ChatCompletionRequest)
        ctx.check_model(req.model)
        plan = chat_plan(req, service, defaults, mcp_tools=bool(mcp is not None and mcp.tools),
                         trust_templates=ctx.trust_request_chat_template)
        plan.params.deadline = until
        run = ChatRun(service, plan, mcp)
        await run.start(pool.run)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        top = plan.params.top_logprobs
        if req.stream:
            usage_chunks = bool(req.stream_options and req.stream_options.include_usage)
            return EventStream(_chat_stream(run, rid, created, req.include_reasoning, req.logprobs, top, usage_chunks),
                               run.cancel)
        return await until_disconnect(request, _chat_full(run, rid, created, req.include_reasoning, req.logprobs,
                                                          top), run.cancel)

    async def _chat_stream(run: ChatRun, rid, created, include_reasoning, logprobs, top, usage_chunks):
        usage = None if usage_chunks else False
        try:
            n = run.plan.n
            for i in range(n):
                yield ctx.chunk(rid, created, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                               "logprobs": None, "finish_reason": None}], usage=usage)
            n_calls = [0] * n
            failed = False
            async for step in run.steps():
                if isinstance(step, ToolRun):
                    continue
                i, deltas = step.index, []
                for kind, value in step.items:
                    if kind == "reasoning":
                        if include_reasoning:
                            deltas.append({"reasoning_content": value, "reasoning": value})
                    elif kind == "content":
                        deltas.append({"content": value})
                    else:
                        k = n_calls[i]
                        n_calls[i] += 1
                        fn = value["function"]
                        deltas.append({"tool_calls": [{"index": k, "id": value["id"], "type": "function",
                                                       "function": {"name": fn["name"], "arguments": ""}}]})
                        deltas.append({"tool_calls": [{"index": k, "function": {"arguments": fn["arguments"]}}]})
                lp = None
                if logprobs and step.logprobs:
                    lp = {"content": chat_logprobs(tok, step.token_ids, step.logprobs, top)}
                    if not deltas:
                        deltas.append({})
                for j, d in enumerate(deltas):
                    yield ctx.chunk(rid, created, [{"index": i, "delta": d, "logprobs": lp if j == 0 else None,
                                                    "finish_reason": None}], usage=usage)
                if step.finish_reason is not None:
                    failed |= step.finish_reason == "error"
                    yield ctx.chunk(rid, created, [{"index": i, "delta": {}, "logprobs": None,
                                                    "finish_reason": step.finish_reason}], usage=usage)
            if run.timed_out:
                yield stream_error(TIMED_OUT.format(ctx.request_timeout), 408)
            elif failed:
                yield stream_error(GENERATION_FAILED, 500)
            if usage_chunks:
                yield ctx.chunk(rid, created, [], usage=_usage(run.prompt_tokens, run.completion_tokens))
            yield "data: [DONE]\n\n"
        finally:
            run.cancel()

    async def _chat_full(run: ChatRun, rid, created, include_reasoning, logprobs, top):
        n = run.plan.n
        acc = [{"reasoning": "", "content": "", "tool_calls": [], "logprobs": [], "finish": None}
               for _ in range(n)]
        async for step in run.steps():
            if isinstance(step, ToolRun):
                continue
            a = acc[step.index]
            for kind, value in step.items:
                if kind == "tool_call":
                    a["tool_calls"].append(value)
                else:
                    a[kind] += value
            if logprobs and step.logprobs:
                a["logprobs"] += chat_logprobs(tok, step.token_ids, step.logprobs, top)
            if step.finish_reason is not None:
                a["finish"] = step.finish_reason
        if run.timed_out:
            return _error(TIMED_OUT.format(ctx.request_timeout), 408)
        if any(a["finish"] == "error" for a in acc):
            return _error(GENERATION_FAILED, 500)
        choices = []
        for i, a in enumerate(acc):
            reasoning = (a["reasoning"] or None) if include_reasoning else None
            message = {"role": "assistant", "content": a["content"] or (None if a["tool_calls"] else ""),
                       "reasoning_content": reasoning, "reasoning": reasoning}
            if a["tool_calls"]:  # OpenAI leaves the field out when there are none
                message["tool_calls"] = a["tool_calls"]
            choices.append({"index": i, "message": message, "finish_reason": a["finish"],
                            "logprobs": {"content": a["logprobs"]} if logprobs else None})
        return {"id": rid, "object": "chat.completion", "created": created, "model": ctx.shown,
                "choices": choices, "usage": _usage(run.prompt_tokens, run.completion_tokens)}

    return router


def completions_router(ctx: ServerContext) -> APIRouter:
    """POST /v1/completions (SSE with "stream": true)."""
    service, tok, defaults, pool = ctx.service, ctx.tokenizer, ctx.defaults, ctx.pool
    router = APIRouter()

    def _completion_prep(req, prompts, params):
        """Blocking: the prompts' ids, the constraints, the echoed prompts' logprobs."""
        ids = []
        for p in prompts:
            if isinstance(p, str):
                ids.append(tok.encode_fast(p, add_special_tokens=True))
                if not ids[-1]:
                    raise BadRequest("the prompt is empty", "prompt")
            else:
                ids.append(list(p))
        for x in ids:
            service.max_new(len(x), req.max_tokens)
        cons = None
        if req.response_format is not None and req.response_format.type != "text":
            from .constrain import GrammarError

            schema = None
            if req.response_format.type == "json_schema":
                schema = req.response_format.json_schema.json_schema
            try:
                cons = [service.grammars.response_format(schema, "disabled", params.stop_token_ids)
                        for _ in range(len(ids) * req.n)]
            except GrammarError as e:
                raise BadRequest(f"response_format: cannot build the grammar: {e}", "response_format") from None
        prompt_lps = None
        if req.echo and req.logprobs is not None:
            prompt_lps = [service.prompt_logprobs(x) for x in ids]
        return ids, cons, prompt_lps

    @router.post("/v1/completions")
    async def completions(request: Request):
        until = ctx.deadline()
        req = await ctx.read(request, P.CompletionRequest)
        ctx.check_model(req.model)
        if req.suffix:
            raise BadRequest("suffix is not supported", "suffix")
        if req.stream_options is not None and not req.stream:
            raise BadRequest("stream_options can only be set when stream is true", "stream_options")
        prompts = req.prompt
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        for p in prompts:
            if isinstance(p, str) and tok is None:
                raise BadRequest("this model has no tokenizer: send the prompt as token ids", "prompt")
            if not isinstance(p, str):
                bad = [t for t in p if not 0 <= t < service.vocab_size]
                if bad:
                    raise BadRequest(f"prompt token ids {bad[:5]}: not in [0, {service.vocab_size})", "prompt")
        thinking = defaults.enable_thinking
        params = _gen_params(req, service, defaults, thinking, req.max_tokens, req.logprobs is not None,
                             req.logprobs or 0, None)
        params.deadline = until
        if req.response_format is not None and req.response_format.type != "text":
            if service.grammars is None:
                raise BadRequest("response_format needs a tokenizer; this model has none", "response_format")
            spec = req.response_format.json_schema
            if req.response_format.type == "json_schema" and (spec is None or spec.json_schema is None):
                raise BadRequest("response_format.json_schema.schema is required", "response_format.json_schema")
        ids, cons, prompt_lps = await pool.run(_completion_prep, req, prompts, params,
                                               timeout=None if until is None else
                                               max(until - asyncio.get_running_loop().time(), 0.001))
        handle = service.submit(ids, params, req.n, cons)
        n_prompt = sum(len(x) for x in ids)
        outs = [ChoiceOutput(tok, params.stop) for _ in range(len(ids) * req.n)]
        echo = [(tok.decode(ids[k // req.n]) if (req.echo and tok is not None) else "") for k in range(len(outs))]
        echo_lp = [None] * len(outs)
        if prompt_lps is not None:
            echo_lp = [completion_logprobs(tok, ids[k // req.n], prompt_lps[k // req.n], req.logprobs, 0, prompt=True)
                       for k in range(len(outs))]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        top = req.logprobs or 0
        if req.stream:
            usage_chunks = bool(req.stream_options and req.stream_options.include_usage)
            return EventStream(_completion_stream(handle, outs, echo, echo_lp, rid, created, req.logprobs is not None,
                                                  top, n_prompt, usage_chunks), handle.cancel)
        return await until_disconnect(request, _completion_full(handle, outs, echo, echo_lp, rid, created,
                                                                req.logprobs is not None, top, n_prompt), handle.cancel)

    async def _completion_events(handle, outs):
        async for k, ev in handle.events():
            items, toks, lps, reason = outs[k].feed(ev)
            if reason is not None and ev.finish_reason is None:
                handle.cancel(k)
            yield k, "".join(t for _, t in items), toks, lps, reason

    async def _completion_stream(handle, outs, echo, echo_lp, rid, created, logprobs, top, n_prompt, usage_chunks):
        usage = None if usage_chunks else False
        offsets = [len(e) for e in echo]
        failed = False
        try:
            for k, e in enumerate(echo):
                if e or echo_lp[k] is not None:
                    choice = {"index": k, "text": e, "logprobs": echo_lp[k], "finish_reason": None}
                    yield ctx.chunk(rid, created, [choice], "text_completion", usage)
            async for k, text, toks, lps, reason in _completion_events(handle, outs):
                lp = completion_logprobs(tok, toks, lps, top, offsets[k]) if (logprobs and lps) else None
                offsets[k] += len(text)
                if text or toks or reason:
                    yield ctx.chunk(rid, created, [{"index": k, "text": text, "token_ids": toks, "logprobs": lp,
                                                    "finish_reason": reason}], "text_completion", usage)
                failed |= reason == "error"
            if handle.timed_out:
                yield stream_error(TIMED_OUT.format(ctx.request_timeout), 408)
            elif failed:
                yield stream_error(GENERATION_FAILED, 500)
            if usage_chunks:
                completion = sum(len(o.token_ids) for o in outs)
                yield ctx.chunk(rid, created, [], "text_completion", _usage(n_prompt, completion))
            yield "data: [DONE]\n\n"
        finally:
            handle.cancel()

    async def _completion_full(handle, outs, echo, echo_lp, rid, created, logprobs, top, n_prompt):
        texts = list(echo)
        lps_all: list[list] = [[] for _ in outs]
        async for k, text, toks, lps, reason in _completion_events(handle, outs):
            texts[k] += text
            if lps:
                lps_all[k] += lps
        if handle.timed_out:
            return _error(TIMED_OUT.format(ctx.request_timeout), 408)
        if any(o.finish_reason == "error" for o in outs):
            return _error(GENERATION_FAILED, 500)
        choices = []
        for k, o in enumerate(outs):
            lp = None
            if logprobs:
                lp = _join_logprobs(echo_lp[k], completion_logprobs(tok, o.token_ids, lps_all[k], top, len(echo[k])))
            choices.append({"index": k, "text": texts[k], "token_ids": o.token_ids, "logprobs": lp,
                            "finish_reason": o.finish_reason})
        return {"id": rid, "object": "text_completion", "created": created, "model": ctx.shown,
                "choices": choices, "usage": _usage(n_prompt, sum(len(o.token_ids) for o in outs))}

    return router


def create_app(service: EngineService, *, served_model_name: str | list[str], defaults: Defaults,
               api_key: str | None = None, mcp=None, start_service: bool = True, model_aliases=(),
               max_body_bytes: int = MAX_BODY_BYTES, request_timeout: float | None = None,
               trust_request_chat_template: bool = False, pool: WorkerPool | None = None):
    """The FastAPI app. `served_model_name`: the name (or names) clients send as `model` and /v1/models lists; the
    first is the name in responses. `model_aliases`: more names accepted, not listed (e.g. the --model path as
    given). `mcp`: the MCP tools (mcp_client.BackgroundMCPTools) for chat requests that send no tools.
    `start_service`: start the scheduler thread in the lifespan (and stop it at shutdown). `request_timeout`:
    seconds from arrival after which what is left of a request is cancelled (None: no limit). `pool`: where
    blocking work runs (JSON of large bodies, tokenization, templates, grammars, prompt logprobs)."""
    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name)
    pool = pool or WorkerPool()
    ctx = ServerContext(service, names=names, accepted=set(names) | set(model_aliases), defaults=defaults, pool=pool,
                        mcp=mcp, max_body_bytes=max_body_bytes, request_timeout=request_timeout,
                        trust_request_chat_template=trust_request_chat_template)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if start_service and not service.scheduler.started:
            service.start()
        yield
        if start_service:
            service.stop()
        pool.shutdown()

    app = FastAPI(title="qwen3-jax", lifespan=lifespan)
    app.add_middleware(Guard, api_key=api_key, max_body=max_body_bytes, metrics=service.metrics)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        e = P.validation_error(exc)
        return _error(e.message, 400, e.param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return _error(str(exc.detail), exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(BadRequest)
    async def bad_request(request, exc: BadRequest):
        return _error(exc.message, exc.status, exc.param)

    @app.exception_handler(QueueFull)
    async def queue_full(request, exc: QueueFull):
        return _error(f"The server is busy: {exc}. Retry later.", 429)

    @app.exception_handler(EngineDead)
    async def engine_dead(request, exc: EngineDead):
        return _error("The engine has stopped; the server cannot generate (see its log).", 503)

    @app.exception_handler(Exception)
    async def internal(request, exc: Exception):
        ref = uuid.uuid4().hex[:12]
        log.error("request %s %s failed (ref %s):\n%s", request.method, request.url.path, ref,
                  "".join(traceback.format_exception(exc)))
        return _error(f"Internal server error (ref {ref}); the server log has the details.", 500)

    for router in (status_router(ctx), tokenize_router(ctx), chat_router(ctx), completions_router(ctx)):
        app.include_router(router)
    return app


# ---------------------------------------------------------------------------------------------------------------
# command line


def serve_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="qwen3-jax-serve", description="OpenAI-compatible server (see the module "
                                "docstring of qwen3_jax.infer.server and the README's server section).")
    add_model_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="port to listen on (checked before the model loads)")
    g.add_argument("--max-batch", type=int, default=8, help="cache rows decoded together (continuous batching)")
    g.add_argument("--max-queue", type=int, default=256,
                   help="sequences waiting for a row; past this a request is answered 429")
    g.add_argument("--max-len", "--max-model-len", dest="max_len", type=int,
                   help="context per row (prompt + completion); default min(max_position_embeddings, 8192)")
    g.add_argument("--served-model-name", nargs="+", metavar="NAME",
                   help="the model's name(s): what requests send as `model` (another gets 404) and /v1/models "
                        "lists; the first is the name in responses. Default: the --model directory's name (the "
                        "--model argument as given is accepted too)")
    g.add_argument("--api-key", default=os.environ.get("QWEN3_JAX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize and /detokenize (default "
                        "$QWEN3_JAX_API_KEY); /health and /metrics stay open")
    g.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, metavar="N",
                   help=f"largest request body; a larger one is answered 413 before it is read (default "
                        f"{MAX_BODY_BYTES}, 4 MiB)")
    g.add_argument("--request-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="a request still running this long after it arrived is cancelled (408, or an error event "
                        "in a stream); 0: no limit (default 600)")
    g.add_argument("--trust-request-chat-template", action="store_true",
                   help="render chat templates that requests send (`chat_template`, or `chat_template_kwargs."
                        "chat_template`); refused with 400 by default")
    g.add_argument("--stream-interval", type=int, default=8,
                   help="decode steps per engine call, so tokens per stream chunk (a request's first token goes "
                        "out after one step, on its own)")
    g.add_argument("--warmup-len", type=int, default=256, metavar="N",
                   help="before serving, compile prefill for every batch bucket and prompt-length bucket up to N "
                        "tokens (a longer prompt compiles its bucket on first use, stalling the streams meanwhile)")
    g.add_argument("--mcp", action="append", default=[], metavar="COMMAND",
                   help="start this MCP server (stdio) and offer its tools to chat requests that send no tools "
                        "(repeatable)")
    g.add_argument("--max-tool-rounds", type=int, default=8, help="model turns per request with MCP tools")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s = p.add_argument_group("request defaults (the model's generation_config.json, then these flags)")
    add_sampling_flags(s)
    s.add_argument("--thinking-budget", type=int, metavar="N", help="default thinking_token_budget")
    think = s.add_mutually_exclusive_group()
    think.add_argument("--enable-thinking", dest="enable_thinking", action="store_true", default=True,
                       help="chat requests think unless chat_template_kwargs.enable_thinking is false (default)")
    think.add_argument("--no-thinking", dest="enable_thinking", action="store_false",
                       help="chat requests do not think unless chat_template_kwargs.enable_thinking is true")
    return p


def bind(p: argparse.ArgumentParser, host: str, port: int) -> socket.socket:
    """The listening address, bound now (a port in use is a usage error before anything loads); uvicorn listens
    on it once the model is ready."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        p.error(f"--host {host}: {e.strerror}")
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        p.error(f"--port {port}: cannot listen on {host}:{port}: {e.strerror}")
    sock.set_inheritable(True)
    return sock


def main(argv=None) -> int:
    tune_malloc()
    p = serve_parser()
    args = p.parse_args(argv)
    default_platform()
    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                             ("--stream-interval", args.stream_interval, 1), ("--warmup-len", args.warmup_len, 1),
                             ("--max-tool-rounds", args.max_tool_rounds, 1), ("--max-body-bytes", args.max_body_bytes, 1),
                             ("--request-timeout", args.request_timeout, 0)):
        if value < low:
            p.error(f"{flag} must be >= {low}")
    if not 0 <= args.port < 65536:
        p.error("--port must be in [0, 65535]")
    sock = bind(p, args.host, args.port)
    ns = argparse.Namespace(**{**vars(args), "max_new_tokens": 1})
    cfg = setup(p, ns)
    args.dtype, args.mesh = ns.dtype, ns.mesh
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn

    mcp = None
    if args.mcp:  # before the model loads: a command that fails is a usage error at once
        from .mcp_client import BackgroundMCPTools, MCPError

        try:
            mcp = BackgroundMCPTools(args.mcp)
        except MCPError as e:
            p.error(str(e))
        log.info("MCP tools: %s", ", ".join(sorted(mcp.names)) or "(none)")
    tokenizer = checked_tokenizer(p, args)   # a tokenizer.json that does not load: one usage line
    model = load_model(args)
    max_len = args.max_len or min(cfg.max_position_embeddings, 8192)
    holder = {}
    metrics = Metrics(lambda: holder["service"].scheduler)
    service = EngineService(model, tokenizer, max_batch=args.max_batch, max_len=max_len, max_queue=args.max_queue,
                            chunk=args.stream_interval, metrics=metrics)
    holder["service"] = service
    t0 = time.perf_counter()
    service.start()
    runs = service.warmup(args.warmup_len)
    print(f"compiled in {time.perf_counter() - t0:.1f}s ({runs} warm-up batches, prompts up to "
          f"{min(args.warmup_len, service.context - 1)} tokens); context {service.context}, {args.max_batch} rows",
          file=sys.stderr, flush=True)
    defaults = Defaults(SamplingDefaults(args.model, args), args.enable_thinking, args.thinking_budget,
                        args.max_tool_rounds)
    names = args.served_model_name or [Path(args.model).resolve().name]
    app = create_app(service, served_model_name=names, model_aliases=[args.model], defaults=defaults,
                     api_key=args.api_key, mcp=mcp, start_service=False, max_body_bytes=args.max_body_bytes,
                     request_timeout=args.request_timeout or None,
                     trust_request_chat_template=args.trust_request_chat_template)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, lifespan="on",
                            timeout_graceful_shutdown=None)
    server = uvicorn.Server(config)
    # uvicorn handles SIGTERM / SIGINT while it serves (stop accepting, drain the requests in flight), then raises
    # the signal again under the handlers it found: these make that a clean exit (0) instead of death by signal.
    drained = {signal.SIGTERM: signal.signal(signal.SIGTERM, lambda *_: None),
               signal.SIGINT: signal.signal(signal.SIGINT, lambda *_: None)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in drained.items():
            signal.signal(sig, handler)
        service.stop()
        if mcp is not None:
            mcp.close()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
