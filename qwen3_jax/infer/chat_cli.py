"""`qwen3-jax-chat`: an interactive, streaming chat with a model (reasoning shown under "Thinking...").

    qwen3-jax-chat --model DIR --system "You are terse." --no-thinking
    qwen3-jax-chat --model DIR --mcp "python tools.py"        # the model calls the MCP server's tools

Reads one user message per line (from a terminal, or piped); the commands /think, /no_think, /reset, /exit and
/help are listed by --help. Sampling defaults come from the model's generation_config.json, then the flags.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from qwen3_jax.hostmem import tune_malloc
from qwen3_jax.launch import ArgumentParser, default_platform

from .chat import THINK_END, THINK_START
from .loading import SamplingDefaults, add_model_args, add_sampling_args, checked_tokenizer, load_model, setup

COMMANDS = {"/think": "thinking mode on (default: --enable-thinking)", "/no_think": "thinking mode off",
            "/reset": "forget the conversation (keeps --system)", "/exit": "quit", "/help": "this list"}
NOTICES = {"/think": "thinking mode on", "/no_think": "thinking mode off", "/reset": "conversation reset"}


class ReasoningPrinter:
    """Writes streamed text deltas: the reasoning between <think> and </think> under a 'Thinking...' header (dimmed
    on a terminal), then the answer. Empty reasoning (non-thinking turns) prints nothing."""

    def __init__(self, out, color: bool):
        self.out, self.color = out, color
        self.section = "answer"  # "answer" | "reasoning"
        self.strip = False  # drop the newlines that follow a tag
        self.shown = False  # the Thinking... header was printed

    def feed(self, delta: str):
        for part in re.split(f"({re.escape(THINK_START)}|{re.escape(THINK_END)})", delta):
            if part == THINK_START:
                self.section, self.strip = "reasoning", True
            elif part == THINK_END:
                if self.shown:
                    self.out.write(("\x1b[0m" if self.color else "") + "\n...done thinking.\n\n")
                self.section, self.strip, self.shown = "answer", True, False
            else:
                if self.strip:
                    part = part.lstrip("\n")
                    self.strip = not part
                if part and self.section == "reasoning" and not self.shown:
                    self.out.write("Thinking...\n" + ("\x1b[2m" if self.color else ""))
                    self.shown = True
                self.out.write(part)
        self.out.flush()

    def close(self):
        self.out.write(("\x1b[0m" if self.color and self.shown else "") + "\n")
        self.out.flush()


def chat_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="qwen3-jax-chat", description="Interactive streaming chat. Commands: "
        + ", ".join(f"{k} ({v})" for k, v in COMMANDS.items())
        + ". /think and /no_think inside a message are Qwen3's soft switches for that turn.")
    add_model_args(p)
    g = add_sampling_args(p, max_new_tokens=2048)
    g.add_argument("--seed", type=int, help="seed of the first reply (the n-th reply uses SEED+n-1)")
    p.add_argument("--system", help="system message")
    t = p.add_argument_group("tools (MCP)")
    t.add_argument("--mcp", action="append", default=[], metavar="COMMAND",
                   help='start this MCP server over stdio (e.g. "python tools.py"), offer its tools to the model and '
                        "run the calls it makes (repeatable)")
    t.add_argument("--tool-choice", default="auto", metavar="auto|required|none|NAME",
                   help="first model turn of each reply: auto (default), required (must call a tool), none, or a "
                        "tool name (must call it); later turns are auto")
    t.add_argument("--max-tool-rounds", type=int, default=8, help="model turns per reply (the last one answers)")
    return p


def _chat_tools(p, args, model, tokenizer, cfg):
    """The MCP tool host of `--mcp` (None without it)."""
    if not args.mcp:
        return None
    from .mcp_client import ChatTools, MCPError

    choice = args.tool_choice
    if choice not in ("auto", "required", "none"):
        choice = {"type": "function", "function": {"name": choice}}
    if args.max_tool_rounds < 1:
        p.error("--max-tool-rounds must be >= 1")
    try:
        return ChatTools(args.mcp, model, tokenizer, max_len=cfg.max_position_embeddings, tool_choice=choice,
                         max_tool_rounds=args.max_tool_rounds)
    except MCPError as e:
        p.error(str(e))


def _read_line(interactive: bool) -> str | None:
    if interactive:
        try:
            return input(">>> ")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D / Ctrl-C at the prompt: quit
            print(file=sys.stderr)
            return None
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


def main(argv=None) -> int:
    tune_malloc()
    p = chat_parser()
    args = p.parse_args(argv)
    default_platform()
    cfg = setup(p, args)

    from qwen3_jax import infer

    from .generate import eos_token_ids, stop_token_ids

    tokenizer = checked_tokenizer(p, args)
    if tokenizer is None:
        p.error(f"no tokenizer in {args.tokenizer or args.model}: the chat needs tokenizer.json (--tokenizer DIR)")
    stops = None  # the engine's default: eos
    if args.stop_token_ids is not None:
        try:
            stops = stop_token_ids(args.stop_token_ids, eos_token_ids(cfg, tokenizer), cfg.vocab_size)
        except ValueError as e:
            p.error(f"--stop-token-id: {e}")
    sampling = SamplingDefaults(args.model, args)
    model = load_model(args)
    tools = _chat_tools(p, args, model, tokenizer, cfg)
    interactive = sys.stdin.isatty()
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    system = [{"role": "system", "content": args.system}] if args.system else []
    history, thinking, turn = list(system), args.enable_thinking, 0
    if interactive:
        print("commands: " + ", ".join(COMMANDS), file=sys.stderr)
    while (line := _read_line(interactive)) is not None:
        text = line.strip()
        if not text:
            continue
        if re.fullmatch(r"/\w+", text):
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                history = list(system)
            elif text in ("/think", "/no_think"):
                thinking = text == "/think"
            else:
                unknown = [] if text == "/help" else [f"[unknown command {text}]"]
                print("\n".join(unknown + [f"  {k:10} {v}" for k, v in COMMANDS.items()]))
                continue
            print(f"[{NOTICES[text]}]", flush=True)
            continue
        messages = history + [{"role": "user", "content": text}]
        n_prompt = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=thinking))
        if n_prompt >= cfg.max_position_embeddings:
            print(f"[the conversation has {n_prompt} tokens, the context is {cfg.max_position_embeddings}: "
                  "/reset to start over]", flush=True)
            continue
        turn += 1
        seed = {} if args.seed is None else {"seed": args.seed + turn - 1}
        if tools is not None:
            printer = ReasoningPrinter(sys.stdout, color)
            try:
                history = messages + tools.turn(messages, printer, sys.stdout, enable_thinking=thinking,
                                                sampling=sampling(thinking, **seed), max_new_tokens=args.max_new_tokens,
                                                stop_token_ids=args.stop_token_ids, thinking_budget=args.thinking_budget)
            except KeyboardInterrupt:
                print("[interrupted]", flush=True)
            printer.close()
            continue
        deltas = infer.stream(model, messages, sampling=sampling(thinking, **seed), tokenizer=tokenizer,
                              max_new_tokens=min(args.max_new_tokens, cfg.max_position_embeddings - n_prompt),
                              stop_token_ids=stops, enable_thinking=thinking, thinking_budget=args.thinking_budget)
        printer, chunks = ReasoningPrinter(sys.stdout, color), []
        try:
            for delta in deltas:
                chunks.append(delta)
                printer.feed(delta)
        except KeyboardInterrupt:  # Ctrl-C stops this reply; the turn is dropped from the history
            printer.close()
            print("[interrupted]", flush=True)
            continue
        printer.close()
        _, content = infer.split_reasoning("".join(chunks))
        history = messages + [{"role": "assistant", "content": content}]
    if tools is not None:
        tools.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
