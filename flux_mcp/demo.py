"""``flux-mcp demo``: the whole path once, through a real MCP client, on any machine.

It starts the real server (``python -m flux_mcp``) over stdio as a subprocess and, as an agent
would, calls list_presets, edit_image (with a LoRA when running locally) and compare_seeds on an
example image, then prints where every result was saved.

- Without FAL_KEY (or with ``--backend local``) it runs the local backend on a tiny, randomly
  initialised klein pipeline built offline from configs: no GPU, no download, no key. The images
  are noise-like because the weights are random; what the demo shows is the plumbing.
- With FAL_KEY (or ``--backend fal``) the same calls go to the hosted endpoint and cost a few cents.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import anyio
from platformdirs import user_data_dir

from .backends import local_available
from .config import APP, Settings

__all__ = ["run_demo"]


def _say(text: str = "") -> None:
    print(text, flush=True)


def _prepare_local(work: Path) -> dict[str, str]:
    """Build (once) the tiny model and a demo LoRA; return the server's environment additions."""
    from .backends import tiny

    model_dir = Settings.from_env().cache_dir / "tiny-klein"
    _say(f"Building the tiny random klein pipeline in {model_dir} (offline, once) ...")
    tiny.save_tiny_model(model_dir)
    lora_path = work / "inputs" / "demo_lora.safetensors"
    if not lora_path.exists():
        pipe = tiny.build_tiny_pipeline()
        tiny.save_lora(lora_path, tiny.make_lora_state_dict(pipe.transformer, "diffusers", seed=1))
    return {
        "FLUX_MCP_BACKEND": "local",
        "FLUX_MCP_MODEL": str(model_dir),
        "FLUX_MCP_DEVICE": os.environ.get("FLUX_MCP_DEVICE", "cpu"),
    }


def _example_image(path: Path, side: int) -> None:
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        from .backends.tiny import make_example_image

        make_example_image(side, side).save(path)
    except ImportError:  # hosted-only install: draw a simple picture without the local extra
        from PIL import Image, ImageDraw

        img = Image.new("RGB", (512, 512), (90, 140, 200))  # hosted-only installs run the fal demo
        draw = ImageDraw.Draw(img)
        draw.ellipse((140, 120, 372, 352), fill=(240, 200, 60))
        draw.rectangle((0, 380, 512, 512), fill=(60, 120, 60))
        img.save(path)


async def _drive(env: dict[str, str], image: Path, local: bool) -> int:
    from mcp import Client, StdioServerParameters

    params = StdioServerParameters(command=sys.executable, args=["-m", "flux_mcp"], env=env)
    lora = image.parent / "demo_lora.safetensors"
    edit: dict[str, Any] = {
        "prompt": "turn the scene into a watercolour painting",
        "image_urls": [str(image)],
    }
    if local:
        # The tiny model's VAE only halves the size, so small images keep its CPU runs to seconds.
        edit |= {
            "num_inference_steps": 4,
            "image_size": {"width": 128, "height": 128},
            "loras": [{"path": str(lora), "scale": 0.8}],
        }

    async def progress(value: float, total: float | None, message: str | None) -> None:
        shown = f"{value:g}/{total:g}" if total else f"{value:g}"
        print(f"    [{shown}] {message or ''}", file=sys.stderr, flush=True)

    async with Client(params) as client:
        listing = await client.call_tool("list_presets", {})
        backend = (listing.structured_content or {}).get("backend", {})
        _say(f"Server up; backend: {backend.get('name')} ({backend.get('model') or backend.get('endpoint')})")
        presets = [p["name"] for p in (listing.structured_content or {}).get("presets", [])]
        _say(f"Presets: {', '.join(presets)}")

        _say("\nedit_image ...")
        first = await client.call_tool("edit_image", {**edit, "seed": 7}, progress_callback=progress)
        if first.is_error:
            _say(f"edit_image failed: {first.content[0].text}")  # type: ignore[union-attr]
            return 1
        for img in first.structured_content["images"]:  # type: ignore[index]
            _say(f"  saved {img['path']}  ({img['width']}x{img['height']}, seed {img['seed']}, {img['uri']})")

        chained = first.structured_content["images"][0]["uri"]  # type: ignore[index]
        _say(f"\ncompare_seeds on the first result ({chained}) ...")
        compare_args = {**edit, "image_urls": [chained], "seeds": [1, 2, 3, 4]}
        compare_args.pop("loras", None)
        sheet = await client.call_tool("compare_seeds", compare_args, progress_callback=progress)
        if sheet.is_error:
            _say(f"compare_seeds failed: {sheet.content[0].text}")  # type: ignore[union-attr]
            return 1
        for run in sheet.structured_content["runs"]:  # type: ignore[index]
            where = run["image"]["path"] if run["image"] else f"FAILED: {run['error']}"
            _say(f"  seed {run['seed']}: {where}")
    return 0


def run_demo(backend: str = "auto", output_dir: str | None = None) -> int:
    """Run the demo; returns the process exit code."""
    if backend == "auto":
        backend = "fal" if os.environ.get("FAL_KEY") else "local"
    work = Path(output_dir).expanduser() if output_dir else Path(user_data_dir(APP)) / "demo"
    image = work / "inputs" / ("example.png" if backend == "fal" else "example_small.png")
    _example_image(image, 512 if backend == "fal" else 128)
    # The user's own settings (upload mode, proxies, limits) apply; the demo only picks its folders.
    env = dict(os.environ)
    env |= {
        "FLUX_MCP_OUTPUT_DIR": str(work / "results"),
        "FLUX_MCP_INPUT_ROOTS": str(work / "inputs"),
        "FLUX_MCP_PRESETS": os.environ.get("FLUX_MCP_PRESETS", str(work / "presets.toml")),
    }
    if backend == "local":
        if not local_available():
            _say("The local demo needs the local extra: pip install 'flux-mcp[local]' (or run `make demo`).")
            return 1
        env |= _prepare_local(work)
    else:
        if not os.environ.get("FAL_KEY"):
            _say("--backend fal needs FAL_KEY in the environment (https://fal.ai/dashboard/keys).")
            return 1
        env["FLUX_MCP_BACKEND"] = "fal"
        _say("Running against the hosted endpoint fal-ai/flux-2/klein/9b/base/edit/lora (costs a few cents).")
    _say(f"Example input: {image}")
    code = anyio.run(_drive, env, image, backend == "local")
    if code == 0:
        _say(f"\nAll results (images + JSON sidecars) are in {work / 'results'}")
        if backend == "local":
            _say(
                "NOTE: the tiny demo model has RANDOM weights, so the pictures look like noise. The demo shows the "
                "real server, tools, LoRA loading, storage and MCP results; set FLUX_MCP_MODEL to the real model "
                "(black-forest-labs/FLUX.2-klein-base-9B) on a CUDA GPU, or FAL_KEY for the hosted endpoint, "
                "for real edits."
            )
    return code
