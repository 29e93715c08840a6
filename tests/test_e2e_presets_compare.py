"""list_presets, presets and the LoRA library, compare_seeds and the cost ceiling — through the real
mcp client over stdio against the loopback fal emulator."""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from PIL import Image

from .conftest import server_env, stdio_client, text_of

pytestmark = pytest.mark.anyio

BASE = {"prompt": "S2P a painting of the photo", "num_inference_steps": 8}


def _env(tmp_path: Path, emulator: Any, **extra: str) -> dict[str, str]:
    (tmp_path / "inputs").mkdir(exist_ok=True)
    return server_env(tmp_path, **emulator.env(), **extra)


def _write(path: Path, text: str) -> None:
    path.write_text(text)
    # The library notices changes by mtime and size; make sure a rewrite within the same tick counts.
    stamp = time.time() + 1
    import os

    os.utime(path, (stamp, stamp))


def _strict(tool_args: dict[str, Any]) -> dict[str, Any]:
    """What a strict function-calling host sends: every field, at its default unless the model chose."""
    from flux_mcp.schema import EditImageArgs, tool_input_schema

    props = tool_input_schema(EditImageArgs)["properties"]
    every = {name: prop.get("default") for name, prop in props.items()}
    every["cns"] = {k: v["default"] for k, v in props["cns"]["properties"].items()}
    return {**every, **tool_args}


async def test_a_strict_caller_sending_every_default_still_gets_the_preset(
    tmp_path: Path, emulator: Any, input_png: Path
) -> None:
    async with stdio_client(_env(tmp_path, emulator)) as client:
        result = await client.call_tool(
            "edit_image",
            _strict({"prompt": BASE["prompt"], "image_urls": [str(input_png)], "preset": "quality"}),
        )
        overridden = await client.call_tool(
            "edit_image",
            {**BASE, "image_urls": [str(input_png)], "preset": "quality", "acceleration": "high"},
        )
        nothing_left = await client.call_tool(
            "edit_image",
            {**BASE, "image_urls": [str(input_png)], "preset": "quality", "acceleration": "high"}
            | {"num_inference_steps": 40},
        )
    assert not result.is_error, text_of(result)
    sent = emulator.submissions[0].payload
    assert sent["num_inference_steps"] == 50 and sent["acceleration"] == "none"
    assert "50 steps, preset quality" in text_of(result)
    assert result.structured_content["notes"] == []
    # A value other than the default wins, and the result says which of the preset's it replaced.
    assert emulator.submissions[1].payload["acceleration"] == "high"
    assert emulator.submissions[1].payload["num_inference_steps"] == 8
    (note,) = overridden.structured_content["notes"][:1]
    assert "preset 'quality'" in note and "acceleration='high'" in note
    # Overriding every field it sets: the preset did nothing, and the result says so.
    assert any("had no effect" in n for n in nothing_left.structured_content["notes"])
    assert "had no effect" in text_of(nothing_left)


