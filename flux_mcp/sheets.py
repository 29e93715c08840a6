"""The labelled sheets of compare_seeds: a contact sheet of seeds, and the grid of a parameter comparison.

Contact sheet: one tile per seed, labelled under it. Grid (``vary``): rows are the first axis's values,
columns the second axis's (and the seeds', which vary fastest); a one-axis grid is one row. The axis
names and values are written along the top and left edges, the shared seed in the corner. On both a
failed cell is drawn as a red box saying so, so that the picture alone says which cell is which.
Blocking (PIL): call them from a worker thread.

This module knows nothing about MCP, the backends or the store.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from . import media
from .results import GridAxis
from .schema import MAX_OUTPUT_PIXELS

__all__ = ["contact_sheet", "grid_sheet", "within_budget"]

_LABEL_H = 22
_MARGIN_W = 150
_FONT_SIZE = 13


def grid_sheet(
    axes: list[GridAxis],
    tiles: list[bytes | None],
    caption: str = "",
    cell_side: int = 256,
    quality: int = 80,
) -> bytes:
    """A JPEG grid of ``tiles`` (row-major, None = failed) labelled with ``axes``' fields and values;
    ``caption`` (the shared seed) heads the left edge."""
    rows_axis, column_axes = (axes[0], axes[1:]) if len(axes) > 1 else (None, axes)
    row_labels = [_pair(rows_axis.field, v) for v in rows_axis.values] if rows_axis else [caption]
    column_labels = [
        " / ".join(_pair(axis.field, value) for axis, value in zip(column_axes, combo, strict=True))
        for combo in itertools.product(*(axis.values for axis in column_axes))
    ]
    columns, rows = len(column_labels), len(row_labels)
    if rows * columns != len(tiles):
        raise ValueError(f"{len(tiles)} tiles do not fill a {rows}x{columns} grid")
    # Keep a wide grid within ~2048 px.
    cell_side = max(96, min(cell_side, math.floor(2048 / max(columns, 1))))
    margin = _MARGIN_W
    sheet = Image.new("RGB", (margin + columns * cell_side, _LABEL_H + rows * cell_side), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=_FONT_SIZE)
    if rows_axis and caption:
        draw.text((6, 4), _fit(draw, caption, font, margin - 10), fill="gray", font=font)
    for column, label in enumerate(column_labels):
        x = margin + column * cell_side
        draw.text((x + 6, 4), _fit(draw, label, font, cell_side - 10), fill="black", font=font)
    for row, label in enumerate(row_labels):
        if label:
            y = _LABEL_H + row * cell_side + cell_side // 2 - _FONT_SIZE
            draw.text((6, y), _fit(draw, label, font, margin - 10), fill="black", font=font)
    for index, data in enumerate(tiles):
        x = margin + (index % columns) * cell_side
        y = _LABEL_H + (index // columns) * cell_side
        _tile(sheet, draw, font, data, (x, y), cell_side)
    return media.encode(sheet, "JPEG", quality=quality, optimize=True)


def contact_sheet(cells: list[tuple[bytes | None, str]], cell_side: int = 256, quality: int = 80) -> bytes:
    """A JPEG of one tile per (image bytes, or None for a failed run; label under it)."""
    count = max(len(cells), 1)
    columns = min(count, 4) if count != 4 else 2
    rows = math.ceil(count / columns)
    sheet = Image.new("RGB", (columns * cell_side, rows * (cell_side + _LABEL_H)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=14)
    for index, (data, label) in enumerate(cells):
        x = (index % columns) * cell_side
        y = (index // columns) * (cell_side + _LABEL_H)
        _tile(sheet, draw, font, data, (x, y), cell_side)
        draw.text((x + 6, y + cell_side + 3), label, fill="black", font=font)
    return media.encode(sheet, "JPEG", quality=quality, optimize=True)


def _tile(
    sheet: Image.Image,
    draw: ImageDraw.ImageDraw,
    font: Any,
    data: bytes | None,
    at: tuple[int, int],
    side: int,
) -> None:
    """One cell at ``at``: the image fitted and centred, or a red "failed" box."""
    x, y = at
    if data is None:
        draw.rectangle((x + 4, y + 4, x + side - 4, y + side - 4), outline="red", width=3)
        draw.text((x + 12, y + side // 2 - 8), "failed", fill="red", font=font)
        return
    with media.open_image(data, MAX_OUTPUT_PIXELS) as img:
        img.thumbnail((side, side), Image.Resampling.LANCZOS)
        tile = media.flatten(img)
    sheet.paste(tile, (x + (side - tile.width) // 2, y + (side - tile.height) // 2))


def within_budget(draw: Callable[[int], bytes], cells: int, budget: int) -> bytes:
    """The sheet ``draw(cell_side)`` makes, at the largest cell side that keeps it within ``budget``
    bytes: 512 px for up to 4 cells, 384 up to 8, else 256, shrunk by a quarter until it fits."""
    side = 512 if cells <= 4 else 384 if cells <= 8 else 256
    while True:
        sheet = draw(side)
        if len(sheet) <= budget or side <= 128:
            return sheet
        side = max(128, math.floor(side * 0.75))


def _pair(field: str, value: Any) -> str:
    return f"{field} {value}" if field == "seed" else f"{field}={value}"


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    """``text``, cut with an ellipsis so that it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"
