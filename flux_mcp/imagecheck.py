"""The check every input image passes, whatever its source (data URI, local file, earlier result,
a URL the local backend fetched): an image in an accepted format, within the byte and pixel limits,
with odd formats and modes normalised to PNG.

Used by ``images`` (inputs the server reads itself) and by the local backend (URLs it fetches), so it
sits below both: it imports only ``media``, the settings and the error tree, never the backends.
"""

from __future__ import annotations

import io
import threading

from PIL import Image, ImageOps

from . import media
from .config import Settings
from .errors import InputImageError

__all__ = ["check_image_bytes", "max_input_bytes", "max_input_pixels"]

#: Formats the endpoint and the local backend read as they are; others are re-encoded to PNG.
_PASS_THROUGH = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
_PASS_MODES = {"RGB", "RGBA", "L"}
#: EXIF or ICC blocks above this are stripped by re-encoding (they only cost upload time).
_MAX_METADATA_BYTES = 256 * 1024
#: At most this many inputs are decoded at once (each up to FLUX_MCP_MAX_INPUT_MEGAPIXELS x 4 bytes),
#: so many concurrent calls cannot multiply the transient memory of checking their inputs.
_DECODING = threading.BoundedSemaphore(2)


def max_input_bytes(settings: Settings) -> int:
    """The byte limit of input images (FLUX_MCP_MAX_INPUT_MB)."""
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
    if len(data) > max_input_bytes(settings):
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
