"""The serving core shared by `qwen3-jax-serve` and `qwen3-jax-chat --mcp`.

`EngineService` puts a `Scheduler` (infer/scheduler.py) behind asyncio: `submit` queues sequences at once
(raising `QueueFull` / `BadRequest` / `EngineDead` before any response is sent), `Handle.events()` yields their
tokens as the scheduler thread produces them, and leaving the iteration early (a client that went away) cancels
what is unfinished, which frees the rows at once. A request's deadline (`GenParams.deadline`) cancels what is
left of it when it passes (`Handle.timed_out`).

`WorkerPool` runs a request's blocking work (JSON, tokenization, chat templates, grammar compilation, prompt
logprobs) in a few threads with a bound on the jobs queued and a timeout, so the event loop keeps answering.

`ChoiceOutput` turns one choice's tokens into text: incremental detokenization, stop strings (the sequence is
cancelled at the first one) and, for chat, `ChatStreamParser` (reasoning / content / tool calls).

`ChatRun` is one chat completion: the prompt through the chat template, constraints for `tool_choice`
"required" / named and `response_format`, n choices, and, with MCP tools (`mcp_client.MCPTools`) and a request
that names no tools of its own (nor a JSON response_format), the tool loop: run the calls the model makes, append the
results, generate again until it answers (tool_choice applies to the first round, then "auto", as the OpenAI Agents SDK resets it;
the last allowed round offers no tools, so the model must answer).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .chat import ChatStreamParser, IncrementalDetokenizer, StopStrings, think_state
from .generate import eos_token_ids, stop_token_ids
from .scheduler import EngineDead, Event, QueueFull, Scheduler, Sequence

__all__ = ["BadRequest", "ChatRun", "ChoiceOutput", "EngineDead", "EngineService", "GenParams", "QueueFull",
           "WorkerPool"]

log = logging.getLogger("qwen3_jax.serve")


# chat_template_kwargs that are apply_chat_template's own arguments, not template variables
RESERVED_TEMPLATE_KWARGS = frozenset({"tokenize", "return_dict", "return_assistant_tokens_mask", "add_generation_prompt",
                                      "tools", "documents", "chat_template", "continue_final_message", "enable_thinking",
                                      "messages", "conversation"})


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


@dataclass
class GenParams:
    """One request's generation settings, resolved against the server defaults."""
    sampling: object                          # SamplingParams (seed of choice i: seed + i)
    max_tokens: int | None                    # None: the rest of the context
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)   # all of them, eos included unless ignore_eos
    thinking_budget: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    cap_to_context: bool = False              # max_tokens past the context: cut it (the chat) instead of a 400
    deadline: float | None = None             # event-loop time past which what is left is cancelled (a timeout)


class WorkerPool:
    """Blocking work of requests off the event loop: `await pool.run(fn, *args)` runs fn in one of `workers`
    threads. At most `max_pending` jobs wait or run at once (past that: QueueFull, a 429); a job not done after
    `timeout` seconds answers BadRequest 503 (its thread finishes it, still counted against max_pending)."""

    def __init__(self, workers: int = 4, max_pending: int = 256, timeout: float = 60.0):
        self.workers, self.max_pending, self.timeout = workers, max_pending, timeout
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="qwen3-jax-prep")
        self._lock = threading.Lock()
        self.pending = 0

    def _done(self, _):
        with self._lock:
            self.pending -= 1

    async def run(self, fn, *args, timeout: float | None = None):
        with self._lock:
            if self.pending >= self.max_pending:
                raise QueueFull(f"{self.pending} requests are being prepared")
            self.pending += 1
        fut = self._pool.submit(fn, *args)
        fut.add_done_callback(self._done)
        limit = self.timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), limit)
        except asyncio.TimeoutError:
            raise BadRequest(f"preparing the request took longer than {limit:g} s; the server is overloaded or "
                             "the request too large", None, 503) from None

    def shutdown(self):
        self._pool.shutdown(wait=False, cancel_futures=True)


