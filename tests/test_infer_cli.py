"""qwen3-jax-infer (batch JSONL: line formats, overrides, resume, SIGKILL, bad lines) and qwen3-jax-chat (pipe)."""

import io
import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import pytest
from flax import nnx

import qwen3_jax
from qwen3_jax import Qwen3Config, Qwen3ForCausalLM
from qwen3_jax.infer import GenerationResult, SamplingParams, Tokenizer, generate
from qwen3_jax.infer import chat_cli, cli, loading

GREEDY = SamplingParams(temperature=0.0)
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": {
    "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}}]


def _tiny(vocab: int, context: int, **kw) -> Qwen3Config:
    return Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4,
                       num_experts_per_tok=2, max_position_embeddings=context, torch_dtype="float32", **kw)


@pytest.fixture(scope="module")
def ids_dir(tmp_path_factory):
    """A checkpoint without tokenizer files (vocab 512, context 64, no eos: rows run to max_new_tokens)."""
    path = tmp_path_factory.mktemp("ids_model")
    qwen3_jax.save_pretrained(Qwen3ForCausalLM(_tiny(512, 64, eos_token_id=None, bos_token_id=None),
                                               rngs=nnx.Rngs(0)), path)
    return path


@pytest.fixture(scope="module")
def ids_model(ids_dir):
    return qwen3_jax.from_pretrained(ids_dir)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """A tiny model with the real Qwen vocabulary and tokenizer files next to it (an untied lm_head: a tied random
    model repeats the last prompt token, "\\n\\n" after a chat prompt)."""
    path = tmp_path_factory.mktemp("qwen_model")
    qwen3_jax.save_pretrained(Qwen3ForCausalLM(_tiny(151936, 256), rngs=nnx.Rngs(3)), path)
    Tokenizer.build_qwen().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    return qwen3_jax.from_pretrained(qwen_dir), Tokenizer.from_pretrained(qwen_dir)


