"""generate / iter_generate / stream over the KV-cached engine (infer/engine.py), with continuous batching.

Token ids follow vLLM: `token_ids` holds every new token including the stop token that ended the row; `text`
(decoded with skip_special_tokens) excludes it; `completion_tokens = len(token_ids)`.
"""

from __future__ import annotations

import dataclasses
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from .chat import THINK_END, THINK_START, IncrementalDetokenizer, parse_tool_calls, split_reasoning, think_state
from .engine import Engine, pow2
from .sampling import SamplingParams, seed_key

FORCED_THINK_END = "\n" + THINK_END + "\n\n"  # forced when a thinking budget runs out (the template's form)
MAX_STOP_IDS = 16  # stop-token slots per row of the decode loop


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str | None
    finish_reason: str                 # "stop" | "length"
    reasoning_content: str | None = None
    content: str | None = None
    tool_calls: list[dict] = field(default_factory=list)
    tool_call_errors: list[dict] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Request:
    prompt_ids: list[int]
    sampling: SamplingParams = SamplingParams(temperature=0.0)
    max_new_tokens: int = 256
    stop_token_ids: list[int] | None = None    # None -> tokenizer / model config eos ids
    thinking_budget: int | None = None
    domain: str | None = None                  # the request's domain in the routing statistics (routing_stats)


