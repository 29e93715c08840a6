"""Seeds derived as seed + i (num_images) wrap modulo 2^32 on the hosted path too: every reported seed
is a valid input again. A real server over stdio against the loopback fal emulator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flux_mcp.schema import MAX_SEED, image_seeds

from .conftest import server_env, stdio_client

pytestmark = pytest.mark.anyio


def test_image_seeds_wrap_after_the_maximum() -> None:
    assert image_seeds(MAX_SEED - 1, 4) == [MAX_SEED - 1, MAX_SEED, 0, 1]
    assert image_seeds(7, 3) == [7, 8, 9]


async def test_hosted_seeds_past_the_maximum_are_reported_wrapped(
    tmp_path: Path, emulator: Any, input_png: Path
) -> None:
    env = server_env(tmp_path, **emulator.env())
    edit = {"prompt": "a painting", "image_urls": [str(input_png)], "num_inference_steps": 8}
    async with stdio_client(env) as client:
        first = await client.call_tool("edit_image", {**edit, "seed": MAX_SEED, "num_images": 2})
        assert not first.is_error, first.content
        seeds = [image["seed"] for image in first.structured_content["images"]]
        again = await client.call_tool("edit_image", {**edit, "seed": seeds[1]})
    assert seeds == [MAX_SEED, 0]
    assert not again.is_error, again.content  # the reported seed is accepted back
    assert again.structured_content["images"][0]["seed"] == 0
