"""Hosted-path benchmarks against the loopback fal emulator (no network, no key needed).

    python benchmarks/bench_hosted.py            # all of them
    python benchmarks/bench_hosted.py --quick    # fewer repetitions

1. edit_image round trip over stdio (1 MP PNG result, zero model latency) vs a bare fal_client
   submit + result + download of the same request to the same emulator: target ratio <= 1.5.
2. Cold start of `flux-mcp` to a tools/list answer vs a minimal MCPServer with one tool: ratio <= 1.5.
3. Idle RSS of the hosted server <= 120 MB; RSS after 40 edits <= RSS after 20 edits + 10 MB.
4. compare_seeds with 4 seeds at 1.0 s model latency vs one edit_image in the same run: ratio <= 1.3.
5. A 16-cell grid (compare_seeds with vary) through 4 fal slots at 1.0 s latency vs one edit_image:
   the ideal is 4x (16 cells / 4 slots); target <= 4.4x.

Prints one table; exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.fal_emulator import FalEmulator  # noqa: E402

ENDPOINT = "fal-ai/flux-2/klein/9b/base/edit/lora"


def _png(width: int, height: int) -> bytes:
    img = Image.effect_noise((width, height), 64).convert("RGB")
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def _server_env(emu: FalEmulator, work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLUX_MCP_", "FAL_"))}
    env.update(emu.env())
    env.update(
        FLUX_MCP_OUTPUT_DIR=str(work / "out"),
        FLUX_MCP_INPUT_ROOTS=str(work),
        FLUX_MCP_PRESETS=str(work / "presets.toml"),
    )
    return env


def _params(env: dict[str, str], args: list[str] | None = None) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable, args=args or ["-m", "flux_mcp"], env=env, cwd=str(REPO)
    )


async def _bare_fal(emu: FalEmulator, arguments: dict[str, Any]) -> None:
    """The floor: what any client must do — submit, wait, fetch the result, download the image."""
    import fal_client

    client = fal_client.AsyncClient(key=emu.key)
    handle = await client.submit(ENDPOINT, arguments=arguments)
    while True:
        status = await handle.status()
        if isinstance(status, fal_client.Completed):
            break
        await asyncio.sleep(0.05)
    result = await handle.get()
    async with httpx.AsyncClient(verify=emu.ca_path) as http:
        for image in result["images"]:
            (await http.get(image["url"])).raise_for_status()


async def bench_round_trip(emu: FalEmulator, work: Path, reps: int) -> tuple[float, float]:
    url = emu.base_url + "/files/" + Path(await _upload(emu, _png(1024, 1024))).name
    args = {"prompt": "bench", "image_urls": [url], "seed": 1, "num_inference_steps": 4}
    env = _server_env(emu, work)
    mcp_times = []
    async with Client(stdio_client(_params(env), errlog=open(os.devnull, "w"))) as client:
        await client.call_tool("edit_image", args)  # warm-up
        for _ in range(reps):
            t0 = time.perf_counter()
            result = await client.call_tool("edit_image", args)
            mcp_times.append(time.perf_counter() - t0)
            assert not result.is_error, result.content
    bare_times = []
    await _bare_fal(emu, args)
    for _ in range(reps):
        t0 = time.perf_counter()
        await _bare_fal(emu, args)
        bare_times.append(time.perf_counter() - t0)
    return statistics.median(mcp_times), statistics.median(bare_times)


async def _upload(emu: FalEmulator, data: bytes) -> str:
    import fal_client

    return await fal_client.AsyncClient(key=emu.key).upload(data, "image/png")


MINIMAL = textwrap.dedent("""
    from mcp.server.mcpserver import MCPServer
    server = MCPServer("minimal")

    @server.tool()
    def echo(text: str) -> str:
        return text

    server.run("stdio")
