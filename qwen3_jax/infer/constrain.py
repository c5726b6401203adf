"""Constrained decoding through xgrammar: `response_format` (json_object / json_schema) and forced tool calls
(`tool_choice` "required" or a named function) for Qwen3's output format.

A `Grammars` object holds xgrammar's view of the vocabulary (each id's bytes; special tokens such as
<|im_end|> are never text inside a constrained span, they may only end it as stop tokens) and its grammar
compiler (with a cache). `Grammars.response_format(...)` / `.tool_calls(...)` compile a grammar and return a
`Constraint`: one request's matcher, which fills that row of the batch's token bitmask before each step and
accepts the token sampled under it.

Reasoning comes first and is free text. The reasoning mode follows the prompt: "disabled" when the chat
template closed the thinking block (non-thinking mode) or the model has no thinking tokens, "auto" in thinking
mode (the model may open <think>...</think> before the answer), "enabled" when the prompt ends inside <think>
(Qwen3-2507 templates); after `</think>` the grammar expects the template's "\\n\\n" and then the structured
output, as xgrammar's Qwen3 structural tag does for tool calls.
"""

from __future__ import annotations

import json
import re
import threading

import numpy as np

from .chat import THINK_END, THINK_START, think_state

MAX_WHITESPACE = 16  # longest run of whitespace inside constrained JSON (a model cannot pad forever)
GRAMMAR_CACHE_BYTES = 256 << 20  # compiled grammars kept for reuse (~3.5 MB each with Qwen's vocabulary)

# xgrammar's messages begin with its log prefix: "[12:00:00] /path/to/source.cc:123: "
_XGR_PREFIX = re.compile(r"^\[[0-9:]+\]\s+\S+:\d+:\s*")


class GrammarError(ValueError):
    """The request's schema or tools cannot be compiled into a grammar (a 400 for the client)."""


def reasoning_mode(prompt_ids, think_ids, enable_thinking: bool) -> str:
    state = think_state(prompt_ids, think_ids)
    if state == "open":
        return "enabled"
    if state == "closed" or think_ids is None:
        return "disabled"  # the template closed an (empty) thinking block: non-thinking mode
    return "auto" if enable_thinking else "disabled"


class Grammars:
    """xgrammar tokenizer info + compiler for one tokenizer and model vocabulary (thread-safe compile). The
    compiler's cache of compiled grammars holds at most `cache_bytes` (least recently used out first)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids, cache_bytes: int = GRAMMAR_CACHE_BYTES):
        import xgrammar as xgr

        self._xgr = xgr  # imported here: xgrammar pulls in torch (seconds), only servers need it
        n = min(len(tokenizer), vocab_size)
        vocab = [b"" if tokenizer.is_special_id(i) else tokenizer.token_bytes(i) for i in range(n)]
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, vocab_size=vocab_size,
                                      stop_token_ids=list(stop_token_ids))
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=True,
                                            cache_limit_bytes=int(cache_bytes))
        self._lock = threading.Lock()

    # -- building ----------------------------------------------------------------------------------------------
    def _reasoning_prefix(self, mode: str):
        from xgrammar.structural_tag import (AnyTextFormat, ConstStringFormat, OptionalFormat, SequenceFormat,
                                             TagFormat)

        if mode == "disabled":
            return None
        block = SequenceFormat(elements=[
            TagFormat(begin="" if mode == "enabled" else THINK_START,
                      content=AnyTextFormat(excludes=[THINK_START, THINK_END]), end=THINK_END),
            ConstStringFormat(value="\n\n")])
        return OptionalFormat(content=block) if mode == "auto" else block

    def _compile(self, structural_tag):
        with self._lock:
            try:
                return self.compiler.compile_structural_tag(structural_tag)
            except (RuntimeError, ValueError, TypeError) as e:
                lines = str(e).strip().splitlines() or ["invalid"]
                raise GrammarError(_XGR_PREFIX.sub("", lines[-1])) from None

    def response_format(self, schema, reasoning: str = "disabled", stop_token_ids=None) -> "Constraint":
        """schema: a JSON schema dict, or None for any JSON object (json_object)."""
        from xgrammar.structural_tag import JSONSchemaFormat, SequenceFormat, StructuralTag

        if schema is None:
            schema = {"type": "object"}
        if not isinstance(schema, (dict, bool)):
            raise GrammarError("the schema must be a JSON object")
        body = JSONSchemaFormat(json_schema=schema, max_whitespace_cnt=MAX_WHITESPACE)
        prefix = self._reasoning_prefix(reasoning)
        fmt = body if prefix is None else SequenceFormat(elements=[prefix, body])
        return Constraint(self, self._compile(StructuralTag(format=fmt)), reasoning, stop_token_ids)

    def tool_calls(self, tools: list[dict], tool_choice, reasoning: str = "disabled", parallel_tool_calls=True,
                   stop_token_ids=None) -> "Constraint":
        """The answer is tool calls only (after the reasoning): Qwen3's blocks
        `<tool_call>\n{"name": NAME, "arguments": ARGS}\n</tool_call>`, one or more separated by "\n" (one without
        parallel_tool_calls), then a stop token; ARGS follows the tool's `parameters` schema. tool_choice
        "required" (any of the tools) or {"type": "function", "function": {"name": ...}} (that one)."""
        from xgrammar.structural_tag import JSONSchemaFormat, SequenceFormat, StructuralTag, TagFormat, \
            TagsWithSeparatorFormat

        if isinstance(tool_choice, dict):
            name = tool_choice["function"]["name"]
            tools = [t for t in tools if t["function"]["name"] == name]
            if not tools:
                raise GrammarError(f"no tool named {name!r}")
        tags = [TagFormat(begin='<tool_call>\n{"name": ' + json.dumps(t["function"]["name"]) + ', "arguments": ',
                          content=JSONSchemaFormat(json_schema=t["function"].get("parameters") or True,
                                                   max_whitespace_cnt=MAX_WHITESPACE),
                          end="}\n</tool_call>") for t in tools]
        body = TagsWithSeparatorFormat(tags=tags, separator="\n", at_least_one=True,
                                       stop_after_first=not parallel_tool_calls)
        prefix = self._reasoning_prefix(reasoning)
        fmt = body if prefix is None else SequenceFormat(elements=[prefix, body])
        return Constraint(self, self._compile(StructuralTag(format=fmt)), reasoning, stop_token_ids)

    def allocate_bitmask(self, batch: int) -> np.ndarray:
        return np.full((batch, (self.vocab_size + 31) // 32), -1, np.int32)


class Constraint:
    """One request's grammar state: `fill(bitmask, row)` before a step, `accept(token)` after it."""

    def __init__(self, grammars: Grammars, compiled, reasoning: str, stop_token_ids=None):
        xgr = grammars._xgr
        stops = None if stop_token_ids is None else [int(t) for t in stop_token_ids]
        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=stops)
        self.reasoning = reasoning
        self.broken: str | None = None   # set when a token the grammar rejects was emitted (a forced token)
        self._row = xgr.allocate_token_bitmask(1, grammars.vocab_size)
        self._row_np = self._row.numpy()

    def fill(self, bitmask: np.ndarray, row: int):
        if self.broken is not None or self.matcher.is_terminated():
            bitmask[row] = -1
            return
        self.matcher.fill_next_token_bitmask(self._row)
        bitmask[row] = self._row_np[0]

    def accept(self, token: int) -> bool:
        if self.broken is not None or self.matcher.is_terminated():
            return False
        if self.matcher.accept_token(int(token)):
            return True
        self.broken = f"token {int(token)} does not follow the grammar"
        return False
