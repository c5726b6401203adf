"""A small MCP server (the SDK's MCPServer over stdio) for the tests: get_weather(city) -> "sunny in CITY".
Each call is appended to the file named by $WEATHER_LOG, so a test can see that the tool really ran."""

import os
from typing import Literal

from mcp.server import MCPServer

app = MCPServer("weather")


@app.tool()
def get_weather(city: Literal["Paris", "Rome"]) -> str:
    """The weather in a city."""
    log = os.environ.get("WEATHER_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(city + "\n")
    return f"sunny in {city}"


if __name__ == "__main__":
    app.run()