async def test_user_file_reload_broken_file_and_library_lora(
    tmp_path: Path, emulator: Any, input_png: Path
) -> None:
    presets = tmp_path / "presets.toml"
    async with stdio_client(_env(tmp_path, emulator)) as client:
        listing = (await client.call_tool("list_presets", {})).structured_content
        assert {"draft", "balanced", "quality", "cns_guided", "cns_detail"} <= {
            p["name"] for p in listing["presets"]
        }
        assert listing["backend"]["name"] == "fal" and listing["backend"]["cns"] is True
        assert {"name": "square_hd", "width": 1024, "height": 1024} in listing["image_sizes"]

        _write(
            presets,
            """
[loras.paint]
path = "https://cdn.example/paint.safetensors"
scale = 0.7
trigger_word = "S2P"
description = "sketch to painting"

[presets.mine]
description = "my preset"
guidance_scale = 3.5
loras = [{ path = "paint" }]
""",
        )
        listing = (await client.call_tool("list_presets", {})).structured_content
        (mine,) = [p for p in listing["presets"] if p["name"] == "mine"]
        assert mine["source"] == str(presets) and mine["params"]["guidance_scale"] == 3.5
        assert listing["loras"][0]["trigger_word"] == "S2P"

        used = await client.call_tool(
            "edit_image", {**BASE, "image_urls": [str(input_png)], "preset": "mine"}
        )
        assert not used.is_error, text_of(used)
        sent = emulator.submissions[-1].payload
        assert sent["loras"] == [{"path": "https://cdn.example/paint.safetensors", "scale": 0.7}]
        assert sent["guidance_scale"] == 3.5 and sent["prompt"] == BASE["prompt"]  # prompt not rewritten
        assert "trigger word" not in text_of(used)  # the prompt has it: nothing to warn about
        assert used.structured_content["library_loras"][0]["name"] == "paint"

        missing = await client.call_tool(
            "edit_image", {**BASE, "prompt": "a painting", "image_urls": [str(input_png)], "preset": "mine"}
        )
        (warning,) = missing.structured_content["notes"]
        assert "trigger word 'S2P'" in warning and "does not contain" in warning
        assert "trigger word 'S2P'" in text_of(missing)

        by_name = await client.call_tool(
            "edit_image", {**BASE, "image_urls": [str(input_png)], "loras": [{"path": "paint", "scale": 1.5}]}
        )
        assert emulator.submissions[-1].payload["loras"][0] == {
            "path": "https://cdn.example/paint.safetensors",
            "scale": 1.5,
        }
        assert not by_name.is_error

        _write(presets, "[presets.mine]\nguidance_scale = [\n")
        listing = await client.call_tool("list_presets", {})
        assert not listing.is_error
        error = listing.structured_content["presets_file_error"]
        assert str(presets) in error and "line" in error
        broken = await client.call_tool(
            "edit_image", {**BASE, "image_urls": [str(input_png)], "preset": "mine"}
        )
        assert broken.is_error and "preset" in text_of(broken) and "line" in text_of(broken)
        builtin = await client.call_tool(
            "edit_image", {**BASE, "image_urls": [str(input_png)], "preset": "draft"}
        )
        assert not builtin.is_error and emulator.submissions[-1].payload["acceleration"] == "high"


async def test_compare_seeds_explicit_and_random(tmp_path: Path, emulator: Any, input_png: Path) -> None:
    async with stdio_client(_env(tmp_path, emulator)) as client:
        explicit = await client.call_tool(
            "compare_seeds", {**BASE, "image_urls": [str(input_png)], "seeds": [11, 22, 33]}
        )
        random = await client.call_tool("compare_seeds", {**BASE, "image_urls": [str(input_png)], "count": 2})
        neither = await client.call_tool("compare_seeds", {**BASE, "image_urls": [str(input_png)]})
    assert not explicit.is_error, text_of(explicit)
    out = explicit.structured_content
    assert [r["seed"] for r in out["runs"]] == [11, 22, 33] and out["failed_seeds"] == []
    assert sorted(s.payload["seed"] for s in emulator.submissions[:3]) == [11, 22, 33]
    assert all(s.payload["num_images"] == 1 for s in emulator.submissions[:3])
    paths = [Path(r["image"]["path"]) for r in out["runs"]]
    assert len(set(paths)) == 3 and all(p.is_file() and p.with_suffix(".json").is_file() for p in paths)
    images = [b for b in explicit.content if b.type == "image"]
    assert len(images) == 1, "one contact sheet"
    sheet = Image.open(io.BytesIO(base64.b64decode(images[0].data)))
    assert sheet.format == "JPEG" and len(base64.b64decode(images[0].data)) < 700_000
    assert "edit_image" in text_of(explicit) and "flux://images/" in text_of(explicit)
    # Each seed is its own fal request, charged for its input (~1 MP) and its output.
    assert out["estimated_cost_usd"] == pytest.approx(3 * 0.02 * (1 + 64 * 48 / 1e6), abs=1e-4)
    seeds = random.structured_content["seeds"]
    assert len(seeds) == 2 and len(set(seeds)) == 2
    assert sorted(s.payload["seed"] for s in emulator.submissions[3:5]) == sorted(seeds)
    assert neither.is_error and "seeds" in text_of(neither) and "count" in text_of(neither)


async def test_one_failing_run_among_four_keeps_the_others(
    tmp_path: Path, emulator: Any, input_png: Path
) -> None:
    emulator.fail_seed(3, "GPU fell over")
    async with stdio_client(_env(tmp_path, emulator)) as client:
        result = await client.call_tool(
            "compare_seeds", {**BASE, "image_urls": [str(input_png)], "seeds": [1, 2, 3, 4]}
        )
    assert not result.is_error, text_of(result)
    out = result.structured_content
    assert out["failed_seeds"] == [3]
    (failed,) = [r for r in out["runs"] if r["seed"] == 3]
    assert failed["image"] is None and "GPU fell over" in failed["error"]
    assert all(Path(r["image"]["path"]).is_file() for r in out["runs"] if r["seed"] != 3)
    assert len(list((tmp_path / "out").glob("*.png"))) == 3
    assert "FAILED" in text_of(result)