async def _inline(fn, *args, timeout=None):
    return fn(*args)


class Handle:
    """The sequences of one request; `events()` yields (choice index, Event) until every one has finished. At
    `deadline` (event-loop time) what is unfinished is cancelled and `timed_out` set."""

    def __init__(self, service: "EngineService", seqs: list[Sequence], queue: asyncio.Queue,
                 deadline: float | None = None):
        self.service, self.seqs, self._queue = service, seqs, queue
        self._ended: set[int] = set()
        self.timed_out = False
        self._timer = None
        if deadline is not None:
            self._timer = asyncio.get_running_loop().call_at(deadline, self._expire)

    def _expire(self):
        """The deadline: cancel what is left, and end it here too (an engine that is stuck emits nothing more)."""
        self.timed_out = True
        self.cancel()
        for i in range(len(self.seqs)):
            if i not in self._ended:
                self._queue.put_nowait((i, Event([], None, "abort")))

    async def events(self):
        try:
            while len(self._ended) < len(self.seqs):
                i, ev = await self._queue.get()
                if i in self._ended:  # after the deadline ended it
                    continue
                if ev.finish_reason is not None:
                    self._ended.add(i)
                yield i, ev
        finally:
            self.cancel()
            if self._timer is not None:
                self._timer.cancel()

    def cancel(self, index: int | None = None):
        for i, s in enumerate(self.seqs):
            if (index is None or i == index) and not s.done:
                self.service.scheduler.cancel(s)


