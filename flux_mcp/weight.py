"""What the tool list costs a conversation: the bytes a host sends the model on every turn.

Hosts send each tool's ``name``, ``title``, ``description`` and ``inputSchema`` with every model call
(output schemas and ``_meta`` normally not), so this is paid even in conversations that never edit an
image. Rough rule: compact JSON bytes / 4 = tokens. ``benchmarks/bench_tokens.py`` prints it and
``tests/test_weight.py`` keeps it under ``PER_TURN_TARGET_BYTES``.

This module knows nothing about the backends; it reads the tool list of a built server in memory.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["PER_TURN_KEYS", "PER_TURN_TARGET_BYTES", "measure", "per_turn_bytes"]

#: What a host sends the model about each tool, every turn.
PER_TURN_KEYS = ("name", "title", "description", "inputSchema")
#: All tools together stay at or under this many bytes (about 2,500 tokens).
PER_TURN_TARGET_BYTES = 10_000


def per_turn_bytes(tools: list[Any]) -> dict[str, int]:
    """Compact-JSON bytes of each tool's per-turn part (tools as ``mcp.types.Tool``), by name."""
    sizes = {}
    for tool in tools:
        wire = tool.model_dump(by_alias=True, mode="json", exclude_none=True)
        sent = {key: wire[key] for key in PER_TURN_KEYS if key in wire}
        sizes[tool.name] = len(json.dumps(sent, separators=(",", ":"), ensure_ascii=False).encode())
    return sizes


async def measure() -> dict[str, int]:
    """The per-turn bytes of every tool of a freshly built server (no backend is created)."""
    import tempfile
    from pathlib import Path

    from mcp import Client

    from .config import Settings
    from .server import build_server

    with tempfile.TemporaryDirectory() as work:
        server = build_server(Settings(output_dir=Path(work) / "out"))
        async with Client(server) as client:
            tools = (await client.list_tools()).tools
    return per_turn_bytes(tools)
