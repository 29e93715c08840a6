"""What hosts send the model every turn about our tools stays small (issue 13: it was 18,786 bytes)."""

from __future__ import annotations

import pytest

from flux_mcp.weight import PER_TURN_TARGET_BYTES, measure

pytestmark = pytest.mark.anyio


async def test_the_tool_list_a_host_sends_every_turn_is_at_most_the_target() -> None:
    sizes = await measure()
    assert set(sizes) == {"edit_image", "compare_seeds", "list_presets", "get_result", "cancel_job"}
    assert sum(sizes.values()) <= PER_TURN_TARGET_BYTES, sizes
