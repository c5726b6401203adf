"""OpenAI-compatible request bodies (as vLLM reads them for Qwen3), validated by pydantic.

Unknown fields are ignored (clients send `user`, `metadata`, `store`, ...). Ranges follow vLLM: temperature
>= 0, top_p in (0, 1], top_k 0 or -1 = off, min_p in [0, 1], presence / frequency penalty in [-2, 2],
repetition_penalty > 0, top_logprobs and completions' logprobs in [0, 20], seed a signed 64-bit integer.

Bounds a careless or hostile request cannot pass (each a 400 naming the field): MAX_JSON_DEPTH levels of nesting
in the whole body (schemas included), MAX_MESSAGES messages, MAX_TOOLS tools, MAX_STOPS stop strings of at most
MAX_STOP_CHARS characters, MAX_PROMPTS prompts in one completions request. `parse_body` reads a body with them.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, field_validator

from .engine import TOP_LOGPROBS

MAX_JSON_DEPTH = 64
MAX_MESSAGES = 4096
MAX_TOOLS = 128          # OpenAI's limit
MAX_STOPS = 64
MAX_STOP_CHARS = 1024
MAX_PROMPTS = 1024

_loose = ConfigDict(extra="ignore")
PositiveInt = Annotated[StrictInt, Field(ge=1)]
Int64 = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]


class _Base(BaseModel):
    model_config = _loose


class TextPart(_Base):
    type: Literal["text"]
    text: StrictStr


class FunctionCall(_Base):
    name: StrictStr
    arguments: Union[StrictStr, dict] = "{}"


class ToolCall(_Base):
    id: StrictStr | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Base):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[StrictStr, list[TextPart], None] = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: StrictStr | None = None
    reasoning_content: StrictStr | None = None
    reasoning: StrictStr | None = None

    def for_template(self) -> dict:
        """The message as the chat template reads it: text parts joined, `developer` as `system`, reasoning (either
        name) as `reasoning_content` (the Qwen3 template keeps it only where it belongs)."""
        content = self.content
        if isinstance(content, list):
            content = "\n".join(p.text for p in content)
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                               "content": content if content is not None else ""}
        reasoning = self.reasoning_content if self.reasoning_content is not None else self.reasoning
        if reasoning is not None:
            out["reasoning_content"] = reasoning
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": c.function.arguments}} for c in self.tool_calls]
        for key in ("name", "tool_call_id"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


class FunctionDef(_Base):
    name: Annotated[StrictStr, Field(min_length=1)]
    description: StrictStr | None = None
    parameters: dict | None = None
    strict: StrictBool | None = None


class Tool(_Base):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Base):
    name: StrictStr


class NamedToolChoice(_Base):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaSpec(_Base):
    name: StrictStr | None = None
    description: StrictStr | None = None
    json_schema: Union[dict, StrictBool] = Field(default=None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Base):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaSpec | None = None


class StreamOptions(_Base):
    include_usage: StrictBool | None = False


class _Sampling(_Base):
    model: StrictStr | None = None
    n: Annotated[StrictInt, Field(ge=1, le=16)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: Union[Annotated[StrictStr, Field(max_length=MAX_STOP_CHARS)],
                Annotated[list[Annotated[StrictStr, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOPS)],
                None] = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: StrictBool = False
    seed: Int64 | None = None
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    max_tokens: PositiveInt | None = None
    response_format: ResponseFormat | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if isinstance(v, str):
            v = [v]
        if v is not None and any(not s for s in v):
            raise ValueError("stop strings must be non-empty")
        return v or None


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: PositiveInt | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: StrictBool = True
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=TOP_LOGPROBS)] | None = None
    chat_template: StrictStr | None = None   # a request's own template: only with --trust-request-chat-template
    chat_template_kwargs: dict | None = None
    include_reasoning: StrictBool = True
    thinking_token_budget: Annotated[StrictInt, Field(ge=0)] | None = None


class CompletionRequest(_Sampling):
    prompt: Union[StrictStr, Annotated[list[StrictStr], Field(min_length=1, max_length=MAX_PROMPTS)],
                  Annotated[list[StrictInt], Field(min_length=1)],
                  Annotated[list[Annotated[list[StrictInt], Field(min_length=1)]],
                            Field(min_length=1, max_length=MAX_PROMPTS)]]
    max_tokens: PositiveInt | None = 16
    echo: StrictBool = False
    logprobs: Annotated[StrictInt, Field(ge=0, le=TOP_LOGPROBS)] | None = None
    suffix: StrictStr | None = None
    return_token_ids: StrictBool | None = None


class TokenizeRequest(_Base):
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: Annotated[list[Message], Field(max_length=MAX_MESSAGES)] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    chat_template: StrictStr | None = None
    chat_template_kwargs: dict | None = None


class DetokenizeRequest(_Base):
    model: StrictStr | None = None
    tokens: list[StrictInt]


# ------------------------------------------------------------------------------------------------------ reading
class BodyError(ValueError):
    """A body that is no valid request: `message` and `param` (the field, or None) for a 400."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


def too_deep(obj, limit: int = MAX_JSON_DEPTH) -> str | None:
    """The path ("a.b.0.c") of the first array or object nested deeper than `limit` levels, or None."""
    stack = [(obj, 1, "")]
    while stack:
        x, depth, path = stack.pop()
        if depth > limit:
            return path or "body"
        items = x.items() if isinstance(x, dict) else enumerate(x)
        for k, v in items:
            if isinstance(v, (dict, list)):
                stack.append((v, depth + 1, f"{path}.{k}" if path else str(k)))
    return None


def validation_error(exc: ValidationError | Any) -> BodyError:
    """pydantic's first error as a BodyError naming the field (a union's branch names dropped)."""
    errs = exc.errors()
    first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    # a union's branch name (e.g. "str", "list[int]") is not a field: keep the path to it
    loc = [x for x in loc if not (x[:1].islower() and ("[" in x or x in ("str", "int", "float", "bool")))]
    field = ".".join(loc) or None
    return BodyError(f"{field or 'body'}: {first.get('msg')}", field)


def parse_body(raw: bytes, cls: type[BaseModel], max_depth: int = MAX_JSON_DEPTH) -> BaseModel:
    """A request body (bytes) -> `cls`, or BodyError: not JSON (param None, as vLLM), nested deeper than
    `max_depth`, or a field that does not validate."""
    try:
        obj = json.loads(raw)
    except RecursionError:
        raise BodyError(f"the JSON body nests deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise BodyError(f"Invalid JSON body: {e}") from None
    if not isinstance(obj, dict):
        raise BodyError("the JSON body must be an object")
    path = too_deep(obj, max_depth)
    if path is not None:
        shown = path if len(path) <= 120 else path[:120] + "..."
        raise BodyError(f"{shown}: the JSON body nests deeper than {max_depth} levels", path.split(".")[0])
    try:
        return cls.model_validate(obj)
    except ValidationError as e:
        raise validation_error(e) from None
