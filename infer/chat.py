"""Text helpers for Qwen3 chat output: reasoning split, tool-call parsing, incremental detokenization."""

from __future__ import annotations

import codecs
import json
import re
import uuid

THINK_START, THINK_END = "<think>", "</think>"
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"


def split_reasoning(text: str) -> tuple[str | None, str]:
    """Split generated text into (reasoning_content, content) on `<think>...</think>`.

    The opening `<think>` may be missing (the prompt ended with it). Without `</think>`, text that starts with
    `<think>` is unfinished reasoning (content ""), anything else is all content. Newlines around the reasoning and
    before the content are stripped, as Qwen3's chat template does; empty reasoning gives None."""
    if THINK_END in text:
        reasoning, _, content = text.partition(THINK_END)
        reasoning = reasoning.split(THINK_START)[-1]
    elif text.lstrip().startswith(THINK_START):
        reasoning, content = text.lstrip()[len(THINK_START) :], ""
    else:
        return None, text
    return reasoning.strip("\n") or None, content.lstrip("\n")


_TOOL_CALL_RE = re.compile(re.escape(TOOL_CALL_START) + r"(.*?)" + re.escape(TOOL_CALL_END), re.DOTALL)


def _parse_tool_call(body: str) -> dict:
    call = json.loads(body)
    if not isinstance(call, dict):
        raise ValueError("not a JSON object")
    name, arguments = call.get("name"), call.get("arguments", {})
    if not isinstance(name, str) or not name:
        raise ValueError('missing "name"')
    if isinstance(arguments, str):
        json.loads(arguments)  # a JSON string of arguments must itself be valid JSON
    elif isinstance(arguments, dict):
        arguments = json.dumps(arguments, ensure_ascii=False)
    else:
        raise ValueError('"arguments" must be an object')
    function = {"name": name, "arguments": arguments}
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": function}


def parse_tool_calls(text: str) -> tuple[str, list[dict], list[dict]]:
    """Parse `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (use on the content after
    `split_reasoning`).

    Returns (content, tool_calls, errors): content is the text with the valid blocks removed (stripped);
    tool_calls are OpenAI-style `{"id": "call_...", "type": "function", "function": {"name", "arguments": <JSON
    string>}}`; a malformed or unterminated block stays in content and is reported in errors as
    `{"index": n, "text": block, "error": reason}`."""
    tool_calls, errors, kept, pos = [], [], [], 0
    for n, m in enumerate(_TOOL_CALL_RE.finditer(text)):
        kept.append(text[pos : m.start()])
        pos = m.end()
        try:
            tool_calls.append(_parse_tool_call(m.group(1).strip()))
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            errors.append({"index": n, "text": m.group(0), "error": str(e)})
            kept.append(m.group(0))
    rest = text[pos:]
    if TOOL_CALL_START in rest:
        errors.append({"index": len(tool_calls) + len(errors), "text": rest[rest.index(TOOL_CALL_START) :],
                       "error": f"unterminated {TOOL_CALL_START}"})
    kept.append(rest)
    content = "".join(kept)
    return (content.strip() if tool_calls else content), tool_calls, errors


class IncrementalDetokenizer:
    """Feed token ids, get text deltas. A delta never ends inside a UTF-8 character: bytes of an unfinished
    character wait for the next tokens, and `flush()` returns what is left (invalid bytes become U+FFFD, as in
    `decode`). The deltas concatenate to `tokenizer.decode(ids, skip_special_tokens=...)`; `text` holds them.

    Byte-level tokenizers decode token bytes through an incremental UTF-8 decoder (O(1) per token); others decode a
    sliding window of ids and emit once the window's text no longer ends in U+FFFD."""

    def __init__(self, tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.text = ""
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace") if tokenizer.is_byte_level else None
        self._ids: list[int] = []
        self._prefix = self._read = 0  # window [prefix, read) already emitted; [read, len) pending

    def feed(self, ids) -> str:
        """Add one id or a sequence of ids; returns the newly complete text (possibly "")."""
        ids = [int(ids)] if isinstance(ids, int) or getattr(ids, "ndim", 1) == 0 else [int(i) for i in ids]
        if self.skip_special_tokens:
            ids = [i for i in ids if not self.tokenizer.is_special_id(i)]
        if self._utf8 is not None:
            delta = self._utf8.decode(b"".join(self.tokenizer.token_bytes(i) for i in ids))
        else:
            self._ids.extend(ids)
            delta = self._window_delta(final=False)
        self.text += delta
        return delta

    def flush(self) -> str:
        """The remaining text at the end of the sequence."""
        delta = self._utf8.decode(b"", final=True) if self._utf8 is not None else self._window_delta(final=True)
        self.text += delta
        return delta

    def _window_delta(self, final: bool) -> str:
        decode = self.tokenizer.decode
        done = decode(self._ids[self._prefix : self._read])
        full = decode(self._ids[self._prefix :])
        if len(full) <= len(done) or (full.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return full[len(done) :]
