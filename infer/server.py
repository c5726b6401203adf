"""`qwen3-jax-serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching engine.

    qwen3-jax-serve --model DIR [--host 127.0.0.1 --port 8000 --mesh data=2,expert=4 --max-batch 8
                    --max-queue 256 --served-model-name NAME --api-key KEY --mcp "python tools.py"]

Endpoints: POST /v1/chat/completions and /v1/completions (SSE with "stream": true), GET /v1/models, GET /health,
POST /tokenize and /detokenize, GET /metrics (Prometheus). Requests to /v1/* need `Authorization: Bearer KEY`
when --api-key (or $QWEN3_JAX_API_KEY) is set. The wire format is vLLM's for Qwen3: `reasoning_content` and
`reasoning`, `chat_template_kwargs.enable_thinking`, `include_reasoning`, `thinking_token_budget`, tool-call
deltas with `index` (and `id`, `type`, `function.name` on a call's first chunk). Errors are
`{"error": {"message", "type", "param", "code"}}`: 400 for a bad field (named in `param` and the message), 401
without the key, 429 when the waiting queue is full. SIGTERM stops accepting connections, lets the requests in
flight finish, then exits.
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
import sys
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from qwen3_jax.hostmem import tune_malloc
from qwen3_jax.launch import ArgumentParser, default_platform

from . import protocol as P
from .cli import SAMPLING_FLAGS, SamplingDefaults, _add_model_args, _load_model, _load_tokenizer, _setup, add_sampling_flags
from .scheduler import QueueFull
from .serving import BadRequest, ChatPlan, ChatRun, ChoiceOutput, EngineService, GenParams, ToolRun

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


def chat_plan(req, service: EngineService, defaults: Defaults) -> ChatPlan:
    kwargs = dict(req.chat_template_kwargs or {})
    thinking = kwargs.pop("enable_thinking", defaults.enable_thinking)
    if not isinstance(thinking, bool):
        raise BadRequest("chat_template_kwargs.enable_thinking must be true or false",
                         "chat_template_kwargs.enable_thinking")
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    choice = req.tool_choice
    if hasattr(choice, "model_dump"):
        choice = choice.model_dump()
        if not tools or choice["function"]["name"] not in {t["function"]["name"] for t in tools}:
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
                    parallel_tool_calls=req.parallel_tool_calls, max_tool_rounds=defaults.max_tool_rounds)


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


def completion_logprobs(tokenizer, token_ids, lps, top: int, offset: int) -> dict:
    tokens, offsets = [], []
    for t in token_ids:
        s = _token_str(tokenizer, t)
        tokens.append(s)
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": [lp for lp, _ in lps], "text_offset": offsets,
            "top_logprobs": [{_token_str(tokenizer, i): v for i, v in tops[:top]} for _, tops in lps]}


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _error(message: str, status: int, param: str | None = None, kind: str | None = None):
    kind = kind or {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                    429: "RateLimitError", 503: "ServiceUnavailableError"}.get(status, "InternalServerError")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


# ---------------------------------------------------------------------------------------------------------------
# the app


def create_app(service: EngineService, *, served_model_name: str, model_dir: str = "", defaults: Defaults,
               api_key: str | None = None, mcp=None, start_service: bool = True):
    """The FastAPI app. `mcp`: the MCP tools (mcp_client.BackgroundMCPTools) for chat requests that send no tools.
    `start_service`: start the scheduler thread in the lifespan (and stop it at shutdown)."""
    metrics = service.metrics

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if start_service and service.scheduler._thread is None:
            service.start()
        yield
        if start_service:
            service.stop()

    app = FastAPI(title="qwen3-jax", lifespan=lifespan)
    tok = service.tokenizer

    @app.middleware("http")
    async def auth_and_count(request: Request, call_next):
        path = request.url.path
        if api_key is not None and path.startswith("/v1"):
            header = request.headers.get("authorization", "")
            if not secrets.compare_digest(header.encode(), f"Bearer {api_key}".encode()):
                response = _error("Unauthorized: send the API key as 'Authorization: Bearer <key>'", 401)
                if metrics is not None:
                    metrics.requests.labels(path, "401").inc()
                return response
        response = await call_next(request)
        if metrics is not None and path != "/metrics":
            metrics.requests.labels(path, str(response.status_code)).inc()
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        # a union's branch name (e.g. "str", "list[int]") is not a field: keep the path to it
        loc = [x for x in loc if not (x[:1].islower() and ("[" in x or x in ("str", "int", "float", "bool")))]
        field = ".".join(loc) or "body"
        return _error(f"{field}: {first.get('msg')}", 400, field)

    @app.exception_handler(BadRequest)
    async def bad_request(request, exc: BadRequest):
        return _error(exc.message, exc.status, exc.param)

    @app.exception_handler(QueueFull)
    async def queue_full(request, exc: QueueFull):
        return _error(f"The server is busy: {exc}. Retry later.", 429)

    async def _until_disconnect(request: Request, coro, on_cancel):
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

    # -- simple endpoints ------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "qwen3-jax", "root": model_dir,
                                            "max_model_len": service.context}]}

    @app.post("/tokenize")
    async def tokenize(req: P.TokenizeRequest):
        if tok is None:
            raise BadRequest("this model has no tokenizer", "prompt")
        if (req.prompt is None) == (req.messages is None):
            raise BadRequest("send exactly one of prompt and messages", "prompt")
        if req.prompt is not None:
            ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            kwargs = dict(req.chat_template_kwargs or {})
            thinking = kwargs.pop("enable_thinking", defaults.enable_thinking)
            tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
            try:
                ids = tok.apply_chat_template([m.for_template() for m in req.messages], tools=tools,
                                              add_generation_prompt=req.add_generation_prompt,
                                              enable_thinking=bool(thinking), **kwargs)
            except Exception as e:  # noqa: BLE001
                raise BadRequest(f"chat template: {type(e).__name__}: {e}", "messages") from None
        return {"count": len(ids), "max_model_len": service.context, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(req: P.DetokenizeRequest):
        if tok is None:
            raise BadRequest("this model has no tokenizer", "tokens")
        bad = [t for t in req.tokens if not 0 <= t < len(tok)]
        if bad:
            raise BadRequest(f"tokens {bad[:5]}: not in the vocabulary [0, {len(tok)})", "tokens")
        return {"prompt": tok.decode(req.tokens)}

    # -- chat ------------------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(req: P.ChatCompletionRequest, request: Request):
        plan = chat_plan(req, service, defaults)
        run = ChatRun(service, plan, mcp)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        top = plan.params.top_logprobs
        if req.stream:
            usage_chunks = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_chat_stream(run, rid, created, req.include_reasoning, req.logprobs, top,
                                                  usage_chunks), media_type="text/event-stream")
        return await _until_disconnect(request, _chat_full(run, rid, created, req.include_reasoning, req.logprobs,
                                                           top), run.cancel)

    def _chunk(rid, created, choices, obj="chat.completion.chunk", usage=False, **extra):
        out = {"id": rid, "object": obj, "created": created, "model": served_model_name, "choices": choices}
        if usage is not False:
            out["usage"] = usage
        out.update(extra)
        return _sse(out)

    async def _chat_stream(run: ChatRun, rid, created, include_reasoning, logprobs, top, usage_chunks):
        usage = None if usage_chunks else False
        try:
            n = run.plan.n
            for i in range(n):
                yield _chunk(rid, created, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}], usage=usage)
            n_calls = [0] * n
            error = None
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
                    yield _chunk(rid, created, [{"index": i, "delta": d, "logprobs": lp if j == 0 else None,
                                                 "finish_reason": None}], usage=usage)
                if step.finish_reason is not None:
                    if step.finish_reason == "error":
                        error = step.error or "generation failed"
                    yield _chunk(rid, created, [{"index": i, "delta": {}, "logprobs": None,
                                                 "finish_reason": step.finish_reason}], usage=usage)
            if error is not None:
                yield _sse({"error": {"message": error, "type": "InternalServerError", "param": None, "code": 500}})
            if usage_chunks:
                yield _chunk(rid, created, [], usage=_usage(run.prompt_tokens, run.completion_tokens))
            yield "data: [DONE]\n\n"
        finally:
            run.cancel()

    async def _chat_full(run: ChatRun, rid, created, include_reasoning, logprobs, top):
        n = run.plan.n
        acc = [{"reasoning": "", "content": "", "tool_calls": [], "logprobs": [], "finish": None, "error": None}
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
                a["finish"], a["error"] = step.finish_reason, step.error
        errors = [a["error"] or "generation failed" for a in acc if a["finish"] == "error"]
        if errors:
            return _error(errors[0], 500)
        choices = []
        for i, a in enumerate(acc):
            reasoning = (a["reasoning"] or None) if include_reasoning else None
            message = {"role": "assistant", "content": a["content"] or (None if a["tool_calls"] else ""),
                       "reasoning_content": reasoning, "reasoning": reasoning, "tool_calls": a["tool_calls"]}
            choices.append({"index": i, "message": message, "finish_reason": a["finish"],
                            "logprobs": {"content": a["logprobs"]} if logprobs else None})
        return {"id": rid, "object": "chat.completion", "created": created, "model": served_model_name,
                "choices": choices, "usage": _usage(run.prompt_tokens, run.completion_tokens)}

    # -- completions -----------------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(req: P.CompletionRequest, request: Request):
        if req.suffix:
            raise BadRequest("suffix is not supported", "suffix")
        prompts = req.prompt
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = []
        for p in prompts:
            if isinstance(p, str):
                if tok is None:
                    raise BadRequest("this model has no tokenizer: send the prompt as token ids", "prompt")
                ids.append(tok.encode(p, add_special_tokens=True))
                if not ids[-1]:
                    raise BadRequest("the prompt is empty", "prompt")
            else:
                bad = [t for t in p if not 0 <= t < service.vocab_size]
                if bad:
                    raise BadRequest(f"prompt token ids {bad[:5]}: not in [0, {service.vocab_size})", "prompt")
                ids.append(list(p))
        thinking = defaults.enable_thinking
        params = _gen_params(req, service, defaults, thinking, req.max_tokens, req.logprobs is not None,
                             req.logprobs or 0, None)
        cons = None
        if req.response_format is not None and req.response_format.type != "text":
            if service.grammars is None:
                raise BadRequest("response_format needs a tokenizer; this model has none", "response_format")
            from .constrain import GrammarError

            schema = None
            if req.response_format.type == "json_schema":
                spec = req.response_format.json_schema
                if spec is None or spec.json_schema is None:
                    raise BadRequest("response_format.json_schema.schema is required", "response_format.json_schema")
                schema = spec.json_schema
            try:
                cons = [service.grammars.response_format(schema, "disabled", params.stop_token_ids)
                        for _ in range(len(ids) * req.n)]
            except GrammarError as e:
                raise BadRequest(f"response_format: cannot build the grammar: {e}", "response_format") from None
        for x in ids:
            service.max_new(len(x), req.max_tokens)
        handle = service.submit(ids, params, req.n, cons)
        n_prompt = sum(len(x) for x in ids)
        outs = [ChoiceOutput(tok, params.stop) for _ in range(len(ids) * req.n)]
        echo = [(tok.decode(ids[k // req.n]) if (req.echo and tok is not None) else "") for k in range(len(outs))]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        top = req.logprobs or 0
        if req.stream:
            usage_chunks = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_completion_stream(handle, outs, echo, rid, created, req.logprobs is not None,
                                                        top, n_prompt, usage_chunks), media_type="text/event-stream")
        return await _until_disconnect(request, _completion_full(handle, outs, echo, rid, created,
                                                                 req.logprobs is not None, top, n_prompt), handle.cancel)

    async def _completion_events(handle, outs):
        async for k, ev in handle.events():
            items, toks, lps, reason = outs[k].feed(ev)
            if reason is not None and ev.finish_reason is None:
                handle.cancel(k)
            yield k, "".join(t for _, t in items), toks, lps, reason

    async def _completion_stream(handle, outs, echo, rid, created, logprobs, top, n_prompt, usage_chunks):
        usage = None if usage_chunks else False
        offsets = [len(e) for e in echo]
        error = None
        try:
            for k, e in enumerate(echo):
                if e:
                    yield _chunk(rid, created, [{"index": k, "text": e, "logprobs": None, "finish_reason": None}],
                                 "text_completion", usage)
            async for k, text, toks, lps, reason in _completion_events(handle, outs):
                lp = completion_logprobs(tok, toks, lps, top, offsets[k]) if (logprobs and lps) else None
                offsets[k] += len(text)
                if text or toks or reason:
                    yield _chunk(rid, created, [{"index": k, "text": text, "token_ids": toks, "logprobs": lp,
                                                 "finish_reason": reason}], "text_completion", usage)
                if reason == "error":
                    error = outs[k].error or "generation failed"
            if error is not None:
                yield _sse({"error": {"message": error, "type": "InternalServerError", "param": None, "code": 500}})
            if usage_chunks:
                completion = sum(len(o.token_ids) for o in outs)
                yield _chunk(rid, created, [], "text_completion", _usage(n_prompt, completion))
            yield "data: [DONE]\n\n"
        finally:
            handle.cancel()

    async def _completion_full(handle, outs, echo, rid, created, logprobs, top, n_prompt):
        texts = list(echo)
        lps_all: list[list] = [[] for _ in outs]
        async for k, text, toks, lps, reason in _completion_events(handle, outs):
            texts[k] += text
            if lps:
                lps_all[k] += lps
        errors = [o.error or "generation failed" for o in outs if o.finish_reason == "error"]
        if errors:
            return _error(errors[0], 500)
        choices = []
        for k, o in enumerate(outs):
            lp = completion_logprobs(tok, o.token_ids, lps_all[k], top, len(echo[k])) if logprobs else None
            choices.append({"index": k, "text": texts[k], "token_ids": o.token_ids, "logprobs": lp,
                            "finish_reason": o.finish_reason})
        return {"id": rid, "object": "text_completion", "created": created, "model": served_model_name,
                "choices": choices, "usage": _usage(n_prompt, sum(len(o.token_ids) for o in outs))}

    return app


# ---------------------------------------------------------------------------------------------------------------
# command line


def serve_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="qwen3-jax-serve", description="OpenAI-compatible server (see the module "
                                "docstring of qwen3_jax.infer.server and the README's server section).")
    _add_model_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--max-batch", type=int, default=8, help="cache rows decoded together (continuous batching)")
    g.add_argument("--max-queue", type=int, default=256,
                   help="sequences waiting for a row; past this a request is answered 429")
    g.add_argument("--max-len", "--max-model-len", dest="max_len", type=int,
                   help="context per row (prompt + completion); default min(max_position_embeddings, 8192)")
    g.add_argument("--served-model-name", help="the model's name in responses and /v1/models; default: --model")
    g.add_argument("--api-key", default=os.environ.get("QWEN3_JAX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default $QWEN3_JAX_API_KEY)")
    g.add_argument("--stream-interval", type=int, default=8,
                   help="decode steps per engine call, so tokens per stream chunk (a new request's first token "
                        "goes out after one step)")
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


def main(argv=None) -> int:
    tune_malloc()
    p = serve_parser()
    args = p.parse_args(argv)
    default_platform()
    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                             ("--stream-interval", args.stream_interval, 1), ("--warmup-len", args.warmup_len, 1),
                             ("--max-tool-rounds", args.max_tool_rounds, 1)):
        if value < low:
            p.error(f"{flag} must be >= {low}")
    if not 0 <= args.port < 65536:
        p.error("--port must be in [0, 65535]")
    ns = argparse.Namespace(**{**vars(args), "max_new_tokens": 1})
    cfg = _setup(p, ns)
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
    tokenizer = _load_tokenizer(args)
    model = _load_model(args)
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
    app = create_app(service, served_model_name=args.served_model_name or args.model,
                     model_dir=str(Path(args.model).resolve()), defaults=defaults, api_key=args.api_key,
                     mcp=mcp, start_service=False)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, lifespan="on",
                            timeout_graceful_shutdown=None)
    server = uvicorn.Server(config)
    # uvicorn handles SIGTERM / SIGINT while it serves (stop accepting, drain the requests in flight), then raises
    # the signal again under the handlers it found: these make that a clean exit (0) instead of death by signal.
    drained = {signal.SIGTERM: signal.signal(signal.SIGTERM, lambda *_: None),
               signal.SIGINT: signal.signal(signal.SIGINT, lambda *_: None)}
    try:
        server.run()
    finally:
        for sig, handler in drained.items():
            signal.signal(sig, handler)
        service.stop()
        if mcp is not None:
            mcp.close()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
