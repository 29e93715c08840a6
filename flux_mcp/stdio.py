"""Serving MCP over stdio, answering lines that are not JSON-RPC instead of dropping them.

The SDK's stdio transport parses each line and hands a line it cannot parse to the server as an
exception, which the server only logs: the client never hears back and waits for its timeout (seen
with a line nested 100,000 arrays deep). JSON-RPC 2.0 says such a line gets an error response with
a null id: -32700 "Parse error" when it is not JSON, -32600 "Invalid Request" when it is JSON but not
a JSON-RPC message. ``serve_stdio`` sits between the transport and the server and sends those.

This module knows nothing about the tools; it only needs the ``MCPServer`` to run.
"""

from __future__ import annotations

import logging

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.stdio import stdio_server
from mcp.shared._context_streams import create_context_streams
from mcp.shared.message import SessionMessage
from mcp_types import INVALID_REQUEST, PARSE_ERROR, ErrorData, JSONRPCError
from pydantic import ValidationError

__all__ = ["error_for", "serve_stdio"]

logger = logging.getLogger(__name__)


def error_for(exc: Exception) -> JSONRPCError:
    """The JSON-RPC error response to a line the transport could not turn into a message."""
    not_json = not isinstance(exc, ValidationError) or any(e["type"] == "json_invalid" for e in exc.errors())
    if not_json:
        error = ErrorData(
            code=PARSE_ERROR, message="Parse error: the line is not valid JSON (or nests too deep)."
        )
    else:
        error = ErrorData(
            code=INVALID_REQUEST, message="Invalid Request: the line is JSON but not a JSON-RPC message."
        )
    return JSONRPCError(jsonrpc="2.0", id=None, error=error)


async def serve_stdio(server: MCPServer) -> None:
    """``server.run("stdio")``, with an error response for every line that is not a message."""
    async with stdio_server() as (read_stream, write_stream):
        relay_send, relay_receive = create_context_streams[SessionMessage | Exception](0)

        async def relay() -> None:
            async with relay_send:
                async for item in read_stream:
                    if isinstance(item, Exception):
                        logger.info("answering an unparsable line with an error: %s", type(item).__name__)
                        await write_stream.send(SessionMessage(error_for(item)))
                    else:
                        await relay_send.send(item)

        lowlevel = server._lowlevel_server  # what MCPServer.run_stdio_async runs, with our relay in front
        async with anyio.create_task_group() as group:
            group.start_soon(relay)
            await lowlevel.run(relay_receive, write_stream, lowlevel.create_initialization_options())
            group.cancel_scope.cancel()
