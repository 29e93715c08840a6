"""A loopback emulator of fal's queue protocol, real HTTPS on 127.0.0.1, with fault injection.

The hosted backend is tested against this server, never by patching the backend: the real
``fal_client.AsyncClient`` talks to it unchanged (in-process by patching fal_client's URL globals,
or from a server subprocess through ``FalEmulator.env()``). It speaks the routes fal-client 1.0
uses: submit, status (with logs), result, cancel, the CDN token and upload (with fal-client's
storage fallback), and file downloads.

Outputs are real images derived from the inputs: the first input is decoded (data URI or a file
uploaded here; any other URL becomes a generated placeholder, nothing external is ever fetched),
resized to the requested size and tinted by seed and prompt, so tests can assert what came back.

This module knows nothing about flux-mcp: it only knows fal's wire protocol.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import random
import re
import shutil
import socket
import ssl
import struct
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trustme
from PIL import Image, ImageOps

__all__ = ["FalEmulator", "Submission"]

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
MAX_STALL_S = 60.0
MAX_BODY = 256 * 1024 * 1024
QUEUE_POSITIONS = 3  # a queued request counts down 2, 1, 0 over queue_s
PLACEHOLDER_SIDE = 512
_REQUEST_PATH = re.compile(r"^/(?P<app>[^/]+/[^/]+)/requests/(?P<id>[^/]+)(?P<tail>/status|/cancel)?/?$")


@dataclass(frozen=True)
class Submission:
    """One accepted submit: app path, JSON body, the id given, headers (lower-case, no Authorization)."""

    app: str
    payload: dict[str, Any]
    request_id: str
    headers: dict[str, str]


@dataclass
class _Fault:
    route: str
    kind: str
    times: int | None
    params: dict[str, Any]


@dataclass
class _Job:
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

    @property
    def steps(self) -> int:
        steps = self.payload.get("num_inference_steps")
        return steps if isinstance(steps, int) and steps > 0 else 28

    @property
    def failure(self) -> tuple[str, str, int] | None:
        """Why the job failed, once it has (None while it runs or when it succeeded)."""
        return self.error or (self.fails_at_end if self.phase()[0] == "done" else None)

    def phase(self) -> tuple[str, float]:
        """("queue", fraction of the queue left) / ("progress", fraction done) / ("done", 1)."""
        if self.error is not None or self.cancelled:
            return "done", 1.0
        elapsed = time.monotonic() - self.created
        if self.stuck:
            return "queue", 1.0
        if elapsed < self.queue_s:
            return "queue", (self.queue_s - elapsed) / self.queue_s
        if elapsed < self.queue_s + self.latency_s:
            return "progress", (elapsed - self.queue_s) / self.latency_s
        return "done", 1.0


class _Reply(Exception):
    """Raised by a route to answer at once with ``status`` and a JSON ``body``."""

    def __init__(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


class FalEmulator:
    """fal's queue protocol on ``https://127.0.0.1:PORT``; use as ``with FalEmulator() as emu:``."""

    def __init__(self, key: str = "test-key-id:test-key-secret") -> None:
        self.key = key
        #: Model time per request spent IN_PROGRESS, and time spent IN_QUEUE (seconds); read at submit.
        self.latency_s = 0.0
        self.queue_s = 0.0
        #: Report every output as NSFW (has_nsfw_concepts all true).
        self.flag_nsfw = False
        # Recordings, appended under the lock by the serving threads; tests read them directly.
        self.submissions: list[Submission] = []
        self.cancellations: list[str] = []
        self.uploads: list[tuple[str, bytes]] = []
        self.log: list[tuple[str, str, int]] = []  # (method, path with query, status; 0 = reset)
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._jobs: dict[str, _Job] = {}
        self._files: dict[str, tuple[str, bytes]] = {}
        self._tokens: set[str] = set()
        self._pending: dict[str, str] = {}  # storage-fallback upload slot -> content type
        self._faults: list[_Fault] = []
        self._fail_seeds: dict[int, tuple[str, str, int]] = {}
        self._tmp = Path(tempfile.mkdtemp(prefix="fal-emulator-"))
        ca = trustme.CA()
        self.ca_path = str(self._tmp / "ca.pem")
        ca.cert_pem.write_to_path(self.ca_path)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
        self._server = _TLSServer(("127.0.0.1", 0), _Handler)
        self._server.context, self._server.emulator = context, self
        self.port: int = self._server.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.base_url = f"https://{self.host}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ lifecycle and public API

    def __enter__(self) -> FalEmulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving: stalls wake up, open connections are cut, the temp CA file is removed."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        self._thread.join(timeout=5)
        shutil.rmtree(self._tmp, ignore_errors=True)

    def env(self) -> dict[str, str]:
        """Environment for a flux-mcp server subprocess that should talk to this emulator."""
        return {
            "FAL_KEY": self.key,
            "FAL_RUN_HOST": self.host,
            "FAL_QUEUE_RUN_HOST": self.host,
            "SSL_CERT_FILE": self.ca_path,
            "FLUX_MCP_FAL_REST_URL": self.base_url,
            "FLUX_MCP_FAL_CDN_URL": self.base_url,
            "NO_PROXY": "127.0.0.1,localhost",
        }

    def reset(self) -> None:
        """Forget recordings, faults and failing seeds (jobs and files stay reachable)."""
        with self._lock:
            for recorded in (self.submissions, self.cancellations, self.uploads, self.log):
                recorded.clear()
            self._faults.clear()
            self._fail_seeds.clear()

    def add_fault(self, route: str, kind: str, times: int | None = 1, **params: Any) -> None:
        """Make the next ``times`` requests to ``route`` (None = all of them) misbehave as ``kind``.

        Params by kind: http(status=500, body=None, headers=None), stall(seconds=1.0),
        huge(size=8 MiB, declare_length=True), completed_error(message, error_type, status=500).
        ``completed_error`` and ``stuck_in_queue`` mark the job whose status was asked, for good.
        """
        if route not in ROUTES or kind not in KINDS:
            raise ValueError(
                f"unknown fault {route!r}/{kind!r}; routes {sorted(ROUTES)}, kinds {sorted(KINDS)}"
            )
        with self._lock:
            self._faults.append(_Fault(route, kind, times, params))

    def fail_seed(
        self, seed: int, message: str, error_type: str = "generation_error", status: int = 500
    ) -> None:
        """Every request whose payload has ``seed`` completes with an error (result answers ``status``)."""
        with self._lock:
            self._fail_seeds[seed] = (message, error_type, status)

    def wait_until(self, predicate: Callable[[], object], timeout: float = 5.0) -> bool:
        """Poll ``predicate()`` until it is true or ``timeout`` passes (for subprocess tests)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    # ------------------------------------------------------------------ state used by the handler

    def _take_fault(self, route: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.route == route and (fault.times is None or fault.times > 0):
                    if fault.times is not None:
                        fault.times -= 1
                    return fault
        return None

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.log.append((method, path, status))

    def _job(self, request_id: str) -> _Job:
        with self._lock:
            job = self._jobs.get(request_id)
        if job is None:
            raise _Reply(404, {"detail": f"Request {request_id} not found"})
        return job

    def _urls(self, job: _Job) -> dict[str, str]:
        base = f"{self.base_url}/{job.app}/requests/{job.id}"
        return {"response_url": base, "status_url": base + "/status", "cancel_url": base + "/cancel"}

    def _store_file(self, content_type: str, data: bytes, stem: str) -> str:
        name = f"{stem}-{uuid.uuid4().hex}"
        with self._lock:
            self._files[name] = (content_type, data)
        return f"{self.base_url}/files/{name}"

    def _file(self, name: str) -> tuple[str, bytes]:
        with self._lock:
            found = self._files.get(name)
        if found is None:
            raise _Reply(404, {"detail": "File not found"})
        return found

    # ------------------------------------------------------------------ the queue protocol

    def _submit(self, app_path: str, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
        try:
            payload = json.loads(body or b"null")
        except ValueError:
            raise _Reply(422, {"detail": "Request body is not valid JSON"}) from None
        _validate(payload, self._decode_input)
        app = app_path.strip("/")
        job = _Job(str(uuid.uuid4()), "/".join(app.split("/")[:2]), payload, self.queue_s, self.latency_s)
        seed = payload.get("seed")
        with self._lock:
            job.fails_at_end = self._fail_seeds.get(seed) if isinstance(seed, int) else None
            self._jobs[job.id] = job
            self.submissions.append(Submission(app, payload, job.id, headers))
        position = QUEUE_POSITIONS - 1 if job.queue_s > 0 else 0
        return {"request_id": job.id, **self._urls(job), "status": "IN_QUEUE", "queue_position": position}

    def _status(self, job: _Job, with_logs: bool) -> dict[str, Any]:
        phase, fraction = job.phase()
        answer: dict[str, Any] = {"request_id": job.id, "response_url": self._urls(job)["response_url"]}
        if phase == "queue":
            position = min(QUEUE_POSITIONS - 1, int(fraction * QUEUE_POSITIONS))
            return {**answer, "status": "IN_QUEUE", "queue_position": position}
        done_steps = job.steps if phase == "done" else int(fraction * job.steps)
        logs = _step_logs(job, done_steps) if with_logs else None
        if phase == "progress":
            return {**answer, "status": "IN_PROGRESS", "logs": logs}
        answer.update(status="COMPLETED", logs=logs, metrics={"inference_time": job.latency_s})
        if job.cancelled:
            answer.update(error="Request was cancelled", error_type="request_cancelled")
        elif job.failure is not None:
            answer.update(error=job.failure[0], error_type=job.failure[1])
        return answer

    def _result(self, job: _Job) -> dict[str, Any]:
        if job.cancelled:
            raise _Reply(400, {"detail": "Request was cancelled", "error_type": "request_cancelled"})
        if job.failure is not None:
            message, error_type, status = job.failure
            raise _Reply(
                status, {"detail": message, "error_type": error_type}, {"X-Fal-Error-Type": error_type}
            )
        if job.phase()[0] != "done":
            raise _Reply(400, {"detail": "Request is still in progress"})
        with job.lock:  # generated once, so every GET of the result sees the same files
            if job.output is None:
                job.output = self._generate(job)
            return job.output

    def _cancel(self, job: _Job) -> dict[str, Any]:
        with self._lock:
            self.cancellations.append(job.id)
        if job.phase()[0] == "done":
            raise _Reply(202, {"status": "ALREADY_COMPLETED"})
        job.cancelled = True
        raise _Reply(202, {"status": "CANCELLATION_REQUESTED"})

    def _mark(self, fault: _Fault, path: str) -> None:
        """Apply a job-level fault (completed_error, stuck_in_queue) to the job a status URL names."""
        match = _REQUEST_PATH.match(path)
        with self._lock:
            job = self._jobs.get(match["id"]) if match else None
        if job is None:
            return
        if fault.kind == "stuck_in_queue":
            job.stuck = True
            return
        params = fault.params
        message = params.get("message", "Internal error while generating the image")
        job.error = (message, params.get("error_type", "generation_error"), int(params.get("status", 500)))

    # ------------------------------------------------------------------ CDN token and uploads

    def _token(self) -> dict[str, Any]:
        token = uuid.uuid4().hex
        with self._lock:
            self._tokens.add(token)
        expires = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        return {"token": token, "token_type": "Bearer", "base_url": self.base_url, "expires_at": expires}

    def _upload(self, content_type: str, data: bytes) -> dict[str, str]:
        with self._lock:
            self.uploads.append((content_type, data))
        return {"access_url": self._store_file(content_type, data, "upload")}

    def _initiate_upload(self, body: bytes) -> dict[str, str]:
        """fal-client's fallback when the CDN upload fails: a slot to PUT the bytes to."""
        slot = uuid.uuid4().hex
        with self._lock:
            self._pending[slot] = str(
                json.loads(body or b"{}").get("content_type", "application/octet-stream")
            )
        return {
            "upload_url": f"{self.base_url}/files/upload/put/{slot}",
            "file_url": f"{self.base_url}/files/upload-{slot}",
        }

    def _put_upload(self, slot: str, content_type: str | None, data: bytes) -> dict[str, str]:
        with self._lock:
            pending = self._pending.pop(slot, None)
            if pending is None:
                raise _Reply(404, {"detail": "Unknown upload slot"})
            self._files[f"upload-{slot}"] = (content_type or pending, data)
            self.uploads.append((content_type or pending, data))
        return {}

    # ------------------------------------------------------------------ outputs

    def _decode_input(self, url: str) -> Image.Image:
        """The image behind an input URL; raises ValueError/OSError when it cannot be read."""
        if url.startswith("data:"):
            data = base64.b64decode(url.partition(",")[2], validate=True)
        elif urlsplit(url).netloc in (self.host, f"localhost:{self.port}") and "/files/" in url:
            data = self._file(url.rsplit("/files/", 1)[1])[1]
        else:  # never fetch external URLs: a placeholder derived from the URL stands in
            return _placeholder(url)
        image = Image.open(io.BytesIO(data))
        image.load()
        return image

    def _generate(self, job: _Job) -> dict[str, Any]:
        payload = job.payload
        source = self._decode_input(payload["image_urls"][0]).convert("RGB")
        size = _requested_size(payload.get("image_size"), source.size)
        seed = payload["seed"] if isinstance(payload.get("seed"), int) else random.randint(0, 2**32 - 1)
        extension = payload.get("output_format", "png")
        fmt, content_type = FORMATS[extension]
        prompt = str(payload["prompt"])
        images = []
        for i in range(int(payload.get("num_images", 1))):
            data = _render(source, size, seed + i, prompt, fmt)
            if payload.get("sync_mode"):
                url = f"data:{content_type};base64,{base64.b64encode(data).decode()}"
            else:
                url = self._store_file(content_type, data, f"out-{i}")
            images.append(
                {"url": url, "width": size[0], "height": size[1], "content_type": content_type,
                 "file_name": f"{job.id}_{i}.{extension}", "file_size": len(data)}
            )  # fmt: skip
        return {
            "images": images,
            "seed": seed,
            "has_nsfw_concepts": [self.flag_nsfw] * len(images),
            "prompt": prompt,
            "timings": {"inference": job.latency_s},
        }


