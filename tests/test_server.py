"""qwen3-jax-serve on 127.0.0.1, driven by clients this project did not write: the `openai` package and npm's `ai`
with `@ai-sdk/openai-compatible` (tests/node). Three servers, started once for the module:

- "table": a table model with the real Qwen tokenizer whose greedy output is fixed. After a thinking-mode
  prompt it writes `<think>Need the weather</think>Checking.<tool_call>{...}</tool_call>` with the closing tags
  spelled by several tokens; after a non-thinking prompt "Hello there! 🤖".
- "rand": a random tiny MoE with the Qwen tokenizer, 8 rows, the test MCP server (tests/mcp_weather.py): the
  64-stream load test, constrained decoding, tool_choice, MCP.
- "ids": a checkpoint without tokenizer files, one row, --api-key: the token-id contract, auth, disconnect,
  SIGTERM (last).

Plus qwen3-jax-chat --mcp, and the 429 of a full queue on an in-process app whose scheduler never runs.
"""

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from flax import nnx

import qwen3_jax
from qwen3_jax import Qwen3Config, Qwen3ForCausalLM
from qwen3_jax.infer import SamplingParams, Tokenizer, generate
from tests.test_generate import chain, distinct_tokens, table_model

GREEDY = SamplingParams(temperature=0.0)
HERE = Path(__file__).parent
BIN = Path(sys.executable).parent
KEY = "sekrit"
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
ENUM_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}]
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


def _tiny(vocab, context, **kw):
    return Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4,
                       num_experts_per_tok=2, max_position_embeddings=context, torch_dtype="float32", **kw)


