"""Image bytes in and out: the one place where untrusted image bytes are opened.

Pillow can open some forty formats, and a few of them hand the bytes to other programs or to large,
rarely audited decoders (EPS runs Ghostscript on the attacker's PostScript; others parse formats no
user of this tool sends). Every image whose bytes come from outside (data URIs, local files, fetched
URLs, fal's outputs, stored results) is opened here, through ``open_image``, with an explicit
allow-list of formats (``ACCEPTED_FORMATS``): anything else is refused before a decoder runs.

One pixel limit: Pillow's own decompression-bomb check (``Image.MAX_IMAGE_PIXELS``, ~89.5 MP, an
error only at twice that) is switched off when this module is imported: a process-global effect,
made here and nowhere else. In its place every ``open_image`` call checks the caller's limit (for
inputs FLUX_MCP_MAX_INPUT_MEGAPIXELS) from the header, before any pixel is decoded, so a refused
image always quotes the limit that refused it, and a valid image under the setting is never refused
by a second, hidden one.

Also here, so that nothing keeps its own copy: data URI encoding and decoding, header probes,
alpha flattening onto white, metadata stripping (orientation applied first) and encoding.

This module knows nothing about settings, requests, MCP or the backends: callers pass limits and
turn ``MediaError`` into their own errors, naming their field and setting.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "ACCEPTED_FORMATS",
    "ACCEPTED_HINT",
    "MIME_TYPES",
    "DamagedImage",
    "DataTooLarge",
    "MediaError",
    "TooManyPixels",
    "UnsupportedImage",
    "data_uri",
    "decode_data_uri",
    "decode_rgb",
    "encode",
    "flatten",
    "has_metadata",
    "open_image",
    "probe",
    "strip_metadata",
]

# The one limit is the caller's (see the module docstring); Pillow's hidden second one is off.
Image.MAX_IMAGE_PIXELS = None

#: Pillow format names of what users of this tool really send; AVIF/HEIF when a plugin provides them.
_WANTED = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "MPO", "AVIF", "HEIF")
Image.init()
ACCEPTED_FORMATS: tuple[str, ...] = tuple(f for f in _WANTED if f in Image.OPEN)
ACCEPTED_HINT = ", ".join(f for f in ACCEPTED_FORMATS if f != "MPO")
MIME_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "MPO": "image/jpeg", "WEBP": "image/webp"}
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?)(?P<b64>;base64)?,", re.I)
#: Info keys that carry metadata a user may not mean to publish (EXIF with GPS and owner, XMP, comments).
_METADATA_KEYS = ("exif", "xmp", "XML:com.adobe.xmp", "comment", "photoshop", "iptc", "Description", "Author")


class MediaError(ValueError):
    """Bytes that are not an image this server opens; ``str()`` is a phrase without a field name."""


class UnsupportedImage(MediaError):
    """Not one of ``ACCEPTED_FORMATS`` (or not an image at all)."""


class DamagedImage(MediaError):
    """One of the accepted formats, but truncated or corrupt."""


class TooManyPixels(MediaError):
    """The header claims more pixels than the caller's limit."""

    def __init__(self, width: int, height: int, max_pixels: int) -> None:
        super().__init__(f"{width}x{height} pixels, above the {max_pixels / 1e6:g} MP limit")
        self.width, self.height, self.max_pixels = width, height, max_pixels


class DataTooLarge(MediaError):
    """A data URI holding more bytes than the caller's limit."""

    def __init__(self, size: int, max_bytes: int) -> None:
        super().__init__(f"a data URI of {size / 2**20:.1f} MiB, above the {max_bytes / 2**20:g} MiB limit")
        self.size, self.max_bytes = size, max_bytes


@contextmanager
def open_image(data: bytes, max_pixels: int) -> Iterator[Image.Image]:
    """``data`` opened lazily (header read, no pixels decoded) if its format is accepted and its size
    is within ``max_pixels``; raises UnsupportedImage, TooManyPixels or DamagedImage otherwise.

    Decoding errors raised inside the ``with`` block (``img.load()``) become DamagedImage too.
    """
    try:
        img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise UnsupportedImage(f"not an image in an accepted format ({ACCEPTED_HINT})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DamagedImage(f"a damaged or truncated image ({exc})") from None
    with img:
        width, height = img.size
        if width <= 0 or height <= 0 or width * height > max_pixels:
            raise TooManyPixels(width, height, max_pixels)
        try:
            yield img
        except (OSError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
            raise DamagedImage(f"a damaged or truncated image ({exc})") from None


def probe(data: bytes, max_pixels: int) -> tuple[str, int, int]:
    """(MIME type, width, height) from the header, without decoding the pixels."""
    with open_image(data, max_pixels) as img:
        return MIME_TYPES.get(img.format or "", "application/octet-stream"), img.width, img.height


def decode_rgb(data: bytes, max_pixels: int) -> Image.Image:
    """The decoded image, upright (EXIF orientation applied), transparent areas white, in RGB."""
    with open_image(data, max_pixels) as opened:
        img = ImageOps.exif_transpose(opened) or opened
        img.load()
        return flatten(img)


def flatten(img: Image.Image) -> Image.Image:
    """RGB, with transparent areas white rather than black (what a viewer shows)."""
    if img.mode in ("RGBA", "LA", "PA", "P"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, "white")
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def encode(img: Image.Image, pil_format: str, **options: Any) -> bytes:
    out = io.BytesIO()
    img.save(out, format=pil_format, **options)
    return out.getvalue()


def has_metadata(img: Image.Image) -> bool:
    """Whether the image carries EXIF, XMP, comments or text chunks (GPS, owner, camera serial...)."""
    if img.getexif():
        return True
    return any(img.info.get(key) for key in _METADATA_KEYS) or any(
        isinstance(value, str) for value in img.info.values()
    )


def strip_metadata(data: bytes, content_type: str, max_pixels: int) -> tuple[bytes, str]:
    """The image without EXIF/XMP/comments, its orientation applied to the pixels (ICC kept).

    Bytes without metadata come back unchanged; PNG/JPEG/WebP keep their format, others become PNG.
    """
    with open_image(data, max_pixels) as img:
        if not has_metadata(img):
            return data, content_type
        upright = ImageOps.exif_transpose(img) or img
        upright.load()
        fmt = img.format if img.format in ("PNG", "JPEG", "WEBP") else "PNG"
        options: dict[str, Any] = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
        if img.info.get("icc_profile"):
            options["icc_profile"] = img.info["icc_profile"]
        clean = upright if fmt != "JPEG" or upright.mode in ("RGB", "L", "CMYK") else upright.convert("RGB")
        clean.info = {}
        return encode(clean, fmt, **options), MIME_TYPES[fmt]


def data_uri(data: bytes, content_type: str) -> str:
    return f"data:{content_type};base64,{base64.b64encode(data).decode('ascii')}"


def decode_data_uri(text: str, max_bytes: int) -> tuple[str | None, bytes]:
    """(declared MIME type or None, bytes) of a base64 data URI holding at most ``max_bytes``.

    Raises MediaError: not a base64 data URI, too large (before decoding), or broken base64.
    """
    match = _DATA_URI.match(text)
    if not match or not match.group("b64"):
        raise UnsupportedImage("not a base64 data URI (expected data:image/png;base64,...)")
    payload = text[match.end() :]
    if len(payload) * 3 // 4 > max_bytes:
        raise DataTooLarge(len(payload) * 3 // 4, max_bytes)
    try:
        return match.group("mime"), base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise DamagedImage("a data URI whose base64 is invalid") from None
