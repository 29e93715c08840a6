"""The slips agents make are forgiven or explained (issue 13), tested through the service's own
validation (``FluxService.prepare``) and the pure argument functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flux_mcp.arguments import flatten_cns, normalize
from flux_mcp.config import Settings
from flux_mcp.errors import InvalidRequest
from flux_mcp.schema import CompareSeedsArgs, EditImageArgs
from flux_mcp.service import FluxService

from .conftest import data_uri, make_png

pytestmark = pytest.mark.anyio

IMAGE = data_uri(make_png())


def _service(tmp_path: Path, **extra: Any) -> FluxService:
    return FluxService(Settings(output_dir=tmp_path / "out", fal_key="k" * 20, backend="fal", **extra))


def test_cns_group_maps_to_the_endpoint_names() -> None:
    assert flatten_cns({"cns": {"s_churn": 1.0, "num_freq_bins": 16}, "prompt": "p"}) == {
        "cns_s_churn": 1.0,
        "cns_num_freq_bins": 16,
        "prompt": "p",
    }
    assert flatten_cns({"cns": '{"s_churn": 0.2}'}) == {"cns_s_churn": 0.2}  # Claude Desktop's JSON strings
    with pytest.raises(InvalidRequest, match=r"cns\.s_churn: given twice"):
        flatten_cns({"cns": {"s_churn": 1.0}, "cns_s_churn": 0.5})


def test_common_slips_are_normalized() -> None:
    got = normalize(
        {"image_urls": "https://x/a.png", "image_size": "1024x768", "negative_prompt": None, "prompt": "p"},
        EditImageArgs,
    )
    assert got == {
        "image_urls": ["https://x/a.png"],
        "image_size": {"width": 1024, "height": 768},
        "prompt": "p",
    }
    axes = normalize({"vary": [{"field": "cns.s_churn", "values": [0, 1]}], "seed": 7}, CompareSeedsArgs)
    assert axes == {"vary": [{"field": "cns_s_churn", "values": [0, 1]}], "seeds": [7]}


async def test_prepare_forgives_and_explains(tmp_path: Path) -> None:
    service = _service(tmp_path)
    call = await service.prepare(
        "edit_image",
        {
            "prompt": "p",
            "image_urls": IMAGE,
            "image_size": "640x480",
            "negative_prompt": None,
            "cns": {"s_churn": 1.5},
        },
    )
    assert call.request.image_size is not None and call.request.image_size.width == 640
    assert call.request.negative_prompt == "" and call.request.cns_s_churn == 1.5

    # null is "not given" for optional strings; for a number it stays an error (a NaN arrives as null).
    with pytest.raises(InvalidRequest, match=r"^guidance_scale: "):
        await service.prepare("edit_image", {"prompt": "p", "image_urls": [IMAGE], "guidance_scale": None})
    with pytest.raises(InvalidRequest, match=r"did you mean 'seeds'"):
        await service.prepare("compare_seeds", {"prompt": "p", "image_urls": [IMAGE], "seed": 3})
    with pytest.raises(InvalidRequest) as union:
        await service.prepare("edit_image", {"prompt": "p", "image_urls": [IMAGE], "image_size": "huge"})
    message = str(union.value)
    assert message.count("image_size") == 1 and "'square_hd'" in message and '"width"' in message
    with pytest.raises(
        InvalidRequest, match=r"^image_size\.width: Input should be greater than 0 \(got -1\)\.$"
    ):
        await service.prepare(
            "edit_image", {"prompt": "p", "image_urls": [IMAGE], "image_size": {"width": -1, "height": 8}}
        )
    with pytest.raises(InvalidRequest, match=r"cns\.s_churn: .*less than or equal to 2"):
        await service.prepare("edit_image", {"prompt": "p", "image_urls": [IMAGE], "cns": {"s_churn": 3}})
    with pytest.raises(InvalidRequest, match=r"cns\.s_chrun: unknown argument \(did you mean 'cns\.s_churn'"):
        await service.prepare("edit_image", {"prompt": "p", "image_urls": [IMAGE], "cns": {"s_chrun": 1}})


async def test_a_misspelled_library_lora_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    presets = tmp_path / "presets.toml"
    presets.write_text(
        '[loras.paint]\npath = "https://cdn.example/paint.safetensors"\ntrigger_word = "S2P"\n'
    )
    service = _service(tmp_path, presets_file=presets)
    with pytest.raises(InvalidRequest, match=r"loras\.0\.path: 'pain' is not a LoRA library name.*'paint'"):
        await service.prepare(
            "edit_image", {"prompt": "p", "image_urls": [IMAGE], "loras": [{"path": "pain"}]}
        )
    call = await service.prepare(
        "edit_image", {"prompt": "a dog", "image_urls": [IMAGE], "loras": [{"path": "paint"}]}
    )
    (note,) = call.notes
    assert "trigger word 'S2P'" in note
    assert call.pending  # the warning is known before running: the pending result carries it too
