"""The ``FalEmulator`` itself: fal's queue protocol over the state in ``_jobs``, served by ``_server``.

It owns everything a test looks at or changes: recordings (submissions, cancellations, uploads, the
request log), injected faults and failing seeds, jobs and stored files, and the lifecycle of the
HTTPS server thread. Its underscored methods are the routes the handler calls. It knows nothing
about flux-mcp, only fal's side of the wire protocol.
"""

from __future__ import annotations

import base64
import io
import json
import random
import shutil
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trustme
from PIL import Image

from ._jobs import (
    FORMATS,
    KINDS,
    REQUEST_PATH,
    ROUTES,
    Event,
    EventStream,
    Fault,
    Job,
    Reply,
    Submission,
    placeholder,
    render,
    requested_size,
    step_logs,
    validate,
)
from ._server import Handler, TLSServer

__all__ = ["FalEmulator"]

QUEUE_POSITIONS = 3  # a queued request counts down 2, 1, 0 over queue_s
STREAM_TICK_S = 0.005  # how often a status stream looks for a change


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
        #: Request ids whose COMPLETED status was handed out (on a poll or the stream), in order; recorded
        #: before it is sent, so before the client can react to it.
        self.completed_told: list[str] = []
        self.uploads: list[tuple[str, bytes]] = []
        self.log: list[tuple[str, str, int]] = []  # (method, path with query, status; 0 = reset)
        #: The same answers with their route and when they were sent (time.monotonic(), which every
        #: process on the machine shares): tests measure waits between requests from these, not clocks.
        self.events: list[Event] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._jobs: dict[str, Job] = {}
        self._files: dict[str, tuple[str, bytes]] = {}
        self._tokens: set[str] = set()
        self._pending: dict[str, str] = {}  # storage-fallback upload slot -> content type
        self._faults: list[Fault] = []
        self._gate: threading.Event | None = None  # set by hold_jobs(): new jobs wait for it
        self._fail_seeds: dict[int, tuple[str, str, int]] = {}
        self._tmp = Path(tempfile.mkdtemp(prefix="fal-emulator-"))
        ca = trustme.CA()
        self.ca_path = str(self._tmp / "ca.pem")
        ca.cert_pem.write_to_path(self.ca_path)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
        self._server = TLSServer(("127.0.0.1", 0), Handler)
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
        self.release_jobs()
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
            for recorded in (
                self.submissions,
                self.cancellations,
                self.completed_told,
                self.uploads,
                self.log,
                self.events,
            ):
                recorded.clear()
            self._faults.clear()
            self._fail_seeds.clear()
        self.release_jobs()

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
            self._faults.append(Fault(route, kind, times, params))

    def hold_jobs(self) -> None:
        """Jobs submitted from now on stop halfway through their steps (IN_PROGRESS, logging) until
        ``release_jobs()``: a test decides when "fal" finishes, instead of racing a latency."""
        with self._lock:
            if self._gate is None:
                self._gate = threading.Event()

    def release_jobs(self) -> None:
        """Let every held job finish (at once, if its latency has passed)."""
        with self._lock:
            gate, self._gate = self._gate, None
        if gate is not None:
            gate.set()

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

    def _take_fault(self, route: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.route == route and (fault.times is None or fault.times > 0):
                    if fault.times is not None:
                        fault.times -= 1
                    return fault
        return None

    def _record(self, method: str, path: str, status: int, route: str | None) -> None:
        with self._lock:
            self.log.append((method, path, status))
            self.events.append(Event(time.monotonic(), route or "", method, path, status))

    def route_events(self, route: str) -> list[Event]:
        """The answers given on ``route`` (submit, status, result, cancel, file, upload, token), in order."""
        with self._lock:
            return [event for event in self.events if event.route == route]

    def _job(self, request_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(request_id)
        if job is None:
            raise Reply(404, {"detail": f"Request {request_id} not found"})
        return job

    def _urls(self, job: Job) -> dict[str, str]:
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
            raise Reply(404, {"detail": "File not found"})
        return found

    # ------------------------------------------------------------------ the queue protocol

    def _submit(self, app_path: str, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
        try:
            payload = json.loads(body or b"null")
        except ValueError:
            raise Reply(422, {"detail": "Request body is not valid JSON"}) from None
        validate(payload, self._decode_input)
        app = app_path.strip("/")
        job = Job(str(uuid.uuid4()), "/".join(app.split("/")[:2]), payload, self.queue_s, self.latency_s)
        seed = payload.get("seed")
        with self._lock:
            job.gate = self._gate
            job.fails_at_end = self._fail_seeds.get(seed) if isinstance(seed, int) else None
            self._jobs[job.id] = job
            self.submissions.append(Submission(app, payload, job.id, headers))
        position = QUEUE_POSITIONS - 1 if job.queue_s > 0 else 0
        return {"request_id": job.id, **self._urls(job), "status": "IN_QUEUE", "queue_position": position}

    def _status(self, job: Job, with_logs: bool) -> dict[str, Any]:
        phase, fraction = job.phase()
        answer: dict[str, Any] = {"request_id": job.id, "response_url": self._urls(job)["response_url"]}
        if phase == "queue":
            position = min(QUEUE_POSITIONS - 1, int(fraction * QUEUE_POSITIONS))
            return {**answer, "status": "IN_QUEUE", "queue_position": position}
        done_steps = job.steps if phase == "done" else int(fraction * job.steps)
        logs = step_logs(job, done_steps) if with_logs else None
        if phase == "progress":
            return {**answer, "status": "IN_PROGRESS", "logs": logs}
        answer.update(status="COMPLETED", logs=logs, metrics={"inference_time": job.latency_s})
        with self._lock:
            self.completed_told.append(job.id)
        if job.cancelled:
            answer.update(error="Request was cancelled", error_type="request_cancelled")
        elif job.failure is not None:
            answer.update(error=job.failure[0], error_type=job.failure[1])
        return answer

    def _status_stream(self, job: Job, with_logs: bool) -> EventStream:
        """The status as fal's queue streams it: the current status, then each change, ending after
        COMPLETED. Changes are looked for every few milliseconds, and at the very moment the job ends
        (the emulator's jobs run on a clock), as fal pushes them."""

        def events() -> Iterator[dict[str, Any]]:
            last = None
            while not self._closing.is_set():
                status = self._status(job, with_logs)
                if status != last:
                    yield status
                    last = status
                if status["status"] == "COMPLETED":
                    return
                self._closing.wait(min(STREAM_TICK_S, job.time_left()))

        return EventStream(events())

    def _result(self, job: Job) -> dict[str, Any]:
        if job.cancelled:
            raise Reply(400, {"detail": "Request was cancelled", "error_type": "request_cancelled"})
        if job.failure is not None:
            message, error_type, status = job.failure
            raise Reply(
                status, {"detail": message, "error_type": error_type}, {"X-Fal-Error-Type": error_type}
            )
        if job.phase()[0] != "done":
            raise Reply(400, {"detail": "Request is still in progress"})
        with job.lock:  # generated once, so every GET of the result sees the same files
            if job.output is None:
                job.output = self._generate(job)
            return job.output

    def _cancel(self, job: Job) -> dict[str, Any]:
        with self._lock:
            self.cancellations.append(job.id)
        if job.phase()[0] == "done":
            raise Reply(202, {"status": "ALREADY_COMPLETED"})
        job.cancelled = True
        raise Reply(202, {"status": "CANCELLATION_REQUESTED"})

    def _mark(self, fault: Fault, path: str) -> None:
        """Apply a job-level fault (completed_error, stuck_in_queue) to the job a status URL names."""
        match = REQUEST_PATH.match(path)
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
                raise Reply(404, {"detail": "Unknown upload slot"})
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
            return placeholder(url)
        image = Image.open(io.BytesIO(data))
        image.load()
        return image

    def _generate(self, job: Job) -> dict[str, Any]:
        payload = job.payload
        source = self._decode_input(payload["image_urls"][0]).convert("RGB")
        size = requested_size(payload.get("image_size"), source.size)
        seed = payload["seed"] if isinstance(payload.get("seed"), int) else random.randint(0, 2**32 - 1)
        extension = payload.get("output_format", "png")
        fmt, content_type = FORMATS[extension]
        prompt = str(payload["prompt"])
        images = []
        for i in range(int(payload.get("num_images", 1))):
            data = render(source, size, seed + i, prompt, fmt)
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
