"""Contact sheets are sized to the result budget: large cells for few seeds, always under the limit."""

from __future__ import annotations

import io

from PIL import Image

from flux_mcp.service import PREVIEW_BUDGET_BYTES
from flux_mcp.sheets import contact_sheet, within_budget


def _noise(side: int) -> bytes:
    out = io.BytesIO()
    Image.effect_noise((side, side), 90).convert("RGB").save(out, format="PNG")
    return out.getvalue()


def test_four_seeds_get_512_px_cells_and_noisy_sheets_shrink_under_the_budget() -> None:
    cells = [(_noise(600), f"seed {i}") for i in range(4)]
    sheet = within_budget(lambda side: contact_sheet(cells, cell_side=side), 4, 10**9)
    assert Image.open(io.BytesIO(sheet)).size == (2 * 512, 2 * (512 + 22))
    many = [(_noise(600), f"seed {i}") for i in range(8)]
    small = within_budget(lambda side: contact_sheet(many, cell_side=side), 8, PREVIEW_BUDGET_BYTES)
    assert len(small) <= PREVIEW_BUDGET_BYTES
