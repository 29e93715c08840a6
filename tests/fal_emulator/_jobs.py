"""The fal emulator's state: jobs and their phases, injected faults, request checks, output images.

Plain data and pure functions that ``_emulator.FalEmulator`` keeps and the handler in ``_server``
raises (``Reply``). Nothing here serves HTTP or holds a socket; like the whole emulator, it knows
nothing about flux-mcp, only fal's side of the wire protocol.
"""

from __future__ import annotations

import hashlib
import io
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from PIL import Image, ImageOps

__all__ = [
    "FORMATS",
    "KINDS",
    "REQUEST_PATH",
    "ROUTES",
    "SIZE_PRESETS",
    "Event",
    "EventStream",
    "Fault",
    "Job",
    "Reply",
    "Submission",
    "placeholder",
    "render",
    "requested_size",
    "step_logs",
    "validate",
]

ROUTES = frozenset({"submit", "status", "result", "cancel", "file", "upload", "token"})
KINDS = frozenset(
    {"http", "reset", "malformed", "stall", "huge", "completed_error", "stuck_in_queue", "not_found"}
)
#: fal's image-size presets (kept here, not imported: the emulator knows only fal's side).
SIZE_PRESETS = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"), "webp": ("WEBP", "image/webp")}
PLACEHOLDER_SIDE = 512
MAX_LORAS = 3
HELD_FRACTION = 0.5  # how far a held job gets before it waits for its release
REQUEST_PATH = re.compile(
    r"^/(?P<app>[^/]+/[^/]+)/requests/(?P<id>[^/]+)(?P<tail>/status/stream|/status|/cancel)?/?$"
)


@dataclass(frozen=True)
class Submission:
    """One accepted submit: app path, JSON body, the id given, headers (lower-case, no Authorization)."""

    app: str
    payload: dict[str, Any]
    request_id: str
    headers: dict[str, str]


class Event(NamedTuple):
    """One answer the emulator gave: when (time.monotonic()), on which route, to what, with what status."""

    at: float
    route: str
    method: str
    path: str
    status: int  # 0 = the connection was reset instead


@dataclass
class Fault:
    route: str
    kind: str
    times: int | None
    params: dict[str, Any]


@dataclass
class Job:
    id: str
    app: str
    payload: dict[str, Any]
    queue_s: float
    latency_s: float
    created: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    stuck: bool = False
    #: (message, error_type, HTTP status of the result route): failed now, or once it has run.
    error: tuple[str, str, int] | None = None
    fails_at_end: tuple[str, str, int] | None = None
    output: dict[str, Any] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Held halfway (``FalEmulator.hold_jobs``) until this is set; None = not held.
    gate: threading.Event | None = None

    @property
    def steps(self) -> int:
        steps = self.payload.get("num_inference_steps")
        return steps if isinstance(steps, int) and steps > 0 else 28

    @property
    def failure(self) -> tuple[str, str, int] | None:
        """Why the job failed, once it has (None while it runs or when it succeeded)."""
        return self.error or (self.fails_at_end if self.phase()[0] == "done" else None)

    def time_left(self) -> float:
        """Seconds until the job ends by the clock (0 when it has); a stuck job, or one held until the test
        releases it, has no end in sight."""
        if self.stuck or (self.gate is not None and not self.gate.is_set()):
            return float("inf")
        return max(0.0, self.created + self.queue_s + self.latency_s - time.monotonic())

    def phase(self) -> tuple[str, float]:
        """("queue", fraction of the queue left) / ("progress", fraction done) / ("done", 1)."""
        if self.error is not None or self.cancelled:
            return "done", 1.0
        elapsed = time.monotonic() - self.created
        if self.stuck:
            return "queue", 1.0
        if elapsed < self.queue_s:
            return "queue", (self.queue_s - elapsed) / self.queue_s
        if self.gate is not None and not self.gate.is_set():
            running = (elapsed - self.queue_s) / self.latency_s if self.latency_s else 1.0
            return "progress", min(running, HELD_FRACTION)
        if elapsed < self.queue_s + self.latency_s:
            return "progress", (elapsed - self.queue_s) / self.latency_s
        return "done", 1.0


@dataclass
class EventStream:
    """A route's answer that is a ``text/event-stream``: each item of ``events`` is one event's data."""

    events: Iterator[dict[str, Any]]