def _write_jsonl(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n" for x in lines))
    return path


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _by_id(records):
    return {r.get("custom_id", r.get("id")): r for r in records if "error" not in r or r["error"] is None}


def _run(model_dir, inp, out, *extra):
    return cli.main(["--model", str(model_dir), "--input", str(inp), "--output", str(out), "--dtype", "float32",
                     "--batch-size", "4", *extra])


# ---------------------------------------------------------------------------------------------------------------
# line parsing (no generation)


def test_line_parsing_overrides_and_precedence(qwen_dir):
    tok, cfg = Tokenizer.from_pretrained(qwen_dir), Qwen3Config.from_pretrained(qwen_dir)

    def parser(*flags):
        args = cli.batch_parser().parse_args(["--model", str(qwen_dir), "--input", "-", "--output", "-", *flags])
        return cli.LineParser(args, cfg, tok, loading.SamplingDefaults(qwen_dir, args))

    parse = parser("--sampling-top-k", "7", "--seed", "100", "--max-new-tokens", "9")
    job = parse(3, json.dumps({"id": "a", "prompt": "Hello world"}))
    r = job.request
    assert (job.line, job.id, r.prompt_ids, r.max_new_tokens) == (3, "a", [9707, 1879], 9)
    # no generation_config.json: Qwen3's recommendations for thinking, flags override, seed = --seed + line - 1
    assert (r.sampling.temperature, r.sampling.top_p, r.sampling.top_k, r.sampling.seed) == (0.6, 0.95, 7, 102)
    r = parse(1, json.dumps({"id": 1, "prompt_token_ids": [1, 2], "top_k": 3, "temperature": 0, "seed": 5,
                             "max_new_tokens": 2, "thinking_budget": 4, "stop_token_ids": [7]})).request
    assert (r.sampling.top_k, r.sampling.temperature, r.sampling.seed) == (3, 0, 5)  # the line wins
    assert (r.max_new_tokens, r.thinking_budget, r.stop_token_ids) == (2, 4, [7, 151645])  # eos stays a stop
    assert parse(1, '{"id": 1, "prompt_token_ids": [1], "max_new_tokens": 1000}').request.max_new_tokens == 255
    # non-thinking: the template closes an empty think block, Qwen3's non-thinking recommendations
    msgs = [{"role": "user", "content": "Hi"}]
    for line in ({"id": "m", "messages": msgs, "enable_thinking": False},
                 {"id": "m", "messages": msgs, "chat_template_kwargs": {"enable_thinking": False}},
                 {"custom_id": "m", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"messages": msgs, "chat_template_kwargs": {"enable_thinking": False}}}):
        r = parse(1, json.dumps(line)).request
        assert tok.decode(r.prompt_ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert (r.sampling.temperature, r.sampling.top_p, r.sampling.top_k) == (0.7, 0.8, 7)
    r = parser("--no-thinking")(1, json.dumps({"id": "m", "messages": msgs})).request
    assert tok.decode(r.prompt_ids).endswith("<think>\n\n</think>\n\n") and r.sampling.temperature == 0.7
    job = parse(2, json.dumps({"custom_id": "o", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": "m", "messages": msgs, "tools": TOOLS, "max_completion_tokens": 5, "temperature": 0.1}}))
    r = job.request
    assert (job.id, job.openai_model, r.max_new_tokens, r.sampling.temperature) == ("o", "m", 5, 0.1)
    assert '"name": "add"' in tok.decode(r.prompt_ids)
    # generation_config.json < flags < line
    (qwen_dir / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.5, "top_p": 0.9}))
    try:
        r = parser("--top-p", "0.7")(1, json.dumps({"id": "a", "prompt": "x", "min_p": 0.1})).request
        assert (r.sampling.temperature, r.sampling.top_p, r.sampling.top_k, r.sampling.min_p) == (0.5, 0.7, 20, 0.1)
        r = parser()(1, json.dumps({"id": "a", "prompt": "x", "temperature": 1.5})).request
        assert (r.sampling.temperature, r.sampling.top_p) == (1.5, 0.9)
    finally:
        (qwen_dir / "generation_config.json").unlink()

    bad = {
        "{not json": "invalid JSON",
        "[1, 2]": "expected a JSON object",
        '{"prompt": "x"}': 'missing "id"',
        '{"id": [1], "prompt": "x"}': "must be a string or an integer",
        '{"id": "a"}': "expected exactly one of",
        '{"id": "a", "prompt": "x", "prompt_token_ids": [1]}': "expected exactly one of",
        '{"id": "a", "prompt": "x", "max_tokens": 3}': "unknown field(s) ['max_tokens']",
        '{"id": "a", "prompt": "x", "max_new_tokens": 0}': '"max_new_tokens" must be an integer >= 1',
        '{"id": "a", "prompt": "x", "temperature": "hot"}': '"temperature" must be a number',
        '{"id": "a", "prompt": "x", "top_p": 0}': "sampling parameters: top_p must be in (0, 1]",
        '{"id": "a", "prompt_token_ids": [1, 151936]}': "outside the vocabulary",
        '{"id": "a", "prompt_token_ids": []}': "non-empty list of integers",
        '{"id": "a", "prompt": "x", "stop_token_ids": [151936]}': "stop_token_ids [151936]: not in [0, 151936)",
        '{"id": "a", "prompt": "x", "stop_token_ids": ' + str(list(range(16))) + '}':
            "stop_token_ids: at most 16 (eos included), got 17",
        '{"id": "a", "messages": "hi"}': '"messages" must be a non-empty list',
        '{"id": "a", "prompt": "' + "word " * 300 + '"}': "the context is 256 tokens",
        '{"custom_id": "c", "method": "POST", "url": "/v1/embeddings", "body": {}}': "OpenAI batch lines must be",
        '{"custom_id": "c", "url": "/v1/chat/completions", "body": {"messages": [], "stop": ["x"]}}': '"stop" strings',
        '{"custom_id": "c", "url": "/v1/chat/completions", "body": {"prompt": "x"}}': "unsupported body field",
    }
    for raw, reason in bad.items():
        with pytest.raises(cli.LineError) as e:
            parse(1, raw)
        assert reason in e.value.reason, (raw, e.value.reason)
    with pytest.raises(cli.LineError, match="the context is 4 tokens"):  # --max-len bounds the prompt too
        parser("--max-len", "4")(1, '{"id": 1, "prompt_token_ids": [1, 2, 3, 4]}')


def test_bad_arguments_exit_2(ids_dir, tmp_path, capsys):
    inp = _write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt_token_ids": [1]}])
    n = jax.device_count()
    for extra, why in ((["--mesh", "data=2,pipeline=2"], "expected e.g. data=4,expert=8"),
                       (["--mesh", f"data={n + 1}"], "devices"),
                       (["--mesh", f"expert={n}"] if n > 4 else (["--mesh", "data=0"]), "expert"),
                       (["--batch-size", "0"], "--batch-size"), (["--dtype", "float33"], "not a dtype"),
                       (["--tokenizer", str(tmp_path)], "no tokenizer.json")):
        with pytest.raises(SystemExit) as e:
            _run(ids_dir, inp, tmp_path / "out.jsonl", *extra)
        assert e.value.code == 2 and why in capsys.readouterr().err, extra
    assert not (tmp_path / "out.jsonl").exists()
    with pytest.raises(SystemExit):
        cli.main(["--model", str(tmp_path), "--input", str(inp), "--output", str(tmp_path / "o")])


def test_unloadable_tokenizer_and_input_are_one_line_exit_2(ids_dir, tmp_path, capsys):
    """A tokenizer.json that does not load (tokenizers raises a plain Exception) and an --input that is not UTF-8:
    one line, exit 2, no output file."""
    bad = tmp_path / "tok"
    bad.mkdir()
    (bad / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 3')
    inp = _write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt_token_ids": [1]}])
    out = tmp_path / "out.jsonl"
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b'{"id": 1, "prompt_token_ids": [1]}\n\xff\xfe\n')
    for args, why in (((inp, out, "--tokenizer", str(bad)), f"--tokenizer {bad}: cannot load tokenizer.json: "),
                      ((binary, out), f"--input {binary}: 'utf-8' codec can't decode")):
        with pytest.raises(SystemExit) as e:
            _run(ids_dir, *args)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err[-1].startswith("qwen3-jax-infer: error: " + why), err
    assert not out.exists()


def test_routing_flags_parse_both_syntaxes(capsys):
    parse = lambda *f: cli.batch_parser().parse_args(["--model", "m", "--input", "-", "--output", "o", *f])  # noqa: E731
    # --top-k is the router's (alias --router-top-k); the sampling top-k is --sampling-top-k
    a = parse("--top-k", "2", "--router-top-k", "3:1", "--top-k", "1@layer4", "--disable-experts", "5:3,17",
              "--disable-experts", "3,17@layer5", "--disable-experts", "*:0", "--force-experts", "2",
              "--router-temperature", "0:0.5", "--sampling-top-k", "20")
    assert a.routing_top_k == [(None, 2), (3, 1), (4, 1)] and a.top_k == 20
    assert a.disable_experts == [(5, [3, 17]), (5, [3, 17]), (None, [0])]
    assert a.force_experts == [(None, [2])] and a.router_temperature == [(0, 0.5)]
    for bad in (["--top-k", "x"], ["--router-top-k", "x"], ["--disable-experts", "5:"], ["--disable-experts", "-1:3"],
                ["--disable-experts", "3@layerx"], ["--router-temperature", "a:1"]):
        with pytest.raises(SystemExit) as e:
            parse(*bad)
        assert e.value.code == 2 and bad[0] in capsys.readouterr().err, bad


def test_output_records():
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    res = GenerationResult(token_ids=[5, 6, 7], text="<think>\nhm\n</think>\n\n<tool_call>...</tool_call>",
                           finish_reason="stop", reasoning_content="hm", content="", tool_calls=[call],
                           prompt_tokens=4, completion_tokens=3)
    plain = cli.result_record(cli.Job(1, "a", None), res)
    assert plain == {"id": "a", "text": res.text, "token_ids": [5, 6, 7], "finish_reason": "stop",
                     "reasoning_content": "hm", "content": "", "tool_calls": [call], "tool_call_errors": [],
                     "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}}
    oa = cli.result_record(cli.Job(1, "c", None, openai_model="m"), res)
    assert (oa["custom_id"], oa["error"], oa["response"]["status_code"]) == ("c", None, 200)
    body = oa["response"]["body"]
    assert body["choices"] == [{"index": 0, "logprobs": None, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "", "reasoning_content": "hm", "tool_calls": [call]}}]
    assert body["usage"] == plain["usage"] and body["model"] == "m" and body["object"] == "chat.completion"


# ---------------------------------------------------------------------------------------------------------------
# batch runs


def test_token_ids_without_tokenizer_equal_generate(ids_dir, ids_model, tmp_path, capsys):
    prompts = [[5, 6, 7], [100, 200, 300, 400, 500, 11, 12], [42], [9, 8, 7, 6, 5, 4, 3, 2, 1]]
    ref = generate(ids_model, prompts, sampling=GREEDY, max_new_tokens=6)
    stop = ref[3].token_ids[2]  # a stop id the greedy continuation of prompt 3 reaches
    lines = [{"id": f"p{i}", "prompt_token_ids": p} for i, p in enumerate(prompts)]
    lines[1]["max_new_tokens"] = 3
    lines[3]["stop_token_ids"] = [int(stop)]
    inp, out = _write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    assert _run(ids_dir, inp, out, "--temperature", "0", "--max-new-tokens", "6") == 0
    assert "req/s" in capsys.readouterr().err  # the progress bar
    got = _by_id(_read_jsonl(out))
    assert sorted(got) == ["p0", "p1", "p2", "p3"]
    for i in (0, 2):
        r = got[f"p{i}"]
        assert r["token_ids"] == list(ref[i].token_ids) and r["finish_reason"] == "length"
        assert r["text"] is None and r["content"] is None and r["reasoning_content"] is None
        assert r["usage"] == {"prompt_tokens": len(prompts[i]), "completion_tokens": 6,
                              "total_tokens": len(prompts[i]) + 6}
    assert got["p1"]["token_ids"] == list(ref[1].token_ids[:3]) and got["p1"]["finish_reason"] == "length"
    first_stop = list(ref[3].token_ids).index(stop)
    assert got["p3"]["token_ids"] == list(ref[3].token_ids[: first_stop + 1]) and got["p3"]["finish_reason"] == "stop"
    # the same on a device mesh (expert parallelism over the test session's simulated CPU devices)
    n = jax.device_count()
    e = math.gcd(n, 4)
    assert _run(ids_dir, inp, tmp_path / "mesh.jsonl", "--temperature", "0", "--max-new-tokens", "6",
                "--mesh", f"data={n // e},expert={e}", "--no-progress") == 0
    assert _by_id(_read_jsonl(tmp_path / "mesh.jsonl")) == got
    assert "req/s" not in capsys.readouterr().err


def test_text_messages_and_openai_batch_equal_generate(qwen_dir, qwen, tmp_path):
    model, tok = qwen
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3? 用中文"}]
    lines = [
        {"id": "raw", "prompt": "The capital of France is"},
        {"id": "chat", "messages": msgs, "tools": TOOLS},
        {"id": "nothink", "messages": msgs, "enable_thinking": False, "max_new_tokens": 3},
        {"custom_id": "oa", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "tiny", "messages": msgs, "max_tokens": 4, "temperature": 0}},
    ]
    prompts = [tok.encode(lines[0]["prompt"]),
               tok.apply_chat_template(msgs, tools=TOOLS, add_generation_prompt=True),
               tok.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False),
               tok.apply_chat_template(msgs, add_generation_prompt=True)]
    ref = generate(model, prompts, sampling=GREEDY, max_new_tokens=5, tokenizer=tok)
    inp, out = _write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    assert _run(qwen_dir, inp, out, "--temperature", "0", "--max-new-tokens", "5") == 0
    got = _by_id(_read_jsonl(out))
    for i, key in enumerate(["raw", "chat", "nothink"]):
        r, want = got[key], ref[i]
        n = 3 if key == "nothink" else 5
        assert r["token_ids"] == list(want.token_ids[:n]) and r["usage"]["prompt_tokens"] == len(prompts[i])
        if key != "nothink":
            assert (r["text"], r["content"]) == (want.text, want.content) and r["reasoning_content"] is None
            assert r["finish_reason"] == want.finish_reason and r["tool_calls"] == want.tool_calls
    oa = got["oa"]
    assert oa["id"].startswith("batch_req_") and oa["error"] is None and oa["response"]["status_code"] == 200
    body = oa["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["tool_calls"] == []
    assert choice["message"]["content"] == generate(model, [prompts[3]], sampling=GREEDY, max_new_tokens=4,
                                                    tokenizer=tok)[0].content
    assert body["usage"]["prompt_tokens"] == len(prompts[3]) and body["usage"]["completion_tokens"] <= 4
    assert body["usage"]["total_tokens"] == len(prompts[3]) + body["usage"]["completion_tokens"]


def test_resume_skips_done_ids_and_cuts_a_torn_line(ids_dir, tmp_path):
    lines = [{"id": i, "prompt_token_ids": [i + 1, 2 * i + 3]} for i in range(6)]
    inp, out = _write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    assert _run(ids_dir, inp, out, "--temperature", "0", "--max-new-tokens", "4") == 0
    full = out.read_text().splitlines(keepends=True)
    kept = "".join(full[:2])
    out.write_text(kept + full[2][:25])  # two results and a torn third one
    assert _run(ids_dir, inp, out, "--temperature", "0", "--max-new-tokens", "4") == 0
    text = out.read_text()
    assert text.startswith(kept)
    records = _read_jsonl(out)
    assert sorted(r["id"] for r in records) == list(range(6))
    assert _by_id(records) == _by_id(json.loads(line) for line in full)  # same greedy results
    assert _run(ids_dir, inp, out, "--temperature", "0", "--max-new-tokens", "4") == 0 and out.read_text() == text
    out.write_text(full[0] + "garbage\n" + full[1])  # a complete line that is not ours: stop, touch nothing
    with pytest.raises(SystemExit) as e:
        _run(ids_dir, inp, out)
    assert e.value.code == 2 and out.read_text() == full[0] + "garbage\n" + full[1]


def test_bad_lines_get_error_lines_and_exit_1(ids_dir, tmp_path):
    lines = [
        {"id": "ok1", "prompt_token_ids": [1, 2, 3]},
        "{broken json",
        {"id": "noprompt"},
        {"prompt_token_ids": [4]},
        {"id": "long", "prompt_token_ids": list(range(64))},  # context is 64
        {"id": "text", "prompt": "needs a tokenizer"},
        "",
        {"id": "ok1", "prompt_token_ids": [5]},  # duplicate
        {"id": "ok2", "prompt_token_ids": [6, 7]},
    ]
    inp, out = _write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    assert _run(ids_dir, inp, out, "--max-new-tokens", "2") == 1
    records = _read_jsonl(out)
    errors = {r["line"]: r for r in records if "line" in r}
    assert sorted(errors) == [2, 3, 4, 5, 6, 8]
    assert "invalid JSON" in errors[2]["error"] and "id" not in errors[2]
    assert errors[3]["id"] == "noprompt" and "expected exactly one of" in errors[3]["error"]
    assert 'missing "id"' in errors[4]["error"]
    assert errors[5]["id"] == "long" and "64 tokens" in errors[5]["error"]
    assert errors[6]["id"] == "text" and f"no tokenizer in {ids_dir}" in errors[6]["error"]
    assert errors[8]["id"] == "ok1" and "duplicate id" in errors[8]["error"] and "line 1" in errors[8]["error"]
    assert sorted(_by_id(records)) == ["ok1", "ok2"]
    assert all(len(r["token_ids"]) == 2 for r in _by_id(records).values())
    before = out.read_text()
    assert _run(ids_dir, inp, out, "--max-new-tokens", "2") == 1 and out.read_text() == before  # no duplicates
    # done lines are not validated again: ok1 (3 tokens) no longer fits --max-len 3 but keeps its result
    assert _run(ids_dir, inp, out, "--max-len", "3", "--max-new-tokens", "2") == 1 and out.read_text() == before


# ---------------------------------------------------------------------------------------------------------------
# subprocesses: SIGKILL mid-run, console script


def test_sigkill_then_rerun_completes_without_duplicates(tmp_path):
    # wider than the other models: ~1 ms a decode step on CPU, so the run outlasts the first line by ~1-2 s
    cfg = _tiny(512, 256, eos_token_id=None, bos_token_id=None).replace(
        hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64)
    qwen3_jax.save_pretrained(Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0)), tmp_path / "model")
    n = 32
    lines = [{"id": f"r{i}", "prompt_token_ids": [(7 * i) % 500 + 1] * (1 + i % 5)} for i in range(n)]
    inp, out = _write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    args = ["--model", str(tmp_path / "model"), "--input", str(inp), "--output", str(out), "--batch-size", "2",
            "--max-new-tokens", "64", "--temperature", "0", "--dtype", "float32"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.Popen([sys.executable, "-m", "qwen3_jax.infer.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    partial = out.read_bytes()
    done = partial.count(b"\n")
    assert 1 <= done < n, done
    res = subprocess.run(["qwen3-jax-infer", *args], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "tok/s" in res.stderr and "resuming:" in res.stderr  # the progress bar, the resume note
    records = _read_jsonl(out)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == n and set(ids) == {f"r{i}" for i in range(n)}
    assert all(len(r["token_ids"]) == 64 and r["finish_reason"] == "length" for r in records)


# ---------------------------------------------------------------------------------------------------------------
# qwen3-jax-chat


def test_reasoning_printer():
    def show(deltas):
        buf = io.StringIO()
        p = chat_cli.ReasoningPrinter(buf, color=False)
        for d in deltas:
            p.feed(d)
        p.close()
        return buf.getvalue()

    assert show(["<think>", "\n", "Let me", " see.", "\n", "</think>", "\n\n", "It is", " 5."]) == \
        "Thinking...\nLet me see.\n\n...done thinking.\n\nIt is 5.\n"
    assert show(["<think>\n\n</think>\n\n", "Hi", "!"]) == "Hi!\n"  # empty reasoning: nothing shown
    assert show(["Plain ", "answer\n"]) == "Plain answer\n\n"


def test_chat_over_a_pipe_keeps_history(qwen_dir, qwen, monkeypatch, capsys):
    model, tok = qwen
    deltas = []
    import qwen3_jax.infer as infer

    def spy(*a, **kw):
        for d in real(*a, **kw):
            deltas.append(d)
            yield d

    real = infer.stream
    monkeypatch.setattr(infer, "stream", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("/no_think\nHello there\n\nTell me more /no_think\n/reset\n"
                                                  "Hello there\n/exit\nnot read\n"))
    assert chat_cli.main(["--model", str(qwen_dir), "--dtype", "float32", "--temperature", "0",
                          "--max-new-tokens", "6", "--system", "Be brief."]) == 0
    shown = capsys.readouterr().out

    def answer(messages):
        return generate(model, [messages], sampling=GREEDY, max_new_tokens=6, tokenizer=tok,
                        enable_thinking=False)[0].content

    turn1 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    a1 = answer(turn1)
    a2 = answer(turn1 + [{"role": "assistant", "content": a1}, {"role": "user", "content": "Tell me more /no_think"}])
    assert a1.strip() and a2.strip()
    assert shown == f"[thinking mode off]\n{a1}\n{a2}\n[conversation reset]\n{a1}\n"
    assert len(deltas) > 3 and "".join(deltas).count(a1) >= 2  # streamed as deltas, /reset dropped the history


def test_chat_stop_token_ids_are_checked_before_the_model_loads(qwen_dir, capsys):
    with pytest.raises(SystemExit) as e:
        chat_cli.main(["--model", str(qwen_dir), "--stop-token-id", "151936"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["qwen3-jax-chat: error: --stop-token-id: stop_token_ids [151936]: not in [0, 151936)"]
