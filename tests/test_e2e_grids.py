"""compare_seeds with ``vary``: parameter grids through the real MCP client over stdio, on the loopback
fal emulator and on the tiny local model; and the grid's expansion rules on their own."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from flux_mcp.errors import InvalidRequest
from flux_mcp.grid import expand
from flux_mcp.schema import EditRequest, VaryAxis

from .conftest import run_cli, server_env, stdio_client, text_of

pytestmark = pytest.mark.anyio

BASE = {"prompt": "S2P a painting of the photo", "num_inference_steps": 8}
LORA_A = "https://loras.example/sketch2paint.safetensors"
LORA_B = "https://loras.example/grain.safetensors"


def _env(tmp_path: Path, emulator: Any, **extra: str) -> dict[str, str]:
    (tmp_path / "inputs").mkdir(exist_ok=True)
    return server_env(tmp_path, **emulator.env(), **extra)


def _sidecar(cell: dict[str, Any]) -> dict[str, Any]:
    return json.loads(Path(cell["path"]).with_suffix(".json").read_text())


def _without(payload: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in payload.items() if k not in names}


# -- hosted ------------------------------------------------------------------------------------


async def test_a_lora_scale_sweep_sends_only_the_varied_scale_and_the_winner_reruns(
    tmp_path: Path, emulator: Any, input_png: Path
) -> None:
    loras = [{"path": LORA_A, "scale": 1.0}, {"path": LORA_B, "scale": 0.7}]
    args = {**BASE, "image_urls": [str(input_png)], "loras": loras, "seeds": [42]}
    async with stdio_client(_env(tmp_path, emulator)) as client:
        grid = await client.call_tool(
            "compare_seeds", {**args, "vary": [{"field": "loras.0.scale", "values": [0.25, 0.5, 1.0]}]}
        )
        assert not grid.is_error, text_of(grid)
        out = grid.structured_content
        payloads = [s.payload for s in emulator.submissions]
        # Exactly the varied values, everything else identical (the seed included).
        assert sorted(p["loras"][0]["scale"] for p in payloads) == [0.25, 0.5, 1.0]
        assert all(p["seed"] == 42 and p["num_images"] == 1 for p in payloads)
        assert all(p["loras"][1] == {"path": LORA_B, "scale": 0.7} for p in payloads)
        bare = [_without(p, "loras") | {"lora": p["loras"][0]["path"]} for p in payloads]
        assert all(b == bare[0] for b in bare)
        assert len(emulator.uploads) == 1, "the input went up once for the whole grid"

        assert out["grid"]["axes"] == [{"field": "loras.0.scale", "values": [0.25, 0.5, 1.0]}]
        cells = out["grid"]["cells"]
        assert [c["values"] for c in cells] == [{"loras.0.scale": s} for s in (0.25, 0.5, 1.0)]
        for cell in cells:
            assert cell["seed"] == 42 and cell["error"] is None and Path(cell["path"]).is_file()
            sidecar = _sidecar(cell)
            assert sidecar["request"]["loras"][0]["scale"] == cell["values"]["loras.0.scale"]
            assert sidecar["request"]["seed"] == 42
        assert "loras.0.scale=0.5, seed 42" in text_of(grid)

        # Re-run the winner with edit_image from the structured data alone: params + the cell's values.
        winner = cells[1]
        params = {k: v for k, v in out["params"].items() if v is not None}
        params["loras"][0]["scale"] = winner["values"]["loras.0.scale"]
        rerun = await client.call_tool("edit_image", {**params, "seed": winner["seed"]})
    assert not rerun.is_error, text_of(rerun)
    winner_payload = next(p for p in payloads if p["loras"][0]["scale"] == 0.5)
    assert _without(emulator.submissions[-1].payload, "image_urls") == _without(winner_payload, "image_urls")


async def test_a_two_axis_grid_stores_every_cell_and_marks_a_failed_one(
    tmp_path: Path, emulator: Any, input_png: Path
) -> None:
    emulator.fail_seed(2, "the model fell over", error_type="generation_error")
    async with stdio_client(_env(tmp_path, emulator)) as client:
        result = await client.call_tool(
            "compare_seeds",
            {
                **BASE,
                "image_urls": [str(input_png)],
                "vary": [{"field": "guidance_scale", "values": [3, 5, 7]}],
                "seeds": [1, 2],
            },
        )
        after = await client.call_tool("edit_image", {**BASE, "image_urls": [str(input_png)], "seed": 5})
    assert not result.is_error, text_of(result)
    assert not after.is_error, "the server keeps serving"
    out = result.structured_content
    assert out["grid"]["axes"] == [
        {"field": "guidance_scale", "values": [3, 5, 7]},
        {"field": "seed", "values": [1, 2]},
    ]
    cells = out["grid"]["cells"]
    assert [(c["values"]["guidance_scale"], c["seed"]) for c in cells] == [
        (g, s) for g in (3, 5, 7) for s in (1, 2)
    ]
    sent = sorted((p.payload["guidance_scale"], p.payload["seed"]) for p in emulator.submissions[:6])
    assert sent == sorted((g, s) for g in (3, 5, 7) for s in (1, 2))
    for cell in cells:
        if cell["seed"] == 2:
            assert cell["image_id"] is None and "the model fell over" in cell["error"]
            continue
        sidecar = _sidecar(cell)
        assert (sidecar["request"]["guidance_scale"], sidecar["seed"]) == (
            cell["values"]["guidance_scale"],
            1,
        )
        assert cell["image_id"] in cell["path"]
    assert out["failed_seeds"] == [2, 2, 2]
    stored = sorted(p.name for p in (tmp_path / "out").glob("*.json"))
    assert len(stored) == 3 + 1, "only the three good cells (and the later edit) are on disk"
    assert text_of(result).count("FAILED") == 3
    [sheet_block] = [b for b in result.content if b.type == "image"]
    sheet = Image.open(io.BytesIO(base64.b64decode(sheet_block.data)))
    cell, label_w, label_h = 384, 150, 22  # 6 cells: 384 px each; labels along the left and top edges
    assert sheet.size == (label_w + 2 * cell, label_h + 3 * cell), "3 rows (guidance) x 2 columns (seeds)"
    rgb = sheet.convert("RGB")
    for row in range(3):
        top = label_h + row * cell
        red, green, _ = rgb.getpixel((label_w + cell + 5, top + cell // 2))  # seed 2: the failed box's edge
        assert red > 180 and green < 80
        assert rgb.getpixel((label_w + cell // 2, top + cell // 2)) != (255, 255, 255)  # seed 1: an image


async def test_a_grid_without_seeds_shares_one_random_seed(
    tmp_path: Path, emulator: Any, input_png: Path
) -> None:
    async with stdio_client(_env(tmp_path, emulator)) as client:
        result = await client.call_tool(
            "compare_seeds",
            {
                **BASE,
                "image_urls": [str(input_png)],
                "vary": [{"field": "acceleration", "values": ["none", "high"]}],
            },
        )
    assert not result.is_error, text_of(result)
    seeds = {p.payload["seed"] for p in emulator.submissions}
    assert len(seeds) == 1 and result.structured_content["seeds"] == list(seeds)
    assert sorted(p.payload["acceleration"] for p in emulator.submissions) == ["high", "none"]


async def test_the_cell_cap_and_the_cost_ceiling_refuse_before_anything_is_sent(
    tmp_path: Path, emulator: Any, input_png: Path
) -> None:
    env = _env(tmp_path, emulator, FLUX_MCP_MAX_GRID_CELLS="4", FLUX_MCP_MAX_COST_USD="0.05")
    vary = [{"field": "guidance_scale", "values": [3, 5, 7]}]
    async with stdio_client(env) as client:
        too_many = await client.call_tool(
            "compare_seeds", {**BASE, "image_urls": [str(input_png)], "vary": vary, "seeds": [1, 2]}
        )
        too_dear = await client.call_tool(
            "compare_seeds", {**BASE, "image_urls": [str(input_png)], "vary": vary, "image_size": "square_hd"}
        )
    assert (
        too_many.is_error
        and "6 images" in text_of(too_many)
        and "FLUX_MCP_MAX_GRID_CELLS=4" in text_of(too_many)
    )
    assert too_dear.is_error and "FLUX_MCP_MAX_COST_USD" in text_of(too_dear)
    assert emulator.submissions == [] and emulator.uploads == [], "nothing was sent for a refused grid"
    assert not list((tmp_path / "out").glob("*.json"))


async def test_bad_axes_name_the_field_and_what_to_change(
    tmp_path: Path, emulator: Any, input_png: Path
) -> None:
    cases = {
        "vary.0.field": [{"field": "image_urls", "values": ["a", "b"]}],
        "vary.0.values": [{"field": "guidance_scale", "values": [5, 25]}],
        "LoRA 1": [{"field": "loras.1.scale", "values": [0.5, 1]}],
        "vary.1.field: 'guidance_scale' is already an axis": [
            {"field": "guidance_scale", "values": [3, 5]},
            {"field": "guidance_scale", "values": [6, 7]},
        ],
    }
    async with stdio_client(_env(tmp_path, emulator)) as client:
        for expected, vary in cases.items():
            result = await client.call_tool(
                "compare_seeds",
                {**BASE, "image_urls": [str(input_png)], "vary": vary, "loras": [{"path": LORA_A}]},
            )
            assert result.is_error and expected in text_of(result), (expected, text_of(result))
        one_seed = await client.call_tool(
            "compare_seeds", {**BASE, "image_urls": [str(input_png)], "seeds": [3]}
        )
    assert one_seed.is_error and "at least 2 seeds" in text_of(one_seed)
    assert emulator.submissions == []


def test_the_cli_compares_a_grid(tmp_path: Path, emulator: Any, input_png: Path) -> None:
    env = _env(tmp_path, emulator)
    done = run_cli(
        "compare", str(input_png), "-p", "S2P", "--vary", "guidance_scale=3,5", "--seeds", "9", "-q", env=env
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert [line.split("\t")[:2] for line in lines] == [
        ["guidance_scale=3", "seed 9"],
        ["guidance_scale=5", "seed 9"],
    ]
    assert all(Path(line.split("\t")[2]).is_file() for line in lines)
    assert sorted(p.payload["guidance_scale"] for p in emulator.submissions) == [3, 5]


# -- local -------------------------------------------------------------------------------------


@pytest.mark.local
async def test_a_local_lora_scale_sweep_loads_the_adapter_once(tmp_path: Path, tiny_model: Path) -> None:
    from flux_mcp.backends.tiny import build_tiny_pipeline, make_lora_state_dict, save_lora

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    lora = save_lora(
        inputs / "style.safetensors", make_lora_state_dict(build_tiny_pipeline().transformer, "peft")
    )
    image = inputs / "photo.png"
    Image.new("RGB", (64, 64), (30, 120, 200)).save(image)
    env = server_env(
        tmp_path,
        FLUX_MCP_BACKEND="local",
        FLUX_MCP_MODEL=str(tiny_model),
        FLUX_MCP_DEVICE="cpu",
        OMP_NUM_THREADS="1",
    )
    args = {
        "prompt": "a watercolour",
        "num_inference_steps": 4,
        "acceleration": "none",
        "image_urls": [str(image)],
        "loras": [{"path": str(lora)}],
        "vary": [{"field": "loras.0.scale", "values": [0.0, 0.5, 1.0]}],
        "seeds": [3, 4],
    }
    async with stdio_client(env) as client:
        result = await client.call_tool("compare_seeds", args)
    assert not result.is_error, text_of(result)
    cells = result.structured_content["grid"]["cells"]
    assert len(cells) == 6 and all(c["error"] is None for c in cells)
    sidecars = [_sidecar(c) for c in cells]
    # Seeds of one scale share a pass: each pass's sidecars repeat its details, so count passes once.
    loads = {json.dumps(s["details"]["loras"]): s["details"]["lora_loads"] for s in sidecars}
    assert len(loads) == 3 and sum(loads.values()) == 1, loads
    pixels = {c["values"]["loras.0.scale"]: Image.open(c["path"]).tobytes() for c in cells if c["seed"] == 3}
    assert len(set(pixels.values())) == 3, "each scale gives a different image at the same seed"


# -- the expansion rules -----------------------------------------------------------------------


def _request(**fields: Any) -> EditRequest:
    return EditRequest(prompt="p", image_urls=["x.png"], **fields)


def test_cells_are_row_major_with_seeds_fastest() -> None:
    axes, cells = expand(
        _request(),
        [
            VaryAxis(field="num_inference_steps", values=[8, 28]),
            VaryAxis(field="enable_cns", values=[False, True]),
        ],
        [5, 6],
    )
    assert [a.field for a in axes] == ["num_inference_steps", "enable_cns", "seed"]
    assert [tuple(c.values.values()) for c in cells][:3] == [(8, False, 5), (8, False, 6), (8, True, 5)]
    assert all(c.request.num_images == 1 and c.request.seed == c.values["seed"] for c in cells)
    assert len(cells) == 8


def test_prompt_variants_and_a_single_seed() -> None:
    axes, cells = expand(_request(), [VaryAxis(field="prompt", values=["a cat", "a dog"])], [77])
    assert [a.field for a in axes] == ["prompt"]
    assert [(c.request.prompt, c.request.seed) for c in cells] == [("a cat", 77), ("a dog", 77)]


@pytest.mark.parametrize(
    ("field", "values", "message"),
    [
        ("seed", [1, 2], "cannot vary"),
        ("num_images", [1, 2], "cannot vary"),
        ("cns_s_churn", [0.5, 9], "vary.0.values"),
        ("acceleration", ["none", "turbo"], "vary.0.values"),
        ("guidance_scale", [5, 5], "distinct"),
    ],
)
def test_axes_that_cannot_run_are_refused(field: str, values: list[Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        expand(_request(), [VaryAxis(field=field, values=values)], [1])
