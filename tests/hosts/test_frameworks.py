"""flux-mcp through the agent frameworks' own code, as their users run it (issue 13).

Runs in ``.venv-hosts`` (these frameworks pin ``mcp`` 1.x), started by ``tests/test_hosts.py``, which
passes the server's command and environment (the loopback fal emulator) in ``FLUX_HOSTS_*``
variables. No network, no model calls: each framework's converters turn the real results into the
messages it would send a model.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

PYTHON = os.environ["FLUX_HOSTS_SERVER_PYTHON"]
IMAGE = os.environ["FLUX_HOSTS_IMAGE"]
pytestmark = pytest.mark.anyio
EDIT = {"prompt": "turn it into a painting", "image_urls": [IMAGE], "seed": 42, "num_inference_steps": 8}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _server() -> dict[str, Any]:
    return {"command": PYTHON, "args": ["-m", "flux_mcp"], "env": dict(os.environ)}


def _urls(node: Any) -> list[str]:
    """Every image URL in a provider message (OpenAI chat/Responses, Anthropic)."""
    found = []
    if isinstance(node, dict):
        if node.get("type") == "image_url":
            image = node["image_url"]
            found.append(image["url"] if isinstance(image, dict) else image)
        elif node.get("type") == "input_image":
            found.append(node.get("image_url", ""))
        elif node.get("type") == "image" and isinstance(node.get("source"), dict):
            source = node["source"]
            found.append(source.get("url") or f"data:{source.get('media_type')};base64,")
        for value in node.values():
            found += _urls(value)
    elif isinstance(node, list):
        for value in node:
            found += _urls(value)
    return found


async def test_langchain_agent_messages_carry_only_provider_urls_and_the_flux_id() -> None:
    from langchain_anthropic.chat_models import _format_messages
    from langchain_mcp_adapters.client import MultiServerMCPClient
    from langchain_openai.chat_models.base import _construct_responses_api_input, _convert_message_to_dict

    client = MultiServerMCPClient({"flux": {"transport": "stdio", **_server()}})
    tools = {tool.name: tool for tool in await client.get_tools()}
    message = await tools["edit_image"].ainvoke(
        {"type": "tool_call", "id": "call_1", "name": "edit_image", "args": EDIT}
    )
    chat = _convert_message_to_dict(message)
    responses = _construct_responses_api_input([message])
    _, anthropic = _format_messages([message], model="claude-sonnet-4-5")
    report = {}
    for name, converted in (("openai-chat", chat), ("openai-responses", responses), ("anthropic", anthropic)):
        urls = _urls(converted)
        report[name] = [u[:30] for u in urls]
        assert urls, f"{name}: the preview image reaches the model"
        assert all(u.startswith(("http://", "https://", "data:")) for u in urls), (name, urls)
        assert "flux://images/" in json.dumps(converted), f"{name}: the flux id reaches the model as text"
    print("langchain conversions:", json.dumps(report))


async def test_openai_agents_sdk_converts_every_tool_strictly_and_strict_calls_get_the_preset() -> None:
    from agents.mcp import MCPServerStdio, MCPUtil

    async with MCPServerStdio(params=_server(), client_session_timeout_seconds=60) as server:
        tools = await server.list_tools()
        converted = {
            t.name: MCPUtil.to_function_tool(t, server, convert_schemas_to_strict=True) for t in tools
        }
        assert {name: tool.strict_json_schema for name, tool in converted.items()} == dict.fromkeys(
            converted, True
        )
        # A call as a strict host builds it: every property present, the model's defaults included.
        schema = converted["edit_image"].params_json_schema
        props = schema["properties"]
        args = {name: prop.get("default") for name, prop in props.items()}
        cns = props["cns"]
        cns_object = next((b for b in cns.get("anyOf", [cns]) if b.get("type") == "object"), cns)
        args["cns"] = {k: v.get("default") for k, v in cns_object["properties"].items()}
        args.update(EDIT, preset="quality", seed=None, num_inference_steps=28)
        assert set(args) == set(schema["required"])
        result = await server.call_tool("edit_image", args)
    assert not result.isError, result.content
    assert result.structuredContent["params"]["num_inference_steps"] == 50
    assert result.structuredContent["params"]["acceleration"] == "none"
    print("agents strict:", {n: t.strict_json_schema for n, t in converted.items()})


async def test_pydantic_ai_shows_the_model_the_next_step_of_a_pending_result() -> None:
    from fastmcp.client.transports import StdioTransport
    from pydantic_ai.mcp import MCPToolset

    toolset = MCPToolset(StdioTransport(command=PYTHON, args=["-m", "flux_mcp"], env=dict(os.environ)))
    async with toolset:
        # What pydantic-ai hands the model (an Apps-bound tool's call maps its result the same way).
        seen = await toolset.direct_call_tool("edit_image", EDIT)
    assert isinstance(seen, dict), f"the model sees {type(seen).__name__}: {str(seen)[:300]}"
    assert seen["job"]["state"] in ("queued", "running"), json.dumps(seen)[:300]
    assert "get_result" in seen["next_step"] and seen["job"]["id"] in seen["next_step"]
    print("pydantic-ai sees:", seen["next_step"])
