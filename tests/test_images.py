"""Input resolution and checks, previews and contact sheets — on real files, no MCP."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from flux_mcp.config import Settings
from flux_mcp.errors import InputImageError
from flux_mcp.images import check_image_bytes, preview, resolve_inputs
from flux_mcp.sheets import contact_sheet
from flux_mcp.store import ResultStore

from .conftest import data_uri, make_png


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    (tmp_path / "inputs").mkdir(exist_ok=True)
    return Settings(output_dir=tmp_path / "out", input_roots=(tmp_path / "inputs",))


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that claims huge dimensions (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.anyio
async def test_each_kind_of_input_resolves(settings: Settings, tmp_path: Path) -> None:
    store = ResultStore(settings.output_dir)
    store.ensure()
    stored = store.save(store.new_id(), make_png(32, 32), "image/png", {})
    local = tmp_path / "inputs" / "a.png"
    local.write_bytes(make_png(40, 30))
    items = [
        "https://example.com/x.png",
        data_uri(make_png(20, 10)),
        str(local),
        stored.uri,
        f"file://{local}",
    ]
    resolved = await resolve_inputs(items[:4], settings, store)
    assert resolved[0].url == "https://example.com/x.png" and resolved[0].data is None
    assert (resolved[1].width, resolved[1].height) == (20, 10)
    assert resolved[2].data == local.read_bytes() and resolved[2].content_type == "image/png"
    assert resolved[3].size == (32, 32)
    (via_file_uri,) = await resolve_inputs(items[4:], settings, store)
    assert via_file_uri.size == (40, 30)


@pytest.mark.anyio
async def test_paths_outside_the_roots_are_refused_even_via_symlink_or_dotdot(
    settings: Settings, tmp_path: Path
) -> None:
    store = ResultStore(settings.output_dir)
    outside = tmp_path / "secret.png"
    outside.write_bytes(make_png())
    link = tmp_path / "inputs" / "link.png"
    os.symlink(outside, link)
    for item in (str(outside), str(link), str(tmp_path / "inputs" / ".." / "secret.png")):
        with pytest.raises(InputImageError, match="outside the folders") as info:
            await resolve_inputs([item], settings, store)
        assert info.value.field == "image_urls.0"


@pytest.mark.anyio
async def test_bad_inputs_name_the_item_and_say_what_to_do(settings: Settings, tmp_path: Path) -> None:
    store = ResultStore(settings.output_dir)
    not_image = tmp_path / "inputs" / "notes.png"
    not_image.write_text("this is text, not a picture")
    truncated = tmp_path / "inputs" / "cut.png"
    truncated.write_bytes(make_png(200, 200)[:300])
    cases = {
        str(tmp_path / "inputs" / "missing.png"): "no file",
        str(not_image): "not an image",
        str(truncated): "damaged or truncated",
        "data:image/png;base64,!!!notbase64": "base64",
        "data:text/plain,hello": "base64 data URI",
        "ftp://example.com/a.png": "scheme ftp",
        "flux://images/20260101-000000-deadbeef": "No stored image",
        data_uri(_png_header_only(30000, 30000)): "limit",
    }
    for index, (item, expected) in enumerate(cases.items()):
        with pytest.raises(InputImageError, match=expected) as info:
            await resolve_inputs(["https://ok.example/a.png", item], settings, store)
        assert info.value.field == "image_urls.1", index


@pytest.mark.parametrize("mode", ["CMYK", "P", "I;16", "LA", "1"])
def test_odd_modes_are_normalised_to_png(settings: Settings, mode: str) -> None:
    img = Image.new("RGB", (40, 20), (10, 200, 30)).convert(mode)
    out = io.BytesIO()
    img.save(out, format="TIFF" if mode == "CMYK" else "PNG")
    data, content_type, width, height = check_image_bytes(out.getvalue(), "x", "image_urls.0", settings)
    assert content_type == "image/png" and (width, height) == (40, 20)
    with Image.open(io.BytesIO(data)) as back:
        assert back.mode in ("RGB", "RGBA", "L") and back.format == "PNG"


def test_plain_rgb_png_passes_unchanged(settings: Settings) -> None:
    png = make_png()
    assert check_image_bytes(png, "x", "f", settings)[0] is png


def test_huge_exif_is_stripped(settings: Settings) -> None:
    img = Image.new("RGB", (16, 16), "blue")
    exif = Image.Exif()
    exif[0x010E] = "x" * 300_000  # ImageDescription
    out = io.BytesIO()
    img.save(out, format="PNG", exif=exif.tobytes())
    data, content_type, _, _ = check_image_bytes(out.getvalue(), "x", "f", settings)
    assert content_type == "image/png" and len(data) < 10_000


def test_previews_are_small_jpegs_and_the_sheet_has_a_cell_per_seed() -> None:
    big = io.BytesIO()
    Image.new("RGB", (2048, 1024), "red").save(big, format="PNG")
    small = preview(big.getvalue(), 512)
    with Image.open(io.BytesIO(small)) as img:
        assert img.format == "JPEG" and max(img.size) == 512
    sheet = contact_sheet(
        [(make_png(), "seed 1"), (None, "seed 2 (failed)"), (make_png(), "seed 3")], cell_side=128
    )
    with Image.open(io.BytesIO(sheet)) as img:
        assert img.size == (3 * 128, 128 + 22)
        # the failed cell is outlined in red
        assert img.getpixel((128 + 4, 64))[0] > 200


@pytest.mark.anyio
async def test_one_pixel_limit_the_setting_not_pillows(tmp_path: Path) -> None:
    """A valid 95 MP PNG passes with FLUX_MCP_MAX_INPUT_MEGAPIXELS=100 (Pillow alone refuses it at
    89.5 MP), and refusals quote the setting that refused, with the image's size."""
    big = Image.new("1", (9747, 9747), 1)  # 95.0 MP; mode "1" keeps the file and the test small
    out = io.BytesIO()
    big.save(out, format="PNG")
    settings = Settings(output_dir=tmp_path / "out", input_roots=(tmp_path,), max_input_megapixels=100)
    store = ResultStore(settings.output_dir)
    (resolved,) = await resolve_inputs([data_uri(out.getvalue())], settings, store)
    assert resolved.size == (9747, 9747)
    strict = Settings(output_dir=tmp_path / "out", input_roots=(tmp_path,), max_input_megapixels=90)
    with pytest.raises(
        InputImageError, match=r"9747x9747 pixels, above the 90 MP limit \(FLUX_MCP_MAX_INPUT_MEGAPIXELS\)"
    ):
        await resolve_inputs([data_uri(out.getvalue())], strict, store)
    generous = Settings(output_dir=tmp_path / "out", input_roots=(tmp_path,), max_input_megapixels=1000)
    with pytest.raises(InputImageError, match=r"damaged or truncated"):  # past Pillow's 2x limit: our check
        await resolve_inputs([data_uri(_png_header_only(15000, 15000))], generous, store)
