"""Text helpers for Qwen3 chat output: reasoning split, tool-call parsing, incremental detokenization."""

from __future__ import annotations

import codecs
import json
import re
import uuid

THINK_START, THINK_END = "<think>", "</think>"
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"


def think_state(prompt_ids, think_ids) -> str | None:
    """Where a prompt leaves Qwen3's thinking block: "open" (it ends inside `<think>`: the model continues the
    reasoning), "closed" (its last `</think>` follows its last `<think>`, e.g. the empty block of non-thinking mode)
    or None (no tag, or `think_ids`, the (<think>, </think>) ids, is None)."""
    if think_ids is None:
        return None
    start, end = think_ids
    last = {t: max((i for i, x in enumerate(prompt_ids) if x == t), default=-1) for t in (start, end)}
    if last[start] > last[end]:
        return "open"
    return "closed" if last[end] >= 0 else None


# a tool call that ends the reasoning: `<tool_call>`, whitespace, then the call's JSON object
_TOOL_CALL_OPEN_RE = re.compile(re.escape(TOOL_CALL_START) + r"\s*\{")


def split_reasoning(text: str) -> tuple[str | None, str]:
    """Split generated text into (reasoning_content, content) on `<think>...</think>`.

    The opening `<think>` may be missing (the prompt ended with it). Without `</think>`, text that starts with
    `<think>` is unfinished reasoning (content ""), anything else is all content. A tool call (`<tool_call>` then
    a JSON object) before `</think>` also ends the reasoning, as vLLM's Qwen3 reasoning parser reads it: the call
    is content. Newlines around the reasoning and before the content are stripped, as Qwen3's chat template does;
    empty reasoning gives None."""
    end = text.find(THINK_END)
    if end < 0 and not text.lstrip().startswith(THINK_START):
        return None, text
    call = _TOOL_CALL_OPEN_RE.search(text)
    if call is not None and (end < 0 or call.start() < end):
        reasoning, content = text[: call.start()], text[call.start() :]
    elif end >= 0:
        reasoning, content = text[:end], text[end + len(THINK_END) :]
    else:
        reasoning, content = text, ""
    return reasoning.split(THINK_START)[-1].strip("\n") or None, content.lstrip("\n")


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


class StopStrings:
    """Cuts streamed text at the first stop string (excluded, as vLLM by default). `feed` returns the text that is
    safe to emit: a tail that could begin a stop string waits for the next delta."""

    def __init__(self, stops):
        self.stops = [s for s in (stops or []) if s]
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._buf = ""
        self.hit: str | None = None

    def feed(self, text: str) -> str:
        if self.hit is not None:
            return ""
        if not self.stops:
            return text
        buf = self._buf + text
        cut = min(((buf.find(s), s) for s in self.stops if s in buf), default=None)
        if cut is not None:
            self.hit, self._buf = cut[1], ""
            return buf[: cut[0]]
        keep = 0
        for n in range(min(self._hold, len(buf)), 0, -1):
            if any(s.startswith(buf[-n:]) for s in self.stops):
                keep = n
                break
        self._buf = buf[len(buf) - keep :]
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        out, self._buf = self._buf, ""
        return out if self.hit is None else ""


def _partial_tag(text: str, tags) -> int:
    """Length of the longest tail of `text` that is a proper prefix of one of `tags`."""
    for n in range(min(len(text), max(len(t) for t in tags) - 1), 0, -1):
        if any(t.startswith(text[-n:]) for t in tags):
            return n
    return 0