class Server:
    """A qwen3-jax-serve process on a free port of 127.0.0.1 (log in a file; stopped by the fixture)."""

    def __init__(self, log: Path, *args, env=None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        environ = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **(env or {})}
        environ.pop("QWEN3_JAX_API_KEY", None)
        self.proc = subprocess.Popen([str(BIN / "qwen3-jax-serve"), "--port", str(self.port), *map(str, args)],
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT, env=environ)

    def wait_ready(self, timeout=600):
        end = time.monotonic() + timeout  # a hang guard, not a margin
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited ({self.proc.returncode}):\n{self.log.read_text()[-4000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        pytest.fail("the server did not become ready")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def metric(self, name: str) -> float:
        """The sum of a metric's series (name, or name{labels} for one series)."""
        total = 0.0
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            key, _, value = line.rpartition(" ")
            if not line.startswith("#") and (key == name or key.startswith(name + "{")):
                total += float(value)
        return total


# ------------------------------------------------------------------------------------------------ the models
@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.build_qwen(cache_dir=tmp_path_factory.mktemp("qwen_tok"))


@pytest.fixture(scope="module")
def table(tok, tmp_path_factory):
    """(checkpoint dir, thinking-chain ids, plain-chain ids)."""
    byte_tokens = {}
    for i in range(tok.vocab_size):
        b = tok.token_bytes(i)
        if 0 < len(b) <= 6 and b not in byte_tokens:
            byte_tokens[b] = i
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    think_start = tok.apply_chat_template(USER, add_generation_prompt=True, enable_thinking=True)[-1]
    plain_start = tok.apply_chat_template(USER, add_generation_prompt=True, enable_thinking=False)[-1]
    assert think_start != plain_start
    used = {eos, think_start, plain_start}
    # every tag is spelled by several tokens, some shared with the text around it (">C", ".<", ">{")
    thinking = distinct_tokens(tok, byte_tokens, ["<think>", "Need the weather</think>Checking.<tool_call>"
                                                  + json.dumps(CALL, separators=(",", ":")) + "</tool_call>"], used)
    assert not {tok.convert_tokens_to_ids(t) for t in ("</think>", "<tool_call>", "</tool_call>")} & set(thinking)
    plain = distinct_tokens(tok, byte_tokens, ["Hello there! 🤖"], used)
    t = chain([think_start] + thinking, last=eos)
    t.update(chain([plain_start] + plain, last=eos))
    path = tmp_path_factory.mktemp("table_model")
    qwen3_jax.save_pretrained(table_model(t, len(tok), max_len=1024), path)
    tok.save_pretrained(path)
    return path, thinking, plain


@pytest.fixture(scope="module")
def rand_dir(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("rand_model")
    qwen3_jax.save_pretrained(Qwen3ForCausalLM(_tiny(151936, 512), rngs=nnx.Rngs(3)), path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ids_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ids_model")
    qwen3_jax.save_pretrained(Qwen3ForCausalLM(_tiny(512, 4096, eos_token_id=None, bos_token_id=None),
                                               rngs=nnx.Rngs(0)), path)
    return path


@pytest.fixture(scope="module")
def weather_log(tmp_path_factory):
    return tmp_path_factory.mktemp("mcp") / "calls.txt"


@pytest.fixture(scope="module")
def servers(table, rand_dir, ids_dir, weather_log, tmp_path_factory):
    logs = tmp_path_factory.mktemp("server_logs")
    mcp = f"{sys.executable} {HERE / 'mcp_weather.py'}"
    started = {
        "table": Server(logs / "table.log", "--model", table[0], "--max-batch", 4, "--served-model-name", "table",
                        "--warmup-len", 16),
        "rand": Server(logs / "rand.log", "--model", rand_dir, "--served-model-name", "rand", "--max-batch", 8,
                       "--stream-interval", 4,
                       "--max-queue", 128, "--warmup-len", 16, "--mcp", mcp, env={"WEATHER_LOG": str(weather_log)}),
        "ids": Server(logs / "ids.log", "--model", ids_dir, "--max-batch", 1, "--api-key", KEY, "--warmup-len", 16),
    }
    try:
        yield {k: s.wait_ready() for k, s in started.items()}
    finally:
        for s in started.values():
            s.stop()


def _client(server, key="none", cls=openai.OpenAI):
    return cls(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=300)


def _extra(obj, name):
    return getattr(obj, name, None) if name in type(obj).model_fields else (obj.model_extra or {}).get(name)


# ------------------------------------------------------------------------------------------- openai, table model
def test_chat_reasoning_and_tool_call(servers, table, tok):
    srv, client = servers["table"], _client(servers["table"])
    r = client.chat.completions.create(model="table", messages=USER, tools=TOOLS, temperature=0)
    (choice,) = r.choices
    msg = choice.message
    assert _extra(msg, "reasoning_content") == _extra(msg, "reasoning") == "Need the weather"
    assert msg.content == "Checking." and choice.finish_reason == "tool_calls"
    (call,) = msg.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == CALL["arguments"]
    n_prompt = httpx.post(srv.url + "/tokenize", json={"messages": USER, "tools": TOOLS}).json()["count"]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, len(table[1]) + 1)  # + <|im_end|>
    assert r.model == "table" and r.object == "chat.completion"


def test_chat_stream_deltas_tool_calls_and_usage(servers, table):
    client = _client(servers["table"])
    chunks = list(client.chat.completions.create(model="table", messages=USER, tools=TOOLS, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == len(table[1]) + 1
    assert all(c.usage is None for c in body) and len({c.id for c in chunks}) == 1
    deltas = [c.choices[0].delta for c in body]
    reasoning = [(_extra(d, "reasoning_content"), _extra(d, "reasoning")) for d in deltas if _extra(d, "reasoning")]
    assert all(a == b for a, b in reasoning) and "".join(a for a, _ in reasoning) == "Need the weather"
    contents = [d.content for d in deltas if d.content]
    assert "".join(contents) == "Checking." and not any("<" in c for c in contents)  # split tags never leak
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    first, *rest = calls
    assert (first.index, first.type, first.function.name, first.function.arguments) == (0, "function", "get_weather", "")
    assert first.id.startswith("call_") and rest and all(tc.index == 0 and tc.id is None for tc in rest)
    assert json.loads("".join(tc.function.arguments for tc in rest)) == CALL["arguments"]
    assert [c.choices[0].finish_reason for c in body if c.choices[0].finish_reason] == ["tool_calls"]
    assert body[-1].choices[0].finish_reason == "tool_calls"


def test_chat_sse_wire_format(servers):
    """The contract: `data: {...}` chunks as in OpenAI's API, then `data: [DONE]`."""
    body = {"messages": USER, "stream": True, "temperature": 0, **NO_THINK}
    with httpx.stream("POST", servers["table"].url + "/v1/chat/completions", json=body, timeout=300) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "Hello there! 🤖"


def test_chat_thinking_off_stop_n_logprobs_length(servers, table, tok):
    client = _client(servers["table"])
    r = client.chat.completions.create(model="table", messages=USER, temperature=0, extra_body=NO_THINK)
    assert r.choices[0].message.content == "Hello there! 🤖" and _extra(r.choices[0].message, "reasoning_content") is None
    assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="table", messages=USER, temperature=0, stop=["there"], extra_body=NO_THINK)
    assert r.choices[0].message.content == "Hello " and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < len(table[2])
    r = client.chat.completions.create(model="table", messages=USER, temperature=0, n=2, seed=7, extra_body=NO_THINK)
    assert [c.index for c in r.choices] == [0, 1] and {c.message.content for c in r.choices} == {"Hello there! 🤖"}
    assert r.usage.completion_tokens == 2 * (len(table[2]) + 1)
    r = client.chat.completions.create(model="table", messages=USER, temperature=0, max_completion_tokens=3,
                                       logprobs=True, top_logprobs=3, extra_body=NO_THINK)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    lps = r.choices[0].logprobs.content
    assert [x.token for x in lps] == [tok.decode([t]) for t in table[2][:3]]
    want = 10 - math.log(math.exp(10) + len(tok) - 1)  # the table model: logit 10 on the next token, 0 on the rest
    for x, t in zip(lps, table[2]):
        assert x.logprob == pytest.approx(want, abs=1e-3) and bytes(x.bytes) == tok.token_bytes(t)
        assert len(x.top_logprobs) == 3 and x.top_logprobs[0].token == x.token
        assert x.top_logprobs[1].logprob == pytest.approx(want - 10, abs=1e-3)
    r = client.chat.completions.create(model="table", messages=USER, tools=TOOLS, temperature=0,
                                       extra_body={"include_reasoning": False})
    assert _extra(r.choices[0].message, "reasoning_content") is None and r.choices[0].message.content == "Checking."


def test_thinking_budget_and_tools_parsed_only_when_offered(servers, tok):
    client = _client(servers["table"])
    r = client.chat.completions.create(model="table", messages=USER, temperature=0,
                                       extra_body={"thinking_token_budget": 2})
    reasoning = _extra(r.choices[0].message, "reasoning_content")
    # two thinking tokens, then the forced "\n</think>\n\n", after which the model says hello
    assert reasoning and "Need the weather".startswith(reasoning) and reasoning != "Need the weather"
    assert r.choices[0].message.content == "Hello there! 🤖"
    for extra in ({}, {"tools": TOOLS, "tool_choice": "none"}):
        r = client.chat.completions.create(model="table", messages=USER, temperature=0, **extra)
        assert r.choices[0].message.content == "Checking.<tool_call>" + json.dumps(CALL, separators=(",", ":")) \
            + "</tool_call>"
        assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason == "stop"


def test_reasoning_fields_on_input_and_tokenize(servers, tok):
    url = servers["table"].url
    history = lambda key: [{"role": "user", "content": "a"},  # noqa: E731
                           {"role": "assistant", "content": "b", key: "SECRET PLAN"},
                           {"role": "user", "content": "c"}]
    a = httpx.post(url + "/tokenize", json={"messages": history("reasoning")}).json()
    b = httpx.post(url + "/tokenize", json={"messages": history("reasoning_content")}).json()
    assert a == b and a["count"] == len(a["tokens"]) and a["max_model_len"] == 1024
    assert "SECRET" not in tok.decode(a["tokens"])  # the Qwen3 template drops reasoning of earlier turns
    last = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning": "SECRET PLAN",
                                                "tool_calls": [{"id": "1", "type": "function", "function": CALL}]},
            {"role": "tool", "tool_call_id": "1", "content": "sunny"}]
    assert "SECRET PLAN" in tok.decode(httpx.post(url + "/tokenize", json={"messages": last}).json()["tokens"])
    assert httpx.post(url + "/detokenize", json={"tokens": a["tokens"]}).json()["prompt"] == tok.decode(a["tokens"])
    models = httpx.get(url + "/v1/models").json()
    assert models["data"][0]["id"] == "table" and models["object"] == "list"


@pytest.mark.parametrize("body,param", [
    ({"messages": USER, "temperature": -1}, "temperature"),
    ({"messages": []}, "messages"),
    ({}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": USER, "n": 0}, "n"),
    ({"messages": USER, "top_p": 2}, "top_p"),
    ({"messages": USER, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"messages": USER, "max_tokens": 5000}, "max_tokens"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"messages": USER, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"messages": USER, "tool_choice": "required"}, "tool_choice"),
    ({"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "objectx"}}}}, "response_format"),
    ({"messages": USER, "response_format": {"type": "xml"}}, "response_format.type"),
    ({"messages": USER, "stop": [""]}, "stop"),
    ({"messages": USER, "stop_token_ids": [10 ** 7]}, "stop_token_ids"),
    ({"messages": USER, "chat_template_kwargs": {"enable_thinking": "yes"}}, "chat_template_kwargs.enable_thinking"),
])
def test_bad_requests_answer_400_naming_the_field(servers, body, param):
    r = httpx.post(servers["table"].url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param.split(".")[0] in err["message"] and err["code"] == 400


def test_bad_json_and_completions_fields(servers):
    url = servers["table"].url
    r = httpx.post(url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = httpx.post(url + "/v1/completions", json={"prompt": [1, "a"]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("prompt")
    r = httpx.post(url + "/v1/completions", json={"prompt": "x", "logprobs": 21})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"


def _openai_error(r, status, param="?"):
    """The body is OpenAI's error object (not FastAPI's {"detail": ...}) with this status (and param)."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == status and body["error"]["message"]
    if param != "?":
        assert body["error"]["param"] == param, body
    return body["error"]


# ------------------------------------------------------------------------------- OpenAI conformance, as vLLM has it
def test_unknown_model_is_404_naming_it(servers):
    client = _client(servers["table"])
    for call in (lambda: client.chat.completions.create(model="gpt-4o", messages=USER, max_tokens=1),
                 lambda: client.completions.create(model="gpt-4o", prompt="hi", max_tokens=1)):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert "`gpt-4o`" in e.value.message and e.value.body["param"] == "model"
    r = httpx.post(servers["table"].url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 1, **NO_THINK})
    assert r.status_code == 200  # no model: the served one, as vLLM


@pytest.mark.parametrize("url,body,param", [
    ("/v1/chat/completions", {"messages": USER, "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"prompt": "hi", "stream": False, "stream_options": {"include_usage": True}},
     "stream_options"),
    ("/v1/chat/completions", {"messages": USER, "tool_choice": "auto"}, "tool_choice"),
    ("/v1/chat/completions", {"messages": USER, "tools": [], "tool_choice": "auto"}, "tool_choice"),
    ("/v1/chat/completions", {"messages": USER, "tools": [], "tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"messages": USER, "seed": 2 ** 63}, "seed"),
    ("/v1/completions", {"prompt": "hi", "seed": -(2 ** 63) - 1}, "seed"),
])
def test_vllm_rejects_these_too(servers, url, body, param):
    err = _openai_error(httpx.post(servers["table"].url + url, json=body, timeout=60), 400, param)
    assert err["type"] == "BadRequestError"


def test_accepted_edges(servers):
    client = _client(servers["table"])
    r = client.chat.completions.create(model="table", messages=USER, tool_choice="none", max_tokens=2, seed=2 ** 63 - 1,
                                       extra_body=NO_THINK)  # tool_choice "none" needs no tools; the int64 bounds pass
    assert r.choices[0].finish_reason == "length"
    r = client.completions.create(model="table", prompt="hi", max_tokens=1, seed=-(2 ** 63))
    assert len(r.choices) == 1


def test_no_empty_tool_calls_field(servers):
    url = servers["table"].url
    body = {"messages": USER, "temperature": 0, **NO_THINK}
    msg = httpx.post(url + "/v1/chat/completions", json=body, timeout=300).json()["choices"][0]["message"]
    assert msg["content"] == "Hello there! 🤖" and "tool_calls" not in msg  # OpenAI leaves the field out
    msg = httpx.post(url + "/v1/chat/completions", json={**body, "tools": TOOLS}, timeout=300).json()["choices"][0]
    assert "tool_calls" not in msg["message"]
    r = httpx.post(url + "/v1/chat/completions", json={"messages": USER, "tools": TOOLS, "temperature": 0}, timeout=300)
    assert [c["function"]["name"] for c in r.json()["choices"][0]["message"]["tool_calls"]] == ["get_weather"]


def test_completion_logprobs_hold_the_sampled_token_and_echo_the_prompt(servers, table, tok):
    """logprobs 0 still reports the sampled token in top_logprobs; echo + logprobs starts with the prompt's tokens,
    the first one's logprob null (vLLM, OpenAI)."""
    client = _client(servers["table"])
    want = 10 - math.log(math.exp(10) + len(tok) - 1)  # the table model: logit 10 on the next token, 0 on the rest
    think_start = tok.apply_chat_template(USER, add_generation_prompt=True, enable_thinking=True)[-1]
    chain_ids = table[1]
    prompt = [think_start] + chain_ids[:3]
    r = client.completions.create(model="table", prompt=prompt, max_tokens=2, temperature=0, logprobs=0)
    lp = r.choices[0].logprobs
    assert lp.tokens == [tok.decode([t]) for t in chain_ids[3:5]]
    assert lp.top_logprobs == [{t: x} for t, x in zip(lp.tokens, lp.token_logprobs)]
    assert lp.token_logprobs == pytest.approx([want, want], abs=1e-3)
    for stream in (False, True):
        r = client.completions.create(model="table", prompt=prompt, max_tokens=2, temperature=0, logprobs=2,
                                      echo=True, stream=stream)
        chunks = list(r) if stream else [r]
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
        lps = [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
        tops = [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.top_logprobs]
        offsets = [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.text_offset]
        ids = prompt + chain_ids[3:5]
        assert text == tok.decode(prompt) + tok.decode(chain_ids[3:5])
        assert tokens == [tok.decode([t]) for t in ids]
        assert lps[0] is None and tops[0] is None
        assert lps[1:] == pytest.approx([want] * 5, abs=1e-3)
        assert all(len(t) == 2 and t[tok.decode([i])] == pytest.approx(want, abs=1e-3) for t, i in zip(tops[1:], ids[1:]))
        assert offsets == [sum(len(x) for x in tokens[:j]) for j in range(len(tokens))]


def test_json_errors_are_openai_error_objects(servers):
    url = servers["table"].url
    err = _openai_error(httpx.post(url + "/v1/chat/completions", content=b'{"messages": [1,',
                                   headers={"content-type": "application/json"}), 400, None)
    assert "JSON" in err["message"]
    deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    err = _openai_error(httpx.post(url + "/v1/chat/completions", content=deep), 400)
    assert "deeper" in err["message"]
    for body in (b"[1, 2]", b"null", b'"text"', b"\xff\xfe{"):
        _openai_error(httpx.post(url + "/v1/chat/completions", content=body), 400)
    _openai_error(httpx.get(url + "/v1/nothing"), 404)
    _openai_error(httpx.get(url + "/v1/chat/completions"), 405)


# ------------------------------------------------------------------------------------------------ hardening
def test_request_chat_templates_are_refused_by_default(servers):
    url = servers["table"].url
    bomb = "{{ 'x' * 10 ** 10 }}"
    for path, body, param in (
            ("/tokenize", {"messages": USER, "chat_template_kwargs": {"chat_template": bomb}},
             "chat_template_kwargs.chat_template"),
            ("/tokenize", {"messages": USER, "chat_template": bomb}, "chat_template"),
            ("/v1/chat/completions", {"messages": USER, "chat_template": bomb}, "chat_template"),
            ("/v1/chat/completions", {"messages": USER, "chat_template_kwargs": {"chat_template": bomb}},
             "chat_template_kwargs.chat_template")):
        err = _openai_error(httpx.post(url + path, json=body, timeout=60), 400, param)
        assert "--trust-request-chat-template" in err["message"]


def _nested(depth):
    schema = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize("url,body,param", [
    ("/v1/chat/completions", {"messages": USER, "stop": ["x"] * 65}, "stop"),
    ("/v1/chat/completions", {"messages": USER, "stop": "x" * 1025}, "stop"),
    ("/v1/chat/completions", {"messages": USER, "tools": TOOLS * 129}, "tools"),
    ("/v1/chat/completions", {"messages": USER * 4097}, "messages"),
    ("/v1/completions", {"prompt": ["a"] * 1025}, "prompt"),
    ("/v1/completions", {"prompt": [[1]] * 1025}, "prompt"),
    ("/v1/chat/completions", {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": _nested(40)}}}, "response_format"),
    ("/tokenize", {"messages": USER, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": _nested(40)}}]}, "tools"),
])
def test_list_lengths_and_nesting_are_bounded(servers, url, body, param):
    err = _openai_error(httpx.post(servers["table"].url + url, json=body, timeout=60), 400)
    assert err["param"] == param or err["param"].startswith(param + "."), err


def _http(port, head: bytes, chunks=()) -> tuple[int, dict]:
    """A raw HTTP/1.1 request: send the head, then the chunks while the server reads them (it may answer and
    close first); returns (status, JSON body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(head)
        try:
            for c in chunks:
                s.sendall(c)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        top, _, rest = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in top.split(b"\r\n") if line.lower().startswith(b"content-length")))
        while len(rest) < length:
            rest += s.recv(65536)
        return int(top.split()[1]), json.loads(rest[:length])


def test_body_size_limit_answers_413_without_reading_the_body(servers):
    srv = servers["table"]
    # a declared body of 1 GB, of which nothing more than its first bytes is ever sent: the answer comes anyway
    status, body = _http(srv.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json"
                                   b"\r\nContent-Length: 1000000000\r\n\r\n{\"messages\": [")
    assert status == 413 and body["error"]["code"] == 413 and "--max-body-bytes" in body["error"]["message"]
    # no Content-Length (chunked): cut off once past the limit
    part = b"x" * 65536
    chunk = b"%x\r\n%s\r\n" % (len(part), part)
    status, body = _http(srv.port, b"POST /tokenize HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                                   b"Transfer-Encoding: chunked\r\n\r\n", [chunk] * 80)
    assert status == 413 and body["error"]["type"] == "RequestTooLargeError"


def test_health_answers_while_a_large_prompt_is_tokenized(servers, tok):
    """The tokenization runs in the worker pool: /health requests sent one after another keep being answered
    while the 3 MB prompt's /tokenize is still running (on the event loop they would all wait for it)."""
    url = servers["table"].url
    rng = np.random.default_rng(0)
    words = np.array(["hello", "world", "the", "quick", "brown", "fox", "Zürich", "🤖", "12345", "\n"])
    text = " ".join(rng.choice(words, 600_000))

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=600) as c:
            big = asyncio.ensure_future(c.post("/tokenize", json={"prompt": text}))
            answered = 0
            while not big.done():
                r = await c.get("/health")
                assert r.status_code == 200
                answered += not big.done()
            return answered, (await big).json()

    answered, body = asyncio.run(run())
    assert body["count"] == len(tok.encode(text))
    assert answered >= 3


def test_a_client_that_closes_mid_stream_frees_its_row(servers):
    """A raw socket that closes after the first chunk: the request is aborted and its row freed at once."""
    srv = servers["rand"]
    abort = 'qwen3_jax_request_success_total{finished_reason="abort"}'
    before = srv.metric(abort)
    body = json.dumps({"model": "rand", "prompt": [1, 2, 3], "max_tokens": 500, "temperature": 0,
                       "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=120) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: "
                  b"%d\r\n\r\n%s" % (len(body), body))
        data = b""
        while b"data: " not in data:
            data += s.recv(65536)
    end = time.monotonic() + 120  # a hang guard, not a margin
    while srv.metric(abort) < before + 1 or srv.metric("qwen3_jax_num_requests_running"):
        assert time.monotonic() < end, "the row was not freed"
        time.sleep(0.05)
    assert srv.metric(abort) == before + 1


def test_port_in_use_is_a_usage_error_before_the_model_loads(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # the model does not exist either: the port is checked first, before anything loads or compiles
        out = subprocess.run([str(BIN / "qwen3-jax-serve"), "--model", str(tmp_path / "nope"), "--port", str(port)],
                             capture_output=True, text=True, env=env, timeout=300)
    errors = [line for line in out.stderr.splitlines() if "qwen3-jax-serve: error:" in line]
    assert out.returncode == 2 and len(errors) == 1 and f"--port {port}" in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr


@pytest.fixture(scope="module")
def node_modules():
    """node, with tests/node's packages installed (.ci/run installs node, npm and them; a bare checkout with node
    installs the packages here). No node is a failure, not a skip: the AI SDK is one of the clients under test."""
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        pytest.fail("node and npm are needed for the AI SDK test: apt-get install nodejs npm (.ci/run does)")
    if not (HERE / "node" / "node_modules" / "ai").is_dir():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--prefix", str(HERE / "node")], check=True,
                       capture_output=True, timeout=600)
    return node


def test_ai_sdk_stream_text(servers, node_modules):
    srv = servers["table"]
    out = subprocess.run([node_modules, str(HERE / "node" / "stream_text.mjs"), srv.url + "/v1", "none", "table"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    t, p = got["thinking"], got["plain"]
    assert t["errors"] == [] and p["errors"] == []
    assert t["reasoning"] == "Need the weather" and t["text"] == "Checking."
    assert [(c["name"], c["input"]) for c in t["toolCalls"]] == [("get_weather", CALL["arguments"])]
    assert t["toolCalls"][0]["id"].startswith("call_") and t["finishReason"] == "tool-calls"
    assert {"reasoning-delta", "text-delta", "tool-call"} <= set(t["types"])
    assert p["text"] == "Hello there! 🤖" and p["reasoning"] == "" and p["finishReason"] == "stop"
    assert t["usage"]["outputTokens"] > 0


# ------------------------------------------------------------------------------------------ random model server
def test_load_64_streams_equal_sequential_greedy(servers, rand_dir, tok):
    srv = servers["rand"]
    model = qwen3_jax.from_pretrained(rand_dir)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 150000, int(rng.integers(1, 13))).tolist() for _ in range(64)]
    news = [int(rng.integers(4, 17)) for _ in range(64)]
    calls0, done0 = srv.metric("qwen3_jax_decode_calls"), srv.metric("qwen3_jax_request_success_total")

    async def one(client, p, n):
        ids, text, finishes = [], "", []
        stream = await client.completions.create(model="rand", prompt=p, max_tokens=n, temperature=0, stream=True)
        async for chunk in stream:
            c = chunk.choices[0]
            ids += _extra(c, "token_ids") or []
            text += c.text
            if c.finish_reason:
                finishes.append(c.finish_reason)
        return ids, text, finishes

    async def run():
        async with _client(srv, cls=openai.AsyncOpenAI) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, p, n) for p, n in zip(prompts, news))), 600)

    results = asyncio.run(run())
    for (ids, text, finishes), p, n in zip(results, prompts, news):
        (ref,) = generate(model, [p], GREEDY, n, tokenizer=tok, batch_size=1)
        assert ids == ref.token_ids and text == ref.text and finishes == [ref.finish_reason]
    assert srv.metric("qwen3_jax_request_success_total") - done0 == 64  # none lost, none answered twice
    # one row at a time would need a call for each first token and one per 4 tokens after it
    one_by_one = sum(1 + -(-(len(r[0]) - 1) // 4) for r in results)
    assert srv.metric("qwen3_jax_decode_calls") - calls0 < one_by_one / 2


def test_seeded_sampling_and_penalties_equal_generate(servers, rand_dir, tok):
    """Sampling settings reach the engine as sent: choice k of a seeded request samples with seed + k, and its
    tokens equal generate() with the same settings (sampling keys are per row, so batching does not change them)."""
    model = qwen3_jax.from_pretrained(rand_dir)
    sampling = dict(temperature=1.3, top_p=0.9, top_k=50, min_p=0.01, presence_penalty=0.5, frequency_penalty=0.3,
                    repetition_penalty=1.2)
    prompt = [11, 2000, 35000, 7]
    r = _client(servers["rand"]).completions.create(model="rand", prompt=prompt, max_tokens=12, n=2, seed=123,
                                                    extra_body={k: v for k, v in sampling.items()
                                                                if k in ("top_k", "min_p", "repetition_penalty")},
                                                    **{k: v for k, v in sampling.items()
                                                       if k not in ("top_k", "min_p", "repetition_penalty")})
    got = [_extra(c, "token_ids") for c in r.choices]
    want = [generate(model, [prompt], SamplingParams(**sampling, seed=123 + k), 12, tokenizer=tok)[0].token_ids
            for k in range(2)]
    assert got == want and got[0] != got[1]


def test_metrics(servers):
    text = httpx.get(servers["rand"].url + "/metrics").text
    for name in ("qwen3_jax_requests_total", "qwen3_jax_prompt_tokens_total", "qwen3_jax_generation_tokens_total",
                 "qwen3_jax_num_requests_running", "qwen3_jax_num_requests_waiting",
                 "qwen3_jax_time_to_first_token_seconds_bucket", "qwen3_jax_inter_token_latency_seconds_bucket"):
        assert name in text
    assert servers["rand"].metric("qwen3_jax_time_to_first_token_seconds_count") >= 1


def test_json_schema_response_format(servers):
    client = _client(servers["rand"])
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "sure": {"type": "boolean"}},
              "required": ["answer", "sure"], "additionalProperties": False}
    r = client.chat.completions.create(
        model="rand", messages=USER, temperature=0, max_tokens=200, extra_body=NO_THINK,
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}})
    assert r.choices[0].finish_reason == "stop"
    obj = json.loads(r.choices[0].message.content)
    assert set(obj) == {"answer", "sure"} and obj["answer"] in ("yes", "no") and isinstance(obj["sure"], bool)
    # json_object: the random model writes endless keys, so only the opening is checked here (the grammar itself:
    # tests/test_serve_core.py::test_constraints_follow_schema_tools_and_reasoning)
    plain = client.chat.completions.create(model="rand", messages=USER, temperature=0, max_tokens=8, extra_body=NO_THINK)
    r = client.chat.completions.create(model="rand", messages=USER, temperature=0, max_tokens=8, extra_body=NO_THINK,
                                       response_format={"type": "json_object"})
    assert r.choices[0].message.content.lstrip().startswith("{") and not plain.choices[0].message.content.startswith("{")


def test_tool_choice_named_and_required(servers):
    client = _client(servers["rand"])
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model="rand", messages=USER, temperature=0, max_tokens=200, tools=ENUM_TOOLS,
                                       tool_choice=named, parallel_tool_calls=False, extra_body=NO_THINK)
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
    chunks = list(client.chat.completions.create(model="rand", messages=USER, temperature=0, max_tokens=200,
                                                 tools=ENUM_TOOLS, tool_choice="required", stream=True,
                                                 parallel_tool_calls=False, extra_body=NO_THINK))
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].id and calls[0].function.name in ("get_weather", "add")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    args = json.loads("".join(tc.function.arguments for tc in calls))
    assert args.get("city") in ("Paris", "Rome") or isinstance(args.get("a"), int)


def test_forced_tool_call_cut_by_max_tokens_leaks_no_tag(servers):
    """The grammar writes `<tool_call>\n{"name": ...` from the first token: cut after a few tokens, nothing of it
    may reach the content (OpenAI: no content beside a forced call)."""
    url = servers["rand"].url
    body = {"model": "rand", "messages": USER, "temperature": 0, "max_tokens": 3, "tools": ENUM_TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, **NO_THINK}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300).json()["choices"][0]
    assert r["finish_reason"] == "length" and not r["message"]["content"] and "tool_calls" not in r["message"]
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=300) as s:
        text = "".join(s.iter_text())
    assert "<tool" not in text and '"finish_reason":"length"' in text


def test_server_runs_mcp_tools(servers, weather_log):
    srv = servers["rand"]
    before = weather_log.read_text().splitlines() if weather_log.exists() else []
    r = _client(srv).chat.completions.create(model="rand", messages=USER, temperature=0, max_tokens=120,
                                             tool_choice="required", parallel_tool_calls=False, extra_body=NO_THINK)
    after = weather_log.read_text().splitlines()
    assert len(after) == len(before) + 1 and after[-1] in ("Paris", "Rome")  # the MCP server ran the call
    assert r.choices[0].finish_reason in ("stop", "length") and not r.choices[0].message.tool_calls
    # two rounds: the second prompt holds the first plus the call and its result
    first = httpx.post(srv.url + "/tokenize", json={"messages": USER, **NO_THINK}).json()["count"]
    assert r.usage.prompt_tokens > 2 * first


def test_chat_cli_runs_mcp_tools(rand_dir, tmp_path):
    log = tmp_path / "calls.txt"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "WEATHER_LOG": str(log)}
    out = subprocess.run([str(BIN / "qwen3-jax-chat"), "--model", str(rand_dir), "--mcp",
                          f"{sys.executable} {HERE / 'mcp_weather.py'}", "--tool-choice", "get_weather",
                          "--no-thinking", "--temperature", "0", "--max-new-tokens", "120"],
                         input="What is the weather in Paris?\n", capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (city,) = log.read_text().split()
    assert f'[tool get_weather {{"city": "{city}"}}] -> sunny in {city}' in out.stdout
    bad = subprocess.run([str(BIN / "qwen3-jax-chat"), "--model", str(rand_dir), "--mcp",
                          f"{sys.executable} {HERE / 'mcp_weather.py'}", "--tool-choice", "nope"],
                         input="", capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode == 2 and "--tool-choice nope: no such tool" in bad.stderr


def test_setup_errors_are_one_line(ids_dir, tmp_path):
    """A bad checkpoint or an --mcp command that is no MCP server: `qwen3-jax-serve: error: ...`, exit 2, before
    anything serves (the MCP servers start before the model loads)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    for args, words in (([ "--model", str(tmp_path / "nope")], "--model"),
                        (["--model", str(ids_dir), "--mcp", f"{sys.executable} -c pass"], "--mcp"),
                        (["--model", str(ids_dir), "--warmup-len", "0"], "--warmup-len")):
        out = subprocess.run([str(BIN / "qwen3-jax-serve"), *args], capture_output=True, text=True, env=env,
                             timeout=300)
        errors = [line for line in out.stderr.splitlines() if "qwen3-jax-serve: error:" in line]
        assert out.returncode == 2 and len(errors) == 1 and words in errors[0], out.stderr[-2000:]
        assert "Traceback" not in out.stderr


def _inproc(model, tokenizer=None, *, max_batch=1, max_len=64, max_queue=2, **app_kw):
    """(service, app): an in-process app (its scheduler not started: start_service False) for httpx's ASGI
    transport."""
    from qwen3_jax.infer.loading import SamplingDefaults
    from qwen3_jax.infer.server import Defaults, Metrics, create_app
    from qwen3_jax.infer.serving import EngineService

    holder = {}
    service = EngineService(model, tokenizer, max_batch=max_batch, max_len=max_len, max_queue=max_queue,
                            metrics=Metrics(lambda: holder["s"].scheduler))
    holder["s"] = service
    defaults = Defaults(SamplingDefaults("/nonexistent", argparse.Namespace(**{k: None for k in (
        "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")})))
    return service, create_app(service, served_model_name="m", defaults=defaults, start_service=False, **app_kw)


def _asgi(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=300)


def test_queue_full_answers_429():
    """An app whose scheduler never runs: submitted requests stay queued, so the bound is reached exactly."""
    model = Qwen3ForCausalLM(_tiny(512, 64, eos_token_id=None), rngs=nnx.Rngs(0))
    service, app = _inproc(model)

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            body = {"prompt": [1, 2], "max_tokens": 4}
            waiting = [asyncio.ensure_future(c.post("/v1/completions", json=body)) for _ in range(2)]
            while service.scheduler.num_waiting < 2:
                await asyncio.sleep(0.01)
            r = await c.post("/v1/completions", json=body)
            for w in waiting:
                w.cancel()
            return r

    r = asyncio.run(run())
    assert r.status_code == 429 and r.json()["error"]["type"] == "RateLimitError"


# ------------------------------------------------------------------------------------- tokenizer-less, auth, ...
def test_contract_token_ids_without_tokenizer(servers, ids_dir):
    srv = servers["ids"]
    model = qwen3_jax.from_pretrained(ids_dir)
    body = {"model": str(ids_dir), "prompt": [5, 17, 300, 2], "max_tokens": 7, "temperature": 0}
    r = httpx.post(srv.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=300)
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    assert choice["token_ids"] == generate(model, [body["prompt"]], GREEDY, 7, [])[0].token_ids
    assert choice["text"] == "" and choice["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 7
    client = _client(srv, KEY)
    c = client.completions.create(model=ids_dir.name, prompt=[[1, 2], [3]], max_tokens=3, temperature=0, n=2, seed=1)
    assert [x.index for x in c.choices] == [0, 1, 2, 3] and c.usage.prompt_tokens == 3
    for name, body in (("prompt", {"prompt": "text needs a tokenizer"}), ("messages", None)):
        url = "/v1/completions" if body else "/v1/chat/completions"
        r = httpx.post(srv.url + url, json=body or {"messages": USER}, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 400 and r.json()["error"]["param"] == name and "tokenizer" in r.json()["error"]["message"]


def test_auth(servers, ids_dir):
    srv = servers["ids"]
    body = {"prompt": [1], "max_tokens": 1}
    assert httpx.post(srv.url + "/v1/completions", json=body).status_code == 401
    assert httpx.post(srv.url + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(srv.url + "/v1/models").status_code == 401
    assert httpx.get(srv.url + "/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        _client(srv, "wrong").models.list()
    # --served-model-name defaults to the model directory's name; no path is shown
    models = httpx.get(srv.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert _client(srv, KEY).models.list().data[0].id == ids_dir.name and str(ids_dir.parent) not in json.dumps(models)


def test_disconnect_frees_the_row(servers):
    """One row: if a stream that went away kept its row, the next request would wait for its 4000 tokens."""
    srv = servers["ids"]
    auth = {"Authorization": f"Bearer {KEY}"}
    before = srv.metric("qwen3_jax_generation_tokens_total")
    with httpx.stream("POST", srv.url + "/v1/completions", headers=auth, timeout=300,
                      json={"prompt": [1, 2, 3], "max_tokens": 4000, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200
        next(line for line in r.iter_lines() if line.startswith("data: "))
    r = httpx.post(srv.url + "/v1/completions", headers=auth, timeout=300,
                   json={"prompt": [4], "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) == 5
    assert srv.metric("qwen3_jax_generation_tokens_total") - before < 4000
    assert srv.metric('qwen3_jax_request_success_total{finished_reason="abort"}') == 1


def test_sigterm_drains_requests_in_flight(servers):
    """Last test of the module: it stops the "ids" server."""
    srv = servers["ids"]
    auth = {"Authorization": f"Bearer {KEY}"}
    ids, finish, done = [], [], False
    with httpx.stream("POST", srv.url + "/v1/completions", headers=auth, timeout=300,
                      json={"prompt": [7, 8], "max_tokens": 2000, "temperature": 0, "stream": True}) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                ids += json.loads(line[6:])["choices"][0]["token_ids"]
                break
        srv.proc.send_signal(signal.SIGTERM)
        for line in lines:
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                c = json.loads(line[6:])["choices"][0]
                ids += c["token_ids"]
                finish += [c["finish_reason"]] if c["finish_reason"] else []
    assert done and finish == ["length"] and len(ids) == 2000
    assert srv.proc.wait(120) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(srv.url + "/health", timeout=5)


# ------------------------------------------------------------------------------------------- in-process apps
def test_request_timeout_ends_what_the_engine_never_serves():
    """The scheduler never runs here (stuck engine): at the deadline the request ends anyway, 408 (or an error
    event in a stream), and its sequences are cancelled."""
    model = Qwen3ForCausalLM(_tiny(512, 64, eos_token_id=None), rngs=nnx.Rngs(0))
    service, app = _inproc(model, max_queue=8, request_timeout=0.5)

    async def run():
        async with _asgi(app) as c:
            full = await c.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 4})
            stream = await c.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 4, "stream": True})
            return full, stream

    full, stream = asyncio.run(run())
    assert _openai_error(full, 408)["type"] == "TimeoutError"
    lines = [json.loads(x[6:]) for x in stream.text.splitlines() if x.startswith("data: {")]
    assert stream.status_code == 200 and stream.text.rstrip().endswith("data: [DONE]")
    assert [c["choices"][0]["finish_reason"] for c in lines if c.get("choices")] == ["abort"]
    assert lines[-1]["error"]["code"] == 408 and "--request-timeout" in lines[-1]["error"]["message"]
    assert len(service.scheduler._cancelled) == 2  # both sequences cancelled (their rows would be freed)


def test_engine_errors_answer_500_without_internals_and_a_dead_engine_503():
    model = Qwen3ForCausalLM(_tiny(512, 64, eos_token_id=None), rngs=nnx.Rngs(0))
    service, app = _inproc(model, max_queue=8)
    real = service.scheduler.engine.decode_ex
    body = {"prompt": [1, 2], "max_tokens": 3, "temperature": 0}

    def fails(*a, **k):
        raise RuntimeError("/very/secret/site-packages/jax/x.py: device exploded")

    def dies(*a, **k):
        raise SystemExit("the scheduler thread is killed")

    async def run():
        out = {}
        async with _asgi(app) as c:
            out["health"] = (await c.get("/health")).status_code
            service.scheduler.engine.decode_ex = fails
            out["fails"] = await c.post("/v1/completions", json=body)
            out["fails_stream"] = (await c.post("/v1/completions", json={**body, "stream": True})).text
            service.scheduler.engine.decode_ex = real
            out["recovers"] = await c.post("/v1/completions", json=body)
            service.scheduler.engine.decode_ex = dies
            out["dies"] = await c.post("/v1/completions", json=body)
            out["dead_health"] = await c.get("/health")
            out["dead"] = await c.post("/v1/completions", json=body)
        return out

    service.start()
    try:
        out = asyncio.run(run())
    finally:
        service.stop()
    assert out["health"] == 200
    err = _openai_error(out["fails"], 500)
    assert "secret" not in out["fails"].text and "exploded" not in out["fails"].text and "server log" in err["message"]
    assert "secret" not in out["fails_stream"] and '"code":500' in out["fails_stream"]
    assert out["recovers"].status_code == 200 and len(out["recovers"].json()["choices"][0]["token_ids"]) == 3
    assert _openai_error(out["dies"], 500) and "killed" not in out["dies"].text
    assert _openai_error(out["dead_health"], 503)["type"] == "ServiceUnavailableError"
    assert _openai_error(out["dead"], 503)


def test_worker_pool_keeps_the_loop_free_bounded_and_timed():
    """Request bodies over 64 KB are parsed in the worker pool, like tokenization, templates and grammars. With
    its one worker held: /health still answers while a large request waits for the pool; the next one past
    max_pending is answered 429; with a timeout, a request the pool cannot serve in time gets 503."""
    import threading

    from qwen3_jax.infer.serving import WorkerPool

    model = Qwen3ForCausalLM(_tiny(512, 64, eos_token_id=None), rngs=nnx.Rngs(0))
    large = {"prompt": "x" * 70_000, "max_tokens": 0}  # parsed, then refused (max_tokens): 400 once parsed
    release = threading.Event()

    async def run(pool):
        service, app = _inproc(model, max_queue=4096, pool=pool)
        async with _asgi(app) as c:
            held = asyncio.ensure_future(pool.run(release.wait, timeout=300))
            while pool.pending < 1:
                await asyncio.sleep(0.01)
            waiting = asyncio.ensure_future(c.post("/v1/completions", json=large))
            while pool.pending < 2:
                await asyncio.sleep(0.01)
            health = await c.get("/health")  # 503: the scheduler is not started here, but answered at once
            busy = await c.post("/v1/completions", json=large)
            state = (waiting.done(), service.scheduler.num_waiting)
            release.set()
            await held
            r = await waiting
            return health, busy, state, r, service

    health, busy, state, r, service = asyncio.run(run(WorkerPool(workers=1, max_pending=2, timeout=300)))
    assert health.status_code == 503 and state == (False, 0)
    assert _openai_error(busy, 429)["type"] == "RateLimitError"
    assert _openai_error(r, 400, "max_tokens")  # parsed once the worker was free
    release.clear()

    async def timed(pool):
        service, app = _inproc(model, max_queue=4096, pool=pool)
        async with _asgi(app) as c:
            held = asyncio.ensure_future(pool.run(release.wait, timeout=300))
            while pool.pending < 1:
                await asyncio.sleep(0.01)
            r = await c.post("/v1/completions", json=large)
            release.set()
            await held
            return r

    assert "took longer" in _openai_error(asyncio.run(timed(WorkerPool(workers=1, timeout=0.2))), 503)["message"]


def test_trusted_request_chat_template(tok):
    model = Qwen3ForCausalLM(_tiny(151936, 64), rngs=nnx.Rngs(0))
    template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    body = {"messages": [{"role": "user", "content": "hi"}], "chat_template": template}

    async def run(trust):
        _, app = _inproc(model, tok, trust_request_chat_template=trust, api_key="k")
        async with _asgi(app) as c:
            no_key = await c.post("/tokenize", json=body)
            r = await c.post("/tokenize", json=body, headers={"Authorization": "Bearer k"})
            d = await c.post("/detokenize", json={"tokens": [1]})
            return no_key, r, d

    no_key, r, d = asyncio.run(run(True))
    assert _openai_error(no_key, 401) and _openai_error(d, 401)  # --api-key guards /tokenize and /detokenize too
    assert r.json()["tokens"] == tok.encode("<<hi>>", add_special_tokens=False)
    _, r, _ = asyncio.run(run(False))
    assert _openai_error(r, 400, "chat_template")