async def test_cancelling_compare_cancels_every_run(tmp_path: Path, emulator: Any, input_png: Path) -> None:
    emulator.hold_jobs()  # the runs never finish by themselves
    arguments = {**BASE, "image_urls": [str(input_png)], "seeds": [1, 2, 3, 4]}
    async with stdio_client(_env(tmp_path, emulator, FLUX_MCP_FAL_CONCURRENCY="2")) as client:
        async with anyio.create_task_group() as group:
            group.start_soon(client.call_tool, "compare_seeds", arguments)
            # Cancel once both slots' jobs are on fal and followed (their status streams open), not
            # after a guessed delay.
            assert await anyio.to_thread.run_sync(
                lambda: emulator.wait_until(lambda: len(emulator.route_events("status")) >= 2, 30)
            )
            group.cancel_scope.cancel()
        ok = await anyio.to_thread.run_sync(
            lambda: emulator.wait_until(lambda: len(emulator.cancellations) >= 2, 30)
        )
        assert ok
        cancelled = {s.request_id for s in emulator.submissions}
        emulator.release_jobs()
        # A later call is served: by then runs 3 and 4 would have been submitted if they were going to be.
        after = await client.call_tool("edit_image", {**BASE, "image_urls": [str(input_png)], "seed": 9})
    assert not after.is_error, text_of(after)
    assert len(cancelled) == 2, "the concurrency limit holds back runs 3 and 4"
    assert set(emulator.cancellations) == cancelled
    assert [s.payload["seed"] for s in emulator.submissions[2:]] == [9], "runs 3 and 4 never reached fal"
    assert [p.name for p in (tmp_path / "out").glob("*.png")] == [
        Path(after.structured_content["images"][0]["path"]).name
    ]


async def test_cost_ceiling_refuses_before_anything_is_sent(
    tmp_path: Path, emulator: Any, input_png: Path
) -> None:
    async with stdio_client(_env(tmp_path, emulator, FLUX_MCP_MAX_COST_USD="0.05")) as client:
        refused = await client.call_tool(
            "compare_seeds", {**BASE, "image_urls": [str(input_png)], "count": 4, "image_size": "square_hd"}
        )
        allowed = await client.call_tool("edit_image", {**BASE, "image_urls": [str(input_png)]})
    assert refused.is_error and "FLUX_MCP_MAX_COST_USD" in text_of(refused) and "$0.164" in text_of(refused)
    assert not allowed.is_error
    assert len(emulator.submissions) == 1 and emulator.uploads and len(emulator.uploads) == 1


async def test_the_example_agent_pipeline_runs_against_the_emulator(
    tmp_path: Path, emulator: Any, input_png: Path
) -> None:
    import subprocess
    import sys

    from .conftest import REPO

    env = _env(tmp_path, emulator)
    done = await anyio.to_thread.run_sync(
        lambda: subprocess.run(
            [
                sys.executable,
                str(REPO / "examples" / "agent_pipeline.py"),
                str(input_png),
                "--prompt",
                "S2P paint",
                "--lora",
                "https://cdn.example/s2p.safetensors:0.9",
                "--count",
                "3",
            ],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
    )
    assert done.returncode == 0, done.stderr[-2000:]
    final = Path(done.stdout.strip().splitlines()[-1].removeprefix("final image: "))
    assert final.is_file()
    compares, last = emulator.submissions[:3], emulator.submissions[3]
    assert all(s.payload["acceleration"] == "high" for s in compares)  # the draft preset
    picked = int(done.stdout.split("picked seed ")[1].split()[0])
    assert last.payload["seed"] == picked and last.payload["num_inference_steps"] == 50
    assert last.payload["loras"] == [{"path": "https://cdn.example/s2p.safetensors", "scale": 0.9}]
    # chained: the picked result was uploaded as the input of the final edit
    assert emulator.uploads[-1][1] in {p.read_bytes() for p in (tmp_path / "out").glob("*.png")}
