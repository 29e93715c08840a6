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

import re

import anyio.to_thread
from PIL import Image

from . import media, pathguard
from .backends import InputImage
from .config import Settings
from .errors import InputImageError, NotFound
from .imagecheck import check_image_bytes, max_input_bytes, max_input_pixels
from .pathguard import GuardedPath
from .schema import MAX_OUTPUT_PIXELS
from .store import ResultStore

__all__ = [
    "check_image_bytes",
    "max_input_pixels",
    "preview",
    "resolve_inputs",
]

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
            _mime, data = media.decode_data_uri(text, max_input_bytes(settings))
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
    data, path = pathguard.read_inside(text, guard, max_input_bytes(settings), "FLUX_MCP_MAX_INPUT_MB")
    return _checked(data, str(path), field, settings)


def _checked(data: bytes, what: str, field: str, settings: Settings) -> InputImage:
    data, content_type, width, height = check_image_bytes(data, what, field, settings)
    return InputImage(source=what, data=data, content_type=content_type, width=width, height=height)


def preview(data: bytes, max_side: int, quality: int = 80) -> bytes:
    """A small JPEG of an image, at most ``max_side`` pixels on its long side."""
    with media.open_image(data, MAX_OUTPUT_PIXELS) as img:
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        return media.encode(media.flatten(img), "JPEG", quality=quality, optimize=True)
