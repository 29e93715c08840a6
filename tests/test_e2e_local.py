"""The local backend end to end: a flux-mcp server subprocess with FLUX_MCP_BACKEND=local on a tiny
random klein pipeline saved with save_pretrained (loaded through the same code as the real model),
driven by the real mcp client over stdio."""

from __future__ import annotations

import io
import json
import os
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from PIL import Image

from .conftest import clean_env, make_png, run_cli, server_env, stdio_client, text_of

pytestmark = [pytest.mark.anyio, pytest.mark.local]

SMALL = {"prompt": "a watercolour", "num_inference_steps": 4, "image_size": {"width": 64, "height": 64}}


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """LoRAs for the tiny transformer in three key formats, a pickle file and one matching nothing."""
    import torch
    from safetensors.torch import save_file

    from flux_mcp.backends.tiny import build_tiny_pipeline, make_lora_state_dict, save_lora

    folder = tmp_path_factory.mktemp("loras")
    transformer = build_tiny_pipeline().transformer
    files = {
        fmt: save_lora(folder / f"{fmt}.safetensors", make_lora_state_dict(transformer, fmt, seed=i))
        for i, fmt in enumerate(("diffusers", "peft", "kohya"))
    }
    torch.save({"x": torch.zeros(1)}, folder / "evil.bin")
    files["pickle"] = folder / "evil.bin"
    save_file(
        {"lora_unet_nothing_here.lora_down.weight": torch.ones(4, 4)}, str(folder / "nomatch.safetensors")
    )
    files["nomatch"] = folder / "nomatch.safetensors"
    return files


def _env(tmp_path: Path, model: Path, loras: Path | None = None, **extra: str) -> dict[str, str]:
    inputs = tmp_path / "inputs"
    inputs.mkdir(exist_ok=True)
    roots = os.pathsep.join(str(p) for p in (inputs, loras) if p is not None)
    return server_env(
        tmp_path,
        FLUX_MCP_BACKEND="local",
        FLUX_MCP_MODEL=str(model),
        FLUX_MCP_DEVICE="cpu",
        FLUX_MCP_INPUT_ROOTS=roots,
        OMP_NUM_THREADS="1",
        **extra,
    )


class StepRecorder:
    """A progress callback that records the denoising steps a call reports ("step k/N")."""

    def __init__(self) -> None:
        self.done: list[float] = []

    async def __call__(self, value: float, total: float | None, message: str | None) -> None:
        if (message or "").startswith("step "):
            self.done.append(value)

    async def reached(self, step: int) -> None:
        """Wait until ``step`` steps are done (the limit is only a safety net)."""
        with anyio.fail_after(120):
            while not self.done or max(self.done) < step:
                await anyio.sleep(0.02)


def _pixels(path: str) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def _inputs(tmp_path: Path, count: int) -> list[str]:
    paths = []
    for i in range(count):
        path = tmp_path / "inputs" / f"ref{i}.png"
        path.write_bytes(make_png(64, 64, (40 * i, 100, 200 - 30 * i)))
        paths.append(str(path))
    return paths


