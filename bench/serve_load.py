"""Load test of qwen3-jax-serve: C concurrent clients over loopback (a bounded asyncio client of our own, httpx), a
mixed workload of sampled streams, and checks that nothing was lost, duplicated or answered 5xx.

    python bench/serve_load.py                       # 64 clients, 2 requests each, a small random MoE
    python bench/serve_load.py --clients 64 --requests 3 --max-batch 16
    python bench/serve_load.py --url http://127.0.0.1:8000 --model-name NAME   # a server already running

The model (unless --url): a random Qwen3-MoE (2 layers, hidden 128, 8 experts top-2, Qwen's 151,936-token vocabulary
and real tokenizer, fp32) served by `qwen3-jax-serve --max-batch B --stream-interval 8` in a child process.

Each client sends its requests one after another, so C requests are in flight at any time. Request i is one of
(Qwen3's sampling settings: temperature 0.6-0.7, top-p 0.95, top-k 20, a seed):

    chat           a streamed chat completion, thinking on or off
    chat+tools     tools offered, tool_choice "auto"
    tool_required  tool_choice "required" (grammar-constrained tool calls)
    json_schema    response_format json_schema (grammar-constrained)
    completion     a streamed completion of a text prompt, n=2
    full           a chat completion without streaming
    disconnect     a stream the client closes after its first content chunk

Checks (any failure: exit 1): every response is 200 (no 4xx/5xx); each stream ends with one `data: [DONE]`, each
choice has exactly one finish_reason, one id per stream, no error event; the usage chunk's token counts are
consistent; a json_schema choice that stopped parses and has the required keys, a tool_required choice has tool
calls with JSON arguments; after the run the server's counters (/metrics) show exactly one finished sequence per
choice sent (disconnects as "abort") and no running or waiting sequence left.

Reported: completion tokens per second over all clients (from the usage chunks; disconnected streams not counted),
requests per second, time to first token p50 / p99, by kind.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

KINDS = ["chat", "chat+tools", "tool_required", "json_schema", "completion", "full", "disconnect", "chat"]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"enum": ["Paris", "Rome", "Oslo"]}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
             "required": ["a", "b"]}}}]
SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "confidence": {"type": "integer"}},
          "required": ["answer", "confidence"], "additionalProperties": False}
QUESTIONS = ["What is the weather in Paris?", "Add 2 and 3.", "Is the sky blue?", "Tell me a story.",
             "Write a haiku about the sea.", "Why do cats purr?", "Name three prime numbers."]
LOAD_MODEL = dict(
    model_type="qwen3_moe", vocab_size=151936, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8,
    num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=2048, torch_dtype="float32",
)


def request(i: int, model: str, max_tokens: int):
    """(kind, path, body) of request i."""
    kind = KINDS[i % len(KINDS)]
    rng = np.random.default_rng(i)
    q = QUESTIONS[int(rng.integers(len(QUESTIONS)))]
    sampling = {"temperature": 0.6 if i % 2 else 0.7, "top_p": 0.95, "top_k": 20, "seed": i}
    think = {"chat_template_kwargs": {"enable_thinking": bool(i % 3 == 0)}}
    chat = {"model": model, "messages": [{"role": "user", "content": q}], "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}, **sampling}
    if kind == "chat":
        return kind, "/v1/chat/completions", {**chat, **think}
    if kind == "chat+tools":
        return kind, "/v1/chat/completions", {**chat, **think, "tools": TOOLS}
    if kind == "tool_required":
        return kind, "/v1/chat/completions", {**chat, "tools": TOOLS, "tool_choice": "required",
                                              "chat_template_kwargs": {"enable_thinking": False}}
    if kind == "json_schema":
        return kind, "/v1/chat/completions", {
            **chat, "chat_template_kwargs": {"enable_thinking": False},
            "response_format": {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}}}
    if kind == "completion":
        return kind, "/v1/completions", {"model": model, "prompt": q, "max_tokens": max_tokens, "n": 2,
                                         "stream": True, "stream_options": {"include_usage": True}, **sampling}
    if kind == "full":
        body = {k: v for k, v in chat.items() if k not in ("stream", "stream_options")}
        return kind, "/v1/chat/completions", {**body, **think}
    # long enough (and no eos) that it cannot finish before the client leaves: the server must abort it
    return kind, "/v1/chat/completions", {**chat, "max_tokens": 512, "ignore_eos": True, **think}


async def one(client, i, model, max_tokens, problems, stats):
    kind, path, body = request(i, model, max_tokens)
    n = body.get("n", 1)
    t0 = time.perf_counter()
    rec = {"kind": kind, "choices": n, "aborted": False, "tokens": 0, "ttft": None}

    def bad(msg):
        problems.append(f"request {i} ({kind}): {msg}")

    if not body.get("stream"):
        r = await client.post(path, json=body)
        if r.status_code != 200:
            bad(f"HTTP {r.status_code}: {r.text[:300]}")
            return rec
        out = r.json()
        rec["ttft"] = time.perf_counter() - t0
        if len(out["choices"]) != n or any(c["finish_reason"] is None for c in out["choices"]):
            bad(f"choices {out['choices']}")
        if "tool_calls" in out["choices"][0]["message"] and not out["choices"][0]["message"]["tool_calls"]:
            bad("an empty tool_calls field")
        rec["tokens"] = out["usage"]["completion_tokens"]
        stats.append(rec)
        return rec
    finishes, ids, done, usage = defaultdict(list), set(), 0, None
    content, calls = defaultdict(str), defaultdict(list)
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            bad(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
            return rec
        async for line in r.aiter_lines():
            if not line:
                continue
            if not line.startswith("data: "):
                bad(f"not an SSE data line: {line[:100]!r}")
                continue
            if line == "data: [DONE]":
                done += 1
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                bad(f"error event {chunk['error']}")
                continue
            ids.add(chunk["id"])
            if chunk.get("usage") and not chunk["choices"]:
                usage = chunk["usage"]
            for c in chunk["choices"]:
                k = c["index"]
                piece = c.get("text") or (c.get("delta") or {}).get("content") or ""
                content[k] += piece
                for tc in (c.get("delta") or {}).get("tool_calls") or []:
                    calls[k].append(tc)
                delta = c.get("delta") or {}
                if (piece or c.get("token_ids") or delta.get("reasoning_content") or delta.get("tool_calls")) \
                        and rec["ttft"] is None:
                    rec["ttft"] = time.perf_counter() - t0
                if c.get("finish_reason"):
                    finishes[k].append(c["finish_reason"])
            if kind == "disconnect" and rec["ttft"] is not None and not finishes:
                rec["aborted"] = True
                break  # the client goes away mid-stream
    if kind == "disconnect":
        if not rec["aborted"]:  # it finished before the client left: a complete stream, checked as one
            if done != 1:
                bad(f"{done} [DONE] lines")
        stats.append(rec)
        return rec
    if done != 1:
        bad(f"{done} [DONE] lines")
    if len(ids) != 1:
        bad(f"{len(ids)} ids in one stream")
    if sorted(finishes) != list(range(n)) or any(len(v) != 1 for v in finishes.values()):
        bad(f"finish reasons {dict(finishes)}")
    if usage is None:
        bad("no usage chunk")
    else:
        rec["tokens"] = usage["completion_tokens"]
        if not 0 < usage["completion_tokens"] <= n * body["max_tokens"]:
            bad(f"usage {usage}")
    if kind == "json_schema" and finishes[0] == ["stop"]:
        try:
            obj = json.loads(content[0])
            if set(obj) != {"answer", "confidence"}:
                bad(f"JSON keys {sorted(obj)}")
        except json.JSONDecodeError:
            bad(f"not JSON: {content[0][:200]!r}")
    if kind == "tool_required" and finishes[0] == ["tool_calls"]:
        args = "".join(tc["function"].get("arguments", "") for tc in calls[0])
        try:
            json.loads(args) if len([tc for tc in calls[0] if tc.get("id")]) == 1 else None
        except json.JSONDecodeError:
            bad(f"tool arguments not JSON: {args[:200]!r}")
        if content[0]:
            bad(f"content beside forced tool calls: {content[0][:100]!r}")
    stats.append(rec)
    return rec


def metric(text: str, name: str, label: str | None = None) -> float:
    total = 0.0
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if line.startswith("#") or not (key == name or key.startswith(name + "{")):
            continue
        if label is None or label in key:
            total += float(value)
    return total


async def run(url, model, clients, per_client, max_tokens, first=0):
    """Request first + k * per_client + j from client k; returns (wall seconds, stats, problems, clients that left)."""
    import httpx

    problems, stats = [], []
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=limits) as c:
        m0 = (await c.get("/metrics")).text

        async def client(k):
            for j in range(per_client):
                await one(c, first + k * per_client + j, model, max_tokens, problems, stats)

        t0 = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        wall = time.perf_counter() - t0
        end = time.monotonic() + 120  # the disconnected streams' rows are being freed
        while True:
            m1 = (await c.get("/metrics")).text
            left = metric(m1, "qwen3_jax_num_requests_running") + metric(m1, "qwen3_jax_num_requests_waiting")
            if not left or time.monotonic() > end:
                break
            await asyncio.sleep(0.1)
    if left:
        problems.append(f"{left:g} sequences still running or waiting after the run")
    sent = sum(r["choices"] for r in stats)
    finished = metric(m1, "qwen3_jax_request_success_total") - metric(m0, "qwen3_jax_request_success_total")
    aborts = (metric(m1, "qwen3_jax_request_success_total", 'finished_reason="abort"')
              - metric(m0, "qwen3_jax_request_success_total", 'finished_reason="abort"'))
    errors = (metric(m1, "qwen3_jax_request_success_total", 'finished_reason="error"')
              - metric(m0, "qwen3_jax_request_success_total", 'finished_reason="error"'))
    left_early = sum(r["aborted"] for r in stats)
    if len(stats) != clients * per_client:
        problems.append(f"{clients * per_client - len(stats)} requests did not complete")
    if finished != sent:
        problems.append(f"the server finished {finished:g} sequences; {sent} were sent")
    if aborts != left_early:
        problems.append(f"{aborts:g} aborted sequences on the server; {left_early} clients left mid-stream")
    if errors:
        problems.append(f"{errors:g} sequences ended in error")
    non2xx = [line for line in m1.splitlines() if line.startswith("qwen3_jax_requests_total{")
              and 'status="2' not in line and float(line.rpartition(" ")[2]) > metric(m0, line.rpartition(" ")[0])]
    if non2xx:
        problems.append(f"non-2xx answers: {non2xx}")
    return wall, stats, problems, left_early


def start_server(model_dir: str, max_batch: int, interval: int, log) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).parent / "qwen3-jax-serve"
    proc = subprocess.Popen([str(exe), "--model", model_dir, "--served-model-name", "load", "--port", str(port),
                             "--max-batch", str(max_batch), "--stream-interval", str(interval), "--max-queue", "1024",
                             "--warmup-len", "64", "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            log.seek(0)
            sys.exit(f"qwen3-jax-serve exited ({proc.returncode}):\n{log.read()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.5)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after another (default 2)")
    ap.add_argument("--max-tokens", type=int, default=24, help="max_tokens of each request (disconnects: 256)")
    ap.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch (default 16)")
    ap.add_argument("--stream-interval", type=int, default=8, help="the server's --stream-interval (default 8)")
    ap.add_argument("--url", help="a running qwen3-jax-serve (default: start one on a random small MoE)")
    ap.add_argument("--model-name", default="load", help="the served model name (with --url)")
    args = ap.parse_args()
    proc = None
    with tempfile.TemporaryDirectory() as d, tempfile.TemporaryFile("w+") as log:
        url, model = args.url, args.model_name
        if url is None:
            from flax import nnx

            import qwen3_jax
            from qwen3_jax import Qwen3Config, Qwen3ForCausalLM
            from qwen3_jax.infer import Tokenizer

            tok = Tokenizer.build_qwen(cache_dir=os.path.join(d, "tok"))
            qwen3_jax.save_pretrained(Qwen3ForCausalLM(Qwen3Config.from_dict(
                {**LOAD_MODEL, "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>")}), rngs=nnx.Rngs(0)), d)
            tok.save_pretrained(d)
            t0 = time.perf_counter()
            proc, url = start_server(d, args.max_batch, args.stream_interval, log)
            model = "load"
            print(f"server up in {time.perf_counter() - t0:.0f}s: --max-batch {args.max_batch} --stream-interval "
                  f"{args.stream_interval}; {os.cpu_count()} cores", flush=True)
        try:
            # unmeasured: one request of each kind at once (compiles the prefill buckets their prompts need)
            t0 = time.perf_counter()
            _, _, problems, _ = asyncio.run(run(url, model, len(KINDS), 1, args.max_tokens, first=10 ** 6))
            print(f"warm-up: {len(KINDS)} requests in {time.perf_counter() - t0:.0f}s"
                  + (f", problems: {problems}" if problems else ""), flush=True)
            wall, stats, problems2, left = asyncio.run(run(url, model, args.clients, args.requests, args.max_tokens))
            problems += problems2
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(120)
    tokens = sum(r["tokens"] for r in stats if not r["aborted"])
    ttft = [r["ttft"] for r in stats if r["ttft"] is not None]
    print(f"{len(stats)} requests from {args.clients} clients ({left} left mid-stream) in {wall:.1f}s: "
          f"{tokens / wall:.1f} completion tok/s, {len(stats) / wall:.2f} req/s, time to first token p50 "
          f"{np.percentile(ttft, 50):.2f}s p99 {np.percentile(ttft, 99):.2f}s")
    by = Counter(r["kind"] for r in stats)
    toks = Counter()
    for r in stats:
        toks[r["kind"]] += r["tokens"] if not r["aborted"] else 0
    print("  " + ", ".join(f"{k}: {by[k]} requests, {toks[k]} tokens" for k in sorted(by)))
    if problems:
        print(f"FAILED ({len(problems)} problems):")
        for p in problems[:50]:
            print("  " + p)
        sys.exit(1)
    print("ok: every request answered 200 and complete, one finish per choice, nothing lost or duplicated, no 5xx")


if __name__ == "__main__":
    main()
