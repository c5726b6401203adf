"""The server's core without HTTP: the streaming chat parser and stop strings (against the whole-text parsers),
the engine's logprobs / token masks / row release, the scheduler (continuous batching equals one-by-one,
cancel, queue bound) and the xgrammar constraints."""

import json
import random
import threading

import numpy as np
import pytest
from flax import nnx

from qwen3_jax import Qwen3Config, Qwen3ForCausalLM
from qwen3_jax.infer import SamplingParams, Tokenizer, generate, parse_tool_calls, split_reasoning
from qwen3_jax.infer.chat import ChatStreamParser, StopStrings
from qwen3_jax.infer.engine import TOP_LOGPROBS, Engine
from qwen3_jax.infer.generate import Request, row_params
from qwen3_jax.infer.scheduler import QueueFull, Scheduler, Sequence
from tests.test_generate import chain, table_model

GREEDY = SamplingParams(temperature=0.0)

CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
TEXTS = [
    ("<think>\nNeed the weather.\n</think>\n\nChecking.<tool_call>\n" + CALL + "\n</tool_call>", False),
    ("Plain answer with < and <tool but no call, 2 < 3.", False),
    ("<think>\n\n</think>\n\nHello", False),
    ("<think>unfinished\nreasoning\n\n", False),
    ('A <tool_call>{"name": "f", "arguments": {}}</tool_call> B <tool_call>{"name": "g", "arguments": "{\\"x\\": 1}"}'
     "</tool_call>\n", False),
    ('Sure.<tool_call>{"name": oops}</tool_call>', False),
    ('Ok <tool_call>{"name": "f"', False),
    ("\n\nthinking here\n</think>\n\nanswer <", True),
    # a tool call before </think> ends the reasoning (vLLM's Qwen3 parser); a mere mention of the tag does not
    ("<think>\nI will look it up.\n<tool_call>\n" + CALL + "\n</tool_call>", False),
    ("<think>\nthe <tool_call> tag, then\n</think>\n\nanswer", False),
]