class Reply(Exception):
    """Raised by a route to answer at once with ``status`` and a JSON ``body``."""

    def __init__(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


def validate(payload: Any, decode: Callable[[str], Image.Image]) -> None:
    """fal-like light validation: 422 with ``detail[].loc`` naming each bad field."""
    if not isinstance(payload, dict):
        raise Reply(
            422, {"detail": [{"loc": ["body"], "msg": "Input should be an object", "type": "dict_type"}]}
        )
    problems: list[dict[str, Any]] = []

    def bad(loc: list[Any], msg: str, kind: str) -> None:
        problems.append({"loc": ["body", *loc], "msg": msg, "type": kind})

    if not isinstance(payload.get("prompt"), str) or not payload["prompt"]:
        bad(["prompt"], "Field required", "missing")
    urls = payload.get("image_urls")
    if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
        bad(["image_urls"], "Field required: a list of 1 to 4 image URLs", "missing")
    elif len(urls) > 4:
        bad(["image_urls"], f"List should have at most 4 items after validation, not {len(urls)}", "too_long")
    else:
        for i, url in enumerate(urls):
            try:
                decode(url)
            except (ValueError, OSError, Reply):
                bad(["image_urls", i], "Could not load the image at this URL", "image_load_error")
    num_images = payload.get("num_images", 1)
    if not isinstance(num_images, int) or not 1 <= num_images <= 4:
        bad(["num_images"], "Input should be between 1 and 4", "less_than_equal")
    if payload.get("output_format", "png") not in FORMATS:
        bad(["output_format"], "Input should be 'jpeg', 'png' or 'webp'", "literal_error")
    _validate_loras(payload.get("loras", []), bad)
    try:
        requested_size(payload.get("image_size"), (1, 1))
    except ValueError as exc:
        bad(["image_size"], str(exc), "value_error")
    if problems:
        raise Reply(422, {"detail": problems})


def _validate_loras(loras: Any, bad: Callable[[list[Any], str, str], None]) -> None:
    """fal's LoRA list: at most 3 items, each {path: non-empty string, scale: number in 0-4}."""
    if not isinstance(loras, list):
        bad(["loras"], "Input should be a valid list", "list_type")
        return
    if len(loras) > MAX_LORAS:
        bad(
            ["loras"],
            f"List should have at most {MAX_LORAS} items after validation, not {len(loras)}",
            "too_long",
        )
    for i, lora in enumerate(loras):
        if not isinstance(lora, dict) or not isinstance(lora.get("path"), str) or not lora["path"]:
            bad(["loras", i, "path"], "Field required", "missing")
            continue
        scale = lora.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not 0 <= scale <= 4:
            bad(["loras", i, "scale"], "Input should be a number between 0 and 4", "less_than_equal")
        if set(lora) - {"path", "scale"}:
            bad(["loras", i], "Extra inputs are not permitted", "extra_forbidden")


def requested_size(image_size: Any, default: tuple[int, int]) -> tuple[int, int]:
    if image_size is None:
        return default
    if isinstance(image_size, str) and image_size in SIZE_PRESETS:
        return SIZE_PRESETS[image_size]
    if isinstance(image_size, dict):
        width, height = image_size.get("width"), image_size.get("height")
        if isinstance(width, int) and isinstance(height, int) and 0 < width <= 14142 and 0 < height <= 14142:
            return width, height
    raise ValueError(f"Input should be one of {', '.join(SIZE_PRESETS)} or {{width, height}}")


def step_logs(job: Job, done_steps: int) -> list[dict[str, Any]]:
    """One log line when the model starts, then one per finished step, like a sampler's progress."""
    started = datetime.now(UTC) - timedelta(seconds=time.monotonic() - job.created - job.queue_s)
    step_s = job.latency_s / max(job.steps, 1)
    lines = [("Loading input images", started)]
    lines += [
        (f"Step {k}/{job.steps}", started + timedelta(seconds=k * step_s)) for k in range(1, done_steps + 1)
    ]
    return [{"message": m, "level": "INFO", "source": "user", "timestamp": t.isoformat()} for m, t in lines]


def render(source: Image.Image, size: tuple[int, int], seed: int, prompt: str, fmt: str) -> bytes:
    """The input resized and blended with a colour chosen by (seed, prompt): deterministic, distinct."""
    tint = tuple(hashlib.sha256(f"{seed}|{prompt}".encode()).digest()[:3])
    edited = Image.blend(source.resize(size, Image.Resampling.BILINEAR), Image.new("RGB", size, tint), 0.35)
    buffer = io.BytesIO()
    edited.save(buffer, format=fmt)
    return buffer.getvalue()


def placeholder(url: str) -> Image.Image:
    digest = hashlib.sha256(url.encode()).digest()
    gradient = Image.linear_gradient("L").resize((PLACEHOLDER_SIDE, PLACEHOLDER_SIDE))
    return ImageOps.colorize(gradient, black=tuple(digest[:3]), white=tuple(digest[3:6]))
