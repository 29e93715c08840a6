"""A scripted agent: list presets -> compare seeds -> pick one -> edit again at quality, chained.

    FAL_KEY=... python examples/agent_pipeline.py photo.png --prompt "S2P oil painting" \
        [--lora https://.../lora.safetensors:0.9]

It starts flux-mcp over stdio with the real `mcp` client, exactly as an agent host would, and uses
only what the tools return: the seed of the picked image and its flux://images/<id> as the next input.
Without FAL_KEY set it still runs if FLUX_MCP_BACKEND=local is configured. The test suite runs it
against the loopback fal emulator.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import anyio
from mcp import Client, StdioServerParameters


def _pick(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Stand-in for the agent's judgement: the successful run with the largest file (most detail)."""
    ok = [r for r in runs if r["image"] is not None]
    if not ok:
        raise SystemExit("every seed failed: " + "; ".join(str(r["error"]) for r in runs))
    return max(ok, key=lambda r: Path(r["image"]["path"]).stat().st_size)


async def run(image: str, prompt: str, loras: list[dict[str, Any]], count: int) -> str:
    params = StdioServerParameters(command=sys.executable, args=["-m", "flux_mcp"], env=dict(os.environ))
    async with Client(params) as client:
        listing = (await client.call_tool("list_presets", {})).structured_content or {}
        names = {p["name"] for p in listing.get("presets", [])}
        print(f"backend {listing.get('backend', {}).get('name')}; presets: {', '.join(sorted(names))}")
        draft = "draft" if "draft" in names else None

        args: dict[str, Any] = {"prompt": prompt, "image_urls": [image], "loras": loras, "count": count}
        if draft:
            args["preset"] = draft
        compared = await client.call_tool("compare_seeds", args)
        if compared.is_error:
            raise SystemExit(f"compare_seeds failed: {compared.content[0].text}")  # type: ignore[union-attr]
        runs = compared.structured_content["runs"]  # type: ignore[index]
        for r in runs:
            print(f"  seed {r['seed']}: {r['image']['uri'] if r['image'] else 'failed: ' + str(r['error'])}")
        chosen = _pick(runs)
        print(f"picked seed {chosen['seed']} ({chosen['image']['uri']})")

        final = await client.call_tool(
            "edit_image",
            {
                "prompt": prompt,
                "image_urls": [chosen["image"]["uri"]],
                "seed": chosen["seed"],
                "loras": loras,
                "preset": "quality",
            },
        )
        if final.is_error:
            raise SystemExit(f"edit_image failed: {final.content[0].text}")  # type: ignore[union-attr]
        out = final.structured_content
        if out and out.get("job"):  # past the server's time budget: collect it
            job_id = out["job"]["id"]
            while out and out.get("job"):
                final = await client.call_tool("get_result", {"job_id": job_id, "wait_s": 50})
                if final.is_error:
                    raise SystemExit(f"job {job_id} failed: {final.content[0].text}")  # type: ignore[union-attr]
                out = final.structured_content
        path = out["images"][0]["path"]  # type: ignore[index]
        print(f"final image: {path}")
        return path


def _lora(text: str) -> dict[str, Any]:
    path, sep, scale = text.rpartition(":")
    if sep and path and not path.endswith(("http", "https")):
        return {"path": path, "scale": float(scale)}
    return {"path": text}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", help="input image: path, https URL, data URI or flux://images/<id>")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--lora", action="append", default=[], type=_lora, metavar="PATH[:SCALE]")
    parser.add_argument("--count", type=int, default=4, help="seeds to compare (2-8)")
    ns = parser.parse_args()
    anyio.run(run, ns.image, ns.prompt, ns.lora, ns.count)


if __name__ == "__main__":
    main()