""")


async def _time_to_tools_list(params: StdioServerParameters) -> float:
    t0 = time.perf_counter()
    async with Client(stdio_client(params, errlog=open(os.devnull, "w"))) as client:
        await client.list_tools()
        return time.perf_counter() - t0


async def bench_cold_start(emu: FalEmulator, work: Path, reps: int) -> tuple[float, float]:
    env = _server_env(emu, work)
    script = work / "minimal_server.py"
    script.write_text(MINIMAL)
    ours, minimal = [], []
    for _ in range(reps):
        ours.append(await _time_to_tools_list(_params(env)))
        minimal.append(await _time_to_tools_list(_params(env, [str(script)])))
    return statistics.median(ours), statistics.median(minimal)


async def bench_rss(emu: FalEmulator, work: Path) -> tuple[float, float, float]:
    env = _server_env(emu, work)
    (work / "in.png").write_bytes(_png(512, 512))
    args = {"prompt": "rss", "image_urls": [str(work / "in.png")], "seed": 3, "num_inference_steps": 4}
    me = psutil.Process()
    async with Client(stdio_client(_params(env), errlog=open(os.devnull, "w"))) as client:
        await client.list_tools()
        (server,) = [p for p in me.children(recursive=True) if "flux_mcp" in " ".join(p.cmdline())]
        await asyncio.sleep(0.5)
        idle = server.memory_info().rss / 2**20
        for _ in range(20):
            await client.call_tool("edit_image", args)
        after20 = server.memory_info().rss / 2**20
        for _ in range(20):
            await client.call_tool("edit_image", args)
        after40 = server.memory_info().rss / 2**20
    return idle, after20, after40


async def _compare_vs_single(emu: FalEmulator, work: Path, extra: dict[str, Any]) -> tuple[float, float]:
    """Seconds of one compare_seeds call (``extra`` arguments) and of one edit_image of the same image,
    at 1.0 s model latency and 4 fal slots, over stdio."""
    env = {**_server_env(emu, work), "FLUX_MCP_FAL_CONCURRENCY": "4"}
    image = work / f"in-{len(extra)}.png"
    image.write_bytes(_png(512, 512))
    base = {"prompt": "cmp", "image_urls": [str(image)], "num_inference_steps": 4}
    emu.latency_s = 1.0
    try:
        async with Client(stdio_client(_params(env), errlog=open(os.devnull, "w"))) as client:
            t0 = time.perf_counter()
            await client.call_tool("edit_image", {**base, "seed": 1})
            single = time.perf_counter() - t0
            t0 = time.perf_counter()
            result = await client.call_tool("compare_seeds", {**base, **extra})
            compared = time.perf_counter() - t0
            assert not result.is_error
    finally:
        emu.latency_s = 0.0
    return compared, single


async def bench_compare(emu: FalEmulator, work: Path) -> tuple[float, float]:
    """compare_seeds with 4 seeds vs one edit: all four run at once."""
    return await _compare_vs_single(emu, work, {"seeds": [1, 2, 3, 4]})


async def bench_grid(emu: FalEmulator, work: Path) -> tuple[float, float]:
    """A 16-cell grid (guidance x steps, one seed) vs one edit at 1.0 s latency, 4 fal slots: ideal 4x."""
    vary = [
        {"field": "guidance_scale", "values": [2.0, 3.5, 5.0, 6.5]},
        {"field": "num_inference_steps", "values": [4, 8, 12, 16]},
    ]
    return await _compare_vs_single(emu, work, {"seeds": [7], "vary": vary})


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    ns = parser.parse_args()
    reps = 3 if ns.quick else 10
    rows: list[tuple[str, str, str, bool]] = []
    with tempfile.TemporaryDirectory() as tmp, FalEmulator() as emu:
        work = Path(tmp)
        os.environ["SSL_CERT_FILE"] = emu.ca_path
        import fal_client.client as fc

        fc.QUEUE_URL_FORMAT = fc.RUN_URL_FORMAT = emu.base_url + "/"
        fc.REST_URL = fc.CDN_URL = emu.base_url

        mcp_s, bare_s = await bench_round_trip(emu, work, reps)
        ratio = mcp_s / bare_s
        rows.append(
            (
                "edit_image round trip vs bare fal_client (1 MP)",
                f"{mcp_s * 1000:.0f} ms vs {bare_s * 1000:.0f} ms = {ratio:.2f}x",
                "<= 1.5x",
                ratio <= 1.5,
            )
        )
        ours, minimal = await bench_cold_start(emu, work, max(3, reps // 2))
        ratio = ours / minimal
        rows.append(
            (
                "cold start to tools/list vs minimal MCPServer",
                f"{ours * 1000:.0f} ms vs {minimal * 1000:.0f} ms = {ratio:.2f}x",
                "<= 1.5x",
                ratio <= 1.5,
            )
        )
        idle, after20, after40 = await bench_rss(emu, work)
        rows.append(("idle RSS of the hosted server", f"{idle:.0f} MB", "<= 120 MB", idle <= 120))
        rows.append(
            (
                "RSS after 40 edits vs after 20",
                f"{after40:.0f} MB vs {after20:.0f} MB (+{after40 - after20:.1f})",
                "<= +10 MB",
                after40 <= after20 + 10,
            )
        )
        for name, bench, limit in (
            ("compare_seeds x4 vs one edit_image (1.0 s latency)", bench_compare, 1.3),
            ("grid of 16 cells vs one edit_image (1.0 s, 4 slots)", bench_grid, 4.4),
        ):
            compared, single = await bench(emu, work)
            ratio = compared / single
            rows.append(
                (name, f"{compared:.2f} s vs {single:.2f} s = {ratio:.2f}x", f"<= {limit:g}x", ratio <= limit)
            )
    width = max(len(r[0]) for r in rows)
    print(f"{'benchmark':<{width}}  {'measured':<40}  target    ok")
    for name, measured, target, ok in rows:
        print(f"{name:<{width}}  {measured:<40}  {target:<8}  {'yes' if ok else 'NO'}")
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
