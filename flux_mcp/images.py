"""Input images in, previews out.

``resolve_inputs`` turns each item of ``image_urls`` into an ``InputImage``:

- ``http(s)://`` URLs are passed through unchanged (the hosted endpoint fetches them itself; the
  local backend fetches them through ``netguard``);
- ``data:`` URIs, local file paths (read through ``pathguard``: only inside the allowed input roots,
  one descriptor from check to read, regular files only, capped at FLUX_MCP_MAX_INPUT_MB) and
  ``flux://images/<id>`` of earlier results are read by the server and checked to be an image in an
  accepted format (``media``'s allow-list) of sane size *before* anything is sent anywhere.

Also here: ``preview`` (small JPEG for the chat) and ``contact_sheet`` (labelled grid for
compare_seeds). Everything that touches PIL or files is synchronous and is called from a worker
thread by the async helpers.

This module knows nothing about MCP or the backends' internals.
"""

from __future__ import annotations

import io
import math
import re
import threading

import anyio.to_thread
from PIL import Image, ImageDraw, ImageFont, ImageOps

from . import media, pathguard
from .backends import InputImage
from .config import Settings
from .errors import InputImageError, NotFound
from .pathguard import GuardedPath
from .schema import MAX_SIDE
from .store import ResultStore

__all__ = [
    "RESULT_MAX_PIXELS",
    "check_image_bytes",
    "contact_sheet",
    "max_input_pixels",
    "preview",
    "resolve_inputs",
]

#: Formats the endpoint and the local backend read as they are; others are re-encoded to PNG.
_PASS_THROUGH = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
_PASS_MODES = {"RGB", "RGBA", "L"}
#: EXIF or ICC blocks above this are stripped by re-encoding (they only cost upload time).
_MAX_METADATA_BYTES = 256 * 1024
#: Results are at most MAX_SIDE x MAX_SIDE; stored files and fal's outputs are opened within this.
RESULT_MAX_PIXELS = MAX_SIDE * MAX_SIDE
#: At most this many inputs are decoded at once (each up to FLUX_MCP_MAX_INPUT_MEGAPIXELS x 4 bytes),
#: so many concurrent calls cannot multiply the transient memory of checking their inputs.
_DECODING = threading.BoundedSemaphore(2)
_FLUX_URI = re.compile(r"^flux://images/(?P<id>[^/?#]+)$")


async def resolve_inputs(image_urls: list[str], settings: Settings, store: ResultStore) -> list[InputImage]:
    """Resolve and check every input; errors name the item (``image_urls.N``) and what to change."""
    resolved: list[InputImage] = []
    for index, item in enumerate(image_urls):
        field = f"image_urls.{index}"
        resolved.append(await anyio.to_thread.run_sync(_resolve_one, item, field, settings, store))
    return resolved


def _resolve_one(item: str, field: str, settings: Settings, store: ResultStore) -> InputImage:
    text = item.strip()
    lowered = text.lower()
    if lowered.startswith(("https://", "http://")):
        return InputImage(source=text, url=text)
    if lowered.startswith("data:"):
        try:
            _mime, data = media.decode_data_uri(text, _max_bytes(settings))
        except media.DataTooLarge:
            raise InputImageError(
                f"{field}: the data URI holds more than {settings.max_input_mb:g} MiB (FLUX_MCP_MAX_INPUT_MB).",
                field=field,
            ) from None
        except media.MediaError as exc:
            raise InputImageError(f"{field}: {exc}.", field=field) from None
        return _checked(data, "data URI", field, settings)
    match = _FLUX_URI.match(text)
    if match:
        try:
            data, stored = store.read(match.group("id"))
        except NotFound as exc:
            raise InputImageError(f"{field}: {exc}", field=field) from None
        return _checked(data, stored.uri, field, settings)
    if re.match(r"^[a-z][a-z0-9+.-]*://", lowered) and not lowered.startswith("file://"):
        scheme = lowered.split(":", 1)[0]
        raise InputImageError(
            f"{field}: the scheme {scheme}:// is not supported. Give an https URL, a data URI, "
            "a local file path or flux://images/<id>.",
            field=field,
        )
    guard = GuardedPath(field, settings.allowed_input_roots, what="image file", error=InputImageError)
    data, path = pathguard.read_inside(text, guard, _max_bytes(settings), "FLUX_MCP_MAX_INPUT_MB")
    return _checked(data, str(path), field, settings)


def _max_bytes(settings: Settings) -> int:
    return int(settings.max_input_mb * 1024 * 1024)


