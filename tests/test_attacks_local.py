"""Attacks on the local backend, through the real server (stdio subprocess, real MCP client) on the
tiny klein pipeline; downloads only from loopback servers the tests start."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from .conftest import LoopbackFiles, data_uri, make_png, server_env, stdio_client, text_of
from .test_attacks_hosted import EPS, _fake_ghostscript

pytestmark = [pytest.mark.anyio, pytest.mark.local]

SMALL = {"prompt": "a watercolour", "num_inference_steps": 4, "image_size": {"width": 64, "height": 64}}
MIB = 1024 * 1024


def _env(tmp_path: Path, model: Path, **extra: str) -> dict[str, str]:
    (tmp_path / "inputs").mkdir(exist_ok=True)
    return server_env(
        tmp_path,
        FLUX_MCP_BACKEND="local",
        FLUX_MCP_MODEL=str(model),
        FLUX_MCP_DEVICE="cpu",
        FLUX_MCP_LORA_CACHE=str(tmp_path / "lora-cache"),
        OMP_NUM_THREADS="1",
        **extra,
    )


async def test_an_eps_url_never_reaches_ghostscript(
    tmp_path: Path, tiny_model: Path, loopback_files: tuple[str, type[LoopbackFiles]]
) -> None:
    base, handler = loopback_files
    handler.files["/drawing.png"] = EPS
    path, record = _fake_ghostscript(tmp_path)
    env = _env(tmp_path, tiny_model, PATH=path, FLUX_MCP_ALLOW_PRIVATE_URLS="true")
    async with stdio_client(env) as client:
        result = await client.call_tool("edit_image", {**SMALL, "image_urls": [f"{base}/drawing.png"]})
    assert result.is_error and "image_urls.0" in text_of(result) and "PNG, JPEG" in text_of(result)
    assert ("GET", "/drawing.png") in handler.hits
    assert not record.exists(), "Ghostscript ran"


async def test_a_full_gpu_queue_refuses_at_once_saying_how_many_are_ahead(
    tmp_path: Path, tiny_model: Path
) -> None:
    env = _env(tmp_path, tiny_model, FLUX_MCP_MAX_QUEUED_JOBS="1", FLUX_MCP_CALL_BUDGET_S="60")
    image = [data_uri(make_png(64, 64))]
    long_run = {**SMALL, "num_inference_steps": 50, "image_size": {"width": 512, "height": 512}}
    running, waiting = anyio.Event(), anyio.Event()

    def on(event: anyio.Event, word: str) -> Any:
        async def progress(value: float, total: float | None, message: str | None) -> None:
            if word in (message or ""):
                event.set()

        return progress

    async def call(client: Client, progress: Any) -> None:
        await client.call_tool("edit_image", {**long_run, "image_urls": image}, progress_callback=progress)

    async with stdio_client(env) as client, anyio.create_task_group() as group:
        group.start_soon(call, client, on(running, "step"))
        await running.wait()  # the first job holds the GPU
        group.start_soon(call, client, on(waiting, "waiting for the GPU"))
        await waiting.wait()  # the second waits: the line is full
        refused = await client.call_tool("edit_image", {**SMALL, "image_urls": image})
        group.cancel_scope.cancel()  # the host cancels the two others
    assert refused.is_error, text_of(refused)
    assert "busy: 2 job(s) ahead" in text_of(refused) and "FLUX_MCP_MAX_QUEUED_JOBS" in text_of(refused)
    assert "try again later" in text_of(refused).lower()


async def test_too_much_work_is_refused_before_queuing(tmp_path: Path, tiny_model: Path) -> None:
    huge = {
        **SMALL,
        "image_size": {"width": 14142, "height": 14142},
        "num_images": 4,
        "num_inference_steps": 50,
        "image_urls": [data_uri(make_png(64, 64))],
    }
    async with stdio_client(_env(tmp_path, tiny_model)) as client:
        with anyio.fail_after(120):  # before the fix this was accepted and ran for hours
            result = await client.call_tool("edit_image", huge)
            seeds = await client.call_tool(
                "compare_seeds", {**SMALL, "seeds": [1, 2], "image_urls": huge["image_urls"]}
            )
    text = text_of(result)
    assert result.is_error and "image_size" in text and "FLUX_MCP_MAX_LOCAL_WORK" in text
    assert "Lower image_size, num_images" in text and "= 39,999 megapixel-steps" in text  # 200 MP x 4 x 50
    assert not seeds.is_error, text_of(seeds)  # a small call still runs


def _nested_header_lora(path: Path, depth: int = 100_000) -> Path:
    header = ('{"x":' + "[" * depth + "]" * depth + "}").encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\x00" * 8)
    return path


async def test_hostile_lora_names_and_headers_get_clear_errors(tmp_path: Path, tiny_model: Path) -> None:
    (tmp_path / "inputs").mkdir()
    nested = _nested_header_lora(tmp_path / "inputs" / "nested.safetensors")
    cases = {
        str(nested): "nested too deeply",
        "someone/repo/../../etc/passwd.safetensors": "not a file name inside a Hugging Face repo",
        "someone/repo//abs.safetensors": "not a file name inside a Hugging Face repo",
    }
    async with stdio_client(_env(tmp_path, tiny_model)) as client:
        for path, expected in cases.items():
            result = await client.call_tool(
                "edit_image", {**SMALL, "image_urls": [data_uri(make_png(64, 64))], "loras": [{"path": path}]}
            )
            assert result.is_error and "loras.0.path" in text_of(result), text_of(result)
            assert expected in text_of(result) and "internal error" not in text_of(result)


async def test_a_hub_lora_above_the_cap_is_refused_before_downloading(
    tmp_path: Path, tiny_model: Path, loopback_files: tuple[str, type[LoopbackFiles]]
) -> None:
    base, handler = loopback_files
    head = {"X-Repo-Commit": "a" * 40, "ETag": '"abc"', "Content-Length": str(900 * MIB)}
    handler.heads["/someone/big-lora/resolve/main/big.safetensors"] = head
    handler.files["/someone/big-lora/resolve/main/big.safetensors"] = b"\x00" * 4096
    hub_cache = tmp_path / "hf"
    env = _env(
        tmp_path,
        tiny_model,
        HF_ENDPOINT=base,
        HF_HUB_OFFLINE="0",
        HF_HUB_CACHE=str(hub_cache),
        FLUX_MCP_MAX_LORA_MB="10",
    )
    async with stdio_client(env) as client:
        result = await client.call_tool(
            "edit_image",
            {
                **SMALL,
                "image_urls": [data_uri(make_png(64, 64))],
                "loras": [{"path": "someone/big-lora/big.safetensors"}],
            },
        )
    assert result.is_error and "loras.0.path" in text_of(result)
    assert "900.0 MiB, larger than 10 MiB (FLUX_MCP_MAX_LORA_MB)" in text_of(result)
    file_hits = [method for method, path in handler.hits if path.endswith("big.safetensors")]
    assert file_hits == ["HEAD"], handler.hits  # asked for its size, never fetched
    assert not [p for p in hub_cache.rglob("*") if p.is_file()]


async def test_an_oversized_lora_stream_leaves_nothing_in_the_cache(
    tmp_path: Path, tiny_model: Path, loopback_files: tuple[str, type[LoopbackFiles]]
) -> None:
    base, handler = loopback_files
    handler.files["/big.safetensors"] = b"\x00" * (3 * MIB)
    handler.unsized.add("/big.safetensors")  # no Content-Length: only counting the stream stops it
    env = _env(tmp_path, tiny_model, FLUX_MCP_ALLOW_PRIVATE_URLS="true", FLUX_MCP_MAX_LORA_MB="1")
    async with stdio_client(env) as client:
        result = await client.call_tool(
            "edit_image",
            {
                **SMALL,
                "image_urls": [data_uri(make_png(64, 64))],
                "loras": [{"path": f"{base}/big.safetensors?t=1"}],
            },
        )
    assert result.is_error and "larger than the 1 MiB limit" in text_of(result)
    cache = tmp_path / "lora-cache"
    assert not cache.exists() or not list(cache.iterdir())
    assert "t=1" not in json.dumps(result.model_dump(mode="json"))