async def test_local_edits_references_sizes_batches_and_loras(
    tmp_path: Path, tiny_model: Path, lora_files: dict[str, Path]
) -> None:
    env = _env(tmp_path, tiny_model, lora_files["diffusers"].parent)
    refs = _inputs(tmp_path, 4)

    async def edit(client: Any, **args: Any) -> dict[str, Any]:
        result = await client.call_tool("edit_image", {**SMALL, "image_urls": refs[:1], "seed": 3, **args})
        assert not result.is_error, text_of(result)
        return result.structured_content

    async with stdio_client(env) as client:
        one = await edit(client)
        four = await edit(client, image_urls=refs)
        negative = await edit(client, negative_prompt="blurry, dark", guidance_scale=4)
        odd = await edit(client, image_size={"width": 70, "height": 50})
        batch = await edit(client, seed=10, num_images=3)
        singles = [await edit(client, seed=s) for s in (10, 11, 12)]
        loras = [
            {"path": str(lora_files[f]), "scale": s}
            for f, s in (("diffusers", 1.0), ("peft", 0.7), ("kohya", 1.2))
        ]
        with_loras = await edit(client, loras=loras)
        stronger = await edit(client, loras=[{**lora, "scale": lora["scale"] * 2} for lora in loras])
        zero = await edit(client, loras=[{**lora, "scale": 0} for lora in loras])
        after = await edit(client)  # the last request's LoRAs must not leak into this one
        pickle = await client.call_tool(
            "edit_image", {**SMALL, "image_urls": refs[:1], "loras": [{"path": str(lora_files["pickle"])}]}
        )
        nomatch = await client.call_tool(
            "edit_image", {**SMALL, "image_urls": refs[:1], "loras": [{"path": str(lora_files["nomatch"])}]}
        )
        alive = await edit(client)

    base = _pixels(one["images"][0]["path"])
    assert one["backend"] == "local" and one["endpoint"] == str(tiny_model)
    assert (one["images"][0]["width"], one["images"][0]["height"]) == (64, 64)
    assert not np.array_equal(_pixels(four["images"][0]["path"]), base), "4 references change the result"
    assert not np.array_equal(_pixels(negative["images"][0]["path"]), base), "the negative prompt acts"
    size = (odd["images"][0]["width"], odd["images"][0]["height"])
    assert size != (70, 50) and all(side % 4 == 0 for side in size)
    assert any("70x50" in note or "rounded" in note for note in odd["notes"])
    assert [img["seed"] for img in batch["images"]] == [10, 11, 12]
    for batched, single in zip(batch["images"], singles, strict=True):
        assert np.abs(_pixels(batched["path"]) - _pixels(single["images"][0]["path"])).max() <= 1
    lora_img = _pixels(with_loras["images"][0]["path"])
    assert np.abs(lora_img - base).mean() > 1, "three LoRAs in three formats change the output"
    assert not np.array_equal(_pixels(stronger["images"][0]["path"]), lora_img), (
        "the output follows the scale"
    )
    assert np.abs(_pixels(zero["images"][0]["path"]) - base).max() <= 1, "scale 0 equals no LoRA"
    assert np.abs(_pixels(after["images"][0]["path"]) - base).max() <= 1, "no LoRA leaks into the next call"
    assert pickle.is_error and "loras.0.path" in text_of(pickle) and "safetensors" in text_of(pickle)
    assert nomatch.is_error and "match" in text_of(nomatch)
    assert np.array_equal(_pixels(alive["images"][0]["path"]), base)
    assert any("safety" in note for note in one["notes"])
    sidecar = json.loads(Path(one["images"][0]["path"]).with_suffix(".json").read_text())
    assert sidecar["backend"] == "local" and sidecar["request"]["num_inference_steps"] == 4


async def test_local_cancellation_queueing_and_cns(tmp_path: Path, tiny_model: Path) -> None:
    env = _env(tmp_path, tiny_model)
    refs = _inputs(tmp_path, 1)
    long = {
        **SMALL,
        "image_urls": refs,
        "num_inference_steps": 50,
        "image_size": {"width": 128, "height": 128},
    }
    messages: list[str] = []

    async def second_progress(value: float, total: float | None, message: str | None) -> None:
        messages.append(message or "")

    async with stdio_client(env) as client:
        await client.call_tool("edit_image", {**SMALL, "image_urls": refs})  # loads the model
        steps = StepRecorder()
        async with anyio.create_task_group() as group:
            group.start_soon(partial(client.call_tool, "edit_image", long, progress_callback=steps))
            await steps.reached(2)  # cancelled mid-run, whatever the machine's speed
            group.cancel_scope.cancel()
        assert max(steps.done) < 50, "cancelled mid-run"
        with anyio.fail_after(60):  # the GPU is free again within about one step (generous: a safety net)
            quick = await client.call_tool("edit_image", {**SMALL, "image_urls": refs})
        assert not quick.is_error

        results: dict[str, Any] = {}

        async def run(name: str, args: dict[str, Any], progress: Any = None) -> None:
            results[name] = await client.call_tool("edit_image", args, progress_callback=progress)

        first = StepRecorder()
        async with anyio.create_task_group() as group:
            group.start_soon(run, "first", {**long, "num_inference_steps": 12}, first)
            await first.reached(1)  # the first edit holds the GPU: the second must wait in line
            group.start_soon(run, "second", {**SMALL, "image_urls": refs, "seed": 1}, second_progress)
        cns = await client.call_tool(
            "edit_image",
            {
                **SMALL,
                "image_urls": refs,
                "preset": "cns_guided",
                "num_inference_steps": 4,
                "cns_gamma_source": "matrix",
            },
        )
    assert not results["first"].is_error and not results["second"].is_error
    assert any("waiting for the GPU" in m or "queue" in m.lower() for m in messages), messages
    assert not cns.is_error, text_of(cns)
    info = cns.structured_content["details"]["cns"]
    assert info["enabled"] is True and "stand-in" in info["gamma"]
    outputs = sorted((tmp_path / "out").glob("*.png"))
    assert len(outputs) == 5, "the cancelled run saved nothing"