class EngineService:
    def __init__(self, model, tokenizer=None, *, max_batch: int = 8, max_len: int = 2048, max_queue: int = 256,
                 chunk: int = 8, cache_dtype=None, metrics=None):
        cfg = model.config
        self.tokenizer = tokenizer
        self.vocab_size = cfg.vocab_size
        self.context = min(cfg.max_position_embeddings, max_len)
        self.eos_ids = eos_token_ids(cfg, tokenizer)
        self.grammars = None
        if tokenizer is not None:
            from .constrain import Grammars

            self.grammars = Grammars(tokenizer, cfg.vocab_size, self.eos_ids)
        self.scheduler = Scheduler(model, tokenizer=tokenizer, max_batch=max_batch, max_len=self.context,
                                   max_queue=max_queue, chunk=chunk, cache_dtype=cache_dtype, grammars=self.grammars)
        self.think_ids = self.scheduler.think_ids
        self.metrics = metrics

    def start(self):
        self.scheduler.start()

    def stop(self):
        self.scheduler.stop()

    def warmup(self, max_prompt: int = 16) -> int:
        """Compile before serving what requests would otherwise compile on the scheduler thread while every stream
        waits: prefill for each batch bucket (1, 2, 4, ... up to --max-batch prompts at once) and prompt-length
        bucket (16, 32, ... up to `max_prompt` tokens), the decode calls (with and without logprobs, with and without
        the host's per-step hook of new and constrained rows) and the release of a cancelled row. Longer prompts
        compile their length bucket on first use. Returns the number of warm-up batches run."""
        import threading

        from .engine import pow2

        lengths, t = [], 16
        while True:
            lengths.append(min(t, self.context - 1))
            if t >= min(max_prompt, self.context - 1):
                break
            t *= 2
        sizes, p = [], 1
        while p < pow2(self.scheduler.max_batch):
            sizes.append(p)
            p *= 2
        sizes.append(self.scheduler.max_batch)
        runs = 0
        for n_tok in sorted(set(lengths)):
            for k in sizes:
                left, done = [k], threading.Event()

                def emit(ev, left=left, done=done):
                    if ev.finish_reason:
                        left[0] -= 1
                        if not left[0]:
                            done.set()

                new = min(self.scheduler.chunk + 1, self.context - n_tok)
                self.scheduler.submit([Sequence([0] * n_tok, emit, max_new_tokens=new, logprobs=(runs == 0))
                                       for _ in range(k)])
                done.wait()
                runs += 1
        left, done = [2], threading.Event()  # new rows beside one that wants logprobs (the hook and the logprobs)

        def emit2(ev):
            if ev.finish_reason:
                left[0] -= 1
                if not left[0]:
                    done.set()

        self.scheduler.submit([Sequence([0] * lengths[0], emit2, max_new_tokens=2, logprobs=lp) for lp in (True, False)])
        done.wait()
        runs += 1
        done = threading.Event()  # a row cancelled while it runs (Engine.release)
        seq = Sequence([0] * lengths[0], None, max_new_tokens=self.context - lengths[0])
        seq.emit = lambda ev: (self.scheduler.cancel(seq) if ev.token_ids else None, ev.finish_reason and done.set())
        self.scheduler.submit([seq])
        done.wait()
        runs += 1
        if self.grammars is not None:  # the decode of constrained rows (masks from the host), with and without logprobs
            for logprobs in (False, True):
                done = threading.Event()
                cons = self.grammars.response_format(None, "disabled", sorted(self.eos_ids))
                self.scheduler.submit([Sequence([0] * lengths[0], lambda ev: ev.finish_reason and done.set(),
                                                max_new_tokens=2, constraint=cons, logprobs=logprobs)])
                done.wait()
                runs += 1
        return runs

    # -- limits ----------------------------------------------------------------------------------------------
    def max_new(self, n_prompt: int, max_tokens: int | None, param: str = "max_tokens", cap: bool = False) -> int:
        if n_prompt >= self.context:
            raise BadRequest(f"This model's maximum context length is {self.context} tokens; the prompt has "
                             f"{n_prompt} tokens and leaves no room for a completion.", "messages")
        if max_tokens is None or (cap and n_prompt + max_tokens > self.context):
            return self.context - n_prompt
        if n_prompt + max_tokens > self.context:
            raise BadRequest(f"This model's maximum context length is {self.context} tokens. However, you requested "
                             f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} for the "
                             f"completion). Please reduce the prompt or {param}.", param)
        return max_tokens

    def stop_ids(self, extra, ignore_eos: bool) -> list[int]:
        try:
            return stop_token_ids(extra, () if ignore_eos else self.eos_ids, self.vocab_size)
        except ValueError as e:
            raise BadRequest(str(e), "stop_token_ids") from None

    # -- generation ------------------------------------------------------------------------------------------
    def submit(self, prompts: list[list[int]], params: GenParams, n: int = 1, constraints=None,
               max_new: int | None = None) -> Handle:
        """Queue n choices of each prompt (choice index = prompt * n + j; with a seed, choice k samples with
        seed + k). constraints: one per choice or None. Raises QueueFull / BadRequest before anything runs."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        metrics = self.metrics
        seqs = []
        for p, ids in enumerate(prompts):
            new = max_new or self.max_new(len(ids), params.max_tokens, cap=params.cap_to_context)
            for j in range(n):
                k = p * n + j
                sp = params.sampling
                if k and sp.seed is not None:
                    sp = sp.replace(seed=sp.seed + k)
                seq = Sequence(list(ids), None, sp, new, list(params.stop_token_ids), params.thinking_budget,
                               constraints[k] if constraints else None, params.logprobs)

                def emit(ev: Event, k=k, seq=seq, state={"last": None}):  # noqa: B006  (one dict per choice)
                    if metrics is not None:
                        metrics.on_event(seq, ev, state)
                    loop.call_soon_threadsafe(queue.put_nowait, (k, ev))

                seq.emit = emit
                seqs.append(seq)
        if params.deadline is not None and loop.time() >= params.deadline:
            raise BadRequest("the request timed out before it was queued", None, 408)
        self.scheduler.submit(seqs)
        if metrics is not None:
            metrics.on_submit(sum(len(x) for x in prompts), len(seqs))
        return Handle(self, seqs, queue, params.deadline)

    # -- prompt logprobs ---------------------------------------------------------------------------------------
    def prompt_logprobs(self, ids: list[int]) -> list[tuple[float, list[tuple[int, float]]]]:
        """For each prompt token after the first: (its logprob given the tokens before it, the TOP_LOGPROBS most
        likely tokens there as [(id, logprob)]), from one forward pass of the prompt (raw logits, as the
        logprobs of generated tokens). Blocking (device work): run it in the WorkerPool."""
        import numpy as np

        from .engine import pow2

        eng = self.scheduler.engine
        n = len(ids)
        t = min(pow2(n, 16), self.context)
        ids_bt = np.zeros((1, t), np.int32)
        ids_bt[0, :n] = ids
        lp, top_id, top_lp = _prompt_logprobs_fn(eng.fns.graphdef)(eng.params, ids_bt, np.int32(n))
        lp, top_id, top_lp = (np.asarray(x)[: n - 1] for x in (lp, top_id, top_lp))
        return [(float(lp[j]), list(zip(top_id[j].tolist(), top_lp[j].tolist()))) for j in range(n - 1)]


@functools.lru_cache(maxsize=4)
def _prompt_logprobs_fn(graphdef):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from .engine import TOP_LOGPROBS

    def f(params, ids_bt, n):
        model = nnx.merge(graphdef, params)
        mask_bt = (jnp.arange(ids_bt.shape[1])[None] < n).astype(jnp.int32)
        logp_tv = jax.nn.log_softmax(model(ids_bt, attention_mask=mask_bt).logits[0, :-1].astype(jnp.float32), -1)
        lp_t = jnp.take_along_axis(logp_tv, ids_bt[0, 1:, None], 1)[:, 0]
        top_lp, top_id = jax.lax.top_k(logp_tv, TOP_LOGPROBS)
        return lp_t, top_id.astype(jnp.int32), top_lp

    return jax.jit(f)


class ChoiceOutput:
    """One choice's tokens -> text pieces. `feed(event)` returns (items, token ids, logprobs, finish_reason):
    items are ("text", str) for completions or ChatStreamParser's items for chat; finish_reason is set on the
    last feed (a stop string also ends the choice: the caller cancels its sequence)."""

    def __init__(self, tokenizer, stop: list[str] | None = None, parser: ChatStreamParser | None = None):
        self.tokenizer = tokenizer
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True) if tokenizer is not None else None
        self.stops = StopStrings(stop)
        self.parser = parser
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.error: str | None = None

    def _text(self, items, text):
        if not text:
            return
        if self.parser is None:
            if items and items[-1][0] == "text":
                items[-1] = ("text", items[-1][1] + text)
            else:
                items.append(("text", text))
        else:
            items.extend(self.parser.feed(text))

    def feed(self, ev: Event):
        if self.finish_reason is not None:
            return [], [], None, None
        toks, lps, reason = ev.token_ids, ev.logprobs, ev.finish_reason
        n_text = len(toks) - 1 if reason == "stop" else len(toks)  # the stop token that ended the row is no text
        items: list = []
        used = len(toks)
        if self.detok is not None:
            for k in range(n_text):
                self._text(items, self.stops.feed(self.detok.feed(toks[k])))
                if self.stops.hit is not None:
                    used, reason = k + 1, "stop"
                    break
        self.token_ids += toks[:used]
        if reason is not None:
            self.finish_reason, self.error = reason, ev.error
            if self.detok is not None and self.stops.hit is None:
                self._text(items, self.stops.feed(self.detok.flush()))
                self._text(items, self.stops.flush())
            if self.parser is not None:
                items.extend(self.parser.finish())
        return items, toks[:used], (lps[:used] if lps is not None else None), reason


# ------------------------------------------------------------------------------------------------- chat
@dataclass
class Step:
    """What one choice produced in one scheduler event: items (reasoning / content / tool_call), the tokens and
    their logprobs; finish_reason on its last step ("stop", "length", "tool_calls", "abort", "error")."""
    index: int
    items: list
    token_ids: list[int]
    logprobs: list | None = None
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class ToolRun:
    """A tool call the server ran (MCP), for the chat's display."""
    name: str
    arguments: str
    result: str