def eos_token_ids(cfg, tokenizer=None) -> list[int]:
    """The ids that stop every request unless it says otherwise: the config's eos and the tokenizer's."""
    ids = list(cfg.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted({i for i in ids if 0 <= i < cfg.vocab_size})


def stop_token_ids(extra, eos_ids=(), vocab_size: int | None = None, limit: int = MAX_STOP_IDS) -> list[int]:
    """A request's stop ids: `eos_ids` and `extra`, sorted, without repeats. ValueError when one is not a token id
    (in [0, vocab_size), when vocab_size is given) or when there are more than `limit` (a decode row's stop slots)."""
    ids = sorted({*(int(t) for t in eos_ids), *(int(t) for t in (extra or ()))})
    bad = [t for t in ids if not 0 <= t < vocab_size] if vocab_size is not None else []
    if bad:
        raise ValueError(f"stop_token_ids {bad}: not in [0, {vocab_size})")
    if len(ids) > limit:
        raise ValueError(f"stop_token_ids: at most {limit} (eos included), got {len(ids)}")
    return ids


def think_token_ids(tokenizer) -> tuple[tuple[int, int] | None, list[int] | None]:
    """((<think>, </think>) ids, forced end-of-thinking ids) from a tokenizer that has both tokens, else (None, None)."""
    if tokenizer is None:
        return None, None
    start, end = tokenizer.convert_tokens_to_ids(THINK_START), tokenizer.convert_tokens_to_ids(THINK_END)
    if start is None or end is None:
        return None, None
    forced = tokenizer.encode(FORCED_THINK_END, add_special_tokens=False)
    return (start, end), (forced if end in forced else [end])


def build_result(ids: list[int], reason: str, prompt_tokens: int, tokenizer=None) -> GenerationResult:
    res = GenerationResult(token_ids=list(ids), text=None, finish_reason=reason, prompt_tokens=prompt_tokens,
                           completion_tokens=len(ids))
    if tokenizer is not None:
        res.text = tokenizer.decode(ids[:-1] if reason == "stop" else ids, skip_special_tokens=True)
        res.reasoning_content, content = split_reasoning(res.text)
        res.content, res.tool_calls, res.tool_call_errors = parse_tool_calls(content)
    return res


ROW_DTYPES = dict(max_new_b=np.int32, temp_b=np.float32, top_k_b=np.int32, top_p_b=np.float32, min_p_b=np.float32,
                  rep_b=np.float32, pres_b=np.float32, freq_b=np.float32, key_b=np.uint32, stop_bs=np.int32,
                  budget_b=np.int32, in_think_b=bool)


def row_params(requests: list[Request], n_stop: int, think) -> dict[str, np.ndarray]:
    """The per-row inputs of `Engine.prefill` for the rows these requests fill (ROW_DTYPES, one entry per request):
    sampling, seed key, stop ids (padded with -1 to `n_stop`), thinking budget and whether the prompt ends inside
    <think> (`think`: the (<think>, </think>) ids or None). A request without a seed gets a random one."""
    rows = []
    for req in requests:
        sp = req.sampling
        seed = sp.seed if sp.seed is not None else random.SystemRandom().getrandbits(63)
        stops = stop_token_ids(req.stop_token_ids, limit=n_stop)
        budget = -1 if (req.thinking_budget is None or think is None) else int(req.thinking_budget)
        rows.append(dict(max_new_b=req.max_new_tokens, temp_b=sp.temperature, top_k_b=sp.top_k, top_p_b=sp.top_p,
                         min_p_b=sp.min_p, rep_b=sp.repetition_penalty, pres_b=sp.presence_penalty,
                         freq_b=sp.frequency_penalty, key_b=np.asarray(seed_key(seed), np.uint32),
                         stop_bs=np.asarray(stops + [-1] * (n_stop - len(stops)), np.int32), budget_b=budget,
                         in_think_b=think_state(req.prompt_ids, think) == "open"))
    return {k: np.asarray([r[k] for r in rows], dtype) for k, dtype in ROW_DTYPES.items()}


def _events(model, requests: Iterable[Request], *, tokenizer=None, batch_size: int = 8, max_len: int | None = None,
            cache_dtype=None, chunk: int = 32, think_ids=None, forced_ids=None, routing_stats=None):
    """Yields ("tokens", index, new ids, finished reason or None) after every decode chunk."""
    if max_len is None or not isinstance(requests, (list, tuple)):
        requests = list(requests) if max_len is None else requests
    default_stops = None
    if isinstance(requests, (list, tuple)):
        if not requests:
            return
        if max_len is None:
            need = max(len(r.prompt_ids) + r.max_new_tokens - 1 for r in requests)
            max_len = pow2(need, 64)
        batch_size = min(batch_size, pow2(len(requests)))
    n_stop = MAX_STOP_IDS
    if think_ids is None and tokenizer is not None:
        think_ids, forced_ids = think_token_ids(tokenizer)
    engine = Engine(model, think_ids=think_ids, forced_ids=forced_ids, chunk=chunk, routing_stats=routing_stats)
    slots = engine.new_slots(batch_size, max_len, n_stop, cache_dtype)
    queue = iter(enumerate(requests))
    ahead: deque = deque()

    def more() -> bool:
        if not ahead:
            nxt = next(queue, None)
            if nxt is not None:
                ahead.append(nxt)
        return bool(ahead)

    rows: list = [None] * batch_size   # row -> (request index, prompt length)
    while True:
        free = [r for r in range(batch_size) if rows[r] is None]
        new_prompts, new_rows, admitted, domains = [], [], [], []
        while free and more():
            idx, req = ahead.popleft()
            if req.stop_token_ids is None:
                default_stops = default_stops if default_stops is not None else eos_token_ids(model.config, tokenizer)
                req = dataclasses.replace(req, stop_token_ids=default_stops)
            n = len(req.prompt_ids)
            if n < 1 or n > max_len:
                raise ValueError(f"request {idx}: prompt of {n} tokens; need 1..{max_len} (max_len)")
            if req.max_new_tokens < 1:
                raise ValueError(f"request {idx}: max_new_tokens must be >= 1")
            r = free.pop(0)
            rows[r] = (idx, n)
            new_prompts.append([int(t) for t in req.prompt_ids])
            new_rows.append(r)
            admitted.append(req)
            domains.append(req.domain)
        if new_prompts:
            slots = engine.prefill(slots, new_prompts, new_rows, row_params(admitted, n_stop, think_ids), domains)
        if all(r is None for r in rows):
            return
        slots, toks_bn, reason_b = engine.decode(slots, chunk, stop_on_finish=more())
        for r in range(batch_size):
            if rows[r] is None:
                continue
            new = [int(t) for t in toks_bn[r] if t >= 0]
            reason = {1: "stop", 2: "length"}.get(int(reason_b[r]))
            yield "tokens", rows[r][0], rows[r][1], new, reason
            if reason is not None:
                rows[r] = None


def iter_generate(model, requests: Iterable[Request], *, tokenizer=None, batch_size: int = 8, max_len: int | None = None,
                  cache_dtype=None, chunk: int = 32, think_ids=None, forced_ids=None, routing_stats=None
                  ) -> Iterator[tuple[int, GenerationResult]]:
    """Continuous batching: `batch_size` cache rows, refilled from the request queue as rows finish; yields
    (request index, result) in completion order. max_len (cache slots per row) defaults to the longest
    prompt + max_new_tokens (power of two); then the requests are read up front. A prompt longer than max_len
    raises ValueError (validate first); a row whose cache fills up ends with "length".

    routing_stats (a qwen3_jax.routing.RoutingStats): add to it the routing of every token the generation runs
    through the model (each prompt, then each input token of the decode steps: all but the last new token), as
    the KV-cached forwards routed them, per request `domain` (no second forward)."""
    acc: dict[int, list[int]] = {}
    for _, idx, n_prompt, new, reason in _events(model, requests, tokenizer=tokenizer, batch_size=batch_size,
                                                 max_len=max_len, cache_dtype=cache_dtype, chunk=chunk,
                                                 think_ids=think_ids, forced_ids=forced_ids,
                                                 routing_stats=routing_stats):
        acc.setdefault(idx, []).extend(new)
        if reason is not None:
            yield idx, build_result(acc.pop(idx), reason, n_prompt, tokenizer)


def _prompt_ids(prompt, tokenizer, enable_thinking, tools) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer")
        return tokenizer.encode(prompt, add_special_tokens=False)
    prompt = list(prompt)
    if prompt and isinstance(prompt[0], dict):
        if tokenizer is None:
            raise ValueError("message prompts need a tokenizer")
        return tokenizer.apply_chat_template(prompt, tools=tools, add_generation_prompt=True, tokenize=True,
                                             enable_thinking=enable_thinking)
    return [int(t) for t in prompt]


def generate(model, prompts, sampling: SamplingParams | None = None, max_new_tokens: int = 256, stop_token_ids=None,
             tokenizer=None, *, enable_thinking: bool = True, thinking_budget: int | None = None, tools=None,
             batch_size: int | None = None, max_len: int | None = None, cache_dtype=None) -> list[GenerationResult]:
    """One result per prompt, in order. prompts: token-id lists, or (with a tokenizer) strings (encoded as is)
    or chat message lists (chat template with tools / enable_thinking, generation prompt added).
    sampling defaults to greedy."""
    sampling = sampling or SamplingParams(temperature=0.0)
    reqs = [Request(_prompt_ids(p, tokenizer, enable_thinking, tools), sampling, max_new_tokens, stop_token_ids,
                    thinking_budget) for p in prompts]
    out: list = [None] * len(reqs)
    for i, res in iter_generate(model, reqs, tokenizer=tokenizer, batch_size=batch_size or min(len(reqs), 32) or 1,
                                max_len=max_len, cache_dtype=cache_dtype):
        out[i] = res
    return out


def stream(model, prompt, sampling=None, max_new_tokens=256, stop_token_ids=None, tokenizer=None, *,
           enable_thinking=True, thinking_budget=None, tools=None, chunk: int = 1, max_len: int | None = None,
           cache_dtype=None) -> Iterator[str]:
    """Text deltas of one generation (needs a tokenizer), `chunk` tokens per host sync; never splits a UTF-8
    character. The deltas concatenate to `generate(...)[0].text`."""
    if tokenizer is None:
        raise ValueError("stream needs a tokenizer")
    sampling = sampling or SamplingParams(temperature=0.0)
    req = Request(_prompt_ids(prompt, tokenizer, enable_thinking, tools), sampling, max_new_tokens, stop_token_ids,
                  thinking_budget)
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
    for _, _, _, new, reason in _events(model, [req], tokenizer=tokenizer, batch_size=1, max_len=max_len,
                                        cache_dtype=cache_dtype, chunk=chunk):
        if reason == "stop":
            new = new[:-1]
        delta = detok.feed(new) if new else ""
        if delta:
            yield delta
    tail = detok.flush()
    if tail:
        yield tail