class ChatStreamParser:
    """Qwen3 chat output, streamed: text deltas in, typed deltas out, as `split_reasoning` then
    `parse_tool_calls` read the whole text.

    `feed(text)` / `finish()` return a list of ("reasoning", str), ("content", str) and ("tool_call", call) items
    (call: `{"id", "type": "function", "function": {"name", "arguments"}}`). A tag split across deltas (`<think>`,
    `</think>`, `<tool_call>`) is held back until it is whole, so no part of it reaches the content; reasoning
    loses the newlines around it and the content the newlines that open it (the template's form); whitespace
    before a tool call waits, and is dropped when nothing but tool calls follows. A malformed or unterminated
    `<tool_call>` block goes to the content as text (and to `errors`). A tool call before `</think>` ends the
    reasoning (see `split_reasoning`). `in_reasoning`: the prompt ended inside `<think>`; `tools`: parse tool calls
    (only when tools were offered); `calls_only`: the answer is tool calls and nothing else (a forced tool_choice),
    so no text after the reasoning is content: a block cut short (max_tokens) is dropped, not shown."""

    def __init__(self, in_reasoning: bool = False, tools: bool = False, calls_only: bool = False):
        self.state = "reasoning" if in_reasoning else "start"
        self.tools = tools or calls_only
        self.calls_only = calls_only
        self.errors: list[dict] = []
        self.n_calls = 0
        self._buf = ""             # undecided text (a possible tag, leading / trailing whitespace, a tool block)
        self._strip = in_reasoning  # drop the newlines that open the current section

    def feed(self, text: str) -> list:
        self._buf += text
        out: list = []
        while True:
            before = (self.state, len(self._buf))
            getattr(self, f"_{self.state}")(out, final=False)
            if (self.state, len(self._buf)) == before:
                return out

    def finish(self) -> list:
        out = self.feed("")
        getattr(self, f"_{self.state}")(out, final=True)
        return out

    # -- states ------------------------------------------------------------------------------------------------
    def _start(self, out, final):
        head = self._buf.lstrip()
        if head.startswith(THINK_START):
            self._buf, self.state, self._strip = head[len(THINK_START) :], "reasoning", True
        elif final or (head and not THINK_START.startswith(head)):
            self.state = "content"
            self._content(out, final)

    def _reasoning(self, out, final):
        buf = self._buf
        if self._strip:
            buf = buf.lstrip("\n")
            self._strip = not buf
        end, pos, held = buf.find(THINK_END), 0, None
        while (i := buf.find(TOOL_CALL_START, pos)) >= 0 and (end < 0 or i < end):
            after = buf[i + len(TOOL_CALL_START) :].lstrip()
            if after.startswith("{"):  # a tool call: the reasoning ends here and the call is content
                self._emit(out, "reasoning", buf[:i].replace(THINK_START, "").rstrip("\n"))
                self._buf, self.state, self._strip = buf[i:], "content", False
                return
            if not after and not final:  # what follows decides: wait for it
                held = i
                break
            pos = i + 1
        if held is None and end >= 0:
            text, _, rest = buf.partition(THINK_END)
            self._emit(out, "reasoning", text.replace(THINK_START, "").rstrip("\n"))
            self._buf, self.state, self._strip = rest, "content", True
            return
        if final:
            self._buf = ""
            self._emit(out, "reasoning", buf.replace(THINK_START, "").rstrip("\n"))
            return
        keep = len(buf) - held if held is not None else _partial_tag(buf, (THINK_END, THINK_START, TOOL_CALL_START))
        text = buf[: len(buf) - keep]
        n_nl = len(text) - len(text.rstrip("\n"))  # trailing newlines wait: they are dropped before </think>
        self._emit(out, "reasoning", text[: len(text) - n_nl].replace(THINK_START, ""))
        self._buf = buf[len(text) - n_nl :]

    def _content(self, out, final):
        buf = self._buf
        if self._strip:
            buf = buf.lstrip("\n")
            self._strip = not buf and not final
        if self.tools and TOOL_CALL_START in buf:
            text, _, rest = buf.partition(TOOL_CALL_START)
            lead = text.rstrip()
            self._emit(out, "content", lead)
            self._buf, self.state = text[len(lead) :] + TOOL_CALL_START + rest, "tool"
            return
        if final:
            self._buf = ""
            self._emit(out, "content", buf if not self.n_calls else buf.rstrip())
            return
        keep = _partial_tag(buf, (TOOL_CALL_START,)) if self.tools else 0
        text = buf[: len(buf) - keep]
        lead = text.rstrip() if self.tools else text  # whitespace waits: a tool call may follow
        self._emit(out, "content", lead)
        self._buf = buf[len(lead) :]

    def _tool(self, out, final):
        ws, _, block = self._buf.partition(TOOL_CALL_START)
        if TOOL_CALL_END in block:
            body, _, rest = block.partition(TOOL_CALL_END)
            try:
                call = _parse_tool_call(body.strip())
            except ValueError as e:
                self.errors.append({"index": self.n_calls + len(self.errors),
                                    "text": TOOL_CALL_START + body + TOOL_CALL_END, "error": str(e)})
                self._emit(out, "content", ws + TOOL_CALL_START + body + TOOL_CALL_END)
                ws = ""
            else:
                self.n_calls += 1
                out.append(("tool_call", call))
            self._buf, self.state = ws + rest, "content"  # whitespace before the call waits for more content
        elif final:
            self.errors.append({"index": self.n_calls + len(self.errors), "text": TOOL_CALL_START + block,
                                "error": f"unterminated {TOOL_CALL_START}"})
            self._buf = ""
            self._emit(out, "content", (ws if not self.n_calls else "") + TOOL_CALL_START + block)

    def _emit(self, out, kind, text):
        if kind == "content" and self.calls_only:
            return
        if text:
            if out and out[-1][0] == kind and kind != "tool_call":
                out[-1] = (kind, out[-1][1] + text)
            else:
                out.append((kind, text))
