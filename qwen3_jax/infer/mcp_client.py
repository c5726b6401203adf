"""MCP tools for the chat and the server, through the official `mcp` Python SDK (2.x) over stdio.

    async with MCPTools(["python my_server.py", "npx some-mcp-server --flag"]) as mcp:
        mcp.tools                        # OpenAI-style {"type": "function", "function": {...}} for the template
        text = await mcp.call("get_weather", {"city": "Paris"})

Each command (split like a shell would, run with this process's environment) is started as an MCP server;
its tools are listed once at start. Two servers offering one tool name is an error. A tool's result is
its text content joined by newlines (other content as JSON); a tool error comes back as text starting with
"Error:", for the model to read.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex

from .chat import THINK_END, THINK_START


class MCPError(RuntimeError):
    pass


def _schema(tool) -> dict:
    schema = getattr(tool, "input_schema", None)
    if schema is None:
        schema = getattr(tool, "inputSchema", None)
    return dict(schema or {"type": "object", "properties": {}})


def _result_text(result) -> str:
    parts = []
    for block in getattr(result, "content", None) or []:
        text = getattr(block, "text", None)
        parts.append(text if isinstance(text, str) else json.dumps(block.model_dump(mode="json", exclude_none=True)))
    if not parts and getattr(result, "structured_content", None) is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    text = "\n".join(parts)
    return f"Error: {text}" if getattr(result, "is_error", False) else text


class MCPTools:
    def __init__(self, commands: list[str]):
        self.commands = list(commands)
        self.tools: list[dict] = []
        self._owner: dict[str, object] = {}   # tool name -> ClientSession
        self._stack = contextlib.AsyncExitStack()

    @property
    def names(self) -> set[str]:
        return set(self._owner)

    async def __aenter__(self) -> "MCPTools":
        from mcp import ClientSession, StdioServerParameters
        from mcp.client.stdio import stdio_client

        try:
            for command in self.commands:
                argv = shlex.split(command)
                if not argv:
                    raise MCPError("--mcp: empty command")
                params = StdioServerParameters(command=argv[0], args=argv[1:], env=dict(os.environ))
                try:
                    read, write = await self._stack.enter_async_context(stdio_client(params))
                    session = await self._stack.enter_async_context(ClientSession(read, write))
                    await session.initialize()
                    listed = await session.list_tools()
                except MCPError:
                    raise
                except Exception as e:  # noqa: BLE001  (a server that does not start or speak MCP)
                    raise MCPError(f"--mcp {command!r}: {type(e).__name__}: {e}") from None
                for tool in listed.tools:
                    if tool.name in self._owner:
                        raise MCPError(f"--mcp {command!r}: tool {tool.name!r} is offered by two servers")
                    self._owner[tool.name] = session
                    self.tools.append({"type": "function", "function": {
                        "name": tool.name, "description": tool.description or "", "parameters": _schema(tool)}})
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc):
        await self._stack.aclose()

    async def call(self, name: str, arguments) -> str:
        """Run a tool; arguments: a dict or its JSON text. Errors (unknown tool, bad JSON, the tool failing) come
        back as "Error: ..." text."""
        session = self._owner.get(name)
        if session is None:
            return f"Error: no tool named {name!r}"
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except json.JSONDecodeError as e:
                return f"Error: the arguments are not JSON ({e})"
        if not isinstance(arguments, dict):
            return "Error: the arguments must be a JSON object"
        try:
            return _result_text(await session.call_tool(name, arguments))
        except Exception as e:  # noqa: BLE001
            return f"Error: {type(e).__name__}: {e}"


class BackgroundMCPTools:
    """MCPTools on an event loop of their own (a background thread, anyio's blocking portal), started before the
    server's loop: a command that fails is reported before anything serves, and `call` can be awaited from any
    other event loop. `inner` is the MCPTools itself, for code that runs on `portal`'s loop."""

    def __init__(self, commands: list[str]):
        from anyio.from_thread import start_blocking_portal

        self._portal_cm = start_blocking_portal()
        self.portal = self._portal_cm.__enter__()
        try:
            self._mcp_cm = self.portal.wrap_async_context_manager(MCPTools(commands))
            self.inner = self._mcp_cm.__enter__()
        except BaseException:
            self._portal_cm.__exit__(None, None, None)
            raise
        self.tools, self.names = self.inner.tools, self.inner.names

    async def call(self, name: str, arguments) -> str:
        import asyncio

        return await asyncio.wrap_future(self.portal.start_task_soon(self.inner.call, name, arguments))

    def close(self):
        self._mcp_cm.__exit__(None, None, None)
        self._portal_cm.__exit__(None, None, None)


class ChatTools:
    """`qwen3-jax-chat --mcp`: MCP servers on a background event loop, a one-row engine service, and `turn()`,
    which runs one user turn through the tool loop (serving.ChatRun) on that loop and prints it as it streams."""

    def __init__(self, commands: list[str], model, tokenizer, *, max_len: int, tool_choice="auto",
                 max_tool_rounds: int = 8, chunk: int = 4):
        from .serving import EngineService

        self.tool_choice, self.max_tool_rounds = tool_choice, max_tool_rounds
        self.service = None
        self.background = BackgroundMCPTools(commands)
        self.portal, self.mcp = self.background.portal, self.background.inner
        names = [t["function"]["name"] for t in self.mcp.tools]
        if isinstance(tool_choice, dict) and tool_choice["function"]["name"] not in names:
            self.close()
            raise MCPError(f"--tool-choice {tool_choice['function']['name']}: no such tool (the MCP servers offer "
                           f"{', '.join(names) or 'none'})")
        self.service = EngineService(model, tokenizer, max_batch=1, max_len=max_len, chunk=chunk)
        self.service.start()

    def close(self):
        if self.service is not None:
            self.service.stop()
        self.background.close()

    def turn(self, messages: list[dict], printer, out, *, enable_thinking: bool, sampling, max_new_tokens: int,
             stop_token_ids, thinking_budget=None) -> list[dict]:
        """Run one turn; returns the messages to append to the history (tool rounds, then the answer). Ctrl-C
        cancels it (KeyboardInterrupt propagates)."""
        fut = self.portal.start_task_soon(self._turn, messages, printer, out, enable_thinking, sampling,
                                          max_new_tokens, stop_token_ids, thinking_budget)
        try:
            return fut.result()
        except KeyboardInterrupt:
            fut.cancel()
            raise

    async def _turn(self, messages, printer, out, enable_thinking, sampling, max_new_tokens, stop_token_ids,
                    thinking_budget):
        from .serving import ChatPlan, ChatRun, GenParams, ToolRun

        stops = self.service.stop_ids(stop_token_ids, False)
        params = GenParams(sampling, max_new_tokens, [], stops, thinking_budget, cap_to_context=True)
        plan = ChatPlan(list(messages), None, self.tool_choice, enable_thinking, {}, params,
                        parallel_tool_calls=False, max_tool_rounds=self.max_tool_rounds)  # forced: one call a round
        run = ChatRun(self.service, plan, self.mcp)
        reasoning, content = False, ""
        async for step in run.steps():
            if isinstance(step, ToolRun):
                if reasoning:
                    printer.feed(THINK_END)
                    reasoning = False
                printer.close()
                out.write(f"[tool {step.name} {step.arguments}] -> {step.result}\n")
                out.flush()
                content = ""
                continue
            for kind, text in step.items:
                if kind == "reasoning" and not reasoning:
                    printer.feed(THINK_START)
                    reasoning = True
                elif kind != "reasoning" and reasoning:
                    printer.feed(THINK_END)
                    reasoning = False
                if kind == "content":
                    content += text
                printer.feed(text)
        if reasoning:
            printer.feed(THINK_END)
        return run.messages[len(messages):] + [{"role": "assistant", "content": content}]