async def test_a_long_local_edit_becomes_a_job(tmp_path: Path, tiny_model: Path) -> None:
    env = _env(tmp_path, tiny_model, FLUX_MCP_CALL_BUDGET_S="1")
    refs = _inputs(tmp_path, 1)
    args = {
        **SMALL,
        "image_urls": refs,
        "num_inference_steps": 40,
        "image_size": {"width": 128, "height": 128},
    }
    async with stdio_client(env) as client:
        pending = await client.call_tool("edit_image", args)
        job = pending.structured_content["job"]
        assert job is not None and job["state"] in ("queued", "running")
        with anyio.fail_after(120):
            while True:
                result = await client.call_tool("get_result", {"job_id": job["id"], "wait_s": 1})
                if (result.structured_content or {}).get("job") is None:
                    break
    assert not result.is_error, text_of(result)
    assert Path(result.structured_content["images"][0]["path"]).is_file()


def test_calibrate_cns_writes_a_matrix_that_matrix_mode_then_uses(tmp_path: Path, tiny_model: Path) -> None:
    env = _env(tmp_path, tiny_model)
    done = run_cli(
        "calibrate-cns", "--steps", "6", "--bins", "8", "--seeds", "2", "--size", "64", env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.strip())
    assert path.is_file() and path.is_relative_to(
        Path(env["XDG_CACHE_HOME"]) if "XDG_CACHE_HOME" in env else Path.home()
    )
    from flux_mcp.backends.cns import load_gamma_matrix

    matrix, meta, sigmas = load_gamma_matrix(path)
    assert tuple(matrix.shape) == (6, 8) and meta["model"] == str(tiny_model)
    assert sigmas is not None and sigmas.shape == (6,) and meta["latent_channels"] == "16"
    assert float(matrix[0].max()) <= 0.05 and float(matrix[-1].min()) >= 0.95, "each band rises from 0 to 1"

    async def use_it() -> dict[str, Any]:
        async with stdio_client(env) as client:
            result = await client.call_tool(
                "edit_image",
                {**SMALL, "image_urls": _inputs(tmp_path, 1), "enable_cns": True, "num_inference_steps": 4},
            )
        assert not result.is_error, text_of(result)
        return result.structured_content["details"]["cns"]

    info = anyio.run(use_it)
    assert "calibrated" in info["gamma"]


def test_demo_runs_offline_and_says_the_weights_are_random(tmp_path: Path) -> None:
    done = run_cli(
        "demo", "--output-dir", str(tmp_path / "demo"), env=clean_env(OMP_NUM_THREADS="1"), timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "RANDOM weights" in done.stdout
    saved = sorted((tmp_path / "demo" / "results").glob("*.png"))
    assert len(saved) == 5, "one edit + four compared seeds"
    for path in saved:
        assert str(path) in done.stdout
        with Image.open(io.BytesIO(path.read_bytes())) as img:
            assert img.size == (128, 128)