@dataclass
class ChatPlan:
    messages: list[dict]
    tools: list[dict] | None
    tool_choice: object              # "auto" | "none" | "required" | {"type": "function", "function": {"name"}}
    enable_thinking: bool
    template_kwargs: dict
    params: GenParams
    n: int = 1
    response_format: dict | None = None   # {"type": "json_object"} / {"type": "json_schema", "json_schema": {...}}
    parallel_tool_calls: bool = True
    max_tool_rounds: int = 8
    chat_template: str | None = None      # the request's own template (the server decides whether to trust it)


class ChatRun:
    """One chat completion. The constructor checks the plan; `await start(offload)` renders the prompt and
    compiles the constraints (blocking work, in `offload`: e.g. `WorkerPool.run`) and queues the first round
    (raising BadRequest / QueueFull / EngineDead before anything is sent); `steps()` starts it if that was not
    done."""

    def __init__(self, service: EngineService, plan: ChatPlan, mcp=None):
        if service.tokenizer is None:
            raise BadRequest("this model has no tokenizer: chat needs tokenizer.json (use /v1/completions with "
                             "token ids)", "messages")
        self.service, self.plan = service, plan
        wants_json = (plan.response_format or {}).get("type") in ("json_object", "json_schema")
        self.mcp = mcp if (mcp is not None and mcp.tools and not plan.tools and plan.tool_choice != "none"
                           and not wants_json) else None
        if self.mcp is not None and plan.n > 1:
            raise BadRequest("n > 1 is not supported with the server's MCP tools (send tools of your own, or n: 1)", "n")
        self.messages = list(plan.messages)
        self.tools = None if plan.tool_choice == "none" else (self.mcp.tools if self.mcp is not None else plan.tools)
        if plan.tool_choice == "required" and not self.tools:
            raise BadRequest('tool_choice "required" needs tools (the request sends none and the server has no MCP '
                             "tools for it)", "tool_choice")
        self.tool_choice = (plan.tool_choice or "auto") if self.tools else "none"
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.rounds = 0
        self._handle: Handle | None = None
        self._offload = _inline
        self._started = self._cancelled = False

    @property
    def timed_out(self) -> bool:
        return self._handle is not None and self._handle.timed_out

    async def start(self, offload=None):
        if offload is not None:
            self._offload = offload
        self._started = True
        self._handle = await self._submit_round(first=True)

    def _render(self, tools) -> list[int]:
        tok, p = self.service.tokenizer, self.plan
        kwargs = {k: v for k, v in p.template_kwargs.items() if k not in RESERVED_TEMPLATE_KWARGS}
        try:
            return tok.apply_chat_template(self.messages, tools=tools, add_generation_prompt=True,
                                           enable_thinking=p.enable_thinking, chat_template=p.chat_template, **kwargs)
        except Exception as e:  # noqa: BLE001  (jinja2 errors and raise_exception() in templates)
            raise BadRequest(f"chat template: {type(e).__name__}: {e}", "messages") from None

    def _forced(self, tools) -> bool:
        return bool(tools) and self.tool_choice not in ("auto", "none")

    def _constraints(self, prompt_ids, tools):
        """One Constraint per choice, or None: tool_choice "required" / named when tools are offered, else a JSON
        response_format (not enforced in a round that offers tools under "auto": the model may call them)."""
        from .constrain import GrammarError, reasoning_mode

        p, g = self.plan, self.service.grammars
        rf = p.response_format or {}
        forced = self._forced(tools)
        if not forced and (tools or rf.get("type") not in ("json_object", "json_schema")):
            return None
        mode = reasoning_mode(prompt_ids, self.service.think_ids, p.enable_thinking)
        stops = p.params.stop_token_ids
        param = "tool_choice" if forced else "response_format"
        try:
            if forced:
                return [g.tool_calls(tools, self.tool_choice, mode, p.parallel_tool_calls, stops) for _ in range(p.n)]
            schema = None
            if rf["type"] == "json_schema":
                schema = (rf.get("json_schema") or {}).get("schema")
                if schema is None:
                    raise BadRequest("response_format.json_schema.schema is required", "response_format")
            return [g.response_format(schema, mode, stops) for _ in range(p.n)]
        except GrammarError as e:
            raise BadRequest(f"{param}: cannot build the grammar: {e}", param) from None

    def _prepare(self, tools):
        """The blocking part of a round: the prompt ids and the constraints."""
        ids = self._render(tools)
        return ids, self._constraints(ids, tools)

    async def _submit_round(self, first: bool) -> Handle | None:
        last_round = self.mcp is not None and self.rounds + 1 >= self.plan.max_tool_rounds
        tools = None if last_round else self.tools
        ids, constraints = await self._offload(self._prepare, tools)
        if self._cancelled:
            return None
        max_new = None
        if not first:  # a later tool round: what is left of the context, at most max_tokens
            room = self.service.context - len(ids)
            if room < 1:
                return None
            want = self.plan.params.max_tokens
            max_new = room if want is None else min(want, room)
        handle = self.service.submit([ids], self.plan.params, self.plan.n, constraints, max_new)
        self.prompt_tokens += len(ids)
        self.rounds += 1
        in_think = think_state(ids, self.service.think_ids) == "open"
        self._outputs = [ChoiceOutput(self.service.tokenizer, self.plan.params.stop,
                                      ChatStreamParser(in_reasoning=in_think, tools=bool(tools),
                                                       calls_only=self._forced(tools)))
                         for _ in range(self.plan.n)]
        return handle

    def cancel(self):
        self._cancelled = True
        if self._handle is not None:
            self._handle.cancel()

    async def steps(self):
        """Yields a Step per choice and scheduler event (and a ToolRun per MCP call) until every choice finished."""
        if not self._started:
            await self.start()
        n = self.plan.n
        while True:
            handle = self._handle
            if handle is None:  # cancelled while the round was prepared
                return
            outputs = self._outputs
            calls, text = [[] for _ in range(n)], [{"reasoning": "", "content": ""} for _ in range(n)]
            tools_ran = False
            async for i, ev in handle.events():
                items, toks, lps, reason = outputs[i].feed(ev)
                self.completion_tokens += len(toks)
                if reason is not None and ev.finish_reason is None:
                    handle.cancel(i)  # a stop string ended it
                shown = []
                for kind, value in items:
                    if kind == "tool_call":
                        calls[i].append(value)
                        if self.mcp is not None:
                            continue
                    else:
                        text[i][kind] += value
                    shown.append((kind, value))
                finish = None
                if reason is not None:
                    finish = "tool_calls" if calls[i] and reason == "stop" else reason
                    if self.mcp is not None and finish == "tool_calls":
                        finish, tools_ran = None, True  # the server runs them; the choice goes on
                yield Step(i, shown, toks, lps, finish, outputs[i].error if finish else None)
            if not tools_ran:
                return
            message = {"role": "assistant", "content": text[0]["content"], "tool_calls": calls[0]}
            if text[0]["reasoning"]:
                message["reasoning_content"] = text[0]["reasoning"]
            self.messages.append(message)
            deadline = self.plan.params.deadline
            for call in calls[0]:
                left = None if deadline is None else deadline - asyncio.get_running_loop().time()
                try:
                    result = await asyncio.wait_for(self.mcp.call(call["function"]["name"],
                                                                  call["function"]["arguments"]), left)
                except asyncio.TimeoutError:
                    self._handle.timed_out = True
                    yield Step(0, [], [], None, "abort")
                    return
                yield ToolRun(call["function"]["name"], call["function"]["arguments"], result)
                self.messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
            self.tool_choice = "auto"
            try:
                self._handle = await self._submit_round(first=False)
            except (QueueFull, BadRequest, EngineDead) as e:
                yield Step(0, [], [], None, "error", str(e))
                return
            if self._handle is None and not self._cancelled:
                yield Step(0, [], [], None, "length")
                return
