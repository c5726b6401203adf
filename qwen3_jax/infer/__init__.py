"""Inference (installed as qwen3_jax.infer)."""

from .engine import lower_decode_step
from .chat import IncrementalDetokenizer, parse_tool_calls, split_reasoning
from .generate import GenerationResult, Request, generate, iter_generate, stream
from .sampling import SamplingParams
from .tokenizer import QWEN3_CHAT_TEMPLATE, Tokenizer, render_chat_template

__all__ = [
    "GenerationResult",
    "Request",
    "SamplingParams",
    "generate",
    "iter_generate",
    "stream",
    "IncrementalDetokenizer",
    "QWEN3_CHAT_TEMPLATE",
    "Tokenizer",
    "parse_tool_calls",
    "render_chat_template",
    "split_reasoning",
    "lower_decode_step",
]