# ------------------------------------------------------------------------------------- helpers


def _validate(payload: Any, decode: Callable[[str], Image.Image]) -> None:
    """fal-like light validation: 422 with ``detail[].loc`` naming each bad field."""
    if not isinstance(payload, dict):
        raise _Reply(
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
            except (ValueError, OSError, _Reply):
                bad(["image_urls", i], "Could not load the image at this URL", "image_load_error")
    num_images = payload.get("num_images", 1)
    if not isinstance(num_images, int) or not 1 <= num_images <= 4:
        bad(["num_images"], "Input should be between 1 and 4", "less_than_equal")
    if payload.get("output_format", "png") not in FORMATS:
        bad(["output_format"], "Input should be 'jpeg', 'png' or 'webp'", "literal_error")
    try:
        _requested_size(payload.get("image_size"), (1, 1))
    except ValueError as exc:
        bad(["image_size"], str(exc), "value_error")
    if problems:
        raise _Reply(422, {"detail": problems})


def _requested_size(image_size: Any, default: tuple[int, int]) -> tuple[int, int]:
    if image_size is None:
        return default
    if isinstance(image_size, str) and image_size in SIZE_PRESETS:
        return SIZE_PRESETS[image_size]
    if isinstance(image_size, dict):
        width, height = image_size.get("width"), image_size.get("height")
        if isinstance(width, int) and isinstance(height, int) and 0 < width <= 14142 and 0 < height <= 14142:
            return width, height
    raise ValueError(f"Input should be one of {', '.join(SIZE_PRESETS)} or {{width, height}}")


def _step_logs(job: _Job, done_steps: int) -> list[dict[str, Any]]:
    """One log line when the model starts, then one per finished step, like a sampler's progress."""
    started = datetime.now(UTC) - timedelta(seconds=time.monotonic() - job.created - job.queue_s)
    step_s = job.latency_s / max(job.steps, 1)
    lines = [("Loading input images", started)]
    lines += [
        (f"Step {k}/{job.steps}", started + timedelta(seconds=k * step_s)) for k in range(1, done_steps + 1)
    ]
    return [{"message": m, "level": "INFO", "source": "user", "timestamp": t.isoformat()} for m, t in lines]


def _render(source: Image.Image, size: tuple[int, int], seed: int, prompt: str, fmt: str) -> bytes:
    """The input resized and blended with a colour chosen by (seed, prompt): deterministic, distinct."""
    tint = tuple(hashlib.sha256(f"{seed}|{prompt}".encode()).digest()[:3])
    edited = Image.blend(source.resize(size, Image.Resampling.BILINEAR), Image.new("RGB", size, tint), 0.35)
    buffer = io.BytesIO()
    edited.save(buffer, format=fmt)
    return buffer.getvalue()


def _placeholder(url: str) -> Image.Image:
    digest = hashlib.sha256(url.encode()).digest()
    gradient = Image.linear_gradient("L").resize((PLACEHOLDER_SIDE, PLACEHOLDER_SIDE))
    return ImageOps.colorize(gradient, black=tuple(digest[:3]), white=tuple(digest[3:6]))


def _no_route(method: str, path: str) -> None:
    raise _Reply(404, {"detail": f"No route for {method} {path}"})


class _TLSServer(ThreadingHTTPServer):
    """A threaded HTTP server doing the TLS handshake in each connection's own thread."""

    daemon_threads = True
    request_queue_size = 128
    context: ssl.SSLContext
    emulator: FalEmulator

    def server_bind(self) -> None:
        # The earliest hook of TCPServer.__init__: the live-connection set must exist before serving.
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().server_bind()

    def finish_request(self, request: Any, client_address: Any) -> None:
        # Handshake here (a worker thread), not in accept(): a slow client cannot block the others.
        request.settimeout(30)
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except OSError:  # ssl.SSLError included: a client that gave up or did not trust us
            return
        with self.connections_lock:
            self.connections.add(tls)
        try:
            self.RequestHandlerClass(tls, client_address, self)
        except OSError:
            pass  # the client went away mid-answer
        finally:
            with self.connections_lock:
                self.connections.discard(tls)
            tls.close()

    def close_connections(self) -> None:
        with self.connections_lock:
            live = list(self.connections)
        for conn in live:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Client disconnects are expected under fault injection; anything else is an emulator bug."""
        if not isinstance(sys.exc_info()[1], OSError):
            traceback.print_exc()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _TLSServer

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the emulator records requests in ``emu.log`` instead."""

    def _dispatch(self) -> None:
        emu = self.server.emulator
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self.close_connection = True
            self._send(413, {"detail": "Request body too large"})
            return
        body = self.rfile.read(length) if length else b""
        route, scheme, answer = self._route(body)
        # Faults act before authentication, like an overloaded ingress in front of fal would.
        fault = emu._take_fault(route) if route else None
        if fault is not None and self._apply_fault(fault):
            return
        headers: dict[str, str] = {}
        try:
            self._check_auth(scheme)
            status, reply = 200, answer()
        except _Reply as early:
            status, reply, headers = early.status, early.body, early.headers
        except Exception as exc:  # an emulator bug: say so loudly instead of dropping the connection
            traceback.print_exc()
            status, reply = 500, {"detail": f"fal emulator error: {exc!r}"}
        if isinstance(reply, tuple):  # a file: (content type, bytes)
            headers, reply = {**headers, "Content-Type": reply[0]}, reply[1]
        self._send(status, reply, headers)

    do_GET = do_POST = do_PUT = _dispatch

    def _route(self, body: bytes) -> tuple[str | None, str, Callable[[], Any]]:
        """(fault route, auth scheme wanted, callable producing the answer) for one request."""
        emu, method, parts = self.server.emulator, self.command, urlsplit(self.path)
        path, content_type = parts.path, self.headers.get("Content-Type")
        if method == "PUT" and path.startswith("/files/upload/put/"):
            return None, "", lambda: emu._put_upload(path.rsplit("/", 1)[1], content_type, body)
        if method == "GET" and path.startswith("/files/"):
            return "file", "", lambda: emu._file(path.removeprefix("/files/"))
        if method == "POST" and path == "/storage/auth/token":
            return "token", "Key", emu._token
        if method == "POST" and path == "/files/upload":
            return "upload", "Bearer", lambda: emu._upload(content_type or "application/octet-stream", body)
        if method == "POST" and path == "/storage/upload/initiate":
            return "upload", "Key", lambda: emu._initiate_upload(body)
        match = _REQUEST_PATH.match(path)
        if match and method == "GET" and match["tail"] == "/status":
            with_logs = parse_qs(parts.query).get("logs", ["0"])[0].lower() in ("1", "true")
            return "status", "Key", lambda: emu._status(emu._job(match["id"]), with_logs)
        if match and method == "GET" and not match["tail"]:
            return "result", "Key", lambda: emu._result(emu._job(match["id"]))
        if match and method == "PUT" and match["tail"] == "/cancel":
            return "cancel", "Key", lambda: emu._cancel(emu._job(match["id"]))
        if method == "POST" and path.count("/") >= 2:
            headers = {k.lower(): v for k, v in self.headers.items() if k.lower() != "authorization"}
            return "submit", "Key", lambda: emu._submit(path, body, headers)
        return None, "", lambda: _no_route(method, path)

    def _check_auth(self, scheme: str) -> None:
        emu, given = self.server.emulator, self.headers.get("Authorization") or ""
        if scheme == "Key" and given != f"Key {emu.key}":
            raise _Reply(401, {"detail": "Authentication is required: invalid or missing key"})
        if scheme == "Bearer":
            kind, _, token = given.partition(" ")
            with emu._lock:
                known = token in emu._tokens
            if kind != "Bearer" or not known:
                raise _Reply(401, {"detail": "Invalid CDN token"})

    def _apply_fault(self, fault: _Fault) -> bool:
        """Act out ``fault``; True when the request has been fully answered (or dropped)."""
        emu, params = self.server.emulator, fault.params
        if fault.kind == "http":
            status, body = int(params.get("status", 500)), params.get("body")
            body = body if body is not None else {"detail": f"Injected HTTP {status}"}
            content_type = "text/html" if isinstance(body, str) else "application/json"
            raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self._send(status, raw, {"Content-Type": content_type, **params.get("headers", {})})
        elif fault.kind == "reset":
            self._reset()
        elif fault.kind == "malformed":
            self._send(200, b'{"status": "COMPLETED", "images": [{"url": ')
        elif fault.kind == "not_found":
            self._send(404, {"detail": "Not found"})
        elif fault.kind == "huge":
            self._send_huge(int(params.get("size", 8 * 2**20)), bool(params.get("declare_length", True)))
        elif fault.kind == "stall":  # then answer normally; close() wakes it early
            emu._closing.wait(min(max(float(params.get("seconds", 1.0)), 0.0), MAX_STALL_S))
            return False
        else:  # completed_error, stuck_in_queue: change the job, then answer normally
            emu._mark(fault, urlsplit(self.path).path)
            return False
        return True

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(raw)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(raw)
        self.server.emulator._record(self.command, self.path, status)

    def _send_huge(self, size: int, declare_length: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if declare_length:
            self.send_header("Content-Length", str(size))
        else:  # length unknown: the body ends when the connection closes
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.server.emulator._record(self.command, self.path, 200)
        chunk, sent = b"\x89PNG" + bytes(64 * 1024 - 4), 0
        try:
            while sent < size and not self.server.emulator._closing.is_set():
                self.wfile.write(chunk[: size - sent])
                sent += min(len(chunk), size - sent)
        except OSError:
            self.close_connection = True  # the client stopped reading: that is the point

    def _reset(self) -> None:
        """Drop the connection without an answer: SO_LINGER 0 makes close() send a TCP RST."""
        self.server.emulator._record(self.command, self.path, 0)
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()