def max_input_pixels(settings: Settings) -> int:
    """The one pixel limit of input images (FLUX_MCP_MAX_INPUT_MEGAPIXELS)."""
    return int(settings.max_input_megapixels * 1_000_000)


def check_image_bytes(data: bytes, what: str, field: str, settings: Settings) -> tuple[bytes, str, int, int]:
    """Check that ``data`` is a decodable image of sane size; normalise odd formats and modes.

    Returns (bytes, content type, width, height). PNG/JPEG/WebP in RGB, RGBA or L pass unchanged;
    the other accepted formats (``media.ACCEPTED_FORMATS``: GIF, BMP, TIFF, ...), other modes (CMYK,
    palette, 16-bit) and huge metadata are re-encoded to PNG. Anything else is refused unopened.
    """
    if len(data) > _max_bytes(settings):
        raise InputImageError(
            f"{field}: {what} is larger than {settings.max_input_mb:g} MiB (FLUX_MCP_MAX_INPUT_MB).",
            field=field,
        )
    try:
        with _DECODING, media.open_image(data, max_input_pixels(settings)) as img:
            width, height = img.size
            img.load()
            fmt = img.format or ""
            metadata = len(img.info.get("exif", b"") or b"") + len(img.info.get("icc_profile", b"") or b"")
            if fmt in _PASS_THROUGH and img.mode in _PASS_MODES and metadata <= _MAX_METADATA_BYTES:
                return data, _PASS_THROUGH[fmt], width, height
            return _normalised_png(img), "image/png", width, height
    except media.TooManyPixels as exc:
        raise InputImageError(
            f"{field}: {what} is {exc.width}x{exc.height} pixels, above the "
            f"{settings.max_input_megapixels:g} MP limit (FLUX_MCP_MAX_INPUT_MEGAPIXELS); downscale it "
            "or raise the limit.",
            field=field,
        ) from None
    except media.UnsupportedImage:
        raise InputImageError(
            f"{field}: {what} is not an image in an accepted format ({media.ACCEPTED_HINT}); "
            "convert it to PNG or JPEG.",
            field=field,
        ) from None
    except media.MediaError as exc:
        raise InputImageError(f"{field}: {what} is {exc}.", field=field) from None


def _normalised_png(img: Image.Image) -> bytes:
    img = ImageOps.exif_transpose(img) or img
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping everything above 255 to white.
        img = img.point(lambda v: v / 256).convert("L")
    converted = img.convert("RGBA" if has_alpha else "RGB")
    out = io.BytesIO()
    converted.save(out, format="PNG")
    return out.getvalue()


def _checked(data: bytes, what: str, field: str, settings: Settings) -> InputImage:
    data, content_type, width, height = check_image_bytes(data, what, field, settings)
    return InputImage(source=what, data=data, content_type=content_type, width=width, height=height)


def preview(data: bytes, max_side: int, quality: int = 80) -> bytes:
    """A small JPEG of an image, at most ``max_side`` pixels on its long side."""
    with media.open_image(data, RESULT_MAX_PIXELS) as img:
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        return media.encode(media.flatten(img), "JPEG", quality=quality, optimize=True)


def contact_sheet(cells: list[tuple[bytes | None, str]], cell_side: int = 256, quality: int = 80) -> bytes:
    """A labelled grid (JPEG): one cell per (image bytes or None for a failed run, label)."""
    count = max(len(cells), 1)
    columns = min(count, 4) if count != 4 else 2
    rows = math.ceil(count / columns)
    label_h = 22
    sheet = Image.new("RGB", (columns * cell_side, rows * (cell_side + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=14)
    for index, (data, label) in enumerate(cells):
        x = (index % columns) * cell_side
        y = (index // columns) * (cell_side + label_h)
        if data is not None:
            with media.open_image(data, RESULT_MAX_PIXELS) as img:
                img.thumbnail((cell_side, cell_side), Image.Resampling.LANCZOS)
                tile = media.flatten(img)
                sheet.paste(tile, (x + (cell_side - tile.width) // 2, y + (cell_side - tile.height) // 2))
        else:
            draw.rectangle((x + 4, y + 4, x + cell_side - 4, y + cell_side - 4), outline="red", width=3)
            draw.text((x + 12, y + cell_side // 2 - 8), "failed", fill="red", font=font)
        draw.text((x + 6, y + cell_side + 3), label, fill="black", font=font)
    return media.encode(sheet, "JPEG", quality=quality, optimize=True)