def _chunkings(text, rng):
    yield [text]
    yield list(text)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 6))))
        yield [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


def _stream(parts, in_reasoning, tools):
    p = ChatStreamParser(in_reasoning=in_reasoning, tools=tools)
    items = [it for part in parts for it in p.feed(part)] + p.finish()
    return items, p


@pytest.mark.parametrize("text,in_reasoning", TEXTS)
@pytest.mark.parametrize("tools", [True, False])
def test_stream_parser_equals_whole_text_parsers(text, in_reasoning, tools):
    reasoning, content = split_reasoning(text)
    if tools:
        content, calls, errors = parse_tool_calls(content)
    else:
        calls, errors = [], []
    rng = random.Random(0)
    for parts in _chunkings(text, rng):
        items, p = _stream(parts, in_reasoning, tools)
        got_r = "".join(v for k, v in items if k == "reasoning") or None
        got_c = "".join(v for k, v in items if k == "content")
        got_calls = [v["function"] for k, v in items if k == "tool_call"]
        assert (got_r, got_c) == (reasoning, content), parts
        assert got_calls == [c["function"] for c in calls]
        assert [e["error"] for e in p.errors] == [e["error"] for e in errors]
        for k, v in items:  # no tag reaches the content (in pieces it would also break the equality above)
            if k == "content":
                assert "think>" not in v and ("tool_call>" not in v or "tool_call>" in content)


def test_stream_parser_calls_only_never_shows_text():
    """A forced tool_choice: the answer is tool calls; one cut short by max_tokens leaves nothing in the content."""
    full = "<tool_call>\n" + CALL + "\n</tool_call>"
    for cut in range(len(full) + 1):
        for parts in (list(full[:cut]), [full[:cut]]):
            p = ChatStreamParser(tools=True, calls_only=True)
            items = [it for part in parts for it in p.feed(part)] + p.finish()
            assert [k for k, _ in items if k == "content"] == []
            assert len([v for k, v in items if k == "tool_call"]) == (cut == len(full))
    p = ChatStreamParser(calls_only=True)
    items = p.feed("<think>\nhm\n</think>\n\n" + full[:7]) + p.finish()
    assert items == [("reasoning", "hm")] and p.errors == []


def test_stream_parser_ids_and_split_tags():
    items, _ = _stream(list("x<tool_call>" + CALL + "</tool_call>"), False, True)
    (call,) = [v for k, v in items if k == "tool_call"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert [v for k, v in items if k == "content"] == ["x"]


@pytest.mark.parametrize("stops,text,want", [
    (["the"], "Hello there", "Hello "),
    (["\n\n", "END"], "a\nb\n\nc", "a\nb"),
    (["xyz"], "no stop here x", "no stop here x"),
    (["aab"], "aaab", "a"),
])
def test_stop_strings_at_every_split(stops, text, want):
    for cut in range(len(text) + 1):
        s = StopStrings(stops)
        out = s.feed(text[:cut]) + s.feed(text[cut:]) + s.flush()
        assert out == want
        assert (s.hit is not None) == (want != text)
    s = StopStrings(stops)
    assert "".join(s.feed(c) for c in text) + s.flush() == want


def test_think_state_stop_ids_and_eos_are_one_rule_each():
    """The rules every path shares (batch CLI, chat, server, scheduler, generate): where a prompt leaves <think>,
    a request's stop ids, the eos ids."""
    from types import SimpleNamespace

    from qwen3_jax.infer.chat import think_state
    from qwen3_jax.infer.generate import MAX_STOP_IDS, eos_token_ids, stop_token_ids

    think = (5, 6)
    assert think_state([1, 5, 2], think) == "open"
    assert think_state([1, 5, 2, 6, 3], think) == "closed"
    assert think_state([1, 5, 6, 5, 2], think) == "open"      # a later block opened again
    assert think_state([6, 1], think) == "closed"
    assert think_state([1, 2], think) is None
    assert think_state([1, 5], None) is None
    assert stop_token_ids([9, 3, 9], eos_ids=[7]) == [3, 7, 9]
    assert stop_token_ids(None, eos_ids=[7], vocab_size=8) == [7]
    with pytest.raises(ValueError, match=r"stop_token_ids \[-1, 8\]: not in \[0, 8\)"):
        stop_token_ids([8, -1, 2], vocab_size=8)
    with pytest.raises(ValueError, match=f"stop_token_ids: at most {MAX_STOP_IDS} .eos included., got 17"):
        stop_token_ids(range(16), eos_ids=[100])
    assert len(stop_token_ids(range(15), eos_ids=[100, 14])) == MAX_STOP_IDS
    cfg = SimpleNamespace(eos_token_ids=[3, 99], vocab_size=50)
    assert eos_token_ids(cfg) == [3]                               # an id outside the vocabulary never stops
    assert eos_token_ids(cfg, SimpleNamespace(eos_token_id=7)) == [3, 7]
    assert eos_token_ids(cfg, SimpleNamespace(eos_token_id=None)) == [3]


# ------------------------------------------------------------------------------------------- engine extensions
def _prefill(engine, slots, prompts, rows, max_new=8, stops=()):
    row = row_params([Request(p, GREEDY, max_new, list(stops)) for p in prompts], 16, None)
    return engine.prefill(slots, prompts, rows, row)


def test_decode_ex_logprobs_mask_and_release():
    vocab = 40
    m = table_model(chain([10, 11, 12, 13, 14, 15, 16, 17]), vocab=vocab)
    eng = Engine(m, chunk=4)
    slots = _prefill(eng, eng.new_slots(2, 32, 16), [[10], [12]], [0, 1], max_new=16)
    out = eng.decode_ex(slots, 3, False, logprobs=True)
    assert out.tokens_bn.tolist() == [[11, 12, 13], [13, 14, 15]]
    want = 10 - np.log(np.exp(10) + vocab - 1)  # logit 10 on the next token, 0 on the others
    np.testing.assert_allclose(out.logprob_bn, want, rtol=1e-4)
    assert out.top_ids_bnk.shape == (2, 3, TOP_LOGPROBS) and out.top_ids_bnk[:, :, 0].tolist() == out.tokens_bn.tolist()
    np.testing.assert_allclose(out.top_logprobs_bnk[:, :, 1], -np.log(np.exp(10) + vocab - 1), rtol=1e-4)
    # a mask that allows only token 30 for row 0 (greedy would say 14) and everything for row 1
    mask = np.full((2, (vocab + 31) // 32), -1, np.int32)
    mask[0] = 0
    mask[0, 30 // 32] = np.int32(np.uint32(1 << (30 % 32)).view(np.int32))
    out = eng.decode_ex(out.slots, 1, False, mask_bw=mask)
    assert out.tokens_bn[:, 0].tolist() == [30, 16]
    with pytest.raises(ValueError, match="one step"):
        eng.decode_ex(out.slots, 2, False, mask_bw=mask)
    # with next_mask the host gives each later step's mask from the tokens just sampled: row 0 is walked through
    # 31, 32, 33 (one allowed token a step) while row 1 decodes its chain in the same call
    def only(tok):
        m = np.full((2, (vocab + 31) // 32), -1, np.int32)
        m[0] = 0
        m[0, tok // 32] = np.int32(np.uint32(1 << (tok % 32)).view(np.int32))
        return m

    seen = []

    def next_mask(tokens_b, active_b):
        seen.append((tokens_b.tolist(), active_b.tolist()))
        return only(int(tokens_b[0]) + 1)

    out = eng.decode_ex(out.slots, 3, False, mask_bw=only(31), next_mask=next_mask)
    assert out.tokens_bn[0].tolist() == [31, 32, 33] and out.tokens_bn[1, 0] == 17 and min(out.tokens_bn[1]) >= 0
    assert seen == [([31, out.tokens_bn[1, 0]], [True, True]), ([32, out.tokens_bn[1, 1]], [True, True]),
                    ([33, out.tokens_bn[1, 2]], [True, True])]
    # (mask, True) from the hook ends the call after that step
    out = eng.decode_ex(out.slots, 3, False, mask_bw=only(34), next_mask=lambda t, a: (only(35), True))
    assert out.tokens_bn[0].tolist() == [34]
    slots = eng.release(out.slots, [1])
    out = eng.decode_ex(slots, 2, False)
    assert out.tokens_bn[1].tolist() == [-1, -1] and out.tokens_bn[0, 0] >= 0
    assert eng.decode(out.slots, 2, False)[1].shape[0] == 2  # the plain decode still works


# ------------------------------------------------------------------------------------------------- scheduler
@pytest.fixture(scope="module")
def tiny():
    cfg = Qwen3Config(vocab_size=512, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4,
                      num_experts_per_tok=2, max_position_embeddings=128, torch_dtype="float32",
                      eos_token_id=None, bos_token_id=None)
    return Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(1))


def test_scheduler_batches_concurrent_submissions_like_one_by_one(tiny):
    rng = np.random.default_rng(0)
    lengths, news = [5, 1, 9, 3, 14, 2, 6, 11, 4, 7], [9, 4, 2, 12, 3, 8, 5, 6, 10, 1]
    prompts = [rng.integers(0, 512, n).tolist() for n in lengths]
    sched = Scheduler(tiny, max_batch=3, max_len=64, chunk=4)
    events = {i: [] for i in range(len(prompts))}
    done = threading.Semaphore(0)

    def emit(i):
        def f(ev):
            events[i].append(ev)
            if ev.finish_reason is not None:
                done.release()
        return f

    sched.start()
    try:
        threads = [threading.Thread(target=sched.submit, args=([Sequence(p, emit(i), GREEDY, n)],))
                   for i, (p, n) in enumerate(zip(prompts, news))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for _ in prompts:
            done.acquire()
    finally:
        sched.stop()
    for i, (p, n) in enumerate(zip(prompts, news)):
        toks = [t for ev in events[i] for t in ev.token_ids]
        assert [ev.finish_reason for ev in events[i]][-1] == "length"
        assert sum(ev.finish_reason is not None for ev in events[i]) == 1
        assert toks == generate(tiny, [p], GREEDY, n, [], batch_size=1)[0].token_ids
    assert sched.steps < sum(news)  # rows shared decode calls


def test_scheduler_cancel_frees_the_row_and_queue_bound(tiny):
    sched = Scheduler(tiny, max_batch=1, max_len=128, max_queue=2, chunk=4)
    got = {"long": [], "short": []}
    finished = {k: threading.Event() for k in got}

    def emit(name):
        def f(ev):
            got[name].append(ev)
            if ev.finish_reason is not None:
                finished[name].set()
        return f

    long = Sequence([1, 2, 3], emit("long"), GREEDY, 120)
    short = Sequence([4, 5], emit("short"), GREEDY, 3)
    sched.submit([long, short])
    with pytest.raises(QueueFull):
        sched.submit([Sequence([6], lambda ev: None, GREEDY, 1)])  # 2 waiting, --max-queue 2
    first = threading.Event()
    long.emit = lambda ev: (emit("long")(ev), first.set())
    sched.start()
    try:
        first.wait()
        sched.cancel(long)
        finished["short"].wait()
        finished["long"].wait()
    finally:
        sched.stop()
    assert got["long"][-1].finish_reason == "abort"
    assert sum(len(ev.token_ids) for ev in got["long"]) < 120  # stopped early: the row went to "short"
    assert [t for ev in got["short"] for t in ev.token_ids] == generate(tiny, [[4, 5]], GREEDY, 3, [])[0].token_ids


class _Walk:
    """A stand-in for constrain.Constraint: allows one token a step, start, start + 1, ..."""

    def __init__(self, start):
        self.next, self.accepted = start, []

    def fill(self, mask, row):
        mask[row] = 0
        mask[row, self.next // 32] = np.int32(np.uint32(1 << (self.next % 32)).view(np.int32))

    def accept(self, token):
        self.accepted.append(token)
        self.next += 1
        return True


class _Masks:
    def allocate_bitmask(self, batch):
        return np.full((batch, 512 // 32), -1, np.int32)


def test_constrained_and_new_rows_do_not_hold_the_batch_to_one_step_calls(tiny):
    """Every decode call runs the whole chunk: a new row's first token goes out from inside the call (after one
    step), alone in its event; a constrained row decodes whole chunks beside the others (its mask comes from the host
    after each step)."""
    sched = Scheduler(tiny, max_batch=4, max_len=64, chunk=4, grammars=_Masks())
    calls = []
    decode_ex = sched.engine.decode_ex
    sched.engine.decode_ex = lambda slots, n, *a, **k: (calls.append(n), decode_ex(slots, n, *a, **k))[1]
    events = {k: [] for k in "abc"}
    done, first = threading.Semaphore(0), threading.Event()

    def emit(k):
        def f(ev):
            events[k].append(ev)
            first.set()
            if ev.finish_reason is not None:
                done.release()
        return f

    walk = _Walk(100)
    a = Sequence([1, 2, 3], emit("a"), GREEDY, 30)
    sched.start()
    try:
        sched.submit([a])
        first.wait()
        sched.submit([Sequence([4, 5], emit("b"), GREEDY, 12, constraint=walk), Sequence([6], emit("c"), GREEDY, 10)])
        for _ in range(3):
            done.acquire()
    finally:
        sched.stop()
    toks = {k: [t for ev in evs for t in ev.token_ids] for k, evs in events.items()}
    assert toks["b"] == walk.accepted == list(range(100, 112))
    assert toks["a"] == generate(tiny, [[1, 2, 3]], GREEDY, 30, [], batch_size=1)[0].token_ids
    assert toks["c"] == generate(tiny, [[6]], GREEDY, 10, [], batch_size=1)[0].token_ids
    assert set(calls) == {4}, calls
    assert [len(events[k][0].token_ids) for k in "ac"] == [1, 1]  # the first token alone, at once


def test_scheduler_thread_death_ends_requests_and_refuses_new_ones(tiny):
    sched = Scheduler(tiny, max_batch=2, max_len=64, chunk=4)
    got, ended = [], threading.Event()

    def boom(*a, **k):
        raise SystemExit("killed")  # not an Exception: the decode-error handler does not catch it

    sched.engine.decode_ex = boom
    sched.start()
    sched.submit([Sequence([1, 2], lambda ev: (got.append(ev), ev.finish_reason and ended.set()), GREEDY, 5)])
    ended.wait()
    sched._thread.join()
    assert not sched.alive and "killed" in sched.death
    assert [ev.finish_reason for ev in got] == ["error"]
    from qwen3_jax.infer.scheduler import EngineDead

    with pytest.raises(EngineDead):
        sched.submit([Sequence([1], lambda ev: None, GREEDY, 1)])


def test_warmup_compiles_every_prefill_and_decode_that_serving_uses(tiny):
    """After EngineService.warmup(32), requests with prompts up to 32 tokens arriving in any grouping compile
    nothing on the scheduler thread (a compile there stalls every stream)."""
    from qwen3_jax.infer.serving import EngineService

    service = EngineService(tiny, None, max_batch=4, max_len=64, chunk=4)
    service.start()
    try:
        assert service.warmup(32) == 2 * 3 + 2  # length buckets 16, 32 x batch buckets 1, 2, 4; logprobs; a cancel
        fns = service.scheduler.engine.fns
        sizes = (fns.prefill._cache_size(), fns.decode._cache_size(), fns.release._cache_size())
        rng = np.random.default_rng(1)
        left = threading.Semaphore(0)
        groups = [[20, 31, 17], [5, 2], [32, 9, 1, 12], [3]]
        for i, group in enumerate(groups):
            seqs = [Sequence(rng.integers(0, 512, n).tolist(), lambda ev: ev.finish_reason and left.release(), GREEDY,
                             int(rng.integers(1, 12)), logprobs=(i == 1)) for n in group]
            service.scheduler.submit(seqs)
        cancel = Sequence([1, 2, 3], None, GREEDY, 50)  # cancelled in its row
        cancel.emit = lambda ev: (service.scheduler.cancel(cancel), ev.finish_reason and left.release())
        service.scheduler.submit([cancel])
        for _ in range(sum(map(len, groups)) + 1):
            left.acquire()
        assert (fns.prefill._cache_size(), fns.decode._cache_size(), fns.release._cache_size()) == sizes
        assert sizes[2] >= 1  # the release of a cancelled row is compiled too (the cache is shared by model)
    finally:
        service.stop()


# ----------------------------------------------------------------------------------------------- constraints
@pytest.fixture(scope="module")
def grammars(tmp_path_factory):
    from qwen3_jax.infer.constrain import Grammars

    tok = Tokenizer.build_qwen(cache_dir=tmp_path_factory.mktemp("qwen_tok"))
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    return tok, Grammars(tok, 151936, [eos]), eos


def _run(tok, constraint, text_ids):
    """Feed ids through the constraint; True when each was allowed by the mask before it."""
    mask = np.zeros((1, (151936 + 31) // 32), np.int32)
    for t in text_ids:
        constraint.fill(mask, 0)
        if not (int(mask[0, t // 32]) >> (t % 32)) & 1:
            return False
        assert constraint.accept(t)
    return True


def test_constraints_follow_schema_tools_and_reasoning(grammars):
    from qwen3_jax.infer.constrain import GrammarError, reasoning_mode

    tok, g, eos = grammars
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    assert _run(tok, g.response_format(schema), enc('{"ok": true}') + [eos])
    assert not _run(tok, g.response_format(schema), enc('{"ok": 1}'))
    assert not _run(tok, g.response_format(schema), enc("Sure! {"))
    assert _run(tok, g.response_format(None), enc('{"any": [1, 2]}') + [eos])   # json_object
    # thinking first ("auto"), then the JSON
    assert _run(tok, g.response_format(schema, "auto"), enc('<think>\nhm\n</think>\n\n{"ok": false}') + [eos])
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}}},
        {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    assert _run(tok, g.tool_calls(tools, "required"), enc(call) + [eos])
    assert not _run(tok, g.tool_calls(tools, "required"), enc("I will call"))
    assert not _run(tok, g.tool_calls(tools, "required"), enc(call.replace("Rome", "Oslo")))
    named = {"type": "function", "function": {"name": "add"}}
    assert not _run(tok, g.tool_calls(tools, named), enc(call))
    assert _run(tok, g.tool_calls(tools, named), enc('<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>'))
    one = g.tool_calls(tools, "required", parallel_tool_calls=False)
    assert _run(tok, one, enc(call)) and not _run(tok, one, enc("\n<tool_call>"))
    with pytest.raises(GrammarError) as e:
        g.response_format({"type": "objectx"})
    assert "objectx" in str(e.value) and ".cc" not in str(e.value)  # no source path of xgrammar's in the message
    think = (tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>"))
    assert reasoning_mode(enc("a") + [think[0]], think, True) == "enabled"
    assert reasoning_mode(enc("a") + [think[0], think[1]], think, True) == "disabled"
    assert reasoning_mode(enc("a"), think, True) == "auto" and reasoning_mode(enc("a"), think, False) == "disabled"


def test_grammar_cache_is_bounded(grammars):
    from qwen3_jax.infer.constrain import Grammars

    tok, _, eos = grammars
    g = Grammars(tok, 151936, [eos], cache_bytes=8 << 20)
    for i in range(6):  # ~3.5 MB each with this vocabulary
        g.response_format({"type": "object", "properties": {f"k{i}": {"type": "integer"}}, "required": [f"k{i}"]})
    assert g.compiler.cache_limit_bytes == 8 << 20 and 0 < g.compiler.get_cache_size_bytes() <= 8 << 20
